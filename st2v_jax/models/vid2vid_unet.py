"""The video UNet of ModelScope's MS-Vid2Vid-XL (modelscope `Vid2VidSDUNet`), the official
StreamingT2V refiner, channels-last.

It is built from the same math as the ModelScope text-to-video UNet3D (`layers.py`), arranged
the way `Vid2VidSDUNet` arranges it:
  * every resnet carries its own temporal conv block (four GroupNorm-SiLU-Conv(3,1,1) stages);
  * a level has attention when its scale (1, 1/2, 1/4, ... from the top) is in `attn_scales`,
    and then each resnet is followed by a spatial transformer (self-attention, text
    cross-attention) and a temporal transformer (two self-attentions along frames);
  * the first temporal transformer, right after `conv_in`, has `num_heads` x `head_dim`
    channels inside (512 for 320 outside in the official model);
  * downsampling is a stride-2 3x3 conv padding rows by 2 and columns by 1; upsampling is
    nearest x2 followed by dropping the first and last row, then a 3x3 conv. Together they
    restrict the latent size (`check_latent_size`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import (
    Array,
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

# modelscope builds every GroupNorm of this UNet with 32 groups (hard-coded, not a config field).
NUM_GROUPS = 32
# Keys that change nothing at inference: Vid2VidSDUNet arguments for dropout, gradient
# checkpointing and training, arguments it accepts but never reads (y_dim, inpainting,
# use_scale_shift_norm: every ResBlock is built without it) or reads only on code paths the
# settings in _MUST_BE exclude (use_sim_mask), and entries of modelscope's `cfg.UNet` dict
# that are not Vid2VidSDUNet arguments at all.
_INFERENCE_IRRELEVANT = (
    "dropout", "use_checkpoint", "training", "inpainting", "use_sim_mask", "y_dim", "use_scale_shift_norm",
    "num_tokens", "default_fps", "input_dim",
)
_MUST_BE = {"temporal_attention": True, "temporal_attn_times": 1, "use_image_dataset": False, "use_fps_condition": False}


@dataclasses.dataclass(frozen=True)
class Vid2VidUNetConfig:
    """`Vid2VidSDUNet` constructor arguments; the defaults are MS-Vid2Vid-XL's (the values
    modelscope's VideoToVideo builds it with)."""

    in_dim: int = 4
    dim: int = 320
    context_dim: int = 1024
    out_dim: int = 4
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    head_dim: int = 64
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = (1.0, 0.5, 0.25)

    def __post_init__(self) -> None:
        problems = []
        for name in ("in_dim", "dim", "context_dim", "out_dim", "num_heads", "head_dim", "num_res_blocks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            problems.append(f"dim_mult must be a non-empty tuple of positive integers, got {self.dim_mult!r}")
        problems += [
            f"level width {w} must be a multiple of {NUM_GROUPS} (GroupNorm groups) and head_dim={self.head_dim}"
            for w in self.widths
            if w % NUM_GROUPS or w % self.head_dim
        ]
        if problems:
            raise ValueError("invalid MS-Vid2Vid UNet config: " + "; ".join(problems))

    @classmethod
    def from_modelscope(cls, config: Mapping[str, Any]) -> "Vid2VidUNetConfig":
        """Reads `Vid2VidSDUNet` keyword arguments (e.g. the `UNet` entry of modelscope's
        video_to_video config, whose `type` key is ignored). Options that would select code
        this implementation does not have are refused."""
        problems = [
            f"{key}={config[key]!r} is not supported (only {value!r})"
            for key, value in _MUST_BE.items()
            if key in config and config[key] != value
        ]
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | set(_INFERENCE_IRRELEVANT) | set(_MUST_BE) | {"type"}
        problems += [f"unknown key {key!r}" for key in config if key not in known]
        if problems:
            raise ValueError("unsupported MS-Vid2Vid UNet config: " + "; ".join(problems))
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        if "attn_scales" in values:
            values["attn_scales"] = tuple(float(s) for s in values["attn_scales"])
        return cls(**values)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.dim * m for m in self.dim_mult)

    @property
    def num_levels(self) -> int:
        return len(self.dim_mult)

    @property
    def embed_dim(self) -> int:
        return 4 * self.dim

    def has_attention(self, level: int) -> bool:
        """Whether resolution level `level` (0 = full resolution) has transformers; modelscope
        tests the level's scale 1 / 2**level for membership in attn_scales."""
        return 1.0 / 2**level in self.attn_scales


def check_latent_size(config: Vid2VidUNetConfig, height: int, width: int) -> None:
    """Raises ValueError unless a (height, width) latent survives the UNet's down- and
    upsampling: rows go h -> h // 2 + 1 (padding 2) and come back as 2h - 2, columns go
    w -> ceil(w / 2) and come back as 2w, so every level but the last needs even sizes."""
    downsamples = config.num_levels - 1
    factor = 2**downsamples
    h, w = height, width
    ok = True
    for _ in range(downsamples):
        ok &= h % 2 == 0 and w % 2 == 0
        h, w = (h + 1) // 2 + 1, -(-w // 2)
    if not ok:
        raise ValueError(
            f"MS-Vid2Vid UNet cannot take a {height}x{width} latent: with {downsamples} downsamplings the latent "
            f"height must be 2 more than a multiple of {factor} and the width a multiple of {factor} "
            f"(in pixels x8: the release's 1280x720 letterbox, latent 160 wide and 90 high, fits; 720x720 does not)"
        )


