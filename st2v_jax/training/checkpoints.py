"""Training checkpoints with orbax's CheckpointManager: periodic, keep-N, asynchronous.

    <workdir>/checkpoints/<step>/state    the TrainState (trained params, optimizer, EMA, step)
    <workdir>/checkpoints/<step>/meta     JSON: the training config, the initial model folder

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves the previous checkpoints intact. A checkpoint that is present but cannot
be read is reported with its path and what to do.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class TrainCheckpointError(RuntimeError):
    """A requested checkpoint is missing or unreadable."""


class TrainCheckpoints:
    def __init__(self, workdir: str | os.PathLike, every: int, keep: int, async_save: bool = True) -> None:
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether it saved."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state, meta) of `step`; `like` is a state of the same structure (its arrays give
        shapes, dtypes and shardings)."""
        steps = self.all_steps()
        if step not in steps:
            raise TrainCheckpointError(
                f"no checkpoint for step {step} in {self.directory} (available: {steps or 'none'}); "
                "pick an available step, or start from step 0 with a new workdir"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # orbax/tensorstore raise many types for damaged files
            raise TrainCheckpointError(
                f"the checkpoint of step {step} in {self.directory / str(step)} is unreadable "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); delete that folder to resume "
                f"from an earlier step (available: {steps})"
            ) from err
        return restored.state, dict(restored.meta)

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once the TPU runtime announced a preemption."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
