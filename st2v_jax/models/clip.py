"""CLIP towers: the text encoder (transformers `CLIPTextModel` layout) and the OpenCLIP ViT
image encoder (open_clip `VisionTransformer` layout), channels-last.

Both towers are stacks of the same pre-norm residual block (`EncoderLayer`); they differ in
the embedding stem, the attention mask (causal for text) and how the packed attention
projection is stored (separate q/k/v in transformers, one fused (q; k; v) projection in
open_clip's nn.MultiheadAttention). Flax parameter names follow transformers; the open_clip
names are renamed onto them by `st2v_jax.convert.clip`.

Extra logical axis names (besides those of `st2v_jax.models.layers`):
  "vocab"      rows of the token embedding table
  "positions"  rows of a positional embedding table
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import Array, conv, dense, dot_product_attention, layer_norm


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}
# transformers keeps a pre-2023 pooling rule for configs whose eos_token_id is still the
# wrong value 2: the EOS token is then found as the largest token id (true for CLIP's BPE).
LEGACY_EOS_TOKEN_ID = 2


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased projections.

    `fused_qkv=False`: q_proj/k_proj/v_proj/out_proj (transformers CLIPAttention);
    `fused_qkv=True`: one in_proj to 3*width holding (q; k; v), then out_proj
    (nn.MultiheadAttention, whose packed in_proj_weight maps onto it unchanged).
    """

    heads: int
    causal: bool = False
    fused_qkv: bool = False
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width, ex = x.shape[-1], self.execution
        if self.fused_qkv:
            q, k, v = jnp.split(dense(3 * width, dtype=ex.dtype, name="in_proj")(x), 3, axis=-1)
        else:
            q, k, v = (dense(width, dtype=ex.dtype, name=f"{name}_proj")(x) for name in "qkv")
        out = dot_product_attention(q, k, v, self.heads, is_causal=self.causal, execution=ex)
        return dense(width, dtype=ex.dtype, name="out_proj")(out)


class MLP(nn.Module):
    """fc1 to `hidden`, activation, fc2 back to the input width."""

    hidden: int
    activation: str
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = self.execution.dtype
        h = ACTIVATIONS[self.activation](dense(self.hidden, dtype=dtype, name="fc1")(x))
        return dense(x.shape[-1], dtype=dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(LN(x)), then x + MLP(LN(x))."""

    heads: int
    mlp_hidden: int
    activation: str
    layer_norm_eps: float
    causal: bool = False
    fused_qkv: bool = False
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ex = self.execution
        attn = SelfAttention(self.heads, self.causal, self.fused_qkv, execution=ex, name="self_attn")
        x = x + attn(layer_norm(self.layer_norm_eps, dtype=ex.dtype, name="layer_norm1")(x))
        mlp = MLP(self.mlp_hidden, self.activation, execution=ex, name="mlp")
        return x + mlp(layer_norm(self.layer_norm_eps, dtype=ex.dtype, name="layer_norm2")(x))


def _normal_init(stddev: float, axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _non_positive(config: Any, *names: str) -> list[str]:
    return [f"{name} must be a positive integer, got {getattr(config, name)!r}" for name in names if getattr(config, name) < 1]


def _check_activation(activation: str, where: str) -> list[str]:
    if activation in ACTIVATIONS:
        return []
    return [f"{where} {activation!r} is not supported (supported: {sorted(ACTIVATIONS)})"]


# ----------------------------------------------------------------------------- text tower


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers `text_encoder/config.json` (CLIPTextModel).

    Defaults are ModelScope text-to-video-ms-1.7b's encoder (OpenCLIP ViT-H/14 text tower
    without its last layer). `projection_dim` is set only for CLIPTextModelWithProjection.
    """

    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    projection_dim: Optional[int] = None

    def __post_init__(self) -> None:
        problems = _check_activation(self.hidden_act, "hidden_act")
        problems += _non_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        if self.num_attention_heads >= 1 and self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not isinstance(self.eos_token_id, int):
            problems.append(f"eos_token_id must be an integer (the pooled token), got {self.eos_token_id!r}")
        if self.projection_dim is not None and self.projection_dim < 1:
            problems.append(f"projection_dim must be None or a positive integer, got {self.projection_dim!r}")
        if problems:
            raise ValueError("invalid CLIP text config: " + "; ".join(problems))

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """Reads a transformers CLIPTextConfig dict (a `text_encoder/config.json`).

        Every field the forward pass depends on must be present (transformers writes them
        all; guessing a default here could silently pick another activation). The text
        projection is built only when `architectures` names CLIPTextModelWithProjection.
        """
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"model_type {model_type!r} is not a CLIP text encoder (expected 'clip_text_model')")
        required = [f.name for f in dataclasses.fields(cls) if f.name != "projection_dim"]
        missing = [name for name in required if name not in config]
        if missing:
            raise ValueError(f"CLIP text config lacks {missing}")
        values = {name: config[name] for name in required}
        if "CLIPTextModelWithProjection" in (config.get("architectures") or ()):
            if "projection_dim" not in config:
                raise ValueError("a CLIPTextModelWithProjection config needs projection_dim")
            values["projection_dim"] = config["projection_dim"]
        return cls(**values)


