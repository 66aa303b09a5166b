"""Evaluating a model of the shapes domain (`st2v_jax.data.shapes`) from what its videos show.

The detector (`shapes_detection`) reads each frame's shapes, so a generated video can be
scored against its prompt without a learnt metric:

  (a) first-chunk adherence: the (colour, kind) pairs detected in most of the first chunk's
      frames are exactly the prompt's (per video true/false);
  (b) consistency: the fraction of frames whose detected pairs are exactly the prompt's;
      beside it, persistence: the fraction of frames after the first chunk that show exactly
      what the first chunk showed, right or wrong (what APM's anchor frame should keep), so
      a low (b) can be told apart as a wrong start or as drift;
  (c) motion: the mean per-frame displacement of each prompt colour's shape (px at the
      video's size), and the border-jump ratio, the mean absolute frame difference across
      chunk borders over that within chunks (1: seamless; a new chunk that does not
      continue the last one jumps);
  (d) ablations: the same prompts and seeds with CAM off and with APM off, compared with the
      full model per prompt (paired differences).

`evaluate_model` generates and scores; `markdown_report` and `csv_text` are the tables.
`python -m st2v_jax.evaluate_shapes` is the command line over this.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from st2v_jax.convert.components import SAMPLING_DEFAULTS_FILE, read_sampling_file
from st2v_jax.data import shapes
from st2v_jax.generation.long_video import EncodedPrompts
from st2v_jax.generation.pipeline import StreamingT2VPipeline, to_uint8
from st2v_jax.generation.sampler import SamplingSettings, make_chunk_step, make_first_chunk, sample_stream, streaming_constants
from st2v_jax.metrics.shapes_detection import Detection, DetectorSettings, detect_video

ShapeSpec = shapes.ShapeSpec

# The variants compared for (d): name -> SamplingSettings overrides.
VARIANTS: dict[str, dict[str, bool]] = {
    "full": {"use_cam": True, "use_apm": True},
    "no_cam": {"use_cam": False, "use_apm": True},
    "no_apm": {"use_cam": True, "use_apm": False},
}
VARIANT_TITLES = {"full": "full", "no_cam": "CAM off", "no_apm": "APM off"}
# What each ablation should make worse (metric, +1 if higher is worse, -1 if lower is).
ABLATION_EXPECTATIONS = {"no_cam": ("border_jump_ratio", +1), "no_apm": ("consistency", -1)}
# The trained model's targets (the issue's), shown under the table.
TARGETS = "targets for the full model: (a) >= 90%, (b) >= 90%, displacement > 0.5 px/frame, border-jump ratio <= 1.5"


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Which frames each generation chunk made: `first` frames, then `new` per chunk."""

    first: int = 16
    new: int = 8

    def border_pairs(self, num_frames: int) -> np.ndarray:
        """t of every consecutive pair (t, t + 1) whose frames come from different chunks."""
        return np.arange(self.first - 1, num_frames - 1, self.new)


@dataclasses.dataclass(frozen=True)
class VideoScores:
    """Scores of one video (see the module docstring). NaN where undefined: no prompt
    colour tracked in two consecutive frames (displacement), no chunk border (ratio)."""

    first_chunk_adherent: bool
    first_chunk_specs: frozenset[ShapeSpec]  # detected in most first-chunk frames
    consistency: float
    persistence: float
    mean_displacement: float
    border_jump_ratio: float

    def row(self) -> dict[str, Any]:
        return {
            "first_chunk_adherent": self.first_chunk_adherent,
            "first_chunk_detected": describe_specs(self.first_chunk_specs),
            "consistency": self.consistency,
            "persistence": self.persistence,
            "mean_displacement_px": self.mean_displacement,
            "border_jump_ratio": self.border_jump_ratio,
        }


@dataclasses.dataclass(frozen=True)
class EvaluatedVideo:
    """A generated video's scores and how it was made: prompt `prompt_index` was at
    `batch_position` of a batch sampled with `seed` (the noise depends on both)."""

    variant: str
    prompt_index: int
    prompt: str
    seed: int
    batch_position: int
    scores: VideoScores

    def row(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "prompt_index": self.prompt_index, "prompt": self.prompt, "seed": self.seed,
            "batch_position": self.batch_position, **self.scores.row(),
        }


def describe_specs(specs: frozenset[ShapeSpec]) -> str:
    return " + ".join(f"{colour} {kind}" for colour, kind in sorted(specs)) or "nothing"


