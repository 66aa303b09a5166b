"""The randomized-blending video refiner (st2v_jax.generation.refiner).

Checked: the chunk layout, the stitching rule and its split distributions, the coupling of the
stitched x0 to every solver (an exact denoiser is recovered; one chunk is plain img2img; a
frame-local denoiser does not see the chunking), that grouping chunks into batches changes
nothing, input validation, and one run of the whole pixel pipeline on tiny random models.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.diffusion.solvers import ddim_step, ddim_timesteps, dpm_solver_init, dpm_solver_initial_state, dpm_step
from st2v_jax.generation.refiner import (
    RefinerConfig,
    chunk_starts,
    guided_unet_denoiser,
    refine_latents,
    refine_video,
    refinement_timesteps,
    stitch_x0,
)
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig
from st2v_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

_TINY_VAE_CONFIG = AutoencoderKLConfig(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
)
SCHEDULE = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
LATENT_SHAPE = (2, 11, 4, 4, 3)  # (batch, frames, h, w, channels)


def _random(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _chunk_mixing_denoiser(latent_chunks: jax.Array, t: jax.Array) -> jax.Array:
    """A fake model that mixes the frames of a chunk, so its output depends on the chunking."""
    temporal_mean = jnp.mean(latent_chunks, axis=1, keepdims=True)
    return jnp.tanh(0.7 * latent_chunks + 0.5 * temporal_mean + t / 1000.0)


def _frame_local_denoiser(latent_chunks: jax.Array, t: jax.Array) -> jax.Array:
    """A fake model that sees each latent value alone: chunking cannot change its predictions."""
    return jnp.tanh(0.7 * latent_chunks + t / 1000.0)


# ----------------------------------------------------------------------------------------------
# Chunk layout and stitching


@pytest.mark.parametrize("num_frames, chunk, overlap", [(10, 4, 2), (11, 4, 2), (24, 24, 8), (80, 24, 8), (9, 5, 0)])
def test_chunk_starts_cover_every_frame_with_the_given_overlap(num_frames, chunk, overlap):
    starts = chunk_starts(num_frames, chunk, overlap)
    assert starts[0] == 0 and starts[-1] + chunk == num_frames
    covered = np.zeros(num_frames, bool)
    for start in starts:
        covered[start : start + chunk] = True
    assert covered.all()
    stride = chunk - overlap
    regular, last = starts[:-1], starts[-1]
    assert regular == tuple(range(0, stride * len(regular), stride))
    # The last chunk is either one more regular step or moved back to end on the last frame.
    assert last == len(regular) * stride or (last == num_frames - chunk and last < len(regular) * stride)


def test_chunk_starts_examples():
    assert chunk_starts(10, 4, 2) == (0, 2, 4, 6)
    assert chunk_starts(11, 4, 2) == (0, 2, 4, 6, 7)
    assert chunk_starts(80, 24, 8) == (0, 16, 32, 48, 56)
    assert chunk_starts(24, 24, 8) == (0,)


def _stitch_chunk_indices(num_frames: int, chunk: int, overlap: int, blending: str, num_keys: int) -> np.ndarray:
    """Stitches chunks whose every value is the chunk's index, for many keys: (keys, frames)."""
    starts = chunk_starts(num_frames, chunk, overlap)
    chunk_indices = jnp.arange(len(starts), dtype=jnp.float32)[:, None, None, None]
    chunk_x0s = jnp.broadcast_to(chunk_indices, (len(starts), 1, chunk, 1))
    keys = jax.random.split(jax.random.key(0), num_keys)
    stitched = jax.vmap(lambda key: stitch_x0(chunk_x0s, starts, num_frames, key, blending))(keys)
    return np.asarray(stitched[:, 0, :, 0]).astype(int)


def test_release_stitching_splits_each_overlap_once_uniformly():
    chunk, overlap = 8, 3
    sources = _stitch_chunk_indices(18, chunk, overlap, "release", num_keys=3000)  # chunks at 0, 5, 10
    assert (sources[:, :5] == 0).all()  # chunk 0's frames before the next overlap
    for k, start in ((1, 5), (2, 10)):
        in_overlap = sources[:, start : start + overlap]
        splits = (in_overlap == k - 1).sum(axis=1)
        # Left chunk before the split, this chunk from it on: [k-1]*r + [k]*(overlap - r).
        expected = np.where(np.arange(overlap)[None, :] < splits[:, None], k - 1, k)
        np.testing.assert_array_equal(in_overlap, expected)
        counts = np.bincount(splits, minlength=overlap + 1)
        assert counts[overlap] == 0  # r in {0, ..., overlap - 1}: the chunk always writes past the overlap
        np.testing.assert_allclose(counts[:overlap] / len(splits), 1 / overlap, atol=0.04)
    assert (sources[:, 13:] == 2).all()


