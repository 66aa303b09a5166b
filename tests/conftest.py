"""Shared test setup: a persistent XLA compilation cache for the session (many tests
compile the same tiny networks), the tiny random StreamingT2V model folder, and variants of
its config file."""
from __future__ import annotations

import pathlib
from typing import Callable

import jax
import pytest

from st2v_jax.cpu_kernels import prefer_eigen_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    prefer_eigen_kernels()  # the kernels the command-line tools run
    cache = pathlib.Path(config.rootpath) / ".pytest_jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """configs/tiny_random.py with random weights, converted (tokenizer and scheduler included)."""
    from st2v_jax.convert.__main__ import main as convert_cli

    out = tmp_path_factory.mktemp("models") / "tiny-random"
    assert convert_cli(["random", "--config", str(REPO / "configs" / "tiny_random.py"), "--out", str(out)]) == 0
    return out


@pytest.fixture
def tiny_config_variant(tmp_path) -> Callable[[str], pathlib.Path]:
    """`variant(change)`: a config file that is configs/tiny_random.py with the statement
    `change` applied to its `config`."""

    def variant(change: str) -> pathlib.Path:
        path = tmp_path / "tiny_random_variant.py"
        path.write_text(
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('tiny_random', {str(REPO / 'configs' / 'tiny_random.py')!r})\n"
            "tiny_random = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(tiny_random)\n\n\n"
            "def get_config():\n"
            "    config = tiny_random.get_config()\n"
            f"    {change}\n"
            "    return config\n"
        )
        return path

    return variant
