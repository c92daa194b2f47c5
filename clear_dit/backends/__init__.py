"""Registry of CLEAR attention backends, and the ``"auto"`` choice among them."""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..mask import CLEARLayout
from .base import AttentionBackend
from .dense import DenseBackend

BACKENDS: MappingProxyType[str, AttentionBackend] = MappingProxyType(
    {backend.name: backend for backend in (DenseBackend(),)}
)


def select_backend(name: str, layout: CLEARLayout, query: torch.Tensor) -> AttentionBackend:
    """Resolve ``name`` (or ``"auto"``) to a backend that runs on ``query``'s device and dtype."""
    if name == "auto":
        return BACKENDS["dense"]
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: 'auto', {', '.join(map(repr, BACKENDS))}")
    backend = BACKENDS[name]
    reason = backend.unavailable_reason(query.device, query.dtype)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable on {query.device} with {query.dtype}: {reason}")
    return backend


__all__ = ["AttentionBackend", "BACKENDS", "select_backend"]
