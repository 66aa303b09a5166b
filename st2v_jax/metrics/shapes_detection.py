"""Analytic detection of the shapes domain's objects (`st2v_jax.data.shapes`) in frames.

Every shape in that domain is a flat palette colour on black, so a frame can be read without
a learnt model, at any frame size:

1. Colour: each pixel goes to the nearest palette colour by chroma (rgb over brightness,
   so a shape's dim, blurred rim keeps its colour); dark and off-palette pixels are
   background. Generated frames are blurry and noisy, hence tolerances rather than exact
   colours (`DetectorSettings`).
2. Blobs: 8-connected components per colour, found for all frames at once with numpy
   (label propagation with pointer jumping; scipy is not a dependency). A colour's largest
   blob, if big enough and with a bright enough core, is one shape.
3. Kind: the template (circle, square or apex-up triangle, drawn with the renderer's own
   geometry and blurred as much as the video is) that best matches the blob. A whole shape
   is matched at its moments (centroid, size from area); a shape partly hidden by another
   gets a search over centre and size in which pixels of other shapes are cheap to cover,
   so that what is hidden counts less than what is seen. The reported centre is the
   matched template's, which stays on the shape's true centre while it is partly hidden.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from st2v_jax.data import shapes

PALETTE_NAMES: tuple[str, ...] = tuple(shapes.COLOURS)
_PALETTE = np.asarray([shapes.COLOURS[name] for name in PALETTE_NAMES], np.float64)
_PALETTE_BRIGHTNESS = _PALETTE.max(axis=1)
_PALETTE_CHROMA = _PALETTE / _PALETTE_BRIGHTNESS[:, None]
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclasses.dataclass(frozen=True)
class Detection:
    """One shape found in a frame: its colour and kind, its centre (x, y) in pixels (x to the
    right, y down, pixel centres at +0.5 as in `shapes.Scene.centres`), and its visible area
    in pixels (coverage-weighted)."""

    colour: str
    kind: str
    x: float
    y: float
    area: float


@dataclasses.dataclass(frozen=True)
class DetectorSettings:
    """Tolerances of the detector.

    min_brightness: a pixel counts for a colour when its brightness (max channel) is at least
        this fraction of the palette colour's; 0.5 keeps exactly the 50%-coverage
        silhouette of an antialiased shape on black.
    max_chroma_distance: farthest a pixel's chroma (rgb / brightness) may be from the
        nearest palette colour's; the closest palette pair (blue, purple) is 0.54 apart.
    min_area: smallest blob that is a shape, as a fraction of the frame's area (0.002 is
        8 px at 64x64, 2 px at 32x32; the smallest triangle covers 1.5% of the frame).
    core_brightness, min_core: a blob needs at least `min_core` pixels at `core_brightness`
        of the palette colour's brightness and within half the chroma tolerance. Where two
        shapes' antialiased edges meet, their blend can look like a third palette colour
        (red + blue -> purple, yellow + blue -> white, red + green -> yellow), but no blend
        of two palette colours that close in chroma to a third is more than 0.78 as bright
        as it. Generated shapes dimmer than this are not detected.
    """

    min_brightness: float = 0.5
    max_chroma_distance: float = 0.35
    min_area: float = 0.002
    core_brightness: float = 0.8
    min_core: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.min_brightness <= 1.0:
            raise ValueError(f"min_brightness must be in (0, 1], got {self.min_brightness}")
        if not self.min_brightness <= self.core_brightness <= 1.0:
            raise ValueError(f"core_brightness must be in [min_brightness, 1], got {self.core_brightness}")
        if self.max_chroma_distance <= 0.0 or self.min_area < 0.0 or self.min_core < 0:
            raise ValueError("max_chroma_distance must be positive, min_area and min_core non-negative")


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (H, W, 3) or (F, H, W, 3), got {video.dtype} {video.shape}")
    return video


def _pixel_chroma(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(brightness, nearest palette index, chroma distance to it) of every pixel."""
    rgb = video.astype(np.float32)
    brightness = rgb.max(axis=-1)
    chroma = rgb / np.maximum(brightness, 1.0)[..., None]
    distance = np.linalg.norm(chroma[..., None, :] - _PALETTE_CHROMA.astype(np.float32), axis=-1)
    nearest = distance.argmin(axis=-1)
    return brightness, nearest, np.take_along_axis(distance, nearest[..., None], -1)[..., 0]