class _ResBlock(nn.Module):
    """modelscope `ResBlock` (use_scale_shift_norm=False): a resnet with the time embedding
    added after its first conv, then a `TemporalConvBlock_v2` along frames."""

    features: int
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        x = ResnetBlock(self.features, NUM_GROUPS, execution=self.execution, name="resnet")(x, temb)
        return TemporalConvBlock(NUM_GROUPS, execution=self.execution, name="temporal_conv")(x)


class _Level(nn.Module):
    """The resnets [+ spatial and temporal transformers] of one resolution level; down levels
    end with a downsampling conv, up levels take one skip per layer and end with upsampling."""

    config: Vid2VidUNetConfig
    features: int
    num_layers: int
    with_attention: bool
    resample: str | None  # "down", "up" or None
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, c, ex = self.config, self.features, self.execution
        n = self.num_layers
        self.resnets = [ex.block(_ResBlock)(c, execution=ex) for _ in range(n)]
        if self.with_attention:
            heads = c // cfg.head_dim
            self.attentions = [ex.block(SpatialTransformer)(heads, cfg.head_dim, NUM_GROUPS, execution=ex) for _ in range(n)]
            self.temp_attentions = [ex.block(TemporalTransformer)(heads, cfg.head_dim, NUM_GROUPS, execution=ex) for _ in range(n)]
        if self.resample == "down":
            # PyTorch padding=(2, 1): two zero rows above and below, one column left and right.
            self.downsample = conv(c, (3, 3), strides=2, padding=(2, 1), dtype=ex.dtype)
        elif self.resample == "up":
            self.upsample = conv(c, (3, 3), padding=1, dtype=ex.dtype)

    def _layer(self, i: int, x: Array, temb: Array, context: Array) -> Array:
        x = self.resnets[i](x, temb)
        if self.with_attention:
            x = self.temp_attentions[i](self.attentions[i](x, context))
        return x

    def down(self, x: Array, temb: Array, context: Array) -> tuple[Array, list[Array]]:
        skips = []
        for i in range(self.num_layers):
            x = self._layer(i, x, temb, context)
            skips.append(x)
        if self.resample == "down":
            x = self.downsample(x)
            skips.append(x)
        return x, skips

    def up(self, x: Array, skips: Sequence[Array], temb: Array, context: Array) -> Array:
        for i in range(self.num_layers):
            x = self._layer(i, jnp.concatenate([x, skips[i]], axis=-1), temb, context)
        if self.resample == "up":
            h, w = x.shape[-3:-1]
            # modelscope: nearest x2, then x[..., 1:-1, :] (drops the first and last row).
            x = self.upsample(upsample_nearest(x, (2 * h, 2 * w))[..., 1:-1, :, :])
        return x


class Vid2VidUNet(nn.Module):
    """v-predictor. Call with latents (B, F, H, W, in_dim), timesteps () or (B,) and text
    context (B, L, D); returns (B, F, H, W, out_dim) in float32. See `check_latent_size` for H and W."""

    config: Vid2VidUNetConfig
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, ex = self.config, self.execution
        widths, last = cfg.widths, cfg.num_levels - 1
        self.time_embedding = TimestepMLP(cfg.embed_dim, execution=ex)
        self.conv_in = conv(cfg.dim, (3, 3), padding=1, dtype=ex.dtype)
        self.transformer_in = ex.block(TemporalTransformer)(cfg.num_heads, cfg.head_dim, NUM_GROUPS, execution=ex)
        self.down_blocks = [
            _Level(cfg, widths[i], cfg.num_res_blocks, cfg.has_attention(i), None if i == last else "down", execution=ex)
            for i in range(cfg.num_levels)
        ]
        c = widths[-1]
        self.mid_resnets = [ex.block(_ResBlock)(c, execution=ex) for _ in range(2)]
        self.mid_attention = ex.block(SpatialTransformer)(c // cfg.head_dim, cfg.head_dim, NUM_GROUPS, execution=ex)
        self.mid_temp_attention = ex.block(TemporalTransformer)(c // cfg.head_dim, cfg.head_dim, NUM_GROUPS, execution=ex)
        self.up_blocks = [
            _Level(cfg, widths[last - i], cfg.num_res_blocks + 1, cfg.has_attention(last - i), None if i == last else "up", execution=ex)
            for i in range(cfg.num_levels)
        ]
        self.conv_norm_out = GroupNorm(NUM_GROUPS)
        self.conv_out = conv(cfg.out_dim, (3, 3), padding=1, dtype=ex.dtype)

    def __call__(self, sample: Array, timesteps: Array, context: Array) -> Array:
        if sample.ndim != 5 or sample.shape[-1] != self.config.in_dim:
            raise ValueError(f"expected latents (B, F, H, W, {self.config.in_dim}), got shape {sample.shape}")
        check_latent_size(self.config, *sample.shape[2:4])
        batch = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        temb = self.time_embedding(timestep_embedding(timesteps, self.config.dim))

        h = self.transformer_in(self.conv_in(sample))
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block.down(h, temb, context)
            skips += block_skips
        h = self.mid_resnets[0](h, temb)
        h = self.mid_temp_attention(self.mid_attention(h, context))
        h = self.mid_resnets[1](h, temb)
        for block in self.up_blocks:
            n = block.num_layers
            block_skips, skips = skips[-n:][::-1], skips[:-n]
            h = block.up(h, block_skips, temb, context)
        # float32 out: guidance and the solvers work on differences of predictions.
        return self.conv_out(nn.silu(self.conv_norm_out(h))).astype(jnp.float32)

