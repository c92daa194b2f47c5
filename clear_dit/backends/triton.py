"""Backend ``"triton"``: a fused Triton kernel for the image queries of CLEAR attention (tile-aligned sparsity).

Image queries are visited in 2D tiles: one program computes a ``th x tw`` tile of the grid (``th*tw`` query
tokens) for one (batch, head), with one online softmax over all the keys the tile's queries see:

- the global keys (every text key, then every pooled key), contiguous runs of the key sequence;
- the image key tiles (``kh x kw`` tiles of each grid) that lie inside the window of every query of the
  tile: processed without any mask;
- the boundary key tiles, inside some windows only: masked by the circle test of
  :func:`clear_dit.mask.in_window` (the same function, compiled into the kernel) and by the grid's bounds.

Key tiles outside every window of a query tile are never visited. Which key tiles each query tile visits, and
which of them are full, is the layout's :class:`BlockSchedule`: derived from :mod:`clear_dit.mask` (the token
layout of :class:`~clear_dit.mask.CLEARLayout` and :func:`~clear_dit.mask.in_window`), built once per layout
and tiling and cached by them, like FlexAttention's ``BlockMask``. A FLUX Kontext reference grid shares the
target's coordinates, so its tiles are just more query tiles and key tiles of the same schedule.

Text queries see every text and image key and no pooled key: that is plain unmasked attention over
``key[:, :q_len]``, with nothing to skip, so they run through ``F.scaled_dot_product_attention`` (flash
attention on CUDA), which is as fast as any kernel written here could be for them.

Backward: an exact autograd fallback (:mod:`clear_dit.backends.recompute`): the forward saves its inputs, the
backward recomputes the attention through the ``"tiled"`` backend's differentiable path and differentiates that.

Runs on CUDA, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before triton
is imported; ~1000x slower: tests only).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..mask import CLEARLayout, in_window
from .base import dtype_reason
from .recompute import with_tiled_backward
from .tiled import write_text_rows

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from . import _triton_kernel
except ImportError as err:  # the "triton" extra is not installed
    triton = None
    INTERPRETED = False
    _IMPORT_ERROR = f"triton is not importable ({err}); install the extra: pip install 'clear-dit[triton]'"

__all__ = [
    "MAX_HEAD_DIM",
    "BlockSchedule",
    "Launch",
    "Tiling",
    "TritonBackend",
    "block_schedule",
    "choose_tiling",
    "kernel_launch",
    "pipeline_stages",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # beyond this one (BLOCK_M, head_dim) accumulator no longer fits a program's registers


@dataclass(frozen=True)
class Tiling:
    """Query tile ``(th, tw)`` and key tile ``(kh, kw)``, in tokens; each product is a power of two >= 16."""

    query: tuple[int, int]
    key: tuple[int, int]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


#: Shared memory a block may opt into on sm_86/sm_89 (RTX 30/40, 99 KB), which the tilings are sized for; A100 and
#: H100 give more, Turing (T4, RTX 20) 64 KB.
CONSUMER_SHARED_MEMORY = 101376


def choose_tiling(
    layout: CLEARLayout, head_dim: int, dtype: torch.dtype, shared_memory: int = CONSUMER_SHARED_MEMORY
) -> Tiling:
    """Tiles for ``layout``: 128 queries x 64 keys per block for 16-bit inputs up to head_dim 128, halved for
    each of fp32, a head_dim above 128 and a GPU whose blocks get less ``shared_memory`` than sm_86/sm_89's 99 KB
    (Turing's 64 KB), down to a quarter (the accumulators and K/V stages must fit registers and shared memory:
    with :func:`pipeline_stages`, at most 99 KB, or 64 KB on Turing).

    Not tuned on a GPU yet (none was at hand). Query tiles are wide (``8 x 16``): rows are contiguous in
    memory, and the window's reach is the same in both directions. Tile sides shrink to the grid's extent
    (rounded up to a power of two) so that small grids do not compute mostly padding.
    """
    halvings = (dtype == torch.float32) + (head_dim > 128) + (shared_memory < CONSUMER_SHARED_MEMORY)
    block_m, block_n = 128 >> min(halvings, 2), 64 >> min(halvings, 2)
    h = _pow2_at_least(max(g[0] for g in layout.image_grids))
    w = _pow2_at_least(max(g[1] for g in layout.image_grids))

    def shape(block: int, width: int) -> tuple[int, int]:
        tw = min(width, w)
        th = max(block // tw, 1)
        while th > h and th * tw > 16:  # a grid lower than the tile: give its rows back (stay >= 16 tokens)
            th //= 2
        return th, tw

    return Tiling(query=shape(block_m, 16), key=shape(block_n, 8))


def pipeline_stages(head_dim: int, dtype: torch.dtype) -> int:
    """Software-pipelining stages of the key/value loads: Triton's 3 by default, 2 for fp32 blocks of more than 64
    channels, whose third stage would take more shared memory than sm_86/sm_89 give a block (99 KB)."""
    return 2 if dtype == torch.float32 and head_dim > 64 else 3


@dataclass(frozen=True, eq=False)
class BlockSchedule:
    """Which image key tiles each image query tile visits, split into full and boundary tiles (CSR lists).

    A tile record is 5 int32: sequence index of its grid's first token, grid height, grid width, first row,
    first column. ``query_tiles`` ``(nq, 5)``; query tile ``i`` visits the full key tiles
    ``full_tiles[full_ptr[i]:full_ptr[i+1]]`` and the boundary ones ``partial_tiles[partial_ptr[i]:...]``.
    """

    tiling: Tiling
    query_tiles: torch.Tensor
    full_ptr: torch.Tensor
    full_tiles: torch.Tensor
    partial_ptr: torch.Tensor
    partial_tiles: torch.Tensor

    def to(self, device: torch.device) -> BlockSchedule:
        fields = (self.query_tiles, self.full_ptr, self.full_tiles, self.partial_ptr, self.partial_tiles)
        return BlockSchedule(self.tiling, *(t.to(device) for t in fields))


def _grid_tiles(layout: CLEARLayout, tile: tuple[int, int]) -> torch.Tensor:
    """Records ``(n, 5)`` of the tiles of every image grid, grid after grid, row-major within a grid."""
    records, start = [], layout.image_start
    for h, w in layout.image_grids:
        y0, x0 = torch.meshgrid(torch.arange(0, h, tile[0]), torch.arange(0, w, tile[1]), indexing="ij")
        const = torch.ones(y0.numel(), dtype=torch.int64)
        records.append(torch.stack([const * start, const * h, const * w, y0.flatten(), x0.flatten()], dim=1))
        start += h * w
    return torch.cat(records)


@dataclass(frozen=True)
class _AxisPairs:
    """Along one axis: pairs (query tile, key tile) of intervals closer than the radius, and their offsets."""

    query: torch.Tensor  # tile index along the axis
    key: torch.Tensor
    near: torch.Tensor  # smallest |offset| between a query and a key of the two intervals
    far: torch.Tensor  # largest |offset|
    complete: torch.Tensor  # the key interval is a whole tile (not cut by the grid's end)


def _axis_pairs(query_extent: int, query_step: int, key_extent: int, key_step: int, window_size: int) -> _AxisPairs:
    q0 = torch.arange(0, query_extent, query_step)[:, None]
    k0 = torch.arange(0, key_extent, key_step)[None, :]
    q1, k1 = (q0 + query_step).clamp(max=query_extent), (k0 + key_step).clamp(max=key_extent)
    near = torch.maximum(torch.maximum(k0 - (q1 - 1), q0 - (k1 - 1)), torch.zeros((), dtype=q0.dtype))
    far = torch.maximum(q1 - 1 - k0, k1 - 1 - q0)
    qi, ki = torch.nonzero(in_window(near, 0, window_size), as_tuple=True)  # the other axis only adds distance
    return _AxisPairs(qi, ki, near[qi, ki], far[qi, ki], ((k1 - k0) == key_step)[0, ki])


def _csr(query: torch.Tensor, key: torch.Tensor, records: torch.Tensor, num_queries: int):
    """Pairs (query tile, key tile) grouped by query tile: ``ptr (nq + 1,)`` and key records ``(n, 5)``, int32."""
    order = torch.argsort(query * records.shape[0] + key)
    counts = torch.bincount(query, minlength=num_queries)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ptr.to(torch.int32), records[key[order]].to(torch.int32).contiguous()


@lru_cache(maxsize=64)
def block_schedule(layout: CLEARLayout, tiling: Tiling) -> BlockSchedule:
    """The block schedule of ``layout`` under ``tiling`` (CPU tensors), from the mask's own window test.

    For two boxes of tokens (a query tile and a key tile, clipped to their grids) the offsets ``dy`` and ``dx``
    range independently, and :func:`~clear_dit.mask.in_window` only gets falser as ``|dy|`` or ``|dx|`` grow.
    So some pair of the two tiles is inside the window iff the pair of smallest ``|dy|``, ``|dx|`` is, and every
    pair is iff the pair of largest ``|dy|``, ``|dx|`` is. A full tile must also lie inside its grid (the kernel
    loads it without bounds). Tiles of a Kontext reference grid share the target's coordinates, so every pair of
    grids is scheduled the same way. Rows and columns are paired first (per axis, only intervals closer than
    the radius), so the cost is linear in the number of tiles.
    """
    (th, tw), (kh, kw), r = tiling.query, tiling.key, layout.window_size
    grids = layout.image_grids
    q_first = [0]  # index of each grid's first tile
    k_first = [0]
    for h, w in grids:
        q_first.append(q_first[-1] + -(-h // th) * -(-w // tw))
        k_first.append(k_first[-1] + -(-h // kh) * -(-w // kw))
    queries, keys, fulls = [], [], []
    for qg, (qh, qw) in enumerate(grids):
        for kg, (gh, gw) in enumerate(grids):
            rows, cols = _axis_pairs(qh, th, gh, kh, r), _axis_pairs(qw, tw, gw, kw, r)
            seen = in_window(rows.near[:, None], cols.near[None, :], r)
            full = in_window(rows.far[:, None], cols.far[None, :], r) & rows.complete[:, None] & cols.complete
            q_tile = q_first[qg] + rows.query[:, None] * -(-qw // tw) + cols.query[None, :]
            k_tile = k_first[kg] + rows.key[:, None] * -(-gw // kw) + cols.key[None, :]
            queries.append(q_tile[seen])
            keys.append(k_tile[seen])
            fulls.append(full[seen])
    query, key, full = torch.cat(queries), torch.cat(keys), torch.cat(fulls)
    k_records = _grid_tiles(layout, tiling.key)
    nq = q_first[-1]
    full_ptr, full_tiles = _csr(query[full], key[full], k_records, nq)
    partial_ptr, partial_tiles = _csr(query[~full], key[~full], k_records, nq)
    q_records = _grid_tiles(layout, tiling.query).to(torch.int32)
    return BlockSchedule(tiling, q_records, full_ptr, full_tiles, partial_ptr, partial_tiles)


@lru_cache(maxsize=64)
def _device_schedule(layout: CLEARLayout, tiling: Tiling, device: torch.device) -> BlockSchedule:
    return block_schedule(layout, tiling).to(device)


def _build_kernel():
    """``(kernel, in_window, step)`` for the mode triton was imported in (helpers go in as constexpr arguments).

    Triton wraps its own language functions (``tl.sum``, ``tl.zeros``...) for the compiler or the interpreter
    when ``triton.language`` is imported, according to ``TRITON_INTERPRET`` at that moment, and a kernel can only
    call functions wrapped for its own mode; so the mode is that of ``triton.language``, fixed per process.
    The interpreter runs helpers as plain Python on its patched tensors; the compiler needs JITFunctions.
    """
    helpers = (in_window, _triton_kernel.online_softmax_step)
    if isinstance(tl.zeros, InterpretedFunction):
        return True, (InterpretedFunction(_triton_kernel.clear_forward_kernel), *helpers)
    return False, (JITFunction(_triton_kernel.clear_forward_kernel), *(JITFunction(fn) for fn in helpers))


if triton is not None:
    INTERPRETED, _KERNEL = _build_kernel()  # INTERPRETED: kernels run in Triton's interpreter (CPU, tests only)


def _matmul_precision(dtype: torch.dtype) -> str:
    """fp32 dots in TF32 only where torch's own fp32 matmuls are allowed to use it (the dense oracle's rule)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: program grid, positional arguments, ``tl.constexpr`` arguments, launch options."""

    grid: tuple[int, int]
    args: tuple
    constexprs: dict
    options: dict


def kernel_launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    layout: CLEARLayout,
    scale: float,
    shared_memory: int | None = None,
) -> Launch:
    """The launch that writes the image rows of ``out`` ``(batch, q_len, heads, head_dim)``; shapes as in
    :class:`~clear_dit.backends.base.AttentionBackend`; ``shared_memory``: bytes a block may use (default: what the
    tensors' GPU gives, see :func:`choose_tiling`). Separate from running it so that it can be compiled for a GPU
    target without one (tests/test_triton.py)."""
    b, _, heads, dim = query.shape
    if shared_memory is None:
        shared_memory = _shared_memory(query.device)
    tiling = choose_tiling(layout, dim, query.dtype, shared_memory)
    schedule = _device_schedule(layout, tiling, query.device)
    _, circle, step = _KERNEL
    block_m = tiling.query[0] * tiling.query[1]
    block_d = max(16, _pow2_at_least(dim))  # tl.dot needs every block side >= 16
    tensors = (query, key, value, out, schedule.query_tiles, schedule.full_ptr, schedule.full_tiles)
    tensors += (schedule.partial_ptr, schedule.partial_tiles)
    strides = (*query.stride(), *key.stride(), *value.stride(), *out.stride())
    sizes = (heads, layout.text_start, layout.text_len, layout.q_len, layout.num_pooled, layout.window_size)
    constexprs = dict(
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        TILE_H=tiling.query[0],
        TILE_W=tiling.query[1],
        KEY_H=tiling.key[0],
        KEY_W=tiling.key[1],
        PRECISION=_matmul_precision(query.dtype),
        IN_WINDOW=circle,
        STEP=step,
    )
    qk_scale = scale * math.log2(math.e)  # the kernel's softmax runs in exp2
    grid = (schedule.query_tiles.shape[0], b * heads)
    options = {"num_warps": 8 if block_m * block_d >= 128 * 128 else 4, "num_stages": pipeline_stages(dim, query.dtype)}
    return Launch(grid, (*tensors, *strides, *sizes, qk_scale), constexprs, options)


def _shared_memory(device: torch.device) -> int:
    """The shared memory a block on ``device`` may opt into; :data:`CONSUMER_SHARED_MEMORY` off CUDA (the
    interpreter) or where torch does not say."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return CONSUMER_SHARED_MEMORY
    properties = torch.cuda.get_device_properties(device)
    return int(getattr(properties, "shared_memory_per_block_optin", CONSUMER_SHARED_MEMORY))


def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float):
    out = torch.empty_like(query)
    launch = kernel_launch(query, key, value, out, layout, scale)
    # Triton launches on the current CUDA device: the tensors' own, for tensors on another GPU than the current one
    with torch.cuda.device(query.device) if query.device.type == "cuda" else contextlib.nullcontext():
        _KERNEL[0][launch.grid](*launch.args, **launch.constexprs, **launch.options)
    write_text_rows(out, query, key, value, layout, scale)  # text rows through SDPA (see the module docstring)
    return out


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if triton is None:
            return _IMPORT_ERROR
        if (reason := dtype_reason(dtype, _SUPPORTED_DTYPES)) is not None:
            return reason
        if INTERPRETED and dtype == torch.bfloat16 and device.type in ("cpu", "cuda"):
            # its tl.dot multiplies the raw uint16 storage of bf16 blocks (triton 3.9): wrong results, refused (the
            # interpreter runs CUDA tensors too, through host copies)
            return "Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 dots wrongly; use float16 or float32"
        if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
            return None
        if device.type == "cpu":
            return "a GPU kernel: on CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1 before triton loads)"
        return f"needs a CUDA device, got {device.type}"

    def runs(self, device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None) -> bool:
        """Whether :meth:`__call__` takes such inputs (``None``: not known, assumed fine); what ``"auto"`` asks."""
        return self.unavailable_reason(device, dtype or torch.float16) is None and (head_dim or 0) <= MAX_HEAD_DIM

    # torch.compile: not traced (one graph break per call). Whether dynamo can trace this launch (a user Triton kernel
    # with helpers as constexpr arguments, inside an autograd.Function) is untested without a GPU; eager is safe.
    @torch.compiler.disable
    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        if query.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"backend 'triton' supports head_dim <= {MAX_HEAD_DIM}, got {query.shape[-1]}")
        b, _, heads, dim = query.shape
        expected = {"query": (b, layout.q_len, heads, dim), "key": (b, layout.kv_len, heads, dim)}
        expected["value"] = expected["key"]
        for name, tensor in (("query", query), ("key", key), ("value", value)):  # the kernel reads unchecked
            if tuple(tensor.shape) != expected[name] or tensor.dtype != query.dtype or tensor.device != query.device:
                raise ValueError(
                    f"backend 'triton': {name} must be {expected[name]} ({query.dtype} on {query.device}) for this "
                    f"layout, got {tuple(tensor.shape)} ({tensor.dtype} on {tensor.device})"
                )
        return with_tiled_backward(_forward, query, key, value, layout, scale)
