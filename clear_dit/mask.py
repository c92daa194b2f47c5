"""The CLEAR mask: the single definition of which (query, key) pairs are computed.

Every backend, the FLOP counter and the patch-parallel runner derive from this module.

Sequence layout (FLUX order, DESIGN.md 1.1)::

    queries: [text_len text tokens] + [h*w image tokens, row-major]
    keys:    [text_len text tokens] + [h*w image tokens, row-major] + [(h/d)*(w/d) pooled tokens]

Rule:
    text query  -> every text and image key, no pooled key
    image query -> every text key, every pooled key, and the image keys inside the circular
                   window ``dy^2 + dx^2 < r^2`` around itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = [
    "CLEARLayout",
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


def check_window_config(window_size: int, down_factor: int = 1) -> None:
    """Raise a one-line ``ValueError`` unless radius and down factor are positive ints."""
    if not isinstance(window_size, int) or window_size <= 0:
        raise ValueError(f"window_size must be a positive int (a token radius such as 8, 16, 32), got {window_size!r}")
    if not isinstance(down_factor, int) or down_factor <= 0:
        raise ValueError(f"down_factor must be a positive int (1 = no pooled tokens), got {down_factor!r}")


@dataclass(frozen=True)
class CLEARLayout:
    """Geometry of one CLEAR attention call; hashable, so schedules can be cached by it.

    Args:
        grid: ``(h, w)``, the image token grid (``H/16, W/16`` for FLUX).
        text_len: number of text tokens at the start of the sequence.
        window_size: radius ``r`` of the circular window, in tokens.
        down_factor: ``d``; for ``d > 1`` the keys/values get ``(h/d)*(w/d)`` pooled tokens.
    """

    grid: tuple[int, int]
    text_len: int
    window_size: int
    down_factor: int = 1

    def __post_init__(self) -> None:
        h, w = self.grid
        if not (isinstance(h, int) and isinstance(w, int)) or h <= 0 or w <= 0:
            raise ValueError(f"grid must be two positive ints (h, w), got {self.grid!r}")
        check_window_config(self.window_size, self.down_factor)
        if h % self.down_factor or w % self.down_factor:
            raise ValueError(
                f"grid {h}x{w} is not divisible by down_factor {self.down_factor}: "
                f"image sizes must be multiples of {16 * self.down_factor} px"
            )
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"text_len must be a non-negative int, got {self.text_len!r}")

    @property
    def num_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pooled_grid(self) -> tuple[int, int]:
        return (self.grid[0] // self.down_factor, self.grid[1] // self.down_factor)

    @property
    def num_pooled(self) -> int:
        if self.down_factor == 1:
            return 0
        hp, wp = self.pooled_grid
        return hp * wp

    @property
    def q_len(self) -> int:
        return self.text_len + self.num_image

    @property
    def kv_len(self) -> int:
        return self.text_len + self.num_image + self.num_pooled

    @cached_property
    def covers_grid(self) -> bool:
        """True when every image token sees every other one (then CLEAR equals full attention)."""
        h, w = self.grid
        return bool(in_window(h - 1, w - 1, self.window_size))


def window_row_extents(window_size: int) -> list[tuple[int, int]]:
    """``[(dy, half_width)]`` for every row offset of the window: ``|dx| <= half_width`` is inside."""
    r = window_size
    rows = []
    for dy in range(-(r - 1), r):
        half = 0
        while in_window(dy, half + 1, r):
            half += 1
        rows.append((dy, half))
    return rows


def mask_predicate(layout: CLEARLayout) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``allowed(q_idx, kv_idx) -> bool tensor`` on broadcastable index tensors (a flex ``mask_mod`` core)."""
    t, w = layout.text_len, layout.grid[1]
    n_img = layout.num_image
    r = layout.window_size

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_img = q_idx - t
        k_img = kv_idx - t
        q_is_text = q_idx < t
        k_is_text = kv_idx < t
        k_is_image = (kv_idx >= t) & (k_img < n_img)
        k_is_pooled = k_img >= n_img
        local = in_window(q_img // w - k_img // w, q_img % w - k_img % w, r)
        text_row = q_is_text & ~k_is_pooled
        image_row = ~q_is_text & (k_is_text | k_is_pooled | (k_is_image & local))
        return text_row | image_row

    return allowed


def dense_mask(layout: CLEARLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask ``(q_len, kv_len)``, True where attention is computed. O(seq^2): the oracle only."""
    q = torch.arange(layout.q_len, device=device)[:, None]
    k = torch.arange(layout.kv_len, device=device)[None, :]
    return mask_predicate(layout)(q, k)


def _image_pairs(grid: tuple[int, int], window_size: int) -> int:
    """Exact count of (image query, image key) pairs inside the window, clipped to the grid."""
    h, w = grid
    total = 0
    for dy, half in window_row_extents(window_size):
        rows = h - abs(dy)
        if rows <= 0:
            continue
        for dx in range(-half, half + 1):
            total += rows * max(w - abs(dx), 0)
    return total


def attention_density(grid: tuple[int, int], text_len: int, window_size: int, down_factor: int = 1) -> float:
    """Fraction of (query, key) pairs CLEAR computes relative to full attention over text + image.

    ``1 / density`` is the ideal speedup of the attention product (its FLOP ratio).
    """
    layout = CLEARLayout(tuple(grid), text_len, window_size, down_factor)
    t, n = layout.text_len, layout.num_image
    computed = t * (t + n) + n * (t + layout.num_pooled) + _image_pairs(layout.grid, window_size)
    return computed / float((t + n) ** 2)
