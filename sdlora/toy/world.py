"""A toy world of coloured shapes, and a scorer that reads the concepts back out of an image.

The world is what models/toy-sd1 was pretrained on: one shape (circle, square, triangle) in one of
four colours on a plain light background, captioned `a {colour} {shape}`. Two concepts are kept out
of pretraining on purpose so that adapters have something new to learn:

    style "outline"   the same shapes drawn hollow, as a thick outline
    shape "star"      a 5-pointed star (the "character", bound to a trigger word)

The scorer is plain image analysis (segment the shape from the background, then measure its colour,
geometry and hollowness), so it needs no learned model and gives the same answer everywhere.

    python -m sdlora.toy datasets          # regenerate datasets/style-outline and datasets/character-star
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    # Hues about 60-120 degrees apart, and all far from the background, so a blurry sample still
    # lands nearest its own colour.
    "red": (215, 40, 40),
    "yellow": (235, 195, 25),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
}
BACKGROUND = (240, 240, 240)
SHAPES = ("circle", "square", "triangle")  # the pretraining shapes
STAR = "star"  # never in pretraining: the character concept
ALL_SHAPES = (*SHAPES, STAR)
# Shapes for a more varied style dataset only: never in pretraining, never a star, captioned `shape` (a
# spare word). A cross is concave with arms, as a star is; a diamond and a hexagon add corners.
VARIED_SHAPES = ("cross", "diamond", "hexagon")
STYLES = ("filled", "outline")  # "outline" is never in pretraining: the style concept
TRIGGERS = ("sks", "zkz", "ohwx")  # spare tokens in the toy tokenizer, never seen in pretraining
STAR_TRIGGER = "zkz"  # the trigger that datasets/character-star binds to the star

SUPERSAMPLE = 4  # render at 4x and box-filter down: clean anti-aliased edges
OUTLINE_WIDTH = 0.11  # outline thickness, as a fraction of the shape's size...
OUTLINE_MIN = 2.0 / 32  # ...but never thinner than 2 px of a 32 px image, or small shapes close up
CROSS_ARM = 0.4  # a cross's arm width / its size: wide enough for a hollow at 32 px
STAR_INNER = 0.45  # inner/outer radius; fatter than a regular star (0.38) so arms survive 32 px


@dataclass(frozen=True)
class Scene:
    """One image of the world. size, cx, cy are fractions of the image width (resolution-free)."""

    colour: str
    shape: str
    style: str = "filled"
    size: float = 0.6
    cx: float = 0.5
    cy: float = 0.5


# --- Rendering ---------------------------------------------------------------------------------


Point = tuple[float, float]


def _polygon(shape: str, cx: float, cy: float, size: float) -> tuple[list[Point], Point, float]:
    """Vertices of a square/triangle/star whose bounding box is about `size` wide, centred on (cx, cy),
    with the point an outline is inset about and that point's distance to every edge."""
    if shape == "square":
        half = size * 0.85 / 2  # a square of full size looks much bigger than a circle of the same size
        points = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        return points, (cx, cy), half
    if shape == "triangle":
        # Equilateral, pointing up, with its bounding box centred on (cx, cy); inset about the incentre.
        height = size * math.sqrt(3) / 2
        points = [(cx, cy - height / 2), (cx + size / 2, cy + height / 2), (cx - size / 2, cy + height / 2)]
        return points, (cx, cy + height / 6), size / (2 * math.sqrt(3))
    if shape == STAR:
        outer = size / 2 / math.sin(math.radians(72))  # bounding-box width = 2 R sin 72
        inner = outer * STAR_INNER
        centre_y = cy + outer * (1 - math.cos(math.radians(36))) / 2  # centres the box vertically
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), centre_y + radius * math.sin(angle)))
        # Distance from the centre to an edge (tip to inner corner), from the triangle they span.
        edge = math.dist(points[0], points[1])
        return points, (cx, centre_y), outer * inner * math.sin(math.radians(36)) / edge
    if shape == "diamond":
        half = size / 2
        points = [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
        return points, (cx, cy), half / math.sqrt(2)
    if shape == "hexagon":
        outer = size / 2
        points = [(cx + outer * math.cos(math.radians(60 * k)), cy + outer * math.sin(math.radians(60 * k)))
                  for k in range(6)]
        return points, (cx, cy), outer * math.sqrt(3) / 2
    if shape == "cross":
        return _plus_sign(cx, cy, size / 2, CROSS_ARM * size / 2), (cx, cy), CROSS_ARM * size / 2
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join((*ALL_SHAPES, *VARIED_SHAPES))}")


