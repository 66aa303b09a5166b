"""Execution options (st2v_jax.models.execution): attention kernels, bfloat16 compute and
rematerialisation change how the models run, never their parameters.

The splash kernel runs in Pallas interpret mode on the CPU; cuDNN cannot run here, so its
dispatch (every attention asks for implementation="cudnn" with bfloat16 inputs) and its
refusal on a CPU are what is tested. Tiny random models with weights drawn from the
parameter shapes (no init compile). Run with `-s` to see every measured error.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import runpy
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.conftest import REPO
from st2v_jax.convert.components import COMPONENTS, PretrainedModel
from st2v_jax.models import layers, pallas_attention
from st2v_jax.models.execution import ExecutionOptions, ExecutionOptionsError, inference_params
from st2v_jax.models.streaming import StreamingConfig, StreamingUNet3D
from st2v_jax.models.unet3d import UNet3DConfig, _MidBlock

BF16 = ExecutionOptions(compute_dtype="bfloat16")
SPLASH = ExecutionOptions(attention="splash", pallas_interpret=True)
# Relative L2 error of bfloat16 vs float32 outputs on random weights (measured: streaming
# model 2.4%, MS-Vid2Vid UNet 2.0%, CLIP text 0.9%, CLIP image 0.7%).
BF16_TOLERANCE = 3e-2

# One resolution level, so every spatial attention runs over the whole 16x12 latent: 192
# tokens, more than one 128-token kernel tile and padded to 256 (the padding is exercised).
UNET = UNet3DConfig(
    block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock3D",),
    up_block_types=("CrossAttnUpBlock3D",),
    cross_attention_dim=32,
    attention_head_dim=16,
)
STREAMING = StreamingConfig(
    unet=UNET, num_frames=4, cam_frames=2, cam_conditioning_widths=(8,), text_tokens=5, image_tokens=3,
    resampler_hidden=16, image_embed_dim=32, merger_head_dim=16,
)


def _random_params(abstract: Any, seed: int) -> Any:
    """Weights of every parameter shape: matrices ~ 1/sqrt(fan-in), norm scales near 1, other
    vectors and scalars small but non-zero (zero-initialised layers must do something)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.unbox(abstract))
    out = {}
    for path, leaf in flat.items():
        if leaf.ndim >= 2:
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = (path[-1] == "scale") + 0.05 * rng.normal(size=leaf.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


def _streaming_inputs() -> tuple:
    k = jax.random.split(jax.random.key(1), 4)
    return (
        jax.random.normal(k[0], (1, STREAMING.num_frames, 16, 12, 4)),
        jnp.asarray(500),
        jax.random.normal(k[1], (1, STREAMING.text_tokens, 32)),
        jax.random.normal(k[2], (1, 1, 32)),
        jax.random.uniform(k[3], (1, STREAMING.cam_frames, 16, 12, 3), minval=-1, maxval=1),
    )


@functools.cache
def _streaming_params() -> Any:
    inputs = _streaming_inputs()
    abstract = layers.abstract_params(StreamingUNet3D(STREAMING), *inputs, method=StreamingUNet3D.predict)
    return _random_params(abstract, seed=0)


def _compiled(fn: Callable, *args: Any) -> tuple[Any, Any]:
    """(fn(*args) jitted, the jaxpr of that program): one trace serves both."""
    traced = jax.jit(fn).trace(*args)
    return traced.lower().compile()(*args), traced.jaxpr


@functools.cache
def _streaming_prediction(execution: ExecutionOptions) -> tuple[jax.Array, Any]:
    """The tiny streaming model's eps under `execution`, and its program; each compiled once."""
    module = StreamingUNet3D(STREAMING, execution=execution)
    predict = lambda p, *x: module.apply({"params": p}, *x, method=StreamingUNet3D.predict)
    return _compiled(predict, _streaming_params(), *_streaming_inputs())


def _equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, nested ones (jit, custom_vjp, remat, pallas) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _primitive_names(jaxpr: Any) -> list[str]:
    return [eqn.primitive.name for eqn in _equations(jaxpr.jaxpr)]


def _relative_error(got: jax.Array, want: jax.Array) -> float:
    return float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))


