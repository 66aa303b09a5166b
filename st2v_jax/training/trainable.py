"""Which parameters train and which stay frozen: regular expressions over parameter paths.

Paths are `/`-joined component and module names, e.g.
`streaming/base/down_blocks_0/temp_convs_1/conv1/kernel`. A parameter trains when it matches
a `trainable` pattern and no `frozen` pattern (patterns must match the whole path).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

# REFERENCE.md section 6: CAM (with E_cond), the mergers, the resampler, APM and the base
# UNet's spatial layers train; the base UNet's temporal layers stay as pretrained.
OFFICIAL_TRAINABLE = ("streaming/.*",)
OFFICIAL_FROZEN = (r"streaming/base/(.*/)?(transformer_in|temp_convs_\d+|temp_attentions_\d+)/.*",)


def param_paths(params: Any) -> list[str]:
    return ["/".join(path) for path in traverse_util.flatten_dict(params)]


@dataclasses.dataclass(frozen=True)
class ParamPartition:
    trainable: Sequence[str] = OFFICIAL_TRAINABLE
    frozen: Sequence[str] = OFFICIAL_FROZEN

    def is_trainable(self, path: str) -> bool:
        return any(re.fullmatch(p, path) for p in self.trainable) and not any(re.fullmatch(p, path) for p in self.frozen)

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) nested dicts; merging them gives `params` back."""
        flat = traverse_util.flatten_dict(params, sep="/")
        chosen = {path for path in flat if self.is_trainable(path)}
        if not chosen:
            raise ValueError(
                f"no parameter matches the trainable patterns {list(self.trainable)} (minus frozen {list(self.frozen)}); "
                f"parameter paths look like {sorted(flat)[:3]}"
            )
        trainable = {path: value for path, value in flat.items() if path in chosen}
        frozen = {path: value for path, value in flat.items() if path not in chosen}
        return traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge_params(a: dict, b: dict) -> dict:
    """The union of two disjoint parameter trees."""
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    overlap = flat_a.keys() & flat_b.keys()
    if overlap:
        raise ValueError(f"parameter trees overlap at {sorted('/'.join(p) for p in overlap)[:5]}")
    return traverse_util.unflatten_dict({**flat_a, **flat_b})


def overlay_params(params: dict, updates: dict) -> dict:
    """`params` with every leaf of `updates` (a subtree of the same paths) replaced."""
    flat = traverse_util.flatten_dict(params)
    new = traverse_util.flatten_dict(updates)
    unknown = sorted("/".join(p) for p in new if p not in flat or np.shape(flat[p]) != np.shape(new[p]))
    if unknown:
        raise ValueError(f"parameters missing from the model or shaped differently: {unknown[:5]}")
    return traverse_util.unflatten_dict({**flat, **new})
