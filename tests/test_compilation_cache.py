"""The command-line tools keep compiled programs across runs."""
import subprocess
import sys

from tests.conftest import REPO

PROGRAM = """
import sys
import jax, jax.numpy as jnp
from st2v_jax.compilation_cache import enable_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None))
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
"""


def _run(env, *args):
    result = subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_default_folder_fills_and_a_users_setting_wins(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    folder = tmp_path / ".cache" / "st2v_jax" / "jax_compilation"
    assert _run(env) == str(folder)
    assert any(folder.iterdir()), "the compiled program should be in the cache"
    mine = tmp_path / "mine"
    assert _run({**env, "JAX_COMPILATION_CACHE_DIR": str(mine)}) == str(mine)
    assert _run(env, str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert any((tmp_path / "explicit").iterdir())
