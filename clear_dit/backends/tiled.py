"""Backend ``"tiled"``: block-sparse CLEAR attention over 2D tiles of the image grid, in plain PyTorch.

CLEAR attention is split into three exact parts, each a softmax over a subset of the keys, and the image
parts are merged by their log-sum-exp (the same merge as flash attention's key blocks):

(a) text queries x text + image keys: one SDPA call (text rows of the mask are full, DESIGN.md 1.1);
(b) image queries x the *global* keys every image query sees: text + pooled; one call, its batch the tile
    columns, the global keys a stride-0 view shared by all of them;
(c) image queries x *local* image keys. The grid is cut into ``th x tw`` query tiles; tile ``(i, j)``
    sees the ``(th + 2*hy) x (tw + 2*hx)`` block of keys around it (``hy, hx``: the window's reach).
    The keys of tile column ``j`` are copied into one column strip of width ``tw + 2*hx`` (zero-padded by
    the reach and up to tile multiples); every tile's key block is then a contiguous run of its strip,
    i.e. a strided *view* (no per-tile gather), and the tiles of several columns (or, for a tall full-width
    band, a run of its tile rows) go through ONE attention call as its batch x heads dimensions. The
    chunks are sized so that their key and value strips stay within twice the keys' size: peak extra
    memory below 2x query + key + value. The window test is the same for every tile: one additive 0/-inf bias of shape
    ``(th*tw, key block)``, built from :func:`clear_dit.mask.in_window` and broadcast with stride 0.

Other layouts of :mod:`clear_dit.mask` use the same three parts. Text last (SD3) only moves the slices:
text + image keys are ``key[:, :q_len]`` in either order, the global keys are the text slice plus the
pooled tail. A reference grid (FLUX Kontext) shares the target's coordinates, so the image queries of
each grid run part (c) once against the key blocks of each grid, cut around the same tile positions, and
all parts are merged by their log-sum-exp. Tile and reach are those of the largest grid extents, so one
window bias serves every pair of grids.

Padding keys (outside the real grid) differ from tile to tile, so the shared bias cannot remove them.
They are removed through the keys instead: queries and keys get one extra channel, 1 for every query and
0 for a real key / a huge negative number for a padding key, so a padding key's score is ``-huge`` and
its softmax weight exactly 0 for every query. Padding queries (tile multiples) are computed and dropped.

Tile shapes come from :data:`TILE_SHAPES`, per CPU family, dtype and radius: the CPU flash kernel runs
slower on short query sequences (small tiles) but small tiles compute fewer masked scores, and the best
trade-off was measured on each family (see the table's comment).

Memory is linear in ``h*w``, and so is time without pooled keys (with them, part (b) scores every image query
against ``h*w / d**2`` pooled keys). On CPU the parts (b) and (c) run in
``aten._scaled_dot_product_flash_attention_for_cpu`` (which returns the log-sum-exp and accepts strided
and broadcast inputs), inside one ``torch.autograd.Function`` whose backward calls
``aten._scaled_dot_product_flash_attention_for_cpu_backward`` on the same views, once per part, with the
*merged* output and log-sum-exp (the softmax over the union of disjoint key sets has, for each set, the
gradient of that set's attention evaluated at the union's output and normaliser). Backward memory is
linear too: the key-block gradients of one chunk of strips at a time, summed back into the strips, and the
global keys' gradients of as many tile columns at a time as keep them within the image queries' size. On other
devices the same parts run as plain differentiable ops (matmul, logsumexp), materialising the scores of one
chunk of strips at a time, and those of all image queries against the global keys.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..mask import CLEARLayout, in_window
from .base import SDPA_DTYPES, dtype_reason

# Query tile (th, tw) per CPU family, dtype kind and radius: the first row whose radius bound is >= r applies.
# The best tile is a trade-off that differs between CPUs: small tiles compute fewer masked scores, but the CPU
# flash kernel runs slower on short query sequences, by how much depends on the microarchitecture.
# "intel": measured side by side with full SDPA on a 2-core Xeon @ 2.8 GHz (AVX-512, avx512_bf16; interleaved,
# 128^2 grid, text 512, 2 heads x 128, 2 threads, under load, medians of 3; full / tiled): fp32 r8: 16x16 5.0x,
# 8x8 5.1x, 4x16 4.7x, 8x16 4.1x; fp32 r16: 16x16 2.9x, 16x32 2.6x, 4x16 2.5x, 8x16 2.4x, 8x8 2.2x; fp32 r32:
# 16x16, 16x32, 32x32 all 1.25x; bf16 r8: 8x8 6.3x, 4x16 5.7x, 4x8 5.5x, 16x16 4.6x; bf16 r16: the image part
# alone, 4x8 6.7x, 16x16 5.4x, 8x8 / 8x16 5.2x; bf16 r32: 16x16 1.27x, 16x32 1.22x, 32x32 1.19x, 8x16 1.09x.
# There fp32 loses about half its throughput from 256 to 64 queries, bf16 much less, so bf16's tiles are smaller.
# "amd": a 2-core AMD EPYC (AVX-512, avx512_bf16, no AMX), quiet, the image parts (b) + (c) alone per tile (ms,
# medians of 3; `benchmarks/attention.py --tiles` times whole calls) at 128^2: fp32 r8 4x8 135, 2x8 134, 8x8 141,
# 16x16 168; fp32 r16 4x8 252, 8x8 260, 8x16 288, 16x16 316; fp32 r32 4x8 756, 12x16 780, 8x8 808, 16x16 829; bf16
# r8 4x8 126, 8x8 130, 16x16 164; bf16 r16 4x8 237, 8x8 257, 16x16 320; bf16 r32 4x8 680, 8x8 730, 16x16 811; and
# at 64^2 r16 fp32 4x8 65, 8x8 75, the 4x64 band 77, 16x16 83. Its flash kernel keeps ~60% of its long-sequence
# rate at 32 queries.
TILE_SHAPES: dict[str, dict[str, tuple[tuple[int, tuple[int, int]], ...]]] = {
    "intel": {
        "float": ((8, (16, 16)), (16, (16, 16)), (1 << 30, (16, 16))),
        "reduced": ((8, (8, 8)), (16, (4, 8)), (1 << 30, (16, 16))),
    },
    "amd": {"float": ((1 << 30, (4, 8)),), "reduced": ((1 << 30, (4, 8)),)},
}


def _detect_cpu_family() -> str:
    """``"amd"`` for AMD CPUs, else ``"intel"``: from ``torch.cpu.get_capabilities()["cpu_name"]`` where torch
    reports it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    name = capabilities().get("cpu_name", "") if capabilities is not None else ""
    return "amd" if "AMD" in name.upper() else "intel"


