"""The StreamingT2V video refiner: img2img over a long video in overlapping chunks, joined by
randomized blending, generic over the denoiser and jitted as one loop.

Method (the release's enhancement stage, which runs MS-Vid2Vid-XL this way):

1. The low-resolution video is resized to the refiner resolution in pixel space
   (`upsample_video`) and VAE-encoded frame by frame (posterior mean).
2. The whole latent video is noised ONCE, with one noise tensor shared by all chunks, to the
   level of the first refinement timestep (see "Where refinement starts").
3. The video is covered by chunks of `chunk` frames that overlap by `overlap` (`chunk_starts`).
   At every solver step each chunk is denoised on its own and its x0 prediction taken; the
   predictions are stitched into one full-length x0 (`stitch_x0`), and that x0 drives one step
   of the solver on the full-length sample.

Stitching, chunk k overlapping the video stitched so far by O_k frames (O_k = `overlap`, except
for a last chunk moved back to end on the last frame, whose overlap is larger):
  * chunk 0 writes all its frames;
  * "release": chunk k draws a split r uniformly from {0, ..., O_k - 1}, fresh per chunk and
    per step, and writes its frames from start_k + r on; overlap frames before the split keep
    what earlier chunks wrote;
  * "paper": frame j (0-based) of chunk k's overlap is written by chunk k with probability
    (j + 1) / (O_k + 1), independently per frame, i.e. it keeps the left (earlier) value with
    probability 1 - (j + 1) / (O_k + 1); frames after the overlap are always written.

Solver coupling: the stitched x0 is handed to the unchanged DDIM / DPM-Solver++ step functions
as the model output of a "sample"-predicting schedule (same betas). Those steps reconstruct
x0 from a "sample" output as the output itself and derive eps from x0 and the current
full-length sample, which is exactly the update a x0-prediction of the stitched video implies;
no round trip through eps or v is needed, whatever the denoiser predicts.

Where refinement starts: as diffusers' img2img with `strength`,
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
and the solver runs the last init_steps of its num_inference_steps-step schedule. With
`start_timestep` set instead, it runs from the first scheduled timestep <= start_timestep
(the release noises to timestep 599 of 1000, about strength 0.6). Either way the latents are
noised to the level of the first step run.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from st2v_jax.diffusion.schedules import NoiseSchedule, prediction_to_x0_and_eps
from st2v_jax.diffusion.solvers import (
    ddim_step,
    ddim_timesteps,
    dpm_solver_init,
    dpm_solver_initial_state,
    dpm_solver_timesteps,
    dpm_step,
)
from st2v_jax.models.unet3d import UNet3D
from st2v_jax.models.vae import AutoencoderKL, decode_video, encode_video
from st2v_jax.parallel import Placement, constrain_batch

Array = jax.Array
# (latent chunks (N, chunk, h, w, C), timestep ()) -> model output of the schedule's prediction
# type, already guided. N is (chunks in a group) x (video batch), chunk-major.
Denoiser = Callable[[Array, Array], Array]

SOLVERS = ("ddim", "dpm++2m", "dpm++2m-sde")
BLENDINGS = ("release", "paper")
_DPM_ALGORITHMS = {"dpm++2m": "dpmsolver++", "dpm++2m-sde": "sde-dpmsolver++"}


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """Settings of the refiner. Defaults are the release's chunking (24 frames, overlap 8) at
    MS-Vid2Vid-XL's 1280x720 with strength 0.6.

    Hashable: it is a static argument of the jitted loop.
    """

    chunk: int = 24
    overlap: int = 8
    strength: float = 0.6
    # When set, overrides `strength`: start at the first scheduled timestep <= start_timestep.
    start_timestep: Optional[int] = None
    num_inference_steps: int = 50
    solver: str = "ddim"
    eta: float = 0.0  # DDIM only
    # Chunks denoised together in one batched call; bounds peak memory to that many chunks.
    chunks_per_batch: int = 1
    blending: str = "release"
    height: int = 720
    width: int = 1280

    def __post_init__(self) -> None:
        problems = []
        if self.chunk < 1:
            problems.append(f"chunk must be >= 1, got {self.chunk}")
        if self.overlap < 0:
            problems.append(f"overlap must be >= 0, got {self.overlap}")
        elif self.overlap >= self.chunk:
            problems.append(
                f"refiner overlap must be smaller than the chunk (overlap={self.overlap}, chunk={self.chunk})"
            )
        if not 0.0 < self.strength <= 1.0:
            problems.append(f"strength must be in (0, 1], got {self.strength}")
        if self.start_timestep is not None and self.start_timestep < 0:
            problems.append(f"start_timestep must be >= 0, got {self.start_timestep}")
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.solver not in SOLVERS:
            problems.append(f"solver={self.solver!r} is not supported; expected one of {SOLVERS}")
        if self.eta < 0:
            problems.append(f"eta must be >= 0, got {self.eta}")
        elif self.eta and self.solver != "ddim":
            problems.append(f"eta applies to the DDIM solver only, got eta={self.eta} with solver={self.solver!r}")
        if self.chunks_per_batch < 1:
            problems.append(f"chunks_per_batch must be >= 1, got {self.chunks_per_batch}")
        if self.blending not in BLENDINGS:
            problems.append(f"blending={self.blending!r} is not supported; expected one of {BLENDINGS}")
        if self.height < 1 or self.width < 1:
            problems.append(f"height and width must be positive, got {self.height}x{self.width}")
        if problems:
            raise ValueError("invalid refiner config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Chunking and stitching


def chunk_starts(num_frames: int, chunk: int, overlap: int) -> tuple[int, ...]:
    """First frame of every chunk: 0, chunk - overlap, 2 (chunk - overlap), ... while a chunk
    fits; if that leaves frames uncovered, one more chunk ending on the last frame (so it
    overlaps its predecessor by more than `overlap`)."""
    if not 0 <= overlap < chunk:
        raise ValueError(f"refiner overlap must be smaller than the chunk (overlap={overlap}, chunk={chunk})")
    if num_frames < chunk:
        raise ValueError(f"the video has {num_frames} frames, fewer than the refiner chunk of {chunk}")
    starts = list(range(0, num_frames - chunk + 1, chunk - overlap))
    if starts[-1] + chunk < num_frames:
        starts.append(num_frames - chunk)
    return tuple(starts)


def _chunk_overlaps(starts: Sequence[int], chunk: int, num_frames: int) -> np.ndarray:
    """Frames each chunk shares with the ones before it (0 for the first); checks that the
    chunks cover [0, num_frames) without gaps, in order."""
    starts = np.asarray(starts)
    ends = starts + chunk
    if starts.ndim != 1 or not starts.size or starts[0] != 0 or ends[-1] != num_frames:
        raise ValueError(f"chunk starts {tuple(starts)} of {chunk} frames do not span {num_frames} frames")
    if np.any(np.diff(starts) <= 0) or np.any(starts[1:] > ends[:-1]):
        raise ValueError(f"chunk starts {tuple(starts)} of {chunk} frames must increase and leave no gaps")
    return np.concatenate([[0], ends[:-1] - starts[1:]])


def stitch_x0(
    chunk_x0s: Array, starts: Sequence[int], num_frames: int, key: Array, blending: str = "release"
) -> Array:
    """Per-chunk predictions (K, B, chunk, ...) -> one video (B, num_frames, ...) by randomized
    blending (module docstring). Chunks are written in order, each over what came before.

    `starts` are the chunks' first frames (static, as `chunk_starts` makes them); each chunk's
    overlap is what it shares with its predecessors, so a realigned last chunk blends over its
    whole, longer overlap.
    """
    if blending not in BLENDINGS:
        raise ValueError(f"blending={blending!r} is not supported; expected one of {BLENDINGS}")
    num_chunks, chunk = chunk_x0s.shape[0], chunk_x0s.shape[2]
    if len(starts) != num_chunks:
        raise ValueError(f"{len(starts)} chunk starts for {num_chunks} chunk predictions")
    overlaps = _chunk_overlaps(starts, chunk, num_frames)
    position = np.arange(chunk)  # frame index within a chunk

    if blending == "release":
        # randint needs maxval > minval; the first chunk (no overlap) then draws split 0.
        splits = jax.random.randint(key, (num_chunks,), 0, np.maximum(overlaps, 1))
        writes = position[None, :] >= splits[:, None]
    else:
        take_right = (position[None, :] + 1) / (overlaps[:, None] + 1)
        # Beyond the overlap take_right >= 1 > any uniform draw in [0, 1): always written.
        writes = jax.random.uniform(key, (num_chunks, chunk)) < take_right

    starts = np.asarray(starts)
    frames = np.arange(num_frames)
    local = frames[None, :] - starts[:, None]  # (K, F) position of each frame in each chunk
    inside = (local >= 0) & (local < chunk)
    writes_frame = inside & jnp.take_along_axis(writes, np.clip(local, 0, chunk - 1), axis=1)
    # The last chunk to write a frame owns it; chunk 0 writes all of its frames, and every later
    # chunk writes at least its frames past its overlap, so every frame has an owner.
    owner = jnp.max(jnp.where(writes_frame, np.arange(num_chunks)[:, None], -1), axis=0)
    stitched = chunk_x0s[owner, :, frames - jnp.asarray(starts)[owner]]  # (F, B, ...)
    return jnp.moveaxis(stitched, 0, 1)


def chunks_of(video: Array, starts: Sequence[int], chunk: int) -> Array:
    """(B, F, ...) -> (K, B, chunk, ...)."""
    frame_index = np.asarray(starts)[:, None] + np.arange(chunk)
    return jnp.moveaxis(jnp.take(video, frame_index, axis=1), 1, 0)


def denoise_in_groups(denoise: Denoiser, chunks: Array, t: Array, chunks_per_batch: int) -> Array:
    """Model outputs for (K, B, chunk, ...) chunks, `chunks_per_batch` chunks per call, groups
    one after another (lax.map) so only one group's activations are alive at a time."""
    num_chunks, batch = chunks.shape[:2]
    group = min(chunks_per_batch, num_chunks)
    num_groups = -(-num_chunks // group)
    padding = num_groups * group - num_chunks
    # Pad with copies of a real chunk rather than zeros so the wasted work sees ordinary input.
    padded = jnp.concatenate([chunks, jnp.repeat(chunks[-1:], padding, axis=0)]) if padding else chunks
    grouped = padded.reshape(num_groups, group * batch, *chunks.shape[2:])
    outputs = jax.lax.map(lambda latent_chunks: denoise(latent_chunks, t), grouped)
    return outputs.reshape(num_groups * group, batch, *outputs.shape[2:])[:num_chunks]


# ----------------------------------------------------------------------------------------------
# The refinement loop


def _full_schedule_timesteps(schedule: NoiseSchedule, config: RefinerConfig) -> np.ndarray:
    if config.solver == "ddim":
        return schedule.timesteps(config.num_inference_steps)
    return dpm_solver_timesteps(schedule, config.num_inference_steps)


def _first_step_index(timesteps: np.ndarray, config: RefinerConfig) -> int:
    if config.start_timestep is not None:
        candidates = np.flatnonzero(timesteps <= config.start_timestep)
        if not candidates.size:
            raise ValueError(
                f"start_timestep={config.start_timestep} is below every scheduled timestep (lowest {timesteps.min()})"
            )
        return int(candidates[0])
    num_steps = config.num_inference_steps
    init_steps = min(int(num_steps * config.strength), num_steps)
    if init_steps == 0:
        raise ValueError(f"strength={config.strength} with {num_steps} inference steps leaves no step to run")
    return num_steps - init_steps


def refinement_timesteps(schedule: NoiseSchedule, config: RefinerConfig) -> np.ndarray:
    """The timesteps the refiner gives the denoiser, in order (the first is the noise level
    the latents are brought to)."""
    timesteps = _full_schedule_timesteps(schedule, config)
    return timesteps[_first_step_index(timesteps, config) :]


def _check_latents(latents: Array, config: RefinerConfig) -> None:
    if latents.ndim != 5:
        raise ValueError(f"expected latents (B, F, h, w, C), got shape {latents.shape}")
    if latents.shape[1] < config.chunk:
        raise ValueError(f"the video has {latents.shape[1]} frames, fewer than the refiner chunk of {config.chunk}")


def as_jit_argument(denoise: Denoiser) -> jax.tree_util.Partial:
    # A Partial is a pytree whose leaves are its bound arrays (e.g. params), so they enter the
    # jitted loop as arguments rather than as constants baked into the program.
    return denoise if isinstance(denoise, jax.tree_util.Partial) else jax.tree_util.Partial(denoise)


def refine_latents(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    config: RefinerConfig,
    latents: Array,
    key: Array,
    initial_noise: Optional[Array] = None,
) -> Array:
    """Clean latents (B, F, h, w, C) -> refined latents, the whole loop under one jit.

    `denoise` is guided and predicts `schedule.prediction_type`; pass a `jax.tree_util.Partial`
    (as `guided_unet_denoiser` returns) so the arrays it holds are jit arguments. `key` drives the
    initial noise (unless `initial_noise`, standard normal of the latents' shape, is given), the
    blending splits and any solver noise.
    """
    _check_latents(latents, config)
    refinement_timesteps(schedule, config)  # raises on a strength / start that runs no step
    return _refine_latents_jit(as_jit_argument(denoise), schedule, config, latents, key, initial_noise)


def _refine_latents(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    config: RefinerConfig,
    latents: Array,
    key: Array,
    initial_noise: Optional[Array],
) -> Array:
    num_frames = latents.shape[1]
    starts = chunk_starts(num_frames, config.chunk, config.overlap)
    num_steps = config.num_inference_steps
    first = _first_step_index(_full_schedule_timesteps(schedule, config), config)
    # Same betas, but the step functions take the stitched x0 itself as the model output.
    x0_schedule = dataclasses.replace(schedule, prediction_type="sample")

    if config.solver == "ddim":
        timesteps, previous_timesteps = (jnp.asarray(a, jnp.int32) for a in ddim_timesteps(schedule, num_steps))
        alpha_bars = schedule.alphas_cumprod()[timesteps]
        # The same float32 expressions as ddim_step, so a single chunk reproduces plain DDIM.
        signal_scales, noise_scales = jnp.sqrt(alpha_bars), jnp.sqrt(1.0 - alpha_bars)
        solver_state = None
        stochastic = config.eta != 0
    else:
        dpm = dpm_solver_init(x0_schedule, num_steps, algorithm_type=_DPM_ALGORITHMS[config.solver], solver_order=2)
        timesteps, signal_scales, noise_scales = dpm.timesteps, dpm.signal_scales, dpm.noise_scales
        solver_state = dpm_solver_initial_state(latents.shape, begin_index=first)
        stochastic = dpm.stochastic

    noise_key, steps_key = jax.random.split(key)
    if initial_noise is None:
        initial_noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    sample = signal_scales[first] * latents.astype(jnp.float32) + noise_scales[first] * initial_noise

    def step(carry, inputs):
        sample, solver_state = carry
        i, step_key = inputs
        blend_key, noise_key = jax.random.split(step_key)
        chunks = chunks_of(sample, starts, config.chunk)
        outputs = denoise_in_groups(denoise, chunks, timesteps[i], config.chunks_per_batch)
        chunk_x0s, _ = prediction_to_x0_and_eps(
            schedule.prediction_type, outputs.astype(jnp.float32), chunks, signal_scales[i], noise_scales[i]
        )
        x0 = stitch_x0(chunk_x0s, starts, num_frames, blend_key, config.blending)
        noise = jax.random.normal(noise_key, sample.shape, jnp.float32) if stochastic else None
        if config.solver == "ddim":
            sample = ddim_step(x0_schedule, x0, timesteps[i], previous_timesteps[i], sample, config.eta, noise)
        else:
            sample, solver_state = dpm_step(dpm, solver_state, x0, sample, noise)
        return (sample, solver_state), None

    step_indices = jnp.arange(first, num_steps)
    step_keys = jax.random.split(steps_key, num_steps - first)
    (sample, _), _ = jax.lax.scan(step, (sample, solver_state), (step_indices, step_keys))
    return sample.astype(latents.dtype)


_refine_latents_jit = jax.jit(_refine_latents, static_argnames=("schedule", "config"))


# ----------------------------------------------------------------------------------------------
# Pixels in, pixels out


def upsample_video(frames: Array, size: tuple[int, int]) -> Array:
    """Video (B, F, H, W, C) -> (B, F, size[0], size[1], C), bilinear with half-pixel centres
    (`jax.image.resize`; antialiased only when shrinking). The release resizes with PIL to fit
    1280x720 and pads; fitting the aspect ratio is left to the caller."""
    if frames.ndim != 5:
        raise ValueError(f"expected a video (B, F, H, W, C), got shape {frames.shape}")
    return jax.image.resize(frames, (*frames.shape[:2], *size, frames.shape[-1]), method="bilinear")


def refine_video(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    config: RefinerConfig,
    vae: AutoencoderKL,
    vae_params: Any,
    frames: Array,
    key: Array,
    *,
    vae_chunk_size: int = 8,
    placement: Optional[Placement] = None,
) -> Array:
    """Low-resolution video (B, F, H, W, 3) in [-1, 1] -> refined video (B, F, config.height,
    config.width, 3): upsample, VAE-encode (posterior mean), `refine_latents`, decode; one jit.

    The VAE works on `vae_chunk_size` frames at a time. With a `placement` (a sharded model)
    the video comes back whole on every device.
    """
    if frames.ndim != 5:
        raise ValueError(f"expected a video (B, F, H, W, C), got shape {frames.shape}")
    if frames.shape[1] < config.chunk:
        raise ValueError(f"the video has {frames.shape[1]} frames, fewer than the refiner chunk of {config.chunk}")
    factor = vae.config.downscale_factor
    if config.height % factor or config.width % factor:
        raise ValueError(
            f"refiner size {config.height}x{config.width} must be a multiple of the VAE downscale factor {factor}"
        )
    refinement_timesteps(schedule, config)
    return _refine_video_jit(
        as_jit_argument(denoise), schedule, config, vae, vae_params, frames, key, vae_chunk_size, placement
    )


@functools.partial(jax.jit, static_argnames=("schedule", "config", "vae", "vae_chunk_size", "placement"))
def _refine_video_jit(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    config: RefinerConfig,
    vae: AutoencoderKL,
    vae_params: Any,
    frames: Array,
    key: Array,
    vae_chunk_size: int,
    placement: Optional[Placement],
) -> Array:
    upsampled = upsample_video(frames, (config.height, config.width))
    latents = encode_video(vae, vae_params, upsampled, chunk_size=vae_chunk_size)
    refined = _refine_latents(denoise, schedule, config, latents, key, None)
    decoded = decode_video(vae, vae_params, refined, chunk_size=vae_chunk_size)
    return decoded if placement is None else jax.lax.with_sharding_constraint(decoded, placement.replicated)


# ----------------------------------------------------------------------------------------------
# A denoiser from a UNet3D


@dataclasses.dataclass(frozen=True)
class _GuidedUNet3D:
    """The static part of `guided_unet_denoiser`'s Partial. Compared by value, so denoisers
    rebuilt for another prompt or params reuse the compiled refinement loop."""

    unet: UNet3D
    # Spreads the guidance branches of a group of chunks over the mesh's batch axes.
    placement: Optional[Placement] = None

    def __call__(
        self,
        params: Any,
        context: Array,
        negative_context: Array,
        guidance_scale: Array,
        latent_chunks: Array,
        t: Array,
    ) -> Array:
        # The chunks of a group are chunk-major over the video batch, so the per-video contexts
        # repeat once per chunk.
        repeats, remainder = divmod(latent_chunks.shape[0], context.shape[0])
        if remainder:
            raise ValueError(f"{latent_chunks.shape[0]} latent chunks for a context batch of {context.shape[0]}")
        contexts = jnp.concatenate(
            [jnp.tile(negative_context, (repeats, 1, 1)), jnp.tile(context, (repeats, 1, 1))], axis=0
        )
        branches = constrain_batch(jnp.concatenate([latent_chunks] * 2, axis=0), self.placement)
        outputs = self.unet.apply({"params": params}, branches, t, constrain_batch(contexts, self.placement))
        unconditional, conditional = jnp.split(outputs, 2, axis=0)
        return unconditional + guidance_scale * (conditional - unconditional)


def guided_unet_denoiser(
    unet: UNet3D,
    params: Any,
    context: Array,
    negative_context: Array,
    guidance_scale: float,
    placement: Optional[Placement] = None,
) -> jax.tree_util.Partial:
    """A `Denoiser` with classifier-free guidance from a UNet3D: one call on the batch
    [unconditional; conditional], out = uncond + guidance_scale * (cond - uncond).

    `context` / `negative_context` are (B, L, D) text embeddings for a video batch of B.
    With a `placement`, the batch of every call (2 x chunks per batch x B) is split over
    the mesh's data axes.
    """
    if context.shape != negative_context.shape:
        raise ValueError(f"context {context.shape} and negative context {negative_context.shape} differ in shape")
    return jax.tree_util.Partial(
        _GuidedUNet3D(unet, placement), params, context, negative_context, jnp.asarray(guidance_scale, jnp.float32)
    )
