"""Test support: a tiny random text-to-video-ms-1.7b-style diffusers folder.

Built with diffusers' and transformers' own classes and `save_pretrained`, so its layout is
exactly what those libraries write; the tokenizer is a byte-level CLIP BPE vocabulary with
a few merges (no download needed), written in the vocab.json/merges.txt layout of the hub.
"""
from __future__ import annotations

import json
import pathlib

import torch

from st2v_jax.tokenizer import write_byte_level_tokenizer

UNET_KWARGS = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    layers_per_block=1,
    norm_num_groups=32,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=8,
)
VAE_KWARGS = dict(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=16,
)
TEXT_KWARGS = dict(
    vocab_size=520, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
)
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets on every parameter, so zero-initialised layers are exercised too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def make_tiny_text_to_video(directory: pathlib.Path, seed: int = 0) -> dict:
    """Writes the folder and returns the torch modules {unet, vae, text_encoder}."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    modules = {
        "unet": _perturb(UNet3DConditionModel(**UNET_KWARGS), seed),
        "vae": _perturb(AutoencoderKL(**VAE_KWARGS), seed + 1),
        "text_encoder": _perturb(CLIPTextModel(CLIPTextConfig(**TEXT_KWARGS)), seed + 2),
    }
    for name, module in modules.items():
        module.save_pretrained(directory / name)
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ).save_pretrained(directory / "scheduler")
    write_byte_level_tokenizer(directory / "tokenizer", MERGES)
    (directory / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "TextToVideoSDPipeline",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet3DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    return modules
