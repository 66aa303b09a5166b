"""Converted checkpoints: a folder with params (orbax), the source configs, kept files
(tokenizer, scheduler config) and a manifest that makes the folder verifiable.

    <dir>/st2v_manifest.json   format, st2v_jax version, every component's source config and
                               tensor list (path, shape, dtype), the source weight files
                               (name, size, sha256), and every file of the folder (size, sha256)
    <dir>/params/              orbax checkpoint of {component: params}
    <dir>/tokenizer/, scheduler/ ...   copied from the source

Loading verifies the files against the manifest (a truncated or corrupted file names
itself), the tensors against the configs (a config/weights mismatch names the tensors),
before anything is restored.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

import st2v_jax
from st2v_jax.atomic import atomic_directory
from st2v_jax.convert.components import COMPONENTS, PretrainedModel

MANIFEST = "st2v_manifest.json"
FORMAT = "st2v_jax.converted/1"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A converted checkpoint that is incomplete, corrupt, or does not match its config."""


def _checkpointer(compact: bool = False) -> ocp.Checkpointer:
    # By default one tensorstore array per parameter rather than OCDBT's shared files: saving
    # then writes straight from the params' memory (OCDBT staged a full extra copy). `compact`
    # (OCDBT: a few files, no per-array metadata) suits small models shipped as files.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=compact))


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_table(params: Any) -> dict[str, dict]:
    return {
        "/".join(path): {"shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype))}
        for path, leaf in traverse_util.flatten_dict(nn.unbox(params)).items()
    }


def save_converted(
    model: PretrainedModel,
    directory: str | os.PathLike,
    overwrite: bool = False,
    storage_dtype: Optional[str] = None,
    compact: bool = False,
) -> pathlib.Path:
    """Writes `model` as a converted checkpoint folder, atomically (complete or absent).

    `storage_dtype` (e.g. "float16") stores floating-point tensors in that precision, halving
    the folder; they are restored as float32 all the same. `compact` writes the params into
    a few shared files (orbax OCDBT) instead of one folder per tensor: for small models
    shipped as files, not for multi-GB conversions (it stages an extra copy in memory)."""
    directory = pathlib.Path(directory).absolute()
    if storage_dtype is not None:
        dtype = np.dtype(storage_dtype)
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(f"storage_dtype must be a floating-point type, got {storage_dtype!r}")
        cast = lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x
        model = dataclasses.replace(model, params=jax.tree.map(cast, model.params))
    sources = [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)} for p in model.sources]
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        _checkpointer(compact).save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(model.params))
        for relative, source in model.files.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "st2v_jax_version": st2v_jax.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "components": {
                name: {"config": model.configs[name], "tensors": _tensor_table(model.params[name])} for name in model.params
            },
            "sources": sources,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a converted st2v_jax checkpoint (no {MANIFEST}); convert it with `python -m st2v_jax.convert`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupt: {err}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r} (this st2v_jax reads {FORMAT})")
    return manifest


def verify_files(directory: pathlib.Path, manifest: dict, checksums: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256 when `checksums`)."""
    problems = []
    for relative, expected in manifest["files"].items():
        path = directory / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{relative}: {path.stat().st_size} bytes, expected {expected['size']} (truncated or replaced)")
        elif checksums and sha256_file(path) != expected["sha256"]:
            problems.append(f"{relative}: sha256 differs from the manifest (corrupted or replaced)")
    if problems:
        raise CheckpointError(f"{directory} failed verification:\n  " + "\n  ".join(problems))


def verify_configs(manifest: dict, configs: Optional[dict[str, dict]] = None) -> None:
    """The tensors the manifest lists are exactly those the configs describe."""
    problems = []
    for name, entry in manifest["components"].items():
        config = (configs or {}).get(name, entry["config"])
        if name not in COMPONENTS:
            problems.append(f"unknown component {name!r}")
            continue
        spec = COMPONENTS[name]
        expected = {k: v["shape"] for k, v in _tensor_table(spec.abstract_params(spec.parse_config(config))).items()}
        stored = {k: v["shape"] for k, v in entry["tensors"].items()}
        problems += [f"{name}: {k} is in the weights but not in the config" for k in sorted(stored.keys() - expected.keys())]
        problems += [f"{name}: {k} is required by the config but not in the weights" for k in sorted(expected.keys() - stored.keys())]
        problems += [
            f"{name}: {k} has shape {tuple(stored[k])} in the weights, {tuple(expected[k])} in the config"
            for k in sorted(stored.keys() & expected.keys())
            if list(stored[k]) != list(expected[k])
        ]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError("weights and config do not match:\n  " + "\n  ".join(shown))


def _restore_args(manifest: dict) -> ocp.args.PyTreeRestore:
    """Restore every tensor as a host (CPU) array of its manifest shape; floating-point
    tensors as float32 whatever their storage precision."""
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    restored_dtype = lambda name: np.float32 if np.issubdtype(np.dtype(name), np.floating) else np.dtype(name)
    target = {
        name: traverse_util.unflatten_dict(
            {
                tuple(path.split("/")): jax.ShapeDtypeStruct(tuple(t["shape"]), restored_dtype(t["dtype"]), sharding=host)
                for path, t in entry["tensors"].items()
            }
        )
        for name, entry in manifest["components"].items()
    }
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def load_converted(
    directory: str | os.PathLike, checksums: bool = True, configs: Optional[dict[str, dict]] = None
) -> PretrainedModel:
    """Loads a folder written by `save_converted` after verifying it (see module doc).

    `configs` overrides component configs (it must still match the stored tensors).
    `checksums=False` skips the sha256 pass (sizes are still checked).
    """
    directory = pathlib.Path(directory).absolute()
    manifest = read_manifest(directory)
    verify_files(directory, manifest, checksums)
    verify_configs(manifest, configs)
    params = _checkpointer().restore(directory / PARAMS_DIR, args=_restore_args(manifest))
    final_configs = {name: (configs or {}).get(name, entry["config"]) for name, entry in manifest["components"].items()}
    files = {relative: directory / relative for relative in manifest["files"] if not relative.startswith((PARAMS_DIR + "/", MANIFEST))}
    return PretrainedModel(final_configs, params, files)
