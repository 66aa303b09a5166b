"""Sharded sampling, refinement and training on 8 devices agree with one device, and the
parameters are really spread. Needs 8 devices: `tests/test_multi_device.py` runs this file with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 fake CPU devices)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st2v_jax.config_files import load_config_file
from st2v_jax.generation.pipeline import StreamingT2VPipeline
from st2v_jax.generation.video_writer import sidecar_path_for
from st2v_jax.generation.sampler import SamplingSettings, make_chunk_step, make_first_chunk, sample_stream, streaming_constants
from st2v_jax.parallel import axis_sizes, bytes_per_device, make_mesh, partition_specs
from st2v_jax.pretrained import load_pretrained

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 devices: run through tests/test_multi_device.py")
MESH = "data=2,fsdp=4"
# fp32 on CPU; sharded matmuls sum their partial products in another order.
TOLERANCE = 1e-4


def _bytes_on(device: jax.Device, tree) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_parameters_are_spread_over_the_fsdp_axis(tiny_model_dir):
    pipe = StreamingT2VPipeline.from_pretrained(tiny_model_dir)
    mesh = make_mesh(MESH)
    pipe.shard(mesh)
    for name in ("unet", "streaming"):
        params = pipe.params[name]
        total = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
        specs = partition_specs(pipe.model.abstract_params(name), axis_sizes(mesh))
        expected = bytes_per_device(params, specs, axis_sizes(mesh))
        held = [_bytes_on(device, params) for device in jax.devices()]
        print(f"{name}: {total} bytes in all, {held[0]} per device (1/{total / held[0]:.2f}) on mesh {MESH}")
        assert held == [expected] * 8
        assert held[0] < total / 3  # fsdp=4, less the vectors and undividable dims kept whole


def _sample(pipe: StreamingT2VPipeline, settings: SamplingSettings):
    ids, _ = pipe.tokenize(["a red circle", "a blue square"] + [""] * 2)
    text = pipe.encode_text(ids)
    first = make_first_chunk(pipe, settings)(pipe.params, text[:2], text[2:])
    constants = streaming_constants(pipe, pipe.anchor_embedding(first[:, :1]), text[2:])
    step = make_chunk_step(pipe, settings)
    (_, cond, frames), = sample_stream(step, pipe.params, constants, first[:, -pipe.cam_frames :], np.array([1]), text[None, :2], pipe.replicated)
    return first, cond, frames


def test_sharded_sampling_matches_one_device(tiny_model_dir):
    single = StreamingT2VPipeline.from_pretrained(tiny_model_dir)
    height, width = single.default_resolution()
    settings = SamplingSettings(num_frames=24, steps=2, init_steps=2, height=height, width=width)
    expected = _sample(single, settings)
    sharded = StreamingT2VPipeline.from_pretrained(tiny_model_dir).shard(make_mesh(MESH))
    got = _sample(sharded, settings)
    for name, a, b in zip(("first chunk", "conditioning frames", "new frames"), expected, got):
        assert b.sharding.is_fully_replicated, f"{name} should come back whole on every device"
        error = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
        print(f"{name}: max abs error {error:.2e}")
        assert error <= (1 if a.dtype == jnp.uint8 else TOLERANCE)


def _vid2vid_refiner(tmp_path):
    from st2v_jax.convert.components import random_pretrained
    from st2v_jax.generation.vid2vid_refiner import Vid2VidRefiner
    from st2v_jax.tokenizer import load_tokenizer, write_byte_level_tokenizer

    model = random_pretrained({
        "vid2vid_unet": dict(dim=32, dim_mult=[1, 2], num_heads=2, head_dim=16, num_res_blocks=1, attn_scales=[1], context_dim=64),
        "vae": dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1),
        "text_encoder": dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                             max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2),
    })
    # The UNet's zero-initialised output conv would make every prediction 0.
    noise = jax.tree.map(lambda p: 0.05 * np.random.default_rng(p.size).standard_normal(p.shape, np.float32), model.params)
    model = dataclasses.replace(model, params=jax.tree.map(np.add, model.params, noise))
    return Vid2VidRefiner(model, load_tokenizer(write_byte_level_tokenizer(tmp_path / "tokenizer")))


@pytest.mark.parametrize("kind", ["text-to-video", "ms-vid2vid"])
def test_sharded_refinement_matches_one_device(kind, tiny_model_dir, tmp_path):
    from st2v_jax.generation.long_video import Refiner
    from st2v_jax.generation.refiner import RefinerConfig
    from st2v_jax.generation.vid2vid_refiner import Vid2VidRefinerConfig

    frames = np.random.default_rng(5).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    # 4 chunks, 2 per call: each UNet call's batch of 2 chunks x 2 guidance branches spans data x fsdp.
    if kind == "text-to-video":
        load = lambda: Refiner.from_pretrained(tiny_model_dir)
        config = RefinerConfig(chunk=6, overlap=3, num_inference_steps=4, chunks_per_batch=2, height=32, width=32)
        refine = lambda refiner: refiner.refine(frames, "a red circle", "", config, 7.5, seed=0)
    else:
        load = lambda: _vid2vid_refiner(tmp_path)
        config = Vid2VidRefinerConfig(chunk=6, overlap=3, num_steps=2, chunks_per_batch=2, canvas_height=16, canvas_width=24)
        refine = lambda refiner: refiner.refine(frames, "a red circle", "", config, seed=0)
    expected = refine(load())
    sharded = load().shard(make_mesh(MESH))
    assert sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded.model.params)) > 10
    got = refine(sharded)
    error = np.abs(expected.astype(np.int16) - got).max()
    print(f"{kind} refiner: max abs error {error} (uint8) over {got.shape}")
    assert got.shape == expected.shape and error <= 1


def test_sharded_train_step_matches_one_device(tiny_model_dir, tmp_path):
    from st2v_jax.training.trainer import train

    config = load_config_file(REPO / "configs" / "train_tiny.py")
    config.model.init = str(tiny_model_dir)
    config.data.data_dir = str(tmp_path / "tfds")
    config.sharding.mesh = MESH
    config.batch_size = 8
    config.steps = 2
    config.log_every = 1
    config.async_checkpoints = False
    one = train(config, tmp_path / "one", mesh=make_mesh("data=1", devices=jax.devices()[:1]))
    eight = train(config, tmp_path / "eight")
    losses = [[json.loads(row)["loss"] for row in (run / "metrics.jsonl").read_text().splitlines()] for run in (tmp_path / "one", tmp_path / "eight")]
    print(f"losses on one device {losses[0]}, on {MESH} {losses[1]}")
    np.testing.assert_allclose(losses[1], losses[0], rtol=TOLERANCE)
    # Whole-update comparison, not per parameter: Adam scales every update to about the
    # learning rate, so a parameter whose true gradient is zero (a bias right before a
    # one-channel-per-group GroupNorm) moves by +-lr on rounding noise alone, differently
    # on any two device layouts. A sharding bug changes the update as a whole.
    start = load_pretrained(tiny_model_dir).params["streaming"]
    updates = [jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), load_pretrained(r.model_dir).params["streaming"], start) for r in (one, eight)]
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(tree))))
    error = norm(jax.tree.map(np.subtract, *updates)) / norm(updates[0])
    print(f"trained streaming params: relative error of the update {error:.2e} (update norm {norm(updates[0]):.3f})")
    assert error <= 1e-2


def test_sample_cli_streams_a_video_from_a_sharded_model(tiny_model_dir, tmp_path):
    from st2v_jax import sample

    out = tmp_path / "sharded.mp4"
    sample.run(["--prompt", "a red circle", "--model-dir", str(tiny_model_dir), "--num-frames", "24", "--steps", "2",
                "--init-steps", "2", "--mesh", MESH, "--out", str(out)])
    assert json.loads(sidecar_path_for(out).read_text())["frame_count"] == 24
