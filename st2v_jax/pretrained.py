"""One entry point for every kind of weights a user has: `load_pretrained(path)`."""
from __future__ import annotations

import os
import pathlib

from st2v_jax.checkpoint import MANIFEST, load_converted
from st2v_jax.convert.components import PretrainedModel
from st2v_jax.convert.readers import TORCH_SUFFIXES
from st2v_jax.convert.sources import DIFFUSERS_LAYOUT, from_diffusers_dir, from_official_checkpoint
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions


def load_pretrained(path: str | os.PathLike, checksums: bool = True) -> PretrainedModel:
    """Loads, by what `path` is:
    * a converted st2v_jax folder (has st2v_manifest.json): verified, then restored;
    * a diffusers text-to-video folder (has model_index.json): converted in memory;
    * an official StreamingT2V weight file (.ckpt/.pth/.bin/.safetensors): converted in memory.
    """
    path = pathlib.Path(path)
    if (path / MANIFEST).is_file():
        return load_converted(path, checksums=checksums)
    if (path / "model_index.json").is_file():
        return from_diffusers_dir(path)
    if path.is_file() and path.suffix in TORCH_SUFFIXES + (".safetensors",):
        return from_official_checkpoint(path)
    raise FileNotFoundError(
        f"cannot load weights from {path}: expected a converted st2v_jax folder (with {MANIFEST}), "
        f"a diffusers folder ({DIFFUSERS_LAYOUT}), or an official StreamingT2V checkpoint file "
        f"({', '.join(TORCH_SUFFIXES + ('.safetensors',))})"
    )


def load_for_inference(
    path: str | os.PathLike, checksums: bool = True, execution: ExecutionOptions = DEFAULT_EXECUTION
) -> PretrainedModel:
    """`load_pretrained`, to be run with `execution` (see `PretrainedModel.for_inference`);
    options this host cannot run are refused before anything is read."""
    execution.check_platform()
    return load_pretrained(path, checksums=checksums).for_inference(execution)
