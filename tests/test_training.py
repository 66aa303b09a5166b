"""Training: the train step's accumulation and EMA, the official trainable split, the
trainer's loss curve, exact resumption after a SIGTERM, checkpoint errors, TensorBoard logs."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import struct
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from st2v_jax.config_files import load_config_file
from st2v_jax.pretrained import load_pretrained
from st2v_jax.training.checkpoints import TrainCheckpointError, TrainCheckpoints
from st2v_jax.training.step import init_train_state, make_train_step
from st2v_jax.training.trainable import OFFICIAL_FROZEN, OFFICIAL_TRAINABLE, ParamPartition, merge_params
from st2v_jax.training.trainer import initialise_streaming_base, train

REPO = pathlib.Path(__file__).resolve().parents[1]


class QuadraticObjective:
    """A deterministic loss with a known gradient: mean over the batch of |w x - y|^2."""

    def loss(self, params, batch, key):
        residual = batch["x"] @ params["w"] - batch["y"]
        loss = jnp.mean(jnp.sum(residual**2, axis=-1))
        return loss, {"loss": loss}


def _quadratic_problem():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)}
    return {"w": jnp.zeros((3, 2))}, batch


def test_accumulated_step_equals_the_full_batch_step_and_ema_follows_the_params():
    params, batch = _quadratic_problem()
    optimizer = optax.sgd(0.1)
    states = {}
    for accumulation in (1, 4):
        step = jax.jit(make_train_step(QuadraticObjective(), optimizer, optax.constant_schedule(0.1), 0, accumulation, ema_decay=0.5))
        state = init_train_state(params, optimizer, ema=True)
        for _ in range(2):
            state, metrics = step(state, {}, batch)
        states[accumulation] = (state, metrics)
    (full, full_metrics), (accumulated, accumulated_metrics) = states[1], states[4]
    assert int(full.step) == 2
    np.testing.assert_allclose(accumulated.params["w"], full.params["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(accumulated_metrics["loss"], full_metrics["loss"], rtol=1e-6)
    # Hand-computed: w1 = -0.1 g(0), ema1 = 0.5 w1; w2 = w1 - 0.1 g(w1), ema2 = 0.5 ema1 + 0.5 w2.
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    grad = lambda w: 2 * x.T @ (x @ w - y) / len(x)
    w1 = -0.1 * grad(np.zeros((3, 2)))
    w2 = w1 - 0.1 * grad(w1)
    np.testing.assert_allclose(full.params["w"], w2, rtol=1e-5)
    np.testing.assert_allclose(full.ema["w"], 0.25 * w1 + 0.5 * w2, rtol=1e-5)


def test_official_split_freezes_exactly_the_base_temporal_layers(tiny_model_dir):
    params = load_pretrained(tiny_model_dir).params
    trainable, frozen = ParamPartition(OFFICIAL_TRAINABLE, OFFICIAL_FROZEN).split(params)
    assert set(trainable) == {"streaming"}
    assert {"cam", "resampler", "mid_merger", "base"} <= set(trainable["streaming"])
    frozen_base = jax.tree_util.tree_flatten_with_path(frozen["streaming"]["base"])[0]
    assert frozen_base, "the base temporal layers must be frozen"
    for path, _ in frozen_base:
        names = "/".join(p.key for p in path)
        assert any(t in names for t in ("transformer_in", "temp_convs", "temp_attentions")), names
    for path, _ in jax.tree_util.tree_flatten_with_path(trainable["streaming"]["base"])[0]:
        names = "/".join(p.key for p in path)
        assert not any(t in names for t in ("transformer_in", "temp_convs", "temp_attentions")), names
    assert {"unet", "vae", "text_encoder", "image_encoder"} <= set(frozen)
    # The split loses nothing.
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="no parameter matches"):
        ParamPartition(("nothing/.*",), ()).split(params)


def test_shapes_recipe_trains_the_spatial_layers_on_images_then_the_temporal_layers_on_clips(tiny_model_dir):
    spec = importlib.util.spec_from_file_location("train_shapes_tiny", REPO / "configs" / "train_shapes_tiny.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    unet = {"unet": load_pretrained(tiny_model_dir).params["unet"]}
    temporal = ("transformer_in", "temp_convs", "temp_attentions")
    trained = {}
    for stage in ("images", "base"):
        config = recipe.get_config(stage)
        trainable, _ = ParamPartition(tuple(config.trainable), tuple(config.frozen)).split(unet)
        trained[stage] = {"/".join(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert recipe.get_config("images").base_frames == 1
    assert not any(t in path for path in trained["images"] for t in temporal)
    assert all(any(t in path for t in temporal) for path in trained["base"])
    every = {"/".join(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(unet)[0]}
    assert trained["images"] | trained["base"] == every and not trained["images"] & trained["base"]


def test_streaming_base_starts_from_the_unet(tiny_model_dir):
    params = load_pretrained(tiny_model_dir).params
    out = initialise_streaming_base(params)
    np.testing.assert_array_equal(
        out["streaming"]["base"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"]
    )
    np.testing.assert_array_equal(  # APM's own layers keep their values
        out["streaming"]["base"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["mixer"]["alpha"],
        params["streaming"]["base"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["mixer"]["alpha"],
    )
    # Its own arrays: the train step donates (deletes) the trained base layers, and the unet
    # component must survive them to be exported.
    out["streaming"]["base"]["conv_in"]["kernel"].delete()
    np.testing.assert_array_equal(params["unet"]["conv_in"]["kernel"], out["unet"]["conv_in"]["kernel"])


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir, tmp_path_factory):
    config = load_config_file(REPO / "configs" / "train_tiny.py")
    config.model.init = str(tiny_model_dir)
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.steps = 6
    config.checkpoint_every = 3
    return config


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    from st2v_jax.train import main

    overrides = [f"--config.{k}={v}" for k, v in (("model.init", tiny_config.model.init), ("data.data_dir", tiny_config.data.data_dir), ("steps", 6), ("checkpoint_every", 3))]
    assert main(["train", f"--config={REPO / 'configs' / 'train_tiny.py'}", f"--workdir={workdir}", *overrides]) == 0
    return workdir


def test_loss_decreases_and_the_run_exports_a_model(uninterrupted_run, tiny_model_dir):
    losses = _losses(uninterrupted_run)
    assert sorted(losses) == list(range(1, 7))
    first, last = np.mean([losses[s] for s in (1, 2)]), np.mean([losses[s] for s in (5, 6)])
    print(f"loss: first two steps {first:.4f}, last two {last:.4f}")
    assert last < 0.8 * first
    steps = TrainCheckpoints(uninterrupted_run, 3, 3, async_save=False).all_steps()
    assert steps[-1] == 6 and 3 in steps
    exported, initial = load_pretrained(uninterrupted_run / "model"), load_pretrained(tiny_model_dir)
    assert exported.tokenizer_dir() is not None
    changed = lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b))
    assert changed(exported.params["streaming"]["cam"]["conv_in"]["kernel"], initial.params["streaming"]["cam"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(exported.params["vae"]["encoder"]["conv_in"]["kernel"], initial.params["vae"]["encoder"]["conv_in"]["kernel"])
    np.testing.assert_array_equal(
        exported.params["streaming"]["base"]["transformer_in"]["proj_in"]["kernel"],
        initial.params["streaming"]["base"]["transformer_in"]["proj_in"]["kernel"],
    )


def _read_tensorboard_scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Parses TFRecord-framed Event protos (what TensorBoard reads) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_logs_hold_the_losses(uninterrupted_run):
    scalars = _read_tensorboard_scalars(uninterrupted_run / "tensorboard")
    losses = _losses(uninterrupted_run)
    assert {"train/loss", "train/grad_norm", "train/learning_rate"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == sorted(losses)
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [losses[s] for s in sorted(losses)], rtol=1e-6)


def test_a_run_stopped_by_sigterm_resumes_exactly(uninterrupted_run, tiny_config, tmp_path):
    workdir = tmp_path / "run"

    def terminate_after_step_two() -> None:
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_step_two, daemon=True).start()
    first = train(tiny_config, workdir)
    assert first.stopped_early and first.model_dir is None
    assert 2 <= first.step < 6
    assert TrainCheckpoints(workdir, 3, 3, async_save=False).latest_step() == first.step

    second = train(tiny_config, workdir)
    assert second.step == 6 and not second.stopped_early
    expected, resumed = _losses(uninterrupted_run), _losses(workdir)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(first.step + 1, 7):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])


def test_corrupt_and_missing_checkpoints_are_named(uninterrupted_run, tiny_config, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(uninterrupted_run / "checkpoints", workdir / "checkpoints")
    checkpoints = TrainCheckpoints(workdir, 3, 3, async_save=False)
    with pytest.raises(TrainCheckpointError, match="no checkpoint for step 5"):
        checkpoints.restore(5, None)
    for data_file in (workdir / "checkpoints" / "6" / "state").rglob("*"):
        if data_file.is_file() and data_file.stat().st_size > 64 and data_file.name != "_METADATA":
            data_file.write_bytes(b"\0" * 16)
    config = tiny_config.copy_and_resolve_references()
    config.steps = 7
    with pytest.raises(TrainCheckpointError, match=r"checkpoint of step 6 .* is unreadable.*delete that folder"):
        train(config, workdir)


def test_bad_training_config_is_refused_before_work(tiny_config, tmp_path):
    config = tiny_config.copy_and_resolve_references()
    config.batch_size = 3
    config.accumulation_steps = 2
    config.model.init = str(tmp_path / "nowhere")
    with pytest.raises(ValueError) as err:
        train(config, tmp_path / "run")
    assert "model.init" in str(err.value) and "multiple of accumulation_steps" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_vae_and_clip_stages_learn_on_a_fixed_batch(tiny_model_dir):
    """A few steps of each extra stage's objective on one batch lower its loss."""
    import flax.linen as nn

    from st2v_jax.convert.components import COMPONENTS
    from st2v_jax.models.clip import CLIPTextTransformer
    from st2v_jax.training.autoencoder_objective import AutoencoderObjective, latent_scaling_factor
    from st2v_jax.training.contrastive_objective import ContrastiveObjective

    model = load_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    video = np.zeros((4, 16, 32, 32, 3), np.uint8)
    for i, colour in enumerate([(230, 40, 40), (40, 200, 70), (50, 90, 245), (245, 220, 40)]):
        video[i, :, 8:20, 4 + 3 * i : 16 + 3 * i] = colour
    batch = {"video": jnp.asarray(video), "input_ids": jnp.asarray(rng.integers(2, 500, (4, 77)), jnp.int32)}
    # The clip stage needs CLIPTextModelWithProjection's projection, which the tiny model lacks.
    text_config = dataclasses.replace(model.config("text_encoder"), projection_dim=64)
    text_params = nn.unbox(COMPONENTS["text_encoder"].init_params(text_config, jax.random.key(1)))
    objectives = {
        "vae": (AutoencoderObjective({"vae": model.module("vae")}, frames_per_clip=2), {"vae": model.params["vae"]}),
        "clip": (
            ContrastiveObjective(
                {"text_encoder": CLIPTextTransformer(text_config), "image_encoder": model.module("image_encoder")}, image_size=32
            ),
            {"text_encoder": text_params, "image_encoder": model.params["image_encoder"]},
        ),
    }
    for name, (objective, params) in objectives.items():
        optimizer = optax.adam(3e-3)
        step = jax.jit(make_train_step(objective, optimizer, optax.constant_schedule(3e-3), seed=0))
        state = init_train_state(params, optimizer, ema=False)
        losses = []
        for _ in range(8):
            state, metrics = step(state, {}, batch)
            losses.append(float(metrics["loss"]))
        print(name, [round(x, 4) for x in losses])
        assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], (name, losses)
    frames = jnp.asarray(video.reshape(-1, 32, 32, 3), jnp.float32) / 127.5 - 1.0
    mean, _ = model.module("vae").apply({"params": model.params["vae"]}, frames, method="encode")
    np.testing.assert_allclose(latent_scaling_factor(model.module("vae"), model.params["vae"], frames), 1.0 / float(jnp.std(mean)), rtol=1e-5)


