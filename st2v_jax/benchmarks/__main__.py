"""`python -m st2v_jax.benchmarks`: st2v_jax against the PyTorch reference on this machine, the
fixed costs of long videos, the refiner's chunk batching, and FLOPs with a projection to
accelerators, printed as one markdown table.

    python -m st2v_jax.benchmarks                                   # everything (long)
    python -m st2v_jax.benchmarks --sections forward --sizes tiny --runs 3   # a quick look

Sections:
  forward     UNet3D and streaming-model forward time, st2v_jax (jitted) vs PyTorch eager
              (diffusers), same weights, inputs and thread count; outputs compared
  fixed-cost  whole-video compile time over chunks, streaming-mode peak RSS over frames
  refiner     randomized-blending refiner: chunks batched vs lax.map vs a Python loop
  flops       full-size FLOPs per call (XLA cost analysis) and a projected 240-frame time
The fixed-cost and refiner sections run the tiny random model (configs/tiny_random.py),
made in a temporary folder unless --model-dir names one.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
from typing import Callable, Optional, Sequence

import jax

from st2v_jax.benchmarks.fixed_cost import check_lengths, fixed_cost_rows
from st2v_jax.benchmarks.flops import flops_rows
from st2v_jax.benchmarks.forward import forward_rows
from st2v_jax.benchmarks.refiner_chunks import refiner_rows
from st2v_jax.benchmarks.report import make_tiny_model, markdown_table, use_threads
from st2v_jax.cpu_kernels import prefer_eigen_kernels
from st2v_jax.generation.refiner import RefinerConfig, chunk_starts

SECTIONS = ("forward", "fixed-cost", "refiner", "flops")
SIZES = ("tiny", "medium")


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return names

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m st2v_jax.benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", type=_names(SECTIONS), default=list(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--sizes", type=_names(SIZES), default=list(SIZES), help="forward section: model sizes (default: tiny,medium)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per measurement, after one warm-up (median)")
    parser.add_argument("--batch", type=int, default=2, help="forward section: batch (2 = one guided call)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for XLA and torch (default: every CPU this process may use)")
    parser.add_argument("--model-dir", help="fixed-cost and refiner sections: a converted model folder (default: a fresh tiny random model)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 10, 50], help="fixed-cost: whole-video lengths in streaming chunks")
    parser.add_argument("--rss-frames", type=int, nargs="+", default=[80, 240, 1200], help="fixed-cost: streaming-mode video lengths in frames")
    parser.add_argument("--steps", type=int, default=2, help="fixed-cost: denoising steps per chunk")
    parser.add_argument("--refiner-frames", type=int, default=80, help="refiner: latent video length")
    parser.add_argument("--refiner-steps", type=int, default=10, help="refiner: DDIM schedule length (strength 0.6 runs 6 of 10)")
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("runs", "batch", "steps", "refiner_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model_dir and not pathlib.Path(args.model_dir).is_dir():
        parser.error(f"--model-dir {args.model_dir}: no such folder")
    if "refiner" in args.sections:
        try:
            chunk_starts(args.refiner_frames, RefinerConfig.chunk, RefinerConfig.overlap)
        except ValueError as err:
            parser.error(f"--refiner-frames: {err}")


def _machine(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    versions = f"jax {jax.__version__}"
    try:
        import diffusers
        import torch

        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {threads} threads for XLA and torch; {versions}; load average {os.getloadavg()[0]:.1f} at the start"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    try:
        use_threads(args.threads)  # before anything starts JAX's CPU client
    except ValueError as err:
        parser.error(str(err))
    prefer_eigen_kernels()
    header = _machine(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if {"fixed-cost", "refiner"} & set(args.sections) and model_dir is None:
            model_dir = make_tiny_model(pathlib.Path(scratch) / "tiny-random")
        if "fixed-cost" in args.sections:
            try:
                check_lengths(model_dir, args.chunks, args.rss_frames)
            except ValueError as err:
                parser.error(str(err))
        for section in args.sections:
            print(f"running {section} ...", file=sys.stderr, flush=True)
            if section == "forward":
                rows += forward_rows(args.sizes, args.batch, args.runs)
            elif section == "fixed-cost":
                rows += fixed_cost_rows(model_dir, args.chunks, args.rss_frames, args.steps)
            elif section == "refiner":
                rows += refiner_rows(model_dir, args.refiner_frames, args.refiner_steps, args.runs)
            else:
                rows += flops_rows()
    print(header)
    print()
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
