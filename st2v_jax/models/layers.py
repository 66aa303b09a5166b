"""Building blocks shared by every model: parameterised layers with logical axis names,
group/layer norms, attention, feed-forward, resnet blocks and the timestep embedding.

Activations are channels-last. Video tensors are (B, F, H, W, C). Every parameter carries
logical axis names (see `st2v_jax.parallel` for the mesh rules that map them):
  "conv_taps"     spatial/temporal kernel taps (never sharded)
  "channels_in"   input features of a kernel
  "channels_out"  output features of a kernel
  "channels"      a per-channel vector (bias, norm scale/shift)

Modules with matmuls, convolutions or attention take `execution`
(`st2v_jax.models.execution.ExecutionOptions`): their compute dtype and attention kernel.
Parameters are created in float32 under every option; GroupNorm keeps the input's dtype.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models import pallas_attention
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions

Array = jax.Array
ContextMixerFactory = Callable[[], nn.Module]


def _kernel_init(init: Callable, taps: int, zero: bool) -> Callable:
    names = ("conv_taps",) * taps + ("channels_in", "channels_out")
    return nn.with_logical_partitioning(nn.initializers.zeros_init() if zero else init, names)


def _channels_init(init: Callable) -> Callable:
    return nn.with_logical_partitioning(init, ("channels",))


def dense(
    features: int, *, use_bias: bool = True, zero_init: bool = False, dtype: Any = None, name: Optional[str] = None
) -> nn.Dense:
    """A Linear layer; `zero_init` gives the official zero-initialised output projections.
    `dtype` is the compute dtype (inputs and kernel are cast to it); params stay float32."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_kernel_init(nn.initializers.lecun_normal(), 0, zero_init),
        bias_init=_channels_init(nn.initializers.zeros_init()),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    use_bias: bool = True,
    zero_init: bool = False,
    dtype: Any = None,
    name: Optional[str] = None,
) -> nn.Conv:
    """A convolution with symmetric zero padding (PyTorch semantics), computed in `dtype`."""
    pads = [padding] * len(kernel_size) if isinstance(padding, int) else list(padding)
    return nn.Conv(
        features,
        tuple(kernel_size),
        strides=strides,
        padding=[(p, p) for p in pads],
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_kernel_init(nn.initializers.lecun_normal(), len(kernel_size), zero_init),
        bias_init=_channels_init(nn.initializers.zeros_init()),
        name=name,
    )


class GroupNorm(nn.Module):
    """GroupNorm over channels-last video (B, F, H, W, C), statistics in float32.

    `across_frames=False` normalises every frame on its own (what PyTorch does when frames
    are folded into the batch); `True` pools the statistics over all frames (temporal
    layers and CAM mergers, where PyTorch sees a (B, C, F, H, W) tensor).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    across_frames: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", _channels_init(nn.initializers.ones_init()), (channels,))
        bias = self.param("bias", _channels_init(nn.initializers.zeros_init()), (channels,))
        b, f = x.shape[:2]
        grouped = x.astype(jnp.float32).reshape(b, f, -1, self.num_groups, channels // self.num_groups)
        axes = (1, 2, 4) if self.across_frames else (2, 4)
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (normed * scale + bias).astype(x.dtype)


def layer_norm(epsilon: float = 1e-5, dtype: Any = None, name: Optional[str] = None) -> nn.LayerNorm:
    """LayerNorm whose statistics are float32 (flax reduces in float32) and output is `dtype`."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=dtype,
        scale_init=_channels_init(nn.initializers.ones_init()),
        bias_init=_channels_init(nn.initializers.zeros_init()),
        name=name,
    )


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    heads: int,
    is_causal: bool = False,
    execution: ExecutionOptions = DEFAULT_EXECUTION,
    long_sequence: bool = False,
) -> Array:
    """Multi-head softmax attention scaled by 1/sqrt(d), softmax in float32.
    q (N, Lq, heads*d), k/v (N, Lk, heads*d) -> (N, Lq, heads*d).

    `execution.attention` picks the kernel; the splash kernel runs only where the caller
    marks a `long_sequence` self-attention of at least one kernel tile."""
    n, lq, width = q.shape
    d = width // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
    splash = execution.attention == "splash" and long_sequence and not is_causal
    if splash and lq == k.shape[1] >= pallas_attention.MIN_TOKENS:
        out = pallas_attention.splash_attention(q, k, v, interpret=execution.pallas_interpret)
    elif execution.attention == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")
    else:
        out = _softmax_attention(q, k, v, is_causal)
    return out.reshape(n, lq, width)


