"""Backend ``"flex"``: torch FlexAttention with a block mask built from :func:`clear_dit.mask.mask_predicate`.

Compilation choice: on CUDA, ``flex_attention`` is wrapped in ``torch.compile`` (the fused kernel; without it
flex materialises the full score matrix). On CPU it runs un-compiled: compiling takes ~30 s per layout on a
2-core CPU, and every new layout (a new ``mask_mod`` closure and new lengths) compiles again, while the
un-compiled path is correct and fast enough for a reference. Un-compiled flex is O(seq^2) in memory.
FlexAttention has no backward on CPU (torch raises ``NotImplementedError`` there); on CUDA it has one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache

import torch

from ..mask import CLEARLayout, mask_predicate
from .base import SDPA_DTYPES, dtype_reason

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = BlockMask = None


FLEX_BLOCK = 128  # FlexAttention's default sparse block size (queries and keys)
_MASK_CHUNK = 1 << 24  # mask entries evaluated at once while building a block mask: O(kv_len) memory, not seq^2


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block flags ``(q_blocks, kv_blocks)`` -> flex's ``(num_blocks (1, 1, q_blocks), indices (1, 1, q, kv))``,
    the set blocks' indices first, in increasing order."""
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
    return blocks.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


@lru_cache(maxsize=32)
def _block_mask(layout: CLEARLayout, device: torch.device) -> BlockMask:
    """The CLEAR block mask of ``layout`` on ``device``; flex skips the blocks that are all False.

    Equal to ``create_block_mask`` with the same ``mask_mod``, but the mask is evaluated a few query blocks at a
    time (``create_block_mask`` materialises all ``q_len x kv_len`` entries and their int64 intermediates: ~35 GB
    at 4096 px). Blocks whose entries are all True are "full" (no ``mask_mod`` call); partial tail blocks never are.
    """
    allowed = mask_predicate(layout)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    q_blocks, kv_blocks = -(-layout.q_len // FLEX_BLOCK), -(-layout.kv_len // FLEX_BLOCK)
    kv_idx = torch.arange(kv_blocks * FLEX_BLOCK, dtype=torch.int32, device=device)  # int32: twice as fast as int64
    kv_real = (kv_idx < layout.kv_len)[None, :]
    rows = FLEX_BLOCK * max(1, _MASK_CHUNK // (FLEX_BLOCK * kv_idx.numel()))
    sums = []
    for start in range(0, q_blocks * FLEX_BLOCK, rows):
        q_idx = torch.arange(start, min(start + rows, q_blocks * FLEX_BLOCK), dtype=torch.int32, device=device)
        entries = allowed(q_idx[:, None], kv_idx[None, :])
        entries &= (q_idx < layout.q_len)[:, None] & kv_real  # padding: False
        sums.append(entries.view(-1, FLEX_BLOCK, kv_blocks, FLEX_BLOCK).sum((1, 3), dtype=torch.int32))
    counts = torch.cat(sums)
    full = counts == FLEX_BLOCK * FLEX_BLOCK
    return BlockMask.from_kv_blocks(
        *_ordered((counts > 0) & ~full), *_ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
        seq_lengths=(layout.q_len, layout.kv_len),
    )  # fmt: skip


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend:
    name = "flex"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if flex_attention is None:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        return dtype_reason(dtype, SDPA_DTYPES)

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        if query.numel() == 0:  # no images or no heads: flex_attention divides by the head count
            return query.new_empty(query.shape)
        attend = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return run_flex(attend, q, k, v, _block_mask(layout, query.device), scale).transpose(1, 2)


#: Layouts (sizes, windows) one process may compile flex_attention for: every layout is a new mask_mod and new
#: lengths, and past dynamo's default limit of 8 it silently runs flex un-compiled (O(seq^2) memory) instead.
RECOMPILE_LIMIT = 256


def run_flex(
    attend: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, scale: float
) -> torch.Tensor:
    """``attend(query, key, value, block_mask=..., scale=...)`` ``(batch, heads, seq, head_dim)``: flex_attention,
    compiled or not (un-compiled on CPU on purpose, see the module docstring), with room for a compile per layout."""
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return attend(query, key, value, block_mask=block_mask, scale=scale)
