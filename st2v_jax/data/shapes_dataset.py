"""`st2v_shapes`: the procedural text-to-video dataset of bouncing shapes, as a TFDS builder.

Built locally (nothing is downloaded) into array_record files, read back by random access
without TensorFlow. Every example is a pure function of (split, index), so two machines
build byte-identical datasets.

Features of an example:
    video       uint8 (num_frames, resolution, resolution, 3)
    caption     text, e.g. "a red circle and a blue square bouncing on a black background"
    num_shapes  int32, 1 or 2
    colours     int32 (2,), index into `shapes.COLOURS` (-1: no shape)
    kinds       int32 (2,), index into `shapes.KINDS` (-1: no shape)
    centres     float32 (num_frames, 2, 2), centre (x, y) in pixels (0 where no shape)

The `train` split uses only the two-shape combinations of `shapes.training_pairs()`; the
`test` split only the held-out ones (`shapes.held_out_pairs()`), for measuring generalisation
to unseen prompts.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from st2v_jax.data import shapes

_SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 64
    num_frames: int = 32
    train_videos: int = 20_000
    test_videos: int = 540


class St2vShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes bouncing on black, with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="64px_32f", description="64x64, 32 frames: the embedded model's training data"),
        ShapesConfig(name="tiny", description="32x32, 32 frames, 64 videos: tests", resolution=32, train_videos=64, test_videos=16),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        f, r = cfg.num_frames, cfg.resolution
        zlib = tfds.features.Encoding.ZLIB
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(shape=(f, r, r, 3), dtype=np.uint8, encoding=zlib),
                    "caption": tfds.features.Text(),
                    "num_shapes": tfds.features.Scalar(dtype=np.int32),
                    "colours": tfds.features.Tensor(shape=(shapes.MAX_SHAPES,), dtype=np.int32),
                    "kinds": tfds.features.Tensor(shape=(shapes.MAX_SHAPES,), dtype=np.int32),
                    "centres": tfds.features.Tensor(shape=(f, shapes.MAX_SHAPES, 2), dtype=np.float32, encoding=zlib),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.train_videos, shapes.training_pairs()),
            "test": self._generate_examples("test", cfg.test_videos, shapes.held_out_pairs()),
        }

    def _generate_examples(self, split: str, count: int, pairs: list):
        cfg = self.builder_config
        for index in range(count):
            scene = shapes.sample_scene(np.random.default_rng([_SPLIT_SEEDS[split], index]), cfg.resolution, pairs)
            yield f"{split}_{index}", scene_example(scene, cfg.num_frames)


def scene_example(scene: shapes.Scene, num_frames: int) -> dict:
    """The dataset record of a scene."""
    colour_names, kind_names = list(shapes.COLOURS), list(shapes.KINDS)
    n = len(scene.shapes)
    pad = shapes.MAX_SHAPES - n
    centres = np.zeros((num_frames, shapes.MAX_SHAPES, 2), np.float32)
    centres[:, :n] = scene.centres(num_frames)
    return {
        "video": scene.render(num_frames),
        "caption": scene.caption,
        "num_shapes": np.int32(n),
        "colours": np.array([colour_names.index(s.colour) for s in scene.shapes] + [-1] * pad, np.int32),
        "kinds": np.array([kind_names.index(s.kind) for s in scene.shapes] + [-1] * pad, np.int32),
        "centres": centres,
    }