def prompt_specs(prompt: str) -> frozenset[ShapeSpec]:
    """The (colour, kind) pairs a shapes prompt names; a ValueError for a prompt naming none
    (or the same colour twice: the detector finds one shape per colour)."""
    specs = shapes.parse_prompt(prompt)
    if not specs:
        raise ValueError(f"prompt {prompt!r} names no shape of the shapes domain (e.g. 'a red circle and a blue square bouncing')")
    colours = [colour for colour, _ in specs]
    if len(set(colours)) != len(colours):
        raise ValueError(f"prompt {prompt!r} names a colour twice; shapes prompts give each shape its own colour")
    return frozenset(specs)


def frame_specs(detections: Sequence[Sequence[Detection]]) -> list[frozenset[ShapeSpec]]:
    return [frozenset((d.colour, d.kind) for d in frame) for frame in detections]


def first_chunk_specs(specs: Sequence[frozenset[ShapeSpec]], layout: ChunkLayout) -> frozenset[ShapeSpec]:
    """The pairs detected in more than half of the first chunk's frames: what the first chunk
    shows, robust to a few frames' misdetections."""
    first = specs[: layout.first]
    counts: dict[ShapeSpec, int] = {}
    for frame in first:
        for spec in frame:
            counts[spec] = counts.get(spec, 0) + 1
    return frozenset(spec for spec, n in counts.items() if 2 * n > len(first))


def persistence(specs: Sequence[frozenset[ShapeSpec]], layout: ChunkLayout) -> float:
    """The fraction of frames after the first chunk whose detected pairs are exactly the first
    chunk's (`first_chunk_specs`). NaN when the first chunk shows nothing (nothing to keep)
    or no frame follows it."""
    first, later = first_chunk_specs(specs, layout), specs[layout.first:]
    if not first or not later:
        return math.nan
    return float(np.mean([frame == first for frame in later]))


def mean_displacement(detections: Sequence[Sequence[Detection]], colours: Sequence[str]) -> float:
    """Mean distance (px) a shape's centre moves between consecutive frames, over the given
    colours' tracks (a colour is one shape) and every pair of frames where both show it."""
    steps = []
    for colour in colours:
        centres = [next(((d.x, d.y) for d in frame if d.colour == colour), None) for frame in detections]
        steps += [math.dist(a, b) for a, b in zip(centres, centres[1:]) if a is not None and b is not None]
    return float(np.mean(steps)) if steps else math.nan


def frame_differences(video: np.ndarray) -> np.ndarray:
    """(F - 1,) mean absolute difference (0-255) between consecutive frames."""
    video = np.asarray(video, np.float32)
    return np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))


def border_jump_ratio(video: np.ndarray, layout: ChunkLayout) -> float:
    """Mean frame difference across chunk borders over the mean within chunks: about 1 when
    chunks continue each other seamlessly. NaN without a border; a static video is 1."""
    differences = frame_differences(video)
    borders = layout.border_pairs(len(video))
    if not len(borders):
        return math.nan
    within = np.delete(differences, borders)
    across, inside = float(differences[borders].mean()), float(within.mean()) if len(within) else 0.0
    if inside == 0.0:
        return 1.0 if across == 0.0 else math.inf
    return across / inside


