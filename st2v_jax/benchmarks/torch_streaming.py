"""A PyTorch StreamingT2V noise predictor (UNet3D + CAM + APM) assembled from diffusers'
UNet3D blocks: the eager reference the forward benchmark times against `StreamingUNet3D`.

Its state dict has the official key layout (`base_model.*` the UNet3D with the CAM mergers
and the APM layers in each spatial attn2, `unet.*` the CAM encoder with
`controlnet_cond_embedding`, `resampler.context_embedding.*`), so the official fixtures
load into it strictly and `st2v_jax.convert.streaming.streaming_mapping` converts it. As in
the official code, the UNet repeats the 93-token context for every frame before its
blocks, so APM mixes tokens once per frame and layer.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet3DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from st2v_jax.models.streaming import StreamingConfig


class _APMAttnProcessor:
    """attn2 with APM: context = text + SiLU(alpha) * LayerNorm(Conv1d over tokens(all tokens))."""

    def __init__(self, text_tokens: int):
        self.text_tokens = text_tokens
        self.attention = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        mixed = attn.conv_ln(attn.conv(encoder_hidden_states))
        context = encoder_hidden_states[:, : self.text_tokens] + F.silu(attn.alpha) * mixed
        return self.attention(attn, hidden_states, context, **kwargs)


class _MergerTransformer(nn.Module):
    """Temporal cross-attention at every pixel from the base UNet's frames (group-normalised
    queries) to the CAM's frames, added back through proj_out."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.attention = Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=False, out_bias=True)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, base: torch.Tensor, cam: torch.Tensor, batch: int) -> torch.Tensor:
        """base (B*F, C, h, w), cam (B*Fc, C, h, w) -> (B*F, C, h, w)."""
        _, c, h, w = base.shape
        frames, cam_frames = base.shape[0] // batch, cam.shape[0] // batch
        video = base.reshape(batch, frames, c, h, w).permute(0, 2, 1, 3, 4)  # statistics over (C, F, h, w)
        queries = self.proj_in(self.norm(video).permute(0, 3, 4, 2, 1).reshape(batch * h * w, frames, c))
        keys = cam.reshape(batch, cam_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(batch * h * w, cam_frames, c)
        merged = self.proj_out(self.attention(queries, encoder_hidden_states=keys))
        return base + merged.reshape(batch, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(base.shape)


class _SkipMerger(nn.Module):
    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.temporal_transformer = _MergerTransformer(channels, head_dim, groups)


def _encode(
    unet: UNet3DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, stem_residual: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """diffusers' UNet3D forward up to the mid block -> (mid, skips, per-frame temb, per-frame context)."""
    batch, _, frames = sample.shape[:3]
    emb = unet.time_embedding(unet.time_proj(timestep.reshape(-1).expand(batch)).to(sample.dtype))
    emb = emb.repeat_interleave(frames, dim=0)
    context = context.repeat_interleave(frames, dim=0)
    h = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, *sample.shape[3:])
    h = unet.transformer_in(unet.conv_in(h), num_frames=frames, return_dict=False)[0]
    if stem_residual is not None:
        h = h + stem_residual
    skips = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, block_skips = block(hidden_states=h, temb=emb, encoder_hidden_states=context, num_frames=frames)
        else:
            h, block_skips = block(hidden_states=h, temb=emb, num_frames=frames)
        skips += block_skips
    return unet.mid_block(h, emb, encoder_hidden_states=context, num_frames=frames), skips, emb, context


def _decode(
    unet: UNet3DConditionModel, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor, batch: int
) -> torch.Tensor:
    """diffusers' UNet3D forward from the up blocks on -> (B, C, F, h, w)."""
    frames = h.shape[0] // batch
    for block in unet.up_blocks:
        block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        size = skips[-1].shape[2:] if skips else None
        kwargs = dict(encoder_hidden_states=context) if getattr(block, "has_cross_attention", False) else {}
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=block_skips, upsample_size=size, num_frames=frames, **kwargs)
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h.reshape(batch, frames, *h.shape[1:]).permute(0, 2, 1, 3, 4)


class TorchStreamingUNet3D(nn.Module):
    """The official VideoLDM's streaming noise prediction. Tensors are channels-first:
    latents (B, 4, F, h, w), text (B, text tokens, D), image_embeds (B, Fa, D),
    cond_frames (B, Fc, 3, H, W) in [-1, 1] -> eps (B, 4, F, h, w)."""

    def __init__(self, unet_config: Mapping[str, Any], config: StreamingConfig):
        super().__init__()
        self.config = config
        self.base_model = UNet3DConditionModel.from_config(dict(unet_config))
        self.unet = UNet3DConditionModel.from_config(dict(unet_config))
        del self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_act, self.unet.conv_out  # the CAM has no up path
        widths = config.unet.block_out_channels
        self.unet.controlnet_cond_embedding = ControlNetConditioningEmbedding(widths[0], 3, config.cam_conditioning_widths)
        skip_widths = [widths[0]] + [c for i, c in enumerate(widths) for _ in range(config.unet.layers_per_block + (i < len(widths) - 1))]
        merger = lambda c: _SkipMerger(c, config.merger_head_dim, config.merger_groups)
        self.base_model.cross_attention_merger_down_blocks = nn.ModuleList(merger(c) for c in skip_widths)
        self.base_model.cross_attention_merger_mid_block = merger(widths[-1])
        width = config.unet.cross_attention_dim
        for block in [*self.base_model.down_blocks, self.base_model.mid_block, *self.base_model.up_blocks]:
            for transformer in getattr(block, "attentions", []):
                attn = transformer.transformer_blocks[0].attn2
                attn.conv = nn.Conv1d(config.context_tokens, config.text_tokens, 3, padding=1)
                attn.conv_ln = nn.LayerNorm(width)
                attn.alpha = nn.Parameter(torch.zeros(()))
                attn.set_processor(_APMAttnProcessor(config.text_tokens))
        self.resampler = nn.Module()
        self.resampler.context_embedding = nn.Sequential(
            nn.Linear(config.image_embed_dim, config.resampler_hidden), nn.SiLU(), nn.Linear(config.resampler_hidden, config.image_tokens * width)
        )

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image_embeds: torch.Tensor, cond_frames: torch.Tensor
    ) -> torch.Tensor:
        batch, cam_frames = latents.shape[0], self.config.cam_frames
        tokens = self.resampler.context_embedding(image_embeds.mean(dim=1)).reshape(batch, self.config.image_tokens, -1)
        context = torch.cat([text, tokens], dim=1)
        e_cond = self.unet.controlnet_cond_embedding(cond_frames.flatten(0, 1))
        cam_mid, cam_skips, _, _ = _encode(self.unet, latents[:, :, :cam_frames], timestep, text, stem_residual=e_cond)
        mid, skips, emb, frame_context = _encode(self.base_model, latents, timestep, context)
        mergers = self.base_model.cross_attention_merger_down_blocks
        skips = [m.temporal_transformer(s, c, batch) for m, s, c in zip(mergers, skips, cam_skips)]
        mid = self.base_model.cross_attention_merger_mid_block.temporal_transformer(mid, cam_mid, batch)
        return _decode(self.base_model, mid, skips, emb, frame_context, batch)
