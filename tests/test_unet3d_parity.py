"""UNet3D vs diffusers' UNet3DConditionModel (PyTorch oracle), tiny random config, fp32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from st2v_jax.convert.mapping import convert_state_dict  # noqa: E402
from st2v_jax.convert.unet3d import unet3d_mapping  # noqa: E402
from st2v_jax.models.layers import abstract_params
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig  # noqa: E402


def _reference(**kwargs):
    torch.manual_seed(0)
    model = diffusers.UNet3DConditionModel(**kwargs).eval()
    with torch.no_grad():  # non-trivial values for zero-initialised layers (temporal conv4, ...)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        # Odd latent sizes: 12x10 -> 6x5 -> 3x3 -> 2x2 exercises the exact upsample sizes.
        (dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=8, cross_attention_dim=48), (2, 5, 12, 10)),
        (
            dict(
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                layers_per_block=1,
                attention_head_dim=16,
                cross_attention_dim=24,
            ),
            (1, 3, 8, 8),
        ),
    ],
    ids=["four-levels-odd-size", "two-levels"],
)
def test_unet3d_matches_diffusers(kwargs, shape):
    reference = _reference(norm_num_groups=32, sample_size=None, **kwargs)
    config = UNet3DConfig.from_diffusers(reference.config)
    model = UNet3D(config)
    b, f, h, w = shape
    rng = np.random.RandomState(0)
    latents = rng.randn(b, 4, f, h, w).astype(np.float32)
    context = rng.randn(b, 7, config.cross_attention_dim).astype(np.float32)
    abstract = abstract_params(model, jnp.zeros((b, f, h, w, 4)), jnp.zeros(()), jnp.zeros((b, 7, config.cross_attention_dim)))
    # convert_state_dict refuses any unmapped, missing or mis-shaped tensor.
    params = convert_state_dict({k: v.numpy() for k, v in reference.state_dict().items()}, unet3d_mapping(), abstract)
    with torch.no_grad():
        want = reference(torch.from_numpy(latents), 321, encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.transpose(latents, (0, 2, 3, 4, 1)), jnp.asarray(321), context)
    got = np.transpose(np.asarray(got), (0, 4, 1, 2, 3))
    err, scale = float(np.abs(got - want).max()), float(want.std())
    print(f"\nUNet3D parity: max abs err {err:.2e}, output std {scale:.3f}, relative {err / scale:.1e}")
    assert err <= 1e-4 * scale
