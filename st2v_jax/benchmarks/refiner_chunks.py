"""Randomized-blending refiner: all chunks of a step in one batched denoiser call, one chunk
at a time inside the jitted loop (`lax.map`, the default `chunks_per_batch=1`), and a Python
loop that calls the jitted denoiser on one chunk at a time; a model folder's UNet3D denoises.

The Python loop repeats `refine_latents`' DDIM update from the refiner's public pieces and
draws the same random numbers, so all three give the same latents (the check column).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from st2v_jax.benchmarks.report import Row, median_seconds
from st2v_jax.diffusion.schedules import NoiseSchedule, prediction_to_x0_and_eps
from st2v_jax.diffusion.solvers import ddim_step, ddim_timesteps
from st2v_jax.generation.refiner import (
    Denoiser,
    RefinerConfig,
    chunk_starts,
    chunks_of,
    guided_unet_denoiser,
    refine_latents,
    refinement_timesteps,
    stitch_x0,
)
from st2v_jax.pretrained import load_pretrained

Array = jax.Array


@jax.jit
def _denoise_one_chunk(denoise: Denoiser, chunk: Array, t: Array) -> Array:
    return denoise(chunk, t)


@dataclasses.dataclass(frozen=True)
class _StitchAndStep:
    """Everything of a refiner step after the denoiser: x0 of each chunk, stitching, DDIM."""

    schedule: NoiseSchedule
    starts: tuple[int, ...]
    blending: str

    def __call__(self, outputs: Array, chunks: Array, sample: Array, t: Array, prev_t: Array, step_key: Array) -> Array:
        alpha_bar = self.schedule.alphas_cumprod()[t]
        chunk_x0s, _ = prediction_to_x0_and_eps(self.schedule.prediction_type, outputs, chunks, jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar))
        blend_key, _ = jax.random.split(step_key)  # refine_latents' split: (blending, solver noise)
        x0 = stitch_x0(chunk_x0s, self.starts, sample.shape[1], blend_key, self.blending)
        x0_schedule = dataclasses.replace(self.schedule, prediction_type="sample")
        return ddim_step(x0_schedule, x0, t, prev_t, sample)


def refine_in_python_loop(
    denoise: Denoiser, schedule: NoiseSchedule, config: RefinerConfig, latents: Array, key: Array, initial_noise: Array
) -> Array:
    """`refine_latents` with DDIM, eta 0, the denoiser called from Python once per chunk and step."""
    if config.solver != "ddim" or config.eta:
        raise ValueError(f"the Python-loop baseline runs deterministic DDIM only, got solver={config.solver!r}, eta={config.eta}")
    starts = chunk_starts(latents.shape[1], config.chunk, config.overlap)
    timesteps, previous = ddim_timesteps(schedule, config.num_inference_steps)
    first = len(timesteps) - len(refinement_timesteps(schedule, config))
    alpha_bar = schedule.alphas_cumprod()[timesteps[first]]
    sample = jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1.0 - alpha_bar) * initial_noise
    step_keys = jax.random.split(jax.random.split(key)[1], len(timesteps) - first)
    stitch_and_step = jax.jit(_StitchAndStep(schedule, starts, config.blending))
    for t, prev_t, step_key in zip(timesteps[first:], previous[first:], step_keys):
        chunks = chunks_of(sample, starts, config.chunk)
        outputs = jnp.stack([_denoise_one_chunk(denoise, chunk, jnp.asarray(t)) for chunk in chunks])
        sample = stitch_and_step(outputs, chunks, sample, jnp.asarray(t), jnp.asarray(prev_t), step_key)
    return sample


def refiner_rows(model_dir: str | os.PathLike, num_frames: int, steps: int, runs: int) -> list[Row]:
    """The three ways of one refinement of a random `num_frames` latent video with `steps`
    DDIM steps at strength 0.6 (release chunking: 24 frames, overlap 8)."""
    model = load_pretrained(model_dir, checksums=False)
    unet, params = model.module("unet"), model.params["unet"]
    schedule = NoiseSchedule.from_diffusers(model.scheduler_config(), "DDIMScheduler")
    size = model.configs["unet"].get("sample_size") or 32
    latent_key, noise_key, text_key, refine_key = jax.random.split(jax.random.key(0), 4)
    shape = (1, num_frames, size, size, unet.config.in_channels)
    latents, initial_noise = jax.random.normal(latent_key, shape), jax.random.normal(noise_key, shape)
    text = jax.random.normal(text_key, (1, 77, unet.config.cross_attention_dim))
    denoise = guided_unet_denoiser(unet, params, text, jnp.zeros_like(text), 7.5)
    config = RefinerConfig(num_inference_steps=steps, strength=0.6)
    num_chunks = len(chunk_starts(num_frames, config.chunk, config.overlap))
    runs_by_mode: dict[str, Callable[[], Array]] = {
        f"batched ({num_chunks} chunks per call)": lambda: refine_latents(
            denoise, schedule, dataclasses.replace(config, chunks_per_batch=num_chunks), latents, refine_key, initial_noise
        ),
        "lax.map, 1 chunk per call (default)": lambda: refine_latents(denoise, schedule, config, latents, refine_key, initial_noise),
        "Python loop over chunks": lambda: refine_in_python_loop(denoise, schedule, config, latents, refine_key, initial_noise),
    }
    outputs = {mode: np.asarray(run()) for mode, run in runs_by_mode.items()}  # also the warm-up (compilation)
    seconds = {mode: median_seconds(run, runs) for mode, run in runs_by_mode.items()}
    loop_mode = "Python loop over chunks"
    setting = f"{pathlib.Path(model_dir).name} UNet3D, {num_frames} latent frames {size}x{size}, {len(refinement_timesteps(schedule, config))} DDIM steps, guidance 2 branches"
    return [
        Row("refiner", f"refinement (s), {mode}", setting, f"{seconds[mode]:.2f}", f"{seconds[loop_mode]:.2f} Python loop",
            f"{seconds[mode] / seconds[loop_mode]:.2f}x", f"max abs diff vs loop {np.abs(outputs[mode] - outputs[loop_mode]).max():.1e}")
        for mode in runs_by_mode if mode != loop_mode
    ]
