"""PyTorch state dict -> Flax params: the generic machinery every model's key mapping uses.

A model's mapping is a function `key -> flax path | None` (None: the key is not for this
model). `torch_key_to_path` turns a (renamed) dotted torch key into a Flax path with the
layout rule used by all our modules: `blocks.3.attn` -> `blocks_3/attn`, and the leaf
`weight` -> `kernel` (ndim >= 2) or `scale` (ndim 1). `to_flax_layout` moves the tensor to
Flax's layout. `convert_state_dict` applies a mapping to a whole state dict against the
model's abstract parameters and refuses any unmapped, missing or mis-shaped tensor.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from flax import traverse_util

Path = tuple[str, ...]
KeyMapping = Callable[[str], Optional[Path]]

# torch layout -> flax layout, by tensor rank, for `weight` leaves that become `kernel`.
_KERNEL_PERMUTATIONS = {
    2: (1, 0),  # Linear (out, in) -> (in, out)
    3: (2, 1, 0),  # Conv1d (out, in, k) -> (k, in, out)
    4: (2, 3, 1, 0),  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
    5: (2, 3, 4, 1, 0),  # Conv3d (out, in, kt, kh, kw) -> (kt, kh, kw, in, out)
}


class ConversionError(ValueError):
    """A state dict that does not fit the model; the message lists every offending key."""


def apply_renames(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def torch_key_to_path(key: str) -> Path:
    """`down_blocks.0.resnets.1.conv1.weight` -> (`down_blocks_0`, `resnets_1`, `conv1`, `weight`)."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def to_flax_layout(path: Path, array: np.ndarray) -> tuple[Path, np.ndarray]:
    """Renames a `weight` leaf to `kernel`/`scale` and permutes kernels to Flax's layout."""
    if path[-1] != "weight":
        return path, array
    if array.ndim == 1:
        return path[:-1] + ("scale",), array
    return path[:-1] + ("kernel",), np.transpose(array, _KERNEL_PERMUTATIONS[array.ndim])


def renaming_mapping(renames: Sequence[tuple[str, str]], prefix: str = "", target: Path = ()) -> KeyMapping:
    """A mapping for keys under `prefix`: strip it, apply regex renames, place under `target`."""

    def mapping(key: str) -> Optional[Path]:
        if not key.startswith(prefix):
            return None
        return target + torch_key_to_path(apply_renames(key[len(prefix) :], renames))

    return mapping


def first_match(*mappings: KeyMapping) -> KeyMapping:
    """Combines mappings: the first that claims a key wins."""

    def mapping(key: str) -> Optional[Path]:
        for m in mappings:
            path = m(key)
            if path is not None:
                return path
        return None

    return mapping


def convert_state_dict(
    state_dict: Mapping[str, Any],
    mapping: KeyMapping,
    abstract_params: Any,
    *,
    ignore: Iterable[str] = (),
    dtype: Optional[np.dtype] = np.float32,
    progress: Optional[str] = None,
) -> dict:
    """Converts every tensor of `state_dict` to the Flax params tree described by
    `abstract_params` (shapes, possibly boxed with logical axes). Tensors are read one at a
    time, so a lazily-read state dict is never held twice.

    `ignore` lists key prefixes that belong to other models in the same file; `progress`,
    if given, labels a progress bar. Raises ConversionError naming every unmapped, missing
    and mis-shaped key.
    """
    expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract_params)).items()}
    ignore = tuple(ignore)
    params: dict[Path, np.ndarray] = {}
    unmapped, misshaped, duplicated = [], [], []
    for key in tqdm.tqdm(state_dict, desc=progress, unit="tensor", disable=progress is None):
        if ignore and key.startswith(ignore):
            continue
        path = mapping(key)
        if path is None:
            unmapped.append(key)
            continue
        flax_path, array = to_flax_layout(path, np.asarray(state_dict[key]))
        if flax_path not in expected:
            unmapped.append(f"{key} (-> {'/'.join(flax_path)}, no such parameter)")
        elif flax_path in params:
            duplicated.append(f"{key} (-> {'/'.join(flax_path)})")
        elif tuple(array.shape) != tuple(expected[flax_path]):
            misshaped.append(f"{key}: {tuple(array.shape)} in flax layout, expected {tuple(expected[flax_path])}")
        else:
            # An owned C-order copy (np.ascontiguousarray would turn 0-d scalars into 1-d), held
            # as a host-memory jax array so that orbax can save it without another copy.
            params[flax_path] = jax.device_put(np.array(array, dtype=dtype or array.dtype, order="C"), jax.devices("cpu")[0])
    missing = sorted("/".join(p) for p in expected if p not in params)
    problems = [
        (title, items)
        for title, items in (
            ("unmapped keys", unmapped),
            ("missing parameters", missing),
            ("mis-shaped tensors", misshaped),
            ("keys mapped twice", duplicated),
        )
        if items
    ]
    if problems:
        lines = []
        for title, items in problems:
            lines.append(f"{len(items)} {title}:")
            lines += [f"  {item}" for item in items[:20]] + ([f"  ... and {len(items) - 20} more"] if len(items) > 20 else [])
        raise ConversionError("state dict does not match the model:\n" + "\n".join(lines))
    return traverse_util.unflatten_dict(params)
