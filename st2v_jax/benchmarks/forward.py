"""Forward time of the UNet3D and of the streaming model (UNet3D + CAM + APM): st2v_jax, jitted,
against the PyTorch eager reference at the same config with the same random weights.

UNet3D reference: diffusers' `UNet3DConditionModel`. Streaming reference:
`torch_streaming.TorchStreamingUNet3D` (diffusers blocks in the official layout). Each
reference is built and randomised first; its state dict goes through the repository's key
mapping (`unet3d_mapping` / `streaming_mapping`), so the max abs difference of the outputs
also checks the conversion. Times are the median of `runs` calls after one warm-up call
(JAX's includes compilation and is reported apart). XLA's cost analysis of the compiled
program gives the FLOPs of one call, hence the achieved FLOP/s of both sides.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from st2v_jax.benchmarks.report import TINY_CONFIG, Row, median_seconds
from st2v_jax.config_files import load_config_file
from st2v_jax.convert.components import COMPONENTS
from st2v_jax.convert.mapping import KeyMapping, convert_state_dict
from st2v_jax.convert.official_configs import STREAMING_T2V
from st2v_jax.convert.streaming import streaming_mapping
from st2v_jax.convert.unet3d import unet3d_mapping
from st2v_jax.models.streaming import StreamingUNet3D

if TYPE_CHECKING:
    import torch

TIMESTEP = 321
# ms-1.7b at a fifth of its widths (320, 640, 1280, 1280): a quarter (80, ...) is not a multiple
# of the 32 GroupNorm groups nor of the 64-wide heads. Every other field is the official one.
MEDIUM_UNET = {**STREAMING_T2V["unet"], "block_out_channels": [64, 128, 256, 256]}


@dataclasses.dataclass(frozen=True)
class ForwardSize:
    """A model size: diffusers UNet3D config, streaming config ({"unet", "streaming"}) and input shape."""

    name: str
    unet: Mapping[str, Any]
    streaming: Mapping[str, Any]
    latent_size: int
    frames: int = 16

    def describe(self, batch: int) -> str:
        widths = ",".join(map(str, self.unet["block_out_channels"]))
        return f"{self.name}: widths ({widths}), {batch}x{self.frames}x{self.latent_size}x{self.latent_size} latents"


def forward_sizes() -> dict[str, ForwardSize]:
    """tiny: the tiny random model (configs/tiny_random.py); medium: `MEDIUM_UNET` with the
    official streaming fields at the release's 32x32 latents."""
    tiny = load_config_file(TINY_CONFIG).to_dict()
    return {
        "tiny": ForwardSize("tiny", tiny["unet"], tiny["streaming"], tiny["unet"]["sample_size"]),
        "medium": ForwardSize("medium", MEDIUM_UNET, {"unet": MEDIUM_UNET, "streaming": {}}, 32),
    }


@dataclasses.dataclass(frozen=True)
class ForwardResult:
    jax_seconds: float
    torch_seconds: float
    compile_seconds: float
    flops: float
    max_abs_diff: float
    output_std: float

    def rows(self, model: str, config: str) -> list[Row]:
        check = f"max abs diff {self.max_abs_diff:.1e} (output std {self.output_std:.2f})"
        gflops = self.flops / 1e9
        return [
            Row("forward", f"{model} forward (s)", config, f"{self.jax_seconds:.3f}", f"{self.torch_seconds:.3f} PyTorch eager",
                f"{self.jax_seconds / self.torch_seconds:.2f}x (target <= 0.7x)", check),
            Row("forward", f"{model} achieved GFLOP/s", config, f"{gflops / self.jax_seconds:.1f}", f"{gflops / self.torch_seconds:.1f}",
                "", f"{gflops:.1f} GFLOP per call (XLA cost analysis); compile and first call {self.compile_seconds:.1f} s"),
        ]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets on every parameter, so zero-initialised layers (temporal conv4, merger
    projections, APM gates) do real work."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def _channels_last(x: np.ndarray) -> np.ndarray:
    """(B, C, F, h, w) -> (B, F, h, w, C)."""
    return np.transpose(x, (0, 2, 3, 4, 1))


def _converted(reference: torch.nn.Module, mapping: KeyMapping, component: str, config: Mapping[str, Any]) -> Any:
    abstract = COMPONENTS[component].abstract_params(COMPONENTS[component].parse_config(config))
    return convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, mapping, abstract)


