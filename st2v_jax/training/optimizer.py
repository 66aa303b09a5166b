"""The optimizer a training config describes: global-norm clipping, then AdamW on a schedule."""
from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    if opt.schedule == "constant":
        return optax.constant_schedule(opt.learning_rate)
    if opt.schedule == "warmup_constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), optax.constant_schedule(opt.learning_rate)],
            [opt.warmup_steps],
        )
    if opt.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, opt.learning_rate, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1), opt.learning_rate * opt.final_lr_fraction
        )
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    )
