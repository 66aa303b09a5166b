"""The official StreamingT2V streaming model (ModelScope text-to-video-ms-1.7b base, CAM, APM).

Same vocabulary as the official fixtures' config.json: `unet` is a diffusers
UNet3DConditionModel config, `streaming` the CAM/APM options.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
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
                "sample_size": 32,
            },
            "streaming": {
                "num_frames": 16,
                "num_control_input_frames": 8,
                "num_anchor_frames": 1,
                "cam": {"conditioning_embedding_out_channels": [32, 96, 256, 512]},
                "resampler": {"input_dim": 1024, "inner_dim": 1280, "expansion_factor": 16},
                "apm": {"text_tokens": 77, "image_tokens": 16},
                "merger": {"head_dim": 64, "groups": 32},
            },
        }
    )
