"""Test support: modelscope's own MS-Vid2Vid-XL modules (the PyTorch reference of the official
refiner), imported from the installed `modelscope` package without its package `__init__`s.

`import modelscope...` runs `modelscope/__init__.py`, which pulls the hub client and many
other dependencies that have nothing to do with the network. `vid2vid_module(name)` therefore
registers the packages on the way to `modelscope/models/multi_modal/video_to_video/` as bare
packages (made from their specs, never executed, so relative imports resolve) and imports
only the requested module file: `modules.unet_v2v`, `modules.autoencoder`, `modules.embedder`,
`utils.schedules_sdedit`, `utils.diffusion_sdedit`, `utils.solvers_sdedit`.

Module-level imports that cannot be satisfied on a CPU test machine get stand-ins, only while
importing and only if the real package is missing (the stand-ins are removed from
`sys.modules` again afterwards; the imported module keeps its reference):
  * `xformers.ops.memory_efficient_attention` (xformers has no CPU kernels, so it is ALWAYS
    replaced): softmax(q k^T / sqrt(K)) v over (B, M, K) inputs without bias, xformers'
    documented function, computed by `torch.nn.functional.scaled_dot_product_attention`;
  * `fairscale.nn.checkpoint.checkpoint_wrapper` (gradient checkpointing): the identity;
  * `rotary_embedding_torch.RotaryEmbedding`: only used with USE_TEMPORAL_TRANSFORMER=False,
    which MS-Vid2Vid-XL does not use;
  * `torchsde` (the Brownian-tree noise source of the SDE solver): the tests replace the noise
    sampler with fixed noise, so the tree is never built;
  * `torchvision.transforms` (embedder's image preprocessing, unused for text) and the
    `open_clip` package `__init__` (see open_clip_oracle.py).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator

import pytest
from open_clip_oracle import open_clip_transformer

_PACKAGE = "modelscope.models.multi_modal.video_to_video"
_PARENTS = (
    "modelscope",
    "modelscope.utils",
    "modelscope.models",
    "modelscope.models.multi_modal",
    _PACKAGE,
    _PACKAGE + ".modules",
    _PACKAGE + ".utils",
)


def _bare_package(name: str) -> None:
    """Registers package `name` from its spec without running its __init__."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("modelscope is not installed (pip install --no-deps modelscope); it is the MS-Vid2Vid-XL oracle")
    sys.modules[name] = importlib.util.module_from_spec(spec)


def _module(name: str, is_package: bool = False, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []
    module.__dict__.update(attributes)
    return module


def _memory_efficient_attention(q, k, v, attn_bias=None, op=None):
    import torch.nn.functional as F

    if attn_bias is not None:
        raise NotImplementedError("the MS-Vid2Vid-XL UNet never passes an attention bias")
    return F.scaled_dot_product_attention(q, k, v)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # a wheel built for another torch fails with more than ImportError
        return False
    return True


def _stand_ins() -> dict[str, types.ModuleType]:
    modules = {}
    ops = _module("xformers.ops", memory_efficient_attention=_memory_efficient_attention)
    modules.update({"xformers": _module("xformers", True, ops=ops), "xformers.ops": ops})
    if not _importable("fairscale.nn.checkpoint"):
        checkpoint = _module("fairscale.nn.checkpoint", checkpoint_wrapper=lambda module, *a, **k: module)
        nn_pkg = _module("fairscale.nn", True, checkpoint=checkpoint)
        modules.update({"fairscale": _module("fairscale", True, nn=nn_pkg), "fairscale.nn": nn_pkg,
                        "fairscale.nn.checkpoint": checkpoint})
    if not _importable("rotary_embedding_torch"):
        modules["rotary_embedding_torch"] = _module("rotary_embedding_torch", RotaryEmbedding=None)
    if not _importable("torchsde"):
        modules["torchsde"] = _module("torchsde", BrownianTree=None)
    if not _importable("torchvision.transforms"):
        transforms = _module("torchvision.transforms")
        modules.update({"torchvision": _module("torchvision", True, transforms=transforms),
                        "torchvision.transforms": transforms})
    return modules


@contextlib.contextmanager
def _temporarily(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    saved = {name: sys.modules[name] for name in modules if name in sys.modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def vid2vid_module(name: str) -> types.ModuleType:
    """`modelscope.models.multi_modal.video_to_video.<name>`, e.g. "modules.unet_v2v"; skips
    the calling test if modelscope is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    full = f"{_PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    for parent in _PARENTS:
        _bare_package(parent)
    if name == "modules.embedder":
        open_clip_transformer()  # registers the bare open_clip package that embedder imports
    with _temporarily(_stand_ins()):
        return importlib.import_module(full)
