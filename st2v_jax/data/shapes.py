"""The synthetic shapes domain: coloured circles, squares and triangles bouncing on black.

Everything is a pure function of its arguments (a scene is drawn from a seeded numpy
generator), so the `st2v_shapes` dataset is deterministic and an evaluation can know the
ground truth of every frame. Geometry is in pixels of a `size` x `size` frame; speeds and
radii scale with `size` (the values below are for 64 px).

Captions name 1 or 2 shapes with distinct colours, e.g. "a red circle and a blue square
bouncing on a black background". `held_out_pairs()` lists the two-shape combinations that
never occur in training, from which the evaluation prompts are made.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Optional, Sequence

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 90, 245),
    "yellow": (245, 220, 40),
    "purple": (170, 70, 230),
    "white": (240, 240, 240),
}
KINDS = ("circle", "square", "triangle")
MAX_SHAPES = 2
REFERENCE_SIZE = 64.0
RADIUS_RANGE = (7.0, 10.0)  # circumradius at 64 px
SPEED_RANGE = (0.6, 1.6)  # px per frame at 64 px
BACKGROUND_SUFFIX = " on a black background"

ShapeSpec = tuple[str, str]  # (colour, kind)


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    radius: float
    start: tuple[float, float]  # centre (x, y) at frame 0
    velocity: tuple[float, float]  # px per frame


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    size: int
    mentions_background: bool = True

    @property
    def caption(self) -> str:
        return caption_for([(s.colour, s.kind) for s in self.shapes], self.mentions_background)

    def centres(self, num_frames: int) -> np.ndarray:
        """(num_frames, shapes, 2) centre (x, y) of every shape in every frame."""
        t = np.arange(num_frames, dtype=np.float64)[:, None]
        out = np.empty((num_frames, len(self.shapes), 2))
        for i, shape in enumerate(self.shapes):
            for axis in range(2):
                lo, hi = shape.radius, self.size - shape.radius
                out[:, i, axis] = _bounce(shape.start[axis] + shape.velocity[axis] * t[:, 0], lo, hi)
        return out

    def render(self, num_frames: int) -> np.ndarray:
        """uint8 video (num_frames, size, size, 3); later shapes are drawn over earlier ones."""
        centres = self.centres(num_frames)
        pixel = np.arange(self.size, dtype=np.float64) + 0.5
        xs, ys = pixel[None, None, :], pixel[None, :, None]
        video = np.zeros((num_frames, self.size, self.size, 3))
        for i, shape in enumerate(self.shapes):
            dx = xs - centres[:, i, 0, None, None]
            dy = ys - centres[:, i, 1, None, None]
            # Signed distance -> coverage with a one-pixel ramp: antialiased edges.
            coverage = np.clip(0.5 - signed_distance(shape.kind, dx, dy, shape.radius), 0.0, 1.0)[..., None]
            video = video * (1.0 - coverage) + coverage * np.asarray(COLOURS[shape.colour], np.float64)
        return np.round(video).astype(np.uint8)


def _bounce(position: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Free motion folded into [lo, hi]: reflection off the walls (a triangle wave)."""
    span = hi - lo
    u = np.mod(position - lo, 2.0 * span)
    return lo + np.where(u <= span, u, 2.0 * span - u)


def signed_distance(kind: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if kind == "circle":
        return np.hypot(dx, dy) - radius
    if kind == "square":  # side 1.7 r: about the circle's area
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * radius
    if kind == "triangle":  # equilateral, apex up (image y grows downwards), inradius r / 2
        c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
        return np.maximum(dy, np.maximum(c * dx - s * dy, -c * dx - s * dy)) - 0.5 * radius
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def caption_for(specs: Sequence[ShapeSpec], mentions_background: bool = True) -> str:
    names = " and ".join(f"a {colour} {kind}" for colour, kind in specs)
    return names + " bouncing" + (BACKGROUND_SUFFIX if mentions_background else "")


_SPEC_PATTERN = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b")


def parse_prompt(prompt: str) -> list[ShapeSpec]:
    """The (colour, kind) pairs a prompt names, in order ("a red circle and a blue square" ->
    [("red", "circle"), ("blue", "square")])."""
    return [(m.group(1), m.group(2)) for m in _SPEC_PATTERN.finditer(prompt.lower())]


def all_pairs() -> list[frozenset[ShapeSpec]]:
    """Every unordered two-shape combination with distinct colours (135 of them)."""
    specs = list(itertools.product(COLOURS, KINDS))
    return [frozenset(p) for p in itertools.combinations(specs, 2) if p[0][0] != p[1][0]]


# Kept in training: the README's example prompt.
_ALWAYS_TRAINED = frozenset({("red", "circle"), ("blue", "square")})


def held_out_pairs(count: int = 27, seed: int = 2024) -> list[frozenset[ShapeSpec]]:
    """Two-shape combinations never shown in training (in either order): the evaluation's
    unseen prompts. A fixed, seeded choice."""
    candidates = sorted((p for p in all_pairs() if p != _ALWAYS_TRAINED), key=sorted)
    order = np.random.default_rng(seed).permutation(len(candidates))
    return [candidates[i] for i in order[:count]]


def evaluation_prompts() -> list[str]:
    """Both orders of every held-out pair: 54 prompts not seen in training."""
    prompts = []
    for pair in held_out_pairs():
        a, b = sorted(pair)
        prompts += [caption_for([a, b], False), caption_for([b, a], False)]
    return prompts


def sample_scene(
    rng: np.random.Generator,
    size: int,
    allowed_pairs: Optional[Sequence[frozenset[ShapeSpec]]] = None,
) -> Scene:
    """A random scene: one shape (a third of the time) or two shapes of different colours
    from `allowed_pairs` (default: all pairs), random radii, positions and velocities."""
    scale = size / REFERENCE_SIZE
    if rng.random() < 1 / 3:
        specs = [(str(rng.choice(list(COLOURS))), str(rng.choice(KINDS)))]
    else:
        pairs = list(allowed_pairs) if allowed_pairs is not None else all_pairs()
        specs = sorted(pairs[rng.integers(len(pairs))])
        if rng.random() < 0.5:
            specs.reverse()
    shapes = []
    for colour, kind in specs:
        radius = rng.uniform(*RADIUS_RANGE) * scale
        start = tuple(rng.uniform(radius, size - radius, size=2))
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*SPEED_RANGE) * scale
        shapes.append(Shape(colour, kind, radius, start, (speed * math.cos(angle), speed * math.sin(angle))))
    return Scene(tuple(shapes), size, mentions_background=bool(rng.random() < 0.5))


def training_pairs() -> list[frozenset[ShapeSpec]]:
    held_out = set(held_out_pairs())
    return [p for p in all_pairs() if p not in held_out]
