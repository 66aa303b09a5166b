"""Loads ml_collections config files (`configs/*.py` exposing `get_config()`)."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"st2v_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config()
