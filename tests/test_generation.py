"""Long-video generation on the tiny random model: modes agree, runs resume exactly,
storyboards switch prompts, bad input fails early with a clear message."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from st2v_jax import sample
from st2v_jax.generation import long_video
from st2v_jax.generation.long_video import (
    NonFiniteOutputError,
    StoryboardEntry,
    chunk_prompts,
    encode_prompts,
    generate_long_video,
    generate_whole_video,
)
from st2v_jax.generation.pipeline import StreamingT2VPipeline
from st2v_jax.generation.run_state import RunState, resume_directory_for
from st2v_jax.generation.sampler import SamplingSettings
from st2v_jax.generation.video_writer import VideoOutput, count_playable_frames, sidecar_path_for

SETTINGS = SamplingSettings(num_frames=40, steps=2, init_steps=2, height=32, width=32, seed=3)
RUN_SETTINGS = {"test": "generation", "num_frames": 40}


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StreamingT2VPipeline.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(pipe):
    storyboard = [StoryboardEntry("a red circle", 24), StoryboardEntry("a blue square", 16)]
    return encode_prompts(pipe, chunk_prompts(pipe, storyboard), "")


@pytest.fixture(scope="module")
def uninterrupted(pipe, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "video.mp4"
    state = generate_long_video(pipe, prompts, SETTINGS, out, run_settings=RUN_SETTINGS, keep_state=True)
    frames = np.array(state.frames())
    state.finish()
    return out, frames


def test_whole_video_scan_and_streaming_give_identical_frames(pipe, prompts, uninterrupted):
    out, streamed = uninterrupted
    whole = generate_whole_video(pipe, prompts, SETTINGS)
    assert whole.shape == (1, 40, 32, 32, 3) and streamed.shape == (40, 32, 32, 3)
    np.testing.assert_array_equal(whole[0], streamed)
    assert count_playable_frames(out) == 40
    sidecar = json.loads(sidecar_path_for(out).read_text())
    assert sidecar["settings"] == RUN_SETTINGS and sidecar["status"] == "complete" and sidecar["seed"] == 3


def test_interrupted_run_resumes_to_the_identical_video(pipe, prompts, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "video.mp4"
    original_write, writes = VideoOutput.write, []

    def write_then_preempt(self, frames):
        if len(writes) == 2:  # SIGTERM/Ctrl-C arrive as KeyboardInterrupt (graceful_interrupts)
            raise KeyboardInterrupt
        writes.append(len(frames))
        original_write(self, frames)

    monkeypatch.setattr(VideoOutput, "write", write_then_preempt)
    with pytest.raises(KeyboardInterrupt):
        generate_long_video(pipe, prompts, SETTINGS, out, run_settings=RUN_SETTINGS)
    monkeypatch.setattr(VideoOutput, "write", original_write)
    assert count_playable_frames(out) == 24  # the finished chunks are playable
    state = RunState.load(resume_directory_for(out))
    assert state.next_chunk_index == 3 and not state.completed  # chunk 2 was committed before the interrupt
    generate_long_video(pipe, prompts, SETTINGS, out, run_settings=RUN_SETTINGS, resume=True)
    assert out.read_bytes() == uninterrupted[0].read_bytes()


def test_storyboard_switches_the_prompt_per_chunk(pipe):
    storyboard = [StoryboardEntry("a", 24), StoryboardEntry("b", 8), StoryboardEntry("c", 16)]
    # chunks start at frames 0 (16 frames), 16, 24, 32, 40 (8 new frames each)
    assert chunk_prompts(pipe, storyboard) == ["a", "a", "b", "c", "c"]
    with pytest.raises(ValueError, match=r"nearest valid counts: \[40, 48, 56\]"):
        chunk_prompts(pipe, [StoryboardEntry("a", 50)])


def test_storyboard_files(tmp_path):
    text = "# two scenes\n24: a red circle\n\n16: a blue square\n"
    assert sample.parse_storyboard(text, "s.txt") == [StoryboardEntry("a red circle", 24), StoryboardEntry("a blue square", 16)]
    as_json = json.dumps([{"prompt": "a red circle", "frames": 24}])
    assert sample.parse_storyboard(as_json, "s.json") == [StoryboardEntry("a red circle", 24)]
    with pytest.raises(sample.UsageError, match="line 1: expected 'FRAMES: prompt'"):
        sample.parse_storyboard("a red circle", "s.txt")


def test_non_finite_output_stops_and_keeps_what_was_written(pipe, prompts, tmp_path):
    broken = StreamingT2VPipeline(pipe.model, pipe.tokenizer, pipe.scheduler_config)
    broken.params = dict(pipe.params, streaming=jax.tree.map(lambda x: x * np.nan, pipe.params["streaming"]))
    out = tmp_path / "video.mp4"
    with pytest.raises(NonFiniteOutputError, match=r"chunk 1.*The 16 frames finished before it are in"):
        generate_long_video(broken, prompts, SETTINGS, out, run_settings=RUN_SETTINGS)
    assert count_playable_frames(out) == 16


def _cli_error(capsys, *argv):
    assert sample.main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_any_compute(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation must not start")

    monkeypatch.setattr(long_video, "generate_long_video", no_generation)
    model, out = str(tiny_model_dir), str(tmp_path / "v.mp4")
    assert "--prompt is empty" in _cli_error(capsys, "--model-dir", model, "--prompt", "  ", "--out", out)
    assert "nearest valid counts: [64, 72, 80]" in _cli_error(capsys, "--model-dir", model, "--prompt", "x", "--num-frames", "70", "--out", out)
    assert "no such file or folder" in _cli_error(capsys, "--model-dir", str(tmp_path / "missing"), "--prompt", "x", "--out", out)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot write to" in _cli_error(capsys, "--model-dir", model, "--prompt", "x", "--out", str(blocker / "v.mp4"))
    assert "refiner overlap must be smaller than the chunk" in _cli_error(
        capsys, "--model-dir", model, "--prompt", "x", "--out", out, "--refine", "--refiner-dir", model,
        "--refiner-chunk", "8", "--refiner-overlap", "8",
    )
    assert "no interrupted run to resume" in _cli_error(capsys, "--model-dir", model, "--prompt", "x", "--out", out, "--resume")
    assert "expected 'FRAMES: prompt'" in _cli_error(
        capsys, "--model-dir", model, "--storyboard", str(_write(tmp_path / "s.txt", "oops")), "--out", out
    )
    empty_model = tmp_path / "empty-model"
    empty_model.mkdir()
    assert "cannot load weights" in str(pytest.raises(FileNotFoundError, sample.run, ["--model-dir", str(empty_model), "--prompt", "x", "--out", out]).value)


def _write(path, text):
    path.write_text(text)
    return path


def test_long_prompt_warns_what_was_cut(pipe):
    ids, cut = pipe.tokenize(["a red circle " + "and a blue square " * 30])
    assert ids.shape == (1, 77) and cut[0].endswith("blue square")


def test_cli_end_to_end_with_refiner(tiny_model_dir, tmp_path):
    from tiny_pipeline import make_tiny_text_to_video

    refiner = tmp_path / "refiner"
    make_tiny_text_to_video(refiner)
    out = tmp_path / "out" / "video.mp4"
    args = ["--model-dir", str(tiny_model_dir), "--prompt", "a red circle", "--num-frames", "24", "--steps", "2", "--init-steps", "2",
            "--out", str(out), "--refine", "--refiner-dir", str(refiner), "--refiner-chunk", "16", "--refiner-overlap", "8",
            "--refiner-steps", "4", "--refiner-height", "64", "--refiner-width", "64", "--png-dir", str(tmp_path / "png")]
    assert sample.main(args) == 0
    assert count_playable_frames(out) == 24 and count_playable_frames(sample.preview_path(out)) == 24
    sidecar = json.loads(sidecar_path_for(out).read_text())
    assert sidecar["settings"]["refiner"]["chunk"] == 16 and sidecar["height"] == 64
    assert len(list((tmp_path / "png").glob("*.png"))) == 24


def test_start_from_an_image_then_extend_the_video(tiny_model_dir, tmp_path):
    from PIL import Image

    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:40] = (255, 0, 0)
    Image.fromarray(image).save(tmp_path / "start.png")
    common = ["--model-dir", str(tiny_model_dir), "--prompt", "a red square", "--steps", "2", "--init-steps", "2"]
    started = tmp_path / "started.mp4"
    png = tmp_path / "png"
    assert sample.main(common + ["--image", str(tmp_path / "start.png"), "--num-frames", "16", "--out", str(started), "--png-dir", str(png)]) == 0
    assert count_playable_frames(started) == 1 + 16  # the image opens the video
    first = np.asarray(Image.open(sorted(png.glob("*.png"))[0]))
    from st2v_jax.generation.media_input import load_image

    np.testing.assert_array_equal(first, load_image(tmp_path / "start.png", 32, 32)[0])
    extended = tmp_path / "extended.mp4"
    assert sample.main(common + ["--extend", str(started), "--num-frames", "8", "--out", str(extended)]) == 0
    assert count_playable_frames(extended) == 17 + 8


def test_hub_repo_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sample.UsageError, match="fetching it from the Hugging Face hub failed.*pass the local folder"):
        sample._resolve_model("PAIR/StreamingT2V-does-not-exist")


def test_domain_words_become_single_tokens(tmp_path):
    from st2v_jax.tokenizer import load_tokenizer, word_merges, write_byte_level_tokenizer

    words = ["a", "and", "bouncing", "triangle", "circle", "purple", "on", "background", "black"]
    tokenizer = load_tokenizer(write_byte_level_tokenizer(tmp_path / "tok", word_merges(words)))
    for word in words:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == ["<|startoftext|>", f"{word}</w>", "<|endoftext|>"]
    # Longer words merge first: without that, "and"'s a+n would split "triangle".
    assert tokenizer.convert_ids_to_tokens(tokenizer("triangle and").input_ids)[1:3] == ["triangle</w>", "and</w>"]
    with pytest.raises(ValueError, match="lower-case ASCII"):
        word_merges(["Red"])


def test_sampling_options_come_from_the_command_line_then_the_model_then_the_release(tmp_path):
    import types

    from st2v_jax import sample
    from st2v_jax.convert.components import SAMPLING_DEFAULTS_FILE, PretrainedModel

    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(json.dumps({"steps": 10, "guidance": 5.0, "height": 64}))
    pipe = types.SimpleNamespace(
        model=PretrainedModel({}, {}, files={SAMPLING_DEFAULTS_FILE: tmp_path / SAMPLING_DEFAULTS_FILE}),
        default_resolution=lambda: (32, 48),
    )
    args = sample._parser().parse_args(["--prompt", "x", "--guidance", "3"])
    settings = sample._sampling_settings(args, pipe, 24)
    assert (settings.guidance, settings.steps, settings.init_steps, settings.eta) == (3.0, 10, 50, 1.0)
    assert (settings.height, settings.width, settings.num_frames) == (64, 48, 24)
    (tmp_path / SAMPLING_DEFAULTS_FILE).write_text(json.dumps({"stepz": 10}))
    with pytest.raises(sample.UsageError, match="unknown keys.*stepz"):
        sample._sampling_settings(args, pipe, 24)


def test_packaging_the_embedded_model(tiny_model_dir, tmp_path, monkeypatch):
    from st2v_jax import embedded
    from st2v_jax.pretrained import load_pretrained

    config = tmp_path / "model_config.py"
    config.write_text("def get_config():\n    return {'sampling': {'steps': 7}}\n")
    size = embedded.package_model(tiny_model_dir, config, tmp_path / "packaged")
    packaged = load_pretrained(tmp_path / "packaged")
    assert packaged.sampling_defaults() == {"steps": 7}
    assert size == embedded.folder_bytes(tmp_path / "packaged") < embedded.SIZE_LIMIT_BYTES
    # Half, not size - 1: orbax metadata (timestamps) makes a rewrite vary by a few bytes.
    monkeypatch.setattr(embedded, "SIZE_LIMIT_BYTES", size // 2)
    with pytest.raises(ValueError, match=r"packaged model is .* MB, over the .* MB"):
        embedded.package_model(tiny_model_dir, config, tmp_path / "packaged")
