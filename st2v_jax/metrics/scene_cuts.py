"""SCuts (paper Table 1; lower is better): the number of hard scene cuts in a video, found
by PySceneDetect's AdaptiveDetector at its default settings, which is what the paper used.
A long video generated in chunks should have none: a cut means a chunk did not continue
the previous one.

The detector reads the video file itself (OpenCV decoding, and PySceneDetect's automatic
downscaling to about 256 pixels wide), exactly as `scenedetect.detect(path, AdaptiveDetector())`
does, so the counts are PySceneDetect's. Cuts = scenes - 1, where a video without cuts is
one scene.
"""
from __future__ import annotations

import os
import pathlib

# PySceneDetect's AdaptiveDetector defaults (0.6 - 0.7), pinned so that a future change of
# defaults does not silently change the metric.
ADAPTIVE_THRESHOLD = 3.0
MIN_SCENE_LEN = 15
WINDOW_WIDTH = 2
MIN_CONTENT_VAL = 15.0


def count_scene_cuts(video_path: str | os.PathLike) -> int:
    """Number of hard cuts PySceneDetect's AdaptiveDetector finds in the video file."""
    import scenedetect

    path = pathlib.Path(video_path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    detector = scenedetect.AdaptiveDetector(
        adaptive_threshold=ADAPTIVE_THRESHOLD,
        min_scene_len=MIN_SCENE_LEN,
        window_width=WINDOW_WIDTH,
        min_content_val=MIN_CONTENT_VAL,
    )
    scenes = scenedetect.detect(str(path), detector, start_in_scene=True)
    return len(scenes) - 1
