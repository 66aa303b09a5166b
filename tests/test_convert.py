"""End-to-end conversion: diffusers folders and official checkpoints -> verified folders -> models."""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from fixture_paths import FIXTURES  # noqa: E402
from open_clip_oracle import open_clip_transformer  # noqa: E402
from tiny_pipeline import make_tiny_text_to_video  # noqa: E402

from st2v_jax.convert.__main__ import main as convert_cli  # noqa: E402
from st2v_jax.convert.components import modelscope_scheduler_config  # noqa: E402
from st2v_jax.convert.mapping import ConversionError  # noqa: E402
from st2v_jax.convert.official_configs import MS_1_7B_SCHEDULER  # noqa: E402
from st2v_jax.convert.readers import open_weight_file  # noqa: E402
from st2v_jax.convert.sources import from_diffusers_dir, from_official_checkpoint  # noqa: E402
from st2v_jax.pretrained import load_pretrained  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = FIXTURES / "official_tiny_a"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"official fixture set not found at {FIXTURE}")


def _assert_same_params(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg="/".join(key))


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub") / "text-to-video-tiny"
    return directory, make_tiny_text_to_video(directory)


def test_diffusers_folder_converts_through_the_cli_and_loads(tiny_t2v, tmp_path):
    source, torch_modules = tiny_t2v
    out = tmp_path / "converted"
    assert convert_cli(["diffusers", "--model-dir", str(source), "--out", str(out)]) == 0
    converted = load_pretrained(out)
    direct = load_pretrained(source)  # a diffusers folder also loads directly
    assert set(converted.params) == {"unet", "vae", "text_encoder"}
    for name in converted.params:
        _assert_same_params(converted.params[name], direct.params[name])
        assert converted.configs[name] == direct.configs[name]

    # The converted folder is a complete model: tokenizer + UNet3D reproduce the torch pipeline's pieces.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted.files["tokenizer/vocab.json"].parent)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    text = converted.module("text_encoder").apply({"params": converted.params["text_encoder"]}, jnp.asarray(ids))
    with torch.no_grad():
        want_text = torch_modules["text_encoder"](torch.from_numpy(ids)).last_hidden_state.numpy()
    assert float(np.abs(np.asarray(text) - want_text).max()) <= 1e-4 * float(want_text.std())

    latents = np.random.RandomState(0).randn(1, 4, 3, 8, 8).astype(np.float32)
    eps = converted.module("unet").apply(
        {"params": converted.params["unet"]}, jnp.transpose(latents, (0, 2, 3, 4, 1)), jnp.asarray(500), text
    )
    with torch.no_grad():
        want = torch_modules["unet"](torch.from_numpy(latents), 500, encoder_hidden_states=torch.from_numpy(want_text)).sample
    err = float(np.abs(np.transpose(np.asarray(eps), (0, 4, 1, 2, 3)) - want.numpy()).max())
    print(f"\nconverted tiny ms-1.7b UNet3D vs diffusers: max abs err {err:.2e}")
    assert err <= 1e-4 * float(want.std())


