"""The StreamingT2V sampling loops, as pure jitted functions of (params, inputs).

* `first_chunk`: the initialisation chunk from text only, with the plain UNet3D and
  DPM-Solver++ (the release uses text-to-video-ms-1.7b for it), whole loop under one jit.
* `chunk_step`: ONE streaming chunk, `(carry, (chunk index, text)) -> (carry, frames)`.
  The carry is the last conditioning frames in pixel space; a chunk's randomness comes from
  (seed, chunk index) alone, so chunks can be computed in any grouping and resumed.
* `sample_scan`: `lax.scan` of the chunk step over all chunks, compiled once whatever the
  length. `sample_stream`: the same jitted step in a Python loop that hands out each
  chunk's frames as soon as they exist. Both give identical frames.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from st2v_jax.diffusion.guidance import Guidance, combine_guidance, guidance_contexts, repeat_for_branches
from st2v_jax.diffusion.solvers import ddim_step, ddim_timesteps, dpm_solver_init, dpm_solver_initial_state, dpm_step
from st2v_jax.generation.pipeline import StreamingT2VPipeline, to_uint8

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Release defaults: streaming DDIM 50 steps, eta 1, guidance 7.5; first chunk DPM-Solver++
    50 steps, guidance 9. `anchor_guidance` switches to the paper's two-weight guidance.

    `use_cam` / `use_apm` are ablation switches for measuring what each module contributes
    (the paper's ablations): without CAM the streaming chunks see no conditioning frames
    (the model skips CAM); without APM every guidance branch gets the null anchor's tokens
    (a mid-grey frame's, what training feeds for a dropped anchor) instead of the anchor's.
    Neither touches the first chunk, which uses neither module."""

    num_frames: int = 80
    steps: int = 50
    guidance: float = 7.5
    anchor_guidance: Optional[float] = None
    eta: float = 1.0
    init_steps: int = 50
    init_guidance: float = 9.0
    seed: int = 0
    height: int = 256
    width: int = 256
    use_cam: bool = True
    use_apm: bool = True

    @classmethod
    def checked_overrides(cls, values: Any, source: str) -> dict[str, Any]:
        """`values` (e.g. a model folder's sampling.json) checked against the fields: every key
        known, every value of its field's type. Raises ValueError naming `source`."""
        if not isinstance(values, dict):
            raise ValueError(f"{source} should be a JSON object of SamplingSettings keys, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; SamplingSettings has {sorted(fields)}")
        for key, value in values.items():
            default = fields[key].default
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:  # float, or Optional[float] (default None)
                ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (value is None and default is None)
            if not ok:
                raise ValueError(f"{source}: {key} = {value!r} does not fit SamplingSettings.{key} (default {default!r})")
        return dict(values)

    @property
    def guidance_rule(self) -> Guidance:
        return Guidance(self.guidance, self.anchor_guidance)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StreamingConstants:
    """Per-video inputs every chunk shares."""

    negative_text: Array  # (B, 77, D)
    anchor_tokens: Array  # (B, image tokens, D): APM tokens of the anchor frame
    null_anchor_tokens: Array  # (B, image tokens, D): APM tokens of a mid-grey frame


def _chunk_key(seed: int, chunk_index: Array) -> Array:
    return jax.random.fold_in(jax.random.key(seed), chunk_index)