class CLIPTextTransformer(nn.Module):
    """transformers' CLIPTextModel (and CLIPTextModelWithProjection's extra projection).

    `__call__(input_ids (B, L) int)` -> last_hidden_state (B, L, hidden), after
    final_layer_norm. `encode` gives earlier layers, `pooled_output` the EOS-token state and
    `text_embeds` its projection; call them with `apply(..., method=...)`. Outputs are
    float32 whatever `execution.compute_dtype`.
    """

    config: CLIPTextConfig
    execution: ExecutionOptions = DEFAULT_EXECUTION

    def setup(self) -> None:
        cfg, ex = self.config, self.execution
        self.token_embedding = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=ex.dtype, embedding_init=_normal_init(0.02, ("vocab", "channels"))
        )
        self.position_embedding = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=ex.dtype, embedding_init=_normal_init(0.01, ("positions", "channels"))
        )
        self.layers = [
            ex.block(EncoderLayer)(
                cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps, causal=True, execution=ex
            )
            for _ in range(cfg.num_hidden_layers)
        ]
        self.final_layer_norm = layer_norm(cfg.layer_norm_eps, dtype=ex.dtype)
        if cfg.projection_dim is not None:
            self.text_projection = dense(cfg.projection_dim, use_bias=False, dtype=ex.dtype)

    def encode(self, input_ids: Array, *, skip_last_layers: int = 0, final_layer_norm: bool = True) -> Array:
        """Hidden states (B, L, hidden) after all but the last `skip_last_layers` layers.

        transformers' `hidden_states[-2]` is `skip_last_layers=1, final_layer_norm=False`;
        the "penultimate" layer of ldm/MS-Vid2Vid's FrozenOpenCLIPEmbedder applies the final
        norm: `skip_last_layers=1, final_layer_norm=True`.
        """
        cfg = self.config
        length = input_ids.shape[-1]
        if input_ids.ndim != 2 or length > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids must be (batch, length <= {cfg.max_position_embeddings}), got shape {input_ids.shape}"
            )
        if not 0 <= skip_last_layers < cfg.num_hidden_layers:
            raise ValueError(f"skip_last_layers must be in [0, {cfg.num_hidden_layers}), got {skip_last_layers}")
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))
        for layer in self.layers[: cfg.num_hidden_layers - skip_last_layers]:
            x = layer(x)
        return (self.final_layer_norm(x) if final_layer_norm else x).astype(jnp.float32)

    def __call__(self, input_ids: Array) -> Array:
        last_hidden_state = self.encode(input_ids)
        if self.is_initializing() and self.config.projection_dim is not None:
            # Submodules get parameters only when called; make `init` create the projection.
            self.text_projection(last_hidden_state[:, 0])
        return last_hidden_state

    def eos_positions(self, input_ids: Array) -> Array:
        """Index (B,) of the token whose state is pooled, by transformers' rule for this config."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)  # the first EOS

    def pooled_output(self, input_ids: Array) -> Array:
        """transformers' `pooler_output` (B, hidden): the final-norm state of the EOS token."""
        hidden = self.encode(input_ids)
        return hidden[jnp.arange(hidden.shape[0]), self.eos_positions(input_ids)]

    def text_embeds(self, input_ids: Array) -> Array:
        """CLIPTextModelWithProjection's `text_embeds` (B, projection_dim), unnormalised."""
        if self.config.projection_dim is None:
            raise ValueError("this CLIP text config has no projection (projection_dim is None)")
        return self.text_projection(self.pooled_output(input_ids)).astype(jnp.float32)


# --------------------------------------------------------------------------- vision tower

