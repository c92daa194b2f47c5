"""Backend ``"flex"``: torch FlexAttention with a block mask built from :func:`clear_dit.mask.mask_predicate`.

Compilation choice: on CUDA, ``flex_attention`` is wrapped in ``torch.compile`` (the fused kernel; without it
flex materialises the full score matrix). On CPU it runs un-compiled: compiling takes ~30 s per layout on a
2-core CPU, and every new layout (a new ``mask_mod`` closure and new lengths) compiles again, while the
un-compiled path is correct and fast enough for a reference. Un-compiled flex is O(seq^2) in memory.
FlexAttention has no backward on CPU (torch raises ``NotImplementedError`` there); on CUDA it has one.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from ..mask import CLEARLayout, mask_predicate

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = create_block_mask = BlockMask = None


@lru_cache(maxsize=32)
def _block_mask(layout: CLEARLayout, device: torch.device) -> BlockMask:
    """The CLEAR block mask of ``layout`` on ``device``; flex skips the blocks that are all False."""
    allowed = mask_predicate(layout)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, layout.q_len, layout.kv_len, device=device)


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    name = "flex"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if flex_attention is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        if not dtype.is_floating_point:
            return f"needs a floating dtype, got {dtype}"
        return None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        attend = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
        block_mask = _block_mask(layout, query.device)
        with warnings.catch_warnings():  # un-compiled on CPU on purpose (see the module docstring)
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = attend(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), block_mask=block_mask, scale=scale
            )
        return out.transpose(1, 2)