def test_base_stage_pretrains_on_single_frames(tiny_model_dir):
    """base_frames=1: the UNet3D learns from one frame per caption (text-to-image
    pretraining), the same objective on (B, 1, H, W, 3) clips; only stage "base" takes it."""
    from st2v_jax.diffusion.schedules import NoiseSchedule
    from st2v_jax.training.config import default_config
    from st2v_jax.training.objective import ConditionDropout, DenoisingObjective
    from st2v_jax.training.trainer import check_config

    model = load_pretrained(tiny_model_dir)
    schedule = NoiseSchedule.from_diffusers(model.scheduler_config(), "DDIMScheduler")
    null_ids = np.zeros(77, np.int32)
    objective = DenoisingObjective.from_model(model, "base", schedule, null_ids, ConditionDropout(), base_frames=1)
    assert objective.clip_frames == 1
    video = np.zeros((8, 1, 32, 32, 3), np.uint8)
    for i in range(8):
        video[i, 0, 4 + 2 * i : 16 + 2 * i, 8:20] = (230, 40, 40) if i % 2 else (50, 90, 245)
    batch = {"video": jnp.asarray(video), "input_ids": jnp.asarray(np.arange(8)[:, None] % 2 + np.zeros((8, 77), int), jnp.int32)}
    params = {name: model.params[name] for name in objective.modules}
    trainable, frozen = ParamPartition(("unet/.*",), ()).split(params)
    optimizer = optax.adam(3e-3)
    step = jax.jit(make_train_step(objective, optimizer, optax.constant_schedule(3e-3), seed=0))
    state = init_train_state(trainable, optimizer, ema=False)
    losses = []
    for _ in range(10):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    with pytest.raises(ValueError, match="16-frame clips"):
        DenoisingObjective.from_model(model, "base", schedule, null_ids, ConditionDropout()).loss(model.params, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="only stage 'base'"):
        DenoisingObjective.from_model(model, "streaming", schedule, null_ids, ConditionDropout(), base_frames=1)
    config = default_config()  # stage "streaming"
    config.model.init, config.base_frames = str(tiny_model_dir), 1
    with pytest.raises(ValueError, match="only stage 'base'"):
        check_config(config)


def test_vae_foreground_weight_counts_the_shapes_not_the_background():
    from st2v_jax.training.autoencoder_objective import pixel_weights

    images = -np.ones((2, 8, 8, 3), np.float32)  # black frames in [-1, 1]
    images[0, 2:4, 2:4] = (0.8, -0.7, -0.7)  # a red square: 0.8 - (-1) = 1.8 from black
    weights = np.asarray(pixel_weights(jnp.asarray(images), 10.0))[..., 0]
    np.testing.assert_allclose(weights[0, 2:4, 2:4], 1.0 + 10.0 * 1.8, rtol=1e-6)
    np.testing.assert_allclose(weights[0, 5:, 5:], 1.0)
    np.testing.assert_allclose(weights[1], 1.0)
    np.testing.assert_allclose(np.asarray(pixel_weights(jnp.asarray(images), 0.0)), 1.0)
