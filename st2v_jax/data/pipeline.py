"""Training input: prepare a TFDS dataset locally, then feed per-host slices of global batches.

The batch of step `s` is a pure function of (seed, s): the records are walked in a seeded
permutation per epoch and each clip's start frame is drawn from (seed, s, position). So a
run restarted at step s sees exactly the batches an uninterrupted run would have seen, and
every host can compute its own slice of the global batch without talking to the others.
"""
from __future__ import annotations

import dataclasses
import pathlib
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from st2v_jax.data.shapes_dataset import St2vShapes
from st2v_jax.data.video_folder import VideoFolder, VideoFolderConfig

DATASETS = ("st2v_shapes", "video_folder")
HostBatch = dict[str, np.ndarray]


def make_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder a training config's `data` section describes."""
    data_dir = str(pathlib.Path(data.data_dir).expanduser())
    if data.name == "st2v_shapes":
        return St2vShapes(config=data.builder_config, data_dir=data_dir, file_format="array_record")
    if data.name == "video_folder":
        config = VideoFolderConfig.make(data.height, data.width, data.num_frames, data.frame_stride, data.max_clips_per_video)
        return VideoFolder(config=config, data_dir=data_dir, file_format="array_record")
    raise ValueError(f"unknown dataset {data.name!r}; expected one of {DATASETS}")


def prepare(data: ml_collections.ConfigDict) -> Sequence[dict]:
    """Builds the dataset if needed (process 0 first, so hosts sharing a data_dir never build
    it twice at once) and returns the split as a random-access source of records."""
    builder = make_builder(data)
    download_config = None
    if data.name == "video_folder":
        manual_dir = pathlib.Path(data.manual_dir).expanduser()
        if not manual_dir.is_dir():
            raise FileNotFoundError(f"data.manual_dir {manual_dir} is not a folder of videos and a captions file")
        download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    if jax.process_index() == 0:
        builder.download_and_prepare(download_config=download_config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("st2v_jax dataset prepared")
        builder.download_and_prepare(download_config=download_config)
    return builder.as_data_source(split=data.split)


@dataclasses.dataclass
class TrainingBatches:
    """Per-host slices of deterministic global batches of `clip_frames`-frame clips.

    A host batch is {"video": uint8 (b, clip_frames, H, W, 3), "input_ids": int32 (b, L)}
    where b = global_batch_size / process_count.
    """

    source: Sequence[dict]
    tokenize: Callable[[list[str]], np.ndarray]
    global_batch_size: int
    clip_frames: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    _permutations: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.source) == 0:
            raise ValueError("the training dataset is empty")
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global batch {self.global_batch_size} does not split over {self.process_count} hosts")
        frames = self.source[0]["video"].shape[0]
        if frames < self.clip_frames:
            raise ValueError(
                f"the dataset's clips have {frames} frames but training needs {self.clip_frames}; "
                f"rebuild the dataset with num_frames >= {self.clip_frames}"
            )

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.source))}
        return self._permutations[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Record indices of the global batch of `step`."""
        positions = step * self.global_batch_size + np.arange(self.global_batch_size)
        n = len(self.source)
        return np.array([self._permutation(int(p // n))[p % n] for p in positions])

    def host_batch(self, step: int) -> HostBatch:
        local = self.global_batch_size // self.process_count
        first = self.process_index * local
        videos, captions = [], []
        for j, index in enumerate(self.global_indices(step)[first : first + local], start=first):
            record = self.source[int(index)]
            video = record["video"]
            start = np.random.default_rng([self.seed, step, j]).integers(video.shape[0] - self.clip_frames + 1)
            videos.append(video[start : start + self.clip_frames])
            caption = record["caption"]
            captions.append(caption.decode() if isinstance(caption, bytes) else str(caption))
        return {"video": np.stack(videos), "input_ids": self.tokenize(captions)}

    def iterate(self, start_step: int, prefetch: int = 2) -> Iterator[tuple[int, HostBatch]]:
        """(step, host batch) from `start_step` on, read ahead by a background thread."""
        ready: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def produce() -> None:
            step = start_step
            while not stop.is_set():
                try:
                    item: Any = (step, self.host_batch(step))
                except Exception as err:  # handed to the consumer, which re-raises it
                    item = err
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, Exception):
                    return
                step += 1

        thread = threading.Thread(target=produce, daemon=True, name="st2v-input")
        thread.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)


def to_global_arrays(batch: HostBatch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Host slices -> global arrays laid out by `sharding` (batch along its first axis)."""
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in batch.items()}
