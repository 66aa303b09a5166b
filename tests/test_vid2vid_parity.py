"""MS-Vid2Vid-XL (the official refiner) against modelscope's own PyTorch modules (fp32, CPU):
the video UNet, the SD 2.1 VAE from its LDM layout, the OpenCLIP penultimate-layer text
embedding, the noise schedule and the DPM-Solver++(2M) SDE sampler with guidance rescale.
See vid2vid_oracle.py for how modelscope is imported. Run with -s to see every error and the
output scale it is measured against.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from vid2vid_oracle import vid2vid_module  # noqa: E402

from st2v_jax.convert.mapping import convert_state_dict, to_flax_layout  # noqa: E402
from st2v_jax.convert.official_configs import MS_VID2VID_XL_UNET  # noqa: E402
from st2v_jax.convert.vid2vid import (  # noqa: E402
    ldm_vae_mapping,
    ldm_vae_tensors,
    open_clip_text_mapping,
    open_clip_text_tensors,
    vid2vid_unet_mapping,
    vid2vid_unet_tensors,
)
from st2v_jax.diffusion.vid2vid_schedule import (  # noqa: E402
    LogSNRCosineSchedule,
    dpmpp_2m_sde_plan,
    dpmpp_2m_sde_step,
    guidance_with_rescale,
    sde_initial_state,
    sde_start,
    v_to_x0,
)
from st2v_jax.models.clip import CLIPTextConfig, CLIPTextTransformer  # noqa: E402
from st2v_jax.models.layers import abstract_params  # noqa: E402
from st2v_jax.models.vae import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from st2v_jax.models.vid2vid_unet import (  # noqa: E402
    Vid2VidUNet,
    Vid2VidUNetConfig,
    check_latent_size,
)

# fp32 reorderings stay around 1e-5 of the output scale; a wrong norm epsilon, pad side,
# activation or layout is off by 1e-3 or more.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def full_fp32_precision():
    """On GPUs JAX's default fp32 matmuls/convs use TF32, which alone exceeds the tolerance."""
    with jax.default_matmul_precision("float32"):
        yield


