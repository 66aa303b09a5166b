"""The SD-family image VAE (diffusers `AutoencoderKL`) used by ModelScope text-to-video,
channels-last, plus chunked per-frame encoding and decoding of videos.

The network works on images (N, H, W, C). Inside, activations carry a singleton frame axis
(N, 1, H, W, C) so that the shared video layers (`GroupNorm`, `ResnetBlock`) apply as they
are, with per-image statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models.layers import Array, Attention, GroupNorm, ResnetBlock, conv, upsample_nearest

_DOWN_TYPES = ("DownEncoderBlock2D",)
_UP_TYPES = ("UpDecoderBlock2D",)
# diffusers hard-codes this epsilon for every norm of the VAE; the config has no field for it.
NORM_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The architecture fields of a diffusers `vae/config.json` for AutoencoderKL.

    The defaults are the VAE of ModelScope text-to-video-ms-1.7b (the SD 1.x VAE).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self) -> None:
        problems = []
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
            self.block_out_channels
        ):
            problems.append("down_block_types, up_block_types and block_out_channels must have the same length")
        problems += [
            f"unsupported down block type {t!r} (supported: {_DOWN_TYPES})" for t in self.down_block_types if t not in _DOWN_TYPES
        ]
        problems += [f"unsupported up block type {t!r} (supported: {_UP_TYPES})" for t in self.up_block_types if t not in _UP_TYPES]
        problems += [
            f"block width {c} is not a multiple of norm_num_groups={self.norm_num_groups}"
            for c in self.block_out_channels
            if c % self.norm_num_groups
        ]
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.scaling_factor <= 0:
            problems.append(f"scaling_factor must be positive, got {self.scaling_factor}")
        if problems:
            raise ValueError("invalid AutoencoderKL config: " + "; ".join(problems))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """Reads a diffusers AutoencoderKL config dict (unrelated keys such as sample_size are ignored).

        Options that would change the result without a field here (another activation, no
        mid-block attention, latent shift or per-channel statistics) are refused.
        """
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn {config['act_fn']!r} is not supported: AutoencoderKL here uses 'silu'")
        if not config.get("mid_block_add_attention", True):
            raise ValueError("mid_block_add_attention=False is not supported: the mid blocks always have attention here")
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"{key}={config[key]!r} is not supported: latents are only scaled by scaling_factor here")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        return cls(**values)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)


class _MidAttention(Attention):
    """diffusers' VAE attention block: GroupNorm, self-attention over the pixels of each
    frame (with q/k/v biases), output projection, residual. Inheriting `Attention` keeps the
    projections at the block's top level, where diffusers has them."""

    num_groups: int = 32

    def setup(self) -> None:
        super().setup()
        self.group_norm = GroupNorm(self.num_groups, NORM_EPS)

    def __call__(self, x: Array) -> Array:
        b, f, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b * f, h * w, c)
        return x + super().__call__(tokens).reshape(x.shape)


class _MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, attention, resnet."""

    features: int
    num_groups: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.features
        x = ResnetBlock(c, self.num_groups, NORM_EPS, name="resnets_0")(x)
        x = _MidAttention(heads=1, head_dim=c, out_features=c, qkv_bias=True, num_groups=self.num_groups, name="attentions_0")(x)
        return ResnetBlock(c, self.num_groups, NORM_EPS, name="resnets_1")(x)


class _Downsample(nn.Module):
    """Downsample2D as the VAE configures it: padding=0 plus a bottom/right-only zero pad, so
    the 3x3 stride-2 window is not centred as it is in the UNet's symmetric-pad version."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(0, 1), (0, 1), (0, 0)])
        return conv(self.features, (3, 3), strides=2, name="conv")(x)


class _Upsample(nn.Module):
    """Upsample2D: nearest-neighbour 2x, then a 3x3 convolution."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, w = x.shape[-3:-1]
        return conv(self.features, (3, 3), padding=1, name="conv")(upsample_nearest(x, (2 * h, 2 * w)))


class _Stage(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down/up sampler."""

    features: int
    num_layers: int
    num_groups: int
    resample: Optional[str]  # "down", "up" or None

    def setup(self) -> None:
        self.resnets = [ResnetBlock(self.features, self.num_groups, NORM_EPS) for _ in range(self.num_layers)]
        if self.resample == "down":
            self.downsamplers_0 = _Downsample(self.features)
        elif self.resample == "up":
            self.upsamplers_0 = _Upsample(self.features)

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers_0(x)
        elif self.resample == "up":
            x = self.upsamplers_0(x)
        return x


