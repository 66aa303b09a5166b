"""The official StreamingT2V recipe (REFERENCE.md section 6) on your own WebVid-style folder.

CAM + APM and the base UNet's spatial layers train; the base UNet's temporal layers, the
VAE and the text and image encoders stay frozen. AdamW, lr 5e-5 constant, clipping at 1.0,
batch 8 with 8 accumulation steps (64 clips per optimizer step), 32-frame clips at 256 px:
anchor from frames 1-16, CAM conditioning on frames 17-24, denoising frames 17-32.

    python -m st2v_jax.train --config configs/train_streaming.py --workdir runs/cam_apm \\
        --config.model.init=ckpt/streaming_t2v --config.data.manual_dir=/data/webvid
"""
import ml_collections

from st2v_jax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model.init = "ckpt/streaming_t2v"
    c.data.name = "video_folder"
    c.data.height = c.data.width = 256
    c.data.num_frames = 32
    c.batch_size = 64
    c.accumulation_steps = 8
    c.steps = 400_000
    c.log_every = 50
    c.checkpoint_every = 2_000
    return c
