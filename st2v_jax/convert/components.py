"""The model components a pretrained checkpoint is made of, and how each is built.

Every component is described by its source configuration (the JSON its original library
writes: diffusers, transformers, open_clip or the StreamingT2V fixture format), so a
converted checkpoint keeps exactly what the user's files said.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.convert.official_configs import MS_1_7B_SCHEDULER
from st2v_jax.diffusion.schedules import NoiseSchedule
from st2v_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, OpenCLIPVisionConfig, OpenCLIPVisionTransformer
from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions, inference_params
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D
from st2v_jax.models.unet3d import UNet3D, UNet3DConfig
from st2v_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from st2v_jax.models.vid2vid_unet import Vid2VidUNet, Vid2VidUNetConfig


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    description: str
    parse_config: Callable[[Mapping[str, Any]], Any]
    build: Callable[..., nn.Module]  # (config[, execution=ExecutionOptions]) -> module
    # Smallest valid inputs for `init`, and the method that touches every parameter.
    example_inputs: Callable[[Any], tuple]
    init_method: Optional[Callable] = None
    # Whether the module takes ExecutionOptions; the VAE does not: it always runs in float32
    # on XLA attention (its latents feed the solvers and its decoder writes the pixels).
    takes_execution: bool = True

    def make_module(self, config: Any, execution: ExecutionOptions = DEFAULT_EXECUTION) -> nn.Module:
        """The module for `config`, run with `execution` where it takes options."""
        return self.build(config, execution=execution) if self.takes_execution else self.build(config)

    def init_params(self, config: Any, key: jax.Array) -> Any:
        """Freshly initialised params (boxed with logical axis names)."""
        inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.example_inputs(config)]
        # lazy_init computes only what the parameters need, not the forward pass; run eagerly,
        # as compiling a whole network's init takes minutes on a CPU.
        return self.build(config).lazy_init(key, *inputs, method=self.init_method)["params"]

    def abstract_params(self, config: Any) -> Any:
        """Shapes and logical axes of every parameter, without allocating."""
        return jax.eval_shape(lambda: self.init_params(config, jax.random.key(0)))


def _smallest_size(block_out_channels: tuple[int, ...]) -> int:
    return 2 ** (len(block_out_channels) - 1)


def _unet_inputs(config: UNet3DConfig) -> tuple:
    size = _smallest_size(config.block_out_channels)
    return (
        jnp.zeros((1, 2, size, size, config.in_channels)),
        jnp.zeros((), jnp.int32),
        jnp.zeros((1, 1, config.cross_attention_dim)),
    )


def _streaming_inputs(config: StreamingConfig) -> tuple:
    size = _smallest_size(config.unet.block_out_channels)
    pixels = size * 2 ** (len(config.cam_conditioning_widths) - 1)
    return (
        jnp.zeros((1, config.num_frames, size, size, config.unet.in_channels)),
        jnp.zeros((), jnp.int32),
        jnp.zeros((1, config.text_tokens, config.unet.cross_attention_dim)),
        jnp.zeros((1, 1, config.image_embed_dim)),
        jnp.zeros((1, config.cam_frames, pixels, pixels, 3)),
    )


def _vid2vid_unet_inputs(config: Vid2VidUNetConfig) -> tuple:
    # The smallest latent its down/upsampling accepts: height 2 + 2^d, width 2^d (d downsamplings).
    size = _smallest_size(config.widths)
    return (
        jnp.zeros((1, 1, size + 2, size, config.in_dim)),
        jnp.zeros((), jnp.int32),
        jnp.zeros((1, 1, config.context_dim)),
    )


def _vae_inputs(config: AutoencoderKLConfig) -> tuple:
    size = _smallest_size(config.block_out_channels)
    return (jnp.zeros((1, size, size, config.in_channels)),)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("unet", "text-to-video UNet3D (diffusers unet/config.json)", UNet3DConfig.from_diffusers, UNet3D, _unet_inputs),
        Component(
            "streaming",
            "StreamingT2V UNet3D + CAM + APM ({'unet': ..., 'streaming': ...})",
            StreamingConfig.from_dict,
            StreamingUNet3D,
            _streaming_inputs,
            StreamingUNet3D.predict,
        ),
        Component(
            "vid2vid_unet",
            "MS-Vid2Vid-XL video UNet (modelscope Vid2VidSDUNet arguments)",
            Vid2VidUNetConfig.from_modelscope,
            Vid2VidUNet,
            _vid2vid_unet_inputs,
        ),
        Component(
            "vae",
            "AutoencoderKL (diffusers vae/config.json)",
            AutoencoderKLConfig.from_diffusers,
            AutoencoderKL,
            _vae_inputs,
            takes_execution=False,
        ),
        Component(
            "text_encoder",
            "CLIP text tower (transformers text_encoder/config.json)",
            CLIPTextConfig.from_transformers,
            CLIPTextTransformer,
            lambda c: (jnp.zeros((1, c.max_position_embeddings), jnp.int32),),
        ),
        Component(
            "image_encoder",
            "OpenCLIP vision tower (open_clip model config)",
            OpenCLIPVisionConfig.from_open_clip,
            OpenCLIPVisionTransformer,
            lambda c: (jnp.zeros((1, c.image_size, c.image_size, 3)),),
        ),
    )
}


SAMPLING_DEFAULTS_FILE = "sampling.json"


def read_sampling_file(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it should be an object of SamplingSettings keys") from None


@dataclasses.dataclass
class PretrainedModel:
    """Params of each component in our layout, with the source config that describes it.

    `files` are plain files kept beside the weights (tokenizer, scheduler config), as
    {relative path: location}; `sources` the weight files the params came from;
    `execution` how `module` builds the components (kernel, compute dtype, remat).
    """

    configs: dict[str, dict]
    params: dict[str, Any]
    files: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    sources: list[pathlib.Path] = dataclasses.field(default_factory=list)
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def config(self, component: str) -> Any:
        """The parsed config (e.g. `UNet3DConfig`) of a component."""
        if component not in self.configs:
            raise KeyError(f"this model has no {component!r} component (it has {sorted(self.configs)})")
        return COMPONENTS[component].parse_config(self.configs[component])

    def module(self, component: str) -> nn.Module:
        """The Flax module of a component; apply it with `self.params[component]`."""
        return COMPONENTS[component].make_module(self.config(component), self.execution)

    def for_inference(self, execution: ExecutionOptions) -> "PretrainedModel":
        """This model run with `execution`, its params as sampling holds them (see
        `inference_params`: with bfloat16, the components that take options get bfloat16
        matrices; the VAE stays float32). Only for sampling: it never saves weights."""
        params = {
            name: inference_params(tree, execution) if COMPONENTS[name].takes_execution else tree
            for name, tree in self.params.items()
        }
        return dataclasses.replace(self, params=params, execution=execution)

    def abstract_params(self, component: str) -> Any:
        """Shapes and logical axis names of a component's params (nothing allocated)."""
        return COMPONENTS[component].abstract_params(self.config(component))

    def tokenizer_dir(self) -> Optional[pathlib.Path]:
        """The kept `tokenizer/` folder, if it holds a CLIP tokenizer (vocab.json or tokenizer.json)."""
        for name in ("tokenizer/vocab.json", "tokenizer/tokenizer.json"):
            if name in self.files:
                return pathlib.Path(self.files[name]).parent
        return None

    def sampling_defaults(self) -> Any:
        """The kept sampling.json: sampling settings this model was made for (e.g. fewer steps
        for a small model), as SamplingSettings field names; {} when none was kept. Check it
        with `SamplingSettings.checked_overrides`."""
        path = self.files.get(SAMPLING_DEFAULTS_FILE)
        return read_sampling_file(pathlib.Path(path)) if path else {}

    def scheduler_config(self) -> dict:
        """The kept scheduler/scheduler_config.json, or ModelScope ms-1.7b's when none was kept."""
        path = self.files.get("scheduler/scheduler_config.json")
        return json.loads(pathlib.Path(path).read_text()) if path else dict(MS_1_7B_SCHEDULER)


