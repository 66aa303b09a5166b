"""Atomic output: every file or folder we write appears complete or not at all.

Writers produce a temporary sibling (same filesystem), flush it to disk, then rename it
over the destination. An interrupted writer leaves the previous complete file (or
nothing) plus a temporary `.<name>.tmp-*` that the next write of the same path removes.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import uuid
from typing import Iterator

_TMP_MARK = ".tmp-"


def _temporary_sibling(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_stale_temporaries(path: pathlib.Path) -> None:
    for stale in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path to write; on success it replaces `path` in one rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yields a temporary folder to fill; on success it takes the place of `path`.

    An existing `path` is an error unless `overwrite`; then it is replaced only once the new
    folder is complete (two renames; a crash between them leaves the old folder under a
    temporary name and the new one complete).
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output folder or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _temporary_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
