"""What every section of `python -m st2v_jax.benchmarks` shares: the table rows, timing, the
thread count, and the tiny random model the long-video and refiner sections run."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_random.py"
COLUMNS = ("section", "measurement", "config", "st2v_jax", "reference", "ratio / growth", "check")


@dataclasses.dataclass(frozen=True)
class Row:
    section: str
    measurement: str
    config: str
    st2v_jax: str
    reference: str = ""
    ratio: str = ""
    check: str = ""


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(dataclasses.astuple(row)) + " |" for row in rows]
    return "\n".join(lines)


def growth(values: Sequence[float]) -> str:
    """Largest value over the first, as a percentage change."""
    return f"{100 * (max(values) / values[0] - 1):+.0f}%"


def median_seconds(call: Callable[[], Any], runs: int) -> float:
    """Median wall time of `runs` calls, each waited for (JAX dispatches asynchronously)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def use_threads(threads: int) -> None:
    """Pins this process to its first `threads` CPUs, before JAX starts its CPU client: XLA
    sizes its thread pools by the CPUs the process may run on. Torch gets the same count."""
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(allowed):
        raise ValueError(f"--threads must be between 1 and the {len(allowed)} CPUs this process may use, got {threads}")
    os.sched_setaffinity(0, allowed[:threads])
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def make_tiny_model(out: pathlib.Path) -> pathlib.Path:
    """configs/tiny_random.py with random weights, converted into `out` (the tests' tiny model)."""
    from st2v_jax.convert.__main__ import main as convert_cli

    if not TINY_CONFIG.is_file():
        raise FileNotFoundError(f"{TINY_CONFIG} is missing (it ships with the repository, not the package); pass --model-dir")
    if convert_cli(["random", "--config", str(TINY_CONFIG), "--out", str(out)]) != 0:
        raise RuntimeError(f"could not write the tiny random model to {out}")
    return out
