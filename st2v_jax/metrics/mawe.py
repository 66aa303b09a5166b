"""MAWE, the motion-aware warp error of StreamingT2V (paper Table 1; lower is better): how
badly each frame predicts the next after warping along the optical flow, relative to how
much moves. A static video has no warp error but also no motion; a flickering one moves
little but warps badly.

Release definition (default; the authors' `mawe.py`), per consecutive pair t -> t+1:
  * frames resized to 720x720 (bilinear, no antialias, rounded back to uint8),
  * flow by RAFT-large (12 updates) on the frames mapped to [-1, 1],
  * OFS_t = mean flow magnitude |f| in pixels,
  * frame t forward-splatted to round(p + f(p)); where several pixels land on one, the last
    in row-major order wins; pixels nothing lands on are masked out,
  * W_t = mean over the unmasked pixels and the 3 channels of (frame t+1 - warped)^2, on
    the 0..255 scale (0 if nothing lands inside),
  * MAWE = mean_t W_t / (9.5 * OFS_t).
Paper wording (`definition="paper"`): OFS = mean SQUARED magnitude over all pixels and
pairs, W = mean of W_t, MAWE = W / OFS (a ratio of means, no constant). W_t is the release's
per-channel mean in both (the paper's "squared L2 pixel distance" may mean the sum over the
three channels, which would be 3x larger).

Guard: the release divides by OFS_t unguarded (inf or NaN for a motionless pair). Here pairs
whose mean flow magnitude is at most `static_flow_threshold` pixels do not enter the release
mean (the ratio says nothing about them) and are counted; a video without any moving pair
(paper: whose mean squared magnitude is at most the threshold squared) has MAWE NaN.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from st2v_jax.metrics.raft import DOWNSAMPLING, MIN_IMAGE_SIZE, RAFT

Definition = Literal["release", "paper"]
DEFINITIONS: tuple[str, ...] = ("release", "paper")
RELEASE_SIZE = 720
RELEASE_COEFFICIENT = 9.5


@dataclasses.dataclass(frozen=True)
class MAWESettings:
    """`size`: frames are resized to size x size before the flow (None: kept as they are,
    which then must suit RAFT); `pairs_per_batch`: frame pairs per RAFT call (memory: about
    0.4 GB per pair at 720x720)."""

    size: Optional[int] = RELEASE_SIZE
    num_flow_updates: int = 12
    definition: Definition = "release"
    coefficient: float = RELEASE_COEFFICIENT
    static_flow_threshold: float = 1e-3
    pairs_per_batch: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.size is not None and (self.size % DOWNSAMPLING or self.size < MIN_IMAGE_SIZE):
            problems.append(f"size must be a multiple of {DOWNSAMPLING} and at least {MIN_IMAGE_SIZE}, got {self.size}")
        if self.num_flow_updates < 1:
            problems.append(f"num_flow_updates must be at least 1, got {self.num_flow_updates}")
        if self.definition not in DEFINITIONS:
            problems.append(f"definition must be one of {DEFINITIONS}, got {self.definition!r}")
        if not self.coefficient > 0:
            problems.append(f"coefficient must be positive, got {self.coefficient}")
        if not self.static_flow_threshold >= 0:
            problems.append(f"static_flow_threshold must be >= 0, got {self.static_flow_threshold}")
        if self.pairs_per_batch < 1:
            problems.append(f"pairs_per_batch must be at least 1, got {self.pairs_per_batch}")
        if problems:
            raise ValueError("invalid MAWE settings: " + "; ".join(problems))

    def check_frame_size(self, height: int, width: int) -> None:
        """Raises ValueError if frames of this size would go through RAFT unresized but cannot."""
        if self.size is None and (height % DOWNSAMPLING or width % DOWNSAMPLING or min(height, width) < MIN_IMAGE_SIZE):
            raise ValueError(
                f"frames of {height}x{width} cannot go through RAFT unresized (H and W must be multiples of "
                f"{DOWNSAMPLING}, at least {MIN_IMAGE_SIZE}); resize them (the release uses {RELEASE_SIZE})"
            )


@dataclasses.dataclass(frozen=True)
class PairStatistics:
    """Per consecutive pair: W_t (0..255 scale), mean |flow| and mean |flow|^2 (pixels)."""

    warp_error: np.ndarray
    flow_magnitude: np.ndarray
    flow_squared_magnitude: np.ndarray


@dataclasses.dataclass(frozen=True)
class MAWEResult:
    """`value` is NaN when nothing moves; `static_pairs` did not enter the release mean."""

    value: float
    pairs: int
    static_pairs: int
    mean_flow_magnitude: float
    mean_warp_error: float


def resize_frames_bilinear(frames: jax.Array, size: int) -> jax.Array:
    """uint8 (T, H, W, 3) -> uint8 (T, size, size, 3) as torchvision's tensor `resize`
    (bilinear, half-pixel centres, no antialias, rounded half to even)."""
    if frames.shape[1:3] == (size, size):
        return frames
    resized = jax.image.resize(frames.astype(jnp.float32), (frames.shape[0], size, size, 3), "linear", antialias=False)
    return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def forward_warp(image: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splats image (H, W, C) pixel p to round(p + flow(p)) -> (warped, hit (H, W) bool).

    Collisions keep the source that is last in row-major order (the release's numpy
    assignment), found with a scatter-max over source indices, which is deterministic
    where a scatter-set of duplicates is not."""
    h, w, channels = image.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    # Clipping to one pixel outside keeps outside targets outside and the int cast defined.
    tx = jnp.clip(jnp.round(xs + flow[..., 0]), -1, w).astype(jnp.int32)
    ty = jnp.clip(jnp.round(ys + flow[..., 1]), -1, h).astype(jnp.int32)
    inside = (tx >= 0) & (tx < w) & (ty >= 0) & (ty < h)
    target = jnp.where(inside, ty * w + tx, h * w).ravel()  # h*w: a slot for the outside
    winner = jnp.full(h * w + 1, -1, jnp.int32).at[target].max(jnp.arange(h * w, dtype=jnp.int32))[:-1]
    hit = winner >= 0
    warped = jnp.where(hit[:, None], image.reshape(h * w, channels)[jnp.maximum(winner, 0)], 0)
    return warped.reshape(h, w, channels), hit.reshape(h, w)