def colour_map(video: np.ndarray, settings: DetectorSettings = DetectorSettings()) -> np.ndarray:
    """uint8 (F, H, W, 3) or (H, W, 3) -> int (F, H, W): index into `PALETTE_NAMES` of each
    pixel's colour; -1 for background (too dark) and off-palette pixels."""
    brightness, nearest, distance = _pixel_chroma(_check_video(video))
    return _classify(brightness, nearest, distance, settings)


def _classify(brightness: np.ndarray, nearest: np.ndarray, distance: np.ndarray, settings: DetectorSettings) -> np.ndarray:
    keep = (distance <= settings.max_chroma_distance) & (brightness >= settings.min_brightness * _PALETTE_BRIGHTNESS[nearest])
    return np.where(keep, nearest, -1)


def _shift(array: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """array[..., y + dy, x + dx] at (..., y, x); `fill` outside the frame."""
    out = np.full_like(array, fill)
    h, w = array.shape[-2:]
    out[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = array[
        ..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    for _ in range(pixels):
        mask = np.logical_or.reduce([mask] + [_shift(mask, dy, dx, False) for dy, dx in _NEIGHBOURS])
    return mask


def label_components(colours: np.ndarray) -> np.ndarray:
    """8-connected components of equal colour: (F, H, W) colour indices (-1 = none) -> labels,
    each pixel's label the flat index of its component's first pixel (-1 for none)."""
    size = colours.size
    labels = np.where(colours >= 0, np.arange(size).reshape(colours.shape), size)
    same = [(_shift(colours, dy, dx, -2) == colours) & (colours >= 0) for dy, dx in _NEIGHBOURS]
    while True:
        lowest = labels
        for (dy, dx), connected in zip(_NEIGHBOURS, same):
            lowest = np.where(connected, np.minimum(lowest, _shift(labels, dy, dx, size)), lowest)
        inside = lowest < size
        jumped = lowest.copy()  # pointer jumping: take the label of the pixel we point to
        jumped[inside] = lowest.ravel()[lowest[inside]]
        if np.array_equal(jumped, labels):
            return np.where(inside, labels, -1)
        labels = jumped


def _largest_blobs(labels: np.ndarray, colours: np.ndarray, core: np.ndarray, min_area: float, min_core: int) -> np.ndarray:
    """Label of the largest blob of every (frame, colour) with at least `min_area` pixels and
    `min_core` of them in `core`."""
    flat, size = labels.ravel(), labels.size
    inside = flat >= 0
    area = np.bincount(flat[inside], minlength=size)
    core_area = np.bincount(flat[inside & core.ravel()], minlength=size)
    roots = np.nonzero((area >= max(min_area, 1)) & (core_area >= min_core))[0]
    frame, colour = roots // (labels.shape[1] * labels.shape[2]), colours.ravel()[roots]
    order = np.lexsort((-area[roots], colour, frame))
    key = (frame * len(PALETTE_NAMES) + colour)[order]
    return roots[order][np.r_[True, key[1:] != key[:-1]]] if len(roots) else roots


# Silhouette area per squared circumradius of each kind as `shapes` draws it: sizes a
# template from a blob's area.
_AREA_PER_R2 = {"circle": math.pi, "square": 1.7**2, "triangle": 3 * math.sqrt(3) / 4}
_HIDDEN_COST = 0.25  # mismatch per template pixel under another shape, relative to background
_GOOD_FIT = 0.1  # mismatch per pixel of area under which a template at the moments is kept
_BLURS = (0.0, 0.7, 1.2, 1.8)  # gaussian sigmas (px) tried for a template: sharp to blurry
_SEARCH_MOVES = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], [0], indexing="ij"), -1).reshape(-1, 4).astype(np.float64)


