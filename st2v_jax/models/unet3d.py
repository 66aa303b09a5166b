"""UNet3D of ModelScope text-to-video (diffusers `UNet3DConditionModel`), channels-last.

The forward pass is split in two public methods so that StreamingT2V can work between them
without forking the network:
  `encode`: stem (conv_in, transformer_in, optional additive stem residual), down blocks and
            mid block -> (mid feature, skip features, time embedding);
  `decode`: up blocks and output head from (possibly modified) mid and skip features.
A `context_mixer` factory, when given, is installed in every spatial cross-attention and
rewrites that layer's key/value context (this is how APM enters).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import (
    Array,
    ContextMixerFactory,
    GroupNorm,
    ResnetBlock,
    SpatialTransformer,
    TemporalConvBlock,
    TemporalTransformer,
    TimestepMLP,
    conv,
    timestep_embedding,
    upsample_nearest,
)

_DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
_UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")
# diffusers hard-codes 8 heads in the first temporal transformer.
TRANSFORMER_IN_HEADS = 8


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
    """The architecture fields of a diffusers `unet/config.json` for UNet3DConditionModel."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int = 64

    def __post_init__(self) -> None:
        problems = []
        if len(self.down_block_types) != len(self.block_out_channels) or len(self.up_block_types) != len(
            self.block_out_channels
        ):
            problems.append("down_block_types, up_block_types and block_out_channels must have the same length")
        problems += [f"unknown down block type {t!r} (known: {_DOWN_TYPES})" for t in self.down_block_types if t not in _DOWN_TYPES]
        problems += [f"unknown up block type {t!r} (known: {_UP_TYPES})" for t in self.up_block_types if t not in _UP_TYPES]
        problems += [
            f"block width {c} is not a multiple of norm_num_groups={self.norm_num_groups} and attention_head_dim={self.attention_head_dim}"
            for c in self.block_out_channels
            if c % self.norm_num_groups or c % self.attention_head_dim
        ]
        if problems:
            raise ValueError("invalid UNet3D config: " + "; ".join(problems))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNet3DConfig":
        """Reads a diffusers UNet3DConditionModel config dict (extra keys are ignored)."""
        if config.get("num_attention_heads") is not None:
            raise ValueError("num_attention_heads is not supported by UNet3DConditionModel; set attention_head_dim")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn {config['act_fn']!r} is not supported: UNet3D uses 'silu'")
        head_dim = config.get("attention_head_dim", cls.attention_head_dim)
        if isinstance(head_dim, (list, tuple)):
            if len(set(head_dim)) != 1:
                raise ValueError(f"per-block attention_head_dim {head_dim} is not supported; use one value")
            head_dim = head_dim[0]
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        values["attention_head_dim"] = int(head_dim)
        return cls(**values)

    def heads(self, channels: int) -> int:
        return channels // self.attention_head_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


class _Resample(nn.Module):
    """Downsample2D (3x3, stride 2, pad 1) or Upsample2D (nearest to `size`, then 3x3)."""

    features: int
    down: bool
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, size: Optional[tuple[int, int]] = None) -> Array:
        dtype = self.execution.dtype
        if self.down:
            return conv(self.features, (3, 3), strides=2, padding=1, dtype=dtype, name="conv")(x)
        return conv(self.features, (3, 3), padding=1, dtype=dtype, name="conv")(upsample_nearest(x, size))