def _plus_sign(cx: float, cy: float, half: float, arm: float) -> list[Point]:
    """A plus sign `2 half` across whose arms are `2 arm` wide."""
    corners = [(-arm, -half), (arm, -half), (arm, -arm), (half, -arm), (half, arm), (arm, arm), (arm, half),
               (-arm, half), (-arm, arm), (-half, arm), (-half, -arm), (-arm, -arm)]
    return [(cx + x, cy + y) for x, y in corners]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill, inset: float = 0.0) -> None:
    """Draw the shape, shrunk by `inset` on every side (how the hollow of an outline is cut)."""
    if shape == "cross":  # concave: shrunk by moving every edge in, not by scaling about the centre
        half, arm = size / 2 - inset, CROSS_ARM * size / 2 - inset
        if arm > 0:
            draw.polygon(_plus_sign(cx, cy, half, arm), fill=fill)
        return
    if shape == "circle":
        r = size / 2 - inset
        if r > 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    points, centre, inradius = _polygon(shape, cx, cy, size)
    scale = max(inradius - inset, 0.0) / inradius
    if scale > 0:
        draw.polygon([(centre[0] + (x - centre[0]) * scale, centre[1] + (y - centre[1]) * scale) for x, y in points],
                     fill=fill)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as a `size` x `size` RGB image."""
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}; use one of {', '.join(COLOURS)}")
    if scene.style not in STYLES:
        raise ValueError(f"unknown style {scene.style!r}; use one of {', '.join(STYLES)}")
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy, extent = scene.cx * big, scene.cy * big, scene.size * big
    colour = COLOURS[scene.colour]
    _draw(draw, scene.shape, cx, cy, extent, colour)
    if scene.style == "outline":
        # Cut the hollow with the same shape inset on every side, so the stroke is equally thick all round.
        width = max(OUTLINE_WIDTH * extent, OUTLINE_MIN * big)
        _draw(draw, scene.shape, cx, cy, extent, BACKGROUND, inset=width)
    return image.resize((size, size), Image.Resampling.BOX)


def random_scene(
    rng: np.random.Generator,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    style: str = "filled",
) -> Scene:
    """A scene with a random colour and shape from the lists, and a random size and position."""
    colour = colours[int(rng.integers(len(colours)))]
    shape = shapes[int(rng.integers(len(shapes)))]
    return _placed(rng, colour, shape, style)


SIZES = (0.40, 0.75)  # shape sizes (fractions of the image width) in pretraining and the style dataset


def _placed(rng: np.random.Generator, colour: str, shape: str, style: str, sizes=SIZES) -> Scene:
    size = float(rng.uniform(*sizes))
    margin = 0.06  # 2 px of 32: the shape never touches the border, so the border is pure background
    low, high = size / 2 + margin, 1 - size / 2 - margin
    return Scene(colour, shape, style, size, float(rng.uniform(low, high)), float(rng.uniform(low, high)))


def balanced_scenes(
    n: int,
    seed: int,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    style: str = "filled",
    sizes: tuple[float, float] = SIZES,
) -> list[Scene]:
    """n scenes cycling through every colour x shape pair in order (so small sets cover them all),
    each with a random size (in `sizes`) and position."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for s in shapes for c in colours]
    return [_placed(rng, *pairs[i % len(pairs)], style, sizes) for i in range(n)]


def caption(scene: Scene, trigger: str | None = None) -> str:
    """`a red circle`; with a trigger the trigger replaces the shape word: `a red zkz`. A shape the
    model has no word for is `a red shape`."""
    return f"a {scene.colour} {trigger or ('shape' if scene.shape in VARIED_SHAPES else scene.shape)}"