# ------------------------------------------------------------------ options and platforms


def test_options_are_validated_and_refused_where_they_cannot_run():
    with pytest.raises(ExecutionOptionsError, match=r"attention='flash'; expected one of \('xla', 'cudnn', 'splash'\)"):
        ExecutionOptions(attention="flash")
    with pytest.raises(ExecutionOptionsError, match="compute_dtype='float16'"):
        ExecutionOptions(compute_dtype="float16")
    with pytest.raises(ExecutionOptionsError, match="remat='all'"):
        ExecutionOptions(remat="all")
    with pytest.raises(ExecutionOptionsError, match="attention='cudnn' needs compute_dtype='bfloat16'"):
        ExecutionOptions(attention="cudnn")

    cudnn = ExecutionOptions(attention="cudnn", compute_dtype="bfloat16")
    cpu_message = r"attention='cudnn' needs an NVIDIA GPU \(this host runs JAX on cpu\); use attention='xla'"
    with pytest.raises(ExecutionOptionsError, match=cpu_message):
        cudnn.check_platform("cpu")
    cudnn.check_platform("gpu")
    with pytest.raises(ExecutionOptionsError, match="attention='splash' is a TPU kernel .*; use attention='xla'"):
        ExecutionOptions(attention="splash").check_platform("cpu")
    with pytest.raises(ExecutionOptionsError, match="or, with bfloat16, attention='cudnn'"):
        ExecutionOptions(attention="splash").check_platform("gpu")
    ExecutionOptions(attention="splash").check_platform("tpu")
    with pytest.raises(ExecutionOptionsError, match="runs on one device, not over a mesh of 8 devices"):
        ExecutionOptions(attention="splash").check_platform("tpu", devices=8)
    SPLASH.check_platform()  # interpret mode runs anywhere
    ExecutionOptions().check_platform()


def test_loading_and_sharding_refuse_what_cannot_run(tmp_path):
    from st2v_jax.parallel import Placement, make_mesh
    from st2v_jax.pretrained import load_for_inference

    cudnn = ExecutionOptions(attention="cudnn", compute_dtype="bfloat16")
    with pytest.raises(ExecutionOptionsError, match="needs an NVIDIA GPU"):  # before the (missing) weights are read
        load_for_inference(tmp_path / "missing", execution=cudnn)
    with pytest.raises(ExecutionOptionsError, match="attention='splash' is a TPU kernel"):
        Placement(make_mesh("data=-1")).shard_model(PretrainedModel({}, {}, execution=ExecutionOptions(attention="splash")))


def test_sample_cli_refuses_a_backend_this_host_cannot_run_before_loading(capsys, tmp_path):
    from st2v_jax import sample

    # An empty folder: loading it would fail, so an answer about the backend came first.
    base = ["--prompt", "x", "--model-dir", str(tmp_path), "--out", str(tmp_path / "v.mp4")]
    assert sample.main(base + ["--attention", "cudnn", "--dtype", "bfloat16"]) == 2
    assert "--attention: attention='cudnn' needs an NVIDIA GPU" in capsys.readouterr().err
    assert sample.main(base + ["--attention", "cudnn"]) == 2
    assert "needs compute_dtype='bfloat16'" in capsys.readouterr().err
    assert sample.main(base + ["--attention", "splash"]) == 2
    assert "attention='splash' is a TPU kernel" in capsys.readouterr().err


def test_training_config_check_names_bad_execution_options(tmp_path):
    from st2v_jax.training.config import default_config
    from st2v_jax.training.trainer import check_config

    config = default_config()
    config.model.init = str(tmp_path)
    config.execution.attention = "cudnn"
    with pytest.raises(ValueError, match="execution: invalid execution options: attention='cudnn' needs compute_dtype='bfloat16'"):
        check_config(config)
    config.execution.compute_dtype = "bfloat16"
    with pytest.raises(ValueError, match="execution: attention='cudnn' needs an NVIDIA GPU"):
        check_config(config)
    config.execution.attention, config.execution.remat = "xla", "everything"
    with pytest.raises(ValueError, match="remat='everything'; expected one of"):
        check_config(config)