class _Stage(nn.Module):
    """The layers of one resolution level: resnet + temporal conv [+ spatial and temporal
    transformers] per layer, then an optional down/up sampler. Up stages take one skip per
    layer (concatenated on channels before the resnet)."""

    config: UNet3DConfig
    features: int
    num_layers: int
    with_attention: bool
    resample: Optional[str]  # "down", "up" or None
    context_mixer: Optional[ContextMixerFactory] = None
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, c, ex = self.config, self.features, self.execution
        n = self.num_layers
        self.resnets = [ex.block(ResnetBlock)(c, cfg.norm_num_groups, cfg.norm_eps, execution=ex) for _ in range(n)]
        self.temp_convs = [ex.block(TemporalConvBlock)(cfg.norm_num_groups, execution=ex) for _ in range(n)]
        if self.with_attention:
            heads = cfg.heads(c)
            self.attentions = [
                ex.block(SpatialTransformer)(heads, cfg.attention_head_dim, cfg.norm_num_groups, self.context_mixer, execution=ex)
                for _ in range(n)
            ]
            self.temp_attentions = [
                ex.block(TemporalTransformer)(heads, cfg.attention_head_dim, cfg.norm_num_groups, execution=ex) for _ in range(n)
            ]
        if self.resample == "down":
            self.downsamplers_0 = _Resample(c, down=True, execution=ex)
        elif self.resample == "up":
            self.upsamplers_0 = _Resample(c, down=False, execution=ex)

    def _layer(self, i: int, x: Array, temb: Array, context: Array) -> Array:
        x = self.temp_convs[i](self.resnets[i](x, temb))
        if self.with_attention:
            x = self.temp_attentions[i](self.attentions[i](x, context))
        return x

    def down(self, x: Array, temb: Array, context: Array) -> tuple[Array, list[Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self._layer(i, x, temb, context)
            skips.append(x)
        if self.resample == "down":
            x = self.downsamplers_0(x)
            skips.append(x)
        return x, skips

    def up(self, x: Array, skips: Sequence[Array], temb: Array, context: Array, size: Optional[tuple[int, int]]) -> Array:
        for i in range(self.num_layers):
            x = self._layer(i, jnp.concatenate([x, skips[i]], axis=-1), temb, context)
        if self.resample == "up":
            x = self.upsamplers_0(x, size)
        return x


class _MidBlock(nn.Module):
    """UNetMidBlock3DCrossAttn: resnet, temporal conv, then [attention, temporal attention,
    resnet, temporal conv]."""

    config: UNet3DConfig
    features: int
    context_mixer: Optional[ContextMixerFactory] = None
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, temb: Array, context: Array) -> Array:
        cfg, c, ex = self.config, self.features, self.execution
        resnet = lambda name: ex.block(ResnetBlock)(c, cfg.norm_num_groups, cfg.norm_eps, execution=ex, name=name)
        temp_conv = lambda name: ex.block(TemporalConvBlock)(cfg.norm_num_groups, execution=ex, name=name)
        x = resnet("resnets_0")(x, temb)
        x = temp_conv("temp_convs_0")(x)
        x = ex.block(SpatialTransformer)(
            cfg.heads(c), cfg.attention_head_dim, cfg.norm_num_groups, self.context_mixer, execution=ex, name="attentions_0"
        )(x, context)
        x = ex.block(TemporalTransformer)(
            cfg.heads(c), cfg.attention_head_dim, cfg.norm_num_groups, execution=ex, name="temp_attentions_0"
        )(x)
        x = resnet("resnets_1")(x, temb)
        return temp_conv("temp_convs_1")(x)


class UNet3D(nn.Module):
    """Noise predictor. Call with latents (B, F, H, W, C), timesteps () or (B,), context (B, L, D).

    `include_up_blocks=False` builds only the stem, down and mid blocks (the CAM encoder).
    Whatever `execution.compute_dtype`, the noise prediction leaves in float32.
    """

    config: UNet3DConfig
    context_mixer: Optional[ContextMixerFactory] = None
    include_up_blocks: bool = True
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, ex = self.config, self.execution
        widths = cfg.block_out_channels
        last = len(widths) - 1
        self.conv_in = conv(widths[0], (3, 3), padding=1, dtype=ex.dtype)
        self.time_embedding = TimestepMLP(cfg.time_embed_dim, execution=ex)
        self.transformer_in = ex.block(TemporalTransformer)(
            TRANSFORMER_IN_HEADS, cfg.attention_head_dim, cfg.norm_num_groups, execution=ex
        )
        self.down_blocks = [
            _Stage(
                cfg,
                widths[i],
                cfg.layers_per_block,
                with_attention=kind == "CrossAttnDownBlock3D",
                resample=None if i == last else "down",
                context_mixer=self.context_mixer,
                execution=ex,
            )
            for i, kind in enumerate(cfg.down_block_types)
        ]
        self.mid_block = _MidBlock(cfg, widths[-1], self.context_mixer, execution=ex)
        if self.include_up_blocks:
            self.up_blocks = [
                _Stage(
                    cfg,
                    widths[last - i],
                    cfg.layers_per_block + 1,
                    with_attention=kind == "CrossAttnUpBlock3D",
                    resample=None if i == last else "up",
                    context_mixer=self.context_mixer,
                    execution=ex,
                )
                for i, kind in enumerate(cfg.up_block_types)
            ]
            self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps)
            self.conv_out = conv(cfg.out_channels, (3, 3), padding=1, dtype=ex.dtype)

    def encode(
        self, sample: Array, timesteps: Array, context: Array, stem_residual: Optional[Array] = None
    ) -> tuple[Array, list[Array], Array]:
        """Stem, down and mid blocks -> (mid feature, skip features in UNet order, time embedding).

        `stem_residual` (same shape as the conv_in output) is added after transformer_in,
        before the first skip is taken (the CAM frame-encoder input).
        """
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        temb = self.time_embedding(timestep_embedding(timesteps, self.config.block_out_channels[0]))
        h = self.transformer_in(self.conv_in(sample))
        if stem_residual is not None:
            h = h + stem_residual
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block.down(h, temb, context)
            skips += block_skips
        return self.mid_block(h, temb, context), skips, temb

    def decode(self, h: Array, skips: Sequence[Array], temb: Array, context: Array) -> Array:
        """Up blocks and output head; consumes the skips of `encode` (possibly modified)."""
        skips = list(skips)
        for i, block in enumerate(self.up_blocks):
            n = block.num_layers
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            size = skips[-1].shape[-3:-1] if skips else None
            h = block.up(h, block_skips, temb, context, size)
        # float32 out: guidance and the solvers work on differences of predictions.
        return self.conv_out(nn.silu(self.conv_norm_out(h))).astype(jnp.float32)

    def __call__(self, sample: Array, timesteps: Array, context: Array) -> Array:
        h, skips, temb = self.encode(sample, timesteps, context)
        return self.decode(h, skips, temb, context)