def _softmax_attention(q: Array, k: Array, v: Array, is_causal: bool) -> Array:
    """q (N, Lq, heads, d), k/v (N, Lk, heads, d) -> (N, Lq, heads, d), scores and softmax in
    float32. The softmax's division comes after the product with v: it scales the (Lq, d)
    output instead of the (Lq, Lk) weights, which saves a pass over the largest tensor."""
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if is_causal:  # top-left aligned, as torch's and jax.nn's is_causal
        scores = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), scores, -jnp.inf)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    totals = weights.sum(axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.swapaxes(totals, 1, 2)[..., None]).astype(q.dtype)


class Attention(nn.Module):
    """diffusers-style attention: to_q/to_k/to_v (no bias) and an output projection with bias.

    `context_mixer`, when given, builds a submodule that rewrites the key/value context
    before the projections (APM plugs in here without the UNet knowing about it).
    `long_sequence` marks the spatial self-attention, the one attention long enough for the
    splash kernel.
    """

    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = False
    context_mixer: Optional[ContextMixerFactory] = None
    long_sequence: bool = False
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        inner, dtype = self.heads * self.head_dim, self.execution.dtype
        self.to_q = dense(inner, use_bias=self.qkv_bias, dtype=dtype)
        self.to_k = dense(inner, use_bias=self.qkv_bias, dtype=dtype)
        self.to_v = dense(inner, use_bias=self.qkv_bias, dtype=dtype)
        self.to_out = dense(self.out_features, dtype=dtype)
        if self.context_mixer is not None:
            self.mixer = self.context_mixer()

    def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
        if context is None:
            context = x
        elif self.context_mixer is not None:
            context = self.mixer(context)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(dot_product_attention(q, k, v, self.heads, execution=self.execution, long_sequence=self.long_sequence))


