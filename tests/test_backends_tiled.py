"""The tiled backend where a first round of tests left gaps: large logits, custom scales in the backward, fp16/bf16
precision and tiles, the cost model "auto" reads, thin grids with images and heads of different content."""

from __future__ import annotations

import pytest
import torch

from clear_dit import CLEARLayout
from clear_dit.attention import _with_pooled, clear_attention_with_layout
from clear_dit.backends import BACKENDS, tiled
from clear_dit.bands import attention_with_lse

HEADS, DIM = 3, 8


def _qkv(layout, batch=2, dtype=torch.float32, q_gain=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, layout.q_len, HEADS, DIM)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return (q * q_gain).to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("plain", [False, True], ids=["flash-function", "plain-ops"])
def test_tiled_large_logits_equal_dense(plain):
    """q scaled by 30: logits of a few hundred; every log-sum-exp must subtract its max (outputs and grads)."""
    layout = CLEARLayout((12, 20), 5, 3, 2, "first", (6, 20))
    q, k, v = (x.requires_grad_() for x in _qkv(layout, q_gain=30.0))
    backend = tiled.TiledBackend()
    if plain:
        backend.kernels = tiled.PartKernels()
    scale = DIM**-0.5

    def run(impl):
        return impl(q, *(_with_pooled(x, layout, None) for x in (k, v)), layout, scale)

    got, expected = run(backend), run(BACKENDS["dense"])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)


def test_attention_with_lse_large_logits_chunked(monkeypatch):
    layout = CLEARLayout((4, 3), 0, 1)
    q, k, v = _qkv(layout, q_gain=30.0)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * DIM**-0.5
    monkeypatch.setattr("clear_dit.bands._MAX_SCORES", 40)  # key chunks merged by their lse
    out, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1).transpose(1, 2), atol=1e-4, rtol=1e-5)
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_attention_with_lse_bfloat16_chunks_accumulate_in_float32(monkeypatch):
    layout = CLEARLayout((8, 8), 0, 1)
    q, k, v = _qkv(layout, batch=1, dtype=torch.bfloat16)
    monkeypatch.setattr("clear_dit.bands._MAX_SCORES", 3 * 64)  # one key per chunk: 64 bf16 merges
    out, _ = attention_with_lse(q, k, v)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * DIM**-0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_plain_ops_reduced_precision_equals_dense(dtype):
    """The plain-ops path (other devices) in bf16/fp16 at moderately large logits: scores and lse in fp32."""
    layout = CLEARLayout((12, 20), 5, 3, 2)
    q, k, v = _qkv(layout, dtype=dtype, q_gain=8.0)
    keys, values = (_with_pooled(x, layout, None) for x in (k, v))
    backend = tiled.TiledBackend()
    backend.kernels = tiled.PartKernels()
    got = backend(q, keys, values, layout, DIM**-0.5)
    expected = BACKENDS["dense"](*(x.double() for x in (q, keys, values)), layout, DIM**-0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=3e-2, rtol=3e-2)


def test_tiled_float16_fused_equals_dense():
    layout = CLEARLayout((13, 9), 4, 3, 2 if False else 1)
    q, k, v = _qkv(layout, dtype=torch.float16)
    got = clear_attention_with_layout(q, k, v, layout, backend="tiled")
    expected = clear_attention_with_layout(q.double(), k.double(), v.double(), layout, backend="dense")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), expected, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("family", ["intel", "amd"])
