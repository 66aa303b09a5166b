"""The CLIP objective for the text encoder and the APM image encoder: symmetric InfoNCE
between a frame of each clip and its caption. Clips with identical captions are all
positives of each other (a small domain repeats captions within a batch)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models.clip import CLIPTextTransformer
from st2v_jax.models.image_preprocess import clip_image_preprocess

Array = jax.Array


def _normalise(x: Array) -> Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _soft_cross_entropy(logits: Array, targets: Array) -> Array:
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


@dataclasses.dataclass(frozen=True)
class ContrastiveObjective:
    modules: Mapping[str, nn.Module]  # {"text_encoder": with projection, "image_encoder"}
    image_size: int
    clip_frames: int = 16
    temperature: float = 0.07

    def loss(self, params: Mapping[str, Any], batch: Mapping[str, Array], key: Array) -> tuple[Array, dict[str, Array]]:
        video, ids = batch["video"], batch["input_ids"]
        b = video.shape[0]
        frames = video[jnp.arange(b), jax.random.randint(key, (b,), 0, video.shape[1])]
        images = clip_image_preprocess(frames.astype(jnp.float32) / 127.5 - 1.0, self.image_size)
        image = _normalise(self.modules["image_encoder"].apply({"params": params["image_encoder"]}, images))
        text = _normalise(
            self.modules["text_encoder"].apply({"params": params["text_encoder"]}, ids, method=CLIPTextTransformer.text_embeds)
        )
        logits = image @ text.T / self.temperature
        same = jnp.all(ids[:, None] == ids[None], axis=-1).astype(jnp.float32)
        targets = same / jnp.sum(same, axis=-1, keepdims=True)
        loss = 0.5 * (_soft_cross_entropy(logits, targets) + _soft_cross_entropy(logits.T, targets))
        accuracy = jnp.mean(same[jnp.arange(b), jnp.argmax(logits, axis=-1)])
        return loss, {"loss": loss, "retrieval_accuracy": accuracy}