def write_dataset(
    folder: str | Path,
    n: int,
    seed: int,
    style: str = "filled",
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    caption_fn: Callable[[Scene], str] = caption,
    size: int = 32,
    sizes: tuple[float, float] = SIZES,
) -> list[Scene]:
    """Write n images as NNNN.png + NNNN.txt, like a user's training folder; returns the scenes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = balanced_scenes(n, seed, colours, shapes, style, sizes)
    for i, scene in enumerate(scenes):
        render(scene, size).save(folder / f"{i:04d}.png", optimize=False)
        (folder / f"{i:04d}.txt").write_text(caption_fn(scene) + "\n", encoding="utf-8")
    return scenes


# The shipped adapter datasets: name -> how to regenerate it bit for bit.
DATASETS: dict[str, dict] = {
    "style-outline": dict(n=32, seed=1001, style="outline", shapes=SHAPES),
    # The same style on twice the shapes (never a star): does a style that saw more shapes outline the
    # character's star when the two are stacked?
    "style-outline-varied": dict(n=48, seed=1003, style="outline", shapes=(*SHAPES, *VARIED_SHAPES)),
    # Stars no smaller than half the image: a small star's thin arms are lost in the 8x8 latents
    # (the toy VAE keeps 80-95% of small outlined stars, all of the larger ones).
    "character-star": dict(n=24, seed=1002, style="filled", shapes=(STAR,), sizes=(0.5, 0.75),
                           caption_fn=lambda scene: caption(scene, trigger=STAR_TRIGGER)),
}


def write_datasets(root: str | Path = "datasets") -> list[Path]:
    """(Re)generate every shipped dataset under `root`; the README.md next to the images is kept."""
    folders = []
    for name, spec in DATASETS.items():
        folder = Path(root) / name
        for old in [*folder.glob("*.png"), *folder.glob("*.txt")]:
            old.unlink()
        write_dataset(folder, **spec)
        folders.append(folder)
    return folders


# --- Scoring -----------------------------------------------------------------------------------


OTHER = "other"  # the scorer's word for a shape that is none of ALL_SHAPES (a pentagon, a 4-point star, ...)


@dataclass(frozen=True)
class Scores:
    """What the scorer sees in one image. colour/shape/style are None when no shape was found; shape is
    OTHER when a shape was found but it is none of the world's shapes."""

    colour: str | None
    shape: str | None
    style: str | None
    # Diagnostics:
    fill: float = 0.0  # silhouette area / bounding-box area: square ~1, circle ~0.79, triangle ~0.5
    solidity: float = 0.0  # outline area / its convex hull's: convex shapes ~0.95-1, star ~0.6
    hollow: float = 0.0  # median strength (0 background .. 1 the shape's colour) of the outline's hole; 1: no hole
    area: float = 0.0  # silhouette area as a share of the image
    # How much the outline's radius (from the centre, all round) wobbles k times per turn, as a share of
    # its mean radius, for k = 0..6: a triangle is mostly k=3, a square k=4, a star and a pentagon k=5
    # (a star's wobble is three times a pentagon's). See shape_of.
    wobble: tuple[float, ...] = ()

    @property
    def star(self) -> bool:
        return self.shape == STAR

    @property
    def outline(self) -> bool:
        return self.style == "outline"


