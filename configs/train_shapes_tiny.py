"""Training recipe of st2v-shapes-tiny, the embedded default model, in five stages; each
starts from the model folder the previous one exported:

    python -m st2v_jax.convert random --config configs/st2v_shapes_tiny.py --out outputs/shapes/init
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:vae       --workdir outputs/shapes/vae
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:clip      --workdir outputs/shapes/clip
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:base      --workdir outputs/shapes/base
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:streaming --workdir outputs/shapes/streaming
    python -m st2v_jax.train --config configs/train_shapes_tiny.py:decoder   --workdir outputs/shapes/decoder

vae: the 8x autoencoder; clip: text encoder + APM image encoder, contrastively; base: the
first-chunk UNet3D with the text encoder frozen; streaming: CAM + APM + the base's spatial
layers (the official split), its base starting from the trained UNet3D; decoder: the VAE
decoder alone, longer (the encoder, hence the latent space the UNets learnt, stays fixed).
"""
import ml_collections

from st2v_jax.training.config import default_config

ROOT = "outputs/shapes"
STAGES = {
    # stage: (initial model, trainable patterns, steps, batch, learning rate, EMA decay)
    # Seconds per step on a 2-core CPU: vae 0.65, clip 0.2, base 2.2, streaming 2.4, decoder 0.6
    # (about 4.5 hours in all). Neither 900 nor 4500 base steps follow held-out prompts
    # (0/16 and 1/16 first chunks): the 8x VAE leaves an 8x8 latent grid in which a shape
    # spans about 2x2 cells, so more steps alone do not make this recipe prompt-faithful.
    "vae": (f"{ROOT}/init", ["vae/.*"], 800, 8, 1e-3, 0.0),
    "clip": (f"{ROOT}/vae/model", ["text_encoder/.*", "image_encoder/.*"], 400, 64, 1e-3, 0.0),
    "base": (f"{ROOT}/clip/model", ["unet/.*"], 4500, 8, 1e-3, 0.999),
    "streaming": (f"{ROOT}/base/model", None, 1500, 8, 5e-4, 0.999),
    "decoder": (f"{ROOT}/streaming/model", ["vae/decoder/.*", "vae/post_quant_conv/.*"], 300, 8, 3e-4, 0.0),
}
# Recipe stages that run a trainer stage under another name.
TRAINER_STAGE = {"decoder": "vae"}


def get_config(stage: str = "streaming") -> ml_collections.ConfigDict:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)} (e.g. --config=configs/train_shapes_tiny.py:vae)")
    init, trainable, steps, batch, learning_rate, ema = STAGES[stage]
    c = default_config()
    c.stage = TRAINER_STAGE.get(stage, stage)
    c.model.init = init
    c.model.streaming_base_from_unet = stage == "streaming"
    if trainable is not None:
        c.trainable = trainable
        c.frozen = []
    c.data.name = "st2v_shapes"
    c.data.builder_config = "64px_32f"
    c.data.data_dir = "outputs/tensorflow_datasets"
    c.vae.frames_per_clip = 2
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
