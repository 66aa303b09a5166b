"""The evaluation metrics on synthetic videos with known properties, and against their
references: MAWE's pieces (resize vs torch, forward warp vs a plain loop, a known
translation, a static video), the batched MAWE evaluator vs RAFT on the whole sequence,
SCuts on a smooth pan and on a hard cut, and the CLIP score vs transformers' CLIPModel."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evaluation_fixtures import pan, smooth_texture, write_mp4, write_tiny_clip_model
from st2v_jax.metrics.mawe import (
    MAWEEvaluator,
    MAWESettings,
    PairStatistics,
    forward_warp,
    mawe_from_statistics,
    pair_statistics,
    resize_frames_bilinear,
)
from st2v_jax.metrics.raft import RAFT
from st2v_jax.metrics.scene_cuts import count_scene_cuts


# ---------------------------------------------------------------------------------- MAWE


@pytest.mark.parametrize("shape, size", [((1, 256, 256, 3), 720), ((2, 100, 120, 3), 64)], ids=["256-to-720", "down"])
def test_resize_matches_torchvision_tensor_resize(shape, size):
    """Equal up to float rounding at .5 ties (which also differ between torch's CPU and CUDA kernels)."""
    torch = pytest.importorskip("torch")
    frames = np.random.RandomState(0).randint(0, 256, shape).astype(np.uint8)
    # torchvision's F.resize(uint8 tensor, antialias=False): float bilinear, round, cast.
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    want = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    want = torch.round(want).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_frames_bilinear(jnp.asarray(frames), size))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (diff.max(), (diff > 0).mean())


