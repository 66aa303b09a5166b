"""Lazy, code-free readers for PyTorch-side weight files.

* `.safetensors`: parsed here (header + one read-only memory map), so any dtype works,
  bfloat16 included, and nothing is read until a tensor is asked for.
* torch pickles (`.bin`, `.pth`, `.pt`, `.ckpt`): `torch.load(weights_only=True, mmap=True)`;
  a file that needs any other global than plain tensors is refused, never executed.
* diffusers/transformers folders: the single file, or the shards named by `*.index.json`.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
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
    """Read-only view of a .safetensors file; tensors are numpy views of one memory map."""

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
        self.metadata = header.pop("__metadata__", None) or {}
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
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load_torch_file(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """Tensors of a torch pickle, loaded weights-only (no code runs), memory-mapped if possible.

    Nested dicts are flattened with '.' (so `ckpt["state_dict"]["unet.x"]` becomes
    `state_dict.unet.x`); callers strip what they need.
    """
    try:
        import torch
    except ImportError:
        raise WeightFileError(
            f"{path}: reading torch pickles needs PyTorch (pip install torch); "
            "or convert the file to .safetensors first"
        ) from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise WeightFileError(
            f"{path} was refused: it needs Python objects beyond plain tensors, and loading it could run code.\n"
            f"  torch says: {str(err).splitlines()[0]}\n"
            "  If you trust the file, convert it once in a separate process: "
            "`python -c \"import torch, safetensors.torch as s; sd = torch.load('IN', weights_only=False)['state_dict']; "
            "s.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"` and load OUT.safetensors."
        ) from None
    except (EOFError, RuntimeError, OSError) as err:
        raise WeightFileError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {err}") from None
    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value.detach().float().numpy() if value.dtype == torch.bfloat16 else value.detach().numpy()
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    return flat


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
        return load_torch_file(path)
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