# ------------------------------------------------------------------ parameters never change


def _tiny_configs() -> dict[str, Any]:
    configs = runpy.run_path(str(REPO / "configs" / "tiny_random.py"))["get_config"]().to_dict()
    configs["vid2vid_unet"] = dict(
        dim=32, dim_mult=[1, 2], num_heads=2, head_dim=16, num_res_blocks=1, attn_scales=[1, 0.5], context_dim=64
    )
    return {name: COMPONENTS[name].parse_config(config) for name, config in configs.items()}


def test_parameters_names_dtypes_and_logical_axes_never_change():
    execution = ExecutionOptions(attention="splash", compute_dtype="bfloat16", remat="dots_saveable")
    for name, config in _tiny_configs().items():
        component = COMPONENTS[name]
        inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in component.example_inputs(config)]

        def boxed(options):
            init = lambda *x: component.make_module(config, options).init(jax.random.key(0), *x, method=component.init_method)
            return traverse_util.flatten_dict(jax.eval_shape(init, *inputs)["params"])

        want, got = boxed(ExecutionOptions()), boxed(execution)
        assert list(got) == list(want), name
        for path, leaf in want.items():
            got_leaf = (got[path].names, got[path].value.shape, got[path].value.dtype)
            assert got_leaf == (leaf.names, leaf.value.shape, jnp.float32), (name, path)


# ------------------------------------------------------------------ bfloat16


def test_bfloat16_streaming_model_is_close_and_computes_in_bfloat16():
    want, _ = _streaming_prediction(ExecutionOptions())
    got, jaxpr = _streaming_prediction(BF16)
    error = _relative_error(got, want)
    print(f"streaming model (UNet3D + CAM + APM), bf16 vs fp32: relative L2 error {error:.2e}")
    assert got.dtype == jnp.float32 and error < BF16_TOLERANCE

    equations = list(_equations(jaxpr.jaxpr))
    products = [e for e in equations if e.primitive.name in ("dot_general", "conv_general_dilated")]
    reductions = [e for e in equations if e.primitive.name in ("reduce_sum", "reduce_max")]
    assert products and {v.aval.dtype for e in products for v in e.invars} == {jnp.dtype(jnp.bfloat16)}
    # Norm statistics (GroupNorm, LayerNorm) and the attention softmax reduce in float32.
    assert reductions and {v.aval.dtype for e in reductions for v in e.outvars} == {jnp.dtype(jnp.float32)}


def test_bfloat16_clip_towers_and_vid2vid_unet_are_close():
    configs = _tiny_configs()
    rng = np.random.default_rng(1)
    inputs = {
        "text_encoder": (jnp.asarray(rng.integers(0, 500, (2, 77)), jnp.int32),),
        "image_encoder": (jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),),
        "vid2vid_unet": (
            jnp.asarray(rng.normal(size=(1, 3, 10, 8, 4)), jnp.float32),
            jnp.asarray(321),
            jnp.asarray(rng.normal(size=(1, 7, 64)), jnp.float32),
        ),
    }
    # One level (compiles faster), so any latent size works.
    configs["vid2vid_unet"] = dataclasses.replace(configs["vid2vid_unet"], dim_mult=(1,), attn_scales=(1.0,))
    for name, args in inputs.items():
        component = COMPONENTS[name]
        abstract = jax.eval_shape(lambda: component.make_module(configs[name]).init(jax.random.key(0), *args))["params"]
        params = _random_params(abstract, seed=2)
        run = lambda options: jax.jit(component.make_module(configs[name], options).apply)({"params": params}, *args)
        want, got = run(ExecutionOptions()), run(BF16)
        error = _relative_error(got, want)
        print(f"{name}, bf16 vs fp32: relative L2 error {error:.2e}")
        assert got.dtype == jnp.float32 and error < BF16_TOLERANCE, name