#: This machine's row of :data:`TILE_SHAPES`, read once at import: a fact of the machine, and a constant that
#: ``torch.compile`` can trace through (a call of ``torch.cpu.get_capabilities`` would break the graph).
CPU_FAMILY: str = _detect_cpu_family()


def tile_shape(layout: CLEARLayout, dtype: torch.dtype = torch.float32, family: str | None = None) -> tuple[int, int]:
    """The query tile ``(th, tw)`` the tiled backend uses for ``layout`` and ``dtype`` on a CPU ``family``.

    The tile of :data:`TILE_SHAPES` for the CPU family (default: :data:`CPU_FAMILY`, this machine's) and the
    radius (``"float"`` rows serve float32/float64, ``"reduced"`` rows bfloat16/float16: on Intel the CPU flash
    kernel's reduced-precision path keeps its throughput on shorter query sequences, so smaller tiles pay off),
    unless a full-width band of as many queries sees fewer keys: a tile spanning the whole width needs no
    horizontal reach, and all its tiles' key blocks are views of one strip (one flash call, no per-column
    copies and merges, which is worth up to 10% more keys). That wins when the window is wide for the grid.
    """
    if family is not None and family not in TILE_SHAPES:
        raise ValueError(f"unknown CPU family {family!r}; known: {', '.join(map(repr, TILE_SHAPES))}")
    kind = "reduced" if dtype in (torch.bfloat16, torch.float16) else "float"
    rows = TILE_SHAPES[family or CPU_FAMILY][kind]
    th, tw = next(tile for bound, tile in rows if layout.window_size <= bound)
    h, w = _extent(layout)
    band = (min(h, -(-th * tw // w)), w)
    return band if 10 * _keys_per_query(layout, band) <= 11 * _keys_per_query(layout, (th, tw)) else (th, tw)


def _keys_per_query(layout: CLEARLayout, tile: tuple[int, int]) -> int:
    """Scores per query when tiling with ``tile``: every query of a tile sees its whole key block."""
    kh, kw = _geometry(layout, layout.grid, tile).key_block
    return kh * kw


@dataclass(frozen=True)
class _TileGeometry:
    """Sizes of the tiling of one layout (all in tokens)."""

    tile: tuple[int, int]  # (th, tw): query tile
    reach: tuple[int, int]  # (hy, hx): the window's farthest row / column offset inside the grid
    tiles: tuple[int, int]  # (nty, ntx): tiles per column / row
    row0: int = 0  # key row of the query grid's first row (a band of rows of a taller key grid: bands.py)

    @property
    def key_block(self) -> tuple[int, int]:
        (th, tw), (hy, hx) = self.tile, self.reach
        return th + 2 * hy, tw + 2 * hx

    @property
    def padded_grid(self) -> tuple[int, int]:
        """The query grid rounded up to tile multiples."""
        return self.tiles[0] * self.tile[0], self.tiles[1] * self.tile[1]

    @property
    def strip_rows(self) -> int:
        """Rows of a key strip: the padded grid plus the reach above and below."""
        return self.padded_grid[0] + 2 * self.reach[0]


def _extent(layout: CLEARLayout) -> tuple[int, int]:
    """Rows and columns spanned by all image grids in their shared coordinate space."""
    return max(h for h, _ in layout.image_grids), max(w for _, w in layout.image_grids)


@lru_cache(maxsize=64)
def _geometry(layout: CLEARLayout, grid: tuple[int, int], tile: tuple[int, int], row0: int = 0) -> _TileGeometry:
    """Tiling of the query grid ``grid`` (one of ``layout.image_grids``, or the rows ``[row0, row0 + grid[0])``
    of its only grid); tile and reach are the layout's.

    A tile spanning all rows (columns) of the grids has no reach along them: its key block holds them all.
    """
    h, w = _extent(layout)
    th, tw = min(tile[0], h), min(tile[1], w)
    r = layout.window_size - 1
    reach = (0 if th == h else min(r, h - 1)), (0 if tw == w else min(r, w - 1))
    return _TileGeometry(tile=(th, tw), reach=reach, tiles=(-(-grid[0] // th), -(-grid[1] // tw)), row0=row0)


@lru_cache(maxsize=64)
def _window_bias(layout: CLEARLayout, tile: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(th*tw, key block)`` additive bias, 0 inside the window of the query, -inf outside; same for all tiles."""
    geo = _geometry(layout, layout.grid, tile)
    (th, tw), (hy, hx), (kh, kw) = geo.tile, geo.reach, geo.key_block
    # key (ky, kx) of a tile's key block sits at offset (ky - hy, kx - hx) from the tile's top-left query
    dy = torch.arange(th)[:, None] - (torch.arange(kh)[None, :] - hy)  # (th, kh)
    dx = torch.arange(tw)[:, None] - (torch.arange(kw)[None, :] - hx)  # (tw, kw)
    inside = in_window(dy[:, None, :, None], dx[None, :, None, :], layout.window_size)  # (th, tw, kh, kw)
    bias = torch.zeros(inside.shape, dtype=dtype).masked_fill_(~inside, float("-inf"))
    return bias.reshape(th * tw, kh * kw).to(device)


def computed_scores(layout: CLEARLayout, dtype: torch.dtype = torch.float32) -> int:
    """Number of (query, key) scores this backend computes per batch and head, padding and masked ones included.

    The cost model of :func:`clear_dit.backends.auto_backend_name`.
    """
    if layout.covers_grid and layout.down_factor == 1:
        return layout.q_len * layout.kv_len
    t, n, grids = layout.text_len, layout.num_image, layout.image_grids
    tile = tile_shape(layout, dtype)
    local = 0
    for grid in grids:
        geo = _geometry(layout, grid, tile)
        (hp, wp), (kh, kw) = geo.padded_grid, geo.key_block
        local += len(grids) * hp * wp * kh * kw
    return t * (t + n) + n * (t + layout.num_pooled) + local


def _padding_key_score(dtype: torch.dtype, scale: float) -> float:
    """Extra-channel value of padding keys: its score times ``scale`` underflows exp() to 0 and stays finite (a
    block of padding keys alone, beside a smaller reference grid, needs a finite log-sum-exp to merge)."""
    return torch.finfo(dtype).min / 2 / max(1.0, scale)


#: Padding keys' score (times the scale) must stay below this for exp() to drop them beside real scores near 0.
_MAX_PADDING_SCORE = -1000.0


def scale_fits(scale: float, dtype: torch.dtype) -> bool:
    """Whether padding keys stay out of the softmax at ``scale`` in ``dtype`` (fp16's range ends below about 0.03)."""
    return _padding_key_score(dtype, scale) * scale <= _MAX_PADDING_SCORE


def _check_scale(scale: float, dtype: torch.dtype) -> None:
    """One-line ``ValueError`` for a scale so small that padding keys would take softmax weight (fp16's range)."""
    if not scale_fits(scale, dtype):
        raise ValueError(
            f"scale {scale:g} is too small for the tiled backend in {dtype}: its padding keys would take softmax "
            "weight; use backend='dense'"
        )


def _uses_fused_cpu_kernel(*tensors: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].device.type == "cpu" and not grad


def _flash(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash kernel on ``(N, heads, L, D)`` (strided) tensors: ``(out, lse)``; ``bias`` broadcast as is."""
    if bias is not None:
        bias = bias.expand(*query.shape[:-1], key.shape[-2])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, attn_mask=bias, scale=scale
    )
    return out, lse


def _plain_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in plain differentiable ops, scores materialised; ``lse`` in fp32 or wider."""
    accumulate = torch.promote_types(query.dtype, torch.float32)  # bf16 scores would be rounded to 8 mantissa bits
    scores = torch.matmul(query.to(accumulate), key.to(accumulate).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    lse = scores.logsumexp(dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(value.dtype), value)
    return out, lse


def _attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on ``(N, heads, L, D)`` tensors; returns ``(out, lse)``, ``lse`` ``(N, heads, L)`` in fp32+.

    ``bias`` is an additive mask broadcastable to the scores (stride 0 broadcasting is kept as such). The CPU
    flash kernel without autograd, plain ops otherwise.
    """
    if _uses_fused_cpu_kernel(query, key, value):
        return _flash(query, key, value, scale, bias)
    return _plain_attention_with_lse(query, key, value, scale, bias)


def _query_tiles(query: torch.Tensor, geo: _TileGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """Image queries ``(B, h*w, H, D)`` -> tiles ``(ntx, B, H, nty, th*tw, D + 1)``, extra channel 1.

    Tile columns lead, so that the tiles of several columns, batch and heads merge into one flash batch dim.
    """
    (h, w), (th, tw), (nty, ntx), (hp, wp) = grid, geo.tile, geo.tiles, geo.padded_grid
    b, _, heads, dim = query.shape
    source = query.reshape(b, h, w, heads, dim)
    if (hp, wp) != (h, w):
        source = F.pad(source, (0, 0, 0, 0, 0, wp - w, 0, hp - h))
    tiles = query.new_empty(ntx, b, heads, nty, th, tw, dim + 1)
    as_grid = tiles.permute(1, 3, 4, 0, 5, 2, 6)  # (B, nty, th, ntx, tw, H, D + 1)
    as_grid[..., :dim] = source.reshape(b, nty, th, ntx, tw, heads, dim)
    as_grid[..., dim] = 1
    return tiles.reshape(ntx, b, heads, nty, th * tw, dim + 1)


def _tiles_to_rows(tiles: torch.Tensor, geo: _TileGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_query_tiles` for outputs ``(ntx, B, H, nty, th*tw, C)`` -> a view ``(B, h, w, H, C)``."""
    (h, w), (th, tw), (nty, ntx), (hp, wp) = grid, geo.tile, geo.tiles, geo.padded_grid
    _, b, heads, *_, chans = tiles.shape
    rows = tiles.reshape(ntx, b, heads, nty, th, tw, chans).permute(1, 3, 4, 0, 5, 2, 6)
    return rows.reshape(b, hp, wp, heads, chans)[:, :h, :w]


def _strip_columns(geo: _TileGeometry, key_grid: tuple[int, int], column: int) -> tuple[int, int, int]:
    """``(x0, a, e)``: strip ``column`` starts at key column ``x0``; key columns ``[a, e)`` are real ones."""
    x0 = column * geo.tile[1] - geo.reach[1]
    return x0, max(0, x0), min(key_grid[1], x0 + geo.key_block[1])


@dataclass(frozen=True)
class _Chunk:
    """The tiles of one flash call: tile columns ``[j0, j1)`` x tile rows ``[i0, i1)``."""

    j0: int
    j1: int
    i0: int
    i1: int

    def strip_rows(self, geo: _TileGeometry) -> int:
        """Key rows the chunk's tiles reach, padding included: its tile rows plus the reach above and below."""
        return (self.i1 - self.i0) * geo.tile[0] + 2 * geo.reach[0]

    def key_row_span(self, geo: _TileGeometry, key_grid: tuple[int, int]) -> tuple[int, int, int]:
        """``(y0, ya, ye)``: strip row 0 is key row ``y0``; key rows ``[ya, ye)`` are real ones (the rest of a
        taller key grid is out of every window of the chunk)."""
        y0 = geo.row0 + self.i0 * geo.tile[0] - geo.reach[0]
        last = min(key_grid[0], geo.row0 + self.i1 * geo.tile[0] + geo.reach[0])
        return y0, max(0, y0), max(0, y0, last)  # a shorter key grid may end above the chunk


def _chunks(geo: _TileGeometry, key_grid: tuple[int, int], dim: int, split_rows: bool) -> list[_Chunk]:
    """The flash calls of one part (c): as many tiles each as keep the key + value strips within twice the keys.

    Fewer, longer calls run faster; the bound keeps the extra memory linear and within the budget of
    issue 3 (peak extra memory at most 2x q + k + v, measured by benchmarks/attention.py --memory). Whole
    tile columns while one fits the bound; otherwise (a tall, wide band) one column cut into runs of tile
    rows, if ``split_rows``.
    """
    (nty, ntx), (th, _), (hy, _), (_, kw) = geo.tiles, geo.tile, geo.reach, geo.key_block
    budget, per_row = key_grid[0] * key_grid[1] * dim, kw * (dim + 1)
    per_call = budget // (geo.strip_rows * per_row)
    if per_call or not split_rows:
        per_call = max(1, per_call)
        return [_Chunk(j, min(ntx, j + per_call), 0, nty) for j in range(0, ntx, per_call)]
    rows = max(1, (budget // per_row - 2 * hy) // th)
    return [_Chunk(j, j + 1, i, min(nty, i + rows)) for j in range(ntx) for i in range(0, nty, rows)]


def _strip_buffers(tiles: torch.Tensor, geo: _TileGeometry, chunks: list[_Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value strip buffers ``(n, B, H, rows, kw, C)`` large enough for every chunk."""
    _, b, heads, *_, chans = tiles.shape
    n = max(c.j1 - c.j0 for c in chunks)
    rows = max(c.strip_rows(geo) for c in chunks)
    shape = (n, b, heads, rows, geo.key_block[1], chans)
    return tiles.new_zeros(shape), tiles.new_zeros(shape)


def _fill_strips(
    buffer: torch.Tensor,
    tokens: torch.Tensor,
    geo: _TileGeometry,
    key_grid: tuple[int, int],
    chunk: _Chunk,
    padding_channel: float,
) -> torch.Tensor:
    """Write the key strips of ``chunk``'s tiles into ``buffer``; returns them, ``(n, B, H, rows, kw, D + 1)``.

    ``tokens``: keys or values ``(B, hk*wk, H, D)`` of a key grid sharing the query grid's coordinates
    (the grid itself, or the other image of a Kontext layout). The extra channel is 0 on real tokens and
    ``padding_channel`` on padding ones (the reach around the grid, the tile multiples). ``buffer`` starts
    as zeros and is reused: stale entries outside the real region are finite earlier keys, which the
    extra channel (keys) or a zero softmax weight (values) cancels exactly.
    """
    tw, kw = geo.tile[1], geo.key_block[1]
    b, _, heads, dim = tokens.shape
    strips = buffer[: chunk.j1 - chunk.j0, :, :, : chunk.strip_rows(geo)]
    y0, ya, ye = chunk.key_row_span(geo, key_grid)
    source = tokens.reshape(b, *key_grid, heads, dim)[:, ya:ye]  # (B, real rows, wk, H, D)
    rows = slice(ya - y0, ye - y0)
    spans = [_strip_columns(geo, key_grid, j) for j in range(chunk.j0, chunk.j1)]
    inner = [s for s, (x0, a, e) in enumerate(spans) if a == x0 and e == x0 + kw]
    if inner:  # strips fully inside the grid: one copy through an unfold view
        s0, s1 = inner[0], inner[-1] + 1
        windows = source[:, :, spans[s0][0] :].unfold(2, kw, tw)[:, :, : s1 - s0]  # (B, rows, n, H, D, kw)
        strips[s0:s1, :, :, rows, :, :dim] = windows.permute(2, 0, 3, 1, 5, 4)
    for s, (x0, a, e) in enumerate(spans):
        if a < e and not (inner and inner[0] <= s <= inner[-1]):
            strips[s, :, :, rows, a - x0 : e - x0, :dim] = source[:, :, a:e].permute(0, 3, 1, 2, 4)
    if padding_channel:
        strips[..., dim] = padding_channel
        for s, (x0, a, e) in enumerate(spans):
            strips[s, :, :, rows, max(0, a - x0) : max(0, e - x0), dim] = 0
    return strips


def _strip_blocks(strips: torch.Tensor, geo: _TileGeometry) -> torch.Tensor:
    """The key blocks of the strips' tiles, a view ``(n*B*H, m, kh*kw, C)`` of ``(n, B, H, rows, kw, C)``."""
    rows, kw, chans = strips.shape[-3:]
    (th, _), (hy, _), (kh, _) = geo.tile, geo.reach, geo.key_block
    row = kw * chans  # strides written out: a sliced buffer keeps the buffer's strides
    size = (strips.shape[:3].numel(), (rows - 2 * hy) // th, kh * kw, chans)
    return strips.as_strided(size, (strips.stride(2), th * row, chans, 1))  # keeps the slice's storage offset


def _add_strip_grads(
    grad: torch.Tensor,
    block_grad: torch.Tensor,
    geo: _TileGeometry,
    key_grid: tuple[int, int],
    chunk: _Chunk,
    strip_shape: torch.Size,
) -> None:
    """Adjoint of :func:`_fill_strips` + :func:`_strip_blocks`: add key-block gradients to ``grad`` in place.

    ``block_grad`` ``(n*B*H, m, kh*kw, C)``; ``grad`` ``(B, hk, wk, H, D)``, the key grid's gradient.
    """
    n, b, heads, rows, kw, chans = strip_shape
    th, kh, m = geo.tile[0], geo.key_block[0], chunk.i1 - chunk.i0
    strips = block_grad.new_zeros(n * b * heads, rows, kw, chans)
    blocks = block_grad.reshape(n * b * heads, m, kh, kw, chans)
    for i in range(m):  # consecutive blocks overlap by kh - th rows
        strips[:, i * th : i * th + kh] += blocks[:, i]
    strips = strips.reshape(strip_shape)
    y0, ya, ye = chunk.key_row_span(geo, key_grid)
    dim = grad.shape[-1]
    for s, j in enumerate(range(chunk.j0, chunk.j1)):  # neighbouring strips overlap by kw - tw columns
        x0, a, e = _strip_columns(geo, key_grid, j)
        if a < e:
            part = strips[s, :, :, ya - y0 : ye - y0, a - x0 : e - x0, :dim]
            grad[:, ya:ye, a:e] += part.permute(0, 2, 3, 1, 4)


@dataclass(frozen=True)
class _RowsPlan:
    """What :func:`_rows_forward` needs besides tensors: the tiling, the key grids and the softmax scale."""

    geo: _TileGeometry
    key_grids: tuple[tuple[int, int], ...]
    scale: float


def _merge(
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor, in_place: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from their ``(out (..., L, C), lse (..., L))``.

    ``in_place`` updates ``out`` and ``lse`` (views) with in-place methods, which dynamo traces (``out=`` on
    non-contiguous views it does not).
    """
    gain = torch.sigmoid(part_lse - lse)[..., None].to(out.dtype)  # exp(part_lse - logaddexp(...)): new set's weight
    if in_place:
        return out.lerp_(part_out, gain), lse.copy_(torch.logaddexp(lse, part_lse))
    return torch.lerp(out, part_out, gain), torch.logaddexp(lse, part_lse)


@dataclass(frozen=True)
class PartKernels:
    """The two operations of the decomposition off the CPU flash path; other backends (``"xformers"``) put in theirs.

    ``attend(q, k, v, scale, bias=None) -> (out, lse)`` on ``(N, heads, L, C)`` tensors (``lse`` ``(N, heads, L)``);
    ``merge(out, lse, part_out, part_lse, in_place) -> (out, lse)``, the softmax over two disjoint key sets.
    """

    attend: Callable = _plain_attention_with_lse
    merge: Callable = _merge


def _rows_forward(
    plan: _RowsPlan,
    tiles: torch.Tensor,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None,
    grid_kv: list[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor,
    fused: bool,
    kernels: PartKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts (b) and (c) for one query grid's tiles ``(ntx, B, H, nty, L, C)``: merged ``(out, lse)``, tile layout.

    ``fused``: the CPU flash kernel, no autograd (reused strip buffers, in-place merges); else differentiable
    ops with fresh buffers: ``kernels`` (another library's part attention and merge), by default plain ops.
    """
    kernels = PartKernels(_flash, _merge) if fused else kernels or PartKernels()
    attend, merge = kernels.attend, kernels.merge
    ntx, b, heads, nty, length, chans = tiles.shape
    geo, dim = plan.geo, chans - 1
    out = lse = None
    if global_kv is not None:  # (b) the tiles are just a query order for the global keys, shared by every column
        queries = tiles.reshape(ntx, b * heads, -1, chans)
        out, lse = attend(queries, *(_per_column(t, ntx) for t in global_kv), plan.scale)
        out, lse = out.reshape(tiles.shape), lse.reshape(tiles.shape[:-1])
    padding = _padding_key_score(tiles.dtype, plan.scale)
    for key_grid, (key, value) in zip(plan.key_grids, grid_kv):  # noqa: B905 (dynamo mis-traces strict zips)
        chunks = _chunks(geo, key_grid, dim, split_rows=fused)
        buffers = _strip_buffers(tiles, geo, chunks) if fused else None
        first = out is None
        if fused and first:
            out = tiles.new_empty(tiles.shape)
        outs, lses = [], []
        for c in chunks:  # (c) batch = (columns, B, H), "heads" = tile rows
            k_buffer, v_buffer = buffers or _strip_buffers(tiles, geo, [c])
            k = _strip_blocks(_fill_strips(k_buffer, key, geo, key_grid, c, padding), geo)
            v = _strip_blocks(_fill_strips(v_buffer, value, geo, key_grid, c, 0.0), geo)
            n, m = c.j1 - c.j0, c.i1 - c.i0
            q = tiles[c.j0 : c.j1, :, :, c.i0 : c.i1].reshape(n * b * heads, m, length, chans)
            part_out, part_lse = attend(q, k, v, plan.scale, bias)
            part = part_out.reshape(n, b, heads, m, length, chans), part_lse.reshape(n, b, heads, m, length)
            if fused:  # in place, chunk by chunk
                target = (slice(c.j0, c.j1), slice(None), slice(None), slice(c.i0, c.i1))
                if lse is None:
                    lse = part_lse.new_empty(tiles.shape[:-1])
                if first:
                    out[target], lse[target] = part
                else:
                    merge(out[target], lse[target], *part, in_place=True)
            else:  # whole tile columns, concatenated once
                merged = part if first else merge(out[c.j0 : c.j1], lse[c.j0 : c.j1], *part, in_place=False)
                outs.append(merged[0])
                lses.append(merged[1])
        if not fused:
            out, lse = torch.cat(outs), torch.cat(lses)
    return out, lse


class _FlashImageRows(torch.autograd.Function):
    """Parts (b) + (c) of one query grid on the CPU flash kernel, with its flash backward (memory-linear).

    ``forward(plan, bias, tiles, global_k, global_v, key_1, value_1[, key_2, value_2])``: ``tiles``
    ``(ntx, B, H, nty, L, C)``, ``global_k/v`` ``(B, H, G, C)`` (:func:`_global_tokens`) or ``None``, one
    ``(key, value)`` ``(B, hk*wk, H, D)`` per key grid.
    Returns the merged output in tile layout. Backward: each part's flash backward at the merged output and
    log-sum-exp, key-block gradients summed back one chunk of tile columns at a time.
    """

    @staticmethod
    def forward(ctx, plan, bias, tiles, global_k, global_v, key_1, value_1, key_2=None, value_2=None):
        # fixed arguments, not *args: dynamo mis-traces var-args of autograd Functions (at most two image grids)
        global_kv = None if global_k is None else (global_k, global_v)
        pairs = [(key_1, value_1)] + ([] if key_2 is None else [(key_2, value_2)])
        out, lse = _rows_forward(plan, tiles, global_kv, pairs, bias, fused=True)
        ctx.plan, ctx.bias, ctx.has_global = plan, bias, global_kv is not None
        ctx.save_for_backward(tiles, global_k, global_v, out, lse, *(t for pair in pairs for t in pair))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tiles, global_k, global_v, out, lse, *grid_kv = ctx.saved_tensors
        plan, scale, geo = ctx.plan, ctx.plan.scale, ctx.plan.geo
        ntx, b, heads, nty, length, chans = tiles.shape
        grad_out = grad_out.contiguous()
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_global_k = grad_global_v = None
        if ctx.has_global:
            grad_tiles = torch.empty_like(tiles)
            # summed in fp32 (or wider): one rounding of the sum over all columns, as autograd's sum of copies had
            accumulate = torch.promote_types(global_k.dtype, torch.float32)
            grad_global_k, grad_global_v = (torch.zeros_like(t, dtype=accumulate) for t in (global_k, global_v))
            # the kernel returns one key gradient per tile column: as many columns a call as keep them within
            # the image queries' size (all of them for FLUX's 512 text keys without pooled keys)
            per_call = max(1, tiles.numel() // global_k.numel())
            for j0 in range(0, ntx, per_call):
                cols = slice(j0, j0 + per_call)
                flat = (-1, b * heads, nty * length, chans)
                grad_q, grad_k, grad_v = backward(
                    grad_out[cols].reshape(flat), tiles[cols].reshape(flat), _per_column(global_k, ntx)[cols],
                    _per_column(global_v, ntx)[cols], out[cols].reshape(flat), lse[cols].reshape(flat[:3]), 0.0,
                    False, scale=scale,
                )  # fmt: skip
                grad_tiles[cols] = grad_q.reshape(grad_tiles[cols].shape)
                grad_global_k += grad_k.sum(0, dtype=accumulate).reshape(global_k.shape)
                grad_global_v += grad_v.sum(0, dtype=accumulate).reshape(global_v.shape)
            grad_global_k, grad_global_v = grad_global_k.to(global_k.dtype), grad_global_v.to(global_v.dtype)
        else:
            grad_tiles = torch.zeros_like(tiles)
        padding = _padding_key_score(tiles.dtype, plan.scale)
        grads = []
        for key_grid, key, value in zip(plan.key_grids, grid_kv[::2], grid_kv[1::2], strict=True):
            grad_k = key.new_zeros(b, *key_grid, heads, key.shape[-1])
            grad_v = torch.zeros_like(grad_k)
            chunks = _chunks(geo, key_grid, chans - 1, split_rows=True)
            buffers = _strip_buffers(tiles, geo, chunks)
            for c in chunks:
                k_strips = _fill_strips(buffers[0], key, geo, key_grid, c, padding)
                v_strips = _fill_strips(buffers[1], value, geo, key_grid, c, 0.0)
                k, v = _strip_blocks(k_strips, geo), _strip_blocks(v_strips, geo)
                n, m = c.j1 - c.j0, c.i1 - c.i0
                flat = (n * b * heads, m, length, chans)
                target = (slice(c.j0, c.j1), slice(None), slice(None), slice(c.i0, c.i1))
                grad_q, grad_kb, grad_vb = backward(
                    grad_out[target].reshape(flat), tiles[target].reshape(flat), k, v, out[target].reshape(flat),
                    lse[target].reshape(flat[:3]), 0.0, False, attn_mask=ctx.bias.expand(*flat[:3], k.shape[2]),
                    scale=scale,
                )  # fmt: skip
                grad_tiles[target] += grad_q.reshape(n, b, heads, m, length, chans)
                _add_strip_grads(grad_k, grad_kb, geo, key_grid, c, k_strips.shape)
                _add_strip_grads(grad_v, grad_vb, geo, key_grid, c, v_strips.shape)
            grads += [grad_k.reshape(key.shape), grad_v.reshape(value.shape)]
        return None, None, grad_tiles, grad_global_k, grad_global_v, *grads, *([None, None] if len(grads) == 2 else [])


def _global_tokens(tokens: torch.Tensor, layout: CLEARLayout) -> torch.Tensor:
    """Text + pooled keys or values ``(B, kv_len, H, D)`` -> ``(B, H, G, D + 1)``, extra channel 0; written in
    place of a concatenation."""
    b, _, heads, dim = tokens.shape
    t0, t = layout.text_start, layout.text_len
    out = tokens.new_empty(b, heads, t + layout.num_pooled, dim + 1)
    out[..., dim] = 0
    out[..., :t, :dim] = tokens[:, t0 : t0 + t].transpose(1, 2)
    out[..., t:, :dim] = tokens[:, layout.q_len :].transpose(1, 2)
    return out


def _per_column(tokens: torch.Tensor, columns: int) -> torch.Tensor:
    """Global keys or values ``(B, H, G, C)`` as ``(columns, B*H, G, C)``, a stride-0 view: the batch of a flash
    call whose batch dimension is the tile columns (a copy per column would grow with width x pooled keys)."""
    return tokens.reshape(1, -1, *tokens.shape[2:]).expand(columns, -1, -1, -1)


def _grid_slices(layout: CLEARLayout) -> list[tuple[tuple[int, int], slice]]:
    """``(grid, slice of its tokens)`` for every image grid, in sequence order."""
    slices, start = [], layout.image_start
    for h, w in layout.image_grids:
        slices.append(((h, w), slice(start, start + h * w)))
        start += h * w
    return slices


def _image_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: CLEARLayout,
    scale: float,
    tile: tuple[int, int] | None = None,
    fused: bool | None = None,
    kernels: PartKernels | None = None,
) -> list[torch.Tensor]:
    """Parts (b) and (c): the image queries of each grid x CLEAR keys/values, as views ``(B, h, w, H, D)``.

    ``tile`` overrides :func:`tile_shape`; ``fused`` (default: on CPU without ``kernels``) picks the
    flash-kernel autograd Function over the differentiable path, which runs ``kernels`` (default plain ops).
    """
    tile = tile or tile_shape(layout, query.dtype)
    fused = query.device.type == "cpu" and kernels is None if fused is None else fused
    bias = _window_bias(layout, tile, query.device, query.dtype)
    grids = _grid_slices(layout)
    grid_kv = [(key[:, tokens], value[:, tokens]) for _, tokens in grids]
    key_grids = tuple(key_grid for key_grid, _ in grids)
    return [
        _grid_rows(query[:, tokens], key, value, grid_kv, layout, _geometry(layout, grid, tile), grid, key_grids,
                   bias, scale, fused, kernels)
        for grid, tokens in grids
    ]  # fmt: skip


def _grid_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid_kv: list[tuple[torch.Tensor, torch.Tensor]],
    layout: CLEARLayout,
    geo: _TileGeometry,
    grid: tuple[int, int],
    key_grids: tuple[tuple[int, int], ...],
    bias: torch.Tensor,
    scale: float,
    fused: bool,
    kernels: PartKernels | None,
) -> torch.Tensor:
    """Parts (b) and (c) of one query grid: ``query`` ``(B, h*w, H, D)`` -> a view ``(B, h, w, H, D)``.

    ``key``/``value`` are the layout's whole sequences (their global keys), ``grid_kv`` the keys/values of each
    of ``key_grids``.
    """
    _check_scale(scale, query.dtype)
    dim = query.shape[-1]
    plan = _RowsPlan(geo, key_grids, scale)
    tiles = _query_tiles(query, geo, grid)  # (ntx, B, H, nty, th*tw, D + 1)
    global_k = global_v = None
    if layout.text_len + layout.num_pooled:  # (b) global: text + pooled keys, the same for every image query
        global_k, global_v = (_global_tokens(t, layout) for t in (key, value))
    if fused:
        flat_kv = [t for pair in grid_kv for t in pair]
        out = _FlashImageRows.apply(plan, bias, tiles, global_k, global_v, *flat_kv)
    else:
        global_kv = None if global_k is None else (global_k, global_v)
        out, _ = _rows_forward(plan, tiles, global_kv, grid_kv, bias, fused=False, kernels=kernels)
    return _tiles_to_rows(out[..., :dim], geo, grid)


def band_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, rows: tuple[int, int],
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """Parts (b) and (c) for the image queries of rows ``[start, stop)`` of ``layout``'s only grid: a view
    ``(B, stop - start, w, H, D)``. Only the band's queries are computed; the key grid's other rows are keys.

    Args:
        query: ``(B, (stop - start) * w, H, D)``, the band's image queries, row-major.
        key, value: ``(B, kv_len, H, D)``, the whole layout's keys/values (text/global keys, then the grid).
    """
    if len(layout.image_grids) != 1:
        raise ValueError(f"band_rows needs a layout with one image grid, got {layout.image_grids}")
    (r0, r1), w = rows, layout.grid[1]
    tile = tile_shape(layout, query.dtype)
    tile = (min(tile[0], r1 - r0), tile[1])  # a thin band: no padding rows beyond it
    geo = _geometry(layout, (r1 - r0, w), tile, r0)
    (_, tokens), fused = _grid_slices(layout)[0], query.device.type == "cpu"
    bias = _window_bias(layout, tile, query.device, query.dtype)
    grid_kv = [(key[:, tokens], value[:, tokens])]
    return _grid_rows(query, key, value, grid_kv, layout, geo, (r1 - r0, w), (layout.grid,), bias, scale, fused, None)


def _is_size(n: object) -> bool:
    """A positive int (or numpy integer), not a bool or a float."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


class TiledBackend:
    """The ``"tiled"`` backend; ``TiledBackend(tile=(th, tw))`` runs with a fixed query tile instead of
    :func:`tile_shape`'s (``benchmarks/attention.py --tiles`` times tile shapes with it)."""

    name = "tiled"
    kernels: PartKernels | None = None  # None: the CPU flash path on CPU, plain ops elsewhere (see _image_rows)

    def __init__(self, tile: tuple[int, int] | None = None) -> None:
        if tile is not None and not (isinstance(tile, (tuple, list)) and len(tile) == 2 and all(map(_is_size, tile))):
            raise ValueError(f"tile must be two positive sizes (rows, columns), got {tile!r}")
        self.tile = None if tile is None else tuple(map(int, tile))

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return dtype_reason(dtype, SDPA_DTYPES)

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        # no images or no heads: nothing to tile (the reshapes below need a size); the empty SDPA call keeps the
        # outputs in the autograd graph. A window covering the grid without pooled keys: CLEAR is full attention.
        if query.numel() == 0 or (layout.covers_grid and layout.down_factor == 1):
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)
        out = query.new_empty(query.shape)  # every part is written into its slice (no concatenation)
        image = _image_rows(query, key, value, layout, scale, self.tile, kernels=self.kernels)
        for (_, tokens), rows in zip(_grid_slices(layout), image):  # noqa: B905 (dynamo mis-traces strict zips)
            out[:, tokens].view(rows.shape).copy_(rows)
        write_text_rows(out, query, key, value, layout, scale)
        return out


def write_text_rows(
    out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
) -> None:
    """Part (a) into ``out``'s text rows: text queries see every text and image key and no pooled key, i.e. plain
    unmasked attention over ``key[:, :q_len]`` (one SDPA call). Shapes as in
    :class:`~clear_dit.backends.base.AttentionBackend`; no-op without text."""
    if not layout.text_len:
        return
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    out[:, text] = F.scaled_dot_product_attention(
        query[:, text].transpose(1, 2),
        key[:, : layout.q_len].transpose(1, 2),
        value[:, : layout.q_len].transpose(1, 2),
        scale=scale,
    ).transpose(1, 2)
