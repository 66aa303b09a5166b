"""Training metrics to TensorBoard event files and to a JSON-lines file, from process 0.

    <workdir>/tensorboard/events.out.tfevents.*   `tensorboard --logdir <workdir>/tensorboard`
    <workdir>/metrics.jsonl                       {"step": s, "loss": ..., ...} per logged step
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping

import jax


class MetricsLog:
    def __init__(self, workdir: str | os.PathLike) -> None:
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._writer.flush()
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def forget_after(self, step: int) -> None:
        """Drops logged steps after `step`: a resumed run logs them again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
