"""A loaded StreamingT2V model: every component's module and params, tokenizer, schedules.

Knows how to turn prompts into text embeddings, frames into APM anchor embeddings, and
latents into frames; the sampling loops live in `st2v_jax.generation.sampler`. After
`shard(mesh)` the params are laid out over the mesh by the logical axis rules of
`st2v_jax.parallel`, batches (guidance branches included) are split over its data axes,
and what the host reads back (frames, embeddings) is replicated, as every process of a
multi-host slice needs it whole.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from st2v_jax.convert.components import PretrainedModel
from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.models.apm import ImageTokenResampler
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.image_preprocess import clip_image_preprocess
from st2v_jax.models.vae import decode_video
from st2v_jax.parallel import DEFAULT_RULES, Placement, Rules, constrain_batch, replicated
from st2v_jax.pretrained import load_for_inference
from st2v_jax.tokenizer import load_tokenizer, tokenize

Array = jax.Array
REQUIRED_COMPONENTS = ("unet", "streaming", "vae", "text_encoder", "image_encoder")
class ModelLayoutError(ValueError):
    """A model folder that lacks what generation needs."""


@dataclasses.dataclass
class StreamingT2VPipeline:
    model: PretrainedModel
    tokenizer: Any
    scheduler_config: dict
    placement: Optional[Placement] = None
    # {component: NamedSharding tree} once sharded (None: everything on the default device).
    param_shardings: Optional[dict] = None

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COMPONENTS if c not in self.model.params]
        if missing:
            raise ModelLayoutError(
                f"the model lacks {missing}; generation needs {list(REQUIRED_COMPONENTS)}: convert the official "
                "checkpoint with --base-model-dir (python -m st2v_jax.convert official --checkpoint streaming_t2v.ckpt "
                "--base-model-dir text-to-video-ms-1.7b --out DIR)"
            )
        self.config = {name: self.model.config(name) for name in REQUIRED_COMPONENTS}
        self.modules = {name: self.model.module(name) for name in REQUIRED_COMPONENTS}
        self.params = self.model.params
        streaming = self.config["streaming"]
        vae = self.config["vae"]
        cam_downscale = 2 ** (len(streaming.cam_conditioning_widths) - 1)
        if cam_downscale != vae.downscale_factor:
            raise ModelLayoutError(
                f"the CAM frame encoder downsamples by {cam_downscale} but the VAE by {vae.downscale_factor}; "
                "their pixel-to-latent factors must agree"
            )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, checksums: bool = True, execution: ExecutionOptions = DEFAULT_EXECUTION
    ) -> "StreamingT2VPipeline":
        """A converted folder, a diffusers folder or an official checkpoint (see `load_pretrained`),
        run with `execution` (attention kernel, compute dtype; see `PretrainedModel.for_inference`)."""
        model = load_for_inference(path, checksums, execution)
        if model.tokenizer_dir() is None:
            raise ModelLayoutError(f"{path} has no tokenizer/ folder (vocab.json + merges.txt or tokenizer.json)")
        return cls(model, load_tokenizer(model.tokenizer_dir()), model.scheduler_config())

    # ------------------------------------------------------------------ placement

    def shard(self, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> "StreamingT2VPipeline":
        """Lays the params out over `mesh` (in place; returns self). Jitted encoders built
        before this keep working: jit follows where its inputs live."""
        self.placement = Placement(mesh, rules)
        self.model, self.param_shardings = self.placement.shard_model(self.model)
        self.params = self.model.params
        return self

    @property
    def mesh(self) -> Optional[Mesh]:
        return None if self.placement is None else self.placement.mesh

    @property
    def replicated(self) -> Optional[NamedSharding]:
        """Whole on every device: what the host reads back (None when not sharded)."""
        return replicated(self.placement)

    def constrain_batch(self, x: Array) -> Array:
        """Inside jit: splits x's leading (batch) axis over the mesh's batch axes."""
        return constrain_batch(x, self.placement)

    # ------------------------------------------------------------------ sizes and schedules

    @property
    def frames_per_chunk(self) -> int:
        return self.config["streaming"].num_frames

    @property
    def cam_frames(self) -> int:
        return self.config["streaming"].cam_frames

    @property
    def new_frames_per_chunk(self) -> int:
        return self.frames_per_chunk - self.cam_frames

    @property
    def vae_downscale(self) -> int:
        return self.config["vae"].downscale_factor

    def default_resolution(self) -> tuple[int, int]:
        size = (self.model.configs["unet"].get("sample_size") or 32) * self.vae_downscale
        return size, size

    def streaming_schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_diffusers(self.scheduler_config, "DDIMScheduler")

    def init_schedule(self) -> NoiseSchedule:
        # The release builds its first-chunk DPM-Solver++ from the same config; keys the
        # config lacks take DPMSolverMultistepScheduler's defaults (e.g. linspace spacing).
        return NoiseSchedule.from_diffusers(self.scheduler_config, "DPMSolverMultistepScheduler")

    def num_chunks(self, num_frames: int) -> int:
        """Streaming chunks after the first one for a video of `num_frames` frames."""
        return streaming_chunks(num_frames, self.frames_per_chunk, self.new_frames_per_chunk)

    # ------------------------------------------------------------------ encoders

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        return tokenize(self.tokenizer, prompts, self.config["text_encoder"].max_position_embeddings)

    @functools.cached_property
    def _encode_text(self):
        module = self.modules["text_encoder"]
        return jax.jit(lambda params, ids: module.apply({"params": params}, ids), out_shardings=self.replicated)

    def encode_text(self, input_ids: np.ndarray) -> Array:
        """(B, 77) token ids -> (B, 77, D) last hidden states (what ModelScope conditions on)."""
        return self._encode_text(self.params["text_encoder"], jnp.asarray(input_ids))

    @functools.cached_property
    def _embed_images(self):
        module, size = self.modules["image_encoder"], self.config["image_encoder"].image_size
        return jax.jit(
            lambda params, frames: module.apply({"params": params}, clip_image_preprocess(frames, size)),
            out_shardings=self.replicated,
        )

    def anchor_embedding(self, frames: Array) -> Array:
        """Anchor frames (B, Fa, H, W, 3) in [-1, 1] -> pooled CLIP embeddings (B, Fa, D)."""
        b, fa = frames.shape[:2]
        embeds = self._embed_images(self.params["image_encoder"], frames.reshape(b * fa, *frames.shape[2:]))
        return embeds.reshape(b, fa, -1)

    def null_anchor_embedding(self, batch: int, anchor_frames: int = 1) -> Array:
        """Embedding of a mid-grey frame (0 in [-1, 1]): the unconditional APM anchor."""
        size = self.config["image_encoder"].image_size
        return self.anchor_embedding(jnp.zeros((batch, anchor_frames, size, size, 3), jnp.float32))

    def anchor_tokens(self, image_embeds: Array) -> Array:
        """APM resampler: (B, Fa, D) anchor embeddings -> (B, image tokens, D)."""
        cfg = self.config["streaming"]
        resampler = ImageTokenResampler(
            cfg.resampler_hidden, cfg.image_tokens, cfg.unet.cross_attention_dim, execution=self.model.execution
        )
        # float32 like every other conditioning tensor the sampler carries, whatever the compute dtype.
        return resampler.apply({"params": self.params["streaming"]["resampler"]}, image_embeds).astype(jnp.float32)

    def decode(self, latents: Array, chunk_size: int = 8) -> Array:
        """Scaled latents (B, F, h, w, 4) -> frames (B, F, H, W, 3) in [-1, 1]."""
        frames = decode_video(self.modules["vae"], self.params["vae"], latents, chunk_size)
        return jnp.clip(frames, -1.0, 1.0)


def streaming_chunks(num_frames: int, frames_per_chunk: int, new_frames_per_chunk: int) -> int:
    """n for a video of frames_per_chunk + new_frames_per_chunk * n frames; a ValueError naming
    the nearest valid counts for any other length."""
    extra = num_frames - frames_per_chunk
    if extra < 0 or extra % new_frames_per_chunk:
        n = max(0, round(extra / new_frames_per_chunk))
        nearest = sorted({frames_per_chunk + new_frames_per_chunk * k for k in (max(0, n - 1), n, n + 1)})
        raise ValueError(
            f"{num_frames} frames cannot be made: videos have {frames_per_chunk} + {new_frames_per_chunk}*n frames; "
            f"nearest valid counts: {nearest}"
        )
    return extra // new_frames_per_chunk


def to_uint8(frames: Array) -> Array:
    """[-1, 1] -> uint8 [0, 255] (rounded)."""
    return jnp.round((jnp.clip(frames, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)

