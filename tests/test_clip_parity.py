"""Parity of the Flax CLIP towers with their PyTorch originals (fp32, CPU).

Text: transformers CLIPTextModelWithProjection, saved with `save_pretrained` and read back
through `open_model_dir`. Vision: open_clip's VisionTransformer (see open_clip_oracle.py for
how it is imported without torchvision). Tiny random models; weights are redrawn so that
layer norms are not the identity and every layer changes its input. Run with `-s` to see
the error and output scale of every comparison.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
import flax.linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from open_clip_oracle import open_clip_package_dir, open_clip_transformer  # noqa: E402

from st2v_jax.convert.clip import (  # noqa: E402
    clip_text_ignored_keys,
    clip_text_mapping,
    clip_text_prefix,
    open_clip_vision_mapping,
)
from st2v_jax.convert.mapping import ConversionError, KeyMapping, convert_state_dict, to_flax_layout  # noqa: E402
from st2v_jax.convert.readers import open_model_dir  # noqa: E402
from st2v_jax.models.clip import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextTransformer,
    OpenCLIPVisionConfig,
    OpenCLIPVisionTransformer,
)
from st2v_jax.models.layers import abstract_params  # noqa: E402

# Errors are measured against the reference's standard deviation. fp32 reorderings stay
# around 1e-6 of it; a wrong activation, norm, mask or layout is off by 1e-2 or more.
RELATIVE_TOLERANCE = 1e-4

VOCAB = 1000
EOS = 500  # deliberately not the largest id, so "first EOS" and "largest id" pooling differ
TEXT_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=EOS,
)
VISION_SIZES = dict(image_size=28, patch_size=7, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32)
VISION_PREFIX = "image_encoder.model.visual."


def randomize_(module: "torch.nn.Module", seed: int) -> None:
    """Redraws every parameter: norm scales around 1, biases and 1-D vectors around 0,
    matrices with std 1/sqrt(fan_in) so that activations keep unit scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise * (param[0].numel() ** -0.5))
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.25 * noise)
            else:
                param.copy_(0.25 * noise)


def assert_close(name: str, ours: Any, reference: "torch.Tensor") -> None:
    reference = reference.detach().numpy()
    ours = np.asarray(ours)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != {reference.shape}"
    error = float(np.max(np.abs(ours - reference)))
    scale = float(np.std(reference))
    print(f"{name}: max abs error {error:.3e}, reference std {scale:.3e}, ratio {error / scale:.2e}")
    assert error <= RELATIVE_TOLERANCE * scale, f"{name}: max abs error {error:.3e} > {RELATIVE_TOLERANCE} x std {scale:.3e}"


