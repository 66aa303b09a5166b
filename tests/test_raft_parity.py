"""RAFT-large (Flax) vs torchvision's `raft_large(weights=None)` with random weights, fp32, CPU.

The oracle is torchvision's own RAFT code. PyPI's torchvision wheels are built against CUDA
torch: next to the CPU torch of the test environment, `import torchvision` fails while
registering its C++ operators, and an installed broken torchvision also breaks
transformers' CLIP imports. So torchvision is installed into a side folder that is not on
sys.path,

    pip install --no-deps --target .test_oracles torchvision==0.28.0

and `raft_large` is imported from there without running `torchvision/__init__.py` (RAFT
needs only pure-torch code): a bare `torchvision` package is registered for the import and
every `torchvision*` module is removed from sys.modules afterwards, so that nothing else in
the process sees it. A working torchvision on sys.path (one built for the installed torch)
is used as is. `ST2V_TORCHVISION_DIR` overrides the side folder.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from st2v_jax.convert.mapping import ConversionError  # noqa: E402
from st2v_jax.convert.raft import convert_raft_state_dict, load_raft_params  # noqa: E402
from st2v_jax.metrics.raft import RAFT  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCHVISION_DIR = pathlib.Path(os.environ.get("ST2V_TORCHVISION_DIR", REPO / ".test_oracles"))
INSTALL_HINT = f"pip install --no-deps --target {TORCHVISION_DIR} torchvision==0.28.0"
RAFT_MODULE = "torchvision.models.optical_flow.raft"
# Errors relative to the reference flow's standard deviation.
RELATIVE_TOLERANCE = 1e-4


def _forget_torchvision() -> None:
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]


def _raft_from_installed_torchvision() -> types.ModuleType | None:
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module(RAFT_MODULE)
    except Exception:  # a CUDA-built wheel next to CPU torch fails with RuntimeError/OSError
        _forget_torchvision()
        return None


def _raft_from_side_folder() -> types.ModuleType:
    spec = importlib.machinery.PathFinder.find_spec("torchvision", [str(TORCHVISION_DIR)])
    if spec is None:
        pytest.skip(f"torchvision (the RAFT oracle) is not installed; run: {INSTALL_HINT}")
    # A module made from the spec but never executed: the package without its __init__.
    sys.modules["torchvision"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(RAFT_MODULE)
    finally:
        _forget_torchvision()


@pytest.fixture(scope="module")
def torchvision_raft() -> types.ModuleType:
    """torchvision.models.optical_flow.raft."""
    return _raft_from_installed_torchvision() or _raft_from_side_folder()


@pytest.fixture(scope="module")
def reference(torchvision_raft):
    """raft_large with random weights; the frozen batch norms get non-trivial statistics."""
    torch.manual_seed(0)
    model = torchvision_raft.raft_large(weights=None, progress=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


def _state_dict(model) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


def _image_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image in [-1, 1] and the same image moved by (3, -2) pixels."""
    rng = np.random.RandomState(0)
    coarse = rng.uniform(-1, 1, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    big = np.kron(coarse, np.ones((8, 8, 1), np.float32))[: height + 8, : width + 8]
    big = (big + np.roll(big, 4, 0) + np.roll(big, 4, 1) + np.roll(big, (4, 4), (0, 1))) / 4
    return big[4 : 4 + height, 4 : 4 + width], big[6 : 6 + height, 1 : 1 + width]


def test_raft_matches_torchvision(reference):
    height, width, updates = 128, 160, 4  # non-square: a swapped x/y shows up
    image1, image2 = _image_pair(height, width)
    with torch.no_grad():
        to_torch = lambda image: torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
        want = reference(to_torch(image1), to_torch(image2), num_flow_updates=updates)[-1][0].numpy().transpose(1, 2, 0)
    # convert_state_dict refuses any unmapped, missing or mis-shaped tensor.
    params = convert_raft_state_dict(_state_dict(reference))
    got = jax.jit(RAFT(num_flow_updates=updates).apply)({"params": params}, image1[None], image2[None])[0]
    err, scale = float(np.abs(np.asarray(got) - want).max()), float(want.std())
    print(f"\nRAFT parity ({updates} updates, {height}x{width}): max abs err {err:.2e} px, flow std {scale:.3f} px, "
          f"max |flow| {np.abs(want).max():.3f} px, relative {err / scale:.1e}")
    assert got.shape == (height, width, 2)
    assert err <= RELATIVE_TOLERANCE * scale


def test_consecutive_flows_equal_pairwise_flows(reference):
    """Encoding each frame once gives the same flows as running every pair on its own."""
    params = convert_raft_state_dict(_state_dict(reference))
    image1, image2 = _image_pair(128, 128)
    frames = jnp.stack([image1, image2, image1])
    model = RAFT(num_flow_updates=2)
    consecutive = model.apply({"params": params}, frames, method=RAFT.consecutive_flows)
    pairwise = model.apply({"params": params}, frames[:-1], frames[1:])
    np.testing.assert_allclose(np.asarray(consecutive), np.asarray(pairwise), atol=1e-4)


def test_weight_file_round_trip(reference, tmp_path):
    """A torch.save'd raft_large state dict (torchvision's .pth format) loads through our reader."""
    path = tmp_path / "raft_large.pth"
    torch.save(reference.state_dict(), path)
    params = load_raft_params(path)
    kernel = params["update_block"]["recurrent_block"]["convgru1"]["convz"]["kernel"]
    torch_weight = reference.update_block.recurrent_block.convgru1.convz.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(kernel), torch_weight.transpose(2, 3, 1, 0))


def test_conversion_refuses_raft_small(torchvision_raft):
    with pytest.raises(ConversionError, match="mis-shaped|unmapped|missing"):
        convert_raft_state_dict(_state_dict(torchvision_raft.raft_small(weights=None, progress=False)))


def test_raft_refuses_images_it_cannot_take():
    with pytest.raises(ValueError, match="multiples of 8 and at least 128"):
        RAFT().init(jax.random.key(0), jnp.zeros((1, 120, 128, 3)), jnp.zeros((1, 120, 128, 3)))
