"""`python -m st2v_jax.evaluate`: the paper's metrics (MAWE, SCuts, CLIP score) for a folder
of generated videos, per video and averaged, as CSV and markdown.

  python -m st2v_jax.evaluate --videos outputs/paper_prompts --raft-weights raft_large_C_T_SKHT_V2-ff5fadd5.pth \\
      --clip-model clip-vit-large-patch14

Videos pair with the lines of --prompts in natural file-name order (video_2 before
video_10); the default prompts are the paper's 50 test prompts. MAWE follows the release
(720x720, RAFT-large with 12 updates, coefficient 9.5); --mawe-definition paper uses the
paper's wording. Every check that can fail (files, prompt count, frame counts, output
folder) runs before a model is loaded.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

import tqdm

from st2v_jax.atomic import atomic_write_text
from st2v_jax.convert import raft
from st2v_jax.metrics.clip_score import CLIPScorer
from st2v_jax.metrics.evaluation import (
    METRICS,
    PAPER_PROMPTS,
    VideoEvaluator,
    csv_text,
    find_videos,
    markdown_text,
    probe_video,
    read_prompts,
    results_table,
)
from st2v_jax.metrics.mawe import DEFINITIONS, RELEASE_COEFFICIENT, RELEASE_SIZE, MAWEEvaluator, MAWESettings


class UsageError(ValueError):
    """Bad command-line input; reported without a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m st2v_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (.mp4, .webm, .mov, .mkv, .avi, .gif)")
    p.add_argument("--prompts", default=str(PAPER_PROMPTS), help="one prompt per line, one line per video (default: the paper's 50)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--raft-weights", help="torchvision raft_large weights, e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth (for mawe)")
    p.add_argument("--clip-model", help="a transformers CLIPModel folder, e.g. clip-vit-large-patch14 (for clip)")
    p.add_argument("--out", help="output path without suffix: writes OUT.csv and OUT.md (default: VIDEOS/evaluation)")
    p.add_argument("--expect-frames", type=int, help="refuse videos with another frame count (the paper: 240)")
    mawe = p.add_argument_group("MAWE")
    mawe.add_argument("--mawe-definition", choices=DEFINITIONS, default="release")
    mawe.add_argument("--mawe-size", type=int, default=RELEASE_SIZE, help="resize frames to SIZE x SIZE for the flow; 0 keeps them")
    mawe.add_argument("--flow-updates", type=int, default=12, help="RAFT refinement steps")
    mawe.add_argument("--mawe-coefficient", type=float, default=RELEASE_COEFFICIENT, help="release definition's OFS factor")
    mawe.add_argument("--static-flow-threshold", type=float, default=1e-3, help="pairs moving at most this many pixels on average are static")
    mawe.add_argument("--pairs-per-batch", type=int, default=4, help="frame pairs per RAFT call (memory vs speed)")
    clip = p.add_argument_group("CLIP score")
    clip.add_argument("--clip-batch-size", type=int, default=16, help="frames per vision-tower call")
    return p


def _metrics(text: str) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise UsageError(f"--metrics {text!r}: choose from {', '.join(METRICS)} (unknown: {unknown or 'none given'})")
    return tuple(m for m in METRICS if m in metrics)


def _is_clip_folder(path: Optional[str]) -> bool:
    folder = pathlib.Path(path or "")
    has_tokenizer = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
    return bool(path) and (folder / "config.json").is_file() and has_tokenizer


def _check_writable(directory: pathlib.Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".st2v-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--out: cannot write to {directory} ({err.strerror or err})") from None


def _check_videos(videos: Sequence[pathlib.Path], minimum: int, expected: Optional[int], settings: Optional[MAWESettings]) -> None:
    """Every video readable, long enough and, when MAWE keeps the frame size, of a size RAFT takes."""
    problems = []
    for video in tqdm.tqdm(videos, desc="checking videos", unit="video", leave=False):
        try:
            frames, height, width = probe_video(video)
            if settings is not None:
                settings.check_frame_size(height, width)
        except ValueError as err:
            problems.append(f"{video.name}: {err}")
            continue
        if expected is not None and frames != expected:
            problems.append(f"{video.name}: {frames} frames, expected {expected}")
        elif frames < minimum:
            problems.append(f"{video.name}: {frames} frames, MAWE needs at least {minimum}")
    if problems:
        raise UsageError("videos that cannot be evaluated:\n  " + "\n  ".join(problems))


