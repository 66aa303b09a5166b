"""Resumable generation state: a crash at any moment loses at most the chunk in flight.

A run keeps a small folder (by default `<video>.resume/`) beside its video:

    state.json            the commit point: settings, seed, next chunk, frames committed
    frames.u8             every committed frame, raw uint8 (F, H, W, 3), append-only
    carry-<chunk>.npz     the sampler's carry after that chunk (conditioning frames, anchors)

`commit_chunk` writes the frames, then a new carry file, then `state.json`, each durable
before the next. Until `state.json` is replaced the previous state stays authoritative: bytes
appended past its `frames_committed` and carry files it does not name are leftovers of an
interrupted commit, dropped by `load`. The mp4 is lossy and cannot be appended to across
processes, so `frames.u8` is what lets a resumed run reproduce an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import signal
from collections.abc import Iterator, Mapping
from typing import Any, Collection

import numpy as np

from st2v_jax.atomic import atomic_directory, atomic_file, atomic_write_text

STATE_FORMAT_VERSION = 1
_STATE_FILE = "state.json"
_FRAME_STORE_FILE = "frames.u8"
_CARRY_PREFIX = "carry-"
_CHANNELS = 3


class ResumeError(RuntimeError):
    """A saved run cannot be continued as asked (different settings, damaged or finished state)."""


def resume_directory_for(video_path: str | os.PathLike) -> pathlib.Path:
    """Where the resumable state of the run writing `video_path` lives: `<video>.resume/`."""
    video_path = pathlib.Path(video_path)
    return video_path.with_name(video_path.name + ".resume")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _canonical_json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"run settings must be plain JSON values (str, number, bool, None, list, dict): {err}") from err


def _normalised_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON round trip turns tuples into lists and dict keys into strings, so settings given
    # to a resumed run compare equal to the same settings read back from state.json.
    return json.loads(_canonical_json(dict(settings)))


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings' canonical JSON: equal iff the settings are equal as JSON."""
    return hashlib.sha256(_canonical_json(_normalised_settings(settings)).encode()).hexdigest()


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat



