"""Every component of the official StreamingT2V model at full size: the base UNet3D
(text-to-video-ms-1.7b, the first chunk), the streaming model (its UNet3D + CAM + APM),
the VAE, the text encoder and the OpenCLIP ViT-H/14 image encoder.

    python -m st2v_jax.parallel --config configs/streaming_t2v_components.py --mesh fsdp=8
    python -m st2v_jax.convert random --config configs/streaming_t2v_components.py --out DIR

(the second: full-size random weights, e.g. to try a TPU's memory before converting).
"""
import ml_collections

from st2v_jax.convert.official_configs import MS_1_7B_TEXT_ENCODER, MS_1_7B_VAE, OPEN_CLIP_VIT_H_14, STREAMING_T2V


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "unet": STREAMING_T2V["unet"],
            "streaming": STREAMING_T2V,
            "vae": MS_1_7B_VAE,
            "text_encoder": MS_1_7B_TEXT_ENCODER,
            "image_encoder": OPEN_CLIP_VIT_H_14,
        }
    )
