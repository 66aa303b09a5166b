"""`python -m st2v_jax.benchmarks`: the quick path of every section on the tiny model. The table
has its rows and columns, st2v_jax and PyTorch agree on the same converted weights, and the
PyTorch streaming reference is the official model. Timings are not asserted."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_paths import FIXTURES

from st2v_jax.benchmarks.__main__ import main as benchmarks_cli
from st2v_jax.benchmarks.fixed_cost import check_lengths
from st2v_jax.benchmarks.flops import ACCELERATORS, CallCount, flops_rows, lowered_flops
from st2v_jax.benchmarks.report import COLUMNS
from st2v_jax.models.unet3d import UNet3DConfig

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


def _table(output: str) -> list[dict[str, str]]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |", lines[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(COLUMNS) for row in rows), rows
    return [dict(zip(COLUMNS, row)) for row in rows]


def _run(capsys, *argv: str) -> list[dict[str, str]]:
    assert benchmarks_cli(list(argv)) == 0
    output = capsys.readouterr().out
    assert "threads for XLA and torch" in output
    return _table(output)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sections", "forward,speed"], "comma-separated list"),
        (["--runs", "0"], "--runs must be >= 1"),
        (["--sections", "refiner", "--refiner-frames", "20"], "fewer than the refiner chunk"),
        (["--threads", "999"], "--threads must be between 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        benchmarks_cli(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_fixed_cost_refuses_lengths_the_model_cannot_make(tiny_model_dir):
    with pytest.raises(ValueError, match="nearest valid counts"):
        check_lengths(tiny_model_dir, [2], [80, 81])
    with pytest.raises(ValueError, match="chunk counts must be >= 1"):
        check_lengths(tiny_model_dir, [0], [80])


def test_forward_section_matches_pytorch(capsys):
    rows = _run(capsys, "--sections", "forward", "--sizes", "tiny", "--runs", "1", "--batch", "1")
    assert [r["measurement"] for r in rows] == [
        "UNet3D forward (s)",
        "UNet3D achieved GFLOP/s",
        "streaming (UNet3D + CAM + APM) forward (s)",
        "streaming (UNet3D + CAM + APM) achieved GFLOP/s",
    ]
    for row in rows[::2]:
        assert "PyTorch eager" in row["reference"] and row["ratio / growth"].endswith("x (target <= 0.7x)")
        # A broken key mapping or layer makes the outputs differ by the output's own scale.
        err, std = map(float, re.fullmatch(r"max abs diff (\S+) \(output std (\S+)\)", row["check"]).groups())
        assert err <= 1e-4 * std, row
    assert all(float(r["st2v_jax"]) > 0 for r in rows)


@pytest.mark.skipif(not (FIXTURES / "official_tiny_a").is_dir(), reason=f"no official fixture set under {FIXTURES}")
def test_pytorch_streaming_reference_is_the_official_model():
    """The official weights load strictly (same keys and shapes) and give the official eps."""
    from safetensors.torch import load_file

    from st2v_jax.benchmarks.torch_streaming import TorchStreamingUNet3D
    from st2v_jax.models.streaming import StreamingConfig

    root = FIXTURES / "official_tiny_a"
    config = json.loads((root / "config.json").read_text())
    reference = TorchStreamingUNet3D(config["unet"], StreamingConfig.from_dict(config)).eval()
    reference.load_state_dict(load_file(root / "state_dict.safetensors"), strict=True)
    io = {k: torch.from_numpy(v) for k, v in np.load(root / "io.npz").items()}
    with torch.inference_mode():
        eps = reference(io["latents"], io["case0/timestep"], io["text_embeds"], io["image_embeds"], io["cond_frames"])
    err = float((eps - io["case0/eps"]).abs().max())
    print(f"\nPyTorch streaming reference vs the official eps: max abs err {err:.2e}")
    assert err <= 1e-4


def test_fixed_cost_section(tiny_model_dir, capsys):
    rows = _run(capsys, "--sections", "fixed-cost", "--model-dir", str(tiny_model_dir), "--chunks", "1",
                "--rss-frames", "16", "--steps", "1")
    assert [(r["measurement"], r["config"].split(",")[0]) for r in rows] == [
        ("whole-video (lax.scan) compile (s)", "1 chunks"),
        ("streaming-mode peak RSS (GiB)", "16 frames"),
    ]
    assert rows[0]["ratio / growth"] == "+0% (max vs first)" and "flat within 15%" in rows[0]["check"]
    assert rows[1]["ratio / growth"] == "+0% (max vs first)" and "growth <= 10%" in rows[1]["check"]
    # The sampler's own peak (a tiny model: well under the pytest process's size).
    assert 0.1 < float(rows[1]["st2v_jax"]) < 3


def test_refiner_section_modes_agree(tiny_model_dir, capsys):
    rows = _run(capsys, "--sections", "refiner", "--model-dir", str(tiny_model_dir), "--refiner-frames", "40",
                "--refiner-steps", "2", "--runs", "1")
    assert [r["measurement"] for r in rows] == [
        "refinement (s), batched (2 chunks per call)",
        "refinement (s), lax.map, 1 chunk per call (default)",
    ]
    for row in rows:
        assert "Python loop" in row["reference"]
        assert float(row["check"].removeprefix("max abs diff vs loop ")) < 1e-3


def test_flops_and_projection_rows():
    config = UNet3DConfig(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                          up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=16, cross_attention_dim=32)
    inputs = (jax.ShapeDtypeStruct((1, 2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32),
              jax.ShapeDtypeStruct((1, 7, 32), jnp.float32))
    flops = lowered_flops("unet", config, inputs)
    # conv_out alone: 8*8 pixels x 9 taps x 32 -> 4 channels x 2 frames, 2 FLOPs per multiply-add.
    assert flops > 2 * 64 * 9 * 32 * 4 * 2
    stages = {"preview": [CallCount("tiny UNet3D", flops, 10)], "refine": [CallCount("tiny UNet3D", flops, 5)]}
    rows = flops_rows(stages)
    assert [r.section for r in rows] == ["FLOPs"] * 2 + ["PROJECTION"] * 2 * len(ACCELERATORS)
    assert all("(projected)" in r.st2v_jax and "official A100" in r.reference for r in rows[2:])