def test_release_stitching_of_a_realigned_last_chunk_splits_over_its_whole_overlap():
    # Chunks at 0, 5, 10 and, realigned to the end, 12: the last overlaps frames 12..17, six frames.
    sources = _stitch_chunk_indices(20, 8, 3, "release", num_keys=3000)
    tail = sources[:, 12:]
    splits = (tail < 3).sum(axis=1)
    np.testing.assert_array_equal(tail == 3, np.arange(8)[None, :] >= splits[:, None])
    assert set(np.unique(splits)) == set(range(6))


def test_paper_stitching_takes_the_left_chunk_with_falling_probability():
    chunk, overlap, num_keys = 8, 3, 4000
    sources = _stitch_chunk_indices(18, chunk, overlap, "paper", num_keys)
    assert (sources[:, :5] == 0).all() and (sources[:, 13:] == 2).all()
    for k, start in ((1, 5), (2, 10)):
        assert (sources[:, start + overlap : start + chunk - overlap] == k).all()
        from_left = (sources[:, start : start + overlap] == k - 1).mean(axis=0)
        expected = 1 - (np.arange(overlap) + 1) / (overlap + 1)  # 0.75, 0.5, 0.25
        np.testing.assert_allclose(from_left, expected, atol=4 * np.sqrt(0.25 / num_keys))
    # Independent per frame: the left-right pattern is not always a single split.
    assert ((sources[:, 5] == 1) & (sources[:, 6] == 0)).any()


# ----------------------------------------------------------------------------------------------
# The refinement loop


def test_start_timestep_and_strength_pick_the_same_start():
    by_strength = refinement_timesteps(NoiseSchedule(), RefinerConfig(strength=0.6))
    by_start = refinement_timesteps(NoiseSchedule(), RefinerConfig(start_timestep=599))
    assert by_strength[0] == 580 and len(by_strength) == 30
    np.testing.assert_array_equal(by_start, by_strength)


@pytest.mark.parametrize(
    "solver, eta, prediction_type",
    [("ddim", 0.0, "epsilon"), ("ddim", 1.0, "v_prediction"), ("dpm++2m-sde", 0.0, "epsilon")],
)
def test_an_exact_denoiser_is_recovered_through_the_stitching(solver, eta, prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)  # set_alpha_to_one: DDIM ends on x0
    # Every chunk must agree on its target without knowing where it lies: constant over frames.
    target = jnp.broadcast_to(_random((2, 1, 4, 4, 3), seed=1), LATENT_SHAPE)

    def exact(latent_chunks, t):
        signal = jnp.sqrt(schedule.alphas_cumprod()[t])
        noise_scale = jnp.sqrt(1.0 - schedule.alphas_cumprod()[t])
        # Chunks arrive chunk-major over the video batch: rows cycle through the batch's targets.
        repeats = latent_chunks.shape[0] // target.shape[0]
        clean = jnp.tile(target[:, :1], (repeats, latent_chunks.shape[1], 1, 1, 1))
        if prediction_type == "epsilon":
            return (latent_chunks - signal * clean) / noise_scale
        return (signal * latent_chunks - clean) / noise_scale

    config = RefinerConfig(chunk=4, overlap=2, num_inference_steps=10, solver=solver, eta=eta, chunks_per_batch=2)
    start = _random(LATENT_SHAPE, seed=2)
    refined = refine_latents(exact, schedule, config, start, jax.random.key(3))
    np.testing.assert_allclose(refined, target, atol=2e-4)


def _plain_img2img(denoise, schedule, config, latents, noise):
    """Reference: diffusers-style img2img on the whole video, one model call per step."""
    num_steps = config.num_inference_steps
    first = num_steps - min(int(num_steps * config.strength), num_steps)
    if config.solver == "ddim":
        timesteps, previous_timesteps = ddim_timesteps(schedule, num_steps)
        x = schedule.add_noise(latents, noise, timesteps[first])
        for i in range(first, num_steps):
            x = ddim_step(schedule, denoise(x, timesteps[i]), timesteps[i], previous_timesteps[i], x)
        return x
    dpm = dpm_solver_init(schedule, num_steps, algorithm_type="dpmsolver++", solver_order=2)
    state = dpm_solver_initial_state(latents.shape, begin_index=first)
    x = schedule.add_noise(latents, noise, dpm.timesteps[first])
    for i in range(first, num_steps):
        x, state = dpm_step(dpm, state, denoise(x, dpm.timesteps[i]), x)
    return x


