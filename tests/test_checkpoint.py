"""Converted checkpoints verify themselves; writers are atomic even when killed."""
from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import numpy as np
import pytest
from flax import traverse_util

from st2v_jax.atomic import atomic_directory, atomic_write_bytes
from st2v_jax.checkpoint import MANIFEST, CheckpointError, load_converted, save_converted
from st2v_jax.convert.components import PretrainedModel

UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": 8,
}


def _model(seed: int = 0, unet: dict = UNET) -> PretrainedModel:
    from st2v_jax.convert.components import COMPONENTS

    spec = COMPONENTS["unet"]
    abstract = nn.unbox(spec.abstract_params(spec.parse_config(unet)))
    rng = np.random.default_rng(seed)
    flat = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in traverse_util.flatten_dict(abstract).items()}
    return PretrainedModel({"unet": unet}, {"unet": traverse_util.unflatten_dict(flat)})


@pytest.fixture
def saved(tmp_path):
    model = _model()
    return model, save_converted(model, tmp_path / "ckpt")


def _largest_param_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in (directory / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_roundtrip_is_exact_and_manifest_is_complete(saved):
    model, directory = saved
    loaded = load_converted(directory)
    for key, value in traverse_util.flatten_dict(model.params).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(loaded.params)[key], value)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["components"]["unet"]["config"] == UNET
    assert manifest["components"]["unet"]["tensors"]["conv_in/kernel"] == {"shape": [3, 3, 4, 32], "dtype": "float32"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())


def test_truncated_file_is_named(saved):
    _, directory = saved
    victim = _largest_param_file(directory)
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: .* \(truncated or replaced\)"):
        load_converted(directory)


def test_flipped_bytes_are_caught_by_checksum(saved):
    _, directory = saved
    victim = _largest_param_file(directory)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: sha256 differs"):
        load_converted(directory)


def test_weights_paired_with_the_wrong_config(saved):
    _, directory = saved
    wrong = dict(UNET, block_out_channels=[32, 96])
    with pytest.raises(CheckpointError, match=r"down_blocks_1/resnets_0/conv1/kernel has shape \(3, 3, 32, 64\) in the weights"):
        load_converted(directory, configs={"unet": wrong})
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["components"]["unet"]["config"]["layers_per_block"] = 2
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="required by the config but not in the weights"):
        load_converted(directory)


def test_existing_output_is_not_overwritten_by_default(saved):
    model, directory = saved
    with pytest.raises(FileExistsError):
        save_converted(model, directory)
    save_converted(_model(seed=1), directory, overwrite=True)
    assert load_converted(directory).params["unet"]["conv_in"]["bias"][0] == _model(seed=1).params["unet"]["conv_in"]["bias"][0]


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from st2v_jax.atomic import atomic_file, atomic_directory
    target, kind = sys.argv[1], sys.argv[2]
    if kind == "file":
        with atomic_file(target) as tmp, open(tmp, "wb") as f:
            for _ in range(1000):
                f.write(b"new" * 1000); f.flush(); print("writing", flush=True); time.sleep(0.01)
    else:
        with atomic_directory(target, overwrite=True) as tmp:
            for i in range(1000):
                (tmp / f"part{i}").write_bytes(b"new"); print("writing", flush=True); time.sleep(0.01)
    """
)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_killed_writer_leaves_the_previous_output(tmp_path, kind):
    target = tmp_path / "output"
    if kind == "file":
        atomic_write_bytes(target, b"old complete content")
    else:
        with atomic_directory(target) as tmp:
            (tmp / "complete").write_bytes(b"old")
    writer = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # it is mid-write
        assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    if kind == "file":
        assert target.read_bytes() == b"old complete content"
    else:
        assert sorted(p.name for p in target.iterdir()) == ["complete"]
    # The next write of the same path removes the killed writer's leftovers.
    if kind == "file":
        atomic_write_bytes(target, b"fresh")
    else:
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "fresh").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]


def test_half_precision_compact_folder_restores_float32(tiny_model_dir, tmp_path):
    """The embedded model's storage: float16 tensors in a few shared files, float32 on load."""
    import jax

    from st2v_jax.embedded import folder_bytes

    model = load_converted(tiny_model_dir)
    save_converted(model, tmp_path / "half", storage_dtype="float16", compact=True)
    half = load_converted(tmp_path / "half")
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(half.params)):
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-4)
    assert folder_bytes(tmp_path / "half") < 0.6 * folder_bytes(tiny_model_dir)
    assert len(list((tmp_path / "half").rglob("*"))) < 100
    with pytest.raises(ValueError, match="floating-point"):
        save_converted(model, tmp_path / "int", storage_dtype="int8")
