"""Test support: open_clip's PyTorch `transformer` module as a reference oracle.

`import open_clip` runs `open_clip/__init__.py`, which imports `open_clip.utils`, which does
`from torchvision.ops.misc import FrozenBatchNorm2d` at module level. Our test environment
has the CPU build of torch, and PyPI's torchvision wheels are built against CUDA torch, so
torchvision cannot be installed next to it. The vision tower itself never touches
torchvision (FrozenBatchNorm2d only serves `freeze_batch_norm_2d`, for ResNet towers).

`open_clip_transformer()` therefore imports `open_clip.transformer` without running the
package `__init__`: it registers a bare `open_clip` package (its `__path__` pointing at the
installed files, so relative imports resolve) and, only while importing and only if the
real torchvision cannot be imported, a stub `torchvision.ops.misc` whose
`FrozenBatchNorm2d` is an empty class. The stub is removed again afterwards so that nothing
else in the process mistakes it for torchvision. The bare `open_clip` package stays
registered: `open_clip.transformer` belongs to it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types

import pytest

_TORCHVISION_STUB_MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.misc")


def _open_clip_spec() -> importlib.machinery.ModuleSpec:
    """open_clip's import spec, found without importing it; skips the calling test if absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-clip-torch is not installed (pip install open-clip-torch); it is the vision-tower oracle")
    return spec


def open_clip_package_dir() -> pathlib.Path:
    """The installed open_clip package folder (model_configs/ lives there)."""
    return pathlib.Path(list(_open_clip_spec().submodule_search_locations)[0])


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.ops.misc")
    except Exception:  # a CUDA-built wheel next to CPU torch fails with RuntimeError/OSError, not only ImportError
        for name in _TORCHVISION_STUB_MODULES:
            sys.modules.pop(name, None)
        return False
    return True


def _stub_module(name: str, is_package: bool) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []
    return module


def _register_torchvision_stub() -> None:
    packages = {"torchvision": True, "torchvision.ops": True, "torchvision.ops.misc": False}
    modules = {name: _stub_module(name, is_package) for name, is_package in packages.items()}
    modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    modules["torchvision"].ops = modules["torchvision.ops"]
    modules["torchvision.ops"].misc = modules["torchvision.ops.misc"]
    sys.modules.update(modules)


def open_clip_transformer() -> types.ModuleType:
    """`open_clip.transformer` (VisionTransformer, QuickGELU, ...), imported without
    `open_clip/__init__.py`; skips the calling test if open-clip-torch is not installed."""
    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    spec = _open_clip_spec()
    if "open_clip" not in sys.modules:
        # A module made from the spec but never executed: the package without its __init__.
        sys.modules["open_clip"] = importlib.util.module_from_spec(spec)
    stubbed = not _torchvision_works()
    if stubbed:
        _register_torchvision_stub()
    try:
        return importlib.import_module("open_clip.transformer")
    finally:
        if stubbed:
            for name in _TORCHVISION_STUB_MODULES:
                sys.modules.pop(name, None)
