"""FLOPs of the full-size networks per call, from XLA's cost analysis of the lowered program
(abstract parameters: nothing is allocated or compiled), and a PROJECTION of the time of a
240-frame video on accelerators, assuming they sustain `ASSUMED_UTILISATION` of their peak.

The workload is the release's (`SamplingSettings`, `Vid2VidRefinerConfig` defaults):
preview 256x256 = first chunk (base UNet3D, DPM-Solver++ 50 steps) + 28 streaming chunks
(UNet3D + CAM + APM, DDIM 50 steps), both with two guidance branches, and VAE decoding of
every frame; final = preview + MS-Vid2Vid-XL refinement on the 1280x720 canvas (VAE encode,
30 steps over 24-frame chunks overlapping by 8, two guidance branches, VAE decode). Text
and image encoders run once per video and are left out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.benchmarks.report import Row
from st2v_jax.convert.components import COMPONENTS
from st2v_jax.convert.official_configs import MS_1_7B_VAE, MS_VID2VID_XL_UNET
from st2v_jax.generation.pipeline import streaming_chunks
from st2v_jax.generation.refiner import chunk_starts
from st2v_jax.generation.sampler import SamplingSettings
from st2v_jax.generation.vid2vid_refiner import Vid2VidRefinerConfig
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D
from st2v_jax.models.vae import AutoencoderKL

# Peak dense bfloat16 throughput per chip, as the vendors publish it.
TPU_V5E_PEAK_FLOPS = 197e12  # Google Cloud TPU v5e documentation (system architecture): 197 TFLOP/s bf16 per chip
TPU_V6E_PEAK_FLOPS = 918e12  # Google Cloud TPU v6e (Trillium) documentation: 918 TFLOP/s bf16 per chip
H100_PEAK_FLOPS = 989e12  # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense (1,979 is with 2:4 sparsity)
A100_PEAK_FLOPS = 312e12  # NVIDIA A100 datasheet: 312 TFLOP/s bf16 / fp16 dense, for what the official timings imply
ACCELERATORS = {"TPU v5e-8": 8 * TPU_V5E_PEAK_FLOPS, "TPU v6e-8": 8 * TPU_V6E_PEAK_FLOPS, "1x H100": H100_PEAK_FLOPS}
ASSUMED_UTILISATION = 0.4
# REFERENCE.md section 7: the authors' timings on one A100-80GB for 240 frames.
OFFICIAL_A100_SECONDS = {"preview": 340.0, "final": 1610.0}

VIDEO_FRAMES = 240
GUIDANCE_BRANCHES = 2  # the release's one-weight classifier-free guidance, everywhere
PREVIEW_SIZE = 256
LATENT_SIZE = PREVIEW_SIZE // 8


def _shape(*dims: int, dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(dims, dtype)


def lowered_flops(component: str, config: Any, inputs: tuple, method: Optional[Any] = None) -> float:
    """FLOPs of one call of `component` (full-size params as shapes only) on `inputs`."""
    module = COMPONENTS[component].build(config)
    params = nn.unbox(COMPONENTS[component].abstract_params(config))
    apply = lambda p, *x: module.apply({"params": p}, *x, method=method)
    return float(jax.jit(apply).lower(params, *inputs).cost_analysis()["flops"])


@dataclasses.dataclass(frozen=True)
class CallCount:
    name: str
    flops_per_call: float
    calls: int


def workload() -> dict[str, list[CallCount]]:
    """{"preview": ..., "refine": ...}: every network call of a 240-frame release video."""
    sampling, refiner = SamplingSettings(num_frames=VIDEO_FRAMES), Vid2VidRefinerConfig()
    streaming = StreamingConfig()
    batch, f = GUIDANCE_BRANCHES, streaming.num_frames
    chunks = streaming_chunks(VIDEO_FRAMES, f, f - streaming.cam_frames)
    text = _shape(batch, streaming.text_tokens, streaming.unet.cross_attention_dim)
    latents = _shape(batch, f, LATENT_SIZE, LATENT_SIZE, 4)
    t = _shape(dtype=jnp.int32)
    vae = COMPONENTS["vae"].parse_config(MS_1_7B_VAE)
    canvas = (refiner.canvas_height // 8, refiner.canvas_width // 8)
    vid2vid = COMPONENTS["vid2vid_unet"].parse_config(MS_VID2VID_XL_UNET)
    refine_chunks = len(chunk_starts(VIDEO_FRAMES, refiner.chunk, refiner.overlap))
    streaming_inputs = (latents, t, text, _shape(batch, 1, streaming.image_embed_dim), _shape(batch, streaming.cam_frames, PREVIEW_SIZE, PREVIEW_SIZE, 3))
    return {
        "preview": [
            CallCount(f"base UNet3D, {batch}x{f}x{LATENT_SIZE}x{LATENT_SIZE}", lowered_flops("unet", streaming.unet, (latents, t, text)), sampling.init_steps),
            CallCount(f"streaming UNet3D + CAM + APM, {batch}x{f}x{LATENT_SIZE}x{LATENT_SIZE}",
                      lowered_flops("streaming", streaming, streaming_inputs, StreamingUNet3D.predict), chunks * sampling.steps),
            CallCount(f"VAE decode, 1 frame {PREVIEW_SIZE}x{PREVIEW_SIZE}", lowered_flops("vae", vae, (_shape(1, LATENT_SIZE, LATENT_SIZE, 4),), AutoencoderKL.decode), VIDEO_FRAMES),
        ],
        "refine": [
            CallCount(f"VAE encode, 1 frame {refiner.canvas_width}x{refiner.canvas_height}",
                      lowered_flops("vae", vae, (_shape(1, refiner.canvas_height, refiner.canvas_width, 3),), AutoencoderKL.encode), VIDEO_FRAMES),
            CallCount(f"MS-Vid2Vid-XL UNet, {batch}x{refiner.chunk}x{canvas[0]}x{canvas[1]}",
                      lowered_flops("vid2vid_unet", vid2vid, (_shape(batch, refiner.chunk, *canvas, 4), t, _shape(batch, 77, 1024))), refine_chunks * refiner.num_steps),
            CallCount(f"VAE decode, 1 frame {refiner.canvas_width}x{refiner.canvas_height}",
                      lowered_flops("vae", vae, (_shape(1, *canvas, 4),), AutoencoderKL.decode), VIDEO_FRAMES),
        ],
    }


def flops_rows(stages: Optional[dict[str, list[CallCount]]] = None) -> list[Row]:
    """FLOPs per call of every network, then the projected time of the preview and of the
    final video; `stages` ({"preview": ..., "refine": ...}) default to `workload()`."""
    stages = workload() if stages is None else stages
    rows = [
        Row("FLOPs", "TFLOP per call", call.name, f"{call.flops_per_call / 1e12:.2f}", check=f"{call.calls} calls per {VIDEO_FRAMES}-frame video")
        for calls in stages.values()
        for call in calls
    ]
    totals = {stage: sum(c.flops_per_call * c.calls for c in calls) for stage, calls in stages.items()}
    totals = {"preview": totals["preview"], "final": totals["preview"] + totals["refine"]}
    label = {"preview": f"{VIDEO_FRAMES} frames, preview {PREVIEW_SIZE}x{PREVIEW_SIZE}", "final": f"{VIDEO_FRAMES} frames, final (preview + 720p refine)"}
    for stage, total in totals.items():
        official = OFFICIAL_A100_SECONDS[stage]
        implied = total / official / A100_PEAK_FLOPS
        for accelerator, peak in ACCELERATORS.items():
            seconds = total / (peak * ASSUMED_UTILISATION)
            rows.append(Row("PROJECTION", f"{accelerator} at {ASSUMED_UTILISATION:.0%} of peak bf16 (s)", label[stage], f"{seconds:.0f} (projected)",
                            f"{official:.0f} official A100 (= {implied:.0%} of its peak)", f"{seconds / official:.2f}x", f"{total / 1e15:.1f} PFLOP (XLA cost analysis)"))
    return rows
