"""APM anchor preprocessing vs the official code path (kornia resize + CLIP normalisation)."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
kornia = pytest.importorskip("kornia")

from st2v_jax.models.image_preprocess import CLIP_MEAN, CLIP_STD, clip_image_preprocess  # noqa: E402


@pytest.mark.parametrize("height, width", [(256, 256), (128, 64), (720, 1280), (160, 96)])
def test_matches_kornia_bicubic_antialiased_resize(height, width):
    frames = np.random.RandomState(0).uniform(-1, 1, (2, 3, height, width)).astype(np.float32)
    x = kornia.geometry.resize(torch.from_numpy(frames), (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    want = kornia.enhance.normalize((x + 1.0) / 2.0, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)).numpy()
    got = np.asarray(clip_image_preprocess(jnp.asarray(frames.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    err = float(np.abs(got - want).max())
    print(f"\n{height}x{width} -> 224: max abs err {err:.1e} (|x| max {float(np.abs(want).max()):.2f})")
    assert err <= 2e-5
