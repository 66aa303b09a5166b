"""A tiny StreamingT2V with the official structure (16-frame chunks, 8 CAM frames, 77 text
tokens) at toy widths: every component small enough to run on a laptop CPU in seconds.
Used with random weights by the tests and by `python -m st2v_jax.convert random`.
"""
import ml_collections

WIDTH = 64  # token width D: text hidden size, cross-attention width, image embedding


def get_config() -> ml_collections.ConfigDict:
    unet = {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "block_out_channels": [32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "cross_attention_dim": WIDTH,
        "attention_head_dim": 16,
        "sample_size": 16,
    }
    return ml_collections.ConfigDict(
        {
            "unet": unet,
            "streaming": {
                "unet": unet,
                "streaming": {
                    "num_frames": 16,
                    "num_control_input_frames": 8,
                    "cam": {"conditioning_embedding_out_channels": [16, 32]},
                    "resampler": {"input_dim": WIDTH, "inner_dim": 32, "expansion_factor": 4},
                    "apm": {"text_tokens": 77, "image_tokens": 4},
                    "merger": {"head_dim": 32, "groups": 32},
                },
            },
            "vae": {
                "block_out_channels": [32, 32],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2,
                "layers_per_block": 1,
                "latent_channels": 4,
                "norm_num_groups": 32,
                "scaling_factor": 0.18215,
            },
            "text_encoder": {
                "model_type": "clip_text_model",
                "vocab_size": 514,
                "hidden_size": WIDTH,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-5,
                "eos_token_id": 1,
            },
            "image_encoder": {"embed_dim": WIDTH, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16}},
        }
    )