def token_ids(seed: int) -> np.ndarray:
    """3 prompts: BOS, random tokens (some above EOS), EOS, then EOS padding to 77."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(3, 77))
    ids[ids == EOS] = EOS + 1
    ids[:, 0] = 1
    for row, eos_position in enumerate((4, 30, 76)):
        ids[row, eos_position:] = EOS
    return ids


# ----------------------------------------------------------------------------- text tower


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def saved_text_model(request, tmp_path_factory) -> tuple[Any, Any]:
    """A random CLIPTextModelWithProjection and the folder it was saved to."""
    config = transformers.CLIPTextConfig(hidden_act=request.param, **TEXT_SIZES)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    randomize_(model, seed=0)
    directory = tmp_path_factory.mktemp(f"clip_text_{request.param}")
    model.save_pretrained(directory)
    return model, directory


def load_text(directory: Any, **config_overrides: Any) -> tuple[CLIPTextTransformer, dict]:
    config = CLIPTextConfig.from_transformers(json.loads((directory / "config.json").read_text()))
    config = dataclasses.replace(config, **config_overrides)
    model = CLIPTextTransformer(config)
    state_dict = open_model_dir(directory)
    prefix = clip_text_prefix(state_dict)
    params = convert_state_dict(
        state_dict,
        clip_text_mapping(prefix),
        abstract_params(model, jnp.zeros((1, 77), jnp.int32)),
        ignore=clip_text_ignored_keys(prefix),
    )
    return model, params


def text_method(model: CLIPTextTransformer, params: dict, method: Callable, **kwargs: Any) -> Callable:
    return jax.jit(lambda ids: model.apply({"params": params}, ids, method=method, **kwargs))


def test_text_tower_matches_transformers(saved_text_model):
    torch_model, directory = saved_text_model
    model, params = load_text(directory)
    assert model.config.projection_dim == TEXT_SIZES["projection_dim"]
    ids = token_ids(seed=1)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        penultimate = reference.hidden_states[-2]
        penultimate_normed = torch_model.text_model.final_layer_norm(penultimate)
        pooled = torch_model.text_model(torch.from_numpy(ids)).pooler_output

    run = lambda method, **kwargs: text_method(model, params, method, **kwargs)(ids)
    encode = CLIPTextTransformer.encode
    assert_close("last_hidden_state", run(CLIPTextTransformer.__call__), reference.last_hidden_state)
    assert_close("hidden_states[-2]", run(encode, skip_last_layers=1, final_layer_norm=False), penultimate)
    assert_close(
        "final_layer_norm(hidden_states[-2])", run(encode, skip_last_layers=1, final_layer_norm=True), penultimate_normed
    )
    assert_close("pooler_output (first EOS)", run(CLIPTextTransformer.pooled_output), pooled)
    assert_close("text_embeds", run(CLIPTextTransformer.text_embeds), reference.text_embeds)


def test_text_pooling_with_legacy_eos_id(saved_text_model):
    """eos_token_id == 2 makes transformers pool at the largest token id instead."""
    torch_model, directory = saved_text_model
    model, params = load_text(directory, eos_token_id=2)
    ids = token_ids(seed=2)
    legacy_config = transformers.CLIPTextConfig(hidden_act=model.config.hidden_act, **{**TEXT_SIZES, "eos_token_id": 2})
    legacy = transformers.CLIPTextModel(legacy_config)
    legacy.load_state_dict(torch_model.text_model.state_dict())
    with torch.no_grad():
        pooled = legacy.eval()(torch.from_numpy(ids)).pooler_output
    assert not np.array_equal(np.argmax(ids, -1), np.argmax(ids == EOS, -1))
    assert_close("pooler_output (largest id)", text_method(model, params, CLIPTextTransformer.pooled_output)(ids), pooled)


def test_plain_text_model_saved_by_transformers5_and_old_buffers(tmp_path):
    """A CLIPTextModel saved by transformers 5 has no `text_model.` prefix; transformers 4
    files also hold the `position_ids` buffer, which must be ignored, not silently mapped."""
    config = transformers.CLIPTextConfig(hidden_act="gelu", **TEXT_SIZES)
    torch_model = transformers.CLIPTextModel(config).eval()
    randomize_(torch_model, seed=3)
    torch_model.save_pretrained(tmp_path)
    model, params = load_text(tmp_path)
    assert model.config.projection_dim is None
    ids = token_ids(seed=4)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(ids))
    ours = text_method(model, params, CLIPTextTransformer.__call__)(ids)
    assert_close("plain CLIPTextModel last_hidden_state", ours, reference.last_hidden_state)

    old_file = {f"text_model.{k}": v.numpy() for k, v in torch_model.state_dict().items()}
    old_file["text_model.embeddings.position_ids"] = np.arange(77)[None]
    assert clip_text_prefix(old_file) == "text_model."
    abstract = abstract_params(model, jnp.zeros((1, 77), jnp.int32))
    converted = convert_state_dict(old_file, clip_text_mapping(), abstract, ignore=clip_text_ignored_keys())
    assert jax.tree.all(jax.tree.map(np.array_equal, converted, params))
    with pytest.raises(ConversionError, match="position_ids"):
        convert_state_dict(old_file, clip_text_mapping(), abstract)


# --------------------------------------------------------------------------- vision tower


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_vision_tower_matches_open_clip(quick_gelu):
    oracle = open_clip_transformer()
    torch_model = oracle.VisionTransformer(
        **VISION_SIZES, act_layer=oracle.QuickGELU if quick_gelu else torch.nn.GELU
    ).eval()
    randomize_(torch_model, seed=5)
    # Checkpoints hold the tower under a caller-chosen prefix, next to unrelated tensors.
    state_dict = {VISION_PREFIX + k: v.numpy() for k, v in torch_model.state_dict().items()}
    state_dict["image_encoder.model.logit_scale"] = np.zeros(())

    model = OpenCLIPVisionTransformer(OpenCLIPVisionConfig(**VISION_SIZES, quick_gelu=quick_gelu))
    abstract = abstract_params(model, jnp.zeros((1, 28, 28, 3), jnp.float32))
    params = convert_state_dict(
        state_dict, open_clip_vision_mapping(VISION_PREFIX), abstract, ignore=("image_encoder.model.logit_scale",)
    )
    pixels = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = torch_model(pixels)
    ours = jax.jit(lambda x: model.apply({"params": params}, x))(pixels.permute(0, 2, 3, 1).numpy())
    assert_close(f"vision pooled embedding ({'quick_gelu' if quick_gelu else 'gelu'})", ours, reference)


# ------------------------------------------------------------ configs and full-size layouts


def assert_layout(torch_shapes: Mapping[str, tuple[int, ...]], mapping: KeyMapping, abstract: Any) -> None:
    """Every torch tensor lands on a distinct Flax parameter of the right shape and every
    parameter is covered, checked on shapes alone (full-size towers are GBs)."""
    expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract)).items()}
    mapped = {}
    for key, shape in torch_shapes.items():
        path, array = to_flax_layout(mapping(key), np.broadcast_to(np.float32(0), shape))
        assert path not in mapped, f"{key} maps onto {path} twice"
        mapped[path] = array.shape
    assert mapped == expected


def test_open_clip_vit_h_14_config_and_layout():
    model_config = json.loads((open_clip_package_dir() / "model_configs" / "ViT-H-14.json").read_text())
    config = OpenCLIPVisionConfig.from_open_clip(model_config)
    assert config == OpenCLIPVisionConfig(
        image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_ratio=4.0, output_dim=1024
    )
    oracle = open_clip_transformer()
    with torch.device("meta"):
        torch_model = oracle.VisionTransformer(**{f: getattr(config, f) for f in VISION_SIZES})
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    abstract = abstract_params(OpenCLIPVisionTransformer(config), jnp.zeros((1, 224, 224, 3), jnp.float32))
    assert_layout(shapes, open_clip_vision_mapping(), abstract)


def test_modelscope_text_encoder_layout():
    config = CLIPTextConfig()  # text-to-video-ms-1.7b's text_encoder
    with torch.device("meta"):
        fields = {name: value for name, value in dataclasses.asdict(config).items() if name != "projection_dim"}
        torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**fields))
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    abstract = abstract_params(CLIPTextTransformer(config), jnp.zeros((1, 77), jnp.int32))
    assert_layout(shapes, clip_text_mapping(prefix=""), abstract)


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextConfig.from_transformers({**dataclasses.asdict(CLIPTextConfig()), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="lacks"):
        CLIPTextConfig.from_transformers({"vocab_size": 10})
    with pytest.raises(ValueError, match="ls_init_value"):
        OpenCLIPVisionConfig.from_open_clip({"embed_dim": 512, "vision_cfg": {"ls_init_value": 1e-5}})
    with pytest.raises(ValueError, match="ModifiedResNet"):
        OpenCLIPVisionConfig.from_open_clip({"embed_dim": 1024, "vision_cfg": {"layers": [3, 4, 6, 3]}})
