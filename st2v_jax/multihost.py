"""Runs that span several hosts (TPU pod slices, or several processes on one machine).

Every process runs the same program over one global mesh; `initialize` starts JAX's
distributed runtime so they can, and must run before anything touches a device.

Files: process 0 writes the outputs the user asked for. The other processes run the same
loops (each needs the conditioning frames to take the next step, and the frames to resume
after an interrupt), so they write their copies under their own scratch folder
(`process_output_path`) instead of into the user's folder, which may be shared storage.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional

import jax

# Read by `initialize` when no TPU cluster describes the run (e.g. processes on CPU hosts).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
SCRATCH_ENV = "ST2V_SCRATCH_DIR"


class DistributedSetupError(ValueError):
    """The environment describes a multi-process run incompletely."""


def _explicit_cluster(environ: Mapping[str, str]) -> Optional[dict]:
    names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    present = [name for name in names if environ.get(name)]
    if not present:
        return None
    if len(present) < len(names):
        missing = [name for name in names if name not in present]
        raise DistributedSetupError(f"{', '.join(present)} set but not {', '.join(missing)}: set all three, or none on a TPU VM")
    try:
        count, index = int(environ[NUM_PROCESSES_ENV]), int(environ[PROCESS_ID_ENV])
    except ValueError:
        raise DistributedSetupError(f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be integers") from None
    if not 0 <= index < count:
        raise DistributedSetupError(f"{PROCESS_ID_ENV}={index} is not in [0, {NUM_PROCESSES_ENV}={count})")
    return {"coordinator_address": environ[COORDINATOR_ENV], "num_processes": count, "process_id": index}


def initialize(environ: Mapping[str, str] = os.environ) -> None:
    """Starts JAX's distributed runtime. With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID set it uses them; otherwise JAX detects the cluster (Cloud TPU VMs,
    SLURM, ...). Call before any device is touched."""
    explicit = _explicit_cluster(environ)
    if explicit is not None:
        # Cross-process collectives on CPU devices need an implementation (TPU/GPU bring
        # their own; the setting does not touch them).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(explicit or {}))


def writes_outputs() -> bool:
    """Whether this process writes the run's outputs (process 0 of the run)."""
    return jax.process_index() == 0


def process_output_path(path: str | os.PathLike, environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    """Where this process keeps `path`: the path itself on process 0; for the others, the
    same absolute path under their scratch folder ($ST2V_SCRATCH_DIR, default
    ~/.cache/st2v_jax/process-N, its folders created), so a resumed run finds each
    process's state again."""
    path = pathlib.Path(path).absolute()
    if writes_outputs():
        return path
    scratch = pathlib.Path(environ.get(SCRATCH_ENV) or pathlib.Path.home() / ".cache" / "st2v_jax").expanduser()
    private = scratch / f"process-{jax.process_index()}" / path.relative_to(path.anchor)
    private.parent.mkdir(parents=True, exist_ok=True)
    return private
