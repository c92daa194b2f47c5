"""An independent oracle for the CLEAR mask: the documented rule written as plain loops, and a way to run
diffusers' own (unpatched) attention processors under that mask."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def brute_force_mask(
    text_len: int,
    grids: list[tuple[int, int]],
    window_size: int,
    down_factor: int = 1,
    text_position: str = "first",
) -> torch.Tensor:
    """``(q_len, kv_len)`` bool mask from the rule in clear_dit/mask.py's docstring, token by token.

    ``grids``: the target grid, then (Kontext) the reference grid; all share one coordinate space.
    """
    image = [(y, x) for h, w in grids for y in range(h) for x in range(w)]
    text = [None] * text_len
    queries = text + image if text_position == "first" else image + text
    d = down_factor
    pooled = ["pooled"] * (sum((h // d) * (w // d) for h, w in grids) if d > 1 else 0)
    keys = queries + pooled
    mask = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for i, q in enumerate(queries):
        for j, k in enumerate(keys):
            if q is None:  # text query: everything but pooled tokens
                mask[i, j] = k != "pooled"
            elif k is None or k == "pooled":
                mask[i, j] = True
            else:
                mask[i, j] = (q[0] - k[0]) ** 2 + (q[1] - k[1]) ** 2 < window_size**2
    return mask


@contextmanager
def diffusers_attention_under_mask(
    grids: list[tuple[int, int]],
    window_size: int,
    text_position: str,
    scale=None,
    down_factor: int = 1,
    spatial_weight: torch.Tensor | None = None,
) -> Iterator[None]:
    """Every unmasked SDPA call (diffusers' own FLUX/SD3 processors) gets the brute-force CLEAR mask, and the
    softmax scale ``scale(seq_len, head_dim)`` if given.

    The text length of each call is its sequence length minus the image tokens (0 in SD3.5's ``attn2``). With
    ``down_factor`` d > 1 (one grid, text first), the keys and values SDPA receives (after qk-norm and RoPE) get
    their d x d pooled tokens appended, weighted by ``spatial_weight`` ``(d, d)``.
    """
    assert down_factor == 1 or (len(grids) == 1 and text_position == "first")
    original = F.scaled_dot_product_attention
    n_image = sum(h * w for h, w in grids)
    cache: dict[int, torch.Tensor] = {}

    def pooled(x: torch.Tensor, text_len: int) -> torch.Tensor:  # x: (batch, heads, seq, head_dim)
        (h, w), d = grids[0], down_factor
        image = x[:, :, text_len:].unflatten(2, (h // d, d, w // d, d))
        return torch.einsum("bhyixjc,ij->bhyxc", image, spatial_weight).flatten(2, 3)

    def masked(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is None:
            seq = query.shape[-2]
            if seq not in cache:
                cache[seq] = brute_force_mask(seq - n_image, grids, window_size, down_factor, text_position)
            attn_mask = cache[seq].to(query.device)
            if down_factor > 1:
                key, value = (torch.cat([x, pooled(x, seq - n_image)], dim=2) for x in (key, value))
            if scale is not None:
                kwargs["scale"] = scale(key.shape[-2], query.shape[-1])
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    F.scaled_dot_product_attention = masked
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
