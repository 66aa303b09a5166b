"""The embedded default model st2v-shapes-tiny: shipped in the package within its size limit,
and what `python -m st2v_jax.sample` runs when no model is named. (Its quality is measured by
`python -m st2v_jax.evaluate_shapes`, the README's table.)"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from st2v_jax import embedded, sample
from st2v_jax.config_files import load_config_file
from st2v_jax.convert.components import modelscope_scheduler_config
from st2v_jax.generation.video_writer import count_playable_frames, sidecar_path_for
from st2v_jax.pretrained import load_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
README_PROMPT = "a red circle and a blue square bouncing"


def test_the_package_ships_the_model_within_the_size_limit():
    size = embedded.folder_bytes(embedded.EMBEDDED_MODEL_DIR)
    print(f"embedded model: {size / 1e6:.2f} MB")
    assert 0 < size <= embedded.SIZE_LIMIT_BYTES
    model = load_pretrained(embedded.EMBEDDED_MODEL_DIR)
    assert {"unet", "streaming", "vae", "text_encoder", "image_encoder"} <= set(model.params)
    assert model.tokenizer_dir() is not None
    recipe = load_config_file(REPO / "configs" / "st2v_shapes_tiny.py")
    assert model.sampling_defaults() == dict(recipe["sampling"])
    assert model.scheduler_config() == modelscope_scheduler_config(dict(recipe["scheduler"]))


def test_readme_main_command_samples_with_the_embedded_model():
    readme = (REPO / "README.md").read_text()
    assert f'python -m st2v_jax.sample --prompt "{README_PROMPT}"' in readme


def test_sample_without_a_model_flag_uses_the_embedded_model(tmp_path):
    out, pngs = tmp_path / "video.mp4", tmp_path / "png"
    assert sample.main(["--prompt", README_PROMPT, "--num-frames", "32", "--out", str(out), "--png-dir", str(pngs)]) == 0
    assert count_playable_frames(out) == 32
    sidecar = json.loads(sidecar_path_for(out).read_text())
    assert pathlib.Path(sidecar["settings"]["model"]).resolve() == embedded.EMBEDDED_MODEL_DIR
    recipe = load_config_file(REPO / "configs" / "st2v_shapes_tiny.py")
    assert {k: sidecar["settings"]["sampling"][k] for k in recipe["sampling"]} == dict(recipe["sampling"])
    frames = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(pngs.glob("*.png"))])
    assert frames.shape == (32, 64, 64, 3) and frames.std() > 1.0


def test_packaging_refuses_a_model_trained_with_another_scheduler(tiny_model_dir, tiny_config_variant, tmp_path):
    # The tiny random model predicts epsilon.
    config = tiny_config_variant("config.scheduler = {'prediction_type': 'v_prediction'}")
    with pytest.raises(ValueError, match="was trained with the scheduler"):
        embedded.package_model(tiny_model_dir, config, tmp_path / "packaged")
    assert not (tmp_path / "packaged").exists()


def test_packaging_refuses_a_model_whose_components_differ_from_its_config(tiny_model_dir, tiny_config_variant, tmp_path):
    config = tiny_config_variant("config.image_encoder.vision_cfg.image_size = 64")
    with pytest.raises(ValueError, match=r"image_encoder\.vision_cfg\.image_size: 64 != 32"):
        embedded.package_model(tiny_model_dir, config, tmp_path / "packaged")
    assert not (tmp_path / "packaged").exists()
    embedded.package_model(tiny_model_dir, REPO / "configs" / "tiny_random.py", tmp_path / "packaged")
    assert (tmp_path / "packaged" / "st2v_manifest.json").is_file()
