"""The official StreamingT2V refiner: MS-Vid2Vid-XL run by randomized blending, as the release
runs it (`video2video_randomized` with modelscope's VideoToVideo).

Pixels: each frame is resized to fit the 1280x720 canvas keeping its aspect ratio (bicubic;
a 256x256 preview becomes 720x720) and centred on black bars: the release's letterbox, and
the only kind of size the MS-Vid2Vid UNet accepts near 720p (`check_latent_size`). Frames are
VAE-encoded with a posterior sample (modelscope's `get_first_stage_encoding`).

Latents: noised once, with one noise tensor, to t_max = 599 and multiplied by the sampler's
first noise level (`sde_start`); then, at each of the 30 DPM-Solver++(2M) SDE steps spread over
timesteps 599 ... 0, every chunk of 24 frames (overlap 8) is denoised on its own with guidance
7.5 and rescale 0.2, the chunks' x0 predictions are stitched by randomized blending
(`refiner.stitch_x0`), and the stitched x0 drives the solver step on the whole video. Unlike
the generic img2img refiner (`refiner.refine_latents`), the steps are not a tail of a longer
schedule: they span [0, t_max] as in modelscope's `sample(t_max=599, discretization='trailing')`.

Output: by default the content region (720x720 for a square preview, which is what the
release's non-blended path crops out); `letterbox=True` keeps the whole 1280x720 canvas, as
the release's randomized-blending path writes it. The prompt gets the release's ", " suffix.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from st2v_jax.convert.components import PretrainedModel
from st2v_jax.diffusion.vid2vid_schedule import (
    LogSNRCosineSchedule,
    SDEPlan,
    dpmpp_2m_sde_plan,
    dpmpp_2m_sde_step,
    guidance_with_rescale,
    sde_initial_state,
    sde_start,
    v_to_x0,
)
from st2v_jax.generation.refiner import (
    BLENDINGS,
    Denoiser,
    as_jit_argument,
    chunks_of,
    denoise_in_groups,
    chunk_starts,
    stitch_x0,
)
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.vae import AutoencoderKL, decode_video, encode_video
from st2v_jax.models.vid2vid_unet import Vid2VidUNet, check_latent_size
from st2v_jax.parallel import DEFAULT_RULES, Placement, Rules, constrain_batch

Array = jax.Array
VID2VID_COMPONENTS = ("vid2vid_unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class Vid2VidRefinerConfig:
    """Settings of the official refiner; the defaults are the release's. Hashable (static jit argument)."""

    chunk: int = 24
    overlap: int = 8
    num_steps: int = 30
    # The noise level refinement starts from (the release's total_noise_levels - 1).
    start_timestep: int = 599
    guidance: float = 7.5
    guidance_rescale: float = 0.2
    chunks_per_batch: int = 1
    blending: str = "release"
    canvas_height: int = 720
    canvas_width: int = 1280
    # True: return the whole canvas with its black bars; False: only the content region.
    letterbox: bool = False
    # modelscope samples the VAE posterior; False uses its mean.
    sample_posterior: bool = True
    prompt_suffix: str = ", "

    def __post_init__(self) -> None:
        problems = []
        if self.chunk < 1 or not 0 <= self.overlap < self.chunk:
            problems.append(f"need chunk >= 1 and 0 <= overlap < chunk, got chunk={self.chunk}, overlap={self.overlap}")
        if self.num_steps < 1:
            problems.append(f"num_steps must be >= 1, got {self.num_steps}")
        if self.start_timestep < 1:
            problems.append(f"start_timestep must be >= 1, got {self.start_timestep}")
        if self.guidance_rescale < 0 or self.guidance_rescale > 1:
            problems.append(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.chunks_per_batch < 1:
            problems.append(f"chunks_per_batch must be >= 1, got {self.chunks_per_batch}")
        if self.blending not in BLENDINGS:
            problems.append(f"blending={self.blending!r} is not supported; expected one of {BLENDINGS}")
        if self.canvas_height < 1 or self.canvas_width < 1:
            problems.append(f"the canvas must have a positive size, got {self.canvas_height}x{self.canvas_width}")
        if problems:
            raise ValueError("invalid MS-Vid2Vid refiner config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Pixels


def fit_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The release's `resize_to_fit`: the largest (h, w) with the frame's aspect ratio inside
    the canvas (sizes truncated to integers as it does)."""
    canvas_h, canvas_w = canvas
    if canvas_h / height > canvas_w / width:
        return int(height * canvas_w / width), canvas_w
    return canvas_h, int(width * canvas_h / height)


def content_box(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a (height, width) frame letterboxed into the canvas (centred; an odd
    leftover row or column goes to the bottom/right)."""
    h, w = fit_size(height, width, canvas)
    return (canvas[0] - h) // 2, (canvas[1] - w) // 2, h, w


def letterbox_video(frames: Array, canvas: tuple[int, int]) -> Array:
    """Video (B, F, H, W, C) in [-1, 1] -> (B, F, *canvas, C): bicubic resize to fit keeping the
    aspect ratio, centred on black (-1) bars."""
    if frames.ndim != 5:
        raise ValueError(f"expected a video (B, F, H, W, C), got shape {frames.shape}")
    top, left, h, w = content_box(*frames.shape[2:4], canvas)
    resized = jax.image.resize(frames, (*frames.shape[:2], h, w, frames.shape[-1]), method="bicubic")
    pads = [(0, 0), (0, 0), (top, canvas[0] - h - top), (left, canvas[1] - w - left), (0, 0)]
    return jnp.pad(jnp.clip(resized, -1.0, 1.0), pads, constant_values=-1.0)


# ----------------------------------------------------------------------------------------------
# The refinement loop


def refine_latents_vid2vid(
    denoise: Denoiser,
    schedule: LogSNRCosineSchedule,
    config: Vid2VidRefinerConfig,
    latents: Array,
    key: Array,
    initial_noise: Array | None = None,
) -> Array:
    """Clean latents (B, F, h, w, C) -> refined latents, the whole loop under one jit.

    `denoise(latent_chunks, t)` returns the guided v prediction (see `guided_vid2vid_denoiser`).
    `key` drives the initial noise (unless `initial_noise` is given), the blending splits and
    the solver noise.
    """
    if latents.ndim != 5:
        raise ValueError(f"expected latents (B, F, h, w, C), got shape {latents.shape}")
    chunk_starts(latents.shape[1], config.chunk, config.overlap)  # raises for a video shorter than a chunk
    plan = dpmpp_2m_sde_plan(schedule, config.num_steps, t_max=config.start_timestep)
    return _refine_latents_jit(as_jit_argument(denoise), schedule, plan, config, latents, key, initial_noise)


def _refine_latents(
    denoise: Denoiser,
    schedule: LogSNRCosineSchedule,
    plan: SDEPlan,
    config: Vid2VidRefinerConfig,
    latents: Array,
    key: Array,
    initial_noise: Array | None,
) -> Array:
    num_frames = latents.shape[1]
    starts = chunk_starts(num_frames, config.chunk, config.overlap)
    noise_key, steps_key = jax.random.split(key)
    if initial_noise is None:
        initial_noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    x = sde_start(plan, schedule, latents, initial_noise)

    def step(carry, inputs):
        x, state = carry
        i, step_key = inputs
        blend_key, noise_key = jax.random.split(step_key)
        model_input = chunks_of(x * plan.input_scales[i], starts, config.chunk)
        v = denoise_in_groups(denoise, model_input, plan.timesteps[i], config.chunks_per_batch)
        x0 = stitch_x0(v_to_x0(plan, i, model_input, v), starts, num_frames, blend_key, config.blending)
        noise = jax.random.normal(noise_key, x.shape, jnp.float32)
        return dpmpp_2m_sde_step(plan, state, x0, x, noise), None

    steps = plan.num_steps
    (x, _), _ = jax.lax.scan(
        step, (x, sde_initial_state(x.shape)), (jnp.arange(steps), jax.random.split(steps_key, steps))
    )
    return x.astype(latents.dtype)


_refine_latents_jit = jax.jit(_refine_latents, static_argnames=("schedule", "config"))


def refine_video_vid2vid(
    denoise: Denoiser,
    schedule: LogSNRCosineSchedule,
    config: Vid2VidRefinerConfig,
    vae: AutoencoderKL,
    vae_params: Any,
    frames: Array,
    key: Array,
    *,
    vae_chunk_size: int = 8,
    placement: Placement | None = None,
) -> Array:
    """Low-resolution video (B, F, H, W, 3) in [-1, 1] -> refined video: (B, F, canvas, 3) with
    `config.letterbox`, else the content region (720x720 for square input); one jit. With a
    `placement` (a sharded model) the video comes back whole on every device."""
    if frames.ndim != 5:
        raise ValueError(f"expected a video (B, F, H, W, C), got shape {frames.shape}")
    chunk_starts(frames.shape[1], config.chunk, config.overlap)
    factor = vae.config.downscale_factor
    if config.canvas_height % factor or config.canvas_width % factor:
        raise ValueError(f"the {config.canvas_height}x{config.canvas_width} canvas is not a multiple of the VAE factor {factor}")
    plan = dpmpp_2m_sde_plan(schedule, config.num_steps, t_max=config.start_timestep)
    return _refine_video_jit(
        as_jit_argument(denoise), schedule, plan, config, vae, vae_params, frames, key, vae_chunk_size, placement
    )


@functools.partial(jax.jit, static_argnames=("schedule", "config", "vae", "vae_chunk_size", "placement"))
def _refine_video_jit(
    denoise: Denoiser,
    schedule: LogSNRCosineSchedule,
    plan: SDEPlan,
    config: Vid2VidRefinerConfig,
    vae: AutoencoderKL,
    vae_params: Any,
    frames: Array,
    key: Array,
    vae_chunk_size: int,
    placement: Placement | None,
) -> Array:
    canvas = (config.canvas_height, config.canvas_width)
    encode_key, refine_key = jax.random.split(key)
    video = letterbox_video(frames, canvas)
    latents = encode_video(vae, vae_params, video, encode_key if config.sample_posterior else None, vae_chunk_size)
    refined = _refine_latents(denoise, schedule, plan, config, latents, refine_key, None)
    decoded = jnp.clip(decode_video(vae, vae_params, refined, vae_chunk_size), -1.0, 1.0)
    if not config.letterbox:
        top, left, h, w = content_box(*frames.shape[2:4], canvas)
        decoded = decoded[:, :, top : top + h, left : left + w]
    return decoded if placement is None else jax.lax.with_sharding_constraint(decoded, placement.replicated)


# ----------------------------------------------------------------------------------------------
# A denoiser from the MS-Vid2Vid UNet


@dataclasses.dataclass(frozen=True)
class _GuidedVid2VidUNet:
    """The static part of `guided_vid2vid_denoiser`'s Partial (compared by value, so a new
    prompt or new params reuse the compiled loop)."""

    unet: Vid2VidUNet
    # Spreads the guidance branches of a group of chunks over the mesh's batch axes.
    placement: Placement | None = None

    def __call__(
        self, params: Any, context: Array, negative_context: Array, scale: Array, rescale: Array, latent_chunks: Array, t: Array
    ) -> Array:
        repeats, remainder = divmod(latent_chunks.shape[0], context.shape[0])
        if remainder:
            raise ValueError(f"{latent_chunks.shape[0]} latent chunks for a context batch of {context.shape[0]}")
        contexts = jnp.concatenate([jnp.tile(context, (repeats, 1, 1)), jnp.tile(negative_context, (repeats, 1, 1))], axis=0)
        branches = constrain_batch(jnp.concatenate([latent_chunks] * 2, axis=0), self.placement)
        outputs = self.unet.apply({"params": params}, branches, t, constrain_batch(contexts, self.placement))
        conditional, unconditional = jnp.split(outputs, 2, axis=0)
        # Per chunk (batch entry) statistics, as modelscope denoises one chunk at a time.
        return guidance_with_rescale(conditional, unconditional, scale, rescale)


def guided_vid2vid_denoiser(
    unet: Vid2VidUNet,
    params: Any,
    context: Array,
    negative_context: Array,
    guidance: float,
    guidance_rescale: float,
    placement: Placement | None = None,
) -> jax.tree_util.Partial:
    """A `Denoiser` returning modelscope's guided v: uncond + guidance (cond - uncond), rescaled
    towards the conditional output's spread by `guidance_rescale`. With a `placement`, the
    batch of every call is split over the mesh's data axes."""
    if context.shape != negative_context.shape:
        raise ValueError(f"context {context.shape} and negative context {negative_context.shape} differ in shape")
    return jax.tree_util.Partial(
        _GuidedVid2VidUNet(unet, placement), params, context, negative_context,
        jnp.asarray(guidance, jnp.float32), jnp.asarray(guidance_rescale, jnp.float32),
    )


# ----------------------------------------------------------------------------------------------
# A loaded refiner


def is_vid2vid_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a converted MS-Vid2Vid-XL folder (read from its manifest only)."""
    from st2v_jax.checkpoint import MANIFEST, read_manifest

    path = pathlib.Path(path)
    return (path / MANIFEST).is_file() and "vid2vid_unet" in read_manifest(path)["components"]


@dataclasses.dataclass
class Vid2VidRefiner:
    """A converted MS-Vid2Vid-XL folder (`python -m st2v_jax.convert.vid2vid`) used as the refiner."""

    model: PretrainedModel
    tokenizer: Any
    schedule: LogSNRCosineSchedule = dataclasses.field(default_factory=LogSNRCosineSchedule)
    placement: Placement | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, checksums: bool = True, execution: ExecutionOptions = DEFAULT_EXECUTION
    ) -> "Vid2VidRefiner":
        """A converted MS-Vid2Vid-XL folder, run with `execution` (see `PretrainedModel.for_inference`)."""
        from st2v_jax.pretrained import load_for_inference
        from st2v_jax.tokenizer import load_tokenizer

        model = load_for_inference(path, checksums, execution)
        missing = [c for c in VID2VID_COMPONENTS if c not in model.params]
        if missing or model.tokenizer_dir() is None:
            raise ValueError(
                f"{path} is not a converted MS-Vid2Vid-XL folder (needs {list(VID2VID_COMPONENTS)} and tokenizer/): "
                "convert it with python -m st2v_jax.convert.vid2vid --unet non_ema_0035000.pth --open-clip "
                "open_clip_pytorch_model.bin --vae v2-1_512-ema-pruned.ckpt --tokenizer-dir text-to-video-ms-1.7b/tokenizer --out DIR"
            )
        return cls(model, load_tokenizer(model.tokenizer_dir()))

    def shard(self, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> "Vid2VidRefiner":
        """Lays the params out over `mesh` (in place; returns self); each denoiser call's
        guidance branches and chunks (`chunks_per_batch`) go over its data axes."""
        self.placement = Placement(mesh, rules)
        self.model, _ = self.placement.shard_model(self.model)
        return self

    def output_size(self, height: int, width: int, config: Vid2VidRefinerConfig) -> tuple[int, int]:
        canvas = (config.canvas_height, config.canvas_width)
        return canvas if config.letterbox else content_box(height, width, canvas)[2:]

    def refine(self, frames: np.ndarray, prompt: str, negative_prompt: str, config: Vid2VidRefinerConfig, seed: int) -> np.ndarray:
        """uint8 (F, H, W, 3) -> refined uint8 (F, *self.output_size(H, W, config), 3)."""
        from st2v_jax.generation.pipeline import to_uint8
        from st2v_jax.tokenizer import tokenize

        check_latent_size(
            self.model.config("vid2vid_unet"),
            config.canvas_height // self.model.config("vae").downscale_factor,
            config.canvas_width // self.model.config("vae").downscale_factor,
        )
        max_length = self.model.config("text_encoder").max_position_embeddings
        ids, _ = tokenize(self.tokenizer, [prompt + config.prompt_suffix, negative_prompt], max_length)
        text = self.model.module("text_encoder").apply({"params": self.model.params["text_encoder"]}, jnp.asarray(ids))
        denoise = guided_vid2vid_denoiser(
            self.model.module("vid2vid_unet"), self.model.params["vid2vid_unet"], text[:1], text[1:],
            config.guidance, config.guidance_rescale, self.placement,
        )
        video = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0
        refined = refine_video_vid2vid(
            denoise, self.schedule, config, self.model.module("vae"), self.model.params["vae"], video,
            jax.random.key(seed), placement=self.placement,
        )
        return np.asarray(to_uint8(refined))[0]