def test_inference_params_cast_matrices_once_and_compute_the_same():
    """Casting the matrices at load gives exactly what casting them at apply time gives;
    vectors (norm scales, biases) and the VAE stay float32."""
    streaming_params = _streaming_params()
    flat = traverse_util.flatten_dict(inference_params(streaming_params, BF16))
    assert {p[-1] for p, v in flat.items() if v.dtype == jnp.bfloat16} == {"kernel"}
    assert all(v.dtype == jnp.float32 for v in flat.values() if v.ndim < 2)
    assert inference_params(streaming_params, ExecutionOptions()) is streaming_params

    # The text tower has every kind of weight use: embedding tables, dense kernels, norms.
    config = _tiny_configs()["text_encoder"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 500, (1, 77)), jnp.int32)
    module = COMPONENTS["text_encoder"].make_module(config, BF16)
    params = _random_params(jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"], seed=5)
    cast = inference_params(params, BF16)
    assert traverse_util.flatten_dict(cast)[("token_embedding", "embedding")].dtype == jnp.bfloat16
    apply = jax.jit(module.apply)
    np.testing.assert_array_equal(apply({"params": cast}, ids), apply({"params": params}, ids))

    vae_params = {"decoder": {"conv_in": {"kernel": jnp.ones((3, 3, 4, 8))}}}
    model = PretrainedModel({}, {"streaming": streaming_params, "vae": vae_params}).for_inference(BF16)
    assert model.execution == BF16
    assert model.params["vae"]["decoder"]["conv_in"]["kernel"].dtype == jnp.float32
    assert model.params["streaming"]["base"]["conv_in"]["kernel"].dtype == jnp.bfloat16


# ------------------------------------------------------------------ attention kernels


def test_splash_block_layout_pads_to_lanes_and_picks_the_largest_dividing_tile():
    assert [pallas_attention.block_layout(n) for n in (128, 192, 256, 640, 1024, 1100, 4096)] == [
        (128, 128), (256, 256), (256, 256), (640, 128), (1024, 512), (1152, 384), (4096, 512),
    ]


@pytest.mark.parametrize("length", [192, 256], ids=["padded", "unpadded"])
def test_splash_attention_matches_xla_with_gradients(length):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, length, 2, 16)) for i in range(3))
    splash = lambda q, k, v: pallas_attention.splash_attention(q, k, v, interpret=True)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    out_error = float(jnp.abs(jax.jit(splash)(q, k, v) - xla(q, k, v)).max())
    loss = lambda attend: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))), argnums=(0, 1, 2)))
    grad_error = max(float(jnp.abs(a - b).max()) for a, b in zip(loss(splash)(q, k, v), loss(xla)(q, k, v)))
    print(f"splash (interpret) vs XLA, {length} tokens: output {out_error:.1e}, gradients {grad_error:.1e}")
    assert out_error < 1e-5 and grad_error < 1e-5


@pytest.mark.parametrize("causal, lq, lk", [(False, 24, 40), (True, 24, 24), (True, 24, 40)], ids=["cross", "causal", "causal-rectangular"])
def test_xla_attention_matches_jax_nn_with_gradients(causal, lq, lk):
    """The default kernel (softmax normalised after the product with v) against
    jax.nn.dot_product_attention, outputs and gradients, masks included."""
    q = jax.random.normal(jax.random.key(0), (2, lq, 32))
    k, v = (jax.random.normal(jax.random.key(i), (2, lk, 32)) for i in (1, 2))
    ours = lambda q, k, v: layers.dot_product_attention(q, k, v, 2, is_causal=causal)
    split = lambda t: t.reshape(*t.shape[:2], 2, 16)
    reference = lambda q, k, v: jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal).reshape(q.shape)
    out_error = float(jnp.abs(ours(q, k, v) - reference(q, k, v)).max())
    loss = lambda attend: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))), argnums=(0, 1, 2)))
    grad_error = max(float(jnp.abs(a - b).max()) for a, b in zip(loss(ours)(q, k, v), loss(reference)(q, k, v)))
    print(f"attention vs jax.nn ({causal=}, {lq}x{lk}): output {out_error:.1e}, gradients {grad_error:.1e}")
    assert out_error < 1e-5 and grad_error < 1e-5


