"""AutoencoderKL parity with diffusers (fp32, tiny random configs), key conversion, and the
chunked video helpers."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from st2v_jax.convert.mapping import convert_state_dict
from st2v_jax.convert.readers import open_model_dir
from st2v_jax.convert.vae import vae_mapping
from st2v_jax.models.layers import abstract_params
from st2v_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, decode_video, encode_video

HEIGHT, WIDTH = 24, 16  # non-square, so a transposed H/W shows up as a shape or value error
NUM_IMAGES = 2
# fp32 noise (other conv/reduction orders) stays below ~5e-6 of max(1, std). The smallest bug
# we know of, a norm epsilon of 1e-5 instead of diffusers' 1e-6, already moves outputs by
# ~5e-5; a wrong pad side, bias or kernel axis by far more.
RELATIVE_TOLERANCE = 2e-5


@pytest.fixture(autouse=True)
def full_fp32_precision():
    """On GPUs JAX's default fp32 matmuls/convs use TF32, which alone exceeds the tolerance."""
    with jax.default_matmul_precision("float32"):
        yield

CONFIGS = {
    "two_levels": dict(block_out_channels=(32, 64), layers_per_block=1),
    "three_levels_no_quant_convs": dict(
        block_out_channels=(32, 32, 64), layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False
    ),
}


def _torch_vae(overrides: dict, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    levels = len(overrides["block_out_channels"])
    model = TorchAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=32,
        **overrides,
    ).eval()
    # Fresh norms are exactly (1, 0) and would hide a scale/bias mix-up; move every tensor.
    with torch.no_grad():
        for param in model.parameters():
            spread = 0.1 if param.ndim == 1 else param.std().item()
            param.add_(torch.randn_like(param) * spread)
    return model


def _to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def _to_nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def _convert(model: TorchAutoencoderKL, state_dict=None) -> tuple[AutoencoderKL, dict]:
    module = AutoencoderKL(AutoencoderKLConfig.from_diffusers(dict(model.config)))
    abstract = abstract_params(module, jnp.zeros((1, HEIGHT, WIDTH, 3)))
    sd = state_dict if state_dict is not None else {k: v.numpy() for k, v in model.state_dict().items()}
    return module, convert_state_dict(sd, vae_mapping(), abstract)


def _assert_close(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected)))
    std = float(np.std(expected))
    print(f"{name}: max abs err {err:.3e}, reference std {std:.3e}, err/max(1, std) {err / max(1.0, std):.3e}")
    assert err <= RELATIVE_TOLERANCE * max(1.0, std), f"{name}: max abs err {err:.3e} vs reference std {std:.3e}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request):
    model = _torch_vae(CONFIGS[request.param])
    module, params = _convert(model)
    return model, module, params


def test_encode_decode_match_diffusers(converted):
    model, module, params = converted
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (NUM_IMAGES, HEIGHT, WIDTH, 3)).astype(np.float32)
    factor = module.config.downscale_factor
    latents = rng.standard_normal((NUM_IMAGES, HEIGHT // factor, WIDTH // factor, 4)).astype(np.float32)

    with torch.no_grad():
        posterior = model.encode(_to_nchw(images)).latent_dist
        decoded = model.decode(_to_nchw(latents)).sample
    variables = {"params": params}
    mean, logvar = jax.jit(lambda x: module.apply(variables, x, method=AutoencoderKL.encode))(images)
    out = jax.jit(lambda z: module.apply(variables, z, method=AutoencoderKL.decode))(latents)

    _assert_close("encode mean", np.asarray(mean), _to_nhwc(posterior.mean))
    _assert_close("encode logvar", np.asarray(logvar), _to_nhwc(posterior.logvar))
    _assert_close("decode", np.asarray(out), _to_nhwc(decoded))


def test_legacy_attention_names_convert_identically(converted):
    model, _, params = converted
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in model.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value.numpy()
    assert any(".proj_attn." in key for key in legacy)
    _, legacy_params = _convert(model, legacy)
    jax.tree.map(np.testing.assert_array_equal, legacy_params, params)


def test_save_pretrained_folder_loads(converted, tmp_path):
    model, _, params = converted
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    module = AutoencoderKL(AutoencoderKLConfig.from_diffusers(config))
    assert module.config == AutoencoderKLConfig.from_diffusers(dict(model.config))
    abstract = abstract_params(module, jnp.zeros((1, HEIGHT, WIDTH, 3)))
    loaded = convert_state_dict(open_model_dir(tmp_path), vae_mapping(), abstract)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_video_helpers_chunk_like_per_frame(converted):
    _, module, params = converted
    batch, frames, chunk_size = 1, 5, 2  # 5 frames = 2 full chunks + 1 padded one
    video = jax.random.uniform(jax.random.key(1), (batch, frames, HEIGHT, WIDTH, 3), minval=-1, maxval=1)
    images = video.reshape(batch * frames, HEIGHT, WIDTH, 3)
    scale = module.config.scaling_factor
    variables = {"params": params}

    mean, logvar = jax.jit(lambda x: module.apply(variables, x, method=AutoencoderKL.encode))(images)
    latents = jax.jit(lambda v: encode_video(module, params, v, chunk_size=chunk_size))(video)
    _assert_close("encode_video", np.asarray(latents), np.asarray(mean * scale).reshape(latents.shape))

    noise_key = jax.random.key(2)
    sampled = jax.jit(lambda v: encode_video(module, params, v, rng=noise_key, chunk_size=chunk_size))(video)
    expected = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(noise_key, mean.shape)) * scale
    _assert_close("encode_video sample", np.asarray(sampled), np.asarray(expected).reshape(sampled.shape))

    decoded = jax.jit(lambda z: decode_video(module, params, z, chunk_size=chunk_size))(latents)
    unscaled = latents.reshape(mean.shape) / scale
    per_frame = jax.jit(lambda z: module.apply(variables, z, method=AutoencoderKL.decode))(unscaled)
    assert decoded.shape == video.shape
    _assert_close("decode_video", np.asarray(decoded), np.asarray(per_frame).reshape(decoded.shape))


def test_from_diffusers_rejects_unsupported_block_type():
    config = dataclasses.asdict(AutoencoderKLConfig())
    config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]
    with pytest.raises(ValueError, match=r"unsupported down block type 'AttnDownEncoderBlock2D'"):
        AutoencoderKLConfig.from_diffusers(config)


def test_from_diffusers_rejects_latent_shift():
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderKLConfig.from_diffusers({"shift_factor": 0.1159})
