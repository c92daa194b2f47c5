"""Scene checker: does an image show what its scene description states? (prompt adherence by pixel analysis)

The image is resized to :data:`CHECK_SIZE` px, every pixel is labelled with its nearest colour of the world's
palette (texture shades count as their base colour; pixels far from every entry are "unknown"), and the
label map is split into 4-connected components. Each stated shape is then looked for: a component of its
colour whose centroid lies in its region, whose kind (nearest prototype in fill ratio / top-half mass /
aspect ratio) and size (bounding-box extent) match. Prototypes are measured on the world's own renders, so
checker and renderer cannot drift apart. Deterministic: no randomness, no learned weights.

Score of a scene = fraction of satisfied items: one per stated shape, one for the background colour (the
most frequent label), one for "no extra shapes" (no unmatched solid component of a non-background colour).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.world import KINDS, PALETTE, SIZES, Scene, Shape, region_box, render, texture_color

__all__ = ["CHECK_SIZE", "SceneCheck", "ShapeCheck", "check_scene", "label_image"]

CHECK_SIZE = 128
_COLORS = list(PALETTE)
_UNKNOWN = 255
# A pixel farther than this (RGB Euclidean) from every palette colour and texture shade is unknown.
_MAX_COLOR_DISTANCE = 100.0
# A stated shape is "found" if its component has at least this fraction of the smallest shape's area at
# the stated size; a solid unmatched component at least this fraction of the smallest small shape is an extra.
_FOUND_FRACTION = 0.3
_EXTRA_FRACTION = 0.5


@dataclass(frozen=True)
class _Component:
    label: int
    area: int
    solid: int  # pixels whose 4 neighbours share the label: zero for the 1-px anti-aliasing rings
    centroid: tuple[float, float]  # (x, y) in fractions of the image side
    extent: float  # max(width, height) of the bounding box in fractions of the image side
    features: tuple[float, float, float]  # fill ratio, fraction of area in the bbox's upper half, width/height


@dataclass(frozen=True)
class ShapeCheck:
    """The verdict on one stated shape: ``found`` (its colour in its region), the kind and size seen there."""

    shape: Shape
    found: bool
    kind: str | None
    size: str | None

    @property
    def ok(self) -> bool:
        return self.found and self.kind == self.shape.kind and self.size == self.shape.size


@dataclass(frozen=True)
class SceneCheck:
    """The verdict on a scene; ``score`` in [0, 1], ``passed`` when every item is satisfied."""

    shapes: tuple[ShapeCheck, ...]
    background: str | None
    background_ok: bool
    extras: int

    @property
    def score(self) -> float:
        items = [s.ok for s in self.shapes] + [self.background_ok, self.extras == 0]
        return sum(items) / len(items)

    @property
    def passed(self) -> bool:
        return self.score == 1.0

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "passed": self.passed,
            "background": self.background,
            "background_ok": self.background_ok,
            "extras": self.extras,
            "shapes": [
                {"stated": s.shape.phrase, "found": s.found, "kind": s.kind, "size": s.size, "ok": s.ok}
                for s in self.shapes
            ],
        }


@functools.cache
def _palette_table() -> tuple[np.ndarray, np.ndarray]:
    """Reference colours ``(n, 3)`` and the palette label of each (base colours, then their texture shades)."""
    colors = [PALETTE[c] for c in _COLORS] + [texture_color(c) for c in _COLORS]
    labels = list(range(len(_COLORS))) * 2
    return np.asarray(colors, dtype=np.float32), np.asarray(labels, dtype=np.uint8)


def label_image(image: Image.Image | np.ndarray) -> np.ndarray:
    """Palette labels ``(CHECK_SIZE, CHECK_SIZE)`` uint8 (index into PALETTE's order, 255 = unknown)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be (height, width, 3) uint8, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if image.width != image.height:
        raise ValueError(f"images of the world are square, got {image.width}x{image.height}")
    pixels = np.asarray(image.convert("RGB").resize((CHECK_SIZE, CHECK_SIZE), Image.Resampling.BOX))
    reference, labels = _palette_table()
    distance = ((pixels[:, :, None, :].astype(np.float32) - reference) ** 2).sum(-1)
    nearest = distance.argmin(-1)
    out = labels[nearest]
    out[np.take_along_axis(distance, nearest[..., None], -1)[..., 0] > _MAX_COLOR_DISTANCE**2] = _UNKNOWN
    return out


def _connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal labels: ``(h, w)`` int64 ids (the largest flat index in the component).

    Min-label propagation to neighbours plus pointer jumping; converges in a few dozen vectorised passes.
    """
    h, w = labels.shape
    comp = np.arange(h * w, dtype=np.int64).reshape(h, w)
    same_v = labels[1:, :] == labels[:-1, :]
    same_h = labels[:, 1:] == labels[:, :-1]
    while True:
        new = comp.copy()
        np.maximum(new[1:, :], np.where(same_v, comp[:-1, :], -1), out=new[1:, :])
        np.maximum(new[:-1, :], np.where(same_v, comp[1:, :], -1), out=new[:-1, :])
        np.maximum(new[:, 1:], np.where(same_h, comp[:, :-1], -1), out=new[:, 1:])
        np.maximum(new[:, :-1], np.where(same_h, comp[:, 1:], -1), out=new[:, :-1])
        new = new.reshape(-1)[new]  # jump: take the id of the pixel whose index is my id
        if np.array_equal(new, comp):
            return comp
        comp = new


def _components(labels: np.ndarray, min_area: int) -> list[_Component]:
    comp = _connected_components(labels)
    padded = np.pad(labels, 1, mode="edge")
    solid = (
        (padded[:-2, 1:-1] == labels)
        & (padded[2:, 1:-1] == labels)
        & (padded[1:-1, :-2] == labels)
        & (padded[1:-1, 2:] == labels)
    )
    ids, inverse, areas = np.unique(comp, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(comp.shape)
    side = labels.shape[0]
    out = []
    for index in np.flatnonzero(areas >= min_area):
        label = int(labels.flat[ids[index]])
        if label == _UNKNOWN:
            continue
        ys, xs = np.nonzero(inverse == index)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        height, width = y1 - y0, x1 - x0
        area = int(areas[index])
        top = np.count_nonzero(ys < y0 + height / 2) / area
        features = (area / (height * width), top, width / height)
        out.append(
            _Component(
                label=label,
                area=area,
                solid=int(np.count_nonzero(solid[ys, xs])),
                centroid=((xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side),
                extent=max(height, width) / side,
                features=features,
            )
        )
    return out


@functools.cache
def _prototypes() -> dict[tuple[str, str], _Component]:
    """The component of each (kind, size), measured on a render of it alone at the centre."""
    out = {}
    for kind in KINDS:
        for size in SIZES:
            shape = Shape(kind=kind, color="red", region="center", size=size, center=(0.5, 0.5))
            labels = label_image(render(Scene(shapes=(shape,), background="blue"), 2 * CHECK_SIZE))
            (component,) = [c for c in _components(labels, 4) if c.label == _COLORS.index("red")]
            out[kind, size] = component
    return out


def _classify_kind(component: _Component) -> str:
    # The three features are fractions of order one; the top-half mass separates triangle from star best.
    weights = (1.0, 2.0, 0.5)
    protos = _prototypes()

    def distance(kind: str) -> float:
        return min(
            sum(w * (a - b) ** 2 for w, a, b in zip(weights, component.features, protos[kind, s].features, strict=True))
            for s in SIZES
        )

    return min(KINDS, key=distance)


def _classify_size(component: _Component, kind: str) -> str:
    protos = _prototypes()
    return min(SIZES, key=lambda s: abs(math.log(component.extent / protos[kind, s].extent)))


def _in_region(point: tuple[float, float], region: str) -> bool:
    x0, y0, x1, y1 = region_box(region)
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def check_scene(image: Image.Image | np.ndarray, scene: Scene) -> SceneCheck:
    """Check every statement of ``scene`` against ``image`` (any square size, RGB)."""
    labels = label_image(image)
    protos = _prototypes()
    smallest = {size: min(protos[k, size].area for k in KINDS) for size in SIZES}
    components = _components(labels, min_area=max(1, int(_FOUND_FRACTION * min(smallest.values()))))
    matched: set[int] = set()
    checks = []
    for shape in scene.shapes:
        label = _COLORS.index(shape.color)
        candidates = [
            i
            for i, c in enumerate(components)
            if c.label == label
            and i not in matched
            and c.area >= _FOUND_FRACTION * smallest[shape.size]
            and _in_region(c.centroid, shape.region)
        ]
        if not candidates:
            checks.append(ShapeCheck(shape=shape, found=False, kind=None, size=None))
            continue
        best = max(candidates, key=lambda i: components[i].area)
        matched.add(best)
        kind = _classify_kind(components[best])
        checks.append(ShapeCheck(shape=shape, found=True, kind=kind, size=_classify_size(components[best], kind)))
    known = labels[labels != _UNKNOWN]
    background = _COLORS[int(np.bincount(known, minlength=len(_COLORS)).argmax())] if known.size else None
    background_label = _COLORS.index(scene.background)
    extras = sum(
        1
        for i, c in enumerate(components)
        if i not in matched and c.label != background_label and c.solid >= _EXTRA_FRACTION * smallest["small"]
    )
    return SceneCheck(
        shapes=tuple(checks), background=background, background_ok=background == scene.background, extras=extras
    )
