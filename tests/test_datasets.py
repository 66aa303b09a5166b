"""The TFDS builders (st2v_shapes, video_folder) and the input pipeline: documented shapes
and dtypes, determinism, held-out prompts, per-host slices, clear errors."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from st2v_jax.data import shapes
from st2v_jax.data.pipeline import TrainingBatches
from st2v_jax.data.shapes_dataset import St2vShapes
from st2v_jax.data.video_folder import CaptionsError, VideoFolder, VideoFolderConfig


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
    builder = St2vShapes(config="tiny", data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    builder.download_and_prepare()
    return builder


def test_st2v_shapes_records_have_the_documented_features(shapes_builder):
    train, test = (shapes_builder.as_data_source(split=s) for s in ("train", "test"))
    assert (len(train), len(test)) == (64, 16)
    record = train[0]
    assert record["video"].shape == (32, 32, 32, 3) and record["video"].dtype == np.uint8
    assert record["centres"].shape == (32, 2, 2) and record["centres"].dtype == np.float32
    assert record["colours"].dtype == np.int32 and record["kinds"].shape == (2,)
    for source, allowed in ((train, shapes.training_pairs()), (test, shapes.held_out_pairs())):
        for i in range(len(source)):
            r = source[i]
            caption = r["caption"].decode()
            specs = shapes.parse_prompt(caption)
            n = int(r["num_shapes"])
            assert len(specs) == n and list(r["colours"][n:]) == [-1] * (2 - n)
            assert [(list(shapes.COLOURS)[c], shapes.KINDS[k]) for c, k in zip(r["colours"][:n], r["kinds"][:n])] == specs
            if n == 2:
                assert frozenset(specs) in allowed, caption
            # Every shape is drawn where its centre says, in its colour.
            for (colour, _), centre in zip(specs, r["centres"][0, :n]):
                x, y = np.clip(np.round(centre - 0.5).astype(int), 0, 31)
                pixel = r["video"][0, y, x].astype(int)
                if n == 1:
                    np.testing.assert_allclose(pixel, shapes.COLOURS[colour], atol=40)


def test_st2v_shapes_is_deterministic_and_moves(tmp_path, shapes_builder):
    again = St2vShapes(config="tiny", data_dir=str(tmp_path), file_format="array_record")
    again.download_and_prepare()
    a, b = shapes_builder.as_data_source(split="train"), again.as_data_source(split="train")
    for i in (0, 17, 63):
        np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    motion = [np.abs(np.diff(a[i]["centres"][:, 0], axis=0)).sum(-1).mean() for i in range(len(a))]
    assert min(motion) > 0.3  # every clip moves (px per frame at 32 px)


def test_held_out_prompts_never_occur_in_training():
    held = set(shapes.held_out_pairs())
    prompts = shapes.evaluation_prompts()
    assert len(prompts) == 54 >= 50 and len(set(prompts)) == 54
    assert not held & set(shapes.training_pairs())
    assert frozenset(shapes.parse_prompt("a red circle and a blue square bouncing")) in shapes.training_pairs()
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = shapes.sample_scene(rng, 64, shapes.training_pairs())
        assert len(scene.shapes) == 1 or frozenset((s.colour, s.kind) for s in scene.shapes) not in held


def _write_video(path: pathlib.Path, frames: int, size=(48, 40)) -> None:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(str(path), size, fps=8, codec="libx264", pix_fmt_out="yuv444p", quality=10)
    writer.send(None)
    for t in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, :, 0] = 8 * t  # brightness ramp: the frame index is readable back
        writer.send(frame)
    writer.close()


def test_video_folder_cuts_strided_clips(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    _write_video(videos / "a.mp4", 20)
    _write_video(videos / "sub" / "b.mp4", 30)
    _write_video(videos / "short.mp4", 5)
    (videos / "captions.csv").write_text("videoid,name,page_dir\na,a red fox,x\nb,the sea,y\nshort,too short,z\n")
    config = VideoFolderConfig.make(16, 24, num_frames=4, frame_stride=2, max_clips_per_video=2)
    builder = VideoFolder(config=config, data_dir=str(tmp_path / "tfds"), file_format="array_record")
    import tensorflow_datasets as tfds

    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(videos)))
    source = builder.as_data_source(split="train")
    records = sorted((source[i] for i in range(len(source))), key=lambda r: (r["video_id"], r["video"][0, 0, 0, 0]))
    assert [(r["video_id"].decode(), r["caption"].decode()) for r in records] == [("a", "a red fox")] * 2 + [("b", "the sea")] * 2
    for r in records:
        assert r["video"].shape == (4, 16, 24, 3) and r["video"].dtype == np.uint8
    # Frames 0, 2, 4, 6 then 8, 10, 12, 14: red ramps by 16 per kept frame, 64 per clip.
    reds = [r["video"][:, 8, 12, 0].astype(int) for r in records[:2]]
    np.testing.assert_allclose(reds[0], [0, 16, 32, 48], atol=3)
    np.testing.assert_allclose(reds[1], [64, 80, 96, 112], atol=3)


def test_video_folder_reports_missing_files_and_bad_captions(tmp_path):
    from st2v_jax.data.video_folder import find_videos

    (tmp_path / "captions.json").write_text(json.dumps([{"video_id": "gone", "caption": "x"}]))
    with pytest.raises(CaptionsError, match=r"1 captioned videos have no file.*gone"):
        find_videos(tmp_path)
    (tmp_path / "captions.jsonl").write_text("{}\n")
    with pytest.raises(CaptionsError, match="exactly one of"):
        find_videos(tmp_path)
    (tmp_path / "captions.json").unlink()
    with pytest.raises(CaptionsError, match="no video id"):
        find_videos(tmp_path)


def test_training_batches_are_deterministic_and_split_over_hosts(shapes_builder):
    source = shapes_builder.as_data_source(split="train")
    tokenize = lambda captions: np.array([[len(c)] for c in captions], np.int32)
    single = TrainingBatches(source, tokenize, global_batch_size=4, clip_frames=16, seed=3)
    batch = single.host_batch(5)
    assert batch["video"].shape == (4, 16, 32, 32, 3) and batch["video"].dtype == np.uint8
    assert batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["video"], TrainingBatches(source, tokenize, 4, 16, seed=3).host_batch(5)["video"])
    assert not np.array_equal(batch["video"], single.host_batch(6)["video"])
    hosts = [TrainingBatches(source, tokenize, 4, 16, seed=3, process_index=i, process_count=2).host_batch(5) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["video"] for h in hosts]), batch["video"])
    # An epoch visits every record once.
    per_epoch = len(source) // 4
    seen = np.concatenate([single.global_indices(s) for s in range(per_epoch)])
    assert sorted(seen) == list(range(len(source)))
    streamed = [item for _, item in zip(range(3), single.iterate(start_step=7))]
    assert [s for s, _ in streamed] == [7, 8, 9]
    np.testing.assert_array_equal(streamed[0][1]["video"], single.host_batch(7)["video"])
    with pytest.raises(ValueError, match="rebuild the dataset with num_frames >= 40"):
        TrainingBatches(source, tokenize, 4, clip_frames=40)
