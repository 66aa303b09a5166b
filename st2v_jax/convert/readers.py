"""Lazy, code-free readers for PyTorch-side weight files.

* `.safetensors`: parsed here (header, then one read per tensor), so any dtype works,
  bfloat16 included, and nothing is read until a tensor is asked for.
* torch zip pickles (`.bin`, `.pth`, `.pt`, `.ckpt`): unpickled here with an allowlist of
  plain tensors and containers (no torch needed); any other global is refused, never
  executed, and tensors are read one at a time from the archive.
* diffusers/transformers folders: the single file, or the shards named by `*.index.json`.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Preferred weight file names inside a diffusers/transformers/open_clip folder, best first.
WEIGHT_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


class WeightFileError(ValueError):
    """A weight file that cannot be read safely: missing, truncated, corrupt or unsafe."""


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only, lazy view of a .safetensors file; each lookup reads that tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightFileError(f"{self.path}: {size} bytes is too short for a safetensors file (truncated?)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise WeightFileError(
                    f"{self.path}: header length {header_len} exceeds the file size {size} (truncated or not safetensors)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise WeightFileError(f"{self.path}: unreadable safetensors header ({err})") from None
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len
        data_len = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + data_len > size:
            raise WeightFileError(
                f"{self.path}: tensors need {self._data_start + data_len} bytes but the file has {size} (truncated download?)"
            )
        unknown = sorted({e["dtype"] for e in header.values()} - set(_SAFETENSORS_DTYPES))
        if unknown:
            raise WeightFileError(f"{self.path}: unsupported tensor dtypes {unknown}")


    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        # A plain read rather than a memory map: mapped pages would count against (and
        # stay in) the process's resident memory for the whole conversion.
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        return raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class UnsafeCheckpointError(WeightFileError):
    """A pickle that asks for anything beyond plain tensors and containers."""


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _TensorRecord:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, stride, *_unused) -> _TensorRecord:
    return _TensorRecord(storage, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(record, *_unused) -> _TensorRecord:
    return record


# The only globals a weights-only torch pickle may name; each maps to inert code of ours.
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): np.dtype(dtype) for name, dtype in _TORCH_STORAGE_DTYPES.items()},
}


class _WeightsOnlyUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl building nothing but dicts, lists and tensor records."""

    def __init__(self, data: bytes, path: pathlib.Path) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path} was refused: its pickle needs the global `{module}.{name}`, and only plain tensors "
                "and containers are loaded (unpickling anything else can run code).\n"
                "  If you trust the file, convert it once to safetensors in a separate process:\n"
                "    python -c \"import torch, safetensors.torch as st; "
                "sd = torch.load('IN.ckpt', weights_only=False, map_location='cpu'); sd = sd.get('state_dict', sd); "
                "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"\n"
                "  and load OUT.safetensors instead."
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r} in the pickle")
        return _StorageRef(str(pid[2]), pid[1])


class TorchZipFile(Mapping[str, np.ndarray]):
    """Tensors of a torch zip checkpoint (`torch.save` since 1.6), read without torch and
    without running any code from the file. Nested dicts are flattened with '.', so
    `ckpt["state_dict"]["unet.x"]` appears as `state_dict.unet.x`. Each tensor is read
    from the archive when asked for, so memory holds one tensor at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as err:
            raise WeightFileError(f"{self.path}: not a readable torch zip checkpoint (truncated or corrupt?): {err}") from None
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise WeightFileError(f"{self.path}: zip archive without data.pkl, not a torch checkpoint")
        self._root = pickles[0][: -len("data.pkl")]
        byteorder = self._root + "byteorder"
        if byteorder in names and self._zip.read(byteorder).decode().strip() != "little":
            raise WeightFileError(f"{self.path}: big-endian torch checkpoints are not supported")
        try:
            obj = _WeightsOnlyUnpickler(self._zip.read(pickles[0]), self.path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # a malformed pickle can fail in many ways
            raise WeightFileError(f"{self.path}: unreadable pickle in the checkpoint ({type(err).__name__}: {err})") from None
        self._records: dict[str, _TensorRecord] = {}
        self._flatten("", obj)

    def _flatten(self, prefix: str, value: object) -> None:
        if isinstance(value, _TensorRecord):
            self._records[prefix] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                self._flatten(f"{prefix}.{k}" if prefix else str(k), v)


    def __getitem__(self, key: str) -> np.ndarray:
        record = self._records[key]
        try:
            raw = self._zip.read(f"{self._root}data/{record.storage.key}")
        except (KeyError, zipfile.BadZipFile, EOFError) as err:
            raise WeightFileError(f"{self.path}: data of tensor {key!r} is missing or corrupt ({err})") from None
        storage = np.frombuffer(raw, dtype=record.storage.dtype)
        itemsize = storage.dtype.itemsize
        needed = record.offset + sum((n - 1) * s for n, s in zip(record.shape, record.stride)) + 1
        if min(record.shape, default=1) > 0 and needed > storage.size:
            raise WeightFileError(f"{self.path}: tensor {key!r} reaches past its storage (corrupt file)")
        view = np.lib.stride_tricks.as_strided(
            storage[record.offset :], shape=record.shape, strides=[s * itemsize for s in record.stride]
        )
        return np.array(view)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


class _ShardedStateDict(Mapping[str, np.ndarray]):
    def __init__(self, shards: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self._owner = {key: shard for shard in shards.values() for key in shard}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._owner[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def open_weight_file(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """A lazy name -> array mapping for one weight file (safetensors or torch pickle)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        if not zipfile.is_zipfile(path):
            raise WeightFileError(
                f"{path}: legacy (pre-1.6, non-zip) torch serialization is not supported; "
                "re-save it with a current torch.save or convert it to .safetensors"
            )
        return TorchZipFile(path)
    raise WeightFileError(f"{path}: unknown weight file type (expected .safetensors or one of {TORCH_SUFFIXES})")


def open_model_dir(directory: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The state dict of a diffusers/transformers model folder (single file or index shards)."""
    directory = pathlib.Path(directory)
    for index in sorted(directory.glob("*.index.json")):
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _ShardedStateDict({name: open_weight_file(directory / name) for name in shard_names})
    for name in WEIGHT_FILE_NAMES:
        if (directory / name).is_file():
            return open_weight_file(directory / name)
    raise WeightFileError(f"no weight file in {directory}: expected one of {WEIGHT_FILE_NAMES} or a *.index.json")
