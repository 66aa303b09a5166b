"""`python -m st2v_jax.evaluate`: the table it writes, and bad input refused before any model
is loaded. RAFT weights are random here (the converter is tested in test_raft_parity.py):
the loader is replaced by a random initialisation."""
from __future__ import annotations

import csv
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import st2v_jax.convert.raft
from evaluation_fixtures import pan, smooth_texture, write_mp4, write_tiny_clip_model
from st2v_jax.evaluate import main
from st2v_jax.metrics.clip_score import CLIPScorer
from st2v_jax.metrics.evaluation import PAPER_PROMPTS, read_frames, read_prompts
from st2v_jax.metrics.raft import RAFT

PROMPTS = ["a smooth pan over clouds", "a pan to the left"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip-tiny")
    write_tiny_clip_model(directory)
    return directory


@pytest.fixture
def inputs(tmp_path):
    """Two 3-frame 128x128 videos (natural order: video_2 before video_10), their prompts,
    and a stand-in RAFT weight file."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "video_10.mp4", pan(smooth_texture(192, 192, 1), frames=3, size=128, step=(-2, 0)))
    write_mp4(videos / "video_2.mp4", pan(smooth_texture(192, 192, 0), frames=3, size=128, step=(1, 1)))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (tmp_path / "raft.pth").write_bytes(b"")
    return tmp_path


@pytest.fixture
def random_raft(monkeypatch):
    params = jax.jit(RAFT(num_flow_updates=1).init)(jax.random.key(0), jnp.zeros((1, 128, 128, 3)), jnp.zeros((1, 128, 128, 3)))
    monkeypatch.setattr(st2v_jax.convert.raft, "load_raft_params", lambda path: params["params"])


@pytest.fixture
def no_models(monkeypatch):
    """Fails the test if a model is loaded: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(st2v_jax.convert.raft, "load_raft_params", refuse)
    monkeypatch.setattr(CLIPScorer, "from_pretrained", refuse)


def _add_video(inputs, name: str, frames: np.ndarray) -> None:
    write_mp4(inputs / "videos" / name, frames)
    with open(inputs / "prompts.txt", "a") as f:
        f.write(f"the prompt of {name}\n")


def _args(inputs, clip_dir, *extra: str) -> list[str]:
    return [
        "--videos", str(inputs / "videos"), "--prompts", str(inputs / "prompts.txt"), "--raft-weights", str(inputs / "raft.pth"),
        "--clip-model", str(clip_dir), "--mawe-size", "128", "--flow-updates", "1", "--pairs-per-batch", "2",
        "--out", str(inputs / "results" / "table"), *extra,
    ]


def test_writes_per_video_and_mean_tables(inputs, clip_dir, random_raft, capsys):
    assert main(_args(inputs, clip_dir)) == 0
    with open(inputs / "results" / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["video"] for row in rows] == ["video_2.mp4", "video_10.mp4", "mean"]
    assert [row["prompt"] for row in rows] == PROMPTS + [""]
    assert [row["frames"] for row in rows[:2]] == ["3", "3"]
    assert [row["scene_cuts"] for row in rows[:2]] == ["0", "0"]
    for column in ("mawe", "flow_magnitude", "warp_error", "clip_score"):
        values = [float(row[column]) for row in rows]
        assert all(math.isfinite(v) for v in values), column
        assert values[2] == pytest.approx(np.mean(values[:2])), column
    scorer = CLIPScorer.from_pretrained(clip_dir)
    want = scorer(read_frames(inputs / "videos" / "video_10.mp4"), PROMPTS[1])
    assert float(rows[1]["clip_score"]) == pytest.approx(want, abs=1e-4)

    markdown = (inputs / "results" / "table.md").read_text()
    assert f"CLIP model: {clip_dir.name}" in markdown and "release definition" in markdown
    assert "| video_10.mp4 | 3 | a pan to the left |" in markdown
    assert markdown in capsys.readouterr().out


def test_metrics_subset_needs_no_prompts_or_models(inputs, no_models):
    (inputs / "prompts.txt").write_text("only one prompt\n")
    assert main(["--videos", str(inputs / "videos"), "--prompts", str(inputs / "prompts.txt"), "--metrics", "scuts"]) == 0
    with open(inputs / "videos" / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["video", "frames", "scene_cuts"]
    assert [row["scene_cuts"] for row in rows] == ["0", "0", "0.0"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "prompts.txt").write_text("one\ntwo\nthree\n"), "2 videos in .* but 3 prompts"),
        (lambda d: (d / "raft.pth").unlink(), "mawe needs --raft-weights"),
        (lambda d: [p.unlink() for p in (d / "videos").iterdir()], "no videos"),
        (lambda d: _add_video(d, "video_3.mp4", np.zeros((1, 128, 128, 3), np.uint8)), "video_3.mp4: 1 frames, MAWE needs at least 2"),
    ],
    ids=["prompt-count", "raft-weights", "no-videos", "too-short"],
)
def test_bad_input_is_refused_before_loading_models(inputs, clip_dir, no_models, capsys, change, message):
    change(inputs)
    assert main(_args(inputs, clip_dir)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_frame_count_and_metric_names_are_checked(inputs, clip_dir, no_models, capsys):
    assert main(_args(inputs, clip_dir, "--expect-frames", "240")) == 2
    assert "video_2.mp4: 3 frames, expected 240" in capsys.readouterr().err
    assert main(_args(inputs, clip_dir, "--metrics", "mawe,fvd")) == 2
    assert "unknown: ['fvd']" in capsys.readouterr().err
    assert main(_args(inputs, clip_dir, "--videos", str(inputs / "missing"))) == 2
    assert "videos folder not found" in capsys.readouterr().err


def test_the_paper_prompts_ship_with_the_package():
    prompts = read_prompts(PAPER_PROMPTS)
    assert len(prompts) == len(set(prompts)) == 50
    assert prompts[0] == "A camel resting on the snow field."
    assert prompts[-1].startswith("Beside the ancient amphitheater of Taormina")
