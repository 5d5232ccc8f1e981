"""The toy scorer against hard negatives: images drawn here, with this file's own drawing code (not the
world's renderer), at the toy model's 32 px, jittered in position, size, rotation and colour, and
softened and grained like generated samples.

Positives: every shape filled and outlined, outlines with a 1-2 px gap, and
stars with one arm a short stub. Hard negatives: pentagons (sharp and rounded) and squat 4-point
stars (not stars, and not any of the world's shapes), filled shapes whose middle is pale or mottled
(not outlines), and triangles with sides bowed in a little (still triangles, as the independent
count had them). The scorer must be right on at least 95% of the images of every class, per
attribute (star yes/no, outline yes/no, shape).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdlora import toy

SIZE = 32
SS = 4  # supersampling
PER_CLASS = 100
OTHER = "other"  # what the scorer calls a shape that is none of the world's shapes


def _jitter_colour(rng, rgb, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _regular(n, radius, rotation=0.0, inner=None, squash=1.0):
    """Vertices (unit-centred) of a regular n-gon, or of an n-point star with inner radius `inner` x radius."""
    points = []
    steps = 2 * n if inner else n
    for k in range(steps):
        r = radius * (inner if inner and k % 2 else 1.0)
        angle = math.radians(-90 + 360 * k / steps) + rotation
        points.append((r * math.cos(angle), r * math.sin(angle) * squash))
    return points


def _concave_triangle(radius, depth, rotation=0.0, segments=8):
    """An equilateral triangle whose sides bow inward: each side's middle is pulled towards the centre by
    `depth` x the inradius (a quadratic curve through the two corners)."""
    corners = _regular(3, radius, rotation)
    inradius = radius / 2
    points = []
    for a, b in zip(corners, corners[1:] + corners[:1]):
        mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
        norm = math.hypot(*mid)
        control = (mid[0] - mid[0] / norm * 2 * depth * inradius, mid[1] - mid[1] / norm * 2 * depth * inradius)
        for i in range(segments):
            t = i / segments
            points.append(((1 - t) ** 2 * a[0] + 2 * t * (1 - t) * control[0] + t * t * b[0],
                           (1 - t) ** 2 * a[1] + 2 * t * (1 - t) * control[1] + t * t * b[1]))
    return points


def _outline_of(kind, params):
    """Vertices of a polygon kind, or None for a circle."""
    return None if kind == "circle" else params


def _shape_points(rng, kind, extent):
    """(polygon vertices around 0,0, or None for a circle; the inradius used to inset an outline)."""
    rotation = math.radians(rng.uniform(-8, 8))
    if kind == "circle":
        return None, extent / 2
    if kind == "square":
        half = extent * 0.85 / 2
        r = half * math.sqrt(2)
        return _regular(4, r, rotation + math.radians(45 - 90) + math.radians(90)), half
    if kind == "triangle":
        r = extent / math.sqrt(3)
        return _regular(3, r, rotation), r / 2
    if kind == "star":
        r = extent / 2 / math.sin(math.radians(72))
        inner = rng.uniform(0.40, 0.50)
        edge = math.dist(*_regular(5, r, 0, inner)[:2])
        return _regular(5, r, rotation, inner), r * r * inner * math.sin(math.radians(36)) / edge
    if kind == "pentagon":
        r = extent / 2 / math.sin(math.radians(72))
        return _regular(5, r, rotation), r * math.cos(math.radians(36))
    if kind == "stub-star":  # one arm a short stub, as blurred generated stars often have
        r = extent / 2 / math.sin(math.radians(72))
        inner = rng.uniform(0.40, 0.50)
        points = _regular(5, r, rotation, inner)
        stub = 2 * int(rng.integers(5))
        points[stub] = tuple(c * rng.uniform(0.6, 0.8) for c in points[stub])
        return points, r * inner * 0.6
    if kind == "round-pentagon":  # a pentagon with rounded corners: halfway to a circle, as generated
        r = extent / 2
        roundness = rng.uniform(0.2, 0.5)
        points = []
        for k in range(60):
            angle = 2 * math.pi * k / 60
            wedge = (angle - rotation) % (2 * math.pi / 5) - math.pi / 5
            radius = r * ((1 - roundness) * math.cos(math.pi / 5) / math.cos(wedge) + roundness * 0.9)
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return points, r * 0.8
    if kind == "squat4":
        r = extent / 2
        inner = rng.uniform(0.35, 0.55)
        turn = rotation + (math.radians(45) if rng.random() < 0.5 else 0.0)
        return _regular(4, r, turn, inner, squash=rng.uniform(0.65, 0.9)), r * inner * 0.6
    if kind == "concave-triangle":  # sides bowed in a little, as the character adapter draws triangles
        r = extent / math.sqrt(3)
        return _concave_triangle(r, rng.uniform(0.1, 0.25), rotation), r / 2
    raise ValueError(kind)


def _draw_shape(draw, points, cx, cy, radius, fill, scale=1.0):
    if points is None:
        r = radius * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + x * scale, cy + y * scale) for x, y in points], fill=fill)


def draw(rng: np.random.Generator, kind: str, variant: str = "filled") -> Image.Image:
    """One 32 px image: `kind` (a world shape, pentagon, squat4, concave-triangle) drawn `variant`
    (filled, outline, gap: an outline cut by a 1-2 px gap, pale: a pale middle, mottled: a noisy middle)."""
    big = SIZE * SS
    background = _jitter_colour(rng, toy.BACKGROUND, 6)
    colour = _jitter_colour(rng, toy.COLOURS[list(toy.COLOURS)[int(rng.integers(4))]])
    # Stars no smaller than the character dataset's (half the image): a smaller outlined star's hole is
    # a pixel or two, which blur fills.
    extent_frac = rng.uniform(0.5 if kind == "star" else 0.45, 0.75)
    extent = extent_frac * big
    margin = 0.08 * big
    cx = rng.uniform(extent / 2 + margin, big - extent / 2 - margin)
    cy = rng.uniform(extent / 2 + margin, big - extent / 2 - margin)
    points, inradius = _shape_points(rng, kind, extent)
    image = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(image)
    _draw_shape(d, points, cx, cy, extent / 2, colour)
    if variant in ("outline", "gap", "pale", "mottled"):
        width = max(0.11 * extent, 2.0 * SS) * rng.uniform(0.9, 1.25)
        if variant in ("pale", "mottled"):
            width *= rng.uniform(1.0, 1.6)  # thick rims, like the samples that fooled the old scorer
        scale = max(inradius - width, 0.0) / inradius
        hole = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(hole), points, cx, cy, extent / 2, 255, scale)
        hole_mask = np.asarray(hole) > 0
        pixels = np.asarray(image, dtype=np.float64).copy()
        bg, fg = np.array(background, float), np.array(colour, float)
        if variant in ("outline", "gap"):
            pixels[hole_mask] = bg
        elif variant == "pale":
            # A pale wash of the colour (a quarter to 60% of it), a little uneven.
            amount = rng.uniform(0.25, 0.6) + rng.normal(0, 0.06, (SIZE, SIZE)).repeat(SS, 0).repeat(SS, 1)
            mix = np.clip(amount, 0, 1)[..., None]
            pixels = np.where(hole_mask[..., None], bg + (fg - bg) * mix, pixels)
        else:
            # Blotches of colour and background, 1-2 px across.
            cell = int(rng.integers(1, 3))
            n = SIZE // cell + 1
            blotch = rng.uniform(0.0, 0.9, (n, n)).repeat(cell * SS, 0).repeat(cell * SS, 1)[:big, :big]
            pixels = np.where(hole_mask[..., None], bg + (fg - bg) * blotch[..., None], pixels)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
        if variant == "gap":
            # Cut the stroke with a 1-2 px gap: a line from the centre out through the rim.
            d = ImageDraw.Draw(image)
            angle = rng.uniform(0, 2 * math.pi)
            reach = extent * 0.8
            gap = int(rng.integers(1, 3)) * SS
            d.line([(cx, cy), (cx + reach * math.cos(angle), cy + reach * math.sin(angle))], fill=background,
                   width=gap)
    small = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    small = small.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.75)))
    pixels = np.asarray(small, dtype=np.float64) + rng.normal(0, rng.uniform(2, 7), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


# (kind, variant) -> what a strict scorer must read: (star, outline, shape)
CLASSES: dict[tuple[str, str], tuple[bool, bool, str]] = {}
for _shape in toy.ALL_SHAPES:
    CLASSES[_shape, "filled"] = (_shape == toy.STAR, False, _shape)
    CLASSES[_shape, "outline"] = (_shape == toy.STAR, True, _shape)
    CLASSES[_shape, "gap"] = (_shape == toy.STAR, True, _shape)
for _shape in toy.SHAPES:  # the pale and mottled middles: thick filled shapes, not outlines
    CLASSES[_shape, "pale"] = (False, False, _shape)
    CLASSES[_shape, "mottled"] = (False, False, _shape)
CLASSES["pentagon", "filled"] = (False, False, OTHER)
CLASSES["round-pentagon", "filled"] = (False, False, OTHER)
CLASSES["stub-star", "filled"] = (True, False, toy.STAR)
CLASSES["squat4", "filled"] = (False, False, OTHER)
CLASSES["concave-triangle", "filled"] = (False, False, "triangle")


def class_accuracy(scorer, kind: str, variant: str, n: int = PER_CLASS, seed: int = 0) -> dict[str, float]:
    """Share of n images of one class on which `scorer` reads each attribute right."""
    star, outline, shape = CLASSES[kind, variant]
    rng = np.random.default_rng([seed, list(CLASSES).index((kind, variant))])
    right = {"star": 0, "outline": 0, "shape": 0}
    for _ in range(n):
        s = scorer(draw(rng, kind, variant))
        right["star"] += s.star == star
        right["outline"] += s.outline == outline
        right["shape"] += s.shape == shape
    return {key: value / n for key, value in right.items()}


@pytest.mark.parametrize("kind,variant", list(CLASSES), ids=[f"{k}-{v}" for k, v in CLASSES])
def test_scorer_on_positives_and_hard_negatives(kind, variant):
    result = class_accuracy(toy.score, kind, variant)
    assert min(result.values()) >= 0.95, result