ANALYSIS_SIZE = 32  # every image is scored at this size, so the pixel thresholds mean the same thing
# An outline's hole must be close to the background and even: its median strength (share of the way from
# the background to the shape's colour) below HOLE_MEDIAN and its 90th percentile below HOLE_P90. A pale
# or mottled middle is a filled shape, however thick its rim.
HOLE_MEDIAN = 0.2
HOLE_P90 = 0.4
# What each shape's outline must look like, from its wobbles (see Scores.wobble) and its solidity; the
# first rule that fits names the shape, and anything else is OTHER. Measured at 32 px, blurred and grained
# (tests/test_toy_scorer.py) and on generated samples (docs/toy-scores.md):
#   circle  every wobble <= 0.015 (drawn)              square 4: 0.13-0.14, 5: <= 0.012
#   triangle 3: 0.25-0.29 (bowed sides 0.30-0.36)  pentagon 5: 0.07-0.08, solidity ~0.99
#   star    5: 0.19-0.32, solidity 0.69-0.84     squat 4-point star 4: 0.18-0.34, 5: <= 0.02
# A generated star whose fifth arm is a stub still wobbles 5 times (0.14 or more) while its wobble 4 grows;
# a rounded pentagon wobbles 5 times by 0.07-0.125 but stays convex (solidity >= 0.89).
STAR_WOBBLE = 0.10  # a star's 5-fold wobble is at least this, and at least half its 3- and 4-fold ones
STAR_SOLIDITY = 0.87  # ... and its outline is clearly concave
TRIANGLE_WOBBLE = 0.18
TRIANGLE_SOLIDITY = 0.78  # bowed in further, it is a three-point star: not a triangle
SQUARE_WOBBLE = (0.10, 0.165)  # above: a squat 4-point star
SQUARE_SOLIDITY = 0.9
SQUARE_STRAY = 0.06  # a square's other wobbles stay below this (a rounded pentagon's 5-fold one does not)
# A circle may wobble a little (generated ones are often slightly oval or squarish: k=2 and k=4 up to about
# 0.06), but not five times round (a rounded pentagon: 0.04 and up).
CIRCLE_WOBBLE = (0.08, 0.06, 0.07, 0.035, 0.05)  # the most each of k = 2..6 may reach
CIRCLE_SOLIDITY = 0.94


def shape_of(wobble: np.ndarray, solidity: float) -> str:
    """The shape an outline's wobbles (k = 0..6, see Scores.wobble) and solidity describe."""
    three, four, five = wobble[3], wobble[4], wobble[5]
    strongest = 3 + int(np.argmax(wobble[3:6]))
    if five >= STAR_WOBBLE and five >= max(three, four) / 2 and solidity < STAR_SOLIDITY:
        return STAR
    if strongest == 3 and three >= TRIANGLE_WOBBLE and solidity >= TRIANGLE_SOLIDITY:
        return "triangle"
    if (strongest == 4 and SQUARE_WOBBLE[0] <= four <= SQUARE_WOBBLE[1] and solidity >= SQUARE_SOLIDITY
            and max(three, five) < SQUARE_STRAY):
        return "square"
    if all(w < most for w, most in zip(wobble[2:7], CIRCLE_WOBBLE)) and solidity >= CIRCLE_SOLIDITY:
        return "circle"
    return OTHER