def _latent_shape(pipe: StreamingT2VPipeline, settings: SamplingSettings, batch: int) -> tuple[int, ...]:
    d = pipe.vae_downscale
    return (batch, pipe.frames_per_chunk, settings.height // d, settings.width // d, pipe.config["unet"].in_channels)


StepCallback = Callable[[Array], None]


def _report_step(pipe: StreamingT2VPipeline, on_step: Optional[StepCallback], step_index: Array) -> None:
    """Tells the host a denoising step finished (progress bars); numerics are unaffected.
    Ordered on one device; XLA supports ordered callbacks on one device only, and a
    progress bar can take steps reported out of order."""
    if on_step is not None:
        jax.debug.callback(on_step, step_index, ordered=pipe.mesh is None)


def make_first_chunk(
    pipe: StreamingT2VPipeline, settings: SamplingSettings, on_step: Optional[StepCallback] = None
) -> Callable[[Any, Array, Array], Array]:
    """jitted (params, text (B,77,D), negative (B,77,D)) -> frames (B, F, H, W, 3) in [-1, 1].
    `on_step(i)` is called on the host after denoising step i."""
    schedule = pipe.init_schedule()
    dpm = dpm_solver_init(schedule, settings.init_steps, algorithm_type="dpmsolver++", solver_order=2)
    unet = pipe.modules["unet"]
    scale = settings.init_guidance

    def run(params: Any, text: Array, negative: Array) -> Array:
        key = _chunk_key(settings.seed, 0)
        latents = jax.random.normal(key, _latent_shape(pipe, settings, text.shape[0]))
        context = pipe.constrain_batch(jnp.concatenate([negative, text], axis=0))

        def step(carry, _):
            x, state = carry
            t = dpm.timesteps[state.step_index]
            branches = pipe.constrain_batch(jnp.concatenate([x, x]))
            uncond, cond = jnp.split(unet.apply({"params": params["unet"]}, branches, t, context), 2)
            _report_step(pipe, on_step, state.step_index)
            x, state = dpm_step(dpm, state, uncond + scale * (cond - uncond), x)
            return (x, state), None

        (latents, _), _ = jax.lax.scan(step, (latents, dpm_solver_initial_state(latents.shape)), length=settings.init_steps)
        return pipe.decode(latents)

    return jax.jit(run, in_shardings=(pipe.param_shardings, None, None), out_shardings=pipe.replicated)


def make_chunk_step(pipe: StreamingT2VPipeline, settings: SamplingSettings, on_step: Optional[StepCallback] = None) -> Callable:
    """`(params, constants, cond_frames, (chunk_index, text)) -> (cond_frames', new uint8 frames)`.

    cond_frames: (B, Fc, H, W, 3) in [-1, 1], the last frames of the previous chunk.
    `on_step(i)` is called on the host after denoising step i.
    """
    schedule = pipe.streaming_schedule()
    timesteps, previous = ddim_timesteps(schedule, settings.steps)
    rule = settings.guidance_rule
    streaming = pipe.modules["streaming"]
    cam_frames, new_frames = pipe.cam_frames, pipe.new_frames_per_chunk
    decoded = max(cam_frames, new_frames)

    def step(params: Any, constants: StreamingConstants, cond_frames: Array, xs: tuple[Array, Array]):
        chunk_index, text = xs
        latent_key, noise_key = jax.random.split(_chunk_key(settings.seed, chunk_index))
        latents = jax.random.normal(latent_key, _latent_shape(pipe, settings, text.shape[0]))
        anchor_tokens = constants.anchor_tokens if settings.use_apm else constants.null_anchor_tokens
        contexts = guidance_contexts(rule, text, constants.negative_text, anchor_tokens, constants.null_anchor_tokens)
        contexts = pipe.constrain_batch(contexts)
        cond = pipe.constrain_batch(repeat_for_branches(rule, cond_frames)) if settings.use_cam else None

        def denoise(x, step_inputs):
            i, t, prev_t = step_inputs
            branches = pipe.constrain_batch(repeat_for_branches(rule, x))
            eps = streaming.apply({"params": params["streaming"]}, branches, t, contexts, cond)
            noise = jax.random.normal(jax.random.fold_in(noise_key, i), x.shape)
            _report_step(pipe, on_step, i)
            return ddim_step(schedule, combine_guidance(rule, eps), t, prev_t, x, settings.eta, noise), None

        steps = (jnp.arange(settings.steps), jnp.asarray(timesteps), jnp.asarray(previous))
        latents, _ = jax.lax.scan(denoise, latents, steps)
        frames = pipe.decode(latents[:, -decoded:])
        return frames[:, -cam_frames:], to_uint8(frames[:, -new_frames:])

    return step


def streaming_constants(pipe: StreamingT2VPipeline, anchor_embedding: Array, negative_text: Array) -> StreamingConstants:
    """APM tokens of the anchor's embedding (B, Fa, D) and of a mid-grey frame's."""
    null = pipe.null_anchor_embedding(*anchor_embedding.shape[:2])
    return StreamingConstants(negative_text, pipe.anchor_tokens(anchor_embedding), pipe.anchor_tokens(null))


def sample_scan(
    step: Callable, params: Any, constants: StreamingConstants, cond_frames: Array, chunk_indices: Array, texts: Array
) -> tuple[Array, Array]:
    """All chunks with one `lax.scan` -> (final cond frames, frames (chunks, B, new, H, W, 3))."""
    return jax.lax.scan(lambda carry, xs: step(params, constants, carry, xs), cond_frames, (chunk_indices, texts))


def sample_stream(
    step: Callable,
    params: Any,
    constants: StreamingConstants,
    cond_frames: Array,
    chunk_indices: np.ndarray,
    texts: Array,
    out_sharding: Optional[jax.sharding.Sharding] = None,
) -> Iterator[tuple[int, Array, Array]]:
    """Yields (chunk index, cond frames after it, its new uint8 frames) one chunk at a time;
    `out_sharding` lays out both (e.g. `pipe.replicated`, for the host to read)."""
    jitted = jax.jit(step, out_shardings=out_sharding)
    for i, chunk_index in enumerate(chunk_indices):
        cond_frames, frames = jitted(params, constants, cond_frames, (jnp.asarray(chunk_index), texts[i]))
        yield int(chunk_index), cond_frames, frames