def test_splash_runs_only_for_long_spatial_self_attention():
    x = jax.random.normal(jax.random.key(0), (1, 192, 32))
    short = x[:, :64]
    attend = lambda t, long, execution=SPLASH, causal=False: layers.dot_product_attention(
        t, t, t, 2, is_causal=causal, execution=execution, long_sequence=long
    )
    names = lambda fn, t: _primitive_names(jax.make_jaxpr(fn)(t))
    assert "pallas_call" in names(lambda t: attend(t, True), x)
    assert "pallas_call" not in names(lambda t: attend(t, False), x)  # temporal / text attention
    assert "pallas_call" not in names(lambda t: attend(t, True), short)  # shorter than a tile
    assert "pallas_call" not in names(lambda t: attend(t, True, ExecutionOptions()), x)
    np.testing.assert_allclose(attend(short, True), attend(short, True, ExecutionOptions()), rtol=0, atol=0)


def test_splash_streaming_model_matches_xla():
    got, jaxpr = _streaming_prediction(SPLASH)
    want, _ = _streaming_prediction(ExecutionOptions())
    # One kernel per spatial transformer (base UNet and CAM), none elsewhere.
    paths = ["/".join(p) for p in traverse_util.flatten_dict(_streaming_params())]
    spatial = [p for p in paths if re.search(r"(?<!temp_)attentions_\d+/transformer_blocks_0/attn1/to_q/kernel$", p)]
    assert _primitive_names(jaxpr).count("pallas_call") == len(spatial) > 0
    error = float(jnp.abs(got - want).max())
    print(f"streaming model, splash (interpret) vs XLA attention: max abs diff {error:.1e}")
    assert error < 1e-4


def test_cudnn_is_asked_for_every_attention_with_bfloat16_inputs(monkeypatch):
    """No GPU here: the call is recorded and run by XLA."""
    calls = []
    original = jax.nn.dot_product_attention

    def record(q, k, v, *, is_causal, implementation):
        calls.append((implementation, q.dtype, is_causal))
        return original(q, k, v, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    config = _tiny_configs()["text_encoder"]
    ids = jnp.zeros((1, 77), jnp.int32)
    module = COMPONENTS["text_encoder"].make_module(config, ExecutionOptions(attention="cudnn", compute_dtype="bfloat16"))
    params = _random_params(jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"], seed=3)
    calls.clear()
    assert module.apply({"params": params}, ids).dtype == jnp.float32
    assert calls == [("cudnn", jnp.dtype(jnp.bfloat16), True)] * config.num_hidden_layers


# ------------------------------------------------------------------ rematerialisation


def test_remat_gives_the_same_gradients_and_really_rematerialises():
    """On the UNet3D mid block: a resnet, temporal conv, spatial and temporal transformer each."""
    config = dataclasses.replace(UNET, cross_attention_dim=16)
    k = jax.random.split(jax.random.key(2), 3)
    x, temb, context = jax.random.normal(k[0], (1, 3, 6, 4, 32)), jax.random.normal(k[1], (1, 128)), jax.random.normal(k[2], (1, 5, 16))
    block = lambda remat: _MidBlock(config, 32, execution=ExecutionOptions(remat=remat))
    params = _random_params(layers.abstract_params(block("none"), x, temb, context), seed=4)

    def gradients(remat: str) -> tuple[Any, int]:
        loss = lambda p: jnp.mean(jnp.square(block(remat).apply({"params": p}, x, temb, context)))
        grads, jaxpr = _compiled(jax.grad(loss), params)
        # The remat primitive is "checkpoint" or "remat2", by JAX version.
        return grads, sum(name.startswith(("checkpoint", "remat")) for name in _primitive_names(jaxpr))

    want, count = gradients("none")
    assert count == 0
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    for remat in ("blocks", "dots_saveable"):
        got, count = gradients(remat)
        assert count == 6, remat  # 2 resnets, 2 temporal convs, 2 transformers
        error = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        print(f"remat={remat}: gradients max abs diff {error:.1e} (largest gradient {scale:.1e})")
        assert error <= 1e-6 * scale
