"""Generating a whole long video: prompts (or a storyboard) -> frames -> mp4, resumable.

`generate_long_video` runs the first chunk, then the streaming chunks one at a time with
the jitted chunk step, committing every chunk to a `RunState` (lossless frames + carry)
before handing it to the `VideoOutput`. An interruption (Ctrl-C, SIGTERM, crash) leaves a
playable video of the finished chunks; calling again with `resume=True` continues from the
state and produces exactly the frames an uninterrupted run would (a chunk's randomness
depends only on the seed and its index). `generate_whole_video` is the `lax.scan` form,
compiled once for any length, returning the frames in memory.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh

from st2v_jax.convert.components import PretrainedModel
from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.generation.pipeline import StreamingT2VPipeline, to_uint8
from st2v_jax.generation.refiner import RefinerConfig, guided_unet_denoiser, refine_video
from st2v_jax.generation.run_state import RunState, graceful_interrupts, resume_directory_for
from st2v_jax.generation.sampler import (
    SamplingSettings,
    make_chunk_step,
    make_first_chunk,
    sample_scan,
    sample_stream,
    streaming_constants,
)
from st2v_jax.generation.video_writer import VideoOutput
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.parallel import DEFAULT_RULES, Placement, Rules
from st2v_jax.pretrained import load_for_inference
from st2v_jax.tokenizer import load_tokenizer, tokenize

Array = jax.Array


class NonFiniteOutputError(FloatingPointError):
    """The model produced NaN/inf; what was finished before stays written."""


@dataclasses.dataclass(frozen=True)
class StoryboardEntry:
    prompt: str
    frames: int


def chunk_prompts(pipe: StreamingT2VPipeline, storyboard: Sequence[StoryboardEntry]) -> list[str]:
    """The prompt of every chunk (first chunk included): a chunk takes the entry that covers
    its first new frame. The storyboard's frame counts must add up to a valid length."""
    total = sum(entry.frames for entry in storyboard)
    num_chunks = pipe.num_chunks(total)  # validates the total
    ends = np.cumsum([entry.frames for entry in storyboard])
    first_frames = [0] + [pipe.frames_per_chunk + pipe.new_frames_per_chunk * i for i in range(num_chunks)]
    return [storyboard[int(np.searchsorted(ends, start, side="right"))].prompt for start in first_frames]


@dataclasses.dataclass
class EncodedPrompts:
    per_chunk: Array  # (chunks incl. the first, B, 77, D)
    negative: Array  # (B, 77, D)


def encode_prompts(pipe: StreamingT2VPipeline, prompts: Sequence[str], negative_prompt: str) -> EncodedPrompts:
    """Text embeddings for every chunk's prompt (each distinct prompt encoded once), batch 1."""
    distinct = sorted(set(prompts))
    ids, _ = pipe.tokenize(distinct + [negative_prompt])
    embeds = pipe.encode_text(ids)
    index = {prompt: i for i, prompt in enumerate(distinct)}
    per_chunk = jnp.stack([embeds[index[p]][None] for p in prompts])
    return EncodedPrompts(per_chunk, embeds[-1][None])


def _check_finite(array: Array, chunk_index: int, frames_done: int, out: pathlib.Path) -> None:
    if not bool(jnp.isfinite(array).all()):
        raise NonFiniteOutputError(
            f"the model produced NaN/inf values in chunk {chunk_index}; generation stopped. "
            f"The {frames_done} frames finished before it are in {out} (resumable with --resume after fixing the cause)."
        )


@dataclasses.dataclass
class VideoStart:
    """Existing frames to continue instead of a first chunk made from text: a user image
    (`--image`) or a video (`--extend`). They open the output video; the first of them is
    the APM anchor and the last conditioning frames feed CAM."""

    frames: np.ndarray  # uint8 (P, H, W, 3)

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8 or not len(self.frames):
            raise ValueError(f"start frames must be uint8 (P, H, W, 3) with P >= 1, got {self.frames.dtype} {self.frames.shape}")

    def conditioning(self, cam_frames: int) -> np.ndarray:
        """The last `cam_frames` frames in [-1, 1], the first repeated if there are fewer."""
        frames = self.frames[-cam_frames:]
        frames = np.concatenate([np.repeat(frames[:1], cam_frames - len(frames), axis=0), frames])
        return frames.astype(np.float32)[None] / 127.5 - 1.0


