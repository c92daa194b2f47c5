"""clear_dit.bands: band attention and log-sum-exp partials against the full CLEAR oracle ("dense" backend)."""

from __future__ import annotations

import pytest
import torch

from clear_dit import clear_attention, pool_tokens
from clear_dit.backends import tiled as tiled_backend
from clear_dit.backends.tiled import tile_shape
from clear_dit.bands import attention_with_lse, band_attention, window_reach
from clear_dit.mask import CLEARLayout, in_window, window_row_extents

HEADS, DIM = 2, 8


def _qkv(seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, HEADS, DIM, generator=g) for _ in range(3)]


@pytest.mark.parametrize("r", [1, 2, 3, 5, 8])
def test_window_reach_is_the_farthest_row_of_the_window(r):
    assert window_reach(r) == r - 1
    assert in_window(window_reach(r), 0, r) and not in_window(window_reach(r) + 1, 0, r)
    assert {abs(dy) for dy, _ in window_row_extents(r)} == set(range(r))


def test_attention_with_lse_matches_softmax_and_merges_exactly(monkeypatch):
    q, k, v = _qkv(12)
    out, lse = attention_with_lse(q[:, :5], k, v)
    scores = torch.einsum("bqhd,bkhd->bhqk", q[:, :5], k) * DIM**-0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, scores.logsumexp(-1).transpose(1, 2), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr("clear_dit.bands._MAX_SCORES", 20)  # forces key chunks of 2, merged by lse
    chunked, chunked_lse = attention_with_lse(q[:, :5], k, v)
    torch.testing.assert_close(chunked, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked_lse, lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "tiled", "auto"])
@pytest.mark.parametrize(
    "grid,text_len,r,d,band",
    [
        ((8, 6), 3, 3, 1, (0, 3)),
        ((8, 6), 3, 3, 1, (3, 6)),
        ((8, 6), 0, 3, 1, (6, 8)),
        ((8, 6), 4, 4, 2, (2, 4)),
        ((12, 10), 5, 2, 2, (4, 10)),
        ((8, 6), 2, 9, 1, (2, 4)),  # the window covers the grid
    ],
)
@pytest.mark.parametrize("scale", [None, 0.3])  # 0.3: proportional attention's scale, not head_dim**-0.5
def test_band_attention_equals_the_band_rows_of_full_clear_attention(backend, grid, text_len, r, d, band, scale):
    h, w = grid
    q, k, v = _qkv(text_len + h * w, seed=h + r)
    full = clear_attention(
        q, k, v, grid=grid, text_len=text_len, window_size=r, down_factor=d, scale=scale, backend="dense"
    )
    (a, b), reach = band, window_reach(r)
    lo, hi = max(0, a - reach), min(h, b + reach)
    t = text_len
    pooled_k = pool_tokens(k[:, t:], grid, d) if d > 1 else k[:, :0]
    pooled_v = pool_tokens(v[:, t:], grid, d) if d > 1 else v[:, :0]
    keys = torch.cat([k[:, :t], pooled_k, k[:, t + lo * w : t + hi * w]], dim=1)
    values = torch.cat([v[:, :t], pooled_v, v[:, t + lo * w : t + hi * w]], dim=1)
    out = band_attention(
        q[:, t + a * w : t + b * w],
        keys,
        values,
        key_grid=(hi - lo, w),
        rows=(a - lo, b - lo),
        num_global=t + pooled_k.shape[1],
        window_size=r,
        scale=scale,
        backend=backend,
    )
    torch.testing.assert_close(out, full[:, t + a * w : t + b * w], atol=1e-5, rtol=1e-5)


