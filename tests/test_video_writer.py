"""VideoOutput: playable mp4 at every moment, exact resumption, sidecar, disk-space checks."""
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import imageio_ffmpeg
import numpy as np
import pytest

from st2v_jax.generation import video_writer
from st2v_jax.generation.run_state import ResumeError, RunState, resume_directory_for
from st2v_jax.generation.video_writer import (
    InsufficientDiskSpaceError,
    VideoOutput,
    check_free_space,
    count_playable_frames,
    estimate_output_bytes,
    png_path_for,
    sidecar_path_for,
)

HEIGHT, WIDTH = 64, 96
FPS = 8
SEED = 1234
SETTINGS = {"prompt": "waves at dusk", "num_chunks": 6, "size": [HEIGHT, WIDTH]}


def smooth_frames(seed: int, first_frame: int, num_frames: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Moving colour gradients: natural enough for x264 to reproduce closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(first_frame, first_frame + num_frames, dtype=np.float32)[:, None, None]
    phase = (seed % 97) / 97 * 2 * np.pi
    channels = [
        128 + 100 * np.sin(x / 9 + t / 3 + phase),
        128 + 100 * np.cos(y / 7 - t / 5 + phase),
        128 + 60 * np.sin((x + y) / 13 + t / 4),
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _reader_without_preexec_fn(monkeypatch):
    # imageio_ffmpeg.read_frames would otherwise start ffmpeg through a preexec_fn, a fork
    # that JAX (imported here) warns about; readers need no protection from Ctrl-C.
    monkeypatch.setenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


def decode(path) -> tuple[tuple[int, int], np.ndarray]:
    """(width, height) and the decoded rgb24 frames of a video or image file."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    return (width, height), np.stack(frames) if frames else np.empty((0, height, width, 3), np.uint8)


# ----- a simulated sampler: 16 frames, then 8 per chunk, each chunk depending on the carry


def sample_chunk(chunk_index: int, carry: dict[str, np.ndarray]) -> np.ndarray:
    if chunk_index == 0:
        return smooth_frames(SEED, 0, 16)
    first_frame = int(carry["next_frame"])
    return smooth_frames(SEED + int(carry["conditioning"].mean()), first_frame, 8)


def generate(out_dir: pathlib.Path, *, resume: bool, interrupt_at_chunk: int | None = None) -> pathlib.Path:
    """The generation loop a CLI runs; raises KeyboardInterrupt on reaching `interrupt_at_chunk`."""
    video_path = out_dir / "video.mp4"
    state_dir = resume_directory_for(video_path)
    if resume:
        state = RunState.load(state_dir)
    else:
        state = RunState.create(state_dir, SETTINGS, SEED, (HEIGHT, WIDTH))
    with VideoOutput(
        video_path,
        FPS,
        HEIGHT,
        WIDTH,
        settings=SETTINGS,
        seed=SEED,
        png_dir=out_dir / "frames",
        resume_from=state if resume else None,
    ) as video:
        for chunk_index in range(state.next_chunk_index, SETTINGS["num_chunks"]):
            if chunk_index == interrupt_at_chunk:
                raise KeyboardInterrupt
            frames = sample_chunk(chunk_index, state.carry())
            carry = {"conditioning": frames[-8:], "next_frame": np.array(state.frames_committed + len(frames))}
            state.commit_chunk(chunk_index, frames, carry)
            video.write(frames)
    state.finish()
    return video_path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pathlib.Path:
    return generate(tmp_path_factory.mktemp("uninterrupted"), resume=False)


def read_sidecar(video_path) -> dict:
    return json.loads(sidecar_path_for(video_path).read_text())


def test_uninterrupted_run_writes_video_pngs_and_sidecar(uninterrupted):
    expected = sample_chunk(0, {})
    size, decoded = decode(uninterrupted)
    assert size == (WIDTH, HEIGHT) and len(decoded) == 16 + 5 * 8
    assert np.abs(decoded[:16].astype(int) - expected.astype(int)).mean() < 6  # lossy (4:2:0 chroma), but close

    assert not resume_directory_for(uninterrupted).joinpath("frames.u8").exists()
    assert RunState.load(resume_directory_for(uninterrupted)).completed

    sidecar = read_sidecar(uninterrupted)
    assert sidecar["status"] == "complete" and sidecar["frame_count"] == 56
    assert sidecar["settings"] == SETTINGS and sidecar["seed"] == SEED and sidecar["fps"] == FPS
    assert {"st2v_jax", "jax", "jaxlib", "flax", "numpy", "python", "platform", "devices"} <= set(sidecar["versions"])
    assert sidecar["completed_at"] is not None and sidecar["resumed_at"] is None

    png_dir = uninterrupted.parent / "frames"
    assert len(list(png_dir.glob("*.png"))) == 56
    png_size, png_frames = decode(png_path_for(png_dir, 3))
    assert png_size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(png_frames[0], expected[3])  # PNGs are lossless


@pytest.mark.parametrize("interruptions", [(3,), (2, 4)], ids=["once", "twice"])
def test_resumed_run_is_byte_identical_to_uninterrupted(tmp_path, uninterrupted, interruptions):
    resume = False
    for chunk_index in interruptions:
        with pytest.raises(KeyboardInterrupt):
            generate(tmp_path, resume=resume, interrupt_at_chunk=chunk_index)
        resume = True
        committed = 16 + 8 * (chunk_index - 1)
        # The interrupted run left a finalised, playable video of every committed frame.
        assert count_playable_frames(tmp_path / "video.mp4") == committed
        sidecar = read_sidecar(tmp_path / "video.mp4")
        assert sidecar["status"] == "incomplete" and sidecar["frame_count"] == committed

    # A crash mid-commit of the next chunk appended frames that state.json never vouched for.
    with open(resume_directory_for(tmp_path / "video.mp4") / "frames.u8", "ab") as store:
        store.write(b"\xff" * (HEIGHT * WIDTH * 3 * 3 + 5))

    video_path = generate(tmp_path, resume=True)

    assert video_path.read_bytes() == uninterrupted.read_bytes()
    np.testing.assert_array_equal(decode(video_path)[1], decode(uninterrupted)[1])
    state_dir = resume_directory_for(video_path)
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json"]
    assert RunState.load(state_dir).completed
    for reference_png in sorted((uninterrupted.parent / "frames").iterdir()):
        assert (tmp_path / "frames" / reference_png.name).read_bytes() == reference_png.read_bytes()
    sidecar = read_sidecar(video_path)
    assert sidecar["status"] == "complete" and sidecar["frame_count"] == 56
    assert sidecar["settings"] == SETTINGS and sidecar["resumed_at"] is not None
    assert not list(tmp_path.glob(".video.mp4.tmp-*"))


def test_interrupt_while_reencoding_stored_frames_keeps_the_old_video(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, resume=False, interrupt_at_chunk=3)
    partial_video = (tmp_path / "video.mp4").read_bytes()

    write_frame = VideoOutput._write_frame
    calls = []

    def interrupted_after_five_frames(self, frame, skip_existing_png):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        write_frame(self, frame, skip_existing_png)

    monkeypatch.setattr(VideoOutput, "_write_frame", interrupted_after_five_frames)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, resume=True)
    assert (tmp_path / "video.mp4").read_bytes() == partial_video
    assert read_sidecar(tmp_path / "video.mp4")["frame_count"] == 32
    assert not list(tmp_path.glob(".video.mp4.tmp-*"))


def test_resume_refuses_a_different_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, resume=False, interrupt_at_chunk=1)
    state = RunState.load(resume_directory_for(tmp_path / "video.mp4"))
    with pytest.raises(ResumeError, match="seed"):
        VideoOutput(tmp_path / "video.mp4", FPS, HEIGHT, WIDTH, settings=SETTINGS, seed=SEED + 1, resume_from=state)
    with pytest.raises(ResumeError, match="prompt"):
        VideoOutput(tmp_path / "video.mp4", FPS, HEIGHT, WIDTH, settings={**SETTINGS, "prompt": "x"}, seed=SEED,
                    resume_from=state)
    with pytest.raises(ResumeError, match="64x96 frames, not 32x96"):
        VideoOutput(tmp_path / "video.mp4", FPS, 32, WIDTH, settings=SETTINGS, seed=SEED, resume_from=state)


def test_video_is_playable_while_it_is_being_written(tmp_path):
    # Odd sizes: the mp4 gets one replicated row and column (H.264 yuv420p needs even sizes).
    height, width = 63, 95
    path = tmp_path / "live.mp4"
    with VideoOutput(path, FPS, height, width, settings={}, seed=0) as video:
        video.write(smooth_frames(0, 0, 16, height, width))
        deadline = time.monotonic() + 20
        while count_playable_frames(path) < 15 and time.monotonic() < deadline:
            time.sleep(0.05)
        size, decoded = decode(path)
        # Every frame but the one being muxed is in the file while ffmpeg is still running.
        assert size == (width + 1, height + 1) and len(decoded) >= 15
        video.write(smooth_frames(0, 16, 8, height, width))
    assert count_playable_frames(path) == 24


def test_writes_are_validated(tmp_path):
    with VideoOutput(tmp_path / "v.mp4", FPS, HEIGHT, WIDTH, settings={}, seed=0) as video:
        with pytest.raises(ValueError, match="uint8 of shape"):
            video.write(smooth_frames(0, 0, 2)[0])
        with pytest.raises(ValueError, match="uint8 of shape"):
            video.write(smooth_frames(0, 0, 2).astype(np.float32))
    with pytest.raises(RuntimeError, match="not open"):
        video.write(smooth_frames(0, 0, 2))
    # Nothing was written, so no unplayable header is left at the output path.
    assert not (tmp_path / "v.mp4").exists()
    assert read_sidecar(tmp_path / "v.mp4")["frame_count"] == 0


# ----- hard kills, in a separate writer process

_WRITER_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    import numpy as np
    from st2v_jax.generation.video_writer import VideoOutput
    path, ready, keep_writing = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
    x = np.arange(96)[None, None, :, None]

    def frames(first, count):
        times = np.arange(first, first + count)[:, None, None, None]
        return np.broadcast_to((2 * x + times) % 256, (count, 64, 96, 3)).astype(np.uint8)

    with VideoOutput(path, 8, 64, 96, settings={}, seed=0) as video:
        video.write(frames(0, 24))
        ready.touch()
        frame = 24
        while True:
            if keep_writing:
                video.write(frames(frame, 1))
                frame += 1
            time.sleep(0.01)
    """
)


def _process_state(pid: int) -> str | None:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


@contextlib.contextmanager
def _writer_process(tmp_path, keep_writing: bool) -> Iterator[tuple[subprocess.Popen, int, pathlib.Path]]:
    """Runs the writer script; yields it, its ffmpeg's pid and the video path once 24 frames are sent."""
    path, ready = tmp_path / "killed.mp4", tmp_path / "ready"
    arguments = [str(path), str(ready), "1" if keep_writing else "0"]
    writer = subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, *arguments])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer process did not get going"
            time.sleep(0.05)
        (ffmpeg_pid,) = map(int, pathlib.Path(f"/proc/{writer.pid}/task/{writer.pid}/children").read_text().split())
        yield writer, ffmpeg_pid, path
    finally:
        writer.kill()  # its ffmpeg then sees its input close and exits by itself
        writer.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ffmpeg's pid through /proc")