def pair_statistics(frame: jax.Array, next_frame: jax.Array, flow: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(W_t, mean |flow|, mean |flow|^2) of one pair: uint8 frames (H, W, 3), flow (H, W, 2)."""
    warped, hit = forward_warp(frame.astype(jnp.float32), flow)
    squared = jnp.where(hit[..., None], jnp.square(next_frame.astype(jnp.float32) - warped), 0.0)
    known = hit.sum() * frame.shape[-1]
    warp_error = jnp.where(known > 0, _sum_by_rows(squared) / jnp.maximum(known, 1), 0.0)
    magnitude_sq = jnp.sum(jnp.square(flow), axis=-1)
    pixels = magnitude_sq.size
    return warp_error, _sum_by_rows(jnp.sqrt(magnitude_sq)) / pixels, _sum_by_rows(magnitude_sq) / pixels


def _sum_by_rows(x: jax.Array) -> jax.Array:
    """Sum of an image-shaped array, row by row first: float32 keeps ~1e-6 relative accuracy
    where one running sum over 720 x 720 x 3 values could drift by 1e-3."""
    return x.reshape(x.shape[0], -1).sum(axis=1).sum()


def mawe_from_statistics(
    stats: PairStatistics,
    definition: Definition = "release",
    coefficient: float = RELEASE_COEFFICIENT,
    static_flow_threshold: float = 1e-3,
) -> MAWEResult:
    """MAWE of one video from its pair statistics, by the release's or the paper's definition."""
    warp, magnitude = np.asarray(stats.warp_error, np.float64), np.asarray(stats.flow_magnitude, np.float64)
    moving = magnitude > static_flow_threshold
    if definition == "release":
        value = float(np.mean(warp[moving] / (coefficient * magnitude[moving]))) if moving.any() else math.nan
    elif definition == "paper":
        ofs = float(np.mean(stats.flow_squared_magnitude))
        value = float(np.mean(warp)) / ofs if ofs > static_flow_threshold**2 else math.nan
    else:
        raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
    return MAWEResult(
        value=value,
        pairs=len(warp),
        static_pairs=int((~moving).sum()),
        mean_flow_magnitude=float(magnitude.mean()),
        mean_warp_error=float(warp.mean()),
    )


class MAWEEvaluator:
    """MAWE of whole videos with RAFT-large params (see `st2v_jax.convert.raft.load_raft_params`).

    Frames go through the accelerator in batches of `pairs_per_batch` consecutive pairs,
    each frame encoded once per batch; the last batch is padded to the same shape, so one
    program serves the whole video. Flow runs at full float32 matmul precision (the
    release's numbers, also on TPU)."""

    def __init__(self, raft_params: Any, settings: MAWESettings = MAWESettings()) -> None:
        self.settings = settings
        self._params = raft_params
        model = RAFT(num_flow_updates=settings.num_flow_updates)
        size = settings.size

        def batch_statistics(params: Any, frames: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            if size is not None:
                frames = resize_frames_bilinear(frames, size)
            images = (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5
            flows = model.apply({"params": params}, images, method=RAFT.consecutive_flows)
            return jax.vmap(pair_statistics)(frames[:-1], frames[1:], flows)

        self._batch_statistics = jax.jit(batch_statistics)

    def pair_statistics(self, frames: np.ndarray, progress: bool = False) -> PairStatistics:
        """uint8 frames (T, H, W, 3), T >= 2 -> statistics of the T-1 consecutive pairs."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"MAWE takes uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if len(frames) < 2:
            raise ValueError(f"MAWE needs at least 2 frames, got {len(frames)}")
        self.settings.check_frame_size(*frames.shape[1:3])
        per_batch = self.settings.pairs_per_batch
        results: list[tuple[np.ndarray, ...]] = []
        starts = range(0, len(frames) - 1, per_batch)
        for start in tqdm.tqdm(starts, desc="optical flow", unit="batch", leave=False, disable=not progress):
            chunk = frames[start : start + per_batch + 1]
            pairs = len(chunk) - 1
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], per_batch + 1 - len(chunk), axis=0)])
            with jax.default_matmul_precision("highest"):
                batch = self._batch_statistics(self._params, chunk)
            results.append(tuple(np.asarray(values)[:pairs] for values in batch))
        warp, magnitude, squared = (np.concatenate(values) for values in zip(*results))
        return PairStatistics(warp, magnitude, squared)

    def __call__(self, frames: np.ndarray, progress: bool = False) -> MAWEResult:
        s = self.settings
        return mawe_from_statistics(
            self.pair_statistics(frames, progress), s.definition, s.coefficient, s.static_flow_threshold
        )