@functools.lru_cache(maxsize=256)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) matrix of a 1-D gaussian blur with zeros beyond the ends."""
    if sigma == 0.0:
        return np.eye(size)
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    reach = np.arange(-size, size + 1)
    return np.exp(-0.5 * (offsets / sigma) ** 2) / np.exp(-0.5 * (reach / sigma) ** 2).sum()


def _template_errors(kind: str, params: np.ndarray, xs: np.ndarray, ys: np.ndarray, observed: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted L1 mismatch between the observed coverage and the kind's silhouette at each
    (cx, cy, r, blur sigma) row of `params`: the renderer's antialiased shape, blurred."""
    cx, cy, r = (params[:, i, None, None] for i in range(3))
    # The same signed distance the renderer uses, so a clean shape fits exactly.
    coverage = np.clip(0.5 - shapes.signed_distance(kind, xs - cx, ys - cy, r), 0.0, 1.0)
    for sigma in np.unique(params[:, 3]):
        rows = params[:, 3] == sigma
        coverage[rows] = _blur_matrix(ys.shape[0], float(sigma)) @ coverage[rows] @ _blur_matrix(xs.shape[1], float(sigma)).T
    return (np.abs(coverage - observed) * weight).sum(axis=(1, 2))


def _search_template(
    kind: str, start: np.ndarray, xs: np.ndarray, ys: np.ndarray, observed: np.ndarray, weight: np.ndarray
) -> tuple[float, np.ndarray]:
    """(mismatch, (cx, cy, r, blur sigma)) of the kind's best template by a pattern search
    from `start` over centre and size: moves to the best of the 26 neighbouring parameter
    sets, halving the steps when none improves, down to 1/8 px."""
    params = start[None]
    best = float(_template_errors(kind, params, xs, ys, observed, weight)[0])
    step = np.array([0.5, 0.5, 0.25, 0.0]) * start[2]
    while step[0] > 1 / 8:
        candidates = params + _SEARCH_MOVES * step
        candidates[:, 2] = np.maximum(candidates[:, 2], 0.5)
        errors = _template_errors(kind, candidates, xs, ys, observed, weight)
        i = int(errors.argmin())
        if errors[i] < best - 1e-6:
            best, params = float(errors[i]), candidates[i : i + 1]
        else:
            step = step / 2
    return best, params[0]


def detect_video(video: np.ndarray, settings: DetectorSettings = DetectorSettings()) -> list[list[Detection]]:
    """The shapes in every frame of uint8 (F, H, W, 3) frames (or one (H, W, 3) frame): per
    frame a list of detections, at most one per palette colour (its largest blob).

    Kinds come from templates blurred as much as the frames are: the blur that best fits
    the whole, unhidden blobs of all the given frames (a video is blurred uniformly, and a
    partly hidden shape alone cannot tell blur from geometry)."""
    video = _check_video(video)
    frames, height, width = video.shape[:3]
    brightness, nearest, distance = _pixel_chroma(video)
    colours = _classify(brightness, nearest, distance, settings)
    labels = label_components(colours)
    bright = brightness >= settings.min_brightness * _PALETTE_BRIGHTNESS.min()
    same_colour = distance <= settings.max_chroma_distance
    core = (brightness >= settings.core_brightness * _PALETTE_BRIGHTNESS[nearest]) & (distance <= settings.max_chroma_distance / 2)
    blobs = []
    for root in _largest_blobs(labels, colours, core, settings.min_area * height * width, settings.min_core):
        f = int(root) // (height * width)
        colour = int(colours.ravel()[root])
        blobs.append(_Blob.cut(f, colour, labels[f] == root, brightness[f], same_colour[f] & (nearest[f] == colour), bright[f]))
    blur = _video_blur(blobs)
    detections: list[list[Detection]] = [[] for _ in range(frames)]
    for blob in blobs:
        detections[blob.frame].append(blob.detect(blur))
    return detections


