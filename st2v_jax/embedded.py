"""The embedded default model, st2v-shapes-tiny: where the package keeps it, and how a
trained model folder becomes it.

    python -m st2v_jax.embedded --model-dir outputs/shapes/streaming/model --config configs/st2v_shapes_tiny.py

packages the folder the last training stage exported (see configs/train_shapes_tiny.py):
weights stored in float16 in a few shared files, the config's sampling defaults as
`sampling.json`, everything verified by the manifest as any converted folder.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

import ml_collections

from st2v_jax.checkpoint import save_converted
from st2v_jax.config_files import load_config_file
from st2v_jax.convert.components import SAMPLING_DEFAULTS_FILE, modelscope_scheduler_config, split_model_config
from st2v_jax.pretrained import load_pretrained

EMBEDDED_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "st2v-shapes-tiny"
SIZE_LIMIT_BYTES = 25 * 1000**2
# Component config entries that training measures rather than copies from the config file.
MEASURED_CONFIG_ENTRIES = {("vae", "scaling_factor")}


def folder_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def config_mismatches(expected: dict, actual: dict, path: tuple[str, ...] = ()) -> list[str]:
    """'component.key: expected != actual' for each entry of `expected` that `actual` differs on."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{'.'.join(path)}: {expected} != {actual}"]
        return [m for key, value in expected.items() if path + (key,) not in MEASURED_CONFIG_ENTRIES
                for m in config_mismatches(value, actual.get(key), path + (key,))]
    same = list(expected) == list(actual) if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)) else expected == actual
    return [] if same else [f"{'.'.join(path)}: {expected} != {actual}"]


def package_model(model_dir: str | pathlib.Path, config_path: str | pathlib.Path, out: pathlib.Path = EMBEDDED_MODEL_DIR) -> int:
    """Writes the packaged model to `out`; returns its size in bytes (refused above 25 MB, or
    when the model's components or scheduler are not the ones the config describes)."""
    config = ml_collections.ConfigDict(load_config_file(config_path)).to_dict()
    model = load_pretrained(model_dir)
    components, _ = split_model_config(config)
    mismatches = config_mismatches(components, model.configs)
    if mismatches:
        raise ValueError(
            f"{model_dir} does not have the components {config_path} describes ({'; '.join(mismatches)}): "
            "package the model its own config describes, or retrain it with this config"
        )
    expected = modelscope_scheduler_config(config.get("scheduler"))
    if model.scheduler_config() != expected:
        raise ValueError(
            f"{model_dir} was trained with the scheduler {model.scheduler_config()}, but {config_path} describes {expected}: "
            "package the model its own config describes"
        )
    sampling = config.get("sampling")
    with tempfile.TemporaryDirectory() as scratch:
        if sampling:
            path = pathlib.Path(scratch) / SAMPLING_DEFAULTS_FILE
            path.write_text(json.dumps(sampling, indent=1))
            model.files = {**model.files, SAMPLING_DEFAULTS_FILE: path}
        save_converted(model, out, overwrite=True, storage_dtype="float16", compact=True)
    size = folder_bytes(out)
    if size > SIZE_LIMIT_BYTES:
        raise ValueError(f"the packaged model is {size / 1e6:.1f} MB, over the {SIZE_LIMIT_BYTES / 1e6:.0f} MB the package allows")
    return size


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m st2v_jax.embedded", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="the trained model folder (the streaming stage's <workdir>/model)")
    parser.add_argument("--config", required=True, help="the model's config file (its `sampling` entry becomes sampling.json)")
    parser.add_argument("--out", default=str(EMBEDDED_MODEL_DIR))
    args = parser.parse_args(argv)
    size = package_model(args.model_dir, args.config, pathlib.Path(args.out))
    print(f"packaged {args.model_dir} -> {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
