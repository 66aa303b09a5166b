"""CAM, the conditional attention module (short-term memory).

* `FrameEncoder` (E_cond): conditioning frames in pixel space -> latent-resolution features.
* `CAMEncoder`: a ControlNet-style copy of the UNet3D stem, down and mid blocks that runs
  on the first conditioning-aligned frames of the noisy latent, with E_cond added after
  transformer_in; returns its skip features and mid feature.
* `SkipMerger`: per-pixel temporal cross-attention from the base UNet's frames (queries,
  group-normalised) to the CAM's frames (keys/values), added back through a zero-initialised
  projection, so a fresh merger is the identity.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import Array, Attention, GroupNorm, conv, dense
from st2v_jax.models.unet3d import UNet3D


class FrameEncoder(nn.Module):
    """conv3x3 + SiLU, then per width step [conv3x3 + SiLU, stride-2 conv3x3 + SiLU], then a
    zero-initialised conv3x3 to `out_features`. Pixels are downsampled 2**(len(widths)-1)."""

    widths: Sequence[int] = (32, 96, 256, 512)
    out_features: int = 320
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, frames: Array) -> Array:
        dtype = self.execution.dtype
        h = nn.silu(conv(self.widths[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(frames))
        for i, (width, next_width) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            h = nn.silu(conv(width, (3, 3), padding=1, dtype=dtype, name=f"blocks_{2 * i}")(h))
            h = nn.silu(conv(next_width, (3, 3), strides=2, padding=1, dtype=dtype, name=f"blocks_{2 * i + 1}")(h))
        return conv(self.out_features, (3, 3), padding=1, zero_init=True, dtype=dtype, name="conv_out")(h)


class CAMEncoder(UNet3D):
    """The UNet3D down path (own weights) plus `FrameEncoder`; no up blocks, no APM."""

    include_up_blocks: bool = False
    conditioning_widths: Sequence[int] = (32, 96, 256, 512)

    def setup(self) -> None:
        super().setup()
        self.cond_embedding = FrameEncoder(tuple(self.conditioning_widths), self.config.block_out_channels[0], execution=self.execution)

    def __call__(
        self, latents: Array, timesteps: Array, text_context: Array, cond_frames: Array
    ) -> tuple[list[Array], Array]:
        """latents (B, Fc, h, w, C) noisy, cond_frames (B, Fc, H, W, 3) in [-1, 1] ->
        (skip features, mid feature), each (B, Fc, h_l, w_l, C_l)."""
        mid, skips, _ = self.encode(latents, timesteps, text_context, stem_residual=self.cond_embedding(cond_frames))
        return skips, mid


class SkipMerger(nn.Module):
    """Merges a CAM feature (B, Fc, h, w, C) into a base UNet feature (B, F, h, w, C)."""

    head_dim: int = 64
    num_groups: int = 32
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, base: Array, cam: Array) -> Array:
        b, f, hh, ww, c = base.shape
        ex = self.execution
        per_pixel = lambda x: jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * hh * ww, x.shape[1], c)
        normed = GroupNorm(self.num_groups, 1e-6, across_frames=True, name="norm")(base)
        queries = dense(c, dtype=ex.dtype, name="proj_in")(per_pixel(normed))
        merged = Attention(c // self.head_dim, self.head_dim, c, execution=ex, name="attention")(queries, per_pixel(cam))
        merged = dense(c, zero_init=True, dtype=ex.dtype, name="proj_out")(merged)
        return base + jnp.transpose(merged.reshape(b, hh, ww, f, c), (0, 3, 1, 2, 4))
