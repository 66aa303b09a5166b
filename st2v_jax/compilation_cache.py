"""JAX's persistent compilation cache for the command-line tools: a second run of the same
command (same model, sizes and mesh) loads its compiled programs instead of compiling them
again, which saves minutes for the full model on a TPU."""
from __future__ import annotations

import pathlib
from typing import Optional

import jax

DEFAULT_DIRECTORY = pathlib.Path("~/.cache/st2v_jax/jax_compilation")


def enable_compilation_cache(directory: Optional[str | pathlib.Path] = None) -> pathlib.Path:
    """Turns the cache on at `directory`, unless JAX already has one (set by
    $JAX_COMPILATION_CACHE_DIR or the caller's own jax.config), which is kept. Returns the
    folder in use."""
    current = jax.config.jax_compilation_cache_dir
    if current and directory is None:
        return pathlib.Path(current)
    chosen = pathlib.Path(directory or DEFAULT_DIRECTORY).expanduser()
    chosen.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    return chosen
