"""Evaluating a folder of generated videos: MAWE, SCuts and CLIP score per video, their
means over videos (the paper's Table 1 protocol: 50 prompts, one 240-frame video each), and
the table as CSV and markdown. `python -m st2v_jax.evaluate` is the command line over this.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from st2v_jax.metrics.clip_score import CLIPScorer
from st2v_jax.metrics.mawe import MAWEEvaluator, MAWEResult
from st2v_jax.metrics.scene_cuts import count_scene_cuts

METRICS = ("mawe", "scuts", "clip")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
# The 50 test-set prompts of the StreamingT2V paper (arXiv 2403.14773, appendix "Test set
# prompts"), in its order (prompt 47's typographic apostrophe written as ASCII).
PAPER_PROMPTS = pathlib.Path(__file__).with_name("paper_prompts.txt")


def _natural_key(path: pathlib.Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def find_videos(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The video files in `directory`, in natural order (video_2 before video_10): the
    order that pairs them with the lines of a prompts file."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"videos folder not found: {directory}")
    videos = sorted((p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES), key=_natural_key)
    if not videos:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {directory}")
    return videos


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} has no prompts (expected one prompt per line)")
    return prompts


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def probe_video(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) of a video file; ffmpeg decodes it without keeping frames."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        reader.close()
        frames = imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    except (RuntimeError, OSError, StopIteration) as err:
        raise ValueError(f"{path} is not a readable video ({_first_line(err)})") from None
    return frames, height, width


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """A video file at its own size -> uint8 (T, H, W, 3)."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        width, height = next(reader)["size"]
        frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    except (RuntimeError, OSError, StopIteration) as err:
        raise ValueError(f"{path} is not a readable video ({_first_line(err)})") from None
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames)


@dataclasses.dataclass(frozen=True)
class VideoScores:
    """One video's results; a metric that was not asked for is None."""

    video: str
    frames: int
    prompt: Optional[str] = None
    mawe: Optional[MAWEResult] = None
    scene_cuts: Optional[int] = None
    clip_score: Optional[float] = None


@dataclasses.dataclass
class VideoEvaluator:
    """Runs the chosen metrics on one video: MAWE if `mawe` is set, the CLIP score if `clip`
    is set (the video's prompt is then needed), SCuts if `scene_cuts`."""

    mawe: Optional[MAWEEvaluator] = None
    clip: Optional[CLIPScorer] = None
    scene_cuts: bool = False

    def __call__(self, path: str | os.PathLike, prompt: Optional[str] = None, progress: bool = False) -> VideoScores:
        if self.clip is not None and prompt is None:
            raise ValueError("the CLIP score needs the video's prompt")
        frames = read_frames(path) if self.mawe is not None or self.clip is not None else None
        return VideoScores(
            video=pathlib.Path(path).name,
            frames=len(frames) if frames is not None else probe_video(path)[0],
            prompt=prompt,
            mawe=self.mawe(frames, progress) if self.mawe is not None else None,
            scene_cuts=count_scene_cuts(path) if self.scene_cuts else None,
            clip_score=self.clip(frames, prompt) if self.clip is not None else None,
        )


def _columns(scores: Sequence[VideoScores]) -> list[str]:
    first = scores[0]
    columns = ["video", "frames"] + (["prompt"] if first.prompt is not None else [])
    if first.mawe is not None:
        columns += ["mawe", "flow_magnitude", "warp_error", "static_pairs"]
    if first.scene_cuts is not None:
        columns.append("scene_cuts")
    if first.clip_score is not None:
        columns.append("clip_score")
    return columns


def _row(score: VideoScores) -> dict[str, Any]:
    row: dict[str, Any] = {"video": score.video, "frames": score.frames, "prompt": score.prompt}
    if score.mawe is not None:
        m = score.mawe
        row.update(mawe=m.value, flow_magnitude=m.mean_flow_magnitude, warp_error=m.mean_warp_error, static_pairs=m.static_pairs)
    row.update(scene_cuts=score.scene_cuts, clip_score=score.clip_score)
    return row


def results_table(scores: Sequence[VideoScores]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows: one per video, then `mean` over videos (NaN values, e.g. the MAWE of
    a video in which nothing moves, are left out of the means)."""
    if not scores:
        raise ValueError("no results to tabulate")
    columns = _columns(scores)
    rows = [_row(score) for score in scores]
    mean: dict[str, Any] = {"video": "mean", "prompt": ""}
    for column in columns:
        if column not in mean:
            values = [float(row[column]) for row in rows if not math.isnan(row[column])]
            mean[column] = float(np.mean(values)) if values else math.nan
    return columns, rows + [mean]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] if isinstance(row[c], (int, str)) else repr(float(row[c])) for c in columns])
    return out.getvalue()


def markdown_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]], settings: Mapping[str, str]) -> str:
    """The table under a list of the settings that produced it (models, definitions)."""
    lines = [f"- {key}: {value}" for key, value in settings.items()] + [""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [_format(row[c]).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
