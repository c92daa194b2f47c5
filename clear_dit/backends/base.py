"""The interface every CLEAR attention backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from ..mask import CLEARLayout

#: The dtypes PyTorch's scaled_dot_product_attention computes in (on CPU, float8 types raise inside it).
SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_reason(dtype: torch.dtype, supported: tuple[torch.dtype, ...]) -> str | None:
    """``None`` when ``dtype`` is one of ``supported``, else the one-line reason of ``unavailable_reason``."""
    if dtype in supported:
        return None
    names = [str(d).removeprefix("torch.") for d in supported]
    return f"needs {', '.join(names[:-1])} or {names[-1]}, got {dtype}"


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
