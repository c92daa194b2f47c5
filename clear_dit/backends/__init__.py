"""Registry of CLEAR attention backends, and the ``"auto"`` choice among them."""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..mask import CLEARLayout
from .base import AttentionBackend
from .dense import DenseBackend
from .flex import FlexBackend
from .tiled import TiledBackend, computed_scores
from .triton import TritonBackend
from .xformers import XformersBackend

_TRITON = TritonBackend()
_BY_NAME: dict[str, AttentionBackend] = {
    b.name: b for b in (DenseBackend(), TiledBackend(), FlexBackend(), _TRITON, XformersBackend())
}
BACKENDS: MappingProxyType[str, AttentionBackend] = MappingProxyType(_BY_NAME)

DENSE_MAX_SCORES = 1 << 26  # above this many mask entries (seq ~8K), "dense" costs too much memory for "auto"


def auto_backend_name(
    layout: CLEARLayout, device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """The backend ``"auto"`` picks for ``layout`` on ``device``.

    1. The window covers the grid and there are no pooled keys: CLEAR *is* full attention, and "tiled"
       runs it as one unmasked SDPA call (only then; a window that covers the grid with ``d > 1`` still
       differs from full attention by the pooled keys).
    2. On CUDA: "triton" (the fused kernel) where it runs with ``dtype`` and ``head_dim`` (``None``: not
       known, assumed fine): triton installed, fp16/bf16/fp32, head_dim <= 256; else "tiled".
    3. "tiled" when it computes fewer than 80% of the scores "dense" computes (measured on CPU: its speed
       follows that ratio, with a small fixed overhead), or when the sequence is too long for the
       O(seq^2) boolean mask of "dense"; otherwise "dense" (small or nearly full layouts).
    """
    if layout.covers_grid and layout.down_factor == 1:
        return "tiled"
    if device.type == "cuda":
        return "triton" if _TRITON.runs(device, dtype, head_dim) else "tiled"
    dense_scores = layout.q_len * layout.kv_len
    if computed_scores(layout) < 0.8 * dense_scores or dense_scores > DENSE_MAX_SCORES:
        return "tiled"
    return "dense"


def select_backend(name: str, layout: CLEARLayout, query: torch.Tensor) -> AttentionBackend:
    """Resolve ``name`` (or ``"auto"``) to a backend that runs on ``query``'s device and dtype."""
    if name == "auto":
        name = auto_backend_name(layout, query.device, query.dtype, query.shape[-1])
    # the plain dict: torch.compile graph-breaks on a mappingproxy once the traced code mutated any dict
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; known backends: 'auto', {', '.join(map(repr, _BY_NAME))}")
    backend = _BY_NAME[name]
    reason = backend.unavailable_reason(query.device, query.dtype)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable on {query.device} with {query.dtype}: {reason}")
    return backend


__all__ = ["AttentionBackend", "BACKENDS", "auto_backend_name", "select_backend"]
