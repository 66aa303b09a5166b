"""How the models run: attention kernel, compute dtype and rematerialisation, chosen at run
time. No option changes a parameter, its name, its logical axes or a checkpoint: the same
weights load and train under every combination.

  attention      "xla"    jax.nn.dot_product_attention, XLA implementation (any platform)
                 "cudnn"  cuDNN's fused flash attention (NVIDIA GPU, bfloat16 only)
                 "splash" the Pallas TPU splash-attention kernel for the spatial
                          self-attentions (h*w tokens per frame, the only long sequences);
                          temporal attention (frames) and text cross-attention (77 tokens)
                          stay on XLA: they are shorter than one kernel tile
  compute_dtype  "float32" | "bfloat16": matmuls, convolutions and activations of the
                 modules that take these options (UNet3D, streaming model, CLIP towers,
                 MS-Vid2Vid UNet). Norm statistics and the softmax are float32 under both;
                 the VAE, schedules and solvers always run in float32, and model outputs
                 leave in float32.
  remat          "none" | "blocks": every resnet, temporal conv and transformer block (and
                 CLIP encoder layer) is recomputed in the backward pass instead of storing
                 its activations | "dots_saveable": the same blocks, keeping the matmul and
                 convolution outputs (recomputes only the cheap elementwise work)
  pallas_interpret  run the Pallas kernel in interpret mode: any platform, slow (tests)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_BACKENDS = ("xla", "cudnn", "splash")
COMPUTE_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "blocks", "dots_saveable")
_REMAT_POLICY = {"blocks": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}

ModuleClass = TypeVar("ModuleClass", bound=type)


class ExecutionOptionsError(ValueError):
    """Options that are invalid, or that this platform cannot run."""


@dataclasses.dataclass(frozen=True)
class ExecutionOptions:
    """Hashable, so modules carry it as a static attribute."""

    attention: str = "xla"
    compute_dtype: str = "float32"
    remat: str = "none"
    pallas_interpret: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r}; expected one of {choices}"
            for name, choices in (("attention", ATTENTION_BACKENDS), ("compute_dtype", COMPUTE_DTYPES), ("remat", REMAT_POLICIES))
            if getattr(self, name) not in choices
        ]
        if self.attention == "cudnn" and self.compute_dtype != "bfloat16":
            problems.append(
                "attention='cudnn' needs compute_dtype='bfloat16' (cuDNN's fused attention takes only 16-bit inputs); "
                "for float32 use attention='xla'"
            )
        if problems:
            raise ExecutionOptionsError("invalid execution options: " + "; ".join(problems))

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    def check_platform(self, platform: Optional[str] = None, devices: int = 1) -> None:
        """Refuses, before anything is loaded or compiled, what `platform` (default: JAX's
        default backend) cannot run on a mesh of `devices` devices."""
        platform = platform or jax.default_backend()
        if self.attention == "cudnn" and platform != "gpu":
            raise ExecutionOptionsError(f"attention='cudnn' needs an NVIDIA GPU (this host runs JAX on {platform}); use attention='xla'")
        if self.attention == "splash" and not self.pallas_interpret:
            if platform != "tpu":
                raise ExecutionOptionsError(
                    f"attention='splash' is a TPU kernel (this host runs JAX on {platform}); use attention='xla'"
                    + (" or, with bfloat16, attention='cudnn'" if platform == "gpu" else "")
                )
            if devices > 1:
                # XLA cannot partition a Mosaic kernel; it would need a shard_map per attention.
                raise ExecutionOptionsError(
                    f"attention='splash' runs on one device, not over a mesh of {devices} devices; "
                    "use attention='xla' with a mesh"
                )

    def block(self, cls: ModuleClass) -> ModuleClass:
        """`cls`, or `cls` recomputed in the backward pass under the remat policy (same
        parameters: flax's remat keeps the wrapped module's scope)."""
        return cls if self.remat == "none" else _remat_class(cls, self.remat)


DEFAULT_EXECUTION = ExecutionOptions()


@functools.lru_cache(maxsize=None)
def _remat_class(cls: type, remat: str) -> type:
    # One class per (block, policy): setup() runs at every apply and must not mint new classes.
    return nn.remat(cls, policy=_REMAT_POLICY[remat])


def inference_params(params: Any, execution: ExecutionOptions) -> Any:
    """Params as a sampler holds them for modules run with `execution`: with bfloat16 compute,
    matrices and kernels (ndim >= 2, nearly all the bytes) are cast once, halving the memory
    and the bytes each denoising step reads; vectors (biases, norm scales and shifts) and
    scalars stay float32. Training keeps float32 params and casts at apply time instead."""
    if execution.compute_dtype == "float32":
        return params
    cast = lambda x: x.astype(execution.dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 else x
    return jax.tree.map(cast, params)