def _perturbed(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Moves every tensor, so zero-initialised layers and unit norms cannot hide a mix-up."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _report(name: str, got: np.ndarray, want: np.ndarray) -> None:
    err, scale = float(np.abs(got - want).max()), float(want.std())
    print(f"\n{name}: max abs err {err:.2e}, output std {scale:.3f}, relative {err / scale:.1e}")
    assert got.shape == want.shape
    assert err <= RELATIVE_TOLERANCE * scale


# ------------------------------------------------------------------------------------- UNet

# Three levels: the odd down/up-sampling pads on two levels, a level without attention, and
# a first temporal transformer wider inside (4 x 16) than outside (32), as the official 512/320.
# modelscope hard-codes a 1024-wide context in its decoder, so the context is 1024 here too.
TINY_UNET = dict(
    in_dim=4, dim=32, context_dim=1024, out_dim=4, dim_mult=[1, 2, 2], num_heads=4, head_dim=16,
    num_res_blocks=1, attn_scales=[1, 0.5],
)


def test_unet_matches_modelscope():
    unet_module = vid2vid_module("modules.unet_v2v")
    torch.manual_seed(0)  # modelscope's own initialisation draws from the global generator
    reference = _perturbed(unet_module.Vid2VidSDUNet(use_checkpoint=False, **TINY_UNET))
    config = Vid2VidUNetConfig.from_modelscope(TINY_UNET)
    model = Vid2VidUNet(config)
    rng = np.random.RandomState(0)
    b, f, h, w = 2, 3, 10, 12  # latent height 2 + 4k, width 4k: what two downsamplings accept
    latents = rng.randn(b, 4, f, h, w).astype(np.float32)
    context = rng.randn(b, 5, 1024).astype(np.float32)
    timesteps = np.array([599, 17])
    abstract = abstract_params(model, jnp.zeros((b, f, h, w, 4)), jnp.zeros((b,)), jnp.zeros((b, 5, 1024)))
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    # convert_state_dict refuses any unmapped, missing or mis-shaped tensor.
    params = convert_state_dict(vid2vid_unet_tensors(state_dict), vid2vid_unet_mapping(config), abstract)
    with torch.no_grad():
        want = reference(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.transpose(latents, (0, 2, 3, 4, 1)), timesteps, context)
    _report("MS-Vid2Vid UNet", np.transpose(np.asarray(got), (0, 4, 1, 2, 3)), want)


def test_official_unet_mapping_covers_every_tensor():
    """The full-size modelscope UNet, built on the meta device (no memory), maps one to one onto
    our parameters with the right shapes."""
    unet_module = vid2vid_module("modules.unet_v2v")
    with torch.device("meta"):
        reference = unet_module.Vid2VidSDUNet()
    config = Vid2VidUNetConfig.from_modelscope(MS_VID2VID_XL_UNET)
    model = Vid2VidUNet(config)
    expected = {
        path: leaf.shape
        for path, leaf in traverse_util.flatten_dict(
            nn.unbox(abstract_params(model, jnp.zeros((1, 1, 10, 8, 4)), jnp.zeros(()), jnp.zeros((1, 1, 1024))))
        ).items()
    }
    zero = np.zeros((), np.float32)
    shapes = {key: np.broadcast_to(zero, tuple(t.shape)) for key, t in reference.state_dict().items()}
    mapping = vid2vid_unet_mapping(config)
    got = {}
    for key, array in vid2vid_unet_tensors(shapes).items():
        path = mapping(key)
        assert path is not None, f"unmapped key {key}"
        flax_path, flax_array = to_flax_layout(path, array)
        assert flax_path not in got, f"{key} maps onto {flax_path} twice"
        got[flax_path] = flax_array.shape
    assert got == expected
    count = sum(int(np.prod(s)) for s in expected.values())
    assert count == sum(t.numel() for t in reference.parameters())
    print(f"\nMS-Vid2Vid-XL UNet: {count:,} parameters, all {len(expected)} tensors mapped")


def test_latent_size_check_names_the_rule():
    config = Vid2VidUNetConfig()
    check_latent_size(config, 90, 160)  # the release's 1280x720 letterbox
    with pytest.raises(ValueError, match="720x720 does not"):
        check_latent_size(config, 90, 90)


# -------------------------------------------------------------------------------------- VAE


def test_ldm_vae_matches_modelscope_autoencoder():
    autoencoder = vid2vid_module("modules.autoencoder")
    torch.manual_seed(0)
    ddconfig = dict(
        double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
        num_res_blocks=1, attn_resolutions=[], dropout=0.0,
    )
    reference = _perturbed(autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4))
    config = AutoencoderKLConfig(
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    model = AutoencoderKL(config)
    # As in v2-1_512-ema-pruned.ckpt: the VAE under first_stage_model., next to other models.
    checkpoint = {"first_stage_model." + k: v.numpy() for k, v in reference.state_dict().items()}
    checkpoint["model.diffusion_model.out.2.weight"] = np.zeros((4, 320, 3, 3), np.float32)
    checkpoint["cond_stage_model.model.ln_final.weight"] = np.zeros((1024,), np.float32)
    abstract = abstract_params(model, jnp.zeros((1, 16, 16, 3)))
    params = convert_state_dict(ldm_vae_tensors(checkpoint), ldm_vae_mapping(len(config.block_out_channels)), abstract)

    images = np.random.RandomState(1).uniform(-1, 1, (2, 3, 24, 16)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images))
        decoded = reference.decode(posterior.mean).numpy()
    nhwc = jnp.transpose(images, (0, 2, 3, 1))
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(params, nhwc)
    got_decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, mean)
    to_nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
    _report("SD2.1 VAE (LDM layout) encode mean", to_nchw(mean), posterior.mean.numpy())
    _report("SD2.1 VAE (LDM layout) encode logvar", to_nchw(logvar), posterior.logvar.numpy())
    _report("SD2.1 VAE (LDM layout) decode", to_nchw(got_decoded), decoded)


# ---------------------------------------------------------------------------- text encoder