def test_missing_pipeline_parts_are_named(tiny_t2v, tmp_path):
    source, _ = tiny_t2v
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((source / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"lacks unet/"):
        from_diffusers_dir(broken)
    with pytest.raises(FileNotFoundError, match="converted st2v_jax folder"):
        load_pretrained(tmp_path / "nothing-here")


VISION = dict(image_size=28, patch_size=7, width=64, layers=2, heads=4, output_dim=1024)


def _official_checkpoint(tmp_path: pathlib.Path, tiny_t2v) -> tuple[pathlib.Path, dict, dict]:
    """A torch checkpoint in the official layout: the fixture's streaming weights plus tiny
    frozen encoders under the official prefixes, and non-tensor training state."""
    _, torch_modules = tiny_t2v
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in open_weight_file(FIXTURE / "state_dict.safetensors").items()}
    state_dict.update({"vae." + k: v for k, v in torch_modules["vae"].state_dict().items()})
    state_dict.update({"text_encoder.text_model." + k: v for k, v in torch_modules["text_encoder"].state_dict().items()})
    oracle = open_clip_transformer()
    vision = oracle.VisionTransformer(**{k: VISION[k] for k in ("image_size", "patch_size", "width", "layers", "heads")}, mlp_ratio=4.0, output_dim=1024)
    state_dict.update({"image_encoder.model.visual." + k: v for k, v in vision.state_dict().items()})
    # open_clip keeps its (unused) text parts next to the visual tower.
    state_dict["image_encoder.model.logit_scale"] = torch.tensor(4.6)
    state_dict["image_encoder.model.token_embedding.weight"] = torch.zeros(10, 8)
    path = tmp_path / "streaming_t2v.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.9"}, path)
    fixture_config = json.loads((FIXTURE / "config.json").read_text())
    configs = {
        "streaming": {"unet": fixture_config["unet"], "streaming": fixture_config["streaming"]},
        "vae": dict(torch_modules["vae"].config),
        "text_encoder": torch_modules["text_encoder"].config.to_dict(),
        "image_encoder": {"embed_dim": 1024, "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 64, "layers": 2, "head_width": 16}},
    }
    return path, configs, {"vision": vision}


@needs_fixture
def test_official_torch_checkpoint_converts_every_component(tmp_path, tiny_t2v):
    path, configs, _ = _official_checkpoint(tmp_path, tiny_t2v)
    model = from_official_checkpoint(path, configs)
    assert set(model.params) == {"streaming", "vae", "text_encoder", "image_encoder"}
    reference = from_official_checkpoint(FIXTURE / "state_dict.safetensors", {"streaming": configs["streaming"]})
    _assert_same_params(model.params["streaming"], reference.params["streaming"])
    _assert_same_params(model.params["vae"], from_diffusers_dir(tiny_t2v[0]).params["vae"])


@needs_fixture
def test_official_checkpoint_cli_with_base_model(tmp_path, tiny_t2v):
    config_file = tmp_path / "streaming.json"
    config_file.write_text((FIXTURE / "config.json").read_text())
    out = tmp_path / "converted"
    args = ["official", "--checkpoint", str(FIXTURE / "state_dict.safetensors"), "--config", str(config_file)]
    assert convert_cli(args + ["--base-model-dir", str(tiny_t2v[0]), "--out", str(out)]) == 0
    model = load_pretrained(out)
    assert set(model.params) == {"streaming", "unet"}
    assert "tokenizer/vocab.json" in model.files and "scheduler/scheduler_config.json" in model.files
    assert convert_cli(args + ["--out", str(out)]) == 2  # refuses to overwrite silently


@needs_fixture
def test_official_checkpoint_mismatches_are_refused(tmp_path, tiny_t2v):
    path, configs, _ = _official_checkpoint(tmp_path, tiny_t2v)
    with pytest.raises(ConversionError, match="mis-shaped"):
        from_official_checkpoint(path, {k: v for k, v in configs.items() if k != "streaming"})  # official full-size config
    state_dict = dict(open_weight_file(FIXTURE / "state_dict.safetensors"))
    dropped = "base_model.cross_attention_merger_mid_block.temporal_transformer.proj_out.weight"
    del state_dict[dropped]
    state_dict["ema.decay"] = np.zeros(())
    partial = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, partial)
    with pytest.raises(ConversionError, match=r"ema\.decay"):
        from_official_checkpoint(partial, configs)
    del state_dict["ema.decay"]
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, partial)
    with pytest.raises(ConversionError, match="missing parameters:\n  mid_merger/proj_out/kernel"):
        from_official_checkpoint(partial, configs)


def test_random_model_takes_scheduler_overrides_from_its_config(tiny_config_variant, tmp_path):
    config = tiny_config_variant("config.scheduler = {'prediction_type': 'v_prediction'}")
    out = tmp_path / "tiny-v"
    assert convert_cli(["random", "--config", str(config), "--out", str(out)]) == 0
    scheduler = load_pretrained(out).scheduler_config()
    assert scheduler == {**MS_1_7B_SCHEDULER, "prediction_type": "v_prediction"}


def test_bad_scheduler_overrides_are_refused_by_name():
    assert modelscope_scheduler_config() == MS_1_7B_SCHEDULER
    with pytest.raises(ValueError, match=r"\['beta_stop'\] are not keys of the scheduler config"):
        modelscope_scheduler_config({"beta_stop": 0.02})
    with pytest.raises(ValueError, match="prediction_type"):
        modelscope_scheduler_config({"prediction_type": "x0"})
