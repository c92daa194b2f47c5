"""The CLEAR mask: the single definition of which (query, key) pairs are computed.

Every backend, the FLOP counter and the patch-parallel runner derive from this module.

Sequence layout (DESIGN.md 1.1)::

    FLUX ("first"):  queries [text] + [image]      keys [text] + [image] + [pooled]
    SD3  ("last"):   queries [image] + [text]      keys [image] + [text] + [pooled]

``[image]`` is the row-major ``h*w`` target grid, followed for FLUX Kontext by the row-major ``hr*wr``
reference grid. Both grids share one coordinate space: token ``(y, x)`` of either grid sits at row ``y``,
column ``x`` (that is how Kontext's ``img_ids`` place them; only their first id differs). ``[pooled]``
holds the ``(h/d)*(w/d)`` pooled tokens of the target grid, then the ``(hr/d)*(wr/d)`` of the reference.

Rule:
    text query  -> every text and image key, no pooled key
    image query -> every text key, every pooled key, and the image keys (of either grid) inside the
                   circular window ``dy^2 + dx^2 < r^2`` around its own coordinates.

So a Kontext target token sees the reference tokens around the same place, and a reference token the
target tokens around it: local correspondence between the two images, at the same cost per token as
one image.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CLEARLayout",
    "TEXT_POSITIONS",
    "check_window_config",
    "in_window",
    "window_row_extents",
    "mask_predicate",
    "dense_mask",
    "attention_density",
]


def in_window(dy, dx, window_size: int):
    """The circular window test on token offsets; works on ints and on tensors (flex ``mask_mod``)."""
    return dy * dy + dx * dx < window_size * window_size


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer (numpy's and torch's too), else None; a bool is no size."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_window_config(window_size: int, down_factor: int = 1) -> tuple[int, int]:
    """``(window_size, down_factor)`` as Python ints (numpy's and torch's integers accepted), or a one-line
    ``ValueError`` unless both are positive integers."""
    r, d = _as_int(window_size), _as_int(down_factor)
    if r is None or r <= 0:
        raise ValueError(f"window_size must be a positive int (a token radius such as 8, 16, 32), got {window_size!r}")
    if d is None or d <= 0:
        raise ValueError(f"down_factor must be a positive int (1 = no pooled tokens), got {down_factor!r}")
    return r, d


TEXT_POSITIONS = ("first", "last")


def _as_grid(name: str, grid: Any) -> tuple[int, int]:
    """``(h, w)`` as a tuple of two positive ints (hashable, so layouts can key caches), or a one-line error."""
    sides = tuple(grid) if isinstance(grid, (tuple, list)) else ()
    h, w = (_as_int(v) for v in sides) if len(sides) == 2 else (None, None)
    if h is None or w is None or h <= 0 or w <= 0:
        raise ValueError(f"{name} must be two positive ints (h, w), got {grid!r}")
    return h, w


def _check_grid(name: str, grid: tuple[int, int], down_factor: int) -> None:
    h, w = grid
    if h % down_factor or w % down_factor:
        raise ValueError(
            f"{name} {h}x{w} is not divisible by down_factor {down_factor}: "
            f"image sizes must be multiples of {16 * down_factor} px"
        )


@dataclass(frozen=True)
class CLEARLayout:
    """Geometry of one CLEAR attention call; hashable, so schedules can be cached by it.

    Args:
        grid: ``(h, w)``, the (target) image token grid (``H/16, W/16`` for FLUX).
        text_len: number of text tokens.
        window_size: radius ``r`` of the circular window, in tokens.
        down_factor: ``d``; for ``d > 1`` the keys/values get ``(h/d)*(w/d)`` pooled tokens per grid.
        text_position: ``"first"`` (FLUX: text before the image) or ``"last"`` (SD3: text after it).
        reference_grid: ``(hr, wr)`` of a reference image that follows the target grid in the sequence
            and shares its coordinate space (FLUX Kontext), or ``None``.
    """

    grid: tuple[int, int]
    text_len: int
    window_size: int
    down_factor: int = 1
    text_position: str = "first"
    reference_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        window_size, down_factor = check_window_config(self.window_size, self.down_factor)
        object.__setattr__(self, "window_size", window_size)
        object.__setattr__(self, "down_factor", down_factor)
        object.__setattr__(self, "grid", _as_grid("grid", self.grid))
        _check_grid("grid", self.grid, self.down_factor)
        if self.reference_grid is not None:
            object.__setattr__(self, "reference_grid", _as_grid("reference_grid", self.reference_grid))
            _check_grid("reference_grid", self.reference_grid, self.down_factor)
        text_len = _as_int(self.text_len)
        if text_len is not None:
            object.__setattr__(self, "text_len", text_len)
        if text_len is None or text_len < 0:
            raise ValueError(f"text_len must be a non-negative int, got {self.text_len!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be 'first' or 'last', got {self.text_position!r}")

    @property
    def image_grids(self) -> tuple[tuple[int, int], ...]:
        """The target grid, then the reference grid if any, in sequence order."""
        return (self.grid,) if self.reference_grid is None else (self.grid, self.reference_grid)

    @property
    def num_image(self) -> int:
        """Image tokens of all grids."""
        return sum(h * w for h, w in self.image_grids)

    @property
    def text_start(self) -> int:
        """Index of the first text token in the query sequence."""
        return 0 if self.text_position == "first" else self.num_image

    @property
    def image_start(self) -> int:
        """Index of the first image token in the query sequence."""
        return self.text_len if self.text_position == "first" else 0

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """Pooled grid of the target image."""
        return (self.grid[0] // self.down_factor, self.grid[1] // self.down_factor)

    @property
    def num_pooled(self) -> int:
        if self.down_factor == 1:
            return 0
        d = self.down_factor
        return sum((h // d) * (w // d) for h, w in self.image_grids)

    @property
    def q_len(self) -> int:
        return self.text_len + self.num_image

    @property
    def kv_len(self) -> int:
        return self.text_len + self.num_image + self.num_pooled

    @property  # not cached_property: its lock (Python < 3.12) is a graph break under torch.compile
    def covers_grid(self) -> bool:
        """True when every image token sees every other one (then CLEAR equals full attention)."""
        h = max(g[0] for g in self.image_grids)
        w = max(g[1] for g in self.image_grids)
        return bool(in_window(h - 1, w - 1, self.window_size))


def window_row_extents(window_size: int) -> list[tuple[int, int]]:
    """``[(dy, half_width)]`` for every row offset of the window: ``|dx| <= half_width`` is inside."""
    return [(dy, _half_width(dy, window_size)) for dy in range(1 - window_size, window_size)]


def _half_width(dy: int, window_size: int) -> int:
    """The largest ``dx`` with ``(dy, dx)`` inside the window, for ``|dy| < window_size`` (where ``dx = 0`` is):
    a bisection on :func:`in_window`, so that a window far wider than any grid costs ``log(r)`` tests a row."""
    inside, outside = 0, window_size
    while outside - inside > 1:
        middle = (inside + outside) // 2
        inside, outside = (middle, outside) if in_window(dy, middle, window_size) else (inside, middle)
    return inside


def mask_predicate(layout: CLEARLayout) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``allowed(q_idx, kv_idx) -> bool tensor`` on broadcastable index tensors (a flex ``mask_mod`` core)."""
    t0, t1 = layout.text_start, layout.text_start + layout.text_len
    i0 = layout.image_start
    q_len, r = layout.q_len, layout.window_size
    w = layout.grid[1]
    n_target = layout.grid[0] * w
    w_ref = layout.reference_grid[1] if layout.reference_grid is not None else w

    def coords(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) of an image token in the shared coordinate space (garbage for other tokens)."""
        img = idx - i0
        if layout.reference_grid is None:
            return img // w, img % w
        ref = img - n_target
        in_target = img < n_target
        return torch.where(in_target, img // w, ref // w_ref), torch.where(in_target, img % w, ref % w_ref)

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_is_text = (q_idx >= t0) & (q_idx < t1)
        k_is_text = (kv_idx >= t0) & (kv_idx < t1)
        k_is_pooled = kv_idx >= q_len
        k_is_image = ~k_is_text & ~k_is_pooled
        (qy, qx), (ky, kx) = coords(q_idx), coords(kv_idx)
        local = in_window(qy - ky, qx - kx, r)
        text_row = q_is_text & ~k_is_pooled
        image_row = ~q_is_text & (k_is_text | k_is_pooled | (k_is_image & local))
        return text_row | image_row

    return allowed


def dense_mask(layout: CLEARLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask ``(q_len, kv_len)``, True where attention is computed. O(seq^2): the oracle only."""
    q = torch.arange(layout.q_len, device=device)[:, None]
    k = torch.arange(layout.kv_len, device=device)[None, :]
    return mask_predicate(layout)(q, k)


