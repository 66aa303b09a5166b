"""The VAE objective: reconstruct frames through a posterior sample (L1 + L2 on pixels) with
a small KL pull towards the unit Gaussian, as latent-diffusion autoencoders are trained
(without their adversarial and perceptual terms: enough for simple synthetic domains).

`foreground_weight` > 0 weights each pixel's error by 1 + foreground_weight x its distance
from the frame's median colour (max over channels, in [-1, 1] units). In sparse scenes (a
few shapes on black) the background otherwise outvotes the objects: with plain L1 + L2 the
shapes VAE reconstructed black long before it reconstructed colours."""
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
    foreground_weight: float = 0.0

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
        error = reconstruction - images
        # Broadcast over channels so that weights of 1 give exactly the plain means.
        weights = jnp.broadcast_to(pixel_weights(images, self.foreground_weight), images.shape)
        weighted_mean = lambda x: jnp.sum(weights * x) / jnp.sum(weights)
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        loss = weighted_mean(jnp.abs(error)) + weighted_mean(jnp.square(error)) + self.kl_weight * kl
        return loss, {"loss": loss, "l1": jnp.mean(jnp.abs(error)), "kl": kl}


def pixel_weights(images: Array, foreground_weight: float) -> Array:
    """(N, H, W, 1) reconstruction weights of images (N, H, W, C) in [-1, 1]: 1 + foreground_weight
    x the pixel's distance from its frame's median colour."""
    if foreground_weight == 0.0:  # plain L1 + L2: no median per image in every step
        return jnp.ones((*images.shape[:-1], 1), images.dtype)
    background = jnp.median(images, axis=(1, 2), keepdims=True)
    distance = jnp.max(jnp.abs(images - background), axis=-1, keepdims=True)
    return 1.0 + foreground_weight * distance


def latent_scaling_factor(module: AutoencoderKL, params: Any, frames: Array) -> float:
    """1 / std of the posterior means of `frames` (N, H, W, 3) in [-1, 1]: the factor that gives
    the diffusion model unit-variance latents (Stable Diffusion's 0.18215 was found this way)."""
    mean, _ = module.apply({"params": params}, frames, method=AutoencoderKL.encode)
    return float(1.0 / jnp.std(mean))
