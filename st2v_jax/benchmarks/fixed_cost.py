"""Fixed cost at any length, as table rows:

* compile: whole-video mode's `lax.scan` over all chunks, lowered and compiled for each
  length (the program must not grow with the number of chunks);
* memory: a full `python -m st2v_jax.sample` run of streaming mode per length in a fresh
  process, its peak resident memory (frames are written as they come, so it must stay flat).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from st2v_jax.benchmarks.report import Row, growth
from st2v_jax.generation.pipeline import StreamingT2VPipeline, streaming_chunks
from st2v_jax.generation.sampler import SamplingSettings, make_chunk_step, sample_scan, streaming_constants
from st2v_jax.pretrained import load_pretrained

# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's resident size into the child's
# ru_maxrss at exec, so a large benchmark process would hide the sampler's own peak.
_PEAK_RSS_OF_SAMPLE = """
import runpy, sys
sys.argv = ["st2v_jax.sample"] + sys.argv[1:]
try:
    runpy.run_module("st2v_jax.sample", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print("PEAK_RSS_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def compile_seconds(model_dir: str, num_frames: int, steps: int) -> float:
    """Seconds to lower and compile whole-video mode's scan over a `num_frames` video."""
    pipe = StreamingT2VPipeline.from_pretrained(model_dir, checksums=False)
    h, w = pipe.default_resolution()
    settings = SamplingSettings(num_frames=num_frames, steps=steps, init_steps=steps, height=h, width=w)
    n = pipe.num_chunks(num_frames)
    ids, _ = pipe.tokenize(["a red circle"])
    text = pipe.encode_text(ids)
    constants = streaming_constants(pipe, pipe.null_anchor_embedding(1), text)
    cond = jnp.zeros((1, pipe.cam_frames, h, w, 3))
    step = make_chunk_step(pipe, settings)
    scan = jax.jit(lambda p, c, cf, idx, texts: sample_scan(step, p, c, cf, idx, texts))
    start = time.perf_counter()
    scan.lower(pipe.params, constants, cond, jnp.arange(1, n + 1), jnp.stack([text] * n)).compile()
    return time.perf_counter() - start


def streaming_peak_rss_gib(model_dir: str, num_frames: int, steps: int) -> tuple[float, float]:
    """(peak resident GiB, wall seconds) of a streaming-mode `sample` run in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_OF_SAMPLE, "--model-dir", model_dir, "--prompt", "a red circle",
             "--num-frames", str(num_frames), "--steps", str(steps), "--init-steps", str(steps), "--out", f"{tmp}/v.mp4",
             "--skip-checksums"],
            check=True, capture_output=True, text=True,
            # An empty compilation cache: every length compiles the same programs, whatever
            # earlier runs left in the sampler's persistent cache.
            env={**os.environ, "JAX_COMPILATION_CACHE_DIR": f"{tmp}/jax_cache"},
        )
        peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
        return peak_kb / 2**20, time.perf_counter() - start


COMPILE_TARGET = "target: flat within 15%"
RSS_TARGET = "target: growth <= 10%"


def check_lengths(model_dir: str | os.PathLike, chunk_counts: Sequence[int], rss_frames: Sequence[int]) -> tuple[int, int]:
    """The model's (frames per chunk, new frames per chunk); a ValueError for a chunk count
    below 1 or a frame count the model cannot make (naming the nearest valid ones)."""
    if any(n < 1 for n in chunk_counts):
        raise ValueError(f"chunk counts must be >= 1, got {list(chunk_counts)}")
    streaming = load_pretrained(model_dir, checksums=False).config("streaming")
    frames_per_chunk, new_frames = streaming.num_frames, streaming.num_frames - streaming.cam_frames
    for frames in rss_frames:
        streaming_chunks(frames, frames_per_chunk, new_frames)
    return frames_per_chunk, new_frames


def fixed_cost_rows(model_dir: str | os.PathLike, chunk_counts: Sequence[int], rss_frames: Sequence[int], steps: int) -> list[Row]:
    """`chunk_counts` are streaming chunks after the first one (the length of the scan)."""
    frames_per_chunk, new_frames = check_lengths(model_dir, chunk_counts, rss_frames)
    model = pathlib.Path(model_dir).name
    rows = []
    compiles = []
    for n in chunk_counts:
        compiles.append(compile_seconds(str(model_dir), frames_per_chunk + new_frames * n, steps))
        rows.append(Row("long video", "whole-video (lax.scan) compile (s)", f"{n} chunks, {model}", f"{compiles[-1]:.1f}"))
    rows[-1] = dataclasses.replace(rows[-1], ratio=f"{growth(compiles)} (max vs first)", check=COMPILE_TARGET)
    peaks = []
    for frames in rss_frames:
        peak, wall = streaming_peak_rss_gib(str(model_dir), frames, steps)
        peaks.append(peak)
        rows.append(Row("long video", "streaming-mode peak RSS (GiB)", f"{frames} frames, {model}, {steps} steps", f"{peak:.3f}",
                        check=f"`sample` run {wall:.0f} s"))
    rows[-1] = dataclasses.replace(rows[-1], ratio=f"{growth(peaks)} (max vs first)", check=f"{rows[-1].check}; {RSS_TARGET}")
    return rows

