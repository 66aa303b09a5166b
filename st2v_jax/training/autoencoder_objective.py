"""The VAE objective: reconstruct frames through a posterior sample (L1 + L2 on pixels) with
a small KL pull towards the unit Gaussian, as latent-diffusion autoencoders are trained
(without their adversarial and perceptual terms: enough for simple synthetic domains)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models.vae import AutoencoderKL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AutoencoderObjective:
    modules: Mapping[str, nn.Module]  # {"vae": AutoencoderKL}
    clip_frames: int = 16
    frames_per_clip: int = 4  # frames drawn from each clip per step
    kl_weight: float = 1e-6

    def loss(self, params: Mapping[str, Any], batch: Mapping[str, Array], key: Array) -> tuple[Array, dict[str, Array]]:
        video = batch["video"]
        b, f = video.shape[:2]
        k_frames, k_posterior = jax.random.split(key)
        index = jax.random.randint(k_frames, (b, self.frames_per_clip), 0, f)
        images = video[jnp.arange(b)[:, None], index].reshape(b * self.frames_per_clip, *video.shape[2:])
        images = images.astype(jnp.float32) / 127.5 - 1.0
        vae = self.modules["vae"]
        mean, logvar = vae.apply({"params": params["vae"]}, images, method=AutoencoderKL.encode)
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_posterior, mean.shape)
        reconstruction = vae.apply({"params": params["vae"]}, latents, method=AutoencoderKL.decode)
        l1 = jnp.mean(jnp.abs(reconstruction - images))
        l2 = jnp.mean(jnp.square(reconstruction - images))
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        loss = l1 + l2 + self.kl_weight * kl
        return loss, {"loss": loss, "l1": l1, "kl": kl}


def latent_scaling_factor(module: AutoencoderKL, params: Any, frames: Array) -> float:
    """1 / std of the posterior means of `frames` (N, H, W, 3) in [-1, 1]: the factor that gives
    the diffusion model unit-variance latents (Stable Diffusion's 0.18215 was found this way)."""
    mean, _ = module.apply({"params": params}, frames, method=AutoencoderKL.encode)
    return float(1.0 / jnp.std(mean))