class _Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (before quant_conv)."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        widths = cfg.block_out_channels
        last = len(widths) - 1
        x = conv(widths[0], (3, 3), padding=1, name="conv_in")(x)
        for i, width in enumerate(widths):
            x = _Stage(width, cfg.layers_per_block, cfg.norm_num_groups, None if i == last else "down", name=f"down_blocks_{i}")(x)
        x = _MidBlock(widths[-1], cfg.norm_num_groups, name="mid_block")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, (3, 3), padding=1, name="conv_out")(x)


class _Decoder(nn.Module):
    """Latent (after post_quant_conv) -> image."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        widths = cfg.block_out_channels[::-1]
        last = len(widths) - 1
        x = conv(widths[0], (3, 3), padding=1, name="conv_in")(x)
        x = _MidBlock(widths[0], cfg.norm_num_groups, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = _Stage(width, cfg.layers_per_block + 1, cfg.norm_num_groups, None if i == last else "up", name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, NORM_EPS, name="conv_norm_out")(x))
        return conv(cfg.out_channels, (3, 3), padding=1, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` on channels-last images. Latents here are unscaled (what the
    network produces); `encode_video`/`decode_video` apply `config.scaling_factor`."""

    config: AutoencoderKLConfig

    def setup(self) -> None:
        cfg = self.config
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, (1, 1))
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, (1, 1))

    def encode(self, images: Array) -> tuple[Array, Array]:
        """Images (N, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (N, h, w, latent_channels)."""
        moments = self.encoder(images[:, None])
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments[:, 0], 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, latents: Array) -> Array:
        """Unscaled latents (N, h, w, latent_channels) -> images (N, H, W, out_channels), roughly in [-1, 1]."""
        x = latents[:, None]
        if self.config.use_post_quant_conv:
            x = self.post_quant_conv(x)
        return self.decoder(x)[:, 0]

    def __call__(self, images: Array) -> Array:
        """Reconstruction through the posterior mean (diffusers' forward with sample_posterior=False)."""
        return self.decode(self.encode(images)[0])


def _map_frames_in_chunks(fn: Callable[[Array], Any], frames: Array, chunk_size: int) -> Any:
    """Applies `fn` (a batch of images -> a pytree of per-image arrays) to the frames of
    (B, F, ...) in sequential chunks of `chunk_size` images, so only one chunk's activations
    are alive at a time. The frame count is padded to a whole number of chunks and the padding
    cut from the results; every image is processed independently, so padding cannot leak."""
    if frames.ndim != 5:
        raise ValueError(f"expected a video (B, F, H, W, C), got shape {frames.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, f = frames.shape[:2]
    images = frames.reshape(b * f, *frames.shape[2:])
    total = images.shape[0]
    padded = -(-total // chunk_size) * chunk_size
    images = jnp.pad(images, [(0, padded - total)] + [(0, 0)] * (images.ndim - 1))
    chunks = images.reshape(padded // chunk_size, chunk_size, *images.shape[1:])
    results = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda r: r.reshape(padded, *r.shape[2:])[:total].reshape(b, f, *r.shape[2:]), results)


def encode_video(
    module: AutoencoderKL,
    params: Any,
    frames: Array,
    rng: Optional[jax.Array] = None,
    chunk_size: int = 8,
) -> Array:
    """Video (B, F, H, W, C) in [-1, 1] -> scaled latents (B, F, h, w, latent_channels).

    Without `rng` the posterior mean is returned; with it, a posterior sample. The noise is
    drawn for the whole video at once, so a sample does not depend on `chunk_size`.
    """
    encode = lambda images: module.apply({"params": params}, images, method=AutoencoderKL.encode)
    mean, logvar = _map_frames_in_chunks(encode, frames, chunk_size)
    latents = mean
    if rng is not None:
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return latents * module.config.scaling_factor


def decode_video(module: AutoencoderKL, params: Any, latents: Array, chunk_size: int = 8) -> Array:
    """Scaled latents (B, F, h, w, latent_channels) -> video (B, F, H, W, out_channels)."""
    decode = lambda chunk: module.apply({"params": params}, chunk, method=AutoencoderKL.decode)
    return _map_frames_in_chunks(decode, latents / module.config.scaling_factor, chunk_size)
