"""Weight files are read lazily and never run code; damaged files fail with a clear error."""
from __future__ import annotations

import collections
import os
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from st2v_jax.convert.readers import SafetensorsFile, UnsafeCheckpointError, WeightFileError, open_weight_file  # noqa: E402


def _tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "transposed": base.t(),  # non-contiguous view
        "sliced": base[1:3, ::2],  # offset + strides into a shared storage
        "empty": torch.zeros(0, 4),
    }


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_torch_zip_checkpoint_is_read_without_torch_semantics(tmp_path):
    tensors = _tensors()
    nested = {
        "state_dict": collections.OrderedDict(tensors),
        "param": torch.nn.Parameter(torch.ones(2)),
        "epoch": 7,
        "name": "run",
    }
    path = tmp_path / "model.ckpt"
    torch.save(nested, path)
    weights = open_weight_file(path)
    assert set(weights) == {f"state_dict.{k}" for k in tensors} | {"param"}
    for key, tensor in tensors.items():
        got = np.asarray(weights[f"state_dict.{key}"], dtype=np.float32 if tensor.dtype == torch.bfloat16 else None)
        np.testing.assert_array_equal(got, _numpy(tensor), err_msg=key)
    np.testing.assert_array_equal(weights["param"], np.ones(2, np.float32))


class _Exploit:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        open_weight_file(path)
    message = str(err.value)
    assert "system" in message and "safetensors" in message, message
    assert not marker.exists()


def test_legacy_torch_format_is_refused(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightFileError, match="legacy"):
        open_weight_file(path)


def test_truncated_torch_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(WeightFileError):
        weights = open_weight_file(path)
        np.asarray(weights["w"])


def test_safetensors_lazy_reader_matches_and_detects_truncation(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    weights = SafetensorsFile(path)
    assert set(weights) == set(tensors)
    for key, tensor in tensors.items():
        got = np.asarray(weights[key], dtype=np.float32 if tensor.dtype == torch.bfloat16 else None)
        np.testing.assert_array_equal(got, _numpy(tensor), err_msg=key)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightFileError, match="truncated"):
        SafetensorsFile(path)
    path.write_bytes(b"\x05")
    with pytest.raises(WeightFileError, match="too short"):
        SafetensorsFile(path)


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(WeightFileError, match="unknown weight file type"):
        open_weight_file(tmp_path / "weights.npz")
    with pytest.raises(WeightFileError, match="not found"):
        open_weight_file(tmp_path / "absent.safetensors")