# Entries of a model config file (e.g. configs/st2v_shapes_tiny.py) that are not components:
# the tokenizer's whole-word tokens, the sampling defaults and the scheduler overrides.
MODEL_CONFIG_EXTRAS = ("tokenizer_words", "sampling", "scheduler")


def split_model_config(config: dict) -> tuple[dict, dict]:
    """A model config file's dict -> (component configs, its `MODEL_CONFIG_EXTRAS` entries)."""
    components = {key: value for key, value in config.items() if key not in MODEL_CONFIG_EXTRAS}
    return components, {key: config[key] for key in MODEL_CONFIG_EXTRAS if key in config}


def modelscope_scheduler_config(overrides: Optional[dict] = None) -> dict:
    """ModelScope's scheduler config with a random model's `scheduler` overrides (e.g.
    {"prediction_type": "v_prediction"}), checked by building its schedule."""
    config = {**MS_1_7B_SCHEDULER, **(overrides or {})}
    known = set(MS_1_7B_SCHEDULER) | {field.name for field in dataclasses.fields(NoiseSchedule)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"scheduler overrides {unknown} are not keys of the scheduler config; choose from {sorted(known)}")
    NoiseSchedule.from_diffusers(config)
    return config


def random_pretrained(configs: Mapping[str, dict], seed: int = 0) -> PretrainedModel:
    """A model with freshly initialised params for every component in `configs`."""
    # The rbg generator: its initialisers run several times faster than threefry's on CPU.
    keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(configs))
    params = {
        name: nn.unbox(COMPONENTS[name].init_params(COMPONENTS[name].parse_config(config), key))
        for (name, config), key in zip(configs.items(), keys)
    }
    return PretrainedModel(dict(configs), params)
