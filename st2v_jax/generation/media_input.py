"""Reading user media to start a generation from: an image (`--image`) or a video (`--extend`).

Frames are centre-cropped to the target aspect ratio, then resized (Lanczos), as uint8.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterator

import numpy as np
from PIL import Image


def fit_frame(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect ratio of (height, width), then Lanczos-resize -> uint8 (height, width, 3)."""
    w, h = image.size
    target = width / height
    if w / h > target:  # too wide: crop the sides
        crop = round(h * target)
        image = image.crop(((w - crop) // 2, 0, (w - crop) // 2 + crop, h))
    elif w / h < target:  # too tall: crop top and bottom
        crop = round(w / target)
        image = image.crop((0, (h - crop) // 2, w, (h - crop) // 2 + crop))
    return np.asarray(image.convert("RGB").resize((width, height), Image.LANCZOS), dtype=np.uint8)


def load_image(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """An image file -> uint8 (1, height, width, 3)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return fit_frame(image, height, width)[None]
    except OSError as err:
        raise ValueError(f"{path} is not a readable image ({err})") from None


def iter_video_frames(path: str | os.PathLike, height: int, width: int) -> Iterator[np.ndarray]:
    """Decodes a video file one frame at a time -> uint8 (height, width, 3) frames."""
    import imageio_ffmpeg

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        w, h = next(reader)["size"]
        for raw in reader:
            yield fit_frame(Image.frombuffer("RGB", (w, h), raw, "raw", "RGB", 0, 1), height, width)
    except (RuntimeError, OSError, StopIteration) as err:
        raise ValueError(f"{path} is not a readable video ({err})") from None
    finally:
        reader.close()  # stops ffmpeg when the caller stops early


def load_video(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """A video file -> uint8 (F, height, width, 3)."""
    frames = list(iter_video_frames(path, height, width))
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames)
