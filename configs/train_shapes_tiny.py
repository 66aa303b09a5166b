"""Training recipe of st2v-shapes-tiny, the embedded default model, in five stages; each
starts from the model folder the previous one exported:

    python -m st2v_jax.convert random --config configs/st2v_shapes_tiny.py --out outputs/shapes/init
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:vae       --workdir outputs/shapes/vae
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:clip      --workdir outputs/shapes/clip
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:images    --workdir outputs/shapes/images
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:base      --workdir outputs/shapes/base
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:streaming --workdir outputs/shapes/streaming

vae: the 8x autoencoder; clip: text encoder + APM image encoder, contrastively; images: the
UNet3D's spatial layers on single frames (text-to-image pretraining, the text encoder
frozen); base: its temporal layers on 16-frame clips (motion), the spatial layers frozen;
streaming: CAM + APM + the base's spatial layers (the official split), its base starting
from the trained UNet3D.

The VAE weights each pixel's error by its distance from the background (foreground_weight):
with plain L1 + L2 it had learnt the black background long before the shapes' colours.

The text encoder learns shape kinds only from the image encoder in the clip stage, so that
image encoder sees full-resolution frames (st2v_shapes_tiny.py): at 32x32 it could not tell
a circle from a square, the text encoder then gave the two words nearly the same embedding
(hidden-state distance 2.1 against 11.5 between two colours), and the UNet drew squares as
circles. At 64x64 and 1500 steps the two words are 9.2 apart.
"""
import ml_collections

from st2v_jax.training.config import default_config

ROOT = "outputs/shapes"
TEMPORAL_LAYERS = r"unet/(.*/)?(transformer_in|temp_convs_\d+|temp_attentions_\d+)/.*"
STAGES = {
    # stage: (initial model, trainable patterns, steps, batch, learning rate, EMA decay)
    # Seconds per step on a 2-core CPU: vae 1.3, clip 0.5, images 1.4, base 1.9, streaming 2.2.
    # Text-to-image pretraining (images) sees 128 captions per step where a batch of 16-frame
    # clips of the same cost sees 8: 4500 steps of video-only base training had left the
    # first chunks unfaithful to held-out prompts (1 of 16). Squares are the last thing it
    # learns: 1000 steps after a new text encoder it still drew them as round blobs (read as
    # circles 87 of 128 times), after 2800 as squares (97 of 128).
    "vae": (f"{ROOT}/init", ["vae/.*"], 1000, 8, 1e-3, 0.0),
    "clip": (f"{ROOT}/vae/model", ["text_encoder/.*", "image_encoder/.*"], 1500, 64, 1e-3, 0.0),
    "images": (f"{ROOT}/clip/model", ["unet/.*"], 5000, 128, 1e-3, 0.995),
    "base": (f"{ROOT}/images/model", [TEMPORAL_LAYERS], 300, 8, 5e-4, 0.99),
    "streaming": (f"{ROOT}/base/model", None, 500, 8, 5e-4, 0.99),
}
# Recipe stages that run a trainer stage under another name, the frames of their clips, and
# what they keep frozen. On single frames the temporal layers must not train: a temporal
# convolution's outer taps only ever see its zero padding there, so the zero-initialised last
# convolution would learn to pass on what its random outer taps add once there are 16 frames.
TRAINER_STAGE = {"images": "base"}
BASE_FRAMES = {"images": 1}
FROZEN = {"images": [TEMPORAL_LAYERS]}


def get_config(stage: str = "streaming") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)} (e.g. --config=configs/train_shapes_tiny.py:vae)")
    init, trainable, steps, batch, learning_rate, ema = STAGES[stage]
    c = default_config()
    c.stage = TRAINER_STAGE.get(stage, stage)
    c.model.init = init
    c.model.streaming_base_from_unet = stage == "streaming"
    c.base_frames = BASE_FRAMES.get(stage, 0)
    if trainable is not None:
        c.trainable = trainable
        c.frozen = FROZEN.get(stage, [])
    c.data.name = "st2v_shapes"
    c.data.builder_config = "64px_32f"
    c.data.data_dir = "outputs/tensorflow_datasets"
    c.vae.frames_per_clip = 4
    c.vae.foreground_weight = 10.0
    c.steps = steps
    c.batch_size = batch
    c.optimizer.learning_rate = learning_rate
    c.optimizer.schedule = "warmup_cosine"
    c.optimizer.warmup_steps = min(200, steps // 10)
    c.optimizer.final_lr_fraction = 0.1
    c.optimizer.weight_decay = 0.0
    c.ema_decay = ema
    c.log_every = 25
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    return c
