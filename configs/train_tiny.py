"""Smoke-test training: the tiny random model (configs/tiny_random.py) on the tiny
st2v_shapes config, a few steps on a CPU. Make the model first:
    python -m st2v_jax.convert random --config configs/tiny_random.py --out outputs/tiny-random
"""
import ml_collections

from st2v_jax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.model.init = "outputs/tiny-random"
    c.data.builder_config = "tiny"  # 32x32 px, 32 frames
    c.data.data_dir = "outputs/tensorflow_datasets"
    c.batch_size = 2
    c.steps = 20
    c.optimizer.learning_rate = 1e-3
    c.log_every = 1
    c.checkpoint_every = 10
    return c
