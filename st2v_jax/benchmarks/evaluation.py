"""Evaluation throughput: frames per second of each metric on synthetic videos.

    python -m st2v_jax.benchmarks.evaluation --frames 240 --size 256

The video is a diagonal pan over a smooth random texture. Weights are random (the speed does
not depend on their values): RAFT-large for MAWE, and for the CLIP score a CLIP of the chosen
architecture. Each metric runs once on a few frames first (compilation), then is timed on
the whole video.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from st2v_jax.convert.clip_model import CLIPModelConfigs
from st2v_jax.metrics.clip_score import CLIPScorer
from st2v_jax.metrics.mawe import RELEASE_SIZE, MAWEEvaluator, MAWESettings
from st2v_jax.metrics.raft import RAFT
from st2v_jax.metrics.scene_cuts import count_scene_cuts
from st2v_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, OpenCLIPVisionConfig, OpenCLIPVisionTransformer
from st2v_jax.tokenizer import load_tokenizer, write_byte_level_tokenizer

# The two usual CLIP-score models: openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14.
CLIP_ARCHITECTURES = {
    "ViT-B/32": CLIPModelConfigs(
        CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, hidden_act="quick_gelu", projection_dim=512),
        OpenCLIPVisionConfig(patch_size=32, width=768, layers=12, heads=12, output_dim=512, quick_gelu=True),
    ),
    "ViT-L/14": CLIPModelConfigs(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        OpenCLIPVisionConfig(patch_size=14, width=1024, layers=24, heads=16, output_dim=768, quick_gelu=True),
    ),
}


def synthetic_video(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 (frames, size, size, 3): a smooth random texture moving one pixel per frame diagonally."""
    extent = size + frames
    noise = jax.random.uniform(jax.random.key(seed), (extent // 16 + 2, extent // 16 + 2, 3), minval=0, maxval=255)
    texture = np.asarray(jax.image.resize(noise, (extent + 32, extent + 32, 3), "cubic")).clip(0, 255).astype(np.uint8)
    return np.stack([texture[t : t + size, t : t + size] for t in range(frames)])


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_mawe(video: np.ndarray, settings: MAWESettings) -> dict:
    image = jnp.zeros((1, 128, 128, 3))
    params = jax.jit(RAFT(num_flow_updates=1).init)(jax.random.key(0), image, image)["params"]
    evaluator = MAWEEvaluator(params, settings)
    warmup, _ = _timed(evaluator, video[: settings.pairs_per_batch + 1])
    seconds, _ = _timed(evaluator, video)
    size = settings.size or video.shape[1]
    return {"metric": "MAWE", "setting": f"RAFT-large {settings.num_flow_updates} updates at {size}x{size}, "
            f"{settings.pairs_per_batch} pairs per call", "warmup_s": warmup, "seconds": seconds}


def bench_scene_cuts(video: np.ndarray) -> dict:
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(str(path), video.shape[2:0:-1], fps=8, quality=8)
        writer.send(None)
        for frame in video:
            writer.send(frame)
        writer.close()
        warmup, _ = _timed(count_scene_cuts, path)
        seconds, _ = _timed(count_scene_cuts, path)
    return {"metric": "SCuts", "setting": "AdaptiveDetector, mp4 decoding included", "warmup_s": warmup, "seconds": seconds}


def bench_clip(video: np.ndarray, architecture: str, batch_size: int) -> dict:
    configs = CLIP_ARCHITECTURES[architecture]
    ids = jnp.zeros((1, configs.text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, configs.vision.image_size, configs.vision.image_size, 3))
    key = jax.random.key(0)
    params = {
        "text": jax.jit(CLIPTextTransformer(configs.text).init)(key, ids)["params"],
        "vision": jax.jit(OpenCLIPVisionTransformer(configs.vision).init)(key, pixels)["params"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_byte_level_tokenizer(tmp))
    scorer = CLIPScorer(configs, params, tokenizer, f"random {architecture}", batch_size=batch_size)
    prompt = "a camel resting on the snow field"
    warmup, _ = _timed(scorer, video[:batch_size], prompt)
    seconds, _ = _timed(scorer, video, prompt)
    return {"metric": "CLIP score", "setting": f"{architecture}, {batch_size} frames per call", "warmup_s": warmup, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--size", type=int, default=256, help="frame height and width of the synthetic video")
    parser.add_argument("--metrics", default="mawe,scuts,clip")
    parser.add_argument("--mawe-size", type=int, default=RELEASE_SIZE, help="0: flow at the video's own size")
    parser.add_argument("--flow-updates", type=int, default=12)
    parser.add_argument("--pairs-per-batch", type=int, default=4)
    parser.add_argument("--clip-architecture", choices=sorted(CLIP_ARCHITECTURES), default="ViT-L/14")
    parser.add_argument("--clip-batch-size", type=int, default=16)
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    video = synthetic_video(args.frames, args.size)
    rows = []
    if "mawe" in metrics:
        settings = MAWESettings(size=args.mawe_size or None, num_flow_updates=args.flow_updates, pairs_per_batch=args.pairs_per_batch)
        rows.append(bench_mawe(video, settings))
    if "scuts" in metrics:
        rows.append(bench_scene_cuts(video))
    if "clip" in metrics:
        rows.append(bench_clip(video, args.clip_architecture, args.clip_batch_size))
    print(f"{args.frames} frames of {args.size}x{args.size}, {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print("| metric | setting | first call, compile included (s) | whole video (s) | frames/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["frames_per_s"] = args.frames / r["seconds"]
        print(f"| {r['metric']} | {r['setting']} | {r['warmup_s']:.1f} | {r['seconds']:.1f} | {r['frames_per_s']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
