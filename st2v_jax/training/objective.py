"""The denoising objective: epsilon-MSE (or v-MSE, as the schedule predicts) on chunk clips.

Stage "base" trains the text-to-video UNet3D (the first-chunk model) on `F`-frame clips.
Stage "streaming" trains the StreamingT2V model on `2F`-frame clips (REFERENCE.md section 6):
    anchor        one frame drawn from frames [0, F)           -> image encoder -> APM
    noisy chunk   frames [F, 2F)                                -> VAE latents + noise
    CAM frames    clean pixel frames [F, F + cam_frames): the conditioning frames are the
                  first `cam_frames` frames of the noisy chunk, as at sampling time, where
                  they are the last frames of the previous chunk.
Guidance is learnt by dropping conditions: text and anchor together (`uncond_probability`,
the unconditional branch of sampling), or either alone. A dropped text is the empty
prompt's tokens; a dropped anchor is a mid-grey frame, exactly what sampling feeds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.convert.components import PretrainedModel
from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.models.image_preprocess import clip_image_preprocess
from st2v_jax.models.vae import encode_video

Array = jax.Array
STAGES = ("base", "streaming")


@dataclasses.dataclass(frozen=True)
class ConditionDropout:
    uncond_probability: float = 0.1  # text and anchor dropped together
    text_only: float = 0.05
    anchor_only: float = 0.05

    def sample(self, key: Array, batch: int) -> tuple[Array, Array]:
        """Boolean (batch,) masks: drop the text, drop the anchor."""
        u = jax.random.uniform(key, (batch,))
        both = u < self.uncond_probability
        text = u < self.uncond_probability + self.text_only
        anchor = both | ((u >= self.uncond_probability + self.text_only) & (u < self.uncond_probability + self.text_only + self.anchor_only))
        return text, anchor


@dataclasses.dataclass(frozen=True)
class DenoisingObjective:
    stage: str
    modules: Mapping[str, nn.Module]
    schedule: NoiseSchedule
    null_input_ids: Array  # (L,) the empty prompt's tokens
    frames: int  # frames per chunk F
    cam_frames: int
    image_size: int
    dropout: ConditionDropout = ConditionDropout()

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}; expected one of {STAGES}")

    @classmethod
    def from_model(
        cls,
        model: PretrainedModel,
        stage: str,
        schedule: NoiseSchedule,
        null_input_ids: Any,
        dropout: ConditionDropout,
        base_frames: Optional[int] = None,
    ) -> "DenoisingObjective":
        """`base_frames` (stage "base" only): frames per training clip instead of the chunk
        length; 1 trains the UNet3D on single frames, i.e. as a text-to-image model."""
        components = ("unet", "vae", "text_encoder") if stage == "base" else ("streaming", "vae", "text_encoder", "image_encoder")
        missing = [c for c in components if c not in model.params]
        if missing:
            raise ValueError(f"stage {stage!r} needs the components {list(components)}; the model lacks {missing}")
        streaming = model.config("streaming") if "streaming" in model.params else None
        frames = streaming.num_frames if streaming else 16
        if base_frames is not None:
            if stage != "base" or base_frames < 1:
                raise ValueError(f"base_frames={base_frames}: only stage 'base' takes it, and it must be at least 1")
            frames = base_frames
        return cls(
            stage=stage,
            modules={c: model.module(c) for c in components},
            schedule=schedule,
            null_input_ids=jnp.asarray(null_input_ids, jnp.int32),
            frames=frames,
            cam_frames=streaming.cam_frames if streaming else 0,
            image_size=model.config("image_encoder").image_size if "image_encoder" in components else 0,
            dropout=dropout,
        )

    @property
    def clip_frames(self) -> int:
        """Frames of a training clip."""
        return self.frames if self.stage == "base" else 2 * self.frames

    def _apply(self, name: str, params: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        return self.modules[name].apply({"params": params[name]}, *args, **kwargs)

    def _text(self, params: Mapping[str, Any], input_ids: Array, drop: Array) -> Array:
        ids = jnp.where(drop[:, None], self.null_input_ids[None], input_ids)
        return self._apply("text_encoder", params, ids)

    def _anchor_embedding(self, params: Mapping[str, Any], pixels: Array, drop: Array, key: Array) -> Array:
        b = pixels.shape[0]
        index = jax.random.randint(key, (b,), 0, self.frames)
        anchor = jnp.where(drop[:, None, None, None], 0.0, pixels[jnp.arange(b), index])
        embeds = self._apply("image_encoder", params, clip_image_preprocess(anchor, self.image_size))
        return embeds[:, None]

    def loss(self, params: Mapping[str, Any], batch: Mapping[str, Array], key: Array) -> tuple[Array, dict[str, Array]]:
        """Mean squared error of the prediction, and metrics. batch: video uint8 (B, clip_frames,
        H, W, 3), input_ids int32 (B, L). `params` holds every component the stage uses."""
        video = batch["video"]
        if video.shape[1] != self.clip_frames:
            raise ValueError(f"stage {self.stage!r} trains on {self.clip_frames}-frame clips, got {video.shape[1]}")
        pixels = video.astype(jnp.float32) / 127.5 - 1.0
        b = pixels.shape[0]
        k_latent, k_t, k_noise, k_drop, k_anchor = jax.random.split(key, 5)
        chunk = pixels[:, -self.frames :]
        latents = encode_video(self.modules["vae"], params["vae"], chunk, k_latent)
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape)
        alpha_bar = self.schedule.alphas_cumprod()[t][:, None, None, None, None]
        noisy = jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1.0 - alpha_bar) * noise
        drop_text, drop_anchor = self.dropout.sample(k_drop, b)
        if self.stage == "base":
            drop_text = drop_text & drop_anchor  # no anchor here: only the unconditional drop applies
            prediction = self._apply("unet", params, noisy, t, self._text(params, batch["input_ids"], drop_text))
        else:
            text = self._text(params, batch["input_ids"], drop_text)
            image = self._anchor_embedding(params, pixels, drop_anchor, k_anchor)
            cond_frames = chunk[:, : self.cam_frames]
            prediction = self._apply("streaming", params, noisy, t, text, image, cond_frames, method="predict")
        if self.schedule.prediction_type == "epsilon":
            target = noise
        elif self.schedule.prediction_type == "v_prediction":
            target = jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * latents
        else:
            target = latents
        loss = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))
        return loss, {"loss": loss}