def score_video(
    video: np.ndarray, prompt: str, layout: ChunkLayout = ChunkLayout(), settings: DetectorSettings = DetectorSettings()
) -> VideoScores:
    """All scores of one uint8 (F, H, W, 3) video made for `prompt`."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) < 2:
        raise ValueError(f"expected a uint8 video (F >= 2, H, W, 3), got {video.dtype} {video.shape}")
    wanted = prompt_specs(prompt)
    detections = detect_video(video, settings)
    specs = frame_specs(detections)
    first = first_chunk_specs(specs, layout)
    return VideoScores(
        first_chunk_adherent=first == wanted,
        first_chunk_specs=first,
        consistency=float(np.mean([frame == wanted for frame in specs])),
        persistence=persistence(specs, layout),
        mean_displacement=mean_displacement(detections, sorted(colour for colour, _ in wanted)),
        border_jump_ratio=border_jump_ratio(video, layout),
    )


# ---------------------------------------------------------------------------- tables

_METRICS = (  # (VideoScores field, column title, as a percentage)
    ("first_chunk_adherent", "(a) first-chunk adherence", True),
    ("consistency", "(b) frames with the prompt's shapes", True),
    ("persistence", "frames keeping the first chunk's shapes", True),
    ("mean_displacement", "(c) displacement px/frame", False),
    ("border_jump_ratio", "(c) border-jump ratio", False),
)


def _values(videos: Sequence[EvaluatedVideo], field: str) -> np.ndarray:
    return np.asarray([float(getattr(video.scores, field)) for video in videos], np.float64)


def _mean_and_error(values: np.ndarray) -> tuple[float, float, int]:
    """Mean, standard error of the mean, and count, over the finite values."""
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, 0
    error = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), error, len(values)


def _format(mean: float, error: float, percent: bool, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 2)
    sign = "+" if signed else ""
    text = f"{mean * scale:{sign}.{digits}f}{unit}"
    return text if math.isnan(error) else f"{text} ± {error * scale:.{digits}f}"


def markdown_report(results: Mapping[str, Sequence[EvaluatedVideo]], described: Mapping[str, str]) -> str:
    """The results table (a), (b), (c) per variant, mean ± standard error over videos, and,
    when the full model and ablations ran, the (d) table of paired differences."""
    lines = ["# Shapes evaluation", ""]
    lines += [f"- {key}: {value}" for key, value in described.items()]
    lines += ["", "| variant | videos | " + " | ".join(title for _, title, _ in _METRICS) + " |"]
    lines.append("|" + "---|" * (2 + len(_METRICS)))
    for variant, videos in results.items():
        cells = [_format(*_mean_and_error(_values(videos, field))[:2], percent) for field, _, percent in _METRICS]
        lines.append(f"| {VARIANT_TITLES.get(variant, variant)} | {len(videos)} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± standard error over videos (persistence over the videos whose first chunk shows a shape); {TARGETS}."]
    ablations = [v for v in results if v in ABLATION_EXPECTATIONS]
    if "full" in results and ablations:
        lines += ["", "## (d) Ablations: difference from the full model on the same prompts and seeds", ""]
        lines.append("| ablation | " + " | ".join(f"Δ {title}" for _, title, _ in _METRICS) + " | expected to worsen | verdict |")
        lines.append("|" + "---|" * (3 + len(_METRICS)))
        for variant in ablations:
            cells = [
                _format(*_mean_and_error(_paired(results["full"], results[variant], field))[:2], percent, signed=True)
                for field, _, percent in _METRICS
            ]
            lines.append(f"| {VARIANT_TITLES[variant]} | " + " | ".join(cells) + " | " + " | ".join(_verdict(results["full"], results[variant], variant)) + " |")
        lines += ["", "Paired differences (ablation minus full) per prompt, mean ± standard error; "
                  "'worse' when the expected metric moves the wrong way by more than two standard errors."]
    return "\n".join(lines) + "\n"


def _paired(full: Sequence[EvaluatedVideo], ablation: Sequence[EvaluatedVideo], field: str) -> np.ndarray:
    """Per prompt, the ablation's value minus the full model's."""
    if [v.prompt_index for v in full] != [v.prompt_index for v in ablation]:
        raise ValueError("a paired comparison needs the same prompts, in the same order, in both variants")
    return _values(ablation, field) - _values(full, field)


def _verdict(full: Sequence[EvaluatedVideo], ablation: Sequence[EvaluatedVideo], variant: str) -> tuple[str, str]:
    field, direction = ABLATION_EXPECTATIONS[variant]
    title = next(title for name, title, _ in _METRICS if name == field)
    mean, error, count = _mean_and_error(_paired(full, ablation, field))
    if count < 2 or math.isnan(error):
        return title, "too few videos to tell"
    if direction * mean > 2 * error:
        return title, f"worse ({abs(mean) / error:.1f} s.e.)" if error > 0 else "worse"
    return title, "not measurably worse"


CSV_COLUMNS = (
    "variant", "prompt_index", "prompt", "seed", "batch_position",
    "first_chunk_adherent", "first_chunk_detected", "consistency", "persistence", "mean_displacement_px", "border_jump_ratio",
)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per-video rows (`EvaluatedVideo.row()`, keys `CSV_COLUMNS`) as CSV."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue()


# ---------------------------------------------------------------------------- generation


def read_sampling_defaults(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The model folder's `sampling.json`, checked, read before the model is loaded; {} when
    there is none."""
    path = pathlib.Path(model_dir) / SAMPLING_DEFAULTS_FILE
    if not path.is_file():
        return {}
    return SamplingSettings.checked_overrides(read_sampling_file(path), str(path))