def _overlap(n_query: int, n_key: int, offset: int) -> int:
    """``#{q in [0, n_query) : q - offset in [0, n_key)}``: positions of one axis with a key at that offset."""
    return max(0, min(n_query, n_key + offset) - max(0, offset))


def _image_pairs(query_grid: tuple[int, int], key_grid: tuple[int, int], window_size: int) -> int:
    """Exact count of (query, key) pairs inside the window between two grids sharing one coordinate space.

    Only the row and column offsets the grids span count: a window far larger than the grids (``--window 100000``)
    costs what the grids do."""
    (qh, qw), (kh, kw) = query_grid, key_grid
    total = 0
    for dy in range(max(1 - window_size, 1 - kh), min(window_size, qh)):
        half = min(_half_width(dy, window_size), max(qw, kw))
        total += _overlap(qh, kh, dy) * sum(_overlap(qw, kw, dx) for dx in range(-half, half + 1))
    return total


def attention_density(
    grid: tuple[int, int],
    text_len: int,
    window_size: int,
    down_factor: int = 1,
    reference_grid: tuple[int, int] | None = None,
) -> float:
    """Fraction of (query, key) pairs CLEAR computes relative to full attention over text + image.

    ``1 / density`` is the ideal speedup of the attention product (its FLOP ratio). The text position
    does not change it.
    """
    ref = tuple(reference_grid) if reference_grid is not None else None
    layout = CLEARLayout(tuple(grid), text_len, window_size, down_factor, reference_grid=ref)
    t, n = layout.text_len, layout.num_image
    pairs = sum(_image_pairs(a, b, window_size) for a in layout.image_grids for b in layout.image_grids)
    computed = t * (t + n) + n * (t + layout.num_pooled) + pairs
    return computed / float((t + n) ** 2)
