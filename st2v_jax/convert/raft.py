"""Key mapping of torchvision's `raft_large` state dict onto `st2v_jax.metrics.raft.RAFT`.

The Flax module tree mirrors torchvision's, so only torchvision's Conv2dNormActivation
(a Sequential: 0 = conv, 1 = norm, 2 = ReLU) needs renaming, plus the batch-norm running
statistics, which are parameters of `FrozenBatchNorm`. `num_batches_tracked` counters are
training bookkeeping and are skipped.

The weights (e.g. `raft_large_C_T_SKHT_V2-ff5fadd5.pth`, torchvision's default
`Raft_Large_Weights.C_T_SKHT_V2`) are read by our code-free reader: nothing is unpickled
beyond plain tensors.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from st2v_jax.convert.mapping import KeyMapping, Path, convert_state_dict, renaming_mapping
from st2v_jax.convert.readers import open_weight_file
from st2v_jax.metrics.raft import MIN_IMAGE_SIZE, RAFT
from st2v_jax.models.layers import abstract_params

RAFT_RENAMES = (
    (r"\.0\.(weight|bias)$", r".conv.\1"),
    (r"\.1\.(weight|bias)$", r".norm.\1"),
    (r"\.1\.running_(mean|var)$", r".norm.\1"),
)
_TRAINING_COUNTER = "num_batches_tracked"


def raft_mapping(prefix: str = "", target: Path = ()) -> KeyMapping:
    """Maps `prefix` + torchvision raft_large keys to RAFT param paths under `target`."""
    return renaming_mapping(RAFT_RENAMES, prefix, target)


def raft_ignored_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The batch-norm `num_batches_tracked` counters among `keys` (for `convert_state_dict(ignore=...)`)."""
    return tuple(key for key in keys if key.endswith("." + _TRAINING_COUNTER))


def raft_abstract_params() -> Any:
    """RAFT parameter shapes with logical axes (they do not depend on the image size)."""
    image = jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3))
    return abstract_params(RAFT(num_flow_updates=1), image, image)


def convert_raft_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A torchvision raft_large state dict (name -> array) -> RAFT params; refuses any
    unmapped, missing or mis-shaped tensor (raft_small and other variants included)."""
    return convert_state_dict(
        state_dict, raft_mapping(), raft_abstract_params(), ignore=raft_ignored_keys(state_dict)
    )


def load_raft_params(path: str | os.PathLike) -> dict:
    """RAFT params from a torchvision raft_large weight file (.pth or .safetensors)."""
    return convert_raft_state_dict(open_weight_file(path))
