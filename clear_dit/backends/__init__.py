"""Registry of CLEAR attention backends, and the ``"auto"`` choice among them."""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..mask import CLEARLayout
from .base import AttentionBackend
from .dense import DenseBackend
from .flex import FlexBackend
from .tiled import TiledBackend, computed_scores, scale_fits
from .triton import INTERPRETED as TRITON_INTERPRETED
from .triton import TritonBackend
from .xformers import XformersBackend

_TRITON = TritonBackend()
_BY_NAME: dict[str, AttentionBackend] = {
    b.name: b for b in (DenseBackend(), TiledBackend(), FlexBackend(), _TRITON, XformersBackend())
}
BACKENDS: MappingProxyType[str, AttentionBackend] = MappingProxyType(_BY_NAME)

DENSE_MAX_SCORES = 1 << 26  # above this many mask entries (seq ~8K), "dense" costs too much memory for "auto"


# Time per computed score of "tiled" relative to full SDPA's, on CPU (see auto_backend_name): the flash
# kernel runs slower on tile-sized query sequences, and the strips and merges cost extra. Measured with
# `benchmarks/attention.py --rows issue` on the quiet dev CPU (README, attention benchmark): fp32 1.26-1.56,
# bf16 1.41-1.67 over the five rows. At 64^2 r16, the closest row to break-even, tiled ran at 1.20x (fp32) and
# 1.38x (bf16) of full SDPA there, so these costs take it (1.05x / 1.36x predicted), while the loaded machine's
# 0.5-0.8x there would have asked for dense. fp16 pays more: PyTorch's CPU flash kernel runs it slower than bf16
# on tiles (2048 px r16: 4.1x of full SDPA against bf16's 5.2x), and measured side by side with the dense path
# (2026-12-07, quiet, medians of 5; tiled / dense as x of full SDPA), r16: 56^2 0.79 / 1.01 (dense scores over
# tiled's 1.77), 60^2 0.95 / 1.02 (1.90), 64^2 1.01-1.04 / 0.96-1.15 (2.18), 72^2 1.19 / 0.97; r8: 40^2 0.97 / 0.89
# (1.76), 48^2 1.20 / 1.00 (2.24). bf16's cost took tiled at 56^2 and 60^2. JSON: benchmarks/results/fp16_breakeven/.
TILED_SCORE_COST = {"float": 1.5, "bf16": 1.6, "fp16": 2.0}


def _score_cost(dtype: torch.dtype) -> float:
    """The :data:`TILED_SCORE_COST` entry for ``dtype`` (float32 and float64 share ``"float"``)."""
    return TILED_SCORE_COST[{torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float")]


def auto_backend_name(
    layout: CLEARLayout,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    head_dim: int | None = None,
    scale: float | None = None,
) -> str:
    """The backend ``"auto"`` picks for ``layout`` on ``device`` with ``dtype`` (and ``head_dim`` and the softmax
    ``scale``, if known).

    1. The window covers the grid and there are no pooled keys: CLEAR *is* full attention, and "tiled"
       runs it as one unmasked SDPA call (only then; a window that covers the grid with ``d > 1`` still
       differs from full attention by the pooled keys).
    2. On CUDA: "triton" (the fused kernel) where it runs with ``dtype`` and ``head_dim`` (``None``: not
       known, assumed fine): triton installed (and compiling, not interpreted: ``TRITON_INTERPRET=1``),
       fp16/bf16/fp32, head_dim <= 256; else "tiled".
    3. "tiled" (with its tile shape for ``dtype`` and the radius, :func:`~clear_dit.backends.tiled.tile_shape`)
       when its computed scores times :data:`TILED_SCORE_COST` are fewer than full attention's, i.e. when it
       is measured to beat full SDPA, or when the sequence is too long for the O(seq^2) mask of "dense".
       Otherwise (small or nearly full layouts, below the break-even) "dense", the exact dense path: one
       SDPA call with the CLEAR mask, which costs about what full SDPA costs.
    4. "dense" instead of a masked "tiled" for a ``scale`` so small in fp16 that tiled's padding keys would take
       softmax weight (tiled refuses it).
    """
    if layout.covers_grid and layout.down_factor == 1:
        return "tiled"
    if device.type == "cuda":
        compiled = _TRITON.runs(device, dtype, head_dim) and not TRITON_INTERPRETED  # the interpreter: ~1000x slower
        name = "triton" if compiled else "tiled"
    else:
        dense_scores = layout.q_len * layout.kv_len
        fewer = computed_scores(layout, dtype) * _score_cost(dtype) < dense_scores
        name = "tiled" if fewer or dense_scores > DENSE_MAX_SCORES else "dense"
    return "dense" if name == "tiled" and scale is not None and not scale_fits(scale, dtype) else name


def select_backend(name: str, layout: CLEARLayout, query: torch.Tensor, scale: float | None = None) -> AttentionBackend:
    """Resolve ``name`` (or ``"auto"``, for ``query`` and the softmax ``scale``, see :func:`auto_backend_name`) to a
    backend that runs on ``query``'s device and dtype."""
    if name == "auto":
        name = auto_backend_name(layout, query.device, query.dtype, query.shape[-1], scale)
    # the plain dict: torch.compile graph-breaks on a mappingproxy once the traced code mutated any dict
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; known backends: 'auto', {', '.join(map(repr, _BY_NAME))}")
    backend = _BY_NAME[name]
    reason = backend.unavailable_reason(query.device, query.dtype)
    if reason is not None:
        raise ValueError(f"backend {name!r} is unavailable on {query.device} with {query.dtype}: {reason}")
    return backend


__all__ = ["AttentionBackend", "BACKENDS", "auto_backend_name", "select_backend"]