def encode_batch(pipe: StreamingT2VPipeline, prompts: Sequence[str], num_chunks: int, negative_prompt: str = "") -> EncodedPrompts:
    """`EncodedPrompts` for a batch of videos, each with one prompt for all its chunks."""
    ids, _ = pipe.tokenize(list(prompts) + [negative_prompt])
    embeds = pipe.encode_text(ids)
    text = embeds[:-1]
    return EncodedPrompts(jnp.broadcast_to(text[None], (num_chunks + 1, *text.shape)), jnp.broadcast_to(embeds[-1:], text.shape))


def generate_variants(
    pipe: StreamingT2VPipeline,
    prompts: EncodedPrompts,
    settings: SamplingSettings,
    variants: Sequence[str] = tuple(VARIANTS),
    on_chunk: Optional[Callable[[str], None]] = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """(variant, uint8 videos (B, F, H, W, 3)) of one batch in each variant, the frames
    `generate_whole_video` makes with the variant's settings. The first chunk uses neither
    CAM nor APM, so it is made once and continued by every variant; each variant's chunk
    step is compiled once and run chunk by chunk. `on_chunk(name)` is called after every
    chunk ("first chunk", then the variant's name)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants {list(variants)}: choose from {list(VARIANTS)}")
    params = pipe.params
    first = make_first_chunk(pipe, settings)(params, prompts.per_chunk[0], prompts.negative)
    if on_chunk is not None:
        on_chunk("first chunk")
    constants = streaming_constants(pipe, pipe.anchor_embedding(first[:, :1]), prompts.negative)
    chunk_indices = np.arange(1, len(prompts.per_chunk))
    for variant in variants:
        step = make_chunk_step(pipe, dataclasses.replace(settings, **VARIANTS[variant]))
        chunks = [np.asarray(to_uint8(first))]
        for _, _, frames in sample_stream(
            step, params, constants, first[:, -pipe.cam_frames :], chunk_indices, prompts.per_chunk[1:], pipe.replicated
        ):
            chunks.append(np.asarray(frames))
            if on_chunk is not None:
                on_chunk(variant)
        yield variant, np.concatenate(chunks, axis=1)


def prompt_batches(prompts: Sequence[str], batch_size: int) -> list[tuple[int, list[str]]]:
    """(index of the first prompt, prompts) of consecutive batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return [(start, list(prompts[start : start + batch_size])) for start in range(0, len(prompts), batch_size)]


def chunks_per_batch(pipe: StreamingT2VPipeline, settings: SamplingSettings, variants: Sequence[str]) -> int:
    """Chunks generated for one batch: what `on_chunk` counts."""
    return 1 + len(variants) * pipe.num_chunks(settings.num_frames)


def evaluate_model(
    pipe: StreamingT2VPipeline,
    prompts: Sequence[str],
    settings: SamplingSettings,
    variants: Sequence[str] = tuple(VARIANTS),
    batch_size: int = 54,
    negative_prompt: str = "",
    detector: DetectorSettings = DetectorSettings(),
    on_chunk: Optional[Callable[[str], None]] = None,
) -> dict[str, list[EvaluatedVideo]]:
    """Generates a video per prompt and variant with `settings` and scores it. Batch b
    (prompts b*batch_size onwards) is sampled with seed settings.seed + b, the same for every
    variant, so variants differ only by the ablation. `on_chunk` as for `generate_variants`."""
    for prompt in prompts:
        prompt_specs(prompt)
    layout = ChunkLayout(pipe.frames_per_chunk, pipe.new_frames_per_chunk)
    num_chunks = pipe.num_chunks(settings.num_frames)
    results: dict[str, list[EvaluatedVideo]] = {variant: [] for variant in variants}
    for b, (start, batch) in enumerate(prompt_batches(prompts, batch_size)):
        batch_settings = dataclasses.replace(settings, seed=settings.seed + b)
        encoded = encode_batch(pipe, batch, num_chunks, negative_prompt)
        for variant, videos in generate_variants(pipe, encoded, batch_settings, variants, on_chunk):
            for position, (prompt, video) in enumerate(zip(batch, videos)):
                scores = score_video(video, prompt, layout, detector)
                results[variant].append(EvaluatedVideo(variant, start + position, prompt, batch_settings.seed, position, scores))
    return results
