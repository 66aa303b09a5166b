"""Multi-process runs: the distributed runtime's settings, who writes what, and a real
two-process sampling run (2 processes x 4 fake CPU devices, one mesh) against one device."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from st2v_jax import multihost
from st2v_jax.generation.run_state import resume_directory_for
from st2v_jax.generation.video_writer import sidecar_path_for
from st2v_jax.sample import UsageError, run

from tests.conftest import REPO

SAMPLE_ARGS = ["--prompt", "a red circle", "--num-frames", "24", "--steps", "2", "--init-steps", "2", "--seed", "3"]


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "host:1234"}, "set but not JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
        ({"JAX_COORDINATOR_ADDRESS": "host:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in \[0, JAX_NUM_PROCESSES=2\)"),
    ],
)
def test_an_incomplete_cluster_description_is_refused_before_starting(environ, message):
    with pytest.raises(multihost.DistributedSetupError, match=message):
        multihost.initialize(environ)


def test_process_zero_writes_where_the_user_asked(tmp_path):
    assert multihost.writes_outputs()
    assert multihost.process_output_path(tmp_path / "a.mp4", {multihost.SCRATCH_ENV: str(tmp_path / "s")}) == tmp_path / "a.mp4"


def test_sample_refuses_distributed_without_a_mesh(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="--distributed runs one video over every host's devices: give --mesh"):
        run(SAMPLE_ARGS + ["--model-dir", str(tiny_model_dir), "--distributed", "--out", str(tmp_path / "v.mp4")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _frames(png_dir) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted(png_dir.iterdir())])


def test_two_processes_sample_one_video_and_only_process_zero_writes_it(tiny_model_dir, tmp_path):
    out, pngs, scratch = tmp_path / "video.mp4", tmp_path / "frames", tmp_path / "scratch"
    command = [sys.executable, "-m", "st2v_jax.sample", *SAMPLE_ARGS, "--model-dir", str(tiny_model_dir),
               "--mesh", "data=2,fsdp=4", "--distributed", "--out", str(out), "--png-dir", str(pngs)]
    port = _free_port()
    processes = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={
            **os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", multihost.SCRATCH_ENV: str(scratch),
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index),
        })
        for index in range(2)
    ]
    logs = [process.communicate(timeout=900)[0] for process in processes]
    for index, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"process {index}:\n{log[-4000:]}"

    assert json.loads(sidecar_path_for(out).read_text())["frame_count"] == 24
    private = scratch / "process-1"
    assert (private / out.relative_to(out.anchor)).is_file(), "process 1 keeps its copy in its scratch folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["frames", "scratch", out.name, sidecar_path_for(out).name, resume_directory_for(out).name])
    distributed = _frames(pngs)
    np.testing.assert_array_equal(_frames(private / pngs.relative_to(pngs.anchor)), distributed)

    run(SAMPLE_ARGS + ["--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "one" / "video.mp4"), "--png-dir", str(tmp_path / "one" / "frames")])
    error = np.abs(_frames(tmp_path / "one" / "frames").astype(np.int16) - distributed).max()
    print(f"2 processes x 4 devices vs one device: max abs error {error} (uint8) over {distributed.shape}")
    assert distributed.shape == (24, 32, 32, 3) and error <= 1
