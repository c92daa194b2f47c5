"""``clear_attention``: the public entry point, in the spirit of NATTEN's ``na2d(q, k, v, kernel_size)``."""

from __future__ import annotations

import math

import torch

from .backends import BACKENDS, select_backend
from .mask import CLEARLayout

__all__ = ["clear_attention", "pool_tokens", "available_backends", "proportional_scale"]

TRAINING_SEQ_LEN = 64 * 64 + 512  # FLUX 1024 px + 512 text tokens: the length CLEAR was distilled at


def available_backends(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Names of the backends that run on ``device`` (default: this machine's CPU) with ``dtype``."""
    device = torch.device(device or "cpu")
    return [name for name, backend in BACKENDS.items() if backend.unavailable_reason(device, dtype) is None]


def proportional_scale(kv_len: int, head_dim: int, training_len: int = TRAINING_SEQ_LEN) -> float:
    """Proportional attention scale ``sqrt(log(kv_len, training_len) / head_dim)`` (DESIGN.md 1.1)."""
    return math.sqrt(math.log(kv_len) / math.log(training_len) / head_dim)


def _spatial_weight_2d(spatial_weight: torch.Tensor | None, d: int, like: torch.Tensor) -> torch.Tensor:
    if spatial_weight is None:
        return torch.full((d, d), 1.0 / (d * d), dtype=like.dtype, device=like.device)
    if spatial_weight.numel() != d * d or spatial_weight.shape not in {(d, d), (1, 1, 1, d, 1, d, 1)}:
        raise ValueError(
            f"spatial_weight must have shape ({d}, {d}) or the official (1, 1, 1, {d}, 1, {d}, 1) "
            f"for down_factor={d}, got {tuple(spatial_weight.shape)}"
        )
    return spatial_weight.reshape(d, d).to(device=like.device, dtype=like.dtype)


def pool_tokens(
    image_tokens: torch.Tensor, grid: tuple[int, int], down_factor: int, spatial_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted ``d x d`` pooling of image keys or values.

    Args:
        image_tokens: ``(batch, h*w, heads, head_dim)``, row-major.
        spatial_weight: ``(d, d)`` or ``(1, 1, 1, d, 1, d, 1)``; ``None`` is the uniform ``1/d^2``.

    Returns:
        ``(batch, (h/d)*(w/d), heads, head_dim)``: ``out[Y, X] = sum_ij w[i, j] * x[Y*d + i, X*d + j]``.
    """
    d = down_factor
    h, w = grid
    b, n, heads, dim = image_tokens.shape
    weight = _spatial_weight_2d(spatial_weight, d, image_tokens)
    blocks = image_tokens.reshape(b, h // d, d, w // d, d, heads, dim)
    pooled = torch.einsum("byixjhc,ij->byxhc", blocks, weight)
    return pooled.reshape(b, (h // d) * (w // d), heads, dim)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got {t.dim()} dims {tuple(t.shape)}")
    if not (query.shape == key.shape == value.shape):
        raise ValueError(
            f"query, key and value must have the same shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if query.shape[1] != layout.q_len:
        h, w = layout.grid
        raise ValueError(
            f"seq length {query.shape[1]} != text_len + h*w = {layout.text_len} + {h}*{w} = {layout.q_len}"
        )


def clear_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    text_len: int,
    window_size: int,
    down_factor: int = 1,
    spatial_weight: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLEAR attention over a FLUX-ordered sequence (text first, then the row-major image grid).

    Args:
        query, key, value: ``(batch, text_len + h*w, heads, head_dim)``, diffusers' dispatch layout.
        grid: ``(h, w)`` image tokens.
        text_len: text tokens at the start of the sequence (0 allowed).
        window_size: radius ``r``; an image query sees image keys with ``dy^2 + dx^2 < r^2``.
        down_factor: ``d > 1`` appends ``(h/d)*(w/d)`` pooled keys/values that every image query sees.
        spatial_weight: pooling weight, ``(d, d)`` or ``(1, 1, 1, d, 1, d, 1)``; ``None`` is uniform.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        backend: one of :func:`available_backends` or ``"auto"``.

    Returns:
        ``(batch, text_len + h*w, heads, head_dim)`` in the query's dtype.
    """
    layout = CLEARLayout(tuple(grid), text_len, window_size, down_factor)
    _check_inputs(query, key, value, layout)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if down_factor > 1:
        image = slice(text_len, None)
        key = torch.cat([key, pool_tokens(key[:, image], layout.grid, down_factor, spatial_weight)], dim=1)
        value = torch.cat([value, pool_tokens(value[:, image], layout.grid, down_factor, spatial_weight)], dim=1)
    impl = select_backend(backend, layout, query)
    return impl(query, key, value, layout, scale)