def generate_long_video(
    pipe: StreamingT2VPipeline,
    prompts: EncodedPrompts,
    settings: SamplingSettings,
    out: str | os.PathLike,
    *,
    run_settings: dict[str, Any],
    fps: float = 8.0,
    png_dir: Optional[str | os.PathLike] = None,
    resume: bool = False,
    keep_state: bool = False,
    start: Optional[VideoStart] = None,
) -> RunState:
    """Streams the video to `out`, chunk by chunk, with progress; returns the run's state
    (completed; its frame store is deleted unless `keep_state`, e.g. to refine next).

    There is one chunk per entry of `prompts.per_chunk`; chunk 0 is the first chunk made from
    text, or the `start` frames."""
    out = pathlib.Path(out)
    state_dir = resume_directory_for(out)
    num_chunks = len(prompts.per_chunk)
    if resume:
        state = RunState.load(state_dir)
    else:
        state = RunState.create(state_dir, run_settings, settings.seed, (settings.height, settings.width), overwrite=True)
    params = pipe.params
    step_bar = tqdm.tqdm(total=settings.steps, unit="step", desc="denoising", leave=False, position=1)

    def on_step(i: Array) -> None:
        if int(i) == 0:
            step_bar.reset(total=step_bar.total)
        step_bar.update()

    step = make_chunk_step(pipe, settings, on_step)
    with graceful_interrupts(), VideoOutput(
        out, fps, settings.height, settings.width, settings=run_settings, seed=settings.seed, png_dir=png_dir,
        resume_from=state if resume else None,
    ) as video:
        progress = tqdm.tqdm(total=num_chunks, initial=state.next_chunk_index, unit="chunk", desc="generating")
        if state.next_chunk_index == 0:
            if start is None:
                step_bar.reset(total=settings.init_steps)
                first = make_first_chunk(pipe, settings, on_step)(params, prompts.per_chunk[0], prompts.negative)
                _check_finite(first, 0, 0, out)
                step_bar.total = settings.steps
                anchor_frames, cond_frames = first[:, :1], first[:, -pipe.cam_frames :]
                frames = np.asarray(to_uint8(first))[0]
            else:
                frames = start.frames
                anchor_frames = jnp.asarray(frames[None, :1], jnp.float32) / 127.5 - 1.0
                cond_frames = jnp.asarray(start.conditioning(pipe.cam_frames))
            anchor_embedding = pipe.anchor_embedding(anchor_frames)
            state.commit_chunk(0, frames, {"cond_frames": np.asarray(cond_frames), "anchor_embedding": np.asarray(anchor_embedding)})
            video.write(frames)
            progress.update()
        else:
            carry = state.carry()
            cond_frames, anchor_embedding = jnp.asarray(carry["cond_frames"]), jnp.asarray(carry["anchor_embedding"])
        constants = streaming_constants(pipe, anchor_embedding, prompts.negative)
        chunk_indices = np.arange(state.next_chunk_index, num_chunks)
        for chunk_index, cond_frames, frames in sample_stream(
            step, params, constants, cond_frames, chunk_indices, prompts.per_chunk[chunk_indices], pipe.replicated
        ):
            _check_finite(cond_frames, chunk_index, state.frames_committed, out)
            frames = np.asarray(frames)[0]
            state.commit_chunk(chunk_index, frames, {"cond_frames": np.asarray(cond_frames), "anchor_embedding": np.asarray(anchor_embedding)})
            video.write(frames)
            progress.update()
        progress.close()
    step_bar.close()
    if not keep_state:
        state.finish()
    return state


def generate_whole_video(pipe: StreamingT2VPipeline, prompts: EncodedPrompts, settings: SamplingSettings) -> np.ndarray:
    """All chunks in one `lax.scan` (compiled once for any length) -> uint8 (B, F, H, W, 3)."""
    params = pipe.params
    first = make_first_chunk(pipe, settings)(params, prompts.per_chunk[0], prompts.negative)
    constants = streaming_constants(pipe, pipe.anchor_embedding(first[:, :1]), prompts.negative)
    step = make_chunk_step(pipe, settings)
    num_chunks = pipe.num_chunks(settings.num_frames)
    scan = jax.jit(lambda p, c, cond, idx, texts: sample_scan(step, p, c, cond, idx, texts), out_shardings=pipe.replicated)
    _, frames = scan(params, constants, first[:, -pipe.cam_frames :], jnp.arange(1, num_chunks + 1), prompts.per_chunk[1:])
    frames = jnp.moveaxis(frames, 0, 1).reshape(first.shape[0], -1, *frames.shape[-3:])
    return np.concatenate([np.asarray(to_uint8(first)), np.asarray(frames)], axis=1)


@dataclasses.dataclass
class Refiner:
    """A diffusers-layout text-to-video model (UNet3D, VAE, CLIP text) used as the video refiner."""

    model: PretrainedModel
    tokenizer: Any
    schedule: NoiseSchedule
    placement: Optional[Placement] = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, checksums: bool = True, execution: ExecutionOptions = DEFAULT_EXECUTION
    ) -> "Refiner":
        model = load_for_inference(path, checksums, execution)
        missing = [c for c in ("unet", "vae", "text_encoder") if c not in model.params]
        if missing or model.tokenizer_dir() is None:
            raise ValueError(f"{path} is not a text-to-video model usable as a refiner (needs unet, vae, text_encoder, tokenizer)")
        schedule = NoiseSchedule.from_diffusers(model.scheduler_config(), "DDIMScheduler")
        return cls(model, load_tokenizer(model.tokenizer_dir()), schedule)

    def shard(self, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> "Refiner":
        """Lays the params out over `mesh` (in place; returns self); each denoiser call's
        guidance branches and chunks (`RefinerConfig.chunks_per_batch`) go over its data axes."""
        self.placement = Placement(mesh, rules)
        self.model, _ = self.placement.shard_model(self.model)
        return self

    def refine(self, frames: np.ndarray, prompt: str, negative_prompt: str, config: RefinerConfig, guidance: float, seed: int) -> np.ndarray:
        """uint8 (F, H, W, 3) -> refined uint8 (F, config.height, config.width, 3), randomized blending."""
        ids, _ = tokenize(self.tokenizer, [prompt, negative_prompt], self.model.config("text_encoder").max_position_embeddings)
        text = self.model.module("text_encoder").apply({"params": self.model.params["text_encoder"]}, jnp.asarray(ids))
        denoise = guided_unet_denoiser(
            self.model.module("unet"), self.model.params["unet"], text[:1], text[1:], guidance, self.placement
        )
        video = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0
        refined = refine_video(
            denoise, self.schedule, config, self.model.module("vae"), self.model.params["vae"], video,
            jax.random.key(seed), placement=self.placement,
        )
        return np.asarray(to_uint8(refined))[0]
