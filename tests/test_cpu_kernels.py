"""`prefer_eigen_kernels`: the command-line tools turn XLA:CPU's YNNPACK fusions off unless
the user's $XLA_FLAGS already chose."""
from __future__ import annotations

import os
import subprocess
import sys

from st2v_jax.cpu_kernels import YNN_FUSION_FLAG, prefer_eigen_kernels


def test_adds_the_flag_beside_the_users_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    prefer_eigen_kernels()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {YNN_FUSION_FLAG}="
    prefer_eigen_kernels()  # idempotent
    assert os.environ["XLA_FLAGS"].count(YNN_FUSION_FLAG) == 1


def test_keeps_the_users_own_choice(monkeypatch):
    choice = f"{YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    monkeypatch.setenv("XLA_FLAGS", choice)
    prefer_eigen_kernels()
    assert os.environ["XLA_FLAGS"] == choice


def test_xla_accepts_the_flag():
    """XLA aborts at start-up on a flag it does not know: this catches a jaxlib that renamed it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = "from st2v_jax.cpu_kernels import prefer_eigen_kernels; prefer_eigen_kernels(); import jax; print(jax.numpy.ones(2).sum())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "2.0", result.stderr
