"""The training loop: model + data + jitted step + checkpoints + logs, resumable at any step.

    <workdir>/checkpoints/   orbax checkpoints (see checkpoints.py); a rerun resumes the latest
    <workdir>/metrics.jsonl, <workdir>/tensorboard/   metrics (see metrics_log.py)
    <workdir>/model/         at the end: a model folder (`st2v_jax.sample --model-dir`) with
                             the trained (or EMA) parameters in the initial model

The mesh (`config.sharding.mesh`) spans every device of every host: the batch is split
over its data and fsdp axes, and the parameters, their EMA and the optimizer state are laid
out by the logical axis rules (`config.sharding.rules`, see `st2v_jax.parallel`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from st2v_jax.checkpoint import save_converted
from st2v_jax.convert.components import PretrainedModel
from st2v_jax.data.pipeline import TrainingBatches, prepare, to_global_arrays
from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.generation.run_state import describe_differences
from st2v_jax.models.execution import ExecutionOptions, ExecutionOptionsError
from st2v_jax.parallel import MeshSpecError, axis_sizes, batch_spec, make_mesh, named_shardings, parse_mesh_spec, partition_specs, place_on_mesh
from st2v_jax.pretrained import load_pretrained
from st2v_jax.tokenizer import load_tokenizer, tokenize
from st2v_jax.training.checkpoints import TrainCheckpoints
from st2v_jax.training.metrics_log import MetricsLog
from st2v_jax.training.autoencoder_objective import AutoencoderObjective, latent_scaling_factor
from st2v_jax.training.contrastive_objective import ContrastiveObjective
from st2v_jax.training.objective import STAGES as DENOISING_STAGES
from st2v_jax.training.objective import ConditionDropout, DenoisingObjective
from st2v_jax.training.optimizer import learning_rate_schedule, make_optimizer
from st2v_jax.training.preemption import stop_on_signals
from st2v_jax.training.step import init_train_state, make_train_step
from st2v_jax.training.trainable import ParamPartition, overlay_params

STAGES = ("vae", "clip") + DENOISING_STAGES
# Keys that may change between a run and its resumption without changing what it computes.
# A run may also resume on another kind of machine: the attention kernel and remat change
# how, not what, it computes.
_RESUMABLE_CHANGES = (
    "steps", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoints", "sharding.mesh", "sharding.rules",
    "execution.attention", "execution.remat",
)


@dataclasses.dataclass
class TrainResult:
    step: int  # optimizer steps done
    stopped_early: bool  # a stop request (SIGTERM, Ctrl-C, preemption) or `until_step`
    model_dir: Optional[pathlib.Path]  # the exported model folder (after the last step)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses inconsistent settings before anything expensive happens."""
    problems = []
    if config.stage not in STAGES:
        problems.append(f"stage={config.stage!r}; expected one of {STAGES}")
    if not config.model.init:
        problems.append("model.init is empty: give a model folder (e.g. from `python -m st2v_jax.convert random ...`)")
    elif not pathlib.Path(config.model.init).expanduser().exists():
        problems.append(f"model.init {config.model.init} does not exist")
    try:
        sizes = parse_mesh_spec(config.sharding.mesh, jax.device_count())
        if config.batch_size % (config.accumulation_steps * sizes["data"] * sizes["fsdp"]):
            problems.append(
                f"batch_size {config.batch_size} must be a multiple of accumulation_steps ({config.accumulation_steps}) "
                f"x the mesh's data x fsdp devices ({sizes['data']} x {sizes['fsdp']})"
            )
    except MeshSpecError as error:
        problems.append(f"sharding.mesh: {error}")
    try:
        ExecutionOptions(**config.execution).check_platform(devices=jax.device_count())
    except ExecutionOptionsError as error:
        problems.append(f"execution: {error}")
    if config.steps < 1:
        problems.append(f"steps must be >= 1, got {config.steps}")
    if config.base_frames and (config.stage != "base" or config.base_frames < 0):
        problems.append(f"base_frames={config.base_frames}: only stage 'base' trains on clips of its own length (0: the chunk length)")
    if not 0.0 <= config.ema_decay < 1.0:
        problems.append(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.data.name == "video_folder" and not config.data.manual_dir:
        problems.append("data.manual_dir is empty: the video_folder dataset needs the folder of videos and captions")
    if problems:
        raise ValueError("invalid training config:\n  " + "\n  ".join(problems))


def make_objective(config: ml_collections.ConfigDict, model: PretrainedModel, null_input_ids: np.ndarray) -> Any:
    """The objective of `config.stage`; it names the components it needs in `.modules`."""
    if config.stage == "vae":
        return AutoencoderObjective(
            {"vae": model.module("vae")},
            frames_per_clip=config.vae.frames_per_clip,
            kl_weight=config.vae.kl_weight,
            foreground_weight=config.vae.foreground_weight,
        )
    if config.stage == "clip":
        if model.config("text_encoder").projection_dim is None:
            raise ValueError(
                "the clip stage trains text embeddings against image embeddings: the text encoder needs a projection "
                "(text_encoder config: architectures ['CLIPTextModelWithProjection'] and projection_dim)"
            )
        return ContrastiveObjective(
            {"text_encoder": model.module("text_encoder"), "image_encoder": model.module("image_encoder")},
            image_size=model.config("image_encoder").image_size,
            temperature=config.clip.temperature,
        )
    if config.stage in DENOISING_STAGES:
        schedule = NoiseSchedule.from_diffusers(model.scheduler_config(), "DDIMScheduler")
        return DenoisingObjective.from_model(
            model, config.stage, schedule, null_input_ids, ConditionDropout(**config.dropout), config.base_frames or None
        )
    raise ValueError(f"stage={config.stage!r}; expected one of {STAGES}")


def initialise_streaming_base(params: dict) -> dict:
    """params["streaming"]["base"] <- a copy of params["unet"] (APM's new layers keep their
    init). A copy, not the same arrays: the train step donates the trained base layers, and
    the unet component must survive to be exported."""
    return overlay_params(params, {"streaming": {"base": jax.tree.map(jnp.copy, params["unet"])}})


def export_model(model: PretrainedModel, trained: Any, directory: pathlib.Path, calibration_frames: Optional[np.ndarray] = None) -> pathlib.Path:
    """The initial model with the trained parameters swapped in, as a model folder. With
    `calibration_frames` (after VAE training) the VAE's latent scaling factor is re-measured."""
    params = overlay_params(model.params, multihost_utils.process_allgather(trained, tiled=True))
    configs = model.configs
    if calibration_frames is not None:
        frames = jnp.asarray(calibration_frames, jnp.float32) / 127.5 - 1.0
        scale = latent_scaling_factor(model.module("vae"), params["vae"], frames)
        configs = {**configs, "vae": {**configs["vae"], "scaling_factor": scale}}
    if jax.process_index() == 0:
        save_converted(PretrainedModel(configs, params, files=model.files), directory, overwrite=True)
    return directory


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, until_step: Optional[int] = None, mesh: Optional[Mesh] = None
) -> TrainResult:
    """Trains (or resumes) the run in `workdir`. `until_step` stops (with a checkpoint) at
    that step without ending the run: the learning-rate schedule still spans `config.steps`.
    `mesh` (default: `config.sharding.mesh` over all devices) is where the run lives."""
    check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(pathlib.Path(config.model.init).expanduser())
    if model.tokenizer_dir() is None:
        raise ValueError(f"{config.model.init} has no tokenizer/ folder; training tokenizes the captions with it")
    params = initialise_streaming_base(model.params) if config.model.streaming_base_from_unet else model.params
    model = dataclasses.replace(model, params=params, execution=ExecutionOptions(**config.execution))
    tokenizer = load_tokenizer(model.tokenizer_dir())
    max_length = model.config("text_encoder").max_position_embeddings
    encode_captions = lambda captions: tokenize(tokenizer, captions, max_length)[0]
    objective = make_objective(config, model, encode_captions([""])[0])
    partition = ParamPartition(tuple(config.trainable), tuple(config.frozen))
    trainable, frozen = partition.split({name: params[name] for name in objective.modules})
    learning_rate = learning_rate_schedule(config.optimizer, config.steps)
    optimizer = make_optimizer(config.optimizer, config.steps)

    mesh = make_mesh(config.sharding.mesh) if mesh is None else mesh
    sizes, rules = axis_sizes(mesh), [tuple(rule) for rule in config.sharding.rules]
    # The optimizer state and EMA keep the boxes (logical axis names) of the parameters they
    # mirror, so one abstract init gives the layout of the whole train state.
    boxed_trainable, boxed_frozen = partition.split({name: model.abstract_params(name) for name in objective.modules})
    state_shardings = named_shardings(
        mesh, partition_specs(jax.eval_shape(lambda p: init_train_state(p, optimizer, config.ema_decay > 0), boxed_trainable), sizes, rules)
    )
    frozen_shardings = named_shardings(mesh, partition_specs(boxed_frozen, sizes, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, batch_spec(config.batch_size, sizes, rules))
    frozen = place_on_mesh(frozen, frozen_shardings)
    trainable = place_on_mesh(trainable, state_shardings.params)
    state = jax.jit(lambda p: init_train_state(p, optimizer, config.ema_decay > 0), out_shardings=state_shardings)(trainable)
    step_fn = jax.jit(
        make_train_step(objective, optimizer, learning_rate, config.seed, config.accumulation_steps, config.ema_decay),
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )

    checkpoints = TrainCheckpoints(workdir, config.checkpoint_every, config.keep_checkpoints, config.async_checkpoints)
    log = MetricsLog(workdir)
    meta = {"config": json.loads(config.to_json()), "init": str(config.model.init)}
    start = checkpoints.latest_step() or 0
    if start:
        state, saved_meta = checkpoints.restore(start, state)
        changed = describe_differences(saved_meta.get("config", {}), meta["config"], ignore=_RESUMABLE_CHANGES)
        if changed:
            logging.warning("resuming %s with a changed config:\n  %s", workdir, "\n  ".join(changed))
        print(f"resuming from the checkpoint of step {start}", flush=True)
    log.forget_after(start)
    end = min(config.steps, until_step) if until_step is not None else config.steps

    source = prepare(config.data)
    batches = TrainingBatches(
        source, encode_captions, config.batch_size, objective.clip_frames, config.seed, jax.process_index(), jax.process_count()
    )
    done, last_saved, stopped = start, start, False
    progress = tqdm.tqdm(total=end, initial=start, desc=f"training {config.stage}", unit="step", disable=jax.process_index() != 0)
    try:
        with stop_on_signals() as stop:
            for step, host_batch in batches.iterate(start) if start < end else ():
                state, metrics = step_fn(state, frozen, to_global_arrays(host_batch, batch_sharding))
                done = step + 1
                progress.update(1)
                if done % config.log_every == 0 or done == end:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    log.write(done, values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}")
                if checkpoints.save(done, state, meta):
                    last_saved = done
                if stop.requested or checkpoints.reached_preemption(done) or done >= end:
                    stopped = done < config.steps
                    break
        if last_saved != done:
            checkpoints.save(done, state, meta, force=True)
        checkpoints.wait()
    finally:
        progress.close()
        log.close()
        checkpoints.close()
    model_dir = None
    if done >= config.steps:
        calibration = None
        if config.stage == "vae":
            video = batches.host_batch(0)["video"]
            calibration = video.reshape(-1, *video.shape[2:])
        model_dir = export_model(model, state.ema if state.ema is not None else state.params, workdir / "model", calibration)
    return TrainResult(done, stopped, model_dir)