def _warp_by_loop(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The release's splat: visit pixels in row-major order, later writes win."""
    h, w, _ = image.shape
    warped, hit = np.zeros_like(image), np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            tx, ty = int(np.round(x + flow[y, x, 0])), int(np.round(y + flow[y, x, 1]))
            if 0 <= tx < w and 0 <= ty < h:
                warped[ty, tx], hit[ty, tx] = image[y, x], True
    return warped, hit


def test_forward_warp_matches_the_release_splat():
    rng = np.random.RandomState(1)
    image = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
    flow = rng.uniform(-3, 3, (12, 16, 2)).astype(np.float32)  # many collisions, some pixels leave
    warped, hit = forward_warp(jnp.asarray(image), jnp.asarray(flow))
    want_warped, want_hit = _warp_by_loop(image, flow)
    assert 0 < want_hit.sum() < want_hit.size
    np.testing.assert_array_equal(np.asarray(hit), want_hit)
    np.testing.assert_array_equal(np.asarray(warped), want_warped)


def test_known_translation_has_no_warp_error_and_its_flow_magnitude():
    step = (3, -2)
    video = pan(smooth_texture(96, 96, 0), frames=3, size=48, step=step)
    flow = jnp.broadcast_to(jnp.asarray(step, jnp.float32), (48, 48, 2))
    warp_error, magnitude, squared = pair_statistics(jnp.asarray(video[0]), jnp.asarray(video[1]), flow)
    assert float(warp_error) == 0.0  # exact: every pixel that lands inside finds its own value
    assert float(magnitude) == pytest.approx(math.hypot(*step), rel=1e-6)
    assert float(squared) == pytest.approx(step[0] ** 2 + step[1] ** 2, rel=1e-6)
    _, hit = forward_warp(jnp.asarray(video[0], jnp.float32), flow)
    assert int(hit.sum()) == (48 - 3) * (48 - 2)  # only the pixels that left are unknown

    brighter = np.clip(video[1].astype(int) + 10, 0, 255).astype(np.uint8)
    warp_error, magnitude, squared = pair_statistics(jnp.asarray(video[0]), jnp.asarray(brighter), flow)
    assert float(warp_error) == pytest.approx(100.0)
    stats = PairStatistics(np.array([100.0, 100.0]), np.array([float(magnitude)] * 2), np.array([float(squared)] * 2))
    assert mawe_from_statistics(stats).value == pytest.approx(100.0 / (9.5 * math.hypot(*step)), rel=1e-6)
    assert mawe_from_statistics(stats, "paper").value == pytest.approx(100.0 / 13.0, rel=1e-6)


def test_static_video_is_guarded():
    frame = jnp.asarray(smooth_texture(32, 32, 2))
    stats = PairStatistics(*(np.asarray(v)[None].repeat(3) for v in pair_statistics(frame, frame, jnp.zeros((32, 32, 2)))))
    assert stats.warp_error.tolist() == [0.0] * 3 and stats.flow_magnitude.tolist() == [0.0] * 3
    for definition in ("release", "paper"):
        result = mawe_from_statistics(stats, definition)
        assert math.isnan(result.value) and result.static_pairs == 3 and result.pairs == 3
    # A moving pair among static ones: the static ones stay out of the release mean.
    mixed = PairStatistics(np.array([0.0, 19.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    assert mawe_from_statistics(mixed).value == pytest.approx(2.0) and mawe_from_statistics(mixed).static_pairs == 1


def test_mawe_settings_are_validated():
    with pytest.raises(ValueError, match="multiple of 8"):
        MAWESettings(size=100)
    with pytest.raises(ValueError, match="definition"):
        MAWESettings(definition="average")


def test_evaluator_batches_equal_one_raft_call_over_the_video():
    """Resize, [-1, 1] mapping, batching with a padded last batch: the same statistics as
    RAFT over the whole resized sequence at once."""
    video = pan(smooth_texture(160, 160, 3), frames=4, size=64, step=(2, 1))
    model = RAFT(num_flow_updates=1)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), jnp.zeros((1, 128, 128, 3)))["params"]
    evaluator = MAWEEvaluator(params, MAWESettings(size=128, num_flow_updates=1, pairs_per_batch=2))
    got = evaluator.pair_statistics(video)

    resized = resize_frames_bilinear(jnp.asarray(video), 128)
    flows = model.apply({"params": params}, (resized / 255.0 - 0.5) / 0.5, method=RAFT.consecutive_flows)
    want = jax.vmap(pair_statistics)(resized[:-1], resized[1:], flows)
    for got_values, want_values in zip((got.warp_error, got.flow_magnitude, got.flow_squared_magnitude), want):
        assert got_values.shape == (3,)
        np.testing.assert_allclose(got_values, np.asarray(want_values), rtol=1e-4)
    assert np.isfinite(evaluator(video).value)


# --------------------------------------------------------------------------------- SCuts


def test_scene_cuts_none_in_a_smooth_pan_and_one_at_a_hard_cut(tmp_path):
    diagonal = pan(smooth_texture(256, 256, 4), frames=48, size=128, step=(1, 1))
    other_scene = pan(smooth_texture(256, 256, 5, low=0, high=255)[..., ::-1], frames=24, size=128, step=(-1, 0))
    write_mp4(tmp_path / "pan.mp4", diagonal)
    write_mp4(tmp_path / "cut.mp4", np.concatenate([diagonal[:24], other_scene]))
    assert count_scene_cuts(tmp_path / "pan.mp4") == 0
    assert count_scene_cuts(tmp_path / "cut.mp4") == 1


# ---------------------------------------------------------------------------- CLIP score


def test_clip_score_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from st2v_jax.metrics.clip_score import CLIPScorer

    reference = write_tiny_clip_model(tmp_path)
    scorer = CLIPScorer.from_pretrained(tmp_path, batch_size=2)  # 3 frames: a padded last batch
    frames = np.random.RandomState(6).randint(0, 256, (3, 40, 52, 3)).astype(np.uint8)  # non-square: a crop
    prompt = "a red circle bouncing"

    processor = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    pixels = processor(images=list(frames), return_tensors="np")["pixel_values"]
    ids = scorer.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        text = reference.get_text_features(input_ids=ids).pooler_output
        want = float(100 * torch.nn.functional.cosine_similarity(image, text).mean())
    got = scorer(frames, prompt)
    embeddings = scorer.frame_embeddings(frames)
    err = float(np.abs(embeddings - image.numpy()).max())
    print(f"\nCLIP score {got:.5f} vs transformers {want:.5f}; frame embedding max abs err {err:.1e}")
    assert err <= 1e-4 * float(image.std())
    assert got == pytest.approx(want, abs=1e-3)
    assert scorer.name == tmp_path.name
