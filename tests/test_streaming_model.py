"""Structure of the streaming model: zero-init identity, full-size parameter counts."""
from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from st2v_jax.config_files import load_config_file
from st2v_jax.convert.components import COMPONENTS
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D
from st2v_jax.models.layers import abstract_params
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig

REPO = pathlib.Path(__file__).resolve().parents[1]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree)))


def test_official_config_file_is_the_default():
    config = StreamingConfig.from_dict(load_config_file(REPO / "configs" / "streaming_t2v.py").to_dict())
    assert config == StreamingConfig()


def test_full_size_parameter_counts_without_allocation():
    params = COMPONENTS["streaming"].abstract_params(StreamingConfig())
    base_with_extras = _count(params["base"]) + _count(params["mid_merger"]) + sum(
        _count(v) for k, v in params.items() if k.startswith("skip_mergers_")
    )
    apm = sum(_count(v) for path, v in traverse_util.flatten_dict(nn.unbox(params["base"])).items() if "mixer" in path)
    counts = {
        "base UNet3D alone": _count(params["base"]) - apm,
        "base UNet3D + mergers + APM": base_with_extras,
        "CAM encoder with E_cond": _count(params["cam"]),
        "resampler": _count(params["resampler"]),
    }
    print(counts)
    assert counts == {
        "base UNet3D alone": 1_411_233_860,
        "base UNet3D + mergers + APM": 1_480_478_804,
        "CAM encoder with E_cond": 621_981_664,
        "resampler": 22_299_904,
    }


def test_full_size_unet3d_matches_diffusers_parameter_count():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = UNet3DConfig()
    with torch.device("meta"):
        reference = diffusers.UNet3DConditionModel(
            block_out_channels=config.block_out_channels,
            cross_attention_dim=config.cross_attention_dim,
            attention_head_dim=config.attention_head_dim,
        )
    ours = abstract_params(UNet3D(config), jnp.zeros((1, 16, 32, 32, 4)), jnp.zeros(()), jnp.zeros((1, 77, 1024)))
    assert _count(ours) == sum(p.numel() for p in reference.parameters()) == 1_411_233_860


def test_fresh_streaming_model_is_the_base_unet3d():
    """Zero-initialised merger projections and APM gates make a fresh model a no-op wrapper."""
    unet = UNet3DConfig(block_out_channels=(64, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=32, cross_attention_dim=48)
    config = StreamingConfig(unet=unet, num_frames=4, cam_frames=2, cam_conditioning_widths=(8, 16), text_tokens=5,
                             image_tokens=3, resampler_hidden=16, image_embed_dim=48)
    keys = jax.random.split(jax.random.key(0), 5)
    latents = jax.random.normal(keys[0], (2, 4, 8, 6, 4))
    text = jax.random.normal(keys[1], (2, 5, 48))
    image_embeds = jax.random.normal(keys[2], (2, 1, 48))
    cond_frames = jax.random.uniform(keys[3], (2, 2, 16, 12, 3), minval=-1, maxval=1)
    model = StreamingUNet3D(config)
    params = model.init(keys[4], latents, 500, text, image_embeds, cond_frames, method=StreamingUNet3D.predict)["params"]
    params = nn.unbox(params)
    eps = model.apply({"params": params}, latents, 500, text, image_embeds, cond_frames, method=StreamingUNet3D.predict)

    def drop_mixers(tree):
        return {k: drop_mixers(v) for k, v in tree.items() if k != "mixer"} if isinstance(tree, dict) else tree

    base_eps = UNet3D(unet).apply({"params": drop_mixers(params["base"])}, latents, 500, text)
    # The CAM branch really runs (its features are non-zero) yet changes nothing.
    cam_skips, _ = model.apply({"params": params}, latents, 500, jnp.concatenate([text, text[:, :3]], 1), cond_frames,
                               method=StreamingUNet3D.cam_features)
    assert float(jnp.abs(cam_skips[-1]).max()) > 0
    err = float(jnp.abs(eps - base_eps).max())
    print(f"fresh streaming model vs base UNet3D: max abs diff {err:.2e}, |eps| max {float(jnp.abs(base_eps).max()):.2f}")
    assert err <= 1e-6