def test_open_clip_penultimate_text_embedding_matches_modelscope_embedder():
    """modelscope's FrozenOpenCLIPEmbedder(layer='penultimate').encode_with_transformer on an
    open_clip text tower equals our transformers-layout tower one layer shorter."""
    from open_clip_oracle import open_clip_transformer

    embedder = vid2vid_module("modules.embedder")
    transformer = open_clip_transformer()
    width, layers, heads, vocab = 64, 3, 4, 1000
    torch.manual_seed(0)
    tower = transformer.TextTransformer(context_length=77, vocab_size=vocab, width=width, heads=heads, layers=layers, output_dim=32)
    # modelscope was written for open_clip <= 2.24, whose text blocks take (length, batch,
    # width) input; current open_clip builds them batch-first unless told otherwise.
    tower.transformer = transformer.Transformer(width, layers, heads, batch_first=False)
    reference = embedder.FrozenOpenCLIPEmbedder.__new__(embedder.FrozenOpenCLIPEmbedder)
    torch.nn.Module.__init__(reference)
    reference.model, reference.layer_idx, reference.device = _perturbed(tower), 1, "cpu"

    rng = np.random.RandomState(2)
    ids = rng.randint(0, vocab, (2, 77))
    state_dict = {k: v.numpy() for k, v in tower.state_dict().items()}
    state_dict.update({"visual.proj": np.zeros((8, 4), np.float32), "logit_scale": np.zeros((), np.float32)})
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers - 1,
        num_attention_heads=heads, max_position_embeddings=77,
    )
    model = CLIPTextTransformer(config)
    abstract = abstract_params(model, jnp.zeros((1, 77), jnp.int32))
    params = convert_state_dict(open_clip_text_tensors(state_dict, config.num_hidden_layers), open_clip_text_mapping(), abstract)
    with torch.no_grad():
        want = reference.encode_with_transformer(torch.from_numpy(ids)).numpy()
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    _report("OpenCLIP penultimate text embedding", np.asarray(got), want)


# ------------------------------------------------------------------ schedule and sampler


def _reference_diffusion():
    schedules = vid2vid_module("utils.schedules_sdedit")
    diffusion = vid2vid_module("utils.diffusion_sdedit")
    sigmas = schedules.noise_schedule(
        schedule="logsnr_cosine_interp", n=1000, zero_terminal_snr=True, scale_min=2.0, scale_max=4.0
    )
    return sigmas, diffusion.GaussianDiffusion_SDEdit(sigmas=sigmas, prediction_type="v")


def test_schedule_matches_modelscope():
    sigmas, _ = _reference_diffusion()
    schedule = LogSNRCosineSchedule()
    got = schedule.sigmas_float64()
    err = float(np.abs(got - sigmas.numpy()).max())
    print(f"\nlog-SNR cosine schedule sigmas: max abs err {err:.2e} (values in [{got.min():.2e}, 1])")
    assert err < 1e-6
    assert got[-1] == 1.0 and schedule.alphas_float64()[-1] == 0.0  # zero terminal SNR


@pytest.mark.parametrize("steps", [30, 4])
def test_sampler_levels_and_timesteps_match_modelscope(steps):
    _, reference = _reference_diffusion()
    plan = dpmpp_2m_sde_plan(LogSNRCosineSchedule(), steps, t_max=599)
    # modelscope `sample` with solver dpmpp_2m_sde and trailing spacing, as the release calls it:
    t = torch.arange(599, -1, -(600 / (steps + 1))).clamp(0, 599)
    levels = reference._t_to_sigma(t)
    levels = torch.cat([levels[:-1], levels.new_zeros([1])])
    timesteps = [int(reference._sigma_to_t(s).round().long()) for s in levels[:-1]]
    assert np.asarray(plan.timesteps).tolist() == timesteps
    err = float(np.abs(np.asarray(plan.levels) - levels.numpy()).max())
    print(f"\nsampler noise levels ({steps} steps): max abs err {err:.2e}, s_0 = {plan.start_scale:.3f}")
    assert err <= 1e-5 * float(levels.max())


