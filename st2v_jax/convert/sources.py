"""Converts the weights users bring into our params, component by component.

Sources:
* a diffusers text-to-video folder (ModelScope text-to-video-ms-1.7b layout:
  model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
* the official StreamingT2V checkpoint (`streaming_t2v.ckpt`, a torch pickle whose
  `state_dict` holds `vae.`, `text_encoder.`, `image_encoder.`, `resampler.`, `unet.`,
  `base_model.` tensors), or a safetensors file with the same keys.
Tensors are read and converted one at a time (see `convert_state_dict`).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from st2v_jax.convert.clip import clip_text_ignored_keys, clip_text_mapping, clip_text_prefix, open_clip_vision_mapping
from st2v_jax.convert.components import COMPONENTS, PretrainedModel
from st2v_jax.convert.mapping import ConversionError, KeyMapping, convert_state_dict
from st2v_jax.convert.official_configs import MS_1_7B_TEXT_ENCODER, MS_1_7B_VAE, OPEN_CLIP_VIT_H_14, STREAMING_T2V
from st2v_jax.convert.readers import open_model_dir, open_weight_file
from st2v_jax.convert.streaming import STREAMING_PREFIXES, streaming_mapping
from st2v_jax.convert.unet3d import unet3d_mapping
from st2v_jax.convert.vae import vae_mapping

DIFFUSERS_LAYOUT = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ (text-to-video-ms-1.7b)"
# The open_clip model in the official image encoder keeps its unused text tower (only the
# `transformer` is deleted): these keys are dropped.
_OFFICIAL_IMAGE_ENCODER_UNUSED = tuple(
    "image_encoder.model." + k
    for k in ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale")
)


class _KeyView(Mapping[str, np.ndarray]):
    """The keys of a state dict that start with `prefix` minus those starting with `exclude`,
    seen without the prefix when `strip`. Tensors stay unread until asked for."""

    def __init__(
        self, state_dict: Mapping[str, np.ndarray], prefix: str, exclude: tuple[str, ...] = (), strip: bool = False
    ) -> None:
        self._sd = state_dict
        self._prefix = prefix if strip else ""
        self._keys = [
            k[len(self._prefix) :] for k in state_dict if k.startswith(prefix) and not (exclude and k.startswith(exclude))
        ]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._sd[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _convert(component: str, config: dict, state_dict: Mapping[str, np.ndarray], mapping: KeyMapping, **kwargs: Any) -> Any:
    spec = COMPONENTS[component]
    try:
        return convert_state_dict(
            state_dict, mapping, spec.abstract_params(spec.parse_config(config)), progress=f"converting {component}", **kwargs
        )
    except ConversionError as err:
        raise ConversionError(f"{component}: {err}") from None


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (expected layout: {DIFFUSERS_LAYOUT})")
    return json.loads(path.read_text())


def from_diffusers_dir(directory: str | os.PathLike) -> PretrainedModel:
    """A text-to-video-ms-1.7b-style diffusers folder -> unet, vae and text_encoder params."""
    root = pathlib.Path(directory)
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers pipeline folder: no model_index.json (expected {DIFFUSERS_LAYOUT})")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} lacks {sub}/ (expected layout: {DIFFUSERS_LAYOUT})")
    configs = {
        "unet": _read_json(root / "unet" / "config.json"),
        "vae": _read_json(root / "vae" / "config.json"),
        "text_encoder": _read_json(root / "text_encoder" / "config.json"),
    }
    text_sd = open_model_dir(root / "text_encoder")
    text_prefix = clip_text_prefix(text_sd)
    params = {
        "unet": _convert("unet", configs["unet"], open_model_dir(root / "unet"), unet3d_mapping()),
        "vae": _convert("vae", configs["vae"], open_model_dir(root / "vae"), vae_mapping()),
        "text_encoder": _convert(
            "text_encoder",
            configs["text_encoder"],
            text_sd,
            clip_text_mapping(text_prefix),
            ignore=clip_text_ignored_keys(text_prefix),
        ),
    }
    files = {f"{sub}/{p.name}": p for sub in ("tokenizer", "scheduler") for p in sorted((root / sub).iterdir()) if p.is_file()}
    sources = sorted(p for sub in ("unet", "vae", "text_encoder") for p in (root / sub).iterdir() if p.is_file())
    return PretrainedModel(configs, params, files, sources)


def _official_state_dict(path: pathlib.Path) -> Mapping[str, np.ndarray]:
    state_dict = open_weight_file(path)
    if any(k.startswith("state_dict.") for k in state_dict):
        # A torch checkpoint: the weights are ckpt["state_dict"]; other entries are dropped.
        return _KeyView(state_dict, "state_dict.", strip=True)
    return state_dict


def from_official_checkpoint(
    path: str | os.PathLike,
    configs: Optional[Mapping[str, dict]] = None,
    base_model_dir: Optional[str | os.PathLike] = None,
) -> PretrainedModel:
    """The official StreamingT2V checkpoint -> streaming (+ vae, text_encoder, image_encoder
    when the file holds them) params.

    Component configs default to the official model's; `configs` overrides any of them
    ({"streaming": {"unet": ..., "streaming": ...}, "vae": ..., ...}). `base_model_dir`, a
    text-to-video-ms-1.7b diffusers folder, adds its UNet3D (the release makes the first
    chunk with it), tokenizer and scheduler config, and supplies the VAE and text-encoder
    configs. Every key of the file must be used, as the release's strict load demands.
    """
    path = pathlib.Path(path)
    state_dict = _official_state_dict(path)
    base = from_diffusers_dir(base_model_dir) if base_model_dir is not None else None
    chosen = {
        "streaming": STREAMING_T2V,
        "vae": base.configs["vae"] if base else MS_1_7B_VAE,
        "text_encoder": base.configs["text_encoder"] if base else MS_1_7B_TEXT_ENCODER,
        "image_encoder": OPEN_CLIP_VIT_H_14,
        **(configs or {}),
    }
    frozen = {  # component: (key prefix, mapping, conversion options)
        "vae": ("vae.", vae_mapping("vae."), {}),
        "text_encoder": (
            "text_encoder.",
            clip_text_mapping("text_encoder.text_model."),
            {"ignore": clip_text_ignored_keys("text_encoder.text_model.")},
        ),
        "image_encoder": (
            "image_encoder.",
            open_clip_vision_mapping("image_encoder.model.visual."),
            {"ignore": _OFFICIAL_IMAGE_ENCODER_UNUSED},
        ),
    }
    frozen_prefixes = tuple(prefix for prefix, _, _ in frozen.values())
    unexpected = [k for k in state_dict if not k.startswith(STREAMING_PREFIXES + frozen_prefixes)]
    if unexpected:
        raise ConversionError(
            f"{path}: {len(unexpected)} keys belong to no StreamingT2V component "
            f"(expected prefixes {STREAMING_PREFIXES + frozen_prefixes}): " + ", ".join(unexpected[:10])
        )
    parts = {"streaming": (_KeyView(state_dict, "", exclude=frozen_prefixes), streaming_mapping(), {})}
    for name, (prefix, mapping, options) in frozen.items():
        view = _KeyView(state_dict, prefix)
        if len(view):
            parts[name] = (view, mapping, options)
    model = PretrainedModel(
        configs={name: chosen[name] for name in parts},
        params={name: _convert(name, chosen[name], view, mapping, **options) for name, (view, mapping, options) in parts.items()},
        sources=[path],
    )
    if base is not None:
        model.configs["unet"], model.params["unet"] = base.configs["unet"], base.params["unet"]
        model.files.update(base.files)
        model.sources += base.sources
    return model
