"""Crash-safe mp4 output for long generations that arrive chunk by chunk.

The mp4 is written while frames arrive, as fragmented mp4 with one fragment per frame and
an encoder without lookahead: every frame is in the file as soon as ffmpeg has it, and a
file cut off at any moment plays up to its last complete fragment. A normal close, Ctrl-C,
SIGTERM (see `graceful_interrupts`) or any exception closes ffmpeg's input, so ffmpeg
finalises the file; even a SIGKILL of Python does, because ffmpeg runs in a session of its
own and finalises when its input pipe closes. Only a kill of ffmpeg itself leaves a cut-off
(still playable) file.

Where the mp4 goes (the invariant: the final path, once it exists, holds a playable video of
a prefix of the run's frames; after completion, of all of them):

* A fresh run encodes straight into the final path, so the progress survives any crash.
* A resumed run cannot append to the old file (another process wrote it, and it is lossy),
  so it encodes into a temporary sibling (`st2v_jax.atomic.atomic_file`): first every frame of
  the lossless frame store, then the new ones as they arrive. On close, completed or
  interrupted, that file replaces the final path provided it holds at least all the stored
  frames; otherwise (interrupted while re-encoding them) it is discarded and the old file
  stays. The old file never holds more than the stored frames as long as each chunk is
  committed to the `RunState` before it is written here, which is the order to use:

      with graceful_interrupts(), VideoOutput(path, fps, h, w, settings=s, seed=seed,
                                              resume_from=state if resuming else None) as video:
          for chunk_index in range(state.next_chunk_index, num_chunks):
              frames, carry = ...
              state.commit_chunk(chunk_index, frames, carry)
              video.write(frames)
      state.finish()  # only after the video is final: it deletes the frame store

Either way the finished file comes from one ffmpeg process that saw all frames in order,
with fixed encoder settings and a single encoder thread (x264 is deterministic for a given
thread count, and "auto" would vary with the machine), so a resumed run's mp4 is
byte-identical to an uninterrupted run's with the same ffmpeg build.
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import signal
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator, Mapping
from fractions import Fraction
from types import TracebackType
from typing import Any

import imageio_ffmpeg
import jax
import numpy as np

import st2v_jax
from st2v_jax.atomic import atomic_file, atomic_write_bytes, atomic_write_text
from st2v_jax.generation.run_state import ResumeError, RunState, settings_fingerprint

DEFAULT_CRF = 18  # x264 constant quality: visually near-lossless

# Fixed, so that the same frames always give the same bytes (see the module docstring).
_X264_OPTIONS = {"preset": "medium", "tune": "zerolatency", "threads": 1}
# frag_every_frame: a fragment per frame, so a cut-off file loses at most the frame being
# written (frag_keyframe would lose up to a whole keyframe interval). empty_moov puts the
# header first; default_base_moof makes fragments self-contained, as players expect.
_MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"
_PIXEL_FORMAT = "yuv420p"

# x264 at crf 18 needs about 0.1-0.3 bits per pixel on natural video; generous, so the
# free-space check errs on the safe side.
_MP4_BITS_PER_PIXEL = 1.0


def sidecar_path_for(video_path: str | os.PathLike) -> pathlib.Path:
    """The JSON record written beside a video: `<video>.json`."""
    video_path = pathlib.Path(video_path)
    return video_path.with_name(video_path.name + ".json")


def png_path_for(png_dir: str | os.PathLike, frame_index: int) -> pathlib.Path:
    return pathlib.Path(png_dir) / f"frame_{frame_index:06d}.png"


# ----- disk space


class InsufficientDiskSpaceError(OSError):
    """The output folder has less free space than a generation is estimated to need."""


def estimate_output_bytes(num_frames: int, height: int, width: int, png: bool, keep_frame_store: bool) -> int:
    """Peak disk use of a generation's outputs, estimated generously.

    The mp4 counts twice because a resumed run writes a new one beside the old before
    replacing it; the frame store (for --resume) and PNG frames count at raw size.
    """
    raw_bytes = num_frames * height * width * 3
    mp4_bytes = num_frames * height * width * _MP4_BITS_PER_PIXEL / 8
    return int(2 * mp4_bytes + raw_bytes * (int(keep_frame_store) + int(png)))


def check_free_space(path: str | os.PathLike, needed_bytes: int) -> None:
    """Raises InsufficientDiskSpaceError unless the filesystem holding `path` (a folder, or a
    file to be created; missing parents are fine) has `needed_bytes` free."""
    directory = pathlib.Path(path).absolute()
    while not directory.is_dir():
        directory = directory.parent
    free_bytes = shutil.disk_usage(directory).free
    if needed_bytes > free_bytes:
        raise InsufficientDiskSpaceError(
            f"this generation needs ~{needed_bytes / 1e9:.2f} GB in {directory} but only "
            f"{free_bytes / 1e9:.2f} GB is free; free space or choose another --out"
        )


# ----- helpers


def count_playable_frames(path: str | os.PathLike) -> int:
    """Frames a player gets from the video at `path`; 0 if it is missing or not yet playable."""
    try:
        frame_count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError):
        return 0
    return frame_count


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _runtime_versions_json() -> str:
    # Cached as JSON so every caller gets its own copy of the (constant) answer.
    devices = collections.Counter(f"{device.platform}:{device.device_kind}" for device in jax.devices())
    return json.dumps(
        {
            "st2v_jax": st2v_jax.__version__,
            **{name: _installed_version(name) for name in ("jax", "jaxlib", "flax", "numpy", "imageio-ffmpeg")},
            "ffmpeg": imageio_ffmpeg.get_ffmpeg_version(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "devices": dict(sorted(devices.items())),
        }
    )


def _encode_png(frame: np.ndarray) -> bytes:
    """Lossless RGB PNG of a uint8 (H, W, 3) frame."""
    height, width, _ = frame.shape
    rows = frame.reshape(height, width * 3)
    # PNG's "Up" filter (type 2): each row minus the one above, wrapping mod 256 as uint8
    # subtraction does; zlib compresses it much better than raw rows of a smooth image.
    up_filtered = np.diff(rows, axis=0, prepend=np.zeros((1, width * 3), np.uint8))
    scanlines = np.concatenate([np.full((height, 1), 2, np.uint8), up_filtered], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Holds SIGINT and SIGTERM that arrive within the block and delivers them after it.

    Used while a frame goes down ffmpeg's pipe: an interrupt in mid-frame would leave ffmpeg
    a truncated frame. A frame takes milliseconds, so Ctrl-C stays responsive.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only ever handled on the main thread
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)

    # A handler installed outside Python reads as None and could not be put back: leave it.
    held = [signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not None]
    previous = {signum: signal.signal(signum, hold) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


class _Mp4Encoder:
    """An ffmpeg process (imageio-ffmpeg's bundled binary) turning raw RGB frames on its
    stdin into a fragmented H.264 mp4.

    Started here rather than through `imageio_ffmpeg.write_frames`, which (a) detaches ffmpeg
    from Ctrl-C with a `preexec_fn`, i.e. Python code run between fork and exec, unsafe in a
    process with JAX's threads (JAX warns of deadlocks); `start_new_session` does the same in
    C; (b) kills ffmpeg, leaving the file unfinalised, if an interrupt lands inside it; and
    (c) never reports ffmpeg's exit status.
    """

    def __init__(self, path: pathlib.Path, height: int, width: int, fps: float | Fraction, crf: int):
        self.path = path
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-r", str(Fraction(fps).limit_denominator()),
            "-i", "-",
            "-an", "-c:v", "libx264", "-pix_fmt", _PIXEL_FORMAT, "-crf", str(crf),
            "-preset", _X264_OPTIONS["preset"],
            "-tune", _X264_OPTIONS["tune"],  # no lookahead: frames reach the file at once
            "-threads", str(_X264_OPTIONS["threads"]),
            "-movflags", _MOVFLAGS,
            "-flush_packets", "1",
            "-fflags", "+bitexact",  # no muxer version strings: the bytes depend on the frames only
            "-f", "mp4",  # a staging name has no .mp4 ending to guess the format from
            str(path),
        ]
        # A session of its own keeps a terminal's Ctrl-C (sent to the whole foreground process
        # group) away from ffmpeg: Python handles it and closes ffmpeg's input instead.
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
        )

    def write(self, frame: np.ndarray) -> None:
        try:
            with _interrupts_held():
                self._process.stdin.write(np.ascontiguousarray(frame).data)
                self._process.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(
                f"ffmpeg stopped taking frames for {self.path} (exit status {self._process.wait()}); "
                "see its messages above"
            ) from None

    def close(self) -> int:
        """Ends ffmpeg's input, waits for it to finalise the file and returns its exit status."""
        with contextlib.suppress(BrokenPipeError):  # it may have exited already; wait() says how
            self._process.stdin.close()
        return self._process.wait()


class _DiscardStagedVideo(Exception):
    """Thrown into `atomic_file` to make it delete, not install, the staged mp4."""


# ----- the writer


class VideoOutput:
    """Writes a generation's frames to an mp4 (and optionally PNGs) as they arrive.

    Use as a context manager; `write` takes uint8 (F, H, W, 3) frames. Leaving the block
    normally finalises and checks the video and marks the sidecar `<video>.json` complete;
    leaving it by an exception (KeyboardInterrupt included) still finalises a playable video
    of the frames so far and marks it incomplete. With `resume_from`, the committed frames of
    that run are re-encoded first; see the module docstring for where the mp4 goes meanwhile.

    H.264 in yuv420p needs even sizes: an odd height or width gets one extra row or column,
    a copy of the last one, in the mp4 (PNGs keep the exact size).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        height: int,
        width: int,
        *,
        settings: Mapping[str, Any],
        seed: int,
        png_dir: str | os.PathLike | None = None,
        resume_from: RunState | None = None,
        crf: int = DEFAULT_CRF,
    ):
        if resume_from is not None:
            if resume_from.completed:
                raise ResumeError(f"the run in {resume_from.directory} is already complete; nothing to resume")
            if tuple(resume_from.frame_size) != (height, width):
                raise ResumeError(
                    f"the run in {resume_from.directory} made {resume_from.frame_size[0]}x{resume_from.frame_size[1]} "
                    f"frames, not {height}x{width}"
                )
            if resume_from.seed != seed:
                raise ResumeError(f"the run in {resume_from.directory} used seed {resume_from.seed}, not {seed}")
            resume_from.check_settings(settings)
        self.path = pathlib.Path(path)
        self.fps = fps
        self.height = height
        self.width = width
        self.settings = dict(settings)
        self._settings_fingerprint = settings_fingerprint(settings)  # also rejects non-JSON settings early
        self.seed = seed
        self.png_dir = None if png_dir is None else pathlib.Path(png_dir)
        self.resume_from = resume_from
        self.crf = crf
        self._encoder: _Mp4Encoder | None = None  # while open
        self._encoding_path: pathlib.Path | None = None
        self._staged_video: contextlib.AbstractContextManager | None = None  # atomic_file, when resuming
        self._frames_written = 0
        self._stored_frames_at_open = 0  # frames re-encoded from the resumed run's store
        self._opened_at: str | None = None

    @property
    def frames_written(self) -> int:
        """Frames handed to the encoder so far, re-encoded stored frames included."""
        return self._frames_written

    @property
    def _mp4_size(self) -> tuple[int, int]:
        return self.height + self.height % 2, self.width + self.width % 2

    def _encoder_settings(self) -> dict[str, Any]:
        return {"codec": "libx264", "crf": self.crf, "pix_fmt": _PIXEL_FORMAT, "movflags": _MOVFLAGS, **_X264_OPTIONS}

    # ----- opening

    def __enter__(self) -> VideoOutput:
        self._opened_at = _now()
        if self.resume_from is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._encoding_path = self.path
        else:
            self._staged_video = atomic_file(self.path)
            self._encoding_path = self._staged_video.__enter__()
        self._encoder = _Mp4Encoder(self._encoding_path, *self._mp4_size, self.fps, self.crf)
        try:
            if self.resume_from is not None:
                self._stored_frames_at_open = self.resume_from.frames_committed
                for stored_frame in self.resume_from.frames():
                    self._write_frame(stored_frame, skip_existing_png=True)
            self._write_sidecar(status="running", frame_count=None)
        except BaseException:
            self._close(completed=False)
            raise
        return self

    # ----- writing

    def write(self, frames: np.ndarray) -> None:
        """Appends uint8 (F, H, W, 3) frames to the video (and the PNG folder)."""
        if self._encoder is None:
            raise RuntimeError("VideoOutput is not open; write inside its `with` block")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 of shape (F, {self.height}, {self.width}, 3); got {frames.dtype} {frames.shape}"
            )
        for frame in frames:
            self._write_frame(frame, skip_existing_png=False)

    def _write_frame(self, frame: np.ndarray, skip_existing_png: bool) -> None:
        mp4_height, mp4_width = self._mp4_size
        padded = np.pad(frame, ((0, mp4_height - self.height), (0, mp4_width - self.width), (0, 0)), mode="edge")
        self._encoder.write(padded)
        if self.png_dir is not None:
            png_path = png_path_for(self.png_dir, self._frames_written)
            # PNGs are written atomically, so one that exists is complete; a resumed run only
            # fills in those its predecessor did not get to.
            if not (skip_existing_png and png_path.exists()):
                atomic_write_bytes(png_path, _encode_png(frame))
        self._frames_written += 1

    # ----- closing

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._close(completed=exc_type is None)

    def _close(self, completed: bool) -> None:
        encoder, self._encoder = self._encoder, None
        exit_status = encoder.close()
        playable_frames = count_playable_frames(self._encoding_path)

        if self._staged_video is None:
            if playable_frames == 0:
                self.path.unlink(missing_ok=True)  # a header without frames plays nowhere
            else:
                with open(self.path, "rb+") as video:
                    os.fsync(video.fileno())  # durable before the caller deletes the frame store
        elif playable_frames > 0 and playable_frames >= self._stored_frames_at_open:
            self._staged_video.__exit__(None, None, None)  # installs it over the final path
        else:
            discard = _DiscardStagedVideo()
            self._staged_video.__exit__(type(discard), discard, None)
            playable_frames = count_playable_frames(self.path)
        self._staged_video = None

        if completed and (exit_status != 0 or playable_frames != self._frames_written):
            self._write_sidecar(status="incomplete", frame_count=playable_frames)
            raise RuntimeError(
                f"ffmpeg exited with status {exit_status} having finalised {playable_frames} of the "
                f"{self._frames_written} frames sent to {self.path} (see its messages above); the run is left resumable"
            )
        self._write_sidecar(status="complete" if completed else "incomplete", frame_count=playable_frames)

    def _write_sidecar(self, status: str, frame_count: int | None) -> None:
        """Records how the video was made; `frame_count` is what the final path holds, once known."""
        now = _now()
        record = {
            "video": self.path.name,
            "status": status,
            "frame_count": frame_count,
            "fps": float(self.fps),
            "height": self.height,
            "width": self.width,
            "seed": self.seed,
            "settings": self.settings,
            "settings_fingerprint": self._settings_fingerprint,
            "encoder": self._encoder_settings(),
            "png_dir": None if self.png_dir is None else str(self.png_dir),
            "versions": json.loads(_runtime_versions_json()),
            "started_at": self._opened_at if self.resume_from is None else self.resume_from.created_at,
            "resumed_at": None if self.resume_from is None else self._opened_at,
            "updated_at": now,
            "completed_at": now if status == "complete" else None,
        }
        atomic_write_text(sidecar_path_for(self.path), json.dumps(record, indent=2, sort_keys=True) + "\n")