def test_reduced_precision_dtypes_share_their_tiles(family):
    for r in (4, 8, 16, 32):
        layout = CLEARLayout((128, 128), 512, r)
        assert tiled.tile_shape(layout, torch.float16, family) == tiled.tile_shape(layout, torch.bfloat16, family)
        assert tiled.tile_shape(layout, torch.float64, family) == tiled.tile_shape(layout, torch.float32, family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_uses_the_tile_of_its_dtype(monkeypatch, dtype):
    """The tile the backend runs is tile_shape(layout, dtype) for the input's dtype (the table differs by dtype)."""
    layout = CLEARLayout((24, 24), 3, 8)
    monkeypatch.setattr(tiled, "CPU_FAMILY", "intel")  # intel: fp32 r8 16x16, bf16 r8 8x8
    assert tiled.tile_shape(layout, torch.float32) != tiled.tile_shape(layout, torch.bfloat16)
    seen = []
    query_tiles = tiled._query_tiles
    monkeypatch.setattr(tiled, "_query_tiles", lambda q, geo, grid: seen.append(geo.tile) or query_tiles(q, geo, grid))
    q, k, v = _qkv(layout, batch=1, dtype=dtype)
    clear_attention_with_layout(q, k, v, layout, backend="tiled")
    assert seen == [tiled.tile_shape(layout, dtype)]


def test_cached_schedules_of_layouts_differing_only_in_one_field():
    """Layouts equal but for one field must not share cached tilings / window biases."""
    variants = [
        CLEARLayout((10, 14), 3, 3),
        CLEARLayout((10, 14), 3, 4),  # window
        CLEARLayout((10, 14), 3, 2),
        CLEARLayout((10, 14), 3, 3, 1, "first", (10, 7)),  # reference grid
        CLEARLayout((10, 14), 3, 3, 1, "first", (12, 14)),
        CLEARLayout((10, 14), 3, 3, 2),  # down factor
        CLEARLayout((10, 14), 3, 3, 1, "last"),  # text position
    ]
    for layout in variants + variants[::-1]:
        q, k, v = _qkv(layout, batch=1)
        torch.testing.assert_close(
            clear_attention_with_layout(q, k, v, layout, backend="tiled"),
            clear_attention_with_layout(q, k, v, layout, backend="dense"),
            atol=1e-5,
            rtol=1e-5,
            msg=lambda m, layout=layout: f"{layout}: {m}",
        )


@pytest.mark.parametrize(
    "layout",
    [CLEARLayout((12, 20), 5, 3, 2), CLEARLayout((10, 18), 3, 3, 2, "first", (12, 6)), CLEARLayout((9, 17), 0, 2)],
    ids=["flux", "kontext", "no-text"],
)
def test_computed_scores_counts_the_scores_the_backend_computes(monkeypatch, layout):
    """The cost model of auto: tiled.computed_scores against the scores the flash calls actually compute
    (its (b) part counts the real image queries only, the run computes the padded ones too)."""
    counted = []
    flash = tiled._flash

    def spy(query, key, value, scale, bias=None):
        counted.append(query.shape[:-1].numel() * key.shape[-2])
        return flash(query, key, value, scale, bias)

    monkeypatch.setattr(tiled, "_flash", spy)
    q, k, v = _qkv(layout, batch=1)
    clear_attention_with_layout(q, k, v, layout, backend="tiled")
    t, n = layout.text_len, layout.num_image
    counted_total = t * (t + n) + sum(counted) // HEADS
    tile = tiled.tile_shape(layout, torch.float32)
    padded = sum(
        tiled._geometry(layout, g, tile).padded_grid[0] * tiled._geometry(layout, g, tile).padded_grid[1]
        for g in layout.image_grids
    )
    global_slack = (padded - n) * (t + layout.num_pooled)
    assert counted_total - global_slack == tiled.computed_scores(layout)


@pytest.mark.parametrize(
    "lay", [CLEARLayout((11, 13), 4, 3, 1, "first"), CLEARLayout((12, 14), 4, 3, 2)], ids=["d1", "d2"]
)
def test_tiled_non_contiguous_inputs_gradients_and_custom_scale(lay):
    """diffusers passes transposed views; gradients (q, k, v, pooling weight) at a custom scale."""
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(2, HEADS, lay.q_len, DIM, generator=g, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)
    assert not q.is_contiguous()
    weight = torch.rand(2, 2, generator=g, requires_grad=True) if lay.down_factor > 1 else None
    leaves = base + ([weight] if weight is not None else [])
    grad_out = torch.randn(2, lay.q_len, HEADS, DIM, generator=g)

    def run(backend):
        out = clear_attention_with_layout(q, k, v, lay, spatial_weight=weight, scale=0.55, backend=backend)
        return out, torch.autograd.grad(out, leaves, grad_out)

    (o1, g1), (o2, g2) = run("tiled"), run("dense")
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid,text_len,r,d", [((1, 19), 2, 3, 1), ((2, 30), 0, 4, 2), ((3, 3), 1, 2, 1)])
def test_tiled_thin_grids_batches_and_heads_differ(grid, text_len, r, d):
    """1-row / 2-row grids, grids smaller than a tile, 3 images x 3 heads of different content, gradients."""
    layout = CLEARLayout(grid, text_len, r, d)
    q, k, v = (x.requires_grad_() for x in _qkv(layout, batch=3))
    weight = torch.rand(d, d, generator=torch.Generator().manual_seed(3), requires_grad=True) if d > 1 else None
    leaves = [q, k, v] + ([weight] if weight is not None else [])
    grad_out = torch.randn_like(q)
    res = {}
    for backend in ("tiled", "dense"):
        out = clear_attention_with_layout(q, k, v, layout, spatial_weight=weight, backend=backend)
        res[backend] = (out, torch.autograd.grad(out, leaves, grad_out))
    torch.testing.assert_close(res["tiled"][0], res["dense"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(res["tiled"][1], res["dense"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("plain", [False, True], ids=["flash-function", "plain-ops"])
def test_tiled_padding_keys_lose_to_real_keys_with_very_negative_scores(plain):
    """Anti-aligned queries and keys (about -2e4 x scale per score): the padding keys' score must lie below any
    real one, not merely below zero (fp64: dense itself is 5e-3 off in fp32 at these magnitudes)."""
    backend = tiled.TiledBackend()
    if plain:
        backend.kernels = tiled.PartKernels()
    layout = CLEARLayout((12, 20), 0, 3)
    g = torch.Generator().manual_seed(0)
    q = 100 + torch.rand(1, 240, 2, 8, generator=g, dtype=torch.float64)
    k = -100 - torch.rand(1, 240, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 240, 2, 8, generator=g, dtype=torch.float64)
    scale = 8**-0.5
    torch.testing.assert_close(backend(q, k, v, layout, scale), BACKENDS["dense"](q, k, v, layout, scale))


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 0.01), (torch.float32, 1e-40)])
def test_tiled_refuses_a_scale_too_small_to_drop_its_padding_keys(dtype, scale):
    """fp16's padding score is -32752: times 0.01 it is a score like any other (0.3 off, silently)."""
    q = torch.randn(1, 4 + 64, 2, 8, dtype=dtype)
    with pytest.raises(ValueError, match=f"scale {scale:g} is too small for the tiled backend in {dtype}"):
        clear_attention_with_layout(q, q, q, CLEARLayout((8, 8), 4, 3), scale=scale, backend="tiled")
    dense = clear_attention_with_layout(q, q, q, CLEARLayout((8, 8), 4, 3), scale=scale, backend="dense")
    assert torch.isfinite(dense).all()  # dense runs it


def _assert_equals_dense_with_gradients(backend, q, k, v, layout: CLEARLayout, scale: float) -> None:
    """``backend``'s output and q/k/v gradients equal ``dense``'s (``k``/``v`` with their pooled tail)."""
    got, expected = backend(q, k, v, layout, scale), BACKENDS["dense"](q, k, v, layout, scale)
    torch.testing.assert_close(got, expected)
    grad_out = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("plain", [False, True], ids=["flash-function", "plain-ops"])
@pytest.mark.parametrize("scale", [2.5, 4.0, 1e6])
def test_tiled_large_scales_with_a_smaller_reference_grid_equal_dense(plain, scale):
    """Some tiles of the target see only padding keys in the smaller reference grid: their padding scores times the
    scale must stay finite (an -inf log-sum-exp made the merge NaN, or silently wrong on the flash path)."""
    layout = CLEARLayout((7, 9), 2, 3, reference_grid=(5, 4))
    q, k, v = (x.double().requires_grad_() for x in _qkv(layout, q_gain=0.1))
    backend = tiled.TiledBackend()
    if plain:
        backend.kernels = tiled.PartKernels()
    _assert_equals_dense_with_gradients(backend, q, k, v, layout, scale)


def _peak_over_qkv(layout: CLEARLayout, backward: bool) -> float:
    """Peak extra memory of one tiled call (or of its backward) over the size of q + k + v; 4 x 8 tiles on any CPU."""
    from benchmarks.attention import peak_extra_bytes

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, requires_grad=backward) for n in (layout.q_len, layout.kv_len,
                                                                                        layout.kv_len))  # fmt: skip
    call = tiled.TiledBackend(tile=(4, 8))
    if not backward:
        with torch.no_grad():
            extra, _ = peak_extra_bytes(lambda: call(q, k, v, layout, 0.25))
    else:
        out = call(q, k, v, layout, 0.25)
        extra, _ = peak_extra_bytes(lambda: torch.autograd.grad(out, (q, k, v), torch.ones_like(out))[0])
    return extra / sum(x.numel() * x.element_size() for x in (q, k, v))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_tiled_memory_with_pooled_keys_is_that_without(backward):
    """Every tile column queries the same text + pooled keys: a copy of them per column grew with width x pooled keys
    (quadratic with d > 1: 3.6x q + k + v at 16 x 128, 10.6x at 16 x 512, forward; the backward's key gradients,
    one per column, likewise)."""
    pooled, plain = (_peak_over_qkv(CLEARLayout((16, 512), 0, 8, d), backward) for d in (2, 1))
    assert pooled < 1.1 * plain
    if not backward:
        assert pooled < 2  # issue 3's bound