@pytest.mark.parametrize(
    "solver, prediction_type, blending",
    [("ddim", "epsilon", "release"), ("ddim", "v_prediction", "paper"), ("dpm++2m", "v_prediction", "release")],
)
def test_one_chunk_over_the_whole_video_is_plain_img2img(solver, prediction_type, blending):
    schedule = dataclasses.replace(SCHEDULE, prediction_type=prediction_type)
    config = RefinerConfig(chunk=11, overlap=4, num_inference_steps=8, strength=0.75, solver=solver, blending=blending)
    latents, noise = _random(LATENT_SHAPE, seed=4), _random(LATENT_SHAPE, seed=5)
    refined = refine_latents(_chunk_mixing_denoiser, schedule, config, latents, jax.random.key(6), initial_noise=noise)
    expected = _plain_img2img(_chunk_mixing_denoiser, schedule, config, latents, noise)
    np.testing.assert_allclose(refined, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "solver, eta, blending", [("ddim", 1.0, "paper"), ("dpm++2m", 0.0, "release")]
)
def test_chunking_is_invisible_to_a_frame_local_denoiser(solver, eta, blending):
    # Every chunk predicts the same x0 for a frame, so whichever chunk the stitching picks, the
    # result must be that of one chunk over the whole video: frames are placed where they belong.
    settings = dict(num_inference_steps=6, strength=1.0, solver=solver, eta=eta, blending=blending)
    latents, noise, key = _random(LATENT_SHAPE, seed=7), _random(LATENT_SHAPE, seed=8), jax.random.key(9)
    chunked_config = RefinerConfig(chunk=4, overlap=2, **settings)
    whole_config = RefinerConfig(chunk=11, overlap=0, **settings)
    chunked = refine_latents(_frame_local_denoiser, SCHEDULE, chunked_config, latents, key, noise)
    whole = refine_latents(_frame_local_denoiser, SCHEDULE, whole_config, latents, key, noise)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


GROUPING_SETTINGS = dict(chunk=4, overlap=2, num_inference_steps=5, strength=0.8, eta=1.0, blending="paper")
GROUPING_INPUTS = dict(latents=_random(LATENT_SHAPE, seed=10), key=jax.random.key(11))


@pytest.fixture(scope="module")
def refined_one_chunk_at_a_time():
    config = RefinerConfig(chunks_per_batch=1, **GROUPING_SETTINGS)
    return refine_latents(_chunk_mixing_denoiser, SCHEDULE, config, **GROUPING_INPUTS)


@pytest.mark.parametrize("chunks_per_batch", [2, 5])
def test_grouping_chunks_into_batches_does_not_change_the_result(chunks_per_batch, refined_one_chunk_at_a_time):
    # 11 frames in chunks of 4 overlapping by 2 make 5 chunks: groups of 2 need a padding chunk.
    seen_batches = []

    def recording_denoiser(latent_chunks, t):
        seen_batches.append(latent_chunks.shape[0])
        return _chunk_mixing_denoiser(latent_chunks, t)

    config = RefinerConfig(chunks_per_batch=chunks_per_batch, **GROUPING_SETTINGS)
    grouped = refine_latents(recording_denoiser, SCHEDULE, config, **GROUPING_INPUTS)
    assert seen_batches == [chunks_per_batch * LATENT_SHAPE[0]]  # traced once; chunks x video batch per call
    np.testing.assert_allclose(grouped, refined_one_chunk_at_a_time, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(chunk=4, overlap=4), "refiner overlap must be smaller than the chunk"),
        (dict(chunk=4, overlap=6), "refiner overlap must be smaller than the chunk"),
        (dict(strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(solver="euler"), "solver='euler' is not supported"),
        (dict(solver="dpm++2m", eta=1.0), "eta applies to the DDIM solver only"),
        (dict(blending="linear"), "blending='linear' is not supported"),
        (dict(chunks_per_batch=0), "chunks_per_batch must be >= 1"),
    ],
)
def test_bad_configs_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RefinerConfig(**settings)


def _must_not_run(latent_chunks, t):
    raise AssertionError("the denoiser ran although the inputs were invalid")