def test_band_attention_rejects_inconsistent_shapes():
    q, k, v = _qkv(2 + 4 * 3)
    for rows in ((3, 5), (2, 2), (3, 2), (-1, 1)):  # past the grid, empty, reversed, before it
        with pytest.raises(ValueError, match=r"rows must satisfy 0 <= start < stop <= 4 \(the key grid's rows\)"):
            band_attention(q[:, :6], k, v, key_grid=(4, 3), rows=rows, num_global=2, window_size=2)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        band_attention(q[:, :6], k, v, key_grid=(4, 3), rows=(0, 2), num_global=2, window_size=2, scale=0.0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        attention_with_lse(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="query has 6 tokens"):
        band_attention(q[:, :6], k, v, key_grid=(4, 3), rows=(0, 1), num_global=2, window_size=2)
    with pytest.raises(ValueError, match="key/value must both be"):
        band_attention(q[:, :6], k, v, key_grid=(4, 3), rows=(0, 2), num_global=3, window_size=2)
    for name, other in (("key", k.repeat(2, 1, 1, 1)), ("key", k[..., :2]), ("key", k.double())):
        with pytest.raises(ValueError, match=f"{name} must share the query's batch, heads, head_dim, dtype and device"):
            band_attention(q[:, :6], other, other, key_grid=(4, 3), rows=(0, 2), num_global=2, window_size=2)
    with pytest.raises(ValueError, match=r"key_grid and rows must be pairs \(hk, w\) and \(start, stop\), got \(4,\)"):
        band_attention(q[:, :6], k, v, key_grid=(4,), rows=(0, 2), num_global=2, window_size=2)


def test_auto_band_attention_takes_dense_for_a_scale_tiled_refuses_in_fp16():
    """As clear_attention's auto does: the patch-parallel runner's bands failed where one process ran."""
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 8 * 64, 1, 8, generator=g).half(), torch.randn(1, 24 * 64, 1, 8, generator=g).half()
    settings = dict(key_grid=(24, 64), rows=(8, 16), num_global=0, window_size=4, scale=0.02)  # auto: tiled
    with pytest.raises(ValueError, match="scale 0.02 is too small for the tiled backend"):
        band_attention(q, kv, kv, backend="tiled", **settings)
    out = band_attention(q, kv, kv, **settings)
    assert torch.equal(out, band_attention(q, kv, kv, backend="dense", **settings))


@pytest.mark.parametrize("shape", [(0, 6, 2, 8), (1, 6, 0, 8)], ids=["no-images", "no-heads"])
def test_band_attention_of_an_empty_batch_is_empty(shape):
    q = torch.randn(shape)
    kv = torch.randn(shape[0], 2 + 4 * 3, shape[2], shape[3])
    for backend in ("dense", "tiled"):
        out = band_attention(q, kv, kv, key_grid=(4, 3), rows=(0, 2), num_global=2, window_size=2, backend=backend)
        assert out.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,band,r", [((20, 9), (7, 13), 3), ((20, 9), (0, 5), 6), ((16, 40), (5, 7), 4)])
def test_tiled_band_tiles_only_the_band_and_matches_dense_gradients(grid, band, r, dtype, monkeypatch):
    """The tiled band path tiles the band's rows alone (key blocks cut from the halo-extended key grid at the
    band's row offset), and its gradients (the flash backward at that offset) equal the dense band's."""
    h, w = grid
    t = 3
    q, k, v = (x.to(dtype).requires_grad_() for x in _qkv(t + h * w, seed=r))
    a, b = band
    kwargs = dict(key_grid=grid, rows=band, num_global=t, window_size=r)
    tiled_queries = []
    query_tiles = tiled_backend._query_tiles

    def spy(query, geo, grid):
        tiles = query_tiles(query, geo, grid)
        tiled_queries.append(tiles.shape[0] * tiles.shape[3] * tiles.shape[4])  # ntx * nty * th*tw
        return tiles

    monkeypatch.setattr(tiled_backend, "_query_tiles", spy)
    outs, grads = {}, {}
    for backend in ("dense", "tiled"):
        for x in (q, k, v):
            x.grad = None
        outs[backend] = band_attention(q[:, t + a * w : t + b * w], k, v, backend=backend, **kwargs)
        outs[backend].float().square().sum().backward()
        grads[backend] = [x.grad.clone() for x in (q, k, v)]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outs["tiled"], outs["dense"], **tol)
    for tiled, dense in zip(grads["tiled"], grads["dense"], strict=True):
        torch.testing.assert_close(tiled, dense, **tol)
    (computed,) = tiled_queries
    th, tw = tile_shape(CLEARLayout(grid, t, r), dtype)
    th = min(th, b - a)  # band_rows' tile for a thin band
    padded = -(-(b - a) // th) * th * -(-w // tw) * tw  # the band's rows and columns, padded to tile multiples
    assert computed <= padded < h * w  # no halo rows


def test_pool_tokens_default_weight_is_the_mean_of_each_cell():
    x = torch.randn(1, 16, 2, 8, generator=torch.Generator().manual_seed(0))  # a 4x4 grid
    mean = x.reshape(1, 2, 2, 2, 2, 2, 8).mean((2, 4)).reshape(1, 4, 2, 8)  # (Y, i, X, j): each 2x2 cell
    torch.testing.assert_close(pool_tokens(x, (4, 4), 2), mean)
