"""RunState: the commit protocol survives a crash at any point, and resuming checks settings."""
import json
import os
import signal

import numpy as np
import pytest

from st2v_jax.generation.run_state import ResumeError, RunState, graceful_interrupts, settings_fingerprint

HEIGHT, WIDTH = 6, 10
SETTINGS = {"prompt": "a cat surfing", "num_frames": 32, "guidance": {"scale": 7.5, "anchor": "clip"}}


def chunk(chunk_index: int, num_frames: int = 8) -> np.ndarray:
    rng = np.random.default_rng(chunk_index)
    return rng.integers(0, 256, (num_frames, HEIGHT, WIDTH, 3), dtype=np.uint8)


def carry_after(chunk_index: int) -> dict[str, np.ndarray]:
    return {"conditioning_frames": chunk(chunk_index)[-2:].astype(np.float32), "step": np.array(chunk_index)}


def new_state(tmp_path) -> RunState:
    return RunState.create(tmp_path / "video.mp4.resume", SETTINGS, seed=7, frame_size=(HEIGHT, WIDTH))


def test_commits_are_read_back_by_a_new_process(tmp_path):
    state = new_state(tmp_path)
    assert state.frames().shape == (0, HEIGHT, WIDTH, 3) and state.carry() == {}
    state.commit_chunk(0, chunk(0, 16), carry_after(0))
    state.commit_chunk(1, chunk(1), carry_after(1))

    loaded = RunState.load(state.directory)
    assert (loaded.next_chunk_index, loaded.frames_committed, loaded.seed) == (2, 24, 7)
    np.testing.assert_array_equal(loaded.frames(), np.concatenate([chunk(0, 16), chunk(1)]))
    carry = loaded.carry()
    np.testing.assert_array_equal(carry["conditioning_frames"], carry_after(1)["conditioning_frames"])
    assert carry["step"] == 1
    # Only the latest carry is kept.
    assert sorted(p.name for p in state.directory.iterdir()) == ["carry-000001.npz", "frames.u8", "state.json"]


def test_crash_between_appending_frames_and_updating_state_is_harmless(tmp_path):
    state = new_state(tmp_path)
    state.commit_chunk(0, chunk(0, 16), carry_after(0))
    # What an interrupted commit of chunk 1 leaves: part of its frames and its whole carry
    # file, but state.json still at chunk 0.
    with open(state.directory / "frames.u8", "ab") as store:
        store.write(chunk(1).tobytes()[: HEIGHT * WIDTH * 3 * 5 + 17])
    np.savez(state.directory / "carry-000001.npz", junk=np.zeros(3))

    resumed = RunState.load(state.directory)
    assert (resumed.next_chunk_index, resumed.frames_committed) == (1, 16)
    assert (state.directory / "frames.u8").stat().st_size == 16 * HEIGHT * WIDTH * 3
    assert not (state.directory / "carry-000001.npz").exists()
    np.testing.assert_array_equal(resumed.carry()["conditioning_frames"], carry_after(0)["conditioning_frames"])

    resumed.commit_chunk(1, chunk(1), carry_after(1))
    np.testing.assert_array_equal(RunState.load(state.directory).frames(), np.concatenate([chunk(0, 16), chunk(1)]))


def test_store_shorter_than_committed_is_reported_as_damaged(tmp_path):
    state = new_state(tmp_path)
    state.commit_chunk(0, chunk(0, 16), carry_after(0))
    os.truncate(state.directory / "frames.u8", 100)
    with pytest.raises(ResumeError, match="damaged"):
        RunState.load(state.directory)


def test_chunks_must_be_committed_in_order_and_with_the_stored_frame_shape(tmp_path):
    state = new_state(tmp_path)
    with pytest.raises(ResumeError, match="expected chunk 0 next, got chunk 1"):
        state.commit_chunk(1, chunk(1), carry_after(1))
    with pytest.raises(ValueError, match="uint8 of shape"):
        state.commit_chunk(0, chunk(0).astype(np.float32), carry_after(0))
    with pytest.raises(ValueError, match="uint8 of shape"):
        state.commit_chunk(0, chunk(0)[:, :, :-1], carry_after(0))


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path):
    state = new_state(tmp_path)
    state.commit_chunk(0, chunk(0, 16), carry_after(0))
    with pytest.raises(FileExistsError):
        new_state(tmp_path)
    fresh = RunState.create(state.directory, SETTINGS, seed=8, frame_size=(HEIGHT, WIDTH), overwrite=True)
    assert RunState.load(fresh.directory).frames_committed == 0


def test_check_settings_names_every_differing_key(tmp_path):
    state = new_state(tmp_path)
    state.check_settings(json.loads(json.dumps(SETTINGS)))  # equal settings pass

    changed = {**SETTINGS, "num_frames": 64, "guidance": {"scale": 9.0, "anchor": "clip"}, "fps": 8}
    with pytest.raises(ResumeError) as raised:
        RunState.load(state.directory).check_settings(changed)
    message = str(raised.value)
    assert "num_frames: saved 32, now 64" in message
    assert "guidance.scale: saved 7.5, now 9.0" in message
    assert "fps: saved (not set), now 8" in message
    assert "anchor" not in message and "prompt" not in message

    with pytest.raises(ResumeError, match="num_frames: saved 32, now 32.0"):
        state.check_settings({**SETTINGS, "num_frames": 32.0})


def test_settings_compare_as_json(tmp_path):
    assert settings_fingerprint({"size": (64, 96), "a": 1}) == settings_fingerprint({"a": 1, "size": [64, 96]})
    with pytest.raises(TypeError, match="plain JSON"):
        settings_fingerprint({"dtype": np.float32})


def test_edited_state_file_is_rejected(tmp_path):
    state = new_state(tmp_path)
    saved = json.loads((state.directory / "state.json").read_text())
    saved["settings"]["num_frames"] = 1000
    (state.directory / "state.json").write_text(json.dumps(saved))
    with pytest.raises(ResumeError, match="edited"):
        RunState.load(state.directory)


def test_finish_deletes_the_frame_store_and_carry(tmp_path):
    state = new_state(tmp_path)
    state.commit_chunk(0, chunk(0, 16), carry_after(0))
    state.finish()
    assert [p.name for p in state.directory.iterdir()] == ["state.json"]
    finished = RunState.load(state.directory)
    assert finished.completed and finished.frames_committed == 16
    with pytest.raises(ResumeError, match="already complete"):
        finished.commit_chunk(1, chunk(1), carry_after(1))
    with pytest.raises(ResumeError, match="only in the video"):
        finished.frames()


def test_missing_state_is_a_clear_error(tmp_path):
    with pytest.raises(ResumeError, match="no resumable run"):
        RunState.load(tmp_path / "nothing.resume")


def test_graceful_interrupts_turns_sigterm_into_keyboard_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with graceful_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt")
    assert signal.getsignal(signal.SIGTERM) is before