def describe_differences(saved: Mapping[str, Any], requested: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """One line per dotted key whose value differs (keys in `ignore` excepted)."""
    saved_flat, requested_flat = _flatten(saved), _flatten(requested)
    lines = []
    for key in sorted((saved_flat.keys() | requested_flat.keys()) - set(ignore)):
        # Compared as JSON text, as the fingerprint is: 1 and 1.0 (or true) differ there.
        before, after = (
            "(not set)" if key not in flat else _canonical_json(flat[key]) for flat in (saved_flat, requested_flat)
        )
        if before != after:
            lines.append(f"{key}: saved {before}, now {after}")
    return lines


def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@dataclasses.dataclass
class RunState:
    """The resumable state of one generation run; see the module docstring for the layout."""

    directory: pathlib.Path
    settings: dict[str, Any]
    seed: int
    frame_size: tuple[int, int]  # (height, width) of every stored frame
    next_chunk_index: int = 0
    frames_committed: int = 0
    carry_file: str | None = None
    completed: bool = False
    created_at: str = dataclasses.field(default_factory=_now)
    updated_at: str = dataclasses.field(default_factory=_now)

    # ----- creating and loading

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        settings: Mapping[str, Any],
        seed: int,
        frame_size: tuple[int, int],
        overwrite: bool = False,
    ) -> RunState:
        """Starts a new run's state in `directory` (which must not exist unless `overwrite`)."""
        height, width = (int(n) for n in frame_size)
        state = cls(
            directory=pathlib.Path(directory),
            settings=_normalised_settings(settings),
            seed=int(seed),
            frame_size=(height, width),
        )
        with atomic_directory(state.directory, overwrite=overwrite) as staging:
            (staging / _FRAME_STORE_FILE).touch()
            (staging / _STATE_FILE).write_text(state._state_json())
        return state

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunState:
        """Reads a saved state and drops what an interrupted commit left past its commit point."""
        directory = pathlib.Path(directory)
        state_path = directory / _STATE_FILE
        if not state_path.exists():
            raise ResumeError(f"no resumable run in {directory} (missing {_STATE_FILE}); start without --resume")
        saved = json.loads(state_path.read_text())
        if saved.get("format_version") != STATE_FORMAT_VERSION:
            raise ResumeError(
                f"{state_path} has state format {saved.get('format_version')!r}; this version of st2v_jax "
                f"reads format {STATE_FORMAT_VERSION} only"
            )
        state = cls(
            directory=directory,
            settings=saved["settings"],
            seed=saved["seed"],
            frame_size=tuple(saved["frame_size"]),
            next_chunk_index=saved["next_chunk_index"],
            frames_committed=saved["frames_committed"],
            carry_file=saved["carry_file"],
            completed=saved["completed"],
            created_at=saved["created_at"],
            updated_at=saved["updated_at"],
        )
        if saved["settings_fingerprint"] != state.settings_fingerprint:
            raise ResumeError(f"{state_path} was edited: its settings no longer match their fingerprint")
        state._drop_uncommitted_leftovers()
        return state

    # ----- reading

    @property
    def settings_fingerprint(self) -> str:
        return settings_fingerprint(self.settings)

    @property
    def _frame_store(self) -> pathlib.Path:
        return self.directory / _FRAME_STORE_FILE

    @property
    def _frame_shape(self) -> tuple[int, int, int]:
        return (*self.frame_size, _CHANNELS)

    @property
    def _frame_bytes(self) -> int:
        return int(np.prod(self._frame_shape))

    def frames(self) -> np.ndarray:
        """The committed frames, uint8 (F, H, W, 3), memory-mapped read-only from the store."""
        if self.completed:
            raise ResumeError(f"the run in {self.directory} is complete; its frames are only in the video now")
        if self.frames_committed == 0:
            return np.empty((0, *self._frame_shape), np.uint8)  # mmap cannot map zero bytes
        return np.memmap(self._frame_store, np.uint8, mode="r", shape=(self.frames_committed, *self._frame_shape))

    def carry(self) -> dict[str, np.ndarray]:
        """The carry saved with the last committed chunk ({} before the first commit)."""
        if self.carry_file is None:
            return {}
        with np.load(self.directory / self.carry_file, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Raises ResumeError naming every key whose value differs from the saved run's."""
        requested = _normalised_settings(settings)
        if settings_fingerprint(requested) == self.settings_fingerprint:
            return
        differences = "\n  ".join(describe_differences(self.settings, requested))
        raise ResumeError(
            f"cannot resume the run in {self.directory}: its settings differ from the ones given:\n  {differences}\n"
            "Resume with the original settings, or start a new run without --resume."
        )

    # ----- writing

    def commit_chunk(self, chunk_index: int, frames: np.ndarray, carry: Mapping[str, np.ndarray]) -> None:
        """Makes chunk `chunk_index` durable: its new frames, then the carry, then state.json."""
        if self.completed:
            raise ResumeError(f"the run in {self.directory} is already complete")
        if chunk_index != self.next_chunk_index:
            raise ResumeError(f"expected chunk {self.next_chunk_index} next, got chunk {chunk_index}")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != self._frame_shape:
            raise ValueError(
                f"chunk frames must be uint8 of shape (F, {', '.join(map(str, self._frame_shape))}); "
                f"got {frames.dtype} {frames.shape}"
            )

        # Writing at the committed offset (not the file's end) overwrites whatever an
        # interrupted commit appended; truncate() then drops any remainder of it.
        with open(self._frame_store, "r+b") as store:
            store.seek(self.frames_committed * self._frame_bytes)
            store.write(np.ascontiguousarray(frames).data)
            store.truncate()
            store.flush()
            os.fsync(store.fileno())

        # A new name per chunk: the carry that state.json names is never overwritten, so a
        # crash between this write and state.json's leaves frames and carry consistent.
        new_carry_file = f"{_CARRY_PREFIX}{chunk_index:06d}.npz"
        with atomic_file(self.directory / new_carry_file) as staging:
            with open(staging, "wb") as f:
                np.savez(f, **{name: np.asarray(value) for name, value in carry.items()})

        previous_carry_file = self.carry_file
        self.frames_committed += len(frames)
        self.next_chunk_index = chunk_index + 1
        self.carry_file = new_carry_file
        self._save()
        if previous_carry_file is not None:
            (self.directory / previous_carry_file).unlink(missing_ok=True)

    def finish(self) -> None:
        """Marks the run complete and deletes the frame store and carry.

        Call only once the video is final: after this the frames exist only in the video.
        """
        self.completed = True
        self.carry_file = None
        self._save()
        self._drop_uncommitted_leftovers()

    # ----- internals

    def _state_json(self) -> str:
        return json.dumps(
            {
                "format_version": STATE_FORMAT_VERSION,
                "settings": self.settings,
                "settings_fingerprint": self.settings_fingerprint,
                "seed": self.seed,
                "frame_size": list(self.frame_size),
                "next_chunk_index": self.next_chunk_index,
                "frames_committed": self.frames_committed,
                "carry_file": self.carry_file,
                "completed": self.completed,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
            },
            indent=2,
            sort_keys=True,
        )

    def _save(self) -> None:
        self.updated_at = _now()
        atomic_write_text(self.directory / _STATE_FILE, self._state_json())

    def _drop_uncommitted_leftovers(self) -> None:
        """Removes what state.json does not vouch for; for a finished run, the store and carry too."""
        if self.completed:
            self._frame_store.unlink(missing_ok=True)
        else:
            committed_bytes = self.frames_committed * self._frame_bytes
            actual_bytes = self._frame_store.stat().st_size if self._frame_store.exists() else 0
            if actual_bytes < committed_bytes:
                raise ResumeError(
                    f"{self._frame_store} holds {actual_bytes} bytes but {self.frames_committed} committed frames "
                    f"need {committed_bytes}; the store is damaged, so this run cannot be resumed"
                )
            if actual_bytes > committed_bytes:
                os.truncate(self._frame_store, committed_bytes)
                _fsync_file(self._frame_store)
        for carry_path in self.directory.glob(f"{_CARRY_PREFIX}*.npz"):
            if carry_path.name != self.carry_file:
                carry_path.unlink()


@contextlib.contextmanager
def graceful_interrupts() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, so a preempted VM and Ctrl-C take
    the same clean-up path (finalised video, committed state). The previous SIGTERM handler
    is restored on exit. Must be entered from the main thread, as Python requires for signals.
    """

    def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
