"""A transformers `CLIPModel` folder -> our two CLIP towers (for the CLIP score).

The folder is what `save_pretrained` or a hub download gives (config.json, model.safetensors
or pytorch_model.bin, tokenizer files), e.g. openai/clip-vit-large-patch14 or
laion/CLIP-ViT-H-14-laion2B-s32B-b79K. The text tower maps key by key onto
CLIPTextTransformer (with its projection). transformers stores the vision tower with
separate q/k/v projections and a Linear visual projection, while OpenCLIPVisionTransformer
keeps open_clip's fused in_proj and `x @ proj`; so the vision tensors are presented under
open_clip's names (q; k; v concatenated, the projection transposed) and converted by the
open_clip mapping. Every vision tensor of the file must be used, or conversion is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from st2v_jax.convert.clip import clip_text_ignored_keys, clip_text_mapping, open_clip_vision_mapping
from st2v_jax.convert.mapping import ConversionError, convert_state_dict
from st2v_jax.convert.readers import open_model_dir
from st2v_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, OpenCLIPVisionConfig, OpenCLIPVisionTransformer
from st2v_jax.models.layers import abstract_params

TEXT_PREFIX = "text_model."
VISION_PREFIX = "vision_model."
VISUAL_PROJECTION = "visual_projection.weight"
# Keys of a CLIPModel file that belong to neither tower's parameters.
_NOT_TOWER_PARAMETERS = ("logit_scale", VISION_PREFIX + "embeddings.position_ids")
_VISION_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "hidden_act", "layer_norm_eps",
)
_VISION_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> OpenCLIPVisionConfig.quick_gelu


@dataclasses.dataclass(frozen=True)
class CLIPModelConfigs:
    text: CLIPTextConfig
    vision: OpenCLIPVisionConfig


def clip_model_configs(config: Mapping[str, Any]) -> CLIPModelConfigs:
    """Both tower configs from a CLIPModel config.json (the joint `projection_dim` is the
    output size of both; the sub-configs' own projection_dim fields are unused defaults)."""
    if config.get("model_type") != "clip":
        raise ValueError(f"not a transformers CLIPModel config (model_type {config.get('model_type')!r}, expected 'clip')")
    missing = [name for name in ("text_config", "vision_config", "projection_dim") if name not in config]
    vision = config.get("vision_config", {})
    missing += [f"vision_config.{name}" for name in _VISION_FIELDS if name not in vision]
    if missing:
        raise ValueError(f"CLIPModel config lacks {missing}")
    if vision["hidden_act"] not in _VISION_ACTIVATIONS:
        raise ValueError(f"vision hidden_act {vision['hidden_act']!r} is not supported (supported: {sorted(_VISION_ACTIVATIONS)})")
    if vision["intermediate_size"] % vision["hidden_size"]:
        raise ValueError(f"vision intermediate_size {vision['intermediate_size']} is not a multiple of hidden_size {vision['hidden_size']}")
    projection_dim = int(config["projection_dim"])
    text = dataclasses.replace(CLIPTextConfig.from_transformers(config["text_config"]), projection_dim=projection_dim)
    return CLIPModelConfigs(
        text=text,
        vision=OpenCLIPVisionConfig(
            image_size=int(vision["image_size"]),
            patch_size=int(vision["patch_size"]),
            width=int(vision["hidden_size"]),
            layers=int(vision["num_hidden_layers"]),
            heads=int(vision["num_attention_heads"]),
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
            output_dim=projection_dim,
            quick_gelu=_VISION_ACTIVATIONS[vision["hidden_act"]],
            layer_norm_eps=float(vision["layer_norm_eps"]),
        ),
    )


def _open_clip_vision_sources(layers: int) -> dict[str, tuple[str, ...]]:
    """open_clip vision key -> the transformers keys it is made of."""
    v = VISION_PREFIX
    sources = {
        "conv1.weight": (v + "embeddings.patch_embedding.weight",),
        "class_embedding": (v + "embeddings.class_embedding",),
        "positional_embedding": (v + "embeddings.position_embedding.weight",),
        "proj": (VISUAL_PROJECTION,),
    }
    for leaf in ("weight", "bias"):
        sources[f"ln_pre.{leaf}"] = (f"{v}pre_layrnorm.{leaf}",)  # sic: transformers' spelling
        sources[f"ln_post.{leaf}"] = (f"{v}post_layernorm.{leaf}",)
        for i in range(layers):
            hf, oc = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
            sources[f"{oc}attn.in_proj_{leaf}"] = tuple(f"{hf}self_attn.{p}_proj.{leaf}" for p in "qkv")
            for oc_name, hf_name in (
                ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
            ):
                sources[f"{oc}{oc_name}.{leaf}"] = (f"{hf}{hf_name}.{leaf}",)
    return sources


class OpenCLIPVisionView(Mapping[str, np.ndarray]):
    """A CLIPModel state dict's vision tower under open_clip VisionTransformer names; tensors
    are read (and fused or transposed) only when asked for."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], layers: int) -> None:
        self._sd = state_dict
        self._sources = _open_clip_vision_sources(layers)
        used = {key for keys in self._sources.values() for key in keys}
        vision_keys = {k for k in state_dict if (k.startswith(VISION_PREFIX) or k == VISUAL_PROJECTION)}
        missing = sorted(used - set(state_dict))
        unused = sorted(vision_keys - used - set(_NOT_TOWER_PARAMETERS))
        if missing or unused:
            raise ConversionError(
                f"CLIPModel vision tower does not match a {layers}-layer ViT: "
                f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unused {unused[:10]}{' ...' if len(unused) > 10 else ''}"
            )

    def __getitem__(self, key: str) -> np.ndarray:
        arrays = [np.asarray(self._sd[source]) for source in self._sources[key]]
        if key == "proj":  # Linear (out, in) used as x @ proj (in, out)
            return arrays[0].T
        return np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def convert_clip_model(state_dict: Mapping[str, np.ndarray], configs: CLIPModelConfigs) -> dict[str, Any]:
    """CLIPModel state dict -> {"text": CLIPTextTransformer params, "vision": OpenCLIPVisionTransformer params}."""
    ids = jnp.zeros((1, configs.text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, configs.vision.image_size, configs.vision.image_size, 3))
    other_keys = tuple(k for k in state_dict if not k.startswith(TEXT_PREFIX) and k != "text_projection.weight")
    text = convert_state_dict(
        state_dict,
        clip_text_mapping(TEXT_PREFIX, projection_prefix=""),
        abstract_params(CLIPTextTransformer(configs.text), ids),
        ignore=other_keys + clip_text_ignored_keys(TEXT_PREFIX),
    )
    vision = convert_state_dict(
        OpenCLIPVisionView(state_dict, configs.vision.layers),
        open_clip_vision_mapping(),
        abstract_params(OpenCLIPVisionTransformer(configs.vision), pixels),
    )
    return {"text": text, "vision": vision}


def load_clip_model_dir(directory: str | os.PathLike) -> tuple[CLIPModelConfigs, dict[str, Any]]:
    """Configs and converted params of a transformers CLIPModel folder."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a transformers CLIPModel folder: no config.json")
    configs = clip_model_configs(json.loads(config_path.read_text()))
    return configs, convert_clip_model(open_model_dir(directory), configs)