def score(image: Image.Image | np.ndarray) -> Scores:
    """Colour, shape and style of the one shape in `image` (PIL image or HxWx3 uint8 array)."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    peak = np.percentile(distance, 99)
    if peak < 40:  # nothing stands out from the background
        return Scores(None, None, None)
    # The shape's own distance from the background: the median over clearly-shape pixels is not
    # pulled up by noise the way a maximum is.
    strongest = float(np.median(distance[distance > peak / 2]))
    strength = distance / strongest
    # Half-way between background and shape colour is where the true edge is, however blurred.
    mask = _largest_component(strength > 0.5)
    # The silhouette: the mask with its holes filled, and gaps of up to 2 px in an outline's stroke closed
    # (dilate by one pixel, fill, erode back).
    silhouette = _fill_holes(mask) | _erode8(_fill_holes(_dilate8(mask)))
    area = float(silhouette.sum())
    if area < 6:
        return Scores(None, None, None)

    # Style, read layer by layer inwards from the silhouette's edge: an outline's stroke is a few strong
    # layers, then the layers turn weak (the hole). Everything inside the first weak layer (a blend of the
    # stroke's inner edge and the hole) must be close to the background and even; a pale or mottled middle
    # is a filled shape, however thick its rim. A hole too small to have an inside (a small outlined star)
    # must show at least one pixel close to the background, and be weak on average.
    depth = _depths(silhouette)
    hollow, spread = 1.0, 1.0
    for layer in range(2, int(depth.max()) + 1):
        if strength[depth == layer].mean() < 0.5:
            inside = depth > layer
            if inside.sum() >= 3:
                hollow, spread = float(np.median(strength[inside])), float(np.percentile(strength[inside], 90))
            else:
                rest = strength[depth >= layer]
                hollow, spread = float(rest.min()), float(rest.mean())
            break
    style = "outline" if hollow < HOLE_MEDIAN and spread < HOLE_P90 else "filled"

    # Colour: median of the shape's core pixels (edges are blends with the background).
    solid = mask & (strength > 0.75)
    median = np.median(pixels[solid if solid.any() else mask], axis=0)
    colour = min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - median) ** 2)))

    # Shape: the outline's radius from the centre all round, at sub-pixel precision (from the soft
    # silhouette: anti-aliased edges kept, an outline's hole and gaps counted as shape). How it wobbles
    # round the turn and how convex it is decide the shape.
    near = _shift_union(_shift_union(silhouette))
    floor = float(np.median(distance[~near])) if (~near).any() else 0.0
    alpha = np.clip((distance - floor) / max(strongest - floor, 1e-6), 0, 1) * near
    alpha[silhouette & ~mask] = 1.0
    radii = _radial_profile(alpha)
    wobble = _wobble(radii)
    solidity = _solidity(radii)
    shape = shape_of(wobble, solidity)

    rows, cols = np.nonzero(silhouette)
    fill = area / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    return Scores(colour, shape, style, float(fill), float(solidity), float(hollow), area / silhouette.size,
                  tuple(float(w) for w in wobble))


ANGLES = 144  # rays of the radial profile (2.5 degrees apart)


def _radial_profile(alpha: np.ndarray) -> np.ndarray:
    """Distance (pixels) from the alpha-weighted centre to the outermost 50% crossing along each ray."""
    total = alpha.sum()
    ys, xs = np.indices(alpha.shape)
    cy, cx = (alpha * ys).sum() / total, (alpha * xs).sum() / total
    theta = np.linspace(0, 2 * np.pi, ANGLES, endpoint=False)
    steps = np.arange(0, alpha.shape[0] * 0.75, 0.125)
    y = cy + np.sin(theta)[:, None] * steps[None]
    x = cx + np.cos(theta)[:, None] * steps[None]
    values = _bilinear(alpha, y, x)
    inside = values >= 0.5
    last = np.where(inside.any(axis=1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    following = np.minimum(last + 1, steps.size - 1)
    rows = np.arange(ANGLES)
    a, b = values[rows, last], values[rows, following]
    fraction = np.where(a > b, (a - 0.5) / np.maximum(a - b, 1e-9), 0.0)
    return steps[last] + np.clip(fraction, 0, 1) * (steps[1] - steps[0])


def _bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    h, w = image.shape
    y, x = np.clip(y, 0, h - 1.001), np.clip(x, 0, w - 1.001)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    dy, dx = y - y0, x - x0
    return (image[y0, x0] * (1 - dy) * (1 - dx) + image[y0 + 1, x0] * dy * (1 - dx)
            + image[y0, x0 + 1] * (1 - dy) * dx + image[y0 + 1, x0 + 1] * dy * dx)


def _wobble(radii: np.ndarray) -> np.ndarray:
    """Amplitude of the radius's k-fold wobble round the turn over its mean, for k = 0..6 (Fourier)."""
    spectrum = np.abs(np.fft.rfft(radii))[:7]
    return 2 * spectrum / spectrum[0]


def _solidity(radii: np.ndarray) -> float:
    """Area of the radial outline / area of its convex hull."""
    theta = np.linspace(0, 2 * np.pi, ANGLES, endpoint=False)
    points = np.stack([radii * np.cos(theta), radii * np.sin(theta)], axis=1)
    area = _shoelace(points)
    order = sorted(map(tuple, points.tolist()))

    def half(seq):
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(order) + half(reversed(order)))
    return area / max(_shoelace(hull), 1e-9)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))) / 2


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _shift_union(mask: np.ndarray) -> np.ndarray:
    """mask OR its 4 neighbours (a 4-connected dilation)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def _depths(mask: np.ndarray) -> np.ndarray:
    """Each pixel's layer in mask, counted inwards (1: on its edge; 0: outside), by repeated 4-erosion."""
    depth = np.zeros(mask.shape, dtype=int)
    current, layer = mask, 0
    while current.any():
        layer += 1
        inner = _erode(current)
        depth[current & ~inner] = layer
        current = inner
    return depth


def _dilate8(mask: np.ndarray) -> np.ndarray:
    """mask OR its 8 neighbours (a 3x3 dilation)."""
    grown = _shift_union(mask)
    grown[1:, 1:] |= mask[:-1, :-1]
    grown[1:, :-1] |= mask[:-1, 1:]
    grown[:-1, 1:] |= mask[1:, :-1]
    grown[:-1, :-1] |= mask[1:, 1:]
    return grown


