"""Test support for the evaluation metrics: synthetic videos with known motion (smooth
textures, pans, mp4 files) and a tiny random transformers CLIPModel folder (the CLIP-score
oracle and input)."""
from __future__ import annotations

import pathlib

import imageio_ffmpeg
import numpy as np
import pytest

from st2v_jax.tokenizer import write_byte_level_tokenizer

CLIP_IMAGE_SIZE = 28


def smooth_texture(height: int, width: int, seed: int, low: float = 20, high: float = 200) -> np.ndarray:
    """uint8 (height, width, 3) random texture, smooth at the scale of 8 pixels."""
    rng = np.random.RandomState(seed)
    coarse = rng.uniform(low, high, (height // 8 + 2, width // 8 + 2, 3))
    fine = np.kron(coarse, np.ones((8, 8, 1)))
    for axis in (0, 1):  # a box blur removes the block edges
        fine = sum(np.roll(fine, shift, axis) for shift in range(-4, 4)) / 8
    return fine[:height, :width].round().astype(np.uint8)


def pan(texture: np.ndarray, frames: int, size: int, step: tuple[int, int]) -> np.ndarray:
    """size x size crops of `texture` whose content moves by step = (dx, dy) pixels per frame."""
    dx, dy = step
    x0, y0 = 2 + max(0, dx) * frames, 2 + max(0, dy) * frames
    return np.stack([texture[y0 - t * dy : y0 - t * dy + size, x0 - t * dx : x0 - t * dx + size] for t in range(frames)])


def write_mp4(path: pathlib.Path, frames: np.ndarray, fps: int = 8) -> pathlib.Path:
    """uint8 (T, H, W, 3) -> a high-quality H.264 mp4 (H and W multiples of 16)."""
    writer = imageio_ffmpeg.write_frames(str(path), frames.shape[2:0:-1], fps=fps, quality=9, macro_block_size=16)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def write_tiny_clip_model(directory: pathlib.Path):
    """Saves a random CLIPModel (2 layers per tower, width 32), a byte-level tokenizer and a
    preprocessor config to `directory`; returns the model. Weights are redrawn so that layer
    norms are not the identity and every layer matters."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    towers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.CLIPConfig(
        # The byte-level tokenizer has 514 tokens: 0 <|startoftext|>, 1 <|endoftext|> (also padding).
        text_config=dict(vocab_size=514, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu", **towers),
        vision_config=dict(image_size=CLIP_IMAGE_SIZE, patch_size=7, hidden_act="quick_gelu", **towers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            if param.ndim >= 2:
                param.copy_(noise * param[0].numel() ** -0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.25 * noise)
            else:
                param.copy_(0.25 * noise)
    model.save_pretrained(directory)
    write_byte_level_tokenizer(directory)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    ).save_pretrained(directory)
    return model
