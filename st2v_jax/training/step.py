"""One optimizer step as one jitted function: gradient accumulation over micro-batches
(inlined), clipping + AdamW, optional EMA of the trained parameters.

Randomness comes from (seed, step, micro-batch) alone, and the batch of a step is fixed by
the input pipeline, so a run restored at step s continues exactly as the uninterrupted run.
The function takes and returns plain pytrees; the sharding layer decides their layout.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from st2v_jax.training.trainable import merge_params

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer updates done
    params: Any  # the trained parameters only
    opt_state: Any
    ema: Optional[Any]  # exponential moving average of `params`, when enabled


def init_train_state(params: Any, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
    copy = lambda tree: jax.tree.map(jnp.array, tree)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), copy(params) if ema else None)


def make_train_step(
    objective: Any,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    seed: int,
    accumulation_steps: int = 1,
    ema_decay: float = 0.0,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
    """`(state, frozen params, batch) -> (state, metrics)`; the batch's leading axis is split
    into `accumulation_steps` micro-batches whose gradients (and the objective's metrics, which
    must include "loss") are averaged. The objective is any `loss(params, batch, key) ->
    (loss, metrics)`."""

    def micro_batches(batch: dict) -> dict:
        def split(x: Array) -> Array:
            if x.shape[0] % accumulation_steps:
                raise ValueError(f"batch of {x.shape[0]} does not split into {accumulation_steps} micro-batches")
            return x.reshape(accumulation_steps, x.shape[0] // accumulation_steps, *x.shape[1:])

        return jax.tree.map(split, batch)

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def micro_step(index: int, micro: dict) -> tuple[Any, dict]:
            loss_fn = lambda p: objective.loss(merge_params(p, frozen), micro, jax.random.fold_in(key, index))
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return grads, metrics

        # A Python loop, not lax.scan: XLA:CPU runs convolution gradients inside a while loop
        # ~20x slower (measured on the shapes VAE), and accumulation counts are small enough
        # to inline.
        micro = micro_batches(batch)
        grads, metrics = micro_step(0, jax.tree.map(lambda x: x[0], micro))
        for index in range(1, accumulation_steps):
            more_grads, more_metrics = micro_step(index, jax.tree.map(lambda x: x[index], micro))
            grads = jax.tree.map(jnp.add, grads, more_grads)
            metrics = jax.tree.map(jnp.add, metrics, more_metrics)
        grads = jax.tree.map(lambda g: g / accumulation_steps, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        metrics = {
            **jax.tree.map(lambda m: m / accumulation_steps, metrics),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(learning_rate(state.step), jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    return step