def test_tiled_backward_of_the_global_keys_in_groups_of_columns_equals_dense():
    """The backward runs the global keys' part over groups of tile columns (here 3 and 2 of 5: 320 image queries over
    12 text + 80 pooled keys), summing their key gradients; batch and heads of different content."""
    layout = CLEARLayout((8, 40), 12, 3, 2)
    q, k, v = (x.double().requires_grad_() for x in _qkv(layout))
    k, v = (_with_pooled(x, layout, None) for x in (k, v))
    _assert_equals_dense_with_gradients(tiled.TiledBackend(tile=(4, 8)), q, k, v, layout, DIM**-0.5)


def test_split_row_chunks_keep_their_strips_within_the_key_budget():
    """_chunks' bound: a run of tile rows holds at most the key grid's size in strips (one tile row at least); the
    tiny reference grid leaves a budget of one row a call."""
    layout = CLEARLayout((40, 8), 0, 3, 1, "first", (2, 2))
    geo = tiled._geometry(layout, layout.grid, (2, 8))
    dim = 4
    for key_grid in layout.image_grids:
        chunks = tiled._chunks(geo, key_grid, dim, split_rows=True)
        for c in chunks:
            strip = c.strip_rows(geo) * geo.key_block[1] * (dim + 1)
            assert c.i1 - c.i0 == 1 or strip <= key_grid[0] * key_grid[1] * dim, (key_grid, c)
    assert {c.i1 - c.i0 for c in tiled._chunks(geo, (2, 2), dim, split_rows=True)} == {1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", [1, 2], ids=["keys", "values"])
def test_tiled_low_precision_gradients_of_the_global_keys_are_as_close_as_the_image_keys(dtype, which):
    """The text and pooled keys' (and values') gradients are summed over 43 groups of tile columns: in bf16 each
    group's addition rounded (4x the image keys' error here, which are rounded once); summed in fp32, once too."""
    layout = CLEARLayout((4, 1024), 64, 2, 2)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, layout.q_len, 2, 16, generator=g, dtype=torch.float64) for _ in range(4))
    k, v = (_with_pooled(x, layout, None) for x in (k, v))
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    (got,) = torch.autograd.grad(tiled.TiledBackend((4, 8))(*low, layout, 0.25), low[which], grad_out.to(dtype))
    exact = [x.detach().double().requires_grad_() for x in low]
    dense = BACKENDS["dense"](*exact, layout, 0.25)
    (expected,) = torch.autograd.grad(dense, exact[which], grad_out.to(dtype).double())

    def error(keys: slice) -> float:
        return float((got[:, keys].double() - expected[:, keys]).norm() / expected[:, keys].norm())

    assert error(slice(0, 64)) < 1.5 * error(slice(64, layout.q_len))
    assert error(slice(layout.q_len, None)) < 1.5 * error(slice(64, layout.q_len))


