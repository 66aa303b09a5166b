"""Fixed cost at any length: compile time of whole-video mode and peak memory of streaming mode.

    python -m st2v_jax.benchmarks.long_video --model-dir ckpt/tiny-random --frames 80 1200

* compile: `lax.scan` over all chunks, lowered and compiled for each length (the program
  must not grow with the number of chunks);
* memory: a full `python -m st2v_jax.sample` run per length in a fresh process, its peak
  resident memory (streaming mode writes frames as they come, so it must stay flat).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

_PEAK_RSS_OF_SAMPLE = """
import resource, runpy, sys
sys.argv = ["st2v_jax.sample"] + sys.argv[1:]
try:
    runpy.run_module("st2v_jax.sample", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def compile_seconds(model_dir: str, num_frames: int, steps: int) -> float:
    from st2v_jax.generation.pipeline import StreamingT2VPipeline
    from st2v_jax.generation.sampler import SamplingSettings, make_chunk_step, sample_scan, streaming_constants

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
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_OF_SAMPLE, "--model-dir", model_dir, "--prompt", "a red circle",
             "--num-frames", str(num_frames), "--steps", str(steps), "--init-steps", str(steps), "--out", f"{tmp}/v.mp4",
             "--skip-checksums"],
            check=True, capture_output=True, text=True,
        )
        peak_kb = int(result.stdout.split("PEAK_RSS_KB")[-1].split()[0])
        return peak_kb / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--frames", type=int, nargs="+", default=[80, 1200])
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per chunk (the program size does not depend on it)")
    args = parser.parse_args()
    rows = []
    for frames in args.frames:
        compile_s = compile_seconds(args.model_dir, frames, args.steps)
        rss, wall = streaming_peak_rss_gib(args.model_dir, frames, args.steps)
        rows.append({"frames": frames, "compile_s": compile_s, "stream_peak_rss_gib": rss, "stream_wall_s": wall})
    print("| frames | whole-video compile (s) | streaming peak RSS (GiB) | streaming wall (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['frames']} | {r['compile_s']:.1f} | {r['stream_peak_rss_gib']:.3f} | {r['stream_wall_s']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
