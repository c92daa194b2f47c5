"""Backend ``"tiled"``: block-sparse CLEAR attention over 2D tiles of the image grid, in plain PyTorch.

CLEAR attention is split into three exact parts, each a softmax over a subset of the keys, and the image
parts are merged by their log-sum-exp (the same merge as flash attention's key blocks):

(a) text queries x text + image keys: one SDPA call (text rows of the mask are full, DESIGN.md 1.1);
(b) image queries x the *global* keys every image query sees: text + pooled;
(c) image queries x *local* image keys. The grid is cut into ``th x tw`` query tiles; tile ``(i, j)``
    sees the ``(th + 2*hy) x (tw + 2*hx)`` block of keys around it (``hy, hx``: the window's reach).
    All tiles go through ONE attention call as its batch dimension: the key grid is zero-padded by the
    reach (and up to tile multiples), copied once into overlapping column strips of width ``tw + 2*hx``,
    and every tile's key block is then a contiguous run of a strip, i.e. a strided *view* (no per-tile
    gather). The window test is the same for every tile: one additive 0/-inf bias of shape
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

Memory and time are linear in ``h*w``. Without autograd on CPU the parts run in
``aten._scaled_dot_product_flash_attention_for_cpu`` (which returns the log-sum-exp and accepts strided
inputs). With autograd, or on other devices, the same parts run as plain ops (matmul, logsumexp), so
gradients are exact; this path materialises the scores of each tile, ``O(h*w * key block)`` memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..mask import CLEARLayout, in_window

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class _TileGeometry:
    """Sizes of the tiling of one layout (all in tokens)."""

    tile: tuple[int, int]  # (th, tw): query tile
    reach: tuple[int, int]  # (hy, hx): the window's farthest row / column offset inside the grid
    tiles: tuple[int, int]  # (nty, ntx): tiles per column / row

    @property
    def key_block(self) -> tuple[int, int]:
        (th, tw), (hy, hx) = self.tile, self.reach
        return th + 2 * hy, tw + 2 * hx

    @property
    def padded_grid(self) -> tuple[int, int]:
        """The query grid rounded up to tile multiples."""
        return self.tiles[0] * self.tile[0], self.tiles[1] * self.tile[1]


def _tile_side(window_size: int) -> int:
    """Query tile side: small tiles waste fewer keys (``(t + 2r)^2`` per query), large ones run longer GEMMs.

    Measured on the shared 2-core dev CPU (noisy), 128^2 grid, text 512, fused CPU kernel: for radius 16, 16 beat
    8/12/20/24/32; for radius 32, 32 beat 8/16; for radius 8, 4 was ~15% faster than 8 (8 kept: 4x more
    tiles). Finer tuning is left to the speed issue.
    """
    return 8 if window_size <= 8 else 16 if window_size <= 16 else 32


def _extent(layout: CLEARLayout) -> tuple[int, int]:
    """Rows and columns spanned by all image grids in their shared coordinate space."""
    return max(h for h, _ in layout.image_grids), max(w for _, w in layout.image_grids)


@lru_cache(maxsize=64)
def _geometry(layout: CLEARLayout, grid: tuple[int, int]) -> _TileGeometry:
    """Tiling of the query grid ``grid`` (one of ``layout.image_grids``); tile and reach are the layout's."""
    h, w = _extent(layout)
    side = _tile_side(layout.window_size)
    th, tw = min(side, h), min(side, w)
    reach = min(layout.window_size - 1, h - 1), min(layout.window_size - 1, w - 1)
    return _TileGeometry(tile=(th, tw), reach=reach, tiles=(-(-grid[0] // th), -(-grid[1] // tw)))


@lru_cache(maxsize=64)
def _window_bias(layout: CLEARLayout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(th*tw, key block)`` additive bias, 0 inside the window of the query, -inf outside; same for all tiles."""
    geo = _geometry(layout, layout.grid)
    (th, tw), (hy, hx), (kh, kw) = geo.tile, geo.reach, geo.key_block
    # key (ky, kx) of a tile's key block sits at offset (ky - hy, kx - hx) from the tile's top-left query
    dy = torch.arange(th)[:, None] - (torch.arange(kh)[None, :] - hy)  # (th, kh)
    dx = torch.arange(tw)[:, None] - (torch.arange(kw)[None, :] - hx)  # (tw, kw)
    inside = in_window(dy[:, None, :, None], dx[None, :, None, :], layout.window_size)  # (th, tw, kh, kw)
    bias = torch.zeros(inside.shape, dtype=dtype).masked_fill_(~inside, float("-inf"))
    return bias.reshape(th * tw, kh * kw).to(device)


def computed_scores(layout: CLEARLayout) -> int:
    """Number of (query, key) scores this backend computes per batch and head, padding and masked ones included.

    The cost model of :func:`clear_dit.backends.auto_backend_name`.
    """
    if layout.covers_grid and layout.down_factor == 1:
        return layout.q_len * layout.kv_len
    t, n, grids = layout.text_len, layout.num_image, layout.image_grids
    local = 0
    for grid in grids:
        geo = _geometry(layout, grid)
        (hp, wp), (kh, kw) = geo.padded_grid, geo.key_block
        local += len(grids) * hp * wp * kh * kw
    return t * (t + n) + n * (t + layout.num_pooled) + local


def _padding_key_score(dtype: torch.dtype) -> float:
    """Extra-channel value of padding keys: its score, times any sane softmax scale, underflows exp() to 0."""
    return torch.finfo(dtype).min / 2


def _uses_fused_cpu_kernel(*tensors: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].device.type == "cpu" and not grad


def _attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on ``(N, heads, L, D)`` tensors; returns ``(out, lse)``, ``lse`` ``(N, heads, L)`` in fp32+.

    ``bias`` is an additive mask broadcastable to the scores (stride 0 broadcasting is kept as such).
    """
    if _uses_fused_cpu_kernel(query, key, value):
        if bias is not None:
            bias = bias.expand(*query.shape[:-1], key.shape[-2])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=bias, scale=scale
        )
        return out, lse
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if bias is not None:
        scores = scores + bias
    lse = scores.logsumexp(dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(value.dtype), value)
    return out, lse


def _query_tiles(query: torch.Tensor, geo: _TileGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """Image queries ``(B, h*w, H, D)`` -> tiles ``(B, H, ntx, nty, th*tw, D + 1)``, extra channel 1."""
    (h, w), (th, tw), (nty, ntx), (hp, wp) = grid, geo.tile, geo.tiles, geo.padded_grid
    b, _, heads, dim = query.shape
    source = query.reshape(b, h, w, heads, dim)
    if (hp, wp) != (h, w):
        source = F.pad(source, (0, 0, 0, 0, 0, wp - w, 0, hp - h))
    tiles = query.new_empty(b, heads, ntx, nty, th, tw, dim + 1)
    as_grid = tiles.permute(0, 3, 4, 2, 5, 1, 6)  # (B, nty, th, ntx, tw, H, D + 1)
    as_grid[..., :dim] = source.reshape(b, nty, th, ntx, tw, heads, dim)
    as_grid[..., dim] = 1
    return tiles.reshape(b, heads, ntx, nty, th * tw, dim + 1)


def _tiles_to_rows(tiles: torch.Tensor, geo: _TileGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_query_tiles` for outputs ``(B, H, ntx, nty, th*tw, C)`` -> ``(B, h*w, H, C)``."""
    (h, w), (th, tw), (nty, ntx), (hp, wp) = grid, geo.tile, geo.tiles, geo.padded_grid
    b, heads, *_, chans = tiles.shape
    rows = tiles.reshape(b, heads, ntx, nty, th, tw, chans).permute(0, 3, 4, 2, 5, 1, 6)
    rows = rows.reshape(b, hp, wp, heads, chans)
    if (hp, wp) != (h, w):
        rows = rows[:, :h, :w]
    return rows.reshape(b, h * w, heads, chans)


def _key_blocks(
    tokens: torch.Tensor, geo: _TileGeometry, key_grid: tuple[int, int], padding_channel: float
) -> torch.Tensor:
    """Image keys or values ``(B, hk*wk, H, D)`` -> the key blocks of all query tiles ``(B*H*ntx, nty, kh*kw, D+1)``.

    ``geo`` tiles the query grid; the key grid shares its coordinates (it is the query grid itself, or the
    other image of a Kontext layout, cropped to the rows and columns any query tile can reach). The keys are
    zero-padded by the reach on each side and up to tile multiples; the extra channel is 0 on real tokens
    and ``padding_channel`` on padding ones. It is copied once into overlapping column strips
    ``(B, H, ntx, rows, kw, D + 1)``; tile ``(i, j)``'s block is rows ``[i*th, i*th + kh)`` of strip ``j``,
    one contiguous run, so the blocks are a strided view of the strips.
    """
    (th, tw), (hy, hx), (kh, kw), (nty, ntx) = geo.tile, geo.reach, geo.key_block, geo.tiles
    hp, wp = geo.padded_grid
    hk, wk = key_grid
    b, _, heads, dim = tokens.shape
    rows, cols, chans = hp + 2 * hy, wp + 2 * hx, dim + 1
    h, w = min(hk, hp + hy), min(wk, wp + hx)  # keys beyond are out of every tile's reach
    padded = tokens.new_zeros(b, heads, rows, cols, chans)
    padded[:, :, hy : hy + h, hx : hx + w, :dim] = tokens.reshape(b, hk, wk, heads, dim)[:, :h, :w].permute(
        0, 3, 1, 2, 4
    )
    if padding_channel:
        real = torch.zeros(rows, cols, dtype=torch.bool, device=tokens.device)
        real[hy : hy + h, hx : hx + w] = True
        padded[..., dim] = torch.zeros(real.shape, dtype=tokens.dtype, device=tokens.device).masked_fill_(
            ~real, padding_channel
        )
    strips = padded.unfold(3, kw, tw).permute(0, 1, 3, 2, 5, 4).contiguous()  # (B, H, ntx, rows, kw, C)
    row = kw * chans  # strides written out: contiguous() may keep odd strides on size-1 dims
    return strips.as_strided((b * heads * ntx, nty, kh * kw, chans), (rows * row, th * row, chans, 1))


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the union of disjoint key sets from per-set ``(out (..., L, C), lse (..., L))``."""
    if len(parts) == 1:
        return parts[0][0]
    acc = torch.promote_types(dtype, torch.float32)
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
    out = sum(out.to(acc) * torch.exp(lse - total)[..., None].to(acc) for out, lse in parts)
    return out.to(dtype)


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
    attend=_attention_with_lse,
    merge=_merge,
) -> list[torch.Tensor]:
    """Parts (b) and (c): the image queries of each grid ``(B, h*w, H, D)`` x CLEAR keys/values.

    ``attend`` computes one part and ``merge`` merges parts (signatures of :func:`_attention_with_lse` and
    :func:`_merge`); backends on other kernels (``"xformers"``) pass their own.
    """
    b, _, heads, dim = query.shape
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    bias = _window_bias(layout, query.device, query.dtype)
    glob = layout.text_len + layout.num_pooled
    if glob:  # (b) global: text + pooled keys, the same for every image query
        extra = key.new_zeros(b, heads, glob, 1)
        global_k = torch.cat([torch.cat([key[:, text], key[:, layout.q_len :]], dim=1).transpose(1, 2), extra], -1)
        global_v = torch.cat([torch.cat([value[:, text], value[:, layout.q_len :]], dim=1).transpose(1, 2), extra], -1)
    grids = _grid_slices(layout)
    rows = []
    for grid, tokens in grids:
        geo = _geometry(layout, grid)
        (nty, ntx), (th, tw) = geo.tiles, geo.tile
        tiles = _query_tiles(query[:, tokens], geo, grid)  # (B, H, ntx, nty, th*tw, D + 1)
        parts = []
        for key_grid, key_tokens in grids:  # (c) local: all tiles in one call, batch = (B, H, ntx), "heads" = nty
            k = _key_blocks(key[:, key_tokens], geo, key_grid, _padding_key_score(key.dtype))
            v = _key_blocks(value[:, key_tokens], geo, key_grid, 0.0)
            out, lse = attend(tiles.reshape(b * heads * ntx, nty, th * tw, dim + 1), k, v, scale, bias)
            parts.append((out.reshape(b, heads, -1, dim + 1), lse.reshape(b, heads, -1)))
        if glob:  # the tiles are just a query order for the global keys
            parts.append(attend(tiles.reshape(b, heads, -1, dim + 1), global_k, global_v, scale))
        rows.append(_tiles_to_rows(merge(parts, query.dtype)[..., :dim], geo, grid))
    return rows


class TiledBackend:
    name = "tiled"
    attend = staticmethod(_attention_with_lse)  # the kernels of the parts (c), (b) and their merge: see _image_rows
    merge = staticmethod(_merge)

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in _SUPPORTED_DTYPES:
            return f"needs a floating dtype ({', '.join(map(str, _SUPPORTED_DTYPES))})"
        return None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        if layout.covers_grid and layout.down_factor == 1:  # the mask is all True: CLEAR is full attention
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)
        image = _image_rows(query, key, value, layout, scale, self.attend, self.merge)
        if layout.text_len == 0:
            return image[0] if len(image) == 1 else torch.cat(image, dim=1)
        t0 = layout.text_start
        text = F.scaled_dot_product_attention(  # (a) text rows: every text and image key, no pooled key
            query[:, t0 : t0 + layout.text_len].transpose(1, 2),
            key[:, : layout.q_len].transpose(1, 2),
            value[:, : layout.q_len].transpose(1, 2),
            scale=scale,
        ).transpose(1, 2)
        return torch.cat([text, *image] if layout.text_position == "first" else [*image, text], dim=1)