def _toy_model(x, t, y, lib):
    """A small nonlinear v-predictor of latents, timestep and text, written for torch and jnp."""
    return lib.tanh(0.7 * x + 0.002 * t - 0.3) * (1.0 + y.mean()) + 0.1 * x


def test_sampler_with_guidance_rescale_matches_modelscope(monkeypatch):
    """modelscope's whole `sample` loop (4 steps: first order, second order, final x0 step) with
    guidance 7.5 and rescale 0.2, its Brownian-tree noise replaced by fixed noise."""
    solvers = vid2vid_module("utils.solvers_sdedit")
    _, reference = _reference_diffusion()
    schedule = LogSNRCosineSchedule()
    steps = 4
    plan = dpmpp_2m_sde_plan(schedule, steps, t_max=599)
    rng = np.random.RandomState(3)
    shape = (2, 4, 3, 6, 5)  # (B, C, F, H, W), modelscope's layout
    latents = rng.randn(*shape).astype(np.float32)
    start_noise = rng.randn(*shape).astype(np.float32)
    step_noise = rng.randn(steps, *shape).astype(np.float32)
    text, negative = (rng.randn(2, 1, 8).astype(np.float32) for _ in range(2))

    class FixedNoise:
        def __init__(self, *args, **kwargs):
            self.calls = 0

        def __call__(self, sigma, sigma_next):
            self.calls += 1
            return torch.from_numpy(step_noise[self.calls - 1])

    monkeypatch.setattr(solvers, "BrownianTreeNoiseSampler", FixedNoise)
    torch_model = lambda x, t, y: _toy_model(x, t.float().view(-1, 1, 1, 1, 1), y, torch)
    noised = reference.diffuse(torch.from_numpy(latents), torch.tensor([599, 599]), torch.from_numpy(start_noise))
    want = reference.sample(
        noise=noised, model=torch_model, model_kwargs=[{"y": torch.from_numpy(text)}, {"y": torch.from_numpy(negative)}],
        guide_scale=7.5, guide_rescale=0.2, solver="dpmpp_2m_sde", steps=steps, t_max=599, t_min=0,
        discretization="trailing",
    ).numpy()

    x = sde_start(plan, schedule, jnp.asarray(latents), jnp.asarray(start_noise))
    state = sde_initial_state(shape)
    for i in range(plan.num_steps):
        model_input = x * plan.input_scales[i]
        t = plan.timesteps[i].astype(jnp.float32)
        v = guidance_with_rescale(
            _toy_model(model_input, t, jnp.asarray(text), jnp), _toy_model(model_input, t, jnp.asarray(negative), jnp), 7.5, 0.2
        )
        x, state = dpmpp_2m_sde_step(plan, state, v_to_x0(plan, i, model_input, v), x, jnp.asarray(step_noise[i]))
    _report("DPM-Solver++(2M) SDE, 4 steps with guidance rescale", np.asarray(x), want)


def test_guidance_rescale_matches_modelscope_formula():
    """One step's guided output alone, batch entries with different spreads (the ratio is per entry)."""
    _, reference = _reference_diffusion()
    rng = np.random.RandomState(4)
    shape = (2, 4, 3, 6, 5)
    xt = rng.randn(*shape).astype(np.float32)
    scales = np.array([1.0, 3.0], np.float32).reshape(2, 1, 1, 1, 1)
    conditional, unconditional = xt * scales, 0.5 * xt + 0.1
    outputs = iter([torch.from_numpy(conditional), torch.from_numpy(unconditional)])
    _, _, _, x0, _ = reference.denoise(
        torch.from_numpy(xt), torch.tensor([300, 300]), None, lambda x, t: next(outputs), [{}, {}], 7.5, 0.2
    )
    alpha, sigma = (float(a[300]) for a in (LogSNRCosineSchedule().alphas_float64(), LogSNRCosineSchedule().sigmas_float64()))
    got = alpha * xt - sigma * np.asarray(guidance_with_rescale(jnp.asarray(conditional), jnp.asarray(unconditional), 7.5, 0.2))
    _report("guidance 7.5 with rescale 0.2 (x0)", got, x0.numpy())