# open_clip vision_cfg settings this implementation follows only at their default value.
_VISION_DEFAULT_ONLY = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pool_type": "tok",
    "timm_model_name": None,
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
# Settings that do not change the pooled embedding at inference: patch dropout is off in
# eval mode; with 'tok' pooling, ln_post before or after pooling is the same per-token LN;
# output_tokens only adds a second output; the pooler/timm fields belong to unused options.
_VISION_IGNORED = {
    "patch_dropout",
    "final_ln_after_pool",
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
# A fixed sin-cos table is stored in `positional_embedding` just like a learned one.
_POS_EMBED_TYPES = ("learnable", "sin_cos_2d")


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported, got {value}")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class OpenCLIPVisionConfig:
    """open_clip VisionTransformer architecture; defaults are ViT-H/14 (laion2b_s32b_b79k)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 1024
    quick_gelu: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = _non_positive(self, "image_size", "patch_size", "width", "layers", "heads", "output_dim")
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if int(self.width * self.mlp_ratio) < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio} gives an empty MLP")
        if problems:
            raise ValueError("invalid OpenCLIP vision config: " + "; ".join(problems))

    @classmethod
    def from_open_clip(cls, model_config: Mapping[str, Any]) -> "OpenCLIPVisionConfig":
        """Reads a whole open_clip model config (e.g. `model_configs/ViT-H-14.json`).

        The whole config is needed, not only its `vision_cfg`: the output size is the
        top-level `embed_dim` and the activation the top-level `quick_gelu` flag.
        Settings that change the architecture away from the plain ViT are refused.
        """
        if "vision_cfg" not in model_config or "embed_dim" not in model_config:
            raise ValueError("an open_clip model config needs 'embed_dim' and 'vision_cfg'")
        vision = dict(model_config["vision_cfg"])
        known = set(_VISION_DEFAULT_ONLY) | _VISION_IGNORED | {
            "image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "pos_embed_type", "norm_kwargs",
        }
        problems = [f"unknown vision_cfg key {key!r}" for key in vision if key not in known]
        problems += [
            f"vision_cfg {key}={vision[key]!r} is not supported (only {default!r})"
            for key, default in _VISION_DEFAULT_ONLY.items()
            if vision.get(key, default) != default
        ]
        if vision.get("pos_embed_type", "learnable") not in _POS_EMBED_TYPES:
            problems.append(
                f"vision_cfg pos_embed_type={vision['pos_embed_type']!r} is not supported (only {_POS_EMBED_TYPES})"
            )
        norm_kwargs = vision.get("norm_kwargs") or {}
        if set(norm_kwargs) - {"eps"}:
            problems.append(f"vision_cfg norm_kwargs {norm_kwargs} is not supported (only 'eps')")
        layers = vision.get("layers", 12)
        if isinstance(layers, (list, tuple)):
            problems.append(f"vision_cfg layers={layers} describes a ModifiedResNet, not a ViT")
        if problems:
            raise ValueError("unsupported open_clip vision tower: " + "; ".join(problems))
        # Missing keys take open_clip's CLIPVisionCfg defaults.
        width = int(vision.get("width", 768))
        head_width = int(vision.get("head_width", 64))
        if width % head_width:
            raise ValueError(f"vision_cfg width {width} is not a multiple of head_width {head_width}")
        return cls(
            image_size=_square(vision.get("image_size", 224), "image_size"),
            patch_size=_square(vision.get("patch_size", 16), "patch_size"),
            width=width,
            layers=int(layers),
            heads=width // head_width,
            mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            output_dim=int(model_config["embed_dim"]),
            quick_gelu=bool(model_config.get("quick_gelu", False)),
            layer_norm_eps=float(norm_kwargs.get("eps", 1e-5)),
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


class OpenCLIPVisionTransformer(nn.Module):
    """open_clip's VisionTransformer with default settings: pixels (N, H, W, 3), already
    resized to `image_size` and CLIP-normalised -> pooled, projected embedding (N, output_dim),
    float32 whatever `execution.compute_dtype`.
    """

    config: OpenCLIPVisionConfig
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg, ex = self.config, self.execution
        expected = (cfg.image_size, cfg.image_size, 3)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels must be (N, {', '.join(map(str, expected))}), got shape {pixels.shape}")
        scale = cfg.width**-0.5
        patchify = conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, use_bias=False, dtype=ex.dtype, name="conv1")
        class_embedding = self.param("class_embedding", _normal_init(scale, ("channels",)), (cfg.width,))
        positional_embedding = self.param(
            "positional_embedding", _normal_init(scale, ("positions", "channels")), (cfg.grid_size**2 + 1, cfg.width)
        )
        proj = self.param("proj", _normal_init(scale, ("channels_in", "channels_out")), (cfg.width, cfg.output_dim))

        n = pixels.shape[0]
        # Row-major patch order, as open_clip's reshape of the NCHW conv output.
        patches = patchify(pixels).reshape(n, cfg.grid_size**2, cfg.width)
        class_token = jnp.broadcast_to(class_embedding.astype(patches.dtype), (n, 1, cfg.width))
        x = jnp.concatenate([class_token, patches], axis=1) + positional_embedding.astype(ex.dtype)
        x = layer_norm(cfg.layer_norm_eps, dtype=ex.dtype, name="ln_pre")(x)
        activation = "quick_gelu" if cfg.quick_gelu else "gelu"
        layer = ex.block(EncoderLayer)
        for i in range(cfg.layers):
            x = layer(
                cfg.heads, int(cfg.width * cfg.mlp_ratio), activation, cfg.layer_norm_eps, fused_qkv=True, execution=ex, name=f"layers_{i}"
            )(x)
        # LayerNorm acts per token, so normalising only the class token equals open_clip's
        # ln_post over all tokens followed by taking token 0.
        pooled = layer_norm(cfg.layer_norm_eps, dtype=ex.dtype, name="ln_post")(x[:, 0])
        return (pooled @ proj.astype(ex.dtype)).astype(jnp.float32)
