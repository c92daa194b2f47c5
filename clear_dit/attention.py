"""``clear_attention``: the public entry point, in the spirit of NATTEN's ``na2d(q, k, v, kernel_size)``."""

from __future__ import annotations

import math

import torch

from .backends import BACKENDS, select_backend
from .mask import CLEARLayout

__all__ = ["clear_attention", "clear_attention_with_layout", "pool_tokens", "available_backends", "proportional_scale"]

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


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """``scale`` as a float, ``1/sqrt(head_dim)`` if None; a one-line ``ValueError`` unless positive and finite
    (the tiled backend drops padding keys by a huge negative score times the scale: 0 or less gives them weight)."""
    if scale is None:
        return head_dim**-0.5
    if not 0 < float(scale) < math.inf:
        raise ValueError(f"scale must be a positive finite number (default 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def check_dims(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """One-line ``ValueError`` unless all three are ``(batch, seq, heads, head_dim)``."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got {t.dim()} dims {tuple(t.shape)}")


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout) -> None:
    check_dims(query, key, value)
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
    if query.shape[-1] < 1:
        raise ValueError(f"head_dim must be at least 1, got shape {tuple(query.shape)}")
    if query.shape[1] != layout.q_len:
        grids = " + ".join(f"{h}*{w}" for h, w in layout.image_grids)
        raise ValueError(f"seq length {query.shape[1]} != text_len + image tokens = {layout.text_len} + {grids}")


def _with_pooled(tokens: torch.Tensor, layout: CLEARLayout, spatial_weight: torch.Tensor | None) -> torch.Tensor:
    """Keys or values ``(batch, q_len, heads, head_dim)`` with the pooled tokens of every grid appended."""
    pooled, start = [tokens], layout.image_start
    for h, w in layout.image_grids:
        pooled.append(pool_tokens(tokens[:, start : start + h * w], (h, w), layout.down_factor, spatial_weight))
        start += h * w
    return torch.cat(pooled, dim=1)


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
    text_position: str = "first",
    reference_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """CLEAR attention over a joint text + image sequence (mask rule: :mod:`clear_dit.mask`).

    Args:
        query, key, value: ``(batch, seq, heads, head_dim)``, diffusers' dispatch layout, where ``seq`` is
            ``text_len + h*w`` (``+ hr*wr`` with a reference grid), in the order given by ``text_position``.
        grid: ``(h, w)`` image tokens (the target image).
        text_len: number of text tokens (0 allowed).
        window_size: radius ``r``; an image query sees image keys with ``dy^2 + dx^2 < r^2``.
        down_factor: ``d > 1`` appends ``(h/d)*(w/d)`` pooled keys/values per grid that every image query sees.
        spatial_weight: pooling weight, ``(d, d)`` or ``(1, 1, 1, d, 1, d, 1)``; ``None`` is uniform.
        scale: softmax scale, positive and finite; default ``1/sqrt(head_dim)``.
        backend: one of :func:`available_backends` or ``"auto"``.
        text_position: ``"first"`` (FLUX: ``[text] + [image]``) or ``"last"`` (SD3: ``[image] + [text]``);
            the sequence is used as it comes, never reordered.
        reference_grid: ``(hr, wr)`` of a reference image whose row-major tokens follow the target's and share
            its coordinates (FLUX Kontext), or ``None``.

    Returns:
        ``(batch, seq, heads, head_dim)`` in the query's dtype; under ``torch.autocast`` query, key and value are
        first taken in the autocast dtype, as ``scaled_dot_product_attention`` takes them.
    """
    ref = tuple(reference_grid) if reference_grid is not None else None
    layout = CLEARLayout(tuple(grid), text_len, window_size, down_factor, text_position, ref)
    return clear_attention_with_layout(
        query, key, value, layout, spatial_weight=spatial_weight, scale=scale, backend=backend
    )


def clear_attention_with_layout(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: CLEARLayout,
    *,
    spatial_weight: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`clear_attention` for callers that already hold the :class:`~clear_dit.mask.CLEARLayout`."""
    device = query.device.type  # "meta" (shape inference) has no autocast to ask about
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):  # one dtype, as SDPA takes
        dtype = torch.get_autocast_dtype(device)  # them under autocast: SD3.5's qk-norm gives fp32 q/k, bf16 v
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    _check_inputs(query, key, value, layout)
    if spatial_weight is not None and layout.down_factor == 1:  # a checkpoint's pooling weight, d forgotten
        raise ValueError("spatial_weight pools keys: it needs down_factor > 1 (the d it was trained with)")
    scale = softmax_scale(scale, query.shape[-1])
    if layout.down_factor > 1:
        key = _with_pooled(key, layout, spatial_weight)
        value = _with_pooled(value, layout, spatial_weight)
    impl = select_backend(backend, layout, query, scale)
    return impl(query, key, value, layout, scale)