@pytest.mark.parametrize(
    "config, message",
    [
        (RefinerConfig(chunk=12, overlap=4), "the video has 11 frames, fewer than the refiner chunk of 12"),
        (RefinerConfig(chunk=4, overlap=2, num_inference_steps=5, strength=0.1), "leaves no step to run"),
        # DPM-Solver's 5 "leading" timesteps end at 166.
        (RefinerConfig(chunk=4, overlap=2, num_inference_steps=5, solver="dpm++2m", start_timestep=100), "below every"),
    ],
)
def test_bad_inputs_are_refused_before_any_compute(config, message):
    with pytest.raises(ValueError, match=message):
        refine_latents(_must_not_run, SCHEDULE, config, jnp.zeros(LATENT_SHAPE), jax.random.key(0))


def test_bad_video_shapes_are_refused_before_any_compute():
    config = RefinerConfig(chunk=4, overlap=2, height=31, width=32)
    vae = AutoencoderKL(_TINY_VAE_CONFIG)
    frames = jnp.zeros((1, 10, 16, 16, 3))
    with pytest.raises(ValueError, match="must be a multiple of the VAE downscale factor 2"):
        refine_video(_must_not_run, SCHEDULE, config, vae, {}, frames, jax.random.key(0))
    with pytest.raises(ValueError, match="the video has 3 frames, fewer than the refiner chunk of 4"):
        refine_video(_must_not_run, SCHEDULE, config, vae, {}, frames[:, :3], jax.random.key(0))
    with pytest.raises(ValueError, match=r"expected latents \(B, F, h, w, C\)"):
        refine_latents(_must_not_run, SCHEDULE, config, jnp.zeros((10, 4, 4, 3)), jax.random.key(0))


class _ContextScalingModel:
    """Stands in for a UNet3D: scales each latent chunk by the mean of its context row."""

    @staticmethod
    def apply(variables, latents, t, context):
        return latents * jnp.mean(context, axis=(1, 2))[:, None, None, None, None] + variables["params"]


def test_guided_unet_denoiser_applies_classifier_free_guidance_per_video():
    context = jnp.asarray([1.0, 2.0])[:, None, None] * jnp.ones((2, 3, 4))  # video batch of 2
    negative_context = jnp.full((2, 3, 4), -1.0)
    denoise = guided_unet_denoiser(_ContextScalingModel(), jnp.asarray(0.5), context, negative_context, 3.0)
    latent_chunks = _random((4, 2, 2, 2, 1), seed=18)  # two chunks of each video, chunk-major
    conditional_scale = jnp.asarray([1.0, 2.0, 1.0, 2.0])[:, None, None, None, None]
    # uncond + 3 (cond - uncond), with uncond = -x + 0.5 and cond = scale x + 0.5.
    expected = -latent_chunks + 0.5 + 3.0 * (conditional_scale + 1.0) * latent_chunks
    np.testing.assert_allclose(denoise(latent_chunks, jnp.asarray(10)), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Pixels in, pixels out, with real (tiny, random) models


def test_refine_video_runs_a_tiny_unet_and_vae():
    unet = UNet3D(
        UNet3DConfig(
            block_out_channels=(32, 32),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=16,
        )
    )
    vae = AutoencoderKL(_TINY_VAE_CONFIG)
    frames = jnp.tanh(_random((1, 10, 16, 16, 3), seed=12))
    context, negative_context = _random((1, 5, 16), seed=13), _random((1, 5, 16), seed=14)
    # Random parameters drawn on the host: compiling the modules' initialisers would take longer
    # than the whole refinement.
    rng = np.random.default_rng(15)

    def random_params(shapes):
        return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape, dtype=np.float32)), shapes)

    unet_shapes = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 4, 16, 16, 4)), 0, context)
    unet_params = random_params(unet_shapes["params"])
    vae_params = random_params(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    config = RefinerConfig(
        chunk=4, overlap=2, num_inference_steps=5, strength=0.6, chunks_per_batch=2, height=32, width=32
    )
    assert len(refinement_timesteps(SCHEDULE, config)) == 3

    denoise = guided_unet_denoiser(unet, unet_params, context, negative_context, guidance_scale=7.5)
    refined = refine_video(denoise, SCHEDULE, config, vae, vae_params, frames, jax.random.key(17), vae_chunk_size=4)
    assert refined.shape == (1, 10, 32, 32, 3)
    assert np.isfinite(np.asarray(refined)).all()
