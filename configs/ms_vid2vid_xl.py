"""MS-Vid2Vid-XL, the official StreamingT2V refiner: its component configs.

`vid2vid_unet` holds modelscope `Vid2VidSDUNet` arguments, `vae` SD 2.1's VAE (diffusers
AutoencoderKL fields) and `text_encoder` the OpenCLIP ViT-H/14 text tower up to its
penultimate layer (transformers CLIPTextModel fields, 23 layers). The sampling settings (30
DPM-Solver++(2M) SDE steps from timestep 599, guidance 7.5 with rescale 0.2, chunks of 24
overlapping by 8, the 1280x720 canvas) are `st2v_jax.generation.vid2vid_refiner.Vid2VidRefinerConfig`'s
defaults. Usable as `python -m st2v_jax.convert random --config configs/ms_vid2vid_xl.py`.
"""
import ml_collections

from st2v_jax.convert.official_configs import (
    MS_1_7B_TEXT_ENCODER,
    MS_1_7B_VAE,
    MS_VID2VID_XL_UNET,
)


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"vid2vid_unet": MS_VID2VID_XL_UNET, "vae": MS_1_7B_VAE, "text_encoder": MS_1_7B_TEXT_ENCODER}
    )