def _video_blur(blobs: Sequence["_Blob"]) -> float:
    """The blur sigma (one of `_BLURS`) that fits most whole blobs best (all blobs if every
    one touches another shape)."""
    whole = [blob for blob in blobs if not blob.touches_other] or blobs
    if not whole:
        return 0.0
    votes = [int(np.argmin([min(blob.fit(kind, sigma)[0] for kind in shapes.KINDS) for sigma in _BLURS])) for blob in whole]
    return _BLURS[int(np.bincount(votes, minlength=len(_BLURS)).argmax())]


@dataclasses.dataclass
class _Blob:
    """One blob's window of the frame, ready for template fitting.

    observed: the blob plus its dim antialiased rim, as coverage (brightness over the
        palette colour's).
    weight: mismatch cost per pixel. Bright pixels of anything else may hide part of this
        shape, or be in front of nothing: a template covering them costs `_HIDDEN_COST` per
        pixel instead of 1, so the kind that explains the blob with the least hidden area
        wins (a complete triangle in front of a square is not a square missing two corners).
    """

    frame: int
    colour: int
    xs: np.ndarray  # (1, w) pixel-centre x of the window's columns
    ys: np.ndarray  # (h, 1)
    observed: np.ndarray  # (h, w)
    weight: np.ndarray  # (h, w)
    touches_other: bool  # bright pixels of something else within 2 px

    @classmethod
    def cut(cls, frame: int, colour: int, blob: np.ndarray, brightness: np.ndarray, of_colour: np.ndarray, bright: np.ndarray) -> "_Blob":
        ys, xs = np.nonzero(blob)
        pad = (max(np.ptp(ys), np.ptp(xs)) + 1) // 2 + 2
        y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, blob.shape[0])
        x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, blob.shape[1])
        window = (slice(y0, y1), slice(x0, x1))
        mine = _dilate(blob[window], 2) & of_colour[window]
        unknown = bright[window] & ~mine
        return cls(
            frame,
            colour,
            (np.arange(x0, x1) + 0.5)[None, :],
            (np.arange(y0, y1) + 0.5)[:, None],
            np.where(mine, np.clip(brightness[window] / _PALETTE_BRIGHTNESS[colour], 0.0, 1.0), 0.0),
            np.where(unknown, _HIDDEN_COST, 1.0),
            bool((unknown & _dilate(blob[window], 2)).any()),
        )

    @functools.cached_property
    def moments(self) -> tuple[float, float, float]:
        """(area, centroid x, centroid y) of the observed coverage."""
        area = float(self.observed.sum())
        return area, float((self.observed * self.xs).sum()) / area, float((self.observed * self.ys).sum()) / area

    def fit(self, kind: str, sigma: float) -> tuple[float, np.ndarray]:
        """(mismatch, (cx, cy, r, sigma)) of the kind's template placed at the moments (centroid,
        size from area): exact for a whole shape."""
        area, cx, cy = self.moments
        params = np.array([cx, cy, math.sqrt(area / _AREA_PER_R2[kind]), sigma])
        return float(_template_errors(kind, params[None], self.xs, self.ys, self.observed, self.weight)[0]), params

    def detect(self, sigma: float) -> Detection:
        """The best-fitting kind, and its template's centre. When no template at the moments
        fits and other shapes are next to the blob (a partly hidden shape), each kind's
        centre and size are searched for."""
        fits = {kind: self.fit(kind, sigma) for kind in shapes.KINDS}
        kind = min(fits, key=lambda k: fits[k][0])
        if self.touches_other and fits[kind][0] > _GOOD_FIT * self.moments[0]:
            fits = {k: _search_template(k, fits[k][1], self.xs, self.ys, self.observed, self.weight) for k in shapes.KINDS}
            kind = min(fits, key=lambda k: fits[k][0])
        cx, cy = fits[kind][1][:2]
        return Detection(PALETTE_NAMES[self.colour], kind, float(cx), float(cy), self.moments[0])
