"""Configurations of the frozen components inside the official `streaming_t2v.ckpt`.

The checkpoint stores weights only. Its VAE and text encoder are those of ModelScope
text-to-video-ms-1.7b (the values of that repository's vae/ and text_encoder/
config.json), its image encoder is OpenCLIP ViT-H/14 (open_clip's ViT-H-14 model config),
and its streaming model is `configs/streaming_t2v.py` (= `StreamingConfig()` defaults).
"""
from __future__ import annotations

MS_1_7B_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

MS_1_7B_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 512,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

OPEN_CLIP_VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
}

STREAMING_T2V = {
    "unet": {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"],
        "up_block_types": ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 1024,
        "attention_head_dim": 64,
    },
    "streaming": {},
}

# ModelScope text-to-video-ms-1.7b's scheduler_config.json: used when a model ships none.
MS_1_7B_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# MS-Vid2Vid-XL's video UNet (the official refiner): the `Vid2VidSDUNet` defaults that
# modelscope's VideoToVideo builds it with (= the `UNet` entry of its config, minus options
# that change nothing at inference). Its VAE is SD 2.1's (= MS_1_7B_VAE) and its text encoder
# OpenCLIP ViT-H/14's penultimate layer (= MS_1_7B_TEXT_ENCODER's 23 layers).
MS_VID2VID_XL_UNET = {
    "in_dim": 4,
    "dim": 320,
    "context_dim": 1024,
    "out_dim": 4,
    "dim_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "head_dim": 64,
    "num_res_blocks": 2,
    "attn_scales": [1.0, 0.5, 0.25],
}