class GEGLUFeedForward(nn.Module):
    """Linear to 2 x 4C, exact-erf GELU gate, Linear back to C (diffusers `FeedForward`)."""

    features: int
    mult: int = 4
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = self.execution.dtype
        hidden, gate = jnp.split(dense(2 * self.mult * self.features, dtype=dtype, name="gate_proj")(x), 2, axis=-1)
        return dense(self.features, dtype=dtype, name="out_proj")(hidden * jax.nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` over grouped tokens x (B, G, S, C).

    Self-attention runs over S within each group. With `cross_attention`, attn2 attends from
    all G*S tokens of a sample to that sample's context (B, L, D) (identical to repeating the
    context per group, without the repeat); otherwise attn2 is a second self-attention.
    """

    heads: int
    head_dim: int
    cross_attention: bool
    context_mixer: Optional[ContextMixerFactory] = None
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
        b, g, s, c = x.shape
        ex = self.execution
        attn = lambda name, mixer=None, long=False: Attention(
            self.heads, self.head_dim, c, context_mixer=mixer, long_sequence=long, execution=ex, name=name
        )

        h = layer_norm(dtype=ex.dtype, name="norm1")(x).reshape(b * g, s, c)
        # In a spatial block (the one with cross-attention) attn1 runs over the h*w pixels.
        x = x + attn("attn1", long=self.cross_attention)(h).reshape(b, g, s, c)
        h = layer_norm(dtype=ex.dtype, name="norm2")(x)
        if self.cross_attention:
            h = attn("attn2", self.context_mixer)(h.reshape(b, g * s, c), context)
        else:
            h = attn("attn2")(h.reshape(b * g, s, c))
        x = x + h.reshape(b, g, s, c)
        return x + GEGLUFeedForward(c, execution=ex, name="ff")(layer_norm(dtype=ex.dtype, name="norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers `Transformer2DModel` (linear projections) applied to every frame."""

    heads: int
    head_dim: int
    num_groups: int = 32
    context_mixer: Optional[ContextMixerFactory] = None
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        b, f, hh, ww, c = x.shape
        inner, ex = self.heads * self.head_dim, self.execution
        h = GroupNorm(self.num_groups, 1e-6, name="norm")(x).reshape(b, f, hh * ww, c)
        h = dense(inner, dtype=ex.dtype, name="proj_in")(h)
        h = TransformerBlock(
            self.heads, self.head_dim, cross_attention=True, context_mixer=self.context_mixer, execution=ex, name="transformer_blocks_0"
        )(h, context)
        h = dense(c, dtype=ex.dtype, name="proj_out")(h)
        return x + h.reshape(x.shape)


class TemporalTransformer(nn.Module):
    """diffusers `TransformerTemporalModel`: self-attention along frames at every pixel."""

    heads: int
    head_dim: int
    num_groups: int = 32
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, f, hh, ww, c = x.shape
        inner, ex = self.heads * self.head_dim, self.execution
        h = GroupNorm(self.num_groups, 1e-6, across_frames=True, name="norm")(x)
        h = jnp.transpose(h, (0, 2, 3, 1, 4)).reshape(b, hh * ww, f, c)
        h = dense(inner, dtype=ex.dtype, name="proj_in")(h)
        h = TransformerBlock(self.heads, self.head_dim, cross_attention=False, execution=ex, name="transformer_blocks_0")(h)
        # Zero-initialised like ModelScope's TemporalTransformer (zero_module(proj_out)): a fresh
        # temporal layer is the identity, so a UNet3D trained on single frames with its temporal
        # layers frozen makes the same frames when it runs on 16.
        h = dense(c, zero_init=True, dtype=ex.dtype, name="proj_out")(h)
        return x + jnp.transpose(h.reshape(b, hh, ww, f, c), (0, 3, 1, 2, 4))


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` per frame; `temb` (B, T) is shared by all frames of a sample."""

    features: int
    num_groups: int = 32
    epsilon: float = 1e-5
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
        dtype = self.execution.dtype
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm1")(x))
        h = conv(self.features, (3, 3), padding=1, dtype=dtype, name="conv1")(h)
        if temb is not None:
            h = h + dense(self.features, dtype=dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, None, :]
        h = nn.silu(GroupNorm(self.num_groups, self.epsilon, name="norm2")(h))
        h = conv(self.features, (3, 3), padding=1, dtype=dtype, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), dtype=dtype, name="conv_shortcut")(x)
        return x + h


class TemporalConvBlock(nn.Module):
    """diffusers `TemporalConvLayer`: four [GroupNorm, SiLU, Conv (3,1,1)] stages along frames."""

    num_groups: int = 32
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x
        for i in range(1, 5):
            h = nn.silu(GroupNorm(self.num_groups, 1e-5, across_frames=True, name=f"conv{i}_norm")(h))
            # conv4 is zero-initialised so a fresh block is the identity, as in the original.
            h = conv(x.shape[-1], (3, 1, 1), padding=(1, 0, 0), zero_init=i == 4, dtype=self.execution.dtype, name=f"conv{i}")(h)
        return x + h


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding, cosines first (diffusers `Timesteps(flip_sin_to_cos=True, shift=0)`)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    features: int
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        dtype = self.execution.dtype
        return dense(self.features, dtype=dtype, name="linear_2")(nn.silu(dense(self.features, dtype=dtype, name="linear_1")(emb)))


def upsample_nearest(x: Array, size: tuple[int, int]) -> Array:
    """Nearest-neighbour resize of (..., H, W, C) to `size`, PyTorch index rule floor(i*in/out)."""
    h_in, w_in = x.shape[-3:-1]
    rows = (jnp.arange(size[0]) * h_in) // size[0]
    cols = (jnp.arange(size[1]) * w_in) // size[1]
    return x[..., rows, :, :][..., cols, :]


def abstract_params(module: nn.Module, *args: Any, method: Optional[Any] = None) -> Any:
    """Parameter shapes/dtypes (boxed with logical axis names) without allocating anything."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, method=method))["params"]
