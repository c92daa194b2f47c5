"""A small procedural text-to-image world: coloured shapes on a 3x3 grid, with captions that state them.

Every scene is a JSON-serialisable :class:`Scene` (one to three :class:`Shape` s in distinct cells of a 3x3
grid, a background colour and texture) drawn from a seed, with a caption such as
``"a large red circle at the top left on a plain blue background"``. Geometry is stored in fractions of the
image side, so :func:`render` draws the same scene at any resolution (256 px for training, 1024 px to compare
with the high-resolution pipeline). The fidelity benchmark trains a teacher on this world and measures
prompt adherence with ``benchmarks.fidelity.checker``, which reads the same :data:`PALETTE` and geometry.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "KINDS",
    "PALETTE",
    "REGIONS",
    "SIZES",
    "TEXTURES",
    "Scene",
    "Shape",
    "region_box",
    "region_center",
    "render",
    "sample_scene",
    "sample_scenes",
    "shape_polygon",
    "texture_color",
    "world_corpus",
    "write_scenes",
    "read_scenes",
]

#: Colours far apart in RGB so that a pixel's nearest palette entry is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "cyan": (40, 200, 220),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
KINDS = ("circle", "square", "triangle", "star")
#: Region names, row-major over the 3x3 grid (row 0 is the top).
REGIONS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
#: Circumradius of a shape in fractions of the image side; a cell is 1/3 wide.
SIZES = {"small": 0.08, "large": 0.14}
TEXTURES = ("plain", "striped", "dotted", "checkered")
# Largest offset of a shape's centre from its cell's centre that keeps it (and its anti-aliased edge) inside.
_MARGIN = 0.02
_SUPERSAMPLE = 2
_TEXTURE_PERIOD = 1 / 12


@dataclass(frozen=True)
class Shape:
    """One shape: ``kind`` in :data:`KINDS`, ``color`` in :data:`PALETTE`, ``region`` in :data:`REGIONS`,
    ``size`` in :data:`SIZES`, and its centre ``(x, y)`` in fractions of the image side (inside its region)."""

    kind: str
    color: str
    region: str
    size: str
    center: tuple[float, float]

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("color", self.color, PALETTE),
            ("region", self.region, REGIONS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"shape {name} {value!r} is not one of {', '.join(allowed)}")
        center = tuple(self.center) if isinstance(self.center, (tuple, list)) else ()
        if len(center) != 2:
            raise ValueError(f"shape center must be two numbers (x, y), got {self.center!r}")
        x, y = float(center[0]), float(center[1])
        x0, y0, x1, y1 = region_box(self.region)
        if not (x0 <= x <= x1 and y0 <= y <= y1):  # else the caption's "at the <region>" would be false
            raise ValueError(f"shape center ({x:g}, {y:g}) is outside its region {self.region!r}")
        object.__setattr__(self, "center", (x, y))

    @property
    def radius(self) -> float:
        """Circumradius in fractions of the image side."""
        return SIZES[self.size]

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.kind} at the {self.region}"


@dataclass(frozen=True)
class Scene:
    """A scene description: shapes in distinct regions on a textured background of a palette colour."""

    shapes: tuple[Shape, ...]
    background: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(s if isinstance(s, Shape) else Shape(**s) for s in self.shapes))
        if self.background not in PALETTE:
            raise ValueError(f"background {self.background!r} is not one of {', '.join(PALETTE)}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture {self.texture!r} is not one of {', '.join(TEXTURES)}")
        if not self.shapes:
            raise ValueError("a scene needs at least one shape")
        regions = [s.region for s in self.shapes]
        if len(set(regions)) != len(regions):
            raise ValueError(f"shapes must be in distinct regions, got {regions}")
        if any(s.color == self.background for s in self.shapes):
            raise ValueError("a shape cannot have the background colour")

    @property
    def caption(self) -> str:
        """E.g. ``"a large red circle at the top left and a small cyan star at the center on a plain blue
        background"``."""
        phrases = [s.phrase for s in self.shapes]
        joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return f"{joined} on a {self.texture} {self.background} background"

    def to_dict(self) -> dict:
        return {
            "shapes": [asdict(s) | {"center": list(s.center)} for s in self.shapes],
            "background": self.background,
            "texture": self.texture,
            "caption": self.caption,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of :meth:`to_dict` (the ``caption`` key, if present, is checked, not trusted)."""
        scene = cls(
            shapes=tuple(Shape(**s) for s in data["shapes"]),
            background=data["background"],
            texture=data.get("texture", "plain"),
        )
        if "caption" in data and data["caption"] != scene.caption:
            raise ValueError(f"caption {data['caption']!r} does not match its scene ({scene.caption!r})")
        return scene


def region_box(region: str) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a region in fractions of the image side."""
    row, col = divmod(REGIONS.index(region), 3)
    return col / 3, row / 3, (col + 1) / 3, (row + 1) / 3


def region_center(region: str) -> tuple[float, float]:
    """``(x, y)`` of a region's centre in fractions of the image side."""
    x0, y0, x1, y1 = region_box(region)
    return (x0 + x1) / 2, (y0 + y1) / 2


def sample_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    """Draw one scene: 1..max_shapes shapes in distinct regions, uniform over every attribute."""
    if not 1 <= max_shapes <= len(REGIONS):
        raise ValueError(f"max_shapes must be in 1..{len(REGIONS)}, got {max_shapes}")
    colors = list(PALETTE)
    background = rng.choice(colors)
    texture = rng.choice(TEXTURES)
    shapes = []
    for region in rng.sample(REGIONS, rng.randint(1, max_shapes)):
        size = rng.choice(list(SIZES))
        (cx, cy), slack = region_center(region), 1 / 6 - SIZES[size] - _MARGIN
        center = (cx + rng.uniform(-slack, slack), cy + rng.uniform(-slack, slack))
        kind = rng.choice(KINDS)
        color = rng.choice([c for c in colors if c != background])
        shapes.append(Shape(kind=kind, color=color, region=region, size=size, center=center))
    return Scene(shapes=tuple(shapes), background=background, texture=texture)


def sample_scenes(num: int, seed: int, max_shapes: int = 3) -> list[Scene]:
    """``num`` scenes; scene ``i`` depends only on ``(seed, i)``, so a longer list extends a shorter one."""
    return [sample_scene(random.Random(f"clear-dit-world/{seed}/{i}"), max_shapes) for i in range(num)]


def shape_polygon(kind: str, center: tuple[float, float], radius: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (y grows downwards; triangle and star point up); None for a circle."""
    cx, cy = center
    if kind == "circle":
        return None
    if kind == "square":
        half = 0.8 * radius
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if kind == "triangle":
        angles = [-90 + 120 * i for i in range(3)]
        return [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]
    if kind == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else 0.4 * radius
            a = math.radians(-90 + 36 * i)
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return points
    raise ValueError(f"shape kind {kind!r} is not one of {', '.join(KINDS)}")


def texture_color(background: str) -> tuple[int, int, int]:
    """The shade textures are drawn in: the background colour moved a quarter of the way to black or white."""
    rgb = PALETTE[background]
    target = 0 if sum(rgb) > 384 else 255
    return tuple(round(c + 0.25 * (target - c)) for c in rgb)


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, side: int, color: tuple[int, int, int]) -> None:
    period = _TEXTURE_PERIOD * side
    count = math.ceil(1 / _TEXTURE_PERIOD) + 1
    if texture == "striped":  # diagonal bands, half a period wide
        for i in range(-count, count + 1):
            x = i * period
            draw.polygon([(x, 0), (x + period / 2, 0), (x + period / 2 + side, side), (x + side, side)], fill=color)
    elif texture == "dotted":
        r = period / 5
        for i in range(count):
            for j in range(count):
                cx, cy = (i + 0.5) * period, (j + 0.5) * period
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif texture == "checkered":
        cell = 1.5 * period
        for i in range(math.ceil(side / cell)):
            for j in range(math.ceil(side / cell)):
                if (i + j) % 2:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=color)


def render(scene: Scene, size: int = 256) -> Image.Image:
    """Draw ``scene`` as a ``size x size`` RGB image (anti-aliased by drawing at twice the size and averaging)."""
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    side = size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene.texture, side, texture_color(scene.background))
    for shape in scene.shapes:
        color = PALETTE[shape.color]
        polygon = shape_polygon(shape.kind, shape.center, shape.radius)
        if polygon is None:
            (cx, cy), r = shape.center, shape.radius
            draw.ellipse([(cx - r) * side, (cy - r) * side, (cx + r) * side, (cy + r) * side], fill=color)
        else:
            draw.polygon([(x * side, y * side) for x, y in polygon], fill=color)
    return image.resize((size, size), Image.Resampling.BOX)


def world_corpus() -> list[str]:
    """Text covering the world's whole vocabulary, for training the teacher's tokenizers."""
    lines = [
        f"a {size} {color} {kind} at the {region}"
        for size in SIZES
        for color in PALETTE
        for kind in KINDS
        for region in REGIONS
    ]
    lines += [f"{a} and {b}" for a, b in zip(lines[::7], lines[3::7], strict=False)]
    lines += [f"on a {t} {c} background" for t in TEXTURES for c in PALETTE]
    return lines


def write_scenes(scenes: list[Scene], path: str | Path) -> None:
    """Write scenes as JSON lines (one :meth:`Scene.to_dict` per line, caption included)."""
    Path(path).write_text("".join(json.dumps(s.to_dict()) + "\n" for s in scenes))


def read_scenes(path: str | Path) -> list[Scene]:
    """Read scenes written by :func:`write_scenes`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene file {path} does not exist")
    return list(_iter_scenes(path))


def _iter_scenes(path: Path) -> Iterator[Scene]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield Scene.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a scene ({error})") from None
