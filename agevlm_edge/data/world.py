"""The synthetic world's vocabulary and renderer: shapes, colours, backgrounds, exact masks.

Each shape is drawn 4x supersampled into its own coverage map and box-filtered down, so the
image is anti-aliased while the instance mask (coverage >= 0.5) stays exact. Objects are
composited back to front; an object's mask is what stays visible after later objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4

# name -> (plural, synonyms). Synonyms appear in captions and feed CHAIR's vocabulary.
CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    "circle": ("circles", ("disc", "disk", "dot")),
    "square": ("squares", ("box",)),
    "triangle": ("triangles", ()),
    "star": ("stars", ()),
    "cross": ("crosses", ("plus",)),
    "heart": ("hearts", ()),
    "ring": ("rings", ("donut", "hoop")),
    "diamond": ("diamonds", ("rhombus",)),
    "hexagon": ("hexagons", ()),
    "arrow": ("arrows", ()),
    "moon": ("moons", ("crescent",)),
    "bar": ("bars", ("stripe",)),
    "pentagon": ("pentagons", ()),
    "trapezoid": ("trapezoids", ()),
}
# Plurals of synonyms, for CHAIR's word matching.
SYNONYM_PLURALS = {"disc": "discs", "disk": "disks", "dot": "dots", "box": "boxes",
                   "plus": "pluses", "donut": "donuts", "hoop": "hoops", "rhombus": "rhombi",
                   "crescent": "crescents", "stripe": "stripes"}
# Look-alike shapes: the `confusable_p` knob places them together.
CONFUSABLE = {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
              "hexagon": "pentagon", "pentagon": "hexagon", "star": "cross", "cross": "star",
              "triangle": "trapezoid", "trapezoid": "triangle"}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "cyan": (40, 205, 215),
}


def vocabulary() -> dict:
    """dataset.json's vocabulary: classes with plural and synonyms, colours."""
    return {
        "classes": {name: {"plural": plural, "synonyms": list(syn),
                           "synonym_plurals": [SYNONYM_PLURALS[s] for s in syn]}
                    for name, (plural, syn) in CLASSES.items()},
        "colours": list(COLOURS),
        "confusable": dict(CONFUSABLE),
    }


def _regular(n: int, phase: float = 0.0, radius: float = 1.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1) * radius


def _star() -> np.ndarray:
    pts = _regular(10, -math.pi / 2)
    pts[1::2] *= 0.45
    return pts


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / np.abs(pts).max()


_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular(4, math.pi / 4) * math.sqrt(2) * 0.85,
    "triangle": _regular(3, -math.pi / 2) * 1.05 + [0, 0.2],
    "star": _star(),
    "cross": np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                       [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]),
    "heart": _heart(),
    "diamond": np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]]),
    "hexagon": _regular(6),
    "arrow": np.array([[-1, -.25], [.15, -.25], [.15, -.65], [1, 0], [.15, .65], [.15, .25],
                       [-1, .25]]),
    "bar": np.array([[-1, -.28], [1, -.28], [1, .28], [-1, .28]]),
    "pentagon": _regular(5, -math.pi / 2),
    "trapezoid": np.array([[-.5, -.6], [.5, -.6], [1, .6], [-1, .6]]),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, c: float, r: float, angle: float,
                jitter: np.ndarray | None) -> None:
    """Draw one shape centred at (c, c) with radius r (supersampled pixels), fill 255."""
    if shape in ("circle", "ring", "moon"):
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        if shape == "ring":
            ri = r * 0.55
            draw.ellipse([c - ri, c - ri, c + ri, c + ri], fill=0)
        elif shape == "moon":
            dx, dy = math.cos(angle) * r * 0.55, math.sin(angle) * r * 0.55
            draw.ellipse([c + dx - r * .9, c + dy - r * .9, c + dx + r * .9, c + dy + r * .9], fill=0)
        return
    pts = _POLYGONS[shape]
    if jitter is not None:
        pts = pts + jitter[: len(pts)]
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    xy = pts @ rot.T * r + c
    draw.polygon([tuple(p) for p in xy.tolist()], fill=255)


def shape_coverage(shape: str, diameter: float, angle: float, jitter: np.ndarray | None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, [S, S] with S = ceil(diameter) + 2."""
    size = int(math.ceil(diameter)) + 2
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    c = size * SUPERSAMPLE / 2
    _draw_shape(ImageDraw.Draw(big), shape, c, diameter * SUPERSAMPLE / 2, angle, jitter)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, size: int, texture: float) -> np.ndarray:
    """A tinted, textured background [H, W, 3] float in 0..255 (pixel noise comes later)."""
    base = rng.uniform(35, 115) + rng.uniform(-12, 12, size=3)
    grid = rng.normal(0, 1, size=(4, 4, 3)).astype(np.float32)
    low = np.stack([np.asarray(Image.fromarray(grid[..., k]).resize((size, size),
                    Image.Resampling.BICUBIC)) for k in range(3)], -1)
    img = base + texture * 80.0 * low
    return img.astype(np.float32)


@dataclass
class Placed:
    """An object to draw: class, colour name, RGB, centre (px), diameter (px), angle."""

    shape: str
    colour: str
    rgb: np.ndarray
    cx: float
    cy: float
    diameter: float
    angle: float
    jitter: np.ndarray | None


def composite(bg: np.ndarray, objects: list[Placed], noise: np.ndarray
              ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Draw objects back to front, then add sensor ``noise`` [H, W, 3].

    Returns the uint8 image, each object's visible mask and its occluded fraction.
    """
    h, w, _ = bg.shape
    img = bg.copy()
    full = []
    for ob in objects:
        cov = shape_coverage(ob.shape, ob.diameter, ob.angle, ob.jitter)
        s = cov.shape[0]
        x0, y0 = int(round(ob.cx - s / 2)), int(round(ob.cy - s / 2))
        canvas = np.zeros((h, w), np.float32)
        # Clip the coverage patch to the image.
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
        canvas[iy0:iy1, ix0:ix1] = cov[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        a = canvas[..., None]
        img = img * (1 - a) + ob.rgb[None, None, :] * a
        full.append(canvas >= 0.5)
    visible, occluded = [], []
    cover = np.zeros((h, w), bool)
    for m in reversed(full):
        vis = m & ~cover
        visible.append(vis)
        occluded.append(1.0 - vis.sum() / max(m.sum(), 1))
        cover |= m
    visible.reverse()
    occluded.reverse()
    return np.clip(img + noise + 0.5, 0, 255).astype(np.uint8), visible, occluded
