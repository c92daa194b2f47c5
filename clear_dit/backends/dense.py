"""The oracle: a boolean mask from :func:`clear_dit.mask.dense_mask` and SDPA. O(seq^2) memory."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..mask import CLEARLayout, dense_mask


@lru_cache(maxsize=16)
def _cached_mask(layout: CLEARLayout, device: torch.device) -> torch.Tensor:
    return dense_mask(layout, device)


class DenseBackend:
    name = "dense"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        mask = _cached_mask(layout, query.device)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2)