def test_sigkill_of_python_still_finalises_the_video(tmp_path):
    with _writer_process(tmp_path, keep_writing=False) as (writer, ffmpeg_pid, path):
        writer.kill()
        writer.wait()
        # ffmpeg, in a session of its own, sees its input close and finalises the file.
        deadline = time.monotonic() + 20
        while _process_state(ffmpeg_pid) not in (None, "Z", "X") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count_playable_frames(path) == 24


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds ffmpeg's pid through /proc")
def test_video_cut_off_mid_write_still_plays(tmp_path):
    with _writer_process(tmp_path, keep_writing=True) as (writer, ffmpeg_pid, path):
        time.sleep(0.5)  # mid-stream: frames keep arriving
        os.kill(ffmpeg_pid, signal.SIGKILL)  # as if the machine went down: nothing finalises
        writer.kill()
        writer.wait()
        size, decoded = decode(path)
        assert size == (96, 64) and len(decoded) >= 23


# ----- disk space


def test_output_size_estimate_adds_raw_frames_for_the_store_and_pngs():
    video_only = estimate_output_bytes(100, 320, 576, png=False, keep_frame_store=False)
    raw = 100 * 320 * 576 * 3
    assert 0 < video_only < raw
    assert estimate_output_bytes(100, 320, 576, png=True, keep_frame_store=False) == video_only + raw
    assert estimate_output_bytes(100, 320, 576, png=True, keep_frame_store=True) == video_only + 2 * raw


def test_free_space_check_names_the_need_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 99e9, 1.5e9))
    check_free_space(tmp_path / "not" / "yet" / "video.mp4", int(1e9))
    with pytest.raises(InsufficientDiskSpaceError) as raised:
        check_free_space(tmp_path / "not" / "yet" / "video.mp4", int(12.3e9))
    assert str(raised.value) == (
        f"this generation needs ~12.30 GB in {tmp_path} but only 1.50 GB is free; "
        "free space or choose another --out"
    )


def test_interrupts_are_held_while_a_frame_is_handed_to_ffmpeg():
    # A job started in the background by a non-interactive shell (as CI may be) inherits
    # SIGINT ignored, and the held interrupt is then rightly ignored too: install Python's.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with video_writer._interrupts_held():
                # raise_signal, not os.kill: the signal reaches this thread at once, where a
                # kill could land on one of JAX's threads and be handled only after the block.
                signal.raise_signal(signal.SIGINT)
                held_through = True
        assert held_through
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)
