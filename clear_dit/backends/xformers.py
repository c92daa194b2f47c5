"""Backend ``"xformers"``: the ``"tiled"`` decomposition on xformers' partial-attention kernels (CUDA only).

:mod:`clear_dit.backends.tiled` splits CLEAR attention into parts over disjoint key sets (all query tiles x
their key blocks, under one shared window bias; image queries x text + pooled keys) and merges them by their
log-sum-exp. xformers offers exactly those two operations as fused GPU kernels:
``xformers.ops.fmha.memory_efficient_attention_partial`` (attention with its log-sum-exp) and
``xformers.ops.fmha.merge_attentions``. This backend is the tiled backend with those two kernels put in
(:class:`~clear_dit.backends.tiled.PartKernels`); the decomposition itself is tiled's code, shared, not copied.
Text queries and a window that covers the grid run through SDPA, as in tiled.
Gradients: :mod:`clear_dit.backends.recompute`.

xformers has no CPU kernels, so this backend is unavailable on CPU; it is not exercised by the CPU test suite.
It needs an xformers whose ``memory_efficient_attention_partial`` accepts a tensor ``attn_bias`` (the window
bias; dispatched with ``op=None``).
"""

from __future__ import annotations

import torch

from ..mask import CLEARLayout
from .base import dtype_reason
from .recompute import with_tiled_backward
from .tiled import PartKernels, TiledBackend

try:
    from xformers.ops import fmha
except ImportError as err:  # xformers is optional (and GPU only)
    fmha = None
    _IMPORT_ERROR = f"xformers is not importable ({err}); it is optional and runs on CUDA only: pip install xformers"

__all__ = ["XformersBackend"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BIAS_ALIGNMENT = 8  # xformers reads a tensor bias whose row stride is a multiple of 8 elements


def _aligned(bias: torch.Tensor) -> torch.Tensor:
    """The ``(L, Lk)`` bias in storage with rows padded to the alignment xformers asks for (same values)."""
    rows, cols = bias.shape
    padded = bias.new_empty(rows, -(-cols // _BIAS_ALIGNMENT) * _BIAS_ALIGNMENT)[:, :cols]
    return padded.copy_(bias)


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """tiled's part kernel on xformers: ``(N, heads, L, D)`` tensors -> ``(out, lse (N, heads, L))``.

    xformers works in ``(batch, seq, heads, dim)``, so the inputs go in transposed (views) and the output comes
    back the same way; its log-sum-exp may be padded along the sequence, hence the slice.
    """
    if bias is not None:  # the window bias is the same for every tile and head: broadcast with stride 0
        bias = _aligned(bias).expand(*query.shape[:-1], key.shape[-2])
    out, lse = fmha.memory_efficient_attention_partial(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2), lse[..., : query.shape[-2]]


def _merge(
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """tiled's merge of two parts on xformers: ``out (..., heads, m, L, C)``, ``lse (..., heads, m, L)``.

    xformers merges ``[B, M, H, K]`` outputs with ``[B, H, M]`` log-sum-exps: the leading dims fold into ``B``
    and the query dims ``(m, L)`` into ``M``. ``in_place`` is tiled's CPU-path option; xformers returns new tensors.
    """
    *lead, heads, m, length, chans = out.shape
    flat_out = [o.reshape(-1, heads, m * length, chans).transpose(1, 2) for o in (out, part_out)]
    flat_lse = [x.reshape(-1, heads, m * length) for x in (lse, part_lse)]
    merged, merged_lse = fmha.merge_attentions(flat_out, flat_lse, write_lse=True, output_dtype=out.dtype)
    return merged.transpose(1, 2).reshape(out.shape), merged_lse.reshape(lse.shape)


class XformersBackend(TiledBackend):
    name = "xformers"
    kernels = PartKernels(attend=_attend, merge=_merge)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if fmha is None:
            return _IMPORT_ERROR
        if device.type != "cuda":
            return f"xformers has no kernels for {device.type}; needs a CUDA device"
        if (reason := dtype_reason(dtype, _SUPPORTED_DTYPES)) is not None:
            return reason
        return None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        return with_tiled_backward(super().__call__, query, key, value, layout, scale)
