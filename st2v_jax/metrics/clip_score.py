"""CLIP score (paper Table 1; higher is better): how well the frames show the prompt,
100 x cosine(text embedding, frame embedding), averaged over all frames of a video (and then,
by the caller, over videos).

The paper does not name its CLIP model, so the model is the user's choice: any transformers
`CLIPModel` folder (openai/clip-vit-large-patch14 is torchmetrics' default), converted by
`st2v_jax.convert.clip_model` onto our Flax towers. `CLIPScorer.name` identifies it in
results. Frames are preprocessed as transformers' CLIPImageProcessor does with PIL
(bicubic resize of the shorter side, centre crop, the model's mean/std), following the
folder's preprocessor_config.json when there is one.
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from st2v_jax.convert.clip_model import CLIPModelConfigs, load_clip_model_dir
from st2v_jax.models.clip import CLIPTextTransformer, OpenCLIPVisionTransformer
from st2v_jax.models.image_preprocess import CLIP_MEAN, CLIP_STD
from st2v_jax.tokenizer import PromptTooLongWarning, load_tokenizer, tokenize

_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, transformers' CLIP default


def preprocess_frames(
    frames: np.ndarray,
    crop_size: int,
    shortest_edge: Optional[int] = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resample: int = _PIL_BICUBIC,
) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> float32 (T, crop_size, crop_size, 3), as
    CLIPImageProcessor: shorter side to `shortest_edge` (default crop_size) with PIL, the
    longer to int(edge * long / short), centre crop, /255, (x - mean) / std."""
    edge = shortest_edge or crop_size
    h, w = frames.shape[1:3]
    short, long = sorted((h, w))
    new_short, new_long = edge, int(edge * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"resized frames {new_h}x{new_w} are smaller than the crop {crop_size}")
    out = np.empty((len(frames), crop_size, crop_size, 3), np.float32)
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample))
        out[i] = resized[top : top + crop_size, left : left + crop_size] * np.float32(1 / 255)
    return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def clip_score(text_embedding: np.ndarray, frame_embeddings: np.ndarray) -> float:
    """100 x the cosine of the text embedding (D,) with each frame embedding (T, D), averaged."""
    text = text_embedding / np.linalg.norm(text_embedding)
    frames = frame_embeddings / np.linalg.norm(frame_embeddings, axis=-1, keepdims=True)
    return float(100.0 * np.mean(frames @ text))


class CLIPScorer:
    """Text and frame embeddings of one CLIP model, jitted; `scorer(frames, prompt)` -> score.
    Frames go through the vision tower in padded batches of `batch_size` (one program), at
    full float32 matmul precision (the same score on every accelerator)."""

    def __init__(
        self,
        configs: CLIPModelConfigs,
        params: dict[str, Any],
        tokenizer: Any,
        name: str,
        preprocessing: Optional[dict[str, Any]] = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.configs, self.params, self.tokenizer, self.name = configs, params, tokenizer, name
        self.preprocessing = dict(preprocessing or {"crop_size": configs.vision.image_size})
        if self.preprocessing["crop_size"] != configs.vision.image_size:
            raise ValueError(
                f"the preprocessor crops to {self.preprocessing['crop_size']} but the vision tower takes {configs.vision.image_size}"
            )
        self.batch_size = batch_size
        text_tower, vision_tower = CLIPTextTransformer(configs.text), OpenCLIPVisionTransformer(configs.vision)
        self._text = jax.jit(lambda p, ids: text_tower.apply({"params": p}, ids, method=CLIPTextTransformer.text_embeds))
        self._vision = jax.jit(lambda p, pixels: vision_tower.apply({"params": p}, pixels))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, batch_size: int = 16) -> "CLIPScorer":
        """A transformers CLIPModel folder: config.json, weights, tokenizer files and
        (optionally) preprocessor_config.json."""
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"CLIP model folder not found: {directory}")
        configs, params = load_clip_model_dir(directory)
        config = json.loads((directory / "config.json").read_text())
        name = config.get("_name_or_path") or directory.name
        return cls(configs, params, load_tokenizer(directory), name, _read_preprocessing(directory, configs), batch_size)

    def text_embedding(self, prompt: str) -> np.ndarray:
        ids, cut = tokenize(self.tokenizer, [prompt], self.configs.text.max_position_embeddings)
        if cut[0]:
            warnings.warn(f"CLIP score: prompt cut to the tokenizer's length, dropped: {cut[0]!r}", PromptTooLongWarning)
        with jax.default_matmul_precision("highest"):
            return np.asarray(self._text(self.params["text"], jnp.asarray(ids)))[0]

    def frame_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) -> (T, D)."""
        pixels = preprocess_frames(frames, **self.preprocessing)
        pad = -len(pixels) % self.batch_size
        pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], pixels.dtype)])
        with jax.default_matmul_precision("highest"):
            batches = [
                np.asarray(self._vision(self.params["vision"], pixels[i : i + self.batch_size]))
                for i in range(0, len(pixels), self.batch_size)
            ]
        return np.concatenate(batches)[: len(frames)]

    def __call__(self, frames: np.ndarray, prompt: str) -> float:
        return clip_score(self.text_embedding(prompt), self.frame_embeddings(frames))


def _read_preprocessing(directory: pathlib.Path, configs: CLIPModelConfigs) -> dict[str, Any]:
    """preprocess_frames arguments from preprocessor_config.json, else CLIP's defaults."""
    path = directory / "preprocessor_config.json"
    image_size = configs.vision.image_size
    if not path.is_file():
        return {"crop_size": image_size}
    config = json.loads(path.read_text())
    crop, size = config.get("crop_size", image_size), config.get("size", image_size)
    if isinstance(crop, dict) and crop.get("height") != crop.get("width"):
        raise ValueError(f"{path}: only square crops are supported, got crop_size {crop}")
    if isinstance(size, dict) and "shortest_edge" not in size:
        raise ValueError(f"{path}: only a shortest_edge resize is supported, got size {size}")
    return {
        "crop_size": int(crop["height"] if isinstance(crop, dict) else crop),
        "shortest_edge": int(size["shortest_edge"] if isinstance(size, dict) else size),
        "mean": tuple(config.get("image_mean", CLIP_MEAN)),
        "std": tuple(config.get("image_std", CLIP_STD)),
        "resample": int(config.get("resample", _PIL_BICUBIC)),
    }
