"""The interface every CLEAR attention backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from ..mask import CLEARLayout


class AttentionBackend(Protocol):
    """A CLEAR attention implementation.

    ``__call__(query, key, value, layout, scale)``:
        query: ``(batch, layout.q_len, heads, head_dim)``.
        key, value: ``(batch, layout.kv_len, heads, head_dim)``: text, image, then pooled tokens.
        Returns ``(batch, layout.q_len, heads, head_dim)`` in the query's dtype.
    """

    name: str

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """``None`` when the backend runs on ``device`` with ``dtype``, else why not (one line)."""
        ...

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor: ...