def _build_evaluator(args: argparse.Namespace, metrics: Sequence[str], settings: MAWESettings) -> tuple[VideoEvaluator, dict[str, str]]:
    """Loads the models the metrics need; returns the evaluator and a description of its settings."""
    evaluator = VideoEvaluator(scene_cuts="scuts" in metrics)
    described = {"metrics": ", ".join(metrics), "videos": str(args.videos)}
    if "mawe" in metrics:
        try:
            evaluator.mawe = MAWEEvaluator(raft.load_raft_params(args.raft_weights), settings)
        except ValueError as err:  # unreadable, or not raft_large
            raise UsageError(f"--raft-weights {args.raft_weights}: {err}") from None
        size = f"{settings.size}x{settings.size}" if settings.size else "kept at their size"
        described["MAWE"] = (
            f"{settings.definition} definition, frames {size}, RAFT-large {settings.num_flow_updates} updates "
            f"({pathlib.Path(args.raft_weights).name})"
            + (f", coefficient {settings.coefficient}" if settings.definition == "release" else "")
        )
    if "clip" in metrics:
        try:
            evaluator.clip = CLIPScorer.from_pretrained(args.clip_model, batch_size=args.clip_batch_size)
        except (OSError, ValueError) as err:  # missing or mismatched weights, unsupported config
            raise UsageError(f"--clip-model {args.clip_model}: {err}") from None
        described["CLIP model"] = evaluator.clip.name
        described["prompts"] = str(args.prompts)
    if "scuts" in metrics:
        described["SCuts"] = "PySceneDetect AdaptiveDetector, default settings"
    return evaluator, described


def run(argv: Optional[Sequence[str]] = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Checks everything, evaluates, writes the tables; returns the CSV and markdown paths."""
    args = _parser().parse_args(argv)
    metrics = _metrics(args.metrics)
    try:
        videos = find_videos(args.videos)
        prompts = read_prompts(args.prompts) if "clip" in metrics else None
        settings = MAWESettings(
            size=args.mawe_size or None,
            num_flow_updates=args.flow_updates,
            definition=args.mawe_definition,
            coefficient=args.mawe_coefficient,
            static_flow_threshold=args.static_flow_threshold,
            pairs_per_batch=args.pairs_per_batch,
        )
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if prompts is not None and len(prompts) != len(videos):
        raise UsageError(
            f"{len(videos)} videos in {args.videos} but {len(prompts)} prompts in {args.prompts}: give one prompt per "
            "line for each video, in natural file-name order (--prompts FILE), or leave out clip (--metrics)"
        )
    if "mawe" in metrics and not (args.raft_weights and pathlib.Path(args.raft_weights).is_file()):
        raise UsageError(
            f"mawe needs --raft-weights, a torchvision raft_large weight file (got {args.raft_weights!r}); e.g. "
            "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth (torchvision's default)"
        )
    if "clip" in metrics and not _is_clip_folder(args.clip_model):
        raise UsageError(
            f"clip needs --clip-model, a transformers CLIPModel folder with config.json, weights and tokenizer files "
            f"(got {args.clip_model!r}); e.g. a download of openai/clip-vit-large-patch14"
        )
    if args.clip_batch_size < 1:
        raise UsageError(f"--clip-batch-size must be at least 1, got {args.clip_batch_size}")
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.videos) / "evaluation"
    _check_writable(out.parent)
    _check_videos(videos, 2 if "mawe" in metrics else 1, args.expect_frames, settings if "mawe" in metrics else None)

    evaluator, described = _build_evaluator(args, metrics, settings)
    scores = []
    bar = tqdm.tqdm(videos, desc="evaluating", unit="video")
    for i, video in enumerate(bar):
        bar.set_postfix_str(video.name)
        scores.append(evaluator(video, prompts[i] if prompts else None, progress=True))
    columns, rows = results_table(scores)
    markdown = markdown_text(columns, rows, described)
    csv_path, markdown_path = out.parent / f"{out.name}.csv", out.parent / f"{out.name}.md"
    atomic_write_text(csv_path, csv_text(columns, rows))
    atomic_write_text(markdown_path, markdown)
    print(markdown)
    return csv_path, markdown_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        csv_path, markdown_path = run(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no table was written", file=sys.stderr)
        return 130
    print(f"wrote {markdown_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
