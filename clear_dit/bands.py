"""CLEAR attention computed in pieces: a band of image rows, and partial results merged by log-sum-exp.

These are the building blocks of patch-parallel inference (``pipelines.parallel``), where every device holds
a band of image rows and only the keys/values its window reaches:

- :func:`window_reach`: how many rows above and below a band its queries can see (from the mask geometry).
- :func:`band_attention`: CLEAR attention of the image queries of a row range of a key grid that has been
  extended by those halo rows, with extra *global* keys every image query sees (text, pooled tokens).
- :func:`attention_with_lse`: plain softmax attention that also returns its log-sum-exp, so results over
  disjoint key sets can be merged exactly (text queries attend to the image keys of every band).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import check_dims, softmax_scale
from .backends import auto_backend_name
from .backends.tiled import _attention_with_lse, band_rows
from .mask import CLEARLayout, mask_predicate, window_row_extents

__all__ = ["BAND_BACKENDS", "attention_with_lse", "band_attention", "window_reach"]

#: Backends :func:`band_attention` implements; others ("flex") fall back to "tiled".
BAND_BACKENDS = ("dense", "tiled")

_MAX_SCORES = 1 << 26  # scores per attention_with_lse chunk (256 MiB in fp32)


def window_reach(window_size: int) -> int:
    """Largest row offset ``|dy|`` an image query's window reaches: the halo height a band needs on each side."""
    return max(abs(dy) for dy, _ in window_row_extents(window_size))


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every query over every key, with its log-sum-exp.

    Args:
        query: ``(batch, q_len, heads, head_dim)``.
        key, value: ``(batch, kv_len, heads, head_dim)``, ``kv_len >= 1``.
        scale: softmax scale, positive and finite; default ``1/sqrt(head_dim)``.

    Returns:
        ``out`` ``(batch, q_len, heads, head_dim)`` in the query's dtype and ``lse`` float32
        ``(batch, q_len, heads)``, ``lse = log(sum_k exp(scale * q.k))``. Long key sets are processed in
        chunks merged by their log-sum-exp, so memory stays bounded.
    """
    if key.shape[1] == 0:
        raise ValueError("attention_with_lse needs at least one key")
    scale = softmax_scale(scale, query.shape[-1])
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    chunk = max(1, _MAX_SCORES // max(1, q.shape[0] * q.shape[1] * q.shape[2]))
    parts = [
        _attention_with_lse(q, k[:, :, i : i + chunk], v[:, :, i : i + chunk], scale)
        for i in range(0, k.shape[2], chunk)
    ]
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in parts]), dim=0)
        acc = torch.promote_types(query.dtype, torch.float32)
        out = sum(p_out.to(acc) * torch.exp(p_lse - lse)[..., None] for p_out, p_lse in parts).to(query.dtype)
    return out.transpose(1, 2), lse.float().transpose(1, 2)


def _check_band(query, key, value, key_grid, rows, num_global) -> None:
    check_dims(query, key, value)
    b, _, heads, dim = query.shape
    for name, t in (("key", key), ("value", value)):
        if (t.shape[0], t.shape[2], t.shape[3], t.dtype, t.device) != (b, heads, dim, query.dtype, query.device):
            raise ValueError(
                f"{name} must share the query's batch, heads, head_dim, dtype and device: query "
                f"{tuple(query.shape)} {query.dtype} {query.device}, {name} {tuple(t.shape)} {t.dtype} {t.device}"
            )
    if len(tuple(key_grid)) != 2 or len(tuple(rows)) != 2:
        raise ValueError(f"key_grid and rows must be pairs (hk, w) and (start, stop), got {key_grid!r} and {rows!r}")
    hk, w = key_grid
    r0, r1 = rows
    if not 0 <= r0 < r1 <= hk:
        raise ValueError(f"rows must satisfy 0 <= start < stop <= {hk} (the key grid's rows), got {rows!r}")
    if query.shape[1] != (r1 - r0) * w:
        raise ValueError(f"query has {query.shape[1]} tokens, rows {rows!r} of width {w} need {(r1 - r0) * w}")
    if key.shape != value.shape or key.shape[1] != num_global + hk * w:
        raise ValueError(
            f"key/value must both be (batch, num_global + {hk}*{w}, heads, head_dim) = "
            f"(.., {num_global + hk * w}, ..), got {tuple(key.shape)} and {tuple(value.shape)}"
        )


def band_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_grid: tuple[int, int],
    rows: tuple[int, int],
    num_global: int,
    window_size: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLEAR attention of the image queries in rows ``[start, stop)`` of a key grid, plus global keys.

    A query at ``(y, x)`` of the key grid attends to all ``num_global`` global keys and to the grid keys
    inside its circular window: the image rows of ``CLEARLayout(key_grid, text_len=num_global, window_size)``
    (the global keys take the text slot; the rule is :func:`clear_dit.mask.mask_predicate`'s). Rows of the
    key grid above ``start`` and below ``stop`` are halo rows: keys only.

    Args:
        query: ``(batch, (stop - start) * w, heads, head_dim)``, row-major.
        key, value: ``(batch, num_global + hk * w, heads, head_dim)``: the global keys, then the key grid.
        key_grid: ``(hk, w)``.
        rows: ``(start, stop)``, the query rows within the key grid.
        num_global: number of leading global keys (0 allowed).
        window_size: radius ``r``.
        scale: softmax scale, positive and finite; default ``1/sqrt(head_dim)``.
        backend: ``"dense"`` (the mask rows from :func:`~clear_dit.mask.mask_predicate`, one SDPA call),
            ``"tiled"`` (the tiled backend's tiles over the band's rows only, their key blocks cut from the
            halo-extended key grid; linear memory), ``"auto"`` (the choice of
            :func:`clear_dit.backends.auto_backend_name` for the key grid's layout), or any other backend name,
            which runs as ``"tiled"``. Either computes only the band's queries.

    Returns:
        ``(batch, (stop - start) * w, heads, head_dim)`` in the query's dtype.
    """
    _check_band(query, key, value, key_grid, rows, num_global)
    layout = CLEARLayout(tuple(key_grid), num_global, window_size)
    scale = softmax_scale(scale, query.shape[-1])
    if backend == "auto":
        backend = auto_backend_name(layout, query.device, query.dtype, scale=scale)
    (r0, r1), w = rows, key_grid[1]
    if backend == "dense":
        q_idx = torch.arange(num_global + r0 * w, num_global + r1 * w, device=query.device)
        mask = mask_predicate(layout)(q_idx[:, None], torch.arange(layout.kv_len, device=query.device)[None, :])
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2)
    if query.numel() == 0:  # no images or no heads: nothing to tile (the tiled path's reshapes need a size)
        return query.new_empty(query.shape)
    return band_rows(query, key, value, layout, rows, scale).reshape(query.shape)