def _compare(
    torch_call: Callable[[], torch.Tensor], jax_apply: Callable, params: Any, jax_inputs: tuple, runs: int
) -> ForwardResult:
    import torch

    start = time.perf_counter()
    compiled = jax.jit(jax_apply).lower(params, *jax_inputs).compile()
    jax_call = lambda: compiled(params, *jax_inputs)
    got = np.asarray(jax_call())
    compile_seconds = time.perf_counter() - start
    with torch.inference_mode():
        want = _channels_last(torch_call().numpy())
        torch_seconds = median_seconds(torch_call, runs)
    return ForwardResult(
        jax_seconds=median_seconds(jax_call, runs),
        torch_seconds=torch_seconds,
        compile_seconds=compile_seconds,
        flops=compiled.cost_analysis()["flops"],
        max_abs_diff=float(np.abs(got - want).max()),
        output_std=float(want.std()),
    )


def unet3d_forward(size: ForwardSize, batch: int, runs: int, seed: int = 0) -> ForwardResult:
    """diffusers UNet3DConditionModel vs `UNet3D` on the same random weights and inputs."""
    import torch
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    reference = _randomised(UNet3DConditionModel.from_config(dict(size.unet)), seed)
    params = _converted(reference, unet3d_mapping(), "unet", size.unet)
    module = COMPONENTS["unet"].build(COMPONENTS["unet"].parse_config(size.unet))
    rng = np.random.RandomState(seed)
    latents = rng.randn(batch, size.unet["in_channels"], size.frames, size.latent_size, size.latent_size).astype(np.float32)
    context = rng.randn(batch, 77, size.unet["cross_attention_dim"]).astype(np.float32)
    torch_inputs = (torch.from_numpy(latents), torch.tensor(TIMESTEP), torch.from_numpy(context))
    jax_inputs = (jnp.asarray(_channels_last(latents)), jnp.asarray(TIMESTEP), jnp.asarray(context))
    torch_call = lambda: reference(*torch_inputs, return_dict=False)[0]
    return _compare(torch_call, lambda p, *x: module.apply({"params": p}, *x), params, jax_inputs, runs)


def streaming_forward(size: ForwardSize, batch: int, runs: int, seed: int = 0) -> ForwardResult:
    """`TorchStreamingUNet3D` vs `StreamingUNet3D.predict` (CAM and APM on)."""
    import torch

    from st2v_jax.benchmarks.torch_streaming import TorchStreamingUNet3D

    config = COMPONENTS["streaming"].parse_config(size.streaming)
    torch.manual_seed(seed)
    reference = _randomised(TorchStreamingUNet3D(size.unet, config), seed)
    params = _converted(reference, streaming_mapping(), "streaming", size.streaming)
    module = StreamingUNet3D(config)
    pixels = size.latent_size * 2 ** (len(config.cam_conditioning_widths) - 1)
    rng = np.random.RandomState(seed)
    latents = rng.randn(batch, config.unet.in_channels, size.frames, size.latent_size, size.latent_size).astype(np.float32)
    text = rng.randn(batch, config.text_tokens, config.unet.cross_attention_dim).astype(np.float32)
    image_embeds = rng.randn(batch, 1, config.image_embed_dim).astype(np.float32)
    cond_frames = rng.uniform(-1, 1, (batch, config.cam_frames, 3, pixels, pixels)).astype(np.float32)
    torch_inputs = tuple(map(torch.from_numpy, (latents, np.asarray(TIMESTEP), text, image_embeds, cond_frames)))
    jax_inputs = (
        jnp.asarray(_channels_last(latents)),
        jnp.asarray(TIMESTEP),
        jnp.asarray(text),
        jnp.asarray(image_embeds),
        jnp.asarray(np.transpose(cond_frames, (0, 1, 3, 4, 2))),
    )
    apply = lambda p, *x: module.apply({"params": p}, *x, method=StreamingUNet3D.predict)
    return _compare(lambda: reference(*torch_inputs), apply, params, jax_inputs, runs)


def forward_rows(sizes: list[str], batch: int, runs: int) -> list[Row]:
    available = forward_sizes()
    rows = []
    for name in sizes:
        size = available[name]
        rows += unet3d_forward(size, batch, runs).rows("UNet3D", size.describe(batch))
        rows += streaming_forward(size, batch, runs).rows("streaming (UNet3D + CAM + APM)", size.describe(batch))
    return rows