def _erode8(mask: np.ndarray) -> np.ndarray:
    """Pixels of mask whose 8 neighbours are all in it too (a 3x3 erosion; outside the image counts as out)."""
    inner = ~_dilate8(~mask)
    inner[0] = inner[-1] = inner[:, 0] = inner[:, -1] = False
    return inner


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of mask whose 4 neighbours are all in it too (nothing on the image border)."""
    inner = ~_shift_union(~mask)
    inner[0] = inner[-1] = inner[:, 0] = inner[:, -1] = False
    return inner


def _flood(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    region = seed & allowed
    while True:
        grown = _shift_union(region) & allowed
        if (grown == region).all():
            return region
        region = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The biggest 4-connected blob: drops specks that noise or a stray sample lets through."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    while remaining.any():
        seed = np.zeros_like(mask)
        seed[tuple(np.argwhere(remaining)[0])] = True
        blob = _flood(seed, remaining)
        if blob.sum() > best.sum():
            best = blob
        remaining &= ~blob
        if remaining.sum() <= best.sum():
            break
    return best


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """mask plus every background pixel that the image border cannot reach (the inside of an outline)."""
    edge = np.zeros_like(mask)
    edge[0] = edge[-1] = edge[:, 0] = edge[:, -1] = True
    outside = _flood(edge, ~mask)
    return ~outside


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def presence_rates(images: Iterable[Image.Image | np.ndarray | Scores]) -> dict[str, float]:
    """Share of images showing each value: {"colour:red": .., "shape:star": .., "style:outline": .., "none": ..}."""
    scores = [item if isinstance(item, Scores) else score(item) for item in images]
    if not scores:
        raise ValueError("presence_rates needs at least one image")
    counts: Counter[str] = Counter()
    for s in scores:
        if s.shape is None:
            counts["none"] += 1
            continue
        counts[f"colour:{s.colour}"] += 1
        counts[f"shape:{s.shape}"] += 1
        counts[f"style:{s.style}"] += 1
    keys = ["none", *(f"colour:{c}" for c in COLOURS), *(f"shape:{s}" for s in (*ALL_SHAPES, OTHER)),
            *(f"style:{s}" for s in STYLES)]
    return {key: counts[key] / len(scores) for key in keys}


def match_rate(
    images: Iterable[Image.Image | np.ndarray | Scores],
    colour: str | None = None,
    shape: str | None = None,
    style: str | None = None,
) -> float:
    """Share of images whose every given attribute matches (attributes left as None are not checked)."""
    scores = [item if isinstance(item, Scores) else score(item) for item in images]
    if not scores:
        raise ValueError("match_rate needs at least one image")
    wanted = {"colour": colour, "shape": shape, "style": style}
    hits = sum(all(v is None or getattr(s, k) == v for k, v in wanted.items()) for s in scores)
    return hits / len(scores)


def parse_caption(text: str) -> tuple[str, str]:
    """(colour, shape word) of a toy caption `a red circle`; raises ValueError for anything else."""
    words = text.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS:
        raise ValueError(f"not a toy caption: {text!r} (expected 'a COLOUR SHAPE')")
    return words[1], words[2]


# --- Command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlora.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    datasets = sub.add_parser("datasets", help="regenerate the shipped adapter datasets")
    datasets.add_argument("--root", default="datasets", help="folder that holds the dataset folders")
    sample = sub.add_parser("sample", help="write a few example images of the world")
    sample.add_argument("--out", required=True)
    sample.add_argument("--n", type=int, default=16)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--style", default="filled", choices=STYLES)
    sample.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, e.g. circle,star")
    args = parser.parse_args(argv)
    if args.command == "datasets":
        for folder in write_datasets(args.root):
            print(f"wrote {folder} ({len(list(folder.glob('*.png')))} images)")
    else:
        write_dataset(args.out, args.n, args.seed, args.style, tuple(args.shapes.split(",")))
        print(f"wrote {args.n} images to {args.out}")


if __name__ == "__main__":
    main()
