"""The official refiner's plumbing (st2v_jax.generation.vid2vid_refiner, convert.vid2vid):
letterboxing, the blended SDE loop (an exact x0 predictor is recovered, chunking is invisible
to a frame-local model), and conversion of release-format files through a converted folder to
refined frames, on tiny random models."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from st2v_jax.diffusion.vid2vid_schedule import LogSNRCosineSchedule, dpmpp_2m_sde_plan
from st2v_jax.generation.vid2vid_refiner import (
    Vid2VidRefinerConfig,
    content_box,
    letterbox_video,
    refine_latents_vid2vid,
)

SCHEDULE = LogSNRCosineSchedule()
CONFIG = Vid2VidRefinerConfig(chunk=4, overlap=2, num_steps=5, canvas_height=12, canvas_width=20)


def test_letterbox_fits_centres_and_pads_black():
    assert content_box(256, 256, (720, 1280)) == (0, 280, 720, 720)  # the release's 720x720 in 1280x720
    assert content_box(144, 256, (720, 1280)) == (0, 0, 720, 1280)
    frames = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 2, 8, 8, 3)), jnp.float32)
    boxed = np.asarray(letterbox_video(frames, (12, 20)))
    assert boxed.shape == (1, 2, 12, 20, 3)
    assert (boxed[:, :, :, :4] == -1).all() and (boxed[:, :, :, 16:] == -1).all()
    resized = np.asarray(jax.image.resize(frames, (1, 2, 12, 12, 3), "bicubic"))
    np.testing.assert_allclose(boxed[:, :, :, 4:16], np.clip(resized, -1, 1))


def _exact_x0_denoiser(target_chunks_fn):
    """Returns the v that makes x0 = target (given the table alpha/sigma at the timestep)."""
    alphas = jnp.asarray(SCHEDULE.alphas_float64(), jnp.float32)
    sigmas = jnp.asarray(SCHEDULE.sigmas_float64(), jnp.float32)

    def denoise(chunks, t):
        return (alphas[t] * chunks - target_chunks_fn(chunks)) / sigmas[t]

    return denoise


def test_an_exact_x0_predictor_is_recovered():
    """Whatever the chunking and blending, the last step returns the stitched x0; if every chunk
    predicts the same clean video, that video comes out."""
    target = jnp.asarray(np.random.default_rng(1).standard_normal((1, 7, 6, 10, 4)), jnp.float32)
    # Every chunk's frames are identical here, so its "prediction" can be read off its content.
    video = jnp.broadcast_to(target[:, :1], target.shape)
    out = refine_latents_vid2vid(
        _exact_x0_denoiser(lambda chunks: jnp.broadcast_to(video[:, :1], chunks.shape)), SCHEDULE, CONFIG, video, jax.random.key(0)
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(video), atol=1e-5)


def test_chunking_is_invisible_to_a_frame_local_model():
    latents = jnp.asarray(np.random.default_rng(2).standard_normal((1, 7, 6, 10, 4)), jnp.float32)
    local = lambda chunks, t: jnp.tanh(0.5 * chunks + t / 1000.0)
    whole = dataclasses.replace(CONFIG, chunk=7, overlap=0)
    a = refine_latents_vid2vid(local, SCHEDULE, CONFIG, latents, jax.random.key(3))
    b = refine_latents_vid2vid(local, SCHEDULE, whole, latents, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert not np.allclose(np.asarray(a), np.asarray(latents), atol=1e-2)


def test_release_steps_span_the_noise_range():
    plan = dpmpp_2m_sde_plan(SCHEDULE, 30, t_max=599)
    timesteps = np.asarray(plan.timesteps)
    assert len(timesteps) == 30 and timesteps[0] == 599 and timesteps[-1] < 40
    with pytest.raises(ValueError, match="pure noise"):
        dpmpp_2m_sde_plan(SCHEDULE, 30, t_max=999)


def test_release_files_convert_and_refine(tmp_path):
    """Tiny models saved in the release's file formats -> converter -> converted folder ->
    Vid2VidRefiner -> refined uint8 frames (content region and letterbox)."""
    torch = pytest.importorskip("torch")
    from open_clip_oracle import open_clip_transformer
    from vid2vid_oracle import vid2vid_module

    from st2v_jax.checkpoint import save_converted
    from st2v_jax.convert.vid2vid import from_ms_vid2vid_files
    from st2v_jax.generation.vid2vid_refiner import Vid2VidRefiner, is_vid2vid_model
    from st2v_jax.tokenizer import write_byte_level_tokenizer

    torch.manual_seed(0)
    unet_kwargs = dict(in_dim=4, dim=32, context_dim=1024, out_dim=4, dim_mult=[1, 2], num_heads=2, head_dim=16,
                       num_res_blocks=1, attn_scales=[1])
    unet = vid2vid_module("modules.unet_v2v").Vid2VidSDUNet(use_checkpoint=False, **unet_kwargs)
    with torch.no_grad():  # its zero-initialised output conv would make v = 0
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    torch.save({"state_dict": unet.state_dict()}, tmp_path / "non_ema_0035000.pth")
    ddconfig = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = vid2vid_module("modules.autoencoder").AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    sd["model.diffusion_model.time_embed.0.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": sd}, tmp_path / "v2-1_512-ema-pruned.ckpt")
    text = open_clip_transformer().TextTransformer(context_length=77, vocab_size=600, width=1024, heads=16, layers=2, output_dim=8)
    torch.save({**text.state_dict(), "logit_scale": torch.zeros(())}, tmp_path / "open_clip_pytorch_model.bin")
    tokenizer = write_byte_level_tokenizer(tmp_path / "tokenizer")

    configs = {
        "vid2vid_unet": unet_kwargs,
        "vae": dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1),
        "text_encoder": dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=600, hidden_size=1024,
                             intermediate_size=4096, num_hidden_layers=1, num_attention_heads=16, max_position_embeddings=77,
                             hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2),
    }
    model = from_ms_vid2vid_files(
        tmp_path / "non_ema_0035000.pth", tmp_path / "open_clip_pytorch_model.bin", tmp_path / "v2-1_512-ema-pruned.ckpt",
        tokenizer, configs=configs,
    )
    folder = save_converted(model, tmp_path / "refiner")
    assert is_vid2vid_model(folder)
    refiner = Vid2VidRefiner.from_pretrained(folder)
    frames = np.random.default_rng(4).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    config = Vid2VidRefinerConfig(chunk=3, overlap=1, num_steps=3, canvas_height=12, canvas_width=20)
    square = refiner.refine(frames, "a red ball", "", config, seed=0)
    boxed = refiner.refine(frames, "a red ball", "", dataclasses.replace(config, letterbox=True), seed=0)
    assert square.shape == (5, 12, 12, 3) and boxed.shape == (5, 12, 20, 3)
    assert refiner.output_size(8, 8, config) == (12, 12)
    np.testing.assert_array_equal(square, boxed[:, :, 4:16])


def test_sample_cli_picks_the_official_refiner_for_a_vid2vid_folder(tmp_path):
    """`--refiner-dir` on a converted MS-Vid2Vid-XL folder gives the release's settings
    (30 steps from timestep 599), and options of the generic refiner are refused."""
    from st2v_jax.checkpoint import save_converted
    from st2v_jax.convert.components import random_pretrained
    from st2v_jax.sample import UsageError, _parser, _refiner_config

    tiny = dict(dim=32, dim_mult=[1], num_heads=2, head_dim=16, num_res_blocks=1, attn_scales=[1], context_dim=64)
    folder = save_converted(random_pretrained({"vid2vid_unet": tiny}), tmp_path / "vid2vid")
    base = ["--prompt", "x", "--model-dir", "m", "--refine", "--refiner-dir", str(folder)]
    config = _refiner_config(_parser().parse_args(base), 80)
    assert isinstance(config, Vid2VidRefinerConfig)
    assert (config.num_steps, config.start_timestep, config.guidance, config.guidance_rescale) == (30, 599, 7.5, 0.2)
    assert _refiner_config(_parser().parse_args(base + ["--refiner-letterbox"]), 80).letterbox
    with pytest.raises(UsageError, match="1280x720 canvas"):
        _refiner_config(_parser().parse_args(base + ["--refiner-height", "64"]), 80)