def test_tiled_backward_of_the_global_keys_runs_in_as_few_column_groups_as_the_image_queries_allow(monkeypatch):
    """320 image queries over 100 text keys: 3 of the 5 tile columns a call (2 calls), not one column a call."""
    layout = CLEARLayout((8, 40), 100, 3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.q_len, 2, 8, generator=g).requires_grad_() for _ in range(3))
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    calls = []

    def counting(grad, query, key, *args, **kwargs):
        calls.append(key.shape[-2])
        return real(grad, query, key, *args, **kwargs)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", counting)
    tiled.TiledBackend((4, 8))(q, k, v, layout, 0.25).sum().backward()
    assert calls.count(100) == 2, calls


def test_tiled_float16_takes_a_scale_its_padding_keys_allow():
    """fp16's padding score -32752 x 0.05 = -1638 stays below -1000: run, not refused (the refusal starts below
    1000 / 32752)."""
    layout = CLEARLayout((8, 8), 4, 3)
    q = torch.randn(1, 4 + 64, 2, 8, generator=torch.Generator().manual_seed(0)).half()
    got = clear_attention_with_layout(q, q, q, layout, scale=0.05, backend="tiled")
    torch.testing.assert_close(got, clear_attention_with_layout(q, q, q, layout, scale=0.05, backend="dense"),
                               atol=2e-3, rtol=2e-3)  # fmt: skip
