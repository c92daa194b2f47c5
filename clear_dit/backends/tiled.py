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

    Measured on a 2-core CPU, 128^2 grid, fused CPU kernel: 8 for radius 8, 16 for radius 16, 32 for radius
    32 were the best of {4, 8, 16, 32}. Finer tuning is left to the speed issue.
    """
    return 8 if window_size <= 8 else 16 if window_size <= 16 else 32


@lru_cache(maxsize=64)
def _geometry(layout: CLEARLayout) -> _TileGeometry:
    h, w = layout.grid
    side = _tile_side(layout.window_size)
    th, tw = min(side, h), min(side, w)
    reach = min(layout.window_size - 1, h - 1), min(layout.window_size - 1, w - 1)
    return _TileGeometry(tile=(th, tw), reach=reach, tiles=(-(-h // th), -(-w // tw)))


@lru_cache(maxsize=64)
def _window_bias(layout: CLEARLayout, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(th*tw, key block)`` additive bias, 0 inside the window of the query, -inf outside; same for all tiles."""
    geo = _geometry(layout)
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
    geo = _geometry(layout)
    t, n = layout.text_len, layout.num_image
    (hp, wp), (kh, kw) = geo.padded_grid, geo.key_block
    return t * (t + n) + n * (t + layout.num_pooled) + hp * wp * kh * kw


def _padding_key_score(dtype: torch.dtype) -> float:
    """Extra-channel value of padding keys: its score, times any sane softmax scale, underflows exp() to 0."""
    return torch.finfo(dtype).min / 2


def _uses_fused_cpu_kernel(*tensors: torch.Tensor) -> bool:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].device.type == "cpu" and not grad


def _attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on ``(N, heads, L, D)`` tensors; returns ``(out, lse)``, ``lse`` float32 ``(N, heads, L)``.

    ``bias`` is an additive mask broadcastable to the scores (stride 0 broadcasting is kept as such).
    """
    if _uses_fused_cpu_kernel(query, key, value):
        if bias is not None:
            bias = bias.expand(*query.shape[:-1], key.shape[-2])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=bias, scale=scale
        )
        return out, lse
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
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


def _key_blocks(tokens: torch.Tensor, geo: _TileGeometry, grid: tuple[int, int], padding_channel: float):
    """Image keys or values ``(B, h*w, H, D)`` -> key blocks of all tiles ``(B*H*ntx, nty, kh*kw, D + 1)``.

    The grid is zero-padded by the reach on each side and up to tile multiples; the extra channel is 0 on
    real tokens and ``padding_channel`` on padding ones. It is copied once into overlapping column strips
    ``(B, H, ntx, rows, kw, D + 1)``; tile ``(i, j)``'s block is rows ``[i*th, i*th + kh)`` of strip ``j``,
    one contiguous run, so the blocks are a strided view of the strips.
    """
    (h, w), (th, tw), (hy, hx), (kh, kw), (nty, ntx) = grid, geo.tile, geo.reach, geo.key_block, geo.tiles
    hp, wp = geo.padded_grid
    b, _, heads, dim = tokens.shape
    rows, cols, chans = hp + 2 * hy, wp + 2 * hx, dim + 1
    padded = tokens.new_zeros(b, heads, rows, cols, chans)
    padded[:, :, hy : hy + h, hx : hx + w, :dim] = tokens.reshape(b, h, w, heads, dim).permute(0, 3, 1, 2, 4)
    if padding_channel:
        real = torch.zeros(rows, cols, dtype=torch.bool, device=tokens.device)
        real[hy : hy + h, hx : hx + w] = True
        padded[..., dim] = torch.zeros(real.shape, dtype=tokens.dtype, device=tokens.device).masked_fill_(
            ~real, padding_channel
        )
    strips = padded.unfold(3, kw, tw).permute(0, 1, 3, 2, 5, 4).contiguous()  # (B, H, ntx, rows, kw, C)
    row = kw * chans  # strides written out: contiguous() may keep odd strides on size-1 dims
    return strips.as_strided((b * heads * ntx, nty, kh * kw, chans), (rows * row, th * row, chans, 1))


def _image_rows(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
) -> torch.Tensor:
    """Parts (b) and (c): image queries ``(B, h*w, H, D)`` x CLEAR keys/values ``(B, kv_len, H, D)``."""
    geo = _geometry(layout)
    t, n, grid = layout.text_len, layout.num_image, layout.grid
    b, _, heads, dim = query.shape
    (nty, ntx), (th, tw) = geo.tiles, geo.tile
    tiles = _query_tiles(query, geo, grid)  # (B, H, ntx, nty, th*tw, D + 1)

    # (c) local: all tiles in one call, batch = (B, H, ntx), "heads" = nty
    k = _key_blocks(key[:, t : t + n], geo, grid, _padding_key_score(key.dtype))
    v = _key_blocks(value[:, t : t + n], geo, grid, 0.0)
    bias = _window_bias(layout, query.device, query.dtype)
    out, lse = _attention_with_lse(tiles.reshape(b * heads * ntx, nty, th * tw, dim + 1), k, v, scale, bias)
    out = out.reshape(b, heads, -1, dim + 1)
    if t + layout.num_pooled:
        # (b) global: text + pooled keys, the same for every image query; the tiles are just a query order
        extra = key.new_zeros(b, heads, t + layout.num_pooled, 1)
        global_k = torch.cat([torch.cat([key[:, :t], key[:, t + n :]], dim=1).transpose(1, 2), extra], dim=-1)
        global_v = torch.cat([torch.cat([value[:, :t], value[:, t + n :]], dim=1).transpose(1, 2), extra], dim=-1)
        out_g, lse_g = _attention_with_lse(tiles.reshape(b, heads, -1, dim + 1), global_k, global_v, scale)
        weight = torch.sigmoid(lse_g - lse.reshape(b, heads, -1))[..., None]  # share of the global keys
        acc = torch.promote_types(query.dtype, torch.float32)
        out = torch.lerp(out.to(acc), out_g.to(acc), weight.to(acc)).to(query.dtype)
    return _tiles_to_rows(out[..., :dim], geo, grid)


class TiledBackend:
    name = "tiled"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in _SUPPORTED_DTYPES:
            return f"needs a floating dtype ({', '.join(map(str, _SUPPORTED_DTYPES))})"
        return None

    def __call__(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
    ) -> torch.Tensor:
        t, n = layout.text_len, layout.num_image
        if layout.covers_grid and layout.down_factor == 1:  # the mask is all True: CLEAR is full attention
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale
            )
            return out.transpose(1, 2)
        image = _image_rows(query[:, t:], key, value, layout, scale)
        if t == 0:
            return image
        text = F.scaled_dot_product_attention(  # (a) text rows: every text and image key, no pooled key
            query[:, :t].transpose(1, 2),
            key[:, : t + n].transpose(1, 2),
            value[:, : t + n].transpose(1, 2),
            scale=scale,
        )
        return torch.cat([text.transpose(1, 2), image], dim=1)
