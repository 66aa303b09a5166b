"""The model components a pretrained checkpoint is made of, and how each is built.

Every component is described by its source configuration (the JSON its original library
writes: diffusers, transformers, open_clip or the StreamingT2V fixture format), so a
converted checkpoint keeps exactly what the user's files said.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, OpenCLIPVisionConfig, OpenCLIPVisionTransformer
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D, streaming_abstract_params
from st2v_jax.models.layers import abstract_params
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig
from st2v_jax.models.vae import AutoencoderKL, AutoencoderKLConfig


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    description: str
    parse_config: Callable[[Mapping[str, Any]], Any]
    build: Callable[[Any], nn.Module]
    abstract_params: Callable[[Any], Any]


def _unet_params(config: UNet3DConfig) -> Any:
    size = 2 ** (len(config.block_out_channels) - 1)
    return abstract_params(
        UNet3D(config),
        jnp.zeros((1, 2, size, size, config.in_channels)),
        jnp.zeros((), jnp.int32),
        jnp.zeros((1, 1, config.cross_attention_dim)),
    )


def _streaming_params(config: StreamingConfig) -> Any:
    size = 2 ** (len(config.unet.block_out_channels) - 1)
    return streaming_abstract_params(config, (size, size))


def _vae_params(config: AutoencoderKLConfig) -> Any:
    size = 2 ** (len(config.block_out_channels) - 1)
    return abstract_params(AutoencoderKL(config), jnp.zeros((1, size, size, config.in_channels)))


def _text_params(config: CLIPTextConfig) -> Any:
    return abstract_params(CLIPTextTransformer(config), jnp.zeros((1, config.max_position_embeddings), jnp.int32))


def _image_params(config: OpenCLIPVisionConfig) -> Any:
    return abstract_params(OpenCLIPVisionTransformer(config), jnp.zeros((1, config.image_size, config.image_size, 3)))


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet", "text-to-video UNet3D (diffusers unet/config.json)", UNet3DConfig.from_diffusers, UNet3D, _unet_params),
        Component(
            "streaming",
            "StreamingT2V UNet3D + CAM + APM ({'unet': ..., 'streaming': ...})",
            StreamingConfig.from_dict,
            StreamingUNet3D,
            _streaming_params,
        ),
        Component("vae", "AutoencoderKL (diffusers vae/config.json)", AutoencoderKLConfig.from_diffusers, AutoencoderKL, _vae_params),
        Component(
            "text_encoder",
            "CLIP text tower (transformers text_encoder/config.json)",
            CLIPTextConfig.from_transformers,
            CLIPTextTransformer,
            _text_params,
        ),
        Component(
            "image_encoder",
            "OpenCLIP vision tower (open_clip model config)",
            OpenCLIPVisionConfig.from_open_clip,
            OpenCLIPVisionTransformer,
            _image_params,
        ),
    )
}


@dataclasses.dataclass
class PretrainedModel:
    """Params of each component in our layout, with the source config that describes it.

    `files` are plain files kept beside the weights (tokenizer, scheduler config), as
    {relative path: location}; `sources` the weight files the params came from.
    """

    configs: dict[str, dict]
    params: dict[str, Any]
    files: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    sources: list[pathlib.Path] = dataclasses.field(default_factory=list)

    def config(self, component: str) -> Any:
        """The parsed config (e.g. `UNet3DConfig`) of a component."""
        if component not in self.configs:
            raise KeyError(f"this model has no {component!r} component (it has {sorted(self.configs)})")
        return COMPONENTS[component].parse_config(self.configs[component])

    def module(self, component: str) -> nn.Module:
        """The Flax module of a component; apply it with `self.params[component]`."""
        return COMPONENTS[component].build(self.config(component))
