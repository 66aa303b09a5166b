"""`python -m st2v_jax.evaluate_shapes`: the shapes-domain evaluation of a model (st2v-shapes-tiny).

  python -m st2v_jax.evaluate_shapes --out shapes_eval.md   # the embedded model; --model-dir DIR for another

Generates a video for each evaluation prompt (default: the 54 of
`shapes.evaluation_prompts()`, combinations never seen in training) in each variant (the
full model, CAM off, APM off) and scores it from what the analytic shape detector sees:
(a) first-chunk adherence, (b) frames showing the prompt's shapes, (c) motion and
border jumps, (d) the ablations against the full model (`st2v_jax.metrics.shapes_eval`).
Writes the markdown table to --out (and stdout) and one CSV row per video beside it
(--out with .csv).

Sampling follows the model folder's sampling.json where it has one (keys of
SamplingSettings), else SamplingSettings' defaults at the model's resolution; the flags
below override it. Batch b of --batch-size prompts is sampled with seed --seed + b in every
variant. Every check that can fail runs before the model is loaded.
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
from st2v_jax.data import shapes
from st2v_jax.embedded import EMBEDDED_MODEL_DIR
from st2v_jax.generation.pipeline import ModelLayoutError, StreamingT2VPipeline, streaming_chunks
from st2v_jax.generation.sampler import SamplingSettings
from st2v_jax.metrics import shapes_eval

_CHUNK_LAYOUT = shapes_eval.ChunkLayout()  # 16 + 8n frames, checked against the model once loaded


class UsageError(ValueError):
    """Bad command-line input; reported without a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m st2v_jax.evaluate_shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir", default=str(EMBEDDED_MODEL_DIR), help="a converted st2v_jax model folder of the shapes domain (default: the embedded st2v-shapes-tiny)"
    )
    count = len(shapes.evaluation_prompts())
    p.add_argument("--prompts", type=int, default=count, help=f"evaluate the first N of the {count} evaluation prompts (default: all)")
    p.add_argument("--frames", type=int, default=240, help="frames per video: 16 + 8*n (default 240)")
    p.add_argument("--variants", default=",".join(shapes_eval.VARIANTS), help=f"comma-separated subset of {','.join(shapes_eval.VARIANTS)}")
    p.add_argument("--steps", type=int, help="DDIM steps per streaming chunk (default: sampling.json, else 50)")
    p.add_argument("--init-steps", type=int, help="DPM-Solver++ steps of the first chunk (default: sampling.json, else 50)")
    p.add_argument("--seed", type=int, help="seed of the first batch; batch b uses seed + b (default: sampling.json, else 0)")
    p.add_argument("--batch-size", type=int, default=count, help=f"videos sampled together (default {count}: one batch)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="shapes_eval.md", help="markdown table path; the per-video CSV goes beside it with .csv")
    return p


def _variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in shapes_eval.VARIANTS]
    if not variants or unknown:
        raise UsageError(f"--variants {text!r}: choose from {','.join(shapes_eval.VARIANTS)} (unknown: {unknown or 'none given'})")
    return [v for v in shapes_eval.VARIANTS if v in variants]


def _check_writable(path: pathlib.Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".st2v-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--out: cannot write to {path.parent} ({err.strerror or err})") from None


def _check_arguments(args: argparse.Namespace) -> tuple[list[str], list[str], dict, pathlib.Path]:
    """(prompts, variants, sampling overrides, markdown path), or a UsageError."""
    available = shapes.evaluation_prompts()
    if not 1 <= args.prompts <= len(available):
        raise UsageError(f"--prompts must be between 1 and {len(available)} (the evaluation prompts), got {args.prompts}")
    variants = _variants(args.variants)
    try:
        streaming_chunks(args.frames, _CHUNK_LAYOUT.first, _CHUNK_LAYOUT.new)
    except ValueError as err:
        raise UsageError(f"--frames: {err}") from None
    for flag, value in (("--steps", args.steps), ("--init-steps", args.init_steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    model_dir = pathlib.Path(args.model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"--model-dir {model_dir} is not a folder (expected a converted model, e.g. outputs/shapes/streaming/model)")
    try:
        sampling = shapes_eval.read_sampling_defaults(model_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    overrides = {"num_frames": args.frames, "steps": args.steps, "init_steps": args.init_steps, "seed": args.seed}
    sampling.update({key: value for key, value in overrides.items() if value is not None})
    out = pathlib.Path(args.out)
    if out.suffix.lower() == ".csv":
        raise UsageError(f"--out {out} is the markdown table (e.g. results.md); the CSV is written beside it")
    _check_writable(out)
    return available[: args.prompts], variants, sampling, out


def _settings(pipe: StreamingT2VPipeline, sampling: dict) -> SamplingSettings:
    height, width = pipe.default_resolution()
    settings = SamplingSettings(**{"height": height, "width": width, **sampling})
    try:
        pipe.num_chunks(settings.num_frames)
    except ValueError as err:
        raise UsageError(f"--frames: {err}") from None
    layout = shapes_eval.ChunkLayout(pipe.frames_per_chunk, pipe.new_frames_per_chunk)
    if layout != _CHUNK_LAYOUT:
        raise UsageError(f"the model makes chunks of {layout.first} + {layout.new}*n frames; this evaluation is defined for 16 + 8*n")
    return settings


def run(argv: Optional[Sequence[str]] = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Checks everything, generates and scores, writes the tables; returns (markdown, CSV) paths."""
    args = _parser().parse_args(argv)
    prompts, variants, sampling, out = _check_arguments(args)
    try:
        pipe = StreamingT2VPipeline.from_pretrained(args.model_dir)
    except (ModelLayoutError, FileNotFoundError, ValueError) as err:
        raise UsageError(f"--model-dir {args.model_dir}: {err}") from None
    settings = _settings(pipe, sampling)
    batches = len(shapes_eval.prompt_batches(prompts, args.batch_size))
    total = batches * shapes_eval.chunks_per_batch(pipe, settings, variants)
    with tqdm.tqdm(total=total, unit="chunk", desc="generating") as bar:

        def on_chunk(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update()

        results = shapes_eval.evaluate_model(
            pipe, prompts, settings, variants, args.batch_size, args.negative_prompt, on_chunk=on_chunk
        )
    described = {
        "model": str(pathlib.Path(args.model_dir).resolve()),
        "prompts": f"the first {len(prompts)} of shapes.evaluation_prompts() (never seen in training)",
        "videos": f"{settings.num_frames} frames of {settings.width}x{settings.height}",
        "sampling": (
            f"first chunk {settings.init_steps} DPM-Solver++ steps (guidance {settings.init_guidance}), streaming "
            f"{settings.steps} DDIM steps (guidance {settings.guidance}, eta {settings.eta}), negative prompt {args.negative_prompt!r}"
        ),
        "seeds": f"batches of {min(args.batch_size, len(prompts))} prompts, batch b seeded {settings.seed} + b, the same in every variant",
    }
    markdown = shapes_eval.markdown_report(results, described)
    csv_path = out.with_suffix(".csv")
    atomic_write_text(csv_path, shapes_eval.csv_text([video.row() for variant in results.values() for video in variant]))
    atomic_write_text(out, markdown)
    print(markdown)
    return out, csv_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        markdown_path, csv_path = run(argv)
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
