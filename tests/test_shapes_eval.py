"""The shapes evaluation: its metrics on rendered videos with known answers, the tables, the
CAM/APM ablation switches of the sampler, and `python -m st2v_jax.evaluate_shapes` on the
tiny random model."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st2v_jax.data import shapes
from st2v_jax.evaluate_shapes import main
from st2v_jax.generation.long_video import generate_whole_video
from st2v_jax.generation.pipeline import StreamingT2VPipeline
from st2v_jax.generation.sampler import SamplingSettings
from st2v_jax.metrics import shapes_eval
from st2v_jax.metrics.shapes_eval import ChunkLayout, EvaluatedVideo, VideoScores, score_video

LAYOUT = ChunkLayout()
FRAMES = 40  # 16 + 3 chunks of 8: borders after frames 15, 23, 31


def two_lane_scene(colours=("red", "blue"), kinds=("circle", "square"), speeds=(1.1, -0.8)) -> shapes.Scene:
    """Two shapes sliding along their own lanes (never overlapping), bouncing off the side walls."""
    return shapes.Scene(tuple(
        shapes.Shape(colour, kind, 8.0, (20.0 + 25.0 * lane, 16.0 + 32.0 * lane), (speed, 0.0))
        for lane, (colour, kind, speed) in enumerate(zip(colours, kinds, speeds))
    ), 64)


def test_ground_truth_video_scores_full_marks():
    scene = two_lane_scene()
    scores = score_video(scene.render(FRAMES), "a red circle and a blue square bouncing", LAYOUT)
    assert scores.first_chunk_adherent and scores.consistency == 1.0 and scores.persistence == 1.0
    assert scores.first_chunk_specs == {("red", "circle"), ("blue", "square")}
    centres = scene.centres(FRAMES)
    true_steps = np.linalg.norm(np.diff(centres, axis=0), axis=-1).mean()  # 0.95 px, less at a bounce
    assert scores.mean_displacement == pytest.approx(true_steps, abs=0.02)
    assert scores.mean_displacement == pytest.approx((1.1 + 0.8) / 2, rel=0.1)
    assert 0.8 < scores.border_jump_ratio < 1.25  # steady motion: borders look like any other frame pair


def test_a_jump_at_a_chunk_border_is_caught():
    scene = two_lane_scene()
    later = scene.render(FRAMES + 8)
    video = np.concatenate([later[:24], later[32:40], later[40:48]])  # from frame 24 on, 8 frames ahead
    assert len(video) == FRAMES
    scores = score_video(video, "a red circle and a blue square bouncing", LAYOUT)
    assert scores.border_jump_ratio > 1.5
    assert score_video(scene.render(FRAMES), "a red circle and a blue square bouncing", LAYOUT).border_jump_ratio < 1.25


def test_a_colour_change_midway_lowers_consistency_only():
    before = two_lane_scene(colours=("red", "blue")).render(FRAMES)
    after = two_lane_scene(colours=("green", "blue")).render(FRAMES)  # the red circle turns green
    video = np.concatenate([before[:20], after[20:]])
    scores = score_video(video, "a red circle and a blue square bouncing", LAYOUT)
    assert scores.first_chunk_adherent  # the first 16 frames are right
    assert scores.consistency == pytest.approx(0.5)
    assert scores.persistence == pytest.approx(4 / 24)  # of the 24 frames after the first chunk, 4 keep red


def test_the_wrong_shapes_fail_adherence():
    video = two_lane_scene(kinds=("triangle", "square")).render(FRAMES)
    scores = score_video(video, "a red circle and a blue square bouncing", LAYOUT)
    assert not scores.first_chunk_adherent and scores.consistency == 0.0
    assert scores.persistence == 1.0  # wrong from the start, but kept: not drift
    assert scores.first_chunk_specs == {("red", "triangle"), ("blue", "square")}
    # A shape missing from the prompt is as wrong as a missing one.
    assert not score_video(video, "a blue square bouncing", LAYOUT).first_chunk_adherent


def test_chunk_borders_and_undefined_scores():
    assert ChunkLayout().border_pairs(40).tolist() == [15, 23, 31]
    assert ChunkLayout().border_pairs(16).tolist() == []
    still = np.zeros((24, 32, 32, 3), np.uint8)
    assert shapes_eval.border_jump_ratio(still, LAYOUT) == 1.0  # nothing moves: no jump
    assert math.isnan(shapes_eval.border_jump_ratio(still[:16], LAYOUT))
    scores = score_video(still, "a red circle", LAYOUT)
    assert math.isnan(scores.mean_displacement) and scores.consistency == 0.0
    assert math.isnan(scores.persistence)  # the first chunk shows nothing to keep
    with pytest.raises(ValueError, match="names no shape"):
        score_video(still, "a cat surfing", LAYOUT)


def evaluated(variant: str, values: list[tuple[bool, float, float, float, float]]) -> list[EvaluatedVideo]:
    return [
        EvaluatedVideo(variant, i, f"prompt {i}", 0, i, VideoScores(a, frozenset({("red", "circle")}), b, p, d, r))
        for i, (a, b, p, d, r) in enumerate(values)
    ]


def test_tables_compare_ablations_per_prompt():
    full = evaluated("full", [(True, 0.95, 1.0, 1.0, 1.0), (True, 0.9, 1.0, 1.2, 1.1), (False, 0.8, 0.9, 0.9, 1.05), (True, 1.0, 1.0, 1.1, 0.95)])
    no_cam = evaluated("no_cam", [(True, 0.95, 1.0, 1.0, 2.0), (True, 0.9, 1.0, 1.2, 2.3), (False, 0.8, 0.9, 0.9, 1.9), (True, 1.0, 1.0, 1.1, 2.1)])
    no_apm = evaluated("no_apm", [(True, 0.94, 0.8, 1.0, 1.0), (True, 0.91, 0.9, 1.2, 1.1), (False, 0.8, math.nan, 0.9, 1.05), (True, 0.99, 0.7, 1.1, 0.95)])
    report = shapes_eval.markdown_report({"full": full, "no_cam": no_cam, "no_apm": no_apm}, {"model": "m"})
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "| 4 | 75.0% ± 25.0 | 91.3% ± 4.3 | 97.5% ± 2.5 | 1.05 ± 0.06 | 1.03 ± 0.03 |" in rows["full"]
    assert "| APM off | 4 | 75.0% ± 25.0 | 91.0% ± 4.0 | 80.0% ± 5.8 |" in report  # over the 3 videos that have a value
    assert rows["CAM off"].endswith("| +0.00 ± 0.00 | +1.05 ± 0.08 | (c) border-jump ratio | worse (13.3 s.e.) |")
    assert rows["APM off"].endswith("| -20.0% ± 5.8 | +0.00 ± 0.00 | +0.00 ± 0.00 | (b) frames with the prompt's shapes | not measurably worse |")
    text = shapes_eval.csv_text([video.row() for video in full + no_cam])
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 8 and parsed[4]["variant"] == "no_cam" and parsed[4]["border_jump_ratio"] == "2"
    assert parsed[0]["first_chunk_detected"] == "red circle"


def test_sampling_defaults_from_the_model_folder(tmp_path):
    assert shapes_eval.read_sampling_defaults(tmp_path) == {}
    (tmp_path / "sampling.json").write_text(json.dumps({"steps": 25, "guidance": 5, "anchor_guidance": None}))
    assert shapes_eval.read_sampling_defaults(tmp_path) == {"steps": 25, "guidance": 5, "anchor_guidance": None}
    for bad, message in (({"step": 25}, "unknown keys"), ({"steps": 2.5}, "steps = 2.5"), ([], "JSON object")):
        (tmp_path / "sampling.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            shapes_eval.read_sampling_defaults(tmp_path)


# ---------------------------------------------------------------------------- the ablation switches

# The CLI test below samples exactly this (batch 0 of 2 prompts, seed 0), so its compilations
# come from the persistent cache.
SETTINGS = SamplingSettings(num_frames=24, steps=2, init_steps=2, height=32, width=32, seed=0)
PROMPTS = shapes.evaluation_prompts()[:2]


@pytest.fixture(scope="module")
def live_pipe(tiny_model_dir):
    """The tiny random model with its zero-initialised streaming outputs (CAM's zero convs
    and mergers, APM's mixing weight alpha) set to random values: freshly initialised,
    CAM and APM add exactly nothing, and switching them off could not change a frame."""
    pipe = StreamingT2VPipeline.from_pretrained(tiny_model_dir)
    leaves, tree = jax.tree_util.tree_flatten_with_path(pipe.params["streaming"])
    keys = jax.random.split(jax.random.key(1), len(leaves))

    def wake(path, leaf, key):
        if "bias" in jax.tree_util.keystr(path) or not bool((leaf == 0).all()):
            return leaf
        if leaf.ndim == 0:  # APM's alpha: silu(1) mixes the anchor's tokens in
            return jnp.ones_like(leaf)
        return 0.2 * jax.random.normal(key, leaf.shape, leaf.dtype)

    woken = [wake(path, leaf, key) for (path, leaf), key in zip(leaves, keys)]
    pipe.params = {**pipe.params, "streaming": jax.tree_util.tree_unflatten(tree, woken)}
    return pipe


@pytest.fixture(scope="module")
def variant_videos(live_pipe):
    encoded = shapes_eval.encode_batch(live_pipe, PROMPTS, live_pipe.num_chunks(SETTINGS.num_frames))
    return encoded, dict(shapes_eval.generate_variants(live_pipe, encoded, SETTINGS))


def test_default_sampling_is_the_full_model(live_pipe, variant_videos):
    encoded, videos = variant_videos
    assert SamplingSettings().use_cam and SamplingSettings().use_apm
    np.testing.assert_array_equal(videos["full"], generate_whole_video(live_pipe, encoded, SETTINGS))


def test_switching_cam_or_apm_off_changes_only_the_streaming_chunks(variant_videos):
    _, videos = variant_videos
    assert videos["full"].shape == (2, 24, 32, 32, 3)
    for ablation in ("no_cam", "no_apm"):
        np.testing.assert_array_equal(videos[ablation][:, :16], videos["full"][:, :16])  # the first chunk uses neither
        difference = np.abs(videos[ablation][:, 16:].astype(int) - videos["full"][:, 16:]).mean()
        assert difference > 1.0, ablation
    assert not np.array_equal(videos["no_cam"], videos["no_apm"])


# ---------------------------------------------------------------------------- the command line


def test_cli_writes_the_table_and_csv(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"  # the tiny model, with recommended sampling
    model.mkdir()
    for entry in tiny_model_dir.iterdir():
        (model / entry.name).symlink_to(entry)
    (model / "sampling.json").write_text(json.dumps({"steps": 2, "init_steps": 2}))
    out = tmp_path / "results" / "shapes.md"
    assert main(["--model-dir", str(model), "--prompts", "2", "--frames", "24", "--out", str(out)]) == 0
    markdown = out.read_text()
    assert markdown in capsys.readouterr().out
    assert "24 frames of 32x32" in markdown and "streaming 2 DDIM steps" in markdown
    for row in ("| full | 2 |", "| CAM off | 2 |", "| APM off | 2 |", "## (d) Ablations"):
        assert row in markdown
    rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
    assert [(r["variant"], r["prompt"]) for r in rows] == [(v, p) for v in shapes_eval.VARIANTS for p in PROMPTS]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--frames", "30"], "nearest valid counts: [24, 32, 40]"),
        (["--prompts", "55"], "between 1 and 54"),
        (["--variants", "full,no_cfg"], "unknown: ['no_cfg']"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--out", "results.csv"], "is the markdown table"),
    ],
)
def test_bad_input_fails_before_the_model_loads(tiny_model_dir, monkeypatch, capsys, arguments, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(StreamingT2VPipeline, "from_pretrained", refuse)
    assert main(["--model-dir", str(tiny_model_dir), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder_is_named(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_variant_names_are_checked():
    with pytest.raises(ValueError, match="choose from"):
        next(shapes_eval.generate_variants(None, None, SETTINGS, ["cam_off"]))
    # A model folder's sampling.json turning a module off cannot leak into the full model.
    assert dataclasses.replace(SamplingSettings(use_cam=False), **shapes_eval.VARIANTS["full"]).use_cam
