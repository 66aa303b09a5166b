"""st2v-shapes-tiny: the embedded default model's architecture (trained on st2v_shapes,
64x64 px). Official structure (16-frame chunks, 8 CAM frames, 77 text tokens, APM) at toy
widths: the VAE compresses 8x to 8x8x8 latents; the UNet3D attends at both of its levels.
`tokenizer_words` become single tokens of the byte-level CLIP tokenizer; `sampling` holds
the model's sampling defaults (kept in its folder as sampling.json).

    python -m st2v_jax.convert random --config configs/st2v_shapes_tiny.py --out outputs/shapes/init
"""
import ml_collections

WIDTH = 64  # token width: text hidden size, cross-attention width, image embedding
LATENT_CHANNELS = 8


def get_config() -> ml_collections.ConfigDict:
    unet = {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": WIDTH,
        "attention_head_dim": 16,
        "sample_size": 8,
    }
    return ml_collections.ConfigDict(
        {
            "unet": unet,
            "streaming": {
                "unet": unet,
                "streaming": {
                    "num_frames": 16,
                    "num_control_input_frames": 8,
                    "cam": {"conditioning_embedding_out_channels": [16, 16, 32, 32]},
                    "resampler": {"input_dim": WIDTH, "inner_dim": 64, "expansion_factor": 4},
                    "apm": {"text_tokens": 77, "image_tokens": 4},
                    "merger": {"head_dim": 32, "groups": 8},
                },
            },
            "vae": {
                "block_out_channels": [16, 32, 64, 64],
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 1,
                "latent_channels": LATENT_CHANNELS,
                "norm_num_groups": 8,
                "scaling_factor": 1.0,  # re-measured after VAE training
            },
            "text_encoder": {
                "model_type": "clip_text_model",
                "architectures": ["CLIPTextModelWithProjection"],
                "vocab_size": 1024,
                "hidden_size": WIDTH,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-5,
                "eos_token_id": 1,
                "projection_dim": WIDTH,
            },
            # The image encoder sees the frames at full 64x64 resolution: at 32x32 its
            # embeddings of a circle and a square of one colour were as close (cosine 0.944) as
            # two renders of one shape (0.949), so the contrastive stage taught the text
            # encoder that "circle" and "square" mean the same; at 64x64 their cosine is 0.55.
            "image_encoder": {
                "embed_dim": WIDTH,
                "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
            },
            # Overrides of ModelScope's scheduler config. v-prediction: an epsilon model's x0
            # estimate at t = 999 is its error times 1 / sqrt(alpha_bar) = 15, and the high-noise
            # steps are where the layout and colours of the first chunk are decided.
            "scheduler": {"prediction_type": "v_prediction"},
            # Defaults of `python -m st2v_jax.sample` for this model (SamplingSettings fields).
            "sampling": {"steps": 10, "init_steps": 10, "guidance": 5.0, "init_guidance": 5.0, "eta": 0.0},
            "tokenizer_words": [
                "a", "and", "bouncing", "on", "black", "background",
                "red", "green", "blue", "yellow", "purple", "white",
                "circle", "square", "triangle",
            ],
        }
    )
