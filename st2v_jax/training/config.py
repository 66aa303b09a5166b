"""The training configuration: every key with its default. Config files in `configs/`
start from `default_config()` and override what they need."""
from __future__ import annotations

import ml_collections

from st2v_jax.parallel import DEFAULT_RULES
from st2v_jax.training.trainable import OFFICIAL_FROZEN, OFFICIAL_TRAINABLE


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # "streaming": the CAM + APM model; "base": the text-to-video UNet3D (first-chunk model);
    # "vae": the autoencoder; "clip": the text encoder and APM image encoder, contrastively.
    c.stage = "streaming"
    c.model = ml_collections.ConfigDict(
        {
            # A model folder (converted, diffusers or official; see load_pretrained) to start from.
            "init": "",
            # Start the streaming model's base UNet3D from the model's `unet` (the official
            # recipe starts it from the pretrained text-to-video model).
            "streaming_base_from_unet": False,
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            "name": "st2v_shapes",  # or "video_folder"
            "data_dir": "~/tensorflow_datasets",
            "split": "train",
            "builder_config": "64px_32f",  # st2v_shapes only
            # video_folder only: the folder of videos + captions file, and how clips are cut.
            "manual_dir": "",
            "height": 256,
            "width": 256,
            "num_frames": 32,
            "frame_stride": 1,
            "max_clips_per_video": 1,
        }
    )
    # Device mesh and logical axis rules (see st2v_jax.parallel): the batch is split over
    # data x fsdp, parameters and optimizer state over fsdp (input features) and tensor.
    c.sharding = ml_collections.ConfigDict({"mesh": "data=-1,fsdp=1,tensor=1", "rules": DEFAULT_RULES})
    # How the models run (st2v_jax.models.execution): attention xla | cudnn (GPU, bfloat16) |
    # splash (TPU, one device); compute_dtype float32 | bfloat16 (params, gradients and
    # optimizer state stay float32); remat none | blocks | dots_saveable (memory for compute).
    c.execution = ml_collections.ConfigDict({"attention": "xla", "compute_dtype": "float32", "remat": "none"})
    # Stage "base": frames per training clip; 0 is the model's chunk length, 1 trains the UNet3D
    # on single frames (text-to-image pretraining: 16x the captions per step at equal cost).
    c.base_frames = 0
    c.trainable = list(OFFICIAL_TRAINABLE)
    c.frozen = list(OFFICIAL_FROZEN)
    # foreground_weight: see training/autoencoder_objective.py (0: plain L1 + L2).
    c.vae = ml_collections.ConfigDict({"frames_per_clip": 4, "kl_weight": 1e-6, "foreground_weight": 0.0})
    c.clip = ml_collections.ConfigDict({"temperature": 0.07})
    c.dropout = ml_collections.ConfigDict({"uncond_probability": 0.1, "text_only": 0.05, "anchor_only": 0.05})
    # REFERENCE.md section 6: AdamW, lr 5e-5, no warm-up, clipping at 1.0, accumulation 8.
    c.optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 5e-5,
            "schedule": "constant",  # constant | warmup_constant | warmup_cosine
            "warmup_steps": 0,
            "final_lr_fraction": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 1e-2,
            "clip_norm": 1.0,
        }
    )
    c.batch_size = 8  # global, per optimizer step (split into accumulation_steps micro-batches)
    c.accumulation_steps = 1
    c.steps = 1000
    c.seed = 0
    c.ema_decay = 0.0  # > 0: keep an EMA of the trained params and export it
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    return c
