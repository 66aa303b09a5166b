"""Golden parity with the authors' StreamingT2V code (../shared/fixtures/*/).

Each fixture set holds random weights in the official key layout, a tiny config and the
official outputs. We convert the weights with the converter meant for the real checkpoint,
build the model from the set's config.json only, and compare every recorded output and
intermediate within the bounds the fixtures' README gives.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_paths import FIXTURES
from flax import traverse_util

from st2v_jax.convert.mapping import convert_state_dict, torch_key_to_path
from st2v_jax.convert.readers import open_weight_file
from st2v_jax.convert.streaming import streaming_mapping
from st2v_jax.models.apm import APMContextMixer
from st2v_jax.convert.components import COMPONENTS
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D

SETS = sorted(p for p in FIXTURES.glob("*") if (p / "io.npz").is_file()) if FIXTURES.is_dir() else []

# (max abs) bounds of the fixtures' README.
BOUND_EPS = 1e-4
BOUND_EMBEDDINGS = 1e-4
BOUND_CAM_AND_PRE_MERGE = 5e-4
BOUND_POST_MERGE = 2e-3

if not SETS:
    pytestmark = pytest.mark.skip(reason=f"no official fixture sets found under {FIXTURES} (set ST2V_FIXTURES)")


def _video(x: np.ndarray) -> np.ndarray:
    """Official (B, F, C, h, w) -> ours (B, F, h, w, C)."""
    return np.transpose(x, (0, 1, 3, 4, 2))


def _latent(x: np.ndarray) -> np.ndarray:
    """Official (B, C, F, h, w) -> ours (B, F, h, w, C)."""
    return np.transpose(x, (0, 2, 3, 4, 1))


def _forward_with_intermediates(model: StreamingUNet3D, latents, t, text, image_embeds, cond_frames):
    out = {}
    out["resampler_tokens"] = model.resampler(image_embeds)
    context = model.build_context(text, image_embeds)
    out["encoder_hidden_states"] = context
    out["cam_cond_embedding"] = model.cam.cond_embedding(cond_frames)
    mid, skips, temb = model.base.encode(latents, t, context)
    cam_skips, cam_mid = model.cam_features(latents, t, context, cond_frames)
    merged = [m(s, c) for m, s, c in zip(model.skip_mergers, skips, cam_skips)]
    merged_mid = model.mid_merger(mid, cam_mid)
    for i in range(len(skips)):
        out[f"cam_down_{i:02d}"] = cam_skips[i]
        out[f"base_skip_pre_{i:02d}"] = skips[i]
        out[f"base_skip_post_{i:02d}"] = merged[i]
    out.update(cam_mid=cam_mid, base_mid_pre=mid, base_mid_post=merged_mid)
    out["eps"] = model.base.decode(merged_mid, merged, temb, context)
    out["eps_no_cam"] = model(latents, t, context, None)
    return out


@pytest.fixture(scope="module", params=SETS, ids=[s.name for s in SETS])
def fixture_set(request):
    root = request.param
    config = StreamingConfig.from_dict(json.loads((root / "config.json").read_text()))
    io = dict(np.load(root / "io.npz"))
    latents = _latent(io["latents"])
    abstract = COMPONENTS["streaming"].abstract_params(config)
    params = convert_state_dict(open_weight_file(root / "state_dict.safetensors"), streaming_mapping(), abstract)
    model = StreamingUNet3D(config)
    run = jax.jit(
        lambda p, t: model.apply(
            {"params": p},
            latents,
            t,
            io["text_embeds"],
            io["image_embeds"],
            _video(io["cond_frames"]),
            method=_forward_with_intermediates,
        )
    )
    return dict(root=root, config=config, io=io, params=params, run=run, model=model)


def _errors(got: dict, io: dict, prefix: str, names_and_layouts) -> dict[str, float]:
    errors = {}
    for name, layout in names_and_layouts:
        want = io[prefix + name]
        errors[name] = float(np.abs(np.asarray(got[name]) - layout(want)).max())
    return errors


def _report(title: str, errors: dict[str, float], bound: float) -> None:
    worst = max(errors, key=errors.get)
    print(f"\n{title}: worst {worst} max abs err {errors[worst]:.2e} (bound {bound:.0e}); " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert errors[worst] <= bound, f"{title}: {worst} differs by {errors[worst]:.3e} > {bound:.0e}"


def test_embeddings_and_apm_context(fixture_set):
    io, params, config = fixture_set["io"], fixture_set["params"], fixture_set["config"]
    got = fixture_set["run"](params, jnp.asarray(io["timesteps"][0]))
    same = lambda x: x
    errors = _errors(got, io, "", [("resampler_tokens", same), ("encoder_hidden_states", same), ("cam_cond_embedding", _video)])
    context = got["encoder_hidden_states"]
    for key in io:
        if key.startswith("apm_context/"):
            layer = torch_key_to_path(key[len("apm_context/") :])
            mixer_params = traverse_util.flatten_dict(params["base"])
            mixer_params = traverse_util.unflatten_dict(
                {k[len(layer) + 1 :]: v for k, v in mixer_params.items() if k[: len(layer)] == layer and k[len(layer)] == "mixer"}
            )
            mixed = APMContextMixer(config.text_tokens).apply({"params": mixer_params}, context)
            errors[key] = float(np.abs(np.asarray(mixed) - io[key]).max())
    assert any(k.startswith("apm_context/") for k in errors), "fixture set has no apm_context/* arrays"
    _report(f"{fixture_set['root'].name} embeddings/APM context", errors, BOUND_EMBEDDINGS)


@pytest.mark.parametrize("case", [0, 1])
def test_cam_features(fixture_set, case):
    io = fixture_set["io"]
    got = fixture_set["run"](fixture_set["params"], jnp.asarray(io[f"case{case}/timestep"]))
    names = [k.split("/", 1)[1] for k in io if k.startswith(f"case{case}/cam_")]
    errors = _errors(got, io, f"case{case}/", [(n, _video) for n in names])
    assert len(names) == fixture_set["config"].num_skips + 1
    _report(f"{fixture_set['root'].name} case {case} CAM features", errors, BOUND_CAM_AND_PRE_MERGE)


def test_skips_before_and_after_merging(fixture_set):
    io = fixture_set["io"]
    got = fixture_set["run"](fixture_set["params"], jnp.asarray(io["case0/timestep"]))
    pre = [k.split("/", 1)[1] for k in io if k.startswith("case0/base_") and "_pre" in k]
    post = [k.split("/", 1)[1] for k in io if k.startswith("case0/base_") and "_post" in k]
    assert pre and post, "fixture set has no base_*_pre/post arrays"
    _report(f"{fixture_set['root'].name} skips before merging", _errors(got, io, "case0/", [(n, _video) for n in pre]), BOUND_CAM_AND_PRE_MERGE)
    _report(f"{fixture_set['root'].name} skips after merging", _errors(got, io, "case0/", [(n, _video) for n in post]), BOUND_POST_MERGE)


@pytest.mark.parametrize("case", [0, 1])
def test_noise_prediction(fixture_set, case):
    io, params = fixture_set["io"], fixture_set["params"]
    t = jnp.asarray(io[f"case{case}/timestep"])
    got = fixture_set["run"](params, t)
    errors = {
        "eps": float(np.abs(np.asarray(got["eps"]) - _latent(io[f"case{case}/eps"])).max()),
        "eps_no_cam": float(np.abs(np.asarray(got["eps_no_cam"]) - _latent(io[f"case{case}/eps_no_cam"])).max()),
    }
    # A plain ModelScope UNet3D: no CAM and every APM gate closed (alpha = 0).
    no_apm = traverse_util.unflatten_dict(
        {k: (np.zeros_like(v) if k[-1] == "alpha" else v) for k, v in traverse_util.flatten_dict(params).items()}
    )
    errors["eps_plain"] = float(
        np.abs(np.asarray(fixture_set["run"](no_apm, t)["eps_no_cam"]) - _latent(io[f"case{case}/eps_plain"])).max()
    )
    scale = float(np.abs(io[f"case{case}/eps"]).max())
    _report(f"{fixture_set['root'].name} case {case} noise prediction (|eps| max {scale:.2f})", errors, BOUND_EPS)
