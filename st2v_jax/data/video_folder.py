"""`video_folder`: a WebVid-style dataset from local files, as a TFDS builder.

The manual folder holds the videos and one captions file:
    captions.csv    columns: a video id (`videoid`, `video_id` or `id`), a caption (`name`
                    (WebVid's column), `caption` or `text`), optionally `path` (the video
                    file, relative to the folder)
    captions.json   a list of {"video_id": ..., "caption": ..., ["path": ...]} objects,
                    or an object {video id: caption}
    captions.jsonl  one such object per line
Without a `path`, the video is the file named `<video id>.<ext>` anywhere under the folder
(mp4, webm, mov, mkv, avi, gif).

Each video is decoded once, centre-cropped and resized to `resolution`, every
`frame_stride`-th frame kept, and cut into up to `max_clips_per_video` non-overlapping clips
of `num_frames` frames. Videos too short for one clip are skipped and counted.

Features: video uint8 (num_frames, height, width, 3), caption (text), video_id (text).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from st2v_jax.generation.media_input import iter_video_frames

CAPTION_FILES = ("captions.csv", "captions.json", "captions.jsonl")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
_ID_COLUMNS = ("videoid", "video_id", "id")
_CAPTION_COLUMNS = ("name", "caption", "text")


class CaptionsError(ValueError):
    """The captions file is missing, malformed, or names videos that are not there."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    video_id: str
    caption: str
    path: pathlib.Path


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
    height: int = 256
    width: int = 256
    num_frames: int = 32
    frame_stride: int = 1
    max_clips_per_video: int = 1

    @classmethod
    def make(cls, height: int, width: int, num_frames: int, frame_stride: int = 1, max_clips_per_video: int = 1) -> "VideoFolderConfig":
        """A config named after its parameters, so differently-cut datasets never share a folder."""
        name = f"{height}x{width}_{num_frames}f_stride{frame_stride}_clips{max_clips_per_video}"
        return cls(name=name, height=height, width=width, num_frames=num_frames, frame_stride=frame_stride, max_clips_per_video=max_clips_per_video)


def _first_present(row: dict, columns: tuple[str, ...], what: str, source: pathlib.Path) -> str:
    for column in columns:
        if row.get(column) not in (None, ""):
            return str(row[column])
    raise CaptionsError(f"{source}: a record has no {what} (looked for {list(columns)}): {row}")


def read_caption_records(folder: pathlib.Path) -> list[dict]:
    """The rows of the folder's captions file as dicts."""
    present = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(present) != 1:
        found = [p.name for p in present] or "none"
        raise CaptionsError(f"{folder} must hold exactly one of {list(CAPTION_FILES)} (found {found})")
    source = present[0]
    text = source.read_text(encoding="utf-8")
    try:
        if source.suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if source.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as err:
        raise CaptionsError(f"{source} is not valid {source.suffix[1:]}: {err}") from None
    if isinstance(data, dict):
        return [{"video_id": key, "caption": value} for key, value in data.items()]
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        return data
    raise CaptionsError(f"{source} must hold a list of objects or an object {{video id: caption}}")


def find_videos(folder: pathlib.Path) -> list[VideoRecord]:
    """Every captioned video of the folder; raises CaptionsError naming missing files."""
    rows = read_caption_records(folder)
    if not rows:
        raise CaptionsError(f"the captions file in {folder} has no records")
    by_stem = {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()}
    records, missing = [], []
    for row in rows:
        video_id = _first_present(row, _ID_COLUMNS, "video id", folder)
        caption = _first_present(row, _CAPTION_COLUMNS, "caption", folder)
        path = folder / row["path"] if row.get("path") else by_stem.get(video_id)
        if path is None or not path.is_file():
            missing.append(video_id)
        else:
            records.append(VideoRecord(video_id, caption, path))
    if missing:
        raise CaptionsError(
            f"{len(missing)} captioned videos have no file in {folder} (e.g. {missing[:5]}); add the files, "
            f"remove their captions, or give a `path` column (extensions looked for: {list(VIDEO_EXTENSIONS)})"
        )
    return records


def video_clips(path: pathlib.Path, config: VideoFolderConfig) -> Iterator[np.ndarray]:
    """Non-overlapping clips (num_frames, height, width, 3) of every frame_stride-th frame."""
    clip: list[np.ndarray] = []
    emitted = 0
    for index, frame in enumerate(iter_video_frames(path, config.height, config.width)):
        if index % config.frame_stride:
            continue
        clip.append(frame)
        if len(clip) == config.num_frames:
            yield np.stack(clip)
            clip, emitted = [], emitted + 1
            if emitted == config.max_clips_per_video:
                return


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """Captioned local videos cut into fixed-length clips; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [VideoFolderConfig.make(256, 256, 32)]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the videos and one captions file (captions.csv with columns videoid,name[,path]; "
        "captions.json; or captions.jsonl) in a folder and pass it as the manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(
                        shape=(cfg.num_frames, cfg.height, cfg.width, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "caption": tfds.features.Text(),
                    "video_id": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {"train": self._generate_examples(find_videos(pathlib.Path(dl_manager.manual_dir)))}

    def _generate_examples(self, records: list[VideoRecord]):
        too_short = []
        for record in records:
            clips = 0
            for clips, clip in enumerate(video_clips(record.path, self.builder_config), start=1):
                yield f"{record.video_id}/{clips - 1}", {"video": clip, "caption": record.caption, "video_id": record.video_id}
            if not clips:
                too_short.append(record.video_id)
        if too_short:
            logging.warning(
                "%d videos are shorter than one clip (%d frames at stride %d) and were skipped, e.g. %s",
                len(too_short), self.builder_config.num_frames, self.builder_config.frame_stride, too_short[:5],
            )
