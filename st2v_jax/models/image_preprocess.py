"""The official APM image-encoder preprocessing (FrozenOpenCLIPImageEmbedder):

    kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    x = (x + 1) / 2;  x = (x - CLIP mean) / CLIP std

kornia's antialiasing is a Gaussian blur (sigma = (scale - 1) / 2, reflect border) before
PyTorch's bicubic interpolation (a = -0.75, align_corners=True). Both are linear and
separable, so each axis becomes one (out x in) matrix built on the host.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: float) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _bicubic_align_corners(size_in: int, size_out: int) -> np.ndarray:
    matrix = np.zeros((size_out, size_in))
    # PyTorch computes source positions and weights in float32; so do we, to match it.
    scale = np.float32((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    for i in range(size_out):
        position = np.float32(i) * scale
        base = int(np.floor(position))
        for offset, weight in zip(range(-1, 3), _cubic_weights(np.float32(position - np.float32(base)))):
            matrix[i, min(max(base + offset, 0), size_in - 1)] += weight
    return matrix


def _gaussian_blur_reflect(size: int, scale: float) -> np.ndarray:
    sigma = max((scale - 1.0) / 2.0, 0.001)
    taps = int(max(4.0 * sigma, 3))
    taps += 1 - taps % 2
    if size == 1:
        return np.eye(1)
    offsets = np.arange(taps) - taps // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    matrix = np.zeros((size, size))
    for i in range(size):
        for offset, weight in zip(offsets, kernel):
            j = i + offset
            j = -j if j < 0 else (2 * (size - 1) - j if j >= size else j)  # reflect, edge not repeated
            matrix[i, j] += weight
    return matrix


@functools.lru_cache(maxsize=16)
def _resize_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    matrix = _bicubic_align_corners(size_in, size_out)
    if antialias and size_in > size_out:
        matrix = matrix @ _gaussian_blur_reflect(size_in, size_in / size_out)
    return matrix.astype(np.float32)


def resize_like_kornia(images: jax.Array, size: tuple[int, int], antialias: bool = True) -> jax.Array:
    """images (N, H, W, C) -> (N, size[0], size[1], C), as kornia's bicubic resize."""
    h, w = images.shape[1:3]
    antialias = antialias and max(h / size[0], w / size[1]) > 1  # kornia blurs both axes or neither
    rows = jnp.asarray(_resize_matrix(h, size[0], antialias))
    cols = jnp.asarray(_resize_matrix(w, size[1], antialias))
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("oh,pw,nhwc->nopc", rows, cols, images, precision=hp)


def clip_image_preprocess(frames: jax.Array, size: int = 224) -> jax.Array:
    """Frames (N, H, W, 3) in [-1, 1] -> CLIP-normalised (N, size, size, 3)."""
    x = (resize_like_kornia(frames, (size, size)) + 1.0) / 2.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
