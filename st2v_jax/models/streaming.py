"""The StreamingT2V noise predictor: base UNet3D + CAM (short-term) + APM (long-term).

Per call, for one chunk of `num_frames` latent frames:
  context  = text tokens ++ resampler(anchor image embedding)     (B, text+image tokens, D)
  CAM      = CAMEncoder(first `cam_frames` noisy frames, text tokens, conditioning frames)
  base     = UNet3D.encode(latents, context) -> skips, mid (APM mixes the context in attn2)
  skips'   = SkipMerger(skip, CAM skip) for each skip; mid' likewise
  eps      = UNet3D.decode(mid', skips')
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.apm import APMContextMixer, ImageTokenResampler
from st2v_jax.models.cam import CAMEncoder, SkipMerger
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import Array
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """Architecture of the streaming model; defaults are the official full-size values."""

    unet: UNet3DConfig = UNet3DConfig()
    num_frames: int = 16
    cam_frames: int = 8
    cam_conditioning_widths: tuple[int, ...] = (32, 96, 256, 512)
    text_tokens: int = 77
    image_tokens: int = 16
    resampler_hidden: int = 1280
    image_embed_dim: int = 1024
    merger_head_dim: int = 64
    merger_groups: int = 32

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.cam_frames <= self.num_frames:
            problems.append(f"cam_frames={self.cam_frames} must be in 1..num_frames={self.num_frames}")
        widths = set(self.unet.block_out_channels)
        if any(c % self.merger_head_dim or c % self.merger_groups for c in widths):
            problems.append(
                f"every block width {sorted(widths)} must be a multiple of the merger head width "
                f"{self.merger_head_dim} and of {self.merger_groups} groups"
            )
        if self.unet.layers_per_block != 2:
            problems.append("the official CAM merger layout (3 per down block) requires layers_per_block=2")
        if self.image_embed_dim != self.unet.cross_attention_dim:
            problems.append(
                f"image tokens ({self.image_embed_dim} wide) must match cross_attention_dim={self.unet.cross_attention_dim}"
            )
        if problems:
            raise ValueError("invalid StreamingConfig: " + "; ".join(problems))

    @property
    def context_tokens(self) -> int:
        return self.text_tokens + self.image_tokens

    @property
    def num_skips(self) -> int:
        n = len(self.unet.block_out_channels)
        return 1 + n * self.unet.layers_per_block + (n - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "StreamingConfig":
        """Reads `{"unet": <diffusers UNet3D config>, "streaming": {...}}` (the official
        fixtures' config.json format; missing streaming entries keep the official values)."""
        if "unet" not in config:
            raise ValueError("streaming config needs a 'unet' entry (a diffusers UNet3DConditionModel config)")
        s = config.get("streaming", {})
        cam, resampler, apm, merger = (s.get(k, {}) for k in ("cam", "resampler", "apm", "merger"))
        defaults = cls()
        return cls(
            unet=UNet3DConfig.from_diffusers(config["unet"]),
            num_frames=s.get("num_frames", defaults.num_frames),
            cam_frames=s.get("num_control_input_frames", defaults.cam_frames),
            cam_conditioning_widths=tuple(cam.get("conditioning_embedding_out_channels", defaults.cam_conditioning_widths)),
            text_tokens=apm.get("text_tokens", defaults.text_tokens),
            image_tokens=apm.get("image_tokens", resampler.get("expansion_factor", defaults.image_tokens)),
            resampler_hidden=resampler.get("inner_dim", defaults.resampler_hidden),
            image_embed_dim=resampler.get("input_dim", defaults.image_embed_dim),
            merger_head_dim=merger.get("head_dim", defaults.merger_head_dim),
            merger_groups=merger.get("groups", defaults.merger_groups),
        )


class StreamingUNet3D(nn.Module):
    """Noise prediction of one streaming chunk. Tensors are channels-last:
    latents (B, F, h, w, 4), context (B, text+image tokens, D), cond_frames (B, Fc, H, W, 3)."""

    config: StreamingConfig
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, ex = self.config, self.execution
        mixer = functools.partial(APMContextMixer, text_tokens=cfg.text_tokens, execution=ex)
        self.base = UNet3D(cfg.unet, context_mixer=mixer, execution=ex)
        self.cam = CAMEncoder(cfg.unet, conditioning_widths=cfg.cam_conditioning_widths, execution=ex)
        self.skip_mergers = [SkipMerger(cfg.merger_head_dim, cfg.merger_groups, execution=ex) for _ in range(cfg.num_skips)]
        self.mid_merger = SkipMerger(cfg.merger_head_dim, cfg.merger_groups, execution=ex)
        self.resampler = ImageTokenResampler(cfg.resampler_hidden, cfg.image_tokens, cfg.unet.cross_attention_dim, execution=ex)

    def build_context(self, text_embeds: Array, image_embeds: Array) -> Array:
        """text_embeds (B, text_tokens, D), anchor image_embeds (B, anchor_frames, D) -> context."""
        return jnp.concatenate([text_embeds, self.resampler(image_embeds)], axis=1)

    def cam_features(self, latents: Array, timesteps: Array, context: Array, cond_frames: Array) -> tuple[list[Array], Array]:
        """CAM skips and mid from the first `cam_frames` noisy frames and the text tokens."""
        cfg = self.config
        return self.cam(latents[:, : cfg.cam_frames], timesteps, context[:, : cfg.text_tokens], cond_frames)

    def __call__(
        self, latents: Array, timesteps: Array, context: Array, cond_frames: Optional[Array] = None
    ) -> Array:
        """eps for the chunk. `cond_frames=None` skips CAM entirely (the official
        `skip_controlnet_branch` path), leaving base UNet3D + APM."""
        mid, skips, temb = self.base.encode(latents, timesteps, context)
        if cond_frames is not None:
            cam_skips, cam_mid = self.cam_features(latents, timesteps, context, cond_frames)
            skips = [merge(s, c) for merge, s, c in zip(self.skip_mergers, skips, cam_skips)]
            mid = self.mid_merger(mid, cam_mid)
        return self.base.decode(mid, skips, temb, context)

    def predict(
        self, latents: Array, timesteps: Array, text_embeds: Array, image_embeds: Array, cond_frames: Optional[Array]
    ) -> Array:
        """eps from text embeddings and the anchor's image embedding (builds the context)."""
        return self(latents, timesteps, self.build_context(text_embeds, image_embeds), cond_frames)

