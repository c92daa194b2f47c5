"""Every CLEAR backend against the dense oracle, and the oracle against a brute-force reading of DESIGN.md 1.1."""

from __future__ import annotations

import math
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clear_oracle import brute_force_mask

from clear_dit import CLEARLayout, attention_density, available_backends, clear_attention
from clear_dit.attention import _with_pooled, clear_attention_with_layout
from clear_dit.backends import BACKENDS, auto_backend_name, select_backend, tiled
from clear_dit.backends.recompute import with_tiled_backward
from clear_dit.mask import dense_mask

BACKENDS_UNDER_TEST = ["tiled", "flex"]
HEADS, HEAD_DIM = 2, 8

# (grid, text_len, window_size, down_factor, batch): odd and non-square grids, grids that are not tile
# multiples (tiles are 8 for r <= 8, 16 for r <= 16), radius 1, radius beyond the grid, pooled keys
LAYOUTS = [
    ((7, 5), 3, 2, 1, 2),
    ((13, 9), 0, 3, 1, 1),
    ((9, 13), 4, 1, 1, 2),
    ((21, 11), 5, 3, 1, 2),
    ((11, 21), 0, 8, 1, 1),
    ((37, 19), 6, 10, 1, 1),
    ((16, 16), 7, 4, 1, 1),
    ((6, 4), 2, 40, 1, 2),  # window covers the grid: full attention
    ((8, 8), 0, 40, 2, 1),  # covers the grid, but pooled keys: not full attention
    ((12, 20), 5, 3, 2, 2),
    ((16, 24), 0, 5, 4, 1),
    ((24, 16), 9, 17, 4, 2),
]


def _layout_id(case) -> str:
    (h, w), t, r, d, b = case
    return f"{h}x{w}-t{t}-r{r}-d{d}-b{b}"


def _inputs(layout: CLEARLayout, batch: int, dtype=torch.float32, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, layout.q_len, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad) for _ in range(3))
    d = layout.down_factor
    weight = None
    if d > 1:  # a random (not uniform) pooling weight, in one of the two accepted shapes
        weight = torch.rand((d, d), generator=gen, dtype=dtype)
        if layout.grid[0] % 3 == 0:
            weight = weight.reshape(1, 1, 1, d, 1, d, 1)
        weight.requires_grad_(requires_grad)
    return q, k, v, weight


def _attend(layout: CLEARLayout, q, k, v, weight, backend: str, scale: float | None = None) -> torch.Tensor:
    return clear_attention(
        q,
        k,
        v,
        grid=layout.grid,
        text_len=layout.text_len,
        window_size=layout.window_size,
        down_factor=layout.down_factor,
        spatial_weight=weight,
        scale=scale,
        backend=backend,
    )


def _full_sdpa(q, k, v, scale: float | None = None) -> torch.Tensor:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("case", LAYOUTS, ids=_layout_id)
def test_backend_equals_dense(backend: str, case) -> None:
    grid, t, r, d, batch = case
    layout = CLEARLayout(grid, t, r, d)
    q, k, v, weight = _inputs(layout, batch)
    expected = _attend(layout, q, k, v, weight, "dense")
    got = _attend(layout, q, k, v, weight, backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["dense", *BACKENDS_UNDER_TEST, "auto"])
@pytest.mark.parametrize("grid,text_len", [((6, 4), 2), ((5, 7), 0)])
@pytest.mark.parametrize("scale", [None, 0.3])  # 0.3: a proportional-attention scale
def test_window_beyond_grid_is_full_attention(backend: str, grid, text_len: int, scale) -> None:
    layout = CLEARLayout(grid, text_len, max(grid) + 1)
    assert layout.covers_grid
    q, k, v, _ = _inputs(layout, batch=2)
    torch.testing.assert_close(
        _attend(layout, q, k, v, None, backend, scale), _full_sdpa(q, k, v, scale), atol=1e-4, rtol=1e-4
    )


def test_a_reference_grid_beyond_the_window_is_not_full_attention() -> None:
    """The window covers the target grid but not the taller reference grid (FLUX Kontext)."""
    layout = CLEARLayout((4, 4), 2, 5, 1, "first", (12, 4))
    assert not layout.covers_grid
    q, k, v, _ = _inputs(layout, batch=1)
    expected = clear_attention_with_layout(q, k, v, layout, backend="dense")
    torch.testing.assert_close(
        clear_attention_with_layout(q, k, v, layout, backend="tiled"), expected, atol=1e-5, rtol=1e-5
    )
    assert (expected - _full_sdpa(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "layout",
    [
        CLEARLayout((8, 12), 3, 3, 1, "first", (6, 12)),  # two grids merged one after the other
        CLEARLayout((40, 8), 2, 2, 1, "first", (3, 8)),  # a reference shorter than the target's row chunks
    ],
    ids=["kontext", "short-reference"],
)
@pytest.mark.parametrize("plain", [False, True], ids=["flash-function", "plain-ops"])
def test_tiled_reference_grids_on_both_paths_equal_dense(layout: CLEARLayout, plain: bool) -> None:
    backend = tiled.TiledBackend()
    if plain:
        backend.kernels = tiled.PartKernels()  # what other devices run (and CUDA's recompute backward)
    q, k, v, _ = _inputs(layout, batch=2, requires_grad=True)
    scale = HEAD_DIM**-0.5
    got, expected = backend(q, k, v, layout, scale), BACKENDS["dense"](q, k, v, layout, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(got)
    for g, e in zip(
        torch.autograd.grad(got, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out), strict=True
    ):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_tiled_on_non_contiguous_inputs_and_custom_scale() -> None:
    layout = CLEARLayout((22, 12), 5, 3, 2)
    q, k, v = (torch.randn(2, HEADS, layout.q_len, HEAD_DIM).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    expected = _attend(layout, q, k, v, None, "dense", scale=0.7)
    torch.testing.assert_close(_attend(layout, q, k, v, None, "tiled", scale=0.7), expected, atol=1e-4, rtol=1e-4)


def test_tiled_bfloat16_close_to_float32() -> None:
    layout = CLEARLayout((22, 12), 5, 3, 2)
    q, k, v, weight = _inputs(layout, batch=1)
    expected = _attend(layout, q, k, v, weight, "dense")
    got = _attend(layout, q.bfloat16(), k.bfloat16(), v.bfloat16(), weight, "tiled")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


GRAD_LAYOUTS = [((13, 9), 3, 3, 1, 2), ((21, 11), 0, 2, 1, 1), ((12, 20), 5, 3, 2, 2), ((16, 8), 4, 6, 4, 1)]


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("case", GRAD_LAYOUTS, ids=_layout_id)
def test_backend_gradients_equal_dense(backend: str, case) -> None:
    grid, t, r, d, batch = case
    layout = CLEARLayout(grid, t, r, d)
    inputs = [x for x in _inputs(layout, batch, requires_grad=True) if x is not None]
    grad_out = torch.randn(batch, layout.q_len, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))

    def grads(name: str):
        out = _attend(layout, *inputs[:3], inputs[3] if d > 1 else None, name)
        return torch.autograd.grad(out, inputs, grad_out)

    expected = grads("dense")
    try:
        got = grads(backend)
    except NotImplementedError as err:  # FlexAttention has no backward on CPU in torch 2.x
        if backend == "flex" and "backward on CPU" in str(err):
            pytest.skip(f"flex: {err}")
        raise
    for name, g, e in zip(("query", "key", "value", "spatial_weight"), got, expected, strict=False):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def _layout_kwargs(layout: CLEARLayout) -> dict:
    """``clear_attention``'s keyword arguments for ``layout``."""
    return dict(
        grid=layout.grid,
        text_len=layout.text_len,
        window_size=layout.window_size,
        down_factor=layout.down_factor,
        text_position=layout.text_position,
        reference_grid=layout.reference_grid,
    )


def _grads(layout: CLEARLayout, inputs, grad_out, backend: str, **kwargs):
    q, k, v, *weight = inputs
    out = clear_attention(q, k, v, **_layout_kwargs(layout), spatial_weight=weight[0] if weight else None,
                          backend=backend)  # fmt: skip
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize(
    "layout,batch",
    [
        (CLEARLayout((10, 18), 3, 3, 2, "first", (12, 6)), 1),  # Kontext: reference taller than the target
        (CLEARLayout((9, 17), 0, 2, 1, "last"), 2),  # SD3 order, odd grid, no text
        (CLEARLayout((16, 8), 4, 3, 4, "last"), 1),  # text last with pooled keys
    ],
    ids=["kontext", "text-last", "text-last-pooled"],
)
def test_tiled_gradients_equal_dense_on_other_layouts(layout: CLEARLayout, batch: int) -> None:
    inputs = [x for x in _inputs(layout, batch, requires_grad=True) if x is not None]
    grad_out = torch.randn(batch, layout.q_len, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    expected_out, expected = _grads(layout, inputs, grad_out, "dense")
    got_out, got = _grads(layout, inputs, grad_out, "tiled")
    torch.testing.assert_close(got_out, expected_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_tiled_bfloat16_gradients_close_to_dense() -> None:
    layout = CLEARLayout((12, 20), 5, 3, 2)
    inputs = [x.detach().bfloat16().requires_grad_() for x in _inputs(layout, batch=2) if x is not None]
    grad_out = torch.randn(2, layout.q_len, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    expected_out, expected = _grads(layout, [x.detach().double().requires_grad_() for x in inputs], grad_out, "dense")
    got_out, got = _grads(layout, inputs, grad_out.bfloat16(), "tiled")
    assert got_out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in got)
    torch.testing.assert_close(got_out.double(), expected_out, atol=3e-2, rtol=3e-2)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("fused", [True, False], ids=["flash-function", "plain-ops"])
@pytest.mark.parametrize("tile", [(2, 2), (3, 5), (1, 64), (16, 16)])
def test_tiled_image_rows_any_tile_and_both_paths(tile, fused: bool) -> None:
    """Any tile shape, flash calls over several tile columns (small tiles, wide grid) or over runs of tile
    rows (a full-width band), and the plain-ops path other devices run, against dense: outputs and gradients."""
    layout = CLEARLayout((4, 40), 3, 2, 2)
    grid, geo = layout.grid, tiled._geometry(layout, layout.grid, tile)
    chunks = tiled._chunks(geo, grid, HEAD_DIM, split_rows=True)
    several = [c for c in chunks if c.j1 - c.j0 > 1 or c.i1 - c.i0 < geo.tiles[0]]
    assert several or tile == (16, 16)
    inputs = [x for x in _inputs(layout, batch=2, requires_grad=True) if x is not None]
    q, k, v, weight = inputs
    image = slice(layout.image_start, layout.q_len)
    grad_out = torch.randn(2, grid[0] * grid[1], HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))

    expected = _attend(layout, q, k, v, weight, "dense")[:, image]
    keys, values = (_with_pooled(t, layout, weight) for t in (k, v))
    got = tiled._image_rows(q, keys, values, layout, HEAD_DIM**-0.5, tile=tile, fused=fused)[0]
    got = got.reshape(expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(
        torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


# --- the oracle itself -------------------------------------------------------------------------------


def _brute_force_clear(q, k, v, grid, text_len, r, d, weight, text_last=False, reference=None) -> torch.Tensor:
    """DESIGN.md 1.1 read literally, one query and one key at a time (float64, no mask module): text first or last,
    an optional reference grid sharing the target's coordinates (FLUX Kontext), pooled keys of every grid with
    ``w[i, j]`` read from a ``(d, d)`` weight or the published ``(1, 1, 1, d, 1, d, 1)`` one."""
    grids = [grid] + ([reference] if reference else [])
    n_img = sum(h * w for h, w in grids)
    t = text_len
    if weight is not None and weight.dim() == 7:
        weight = torch.stack([torch.stack([weight[0, 0, 0, i, 0, j, 0] for j in range(d)]) for i in range(d)])
    # (kind, y, x) of every token in sequence order: "text", or "image" at its (row, column)
    image = [("image", y, x) for h, w in grids for y in range(h) for x in range(w)]
    tokens = image + [("text", 0, 0)] * t if text_last else [("text", 0, 0)] * t + image
    keys, values = [k[:, i] for i in range(len(tokens))], [v[:, i] for i in range(len(tokens))]
    kinds = [kind for kind, _, _ in tokens]
    first = 0 if text_last else t
    for h, w in grids:  # pooled keys: every d x d block of each grid, weighted
        for py in range(h // d if d > 1 else 0):
            for px in range(w // d):
                cells = [(i, j, first + (py * d + i) * w + px * d + j) for i in range(d) for j in range(d)]
                keys.append(sum(weight[i, j] * k[:, n] for i, j, n in cells))
                values.append(sum(weight[i, j] * v[:, n] for i, j, n in cells))
                kinds.append("pooled")
        first += h * w
    assert len(tokens) == t + n_img
    out = torch.empty_like(q)
    for qi, (kind, qy, qx) in enumerate(tokens):
        allowed = []
        for ki, key_kind in enumerate(kinds):
            if kind == "text":  # text query: every text and image key, no pooled key
                ok = key_kind != "pooled"
            elif key_kind != "image":  # image query: every text and pooled key
                ok = True
            else:
                _, ky, kx = tokens[ki]
                ok = (qy - ky) ** 2 + (qx - kx) ** 2 < r**2
            if ok:
                allowed.append(ki)
        scores = torch.stack([(q[:, qi] * keys[ki]).sum(-1) for ki in allowed], dim=-1) / math.sqrt(q.shape[-1])
        probs = scores.softmax(dim=-1)
        out[:, qi] = sum(probs[..., j, None] * values[ki] for j, ki in enumerate(allowed))
    return out


@pytest.mark.parametrize("grid,text_len,r,d", [((4, 5), 2, 2, 1), ((4, 6), 0, 3, 2), ((6, 4), 3, 1, 2)])
def test_dense_oracle_equals_brute_force(grid, text_len: int, r: int, d: int) -> None:
    layout = CLEARLayout(grid, text_len, r, d)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, layout.q_len, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = torch.rand(d, d, generator=gen, dtype=torch.float64)
    expected = _brute_force_clear(q, k, v, grid, text_len, r, d, weight)
    got = _attend(layout, q, k, v, weight if d > 1 else None, "dense")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize(
    "grid,text_len,r,d,text_last,reference",
    [
        ((4, 4), 2, 2, 2, False, (2, 4)),  # FLUX Kontext: a reference image, pooled keys of both grids
        ((4, 6), 3, 3, 2, True, None),  # SD3: text last, pooled keys
        ((4, 4), 0, 2, 2, True, (4, 2)),
    ],
)
def test_every_layout_equals_brute_force_with_the_published_weight_shape(backend, grid, text_len, r, d, text_last,
                                                                         reference) -> None:  # fmt: skip
    """The pooling weight in the published (1, 1, 1, d, 1, d, 1) shape, not symmetric: a transposed reading or a
    reference grid pooled from the target's tokens shows."""
    layout = CLEARLayout(grid, text_len, r, d, "last" if text_last else "first", reference)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, layout.q_len, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    weight = torch.rand(1, 1, 1, d, 1, d, 1, generator=gen, dtype=torch.float64)
    assert not torch.equal(weight[0, 0, 0, :, 0, :, 0], weight[0, 0, 0, :, 0, :, 0].T)
    expected = _brute_force_clear(q, k, v, grid, text_len, r, d, weight, text_last, reference)
    position = "last" if text_last else "first"
    got = clear_attention(q, k, v, grid=grid, text_len=text_len, window_size=r, down_factor=d, spatial_weight=weight,
                          text_position=position, reference_grid=reference, backend=backend)  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "grid,text_len,r,d",
    [((7, 5), 3, 2, 1), ((13, 9), 0, 4, 1), ((8, 12), 6, 3, 2), ((16, 16), 5, 7, 4), ((6, 6), 2, 9, 1)],
)
def test_attention_density_counts_dense_mask(grid, text_len: int, r: int, d: int) -> None:
    layout = CLEARLayout(grid, text_len, r, d)
    mask = dense_mask(layout)
    assert mask.shape == (layout.q_len, layout.kv_len)
    # pooled keys count as computed pairs; the reference is full attention over text + image
    assert attention_density(grid, text_len, r, d) == pytest.approx(mask.sum().item() / layout.q_len**2, abs=1e-12)


# --- "auto" ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,device,expected",
    [
        (CLEARLayout((8, 8), 16, 20), "cpu", "tiled"),  # covers the grid, d = 1: one unmasked SDPA
        (CLEARLayout((8, 8), 16, 20, 2), "cpu", "dense"),  # covers the grid but pooled keys: a real mask
        (CLEARLayout((16, 16), 512, 8), "cpu", "dense"),  # small and nearly full
        (CLEARLayout((64, 64), 512, 8), "cpu", "tiled"),  # sparse enough
        (CLEARLayout((64, 64), 512, 32), "cpu", "dense"),  # window ~ grid: tiles would compute more
        (CLEARLayout((128, 128), 512, 60), "cpu", "tiled"),  # too long for a dense mask
        # on CUDA: "triton" where it is installed (tests/test_triton.py), else "tiled"
        (CLEARLayout((16, 16), 512, 8), "cuda", "tiled" if find_spec("triton") is None else "triton"),
    ],
)
def test_auto_choice(layout: CLEARLayout, device: str, expected: str) -> None:
    assert auto_backend_name(layout, torch.device(device)) == expected


@pytest.mark.parametrize(
    "family,layout,dtype,tile,backend",
    [
        ("intel", CLEARLayout((128, 128), 512, 16), torch.float32, (16, 16), "tiled"),
        ("intel", CLEARLayout((128, 128), 512, 16), torch.bfloat16, (4, 8), "tiled"),  # reduced precision: smaller
        ("intel", CLEARLayout((128, 128), 512, 32), torch.bfloat16, (16, 16), "tiled"),
        ("intel", CLEARLayout((64, 64), 512, 16), torch.float32, (4, 64), "tiled"),  # wide window: full-width band
        ("intel", CLEARLayout((64, 64), 512, 16), torch.bfloat16, (4, 8), "tiled"),  # near break-even, measured faster
        ("intel", CLEARLayout((48, 48), 512, 16), torch.bfloat16, (4, 8), "dense"),  # below break-even: exact dense
        ("intel", CLEARLayout((64, 64), 512, 8), torch.float32, (16, 16), "tiled"),
        # AMD: 4x8 tiles for every dtype and radius (measured fastest there), a band where it sees fewer keys
        ("amd", CLEARLayout((128, 128), 512, 16), torch.float32, (4, 8), "tiled"),
        ("amd", CLEARLayout((128, 128), 512, 32), torch.bfloat16, (4, 8), "tiled"),
        ("amd", CLEARLayout((64, 64), 512, 16), torch.float32, (4, 8), "tiled"),
        ("amd", CLEARLayout((40, 40), 512, 16), torch.float32, (1, 40), "dense"),  # band: 1240 keys a query, not 1292
        ("amd", CLEARLayout((48, 48), 512, 16), torch.float32, (4, 8), "dense"),
    ],
)
def test_auto_tile_shape_and_choice_per_cpu_family_and_dtype(
    monkeypatch: pytest.MonkeyPatch, family: str, layout: CLEARLayout, dtype: torch.dtype, tile, backend: str
) -> None:
    assert tiled.tile_shape(layout, dtype, family) == tile
    monkeypatch.setattr(tiled, "CPU_FAMILY", family)  # auto's cost model follows this machine's family
    assert tiled.tile_shape(layout, dtype) == tile
    assert auto_backend_name(layout, torch.device("cpu"), dtype) == backend
    geo = tiled._geometry(layout, layout.grid, tile)
    full_width = tile[1] == layout.grid[1]  # a full-width band: no horizontal reach, one tile column
    assert (geo.reach[1] == 0 and geo.tiles[1] == 1) == full_width


def test_cpu_family_is_a_row_of_the_tile_table() -> None:
    assert tiled.CPU_FAMILY == tiled._detect_cpu_family() in tiled.TILE_SHAPES
    with pytest.raises(ValueError, match="unknown CPU family 'arm'; known: 'intel', 'amd'"):
        tiled.tile_shape(CLEARLayout((16, 16), 8, 4), torch.float32, "arm")


@pytest.mark.parametrize(
    "grid,r,tile",
    [
        *(((13, 20), 4, tile) for tile in [(1, 1), (3, 5), (4, 8), (16, 16), (7, 20)]),
        # the window spans the height but not the width: rows that need the whole reach of h - 1 rows
        ((6, 40), 7, (5, 8)),
        ((6, 40), 7, (1, 8)),
    ],
)
def test_tiled_with_a_fixed_tile_equals_dense(grid: tuple[int, int], r: int, tile: tuple[int, int]) -> None:
    layout = CLEARLayout(grid, 6 if grid == (13, 20) else 3, r)
    q, k, v, _ = _inputs(layout, batch=2)
    scale = q.shape[-1] ** -0.5
    torch.testing.assert_close(
        tiled.TiledBackend(tile)(q, k, v, layout, scale),
        BACKENDS["dense"](q, k, v, layout, scale),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("tile", [(0, 4), (4,), (2, -1), (2.5, 3), (True, 4), 4, "48"])
def test_tiled_rejects_a_bad_tile(tile) -> None:
    with pytest.raises(ValueError, match=r"tile must be two positive sizes \(rows, columns\), got"):
        tiled.TiledBackend(tile)


def test_tiled_takes_numpy_tile_sizes_as_ints() -> None:
    tile = tiled.TiledBackend(tile=(np.int64(4), np.int64(8))).tile
    assert tile == (4, 8) and all(type(n) is int for n in tile)


def test_auto_runs_and_matches_dense() -> None:
    layout = CLEARLayout((12, 20), 5, 3, 2)
    q, k, v, weight = _inputs(layout, batch=1)
    assert select_backend("auto", layout, q).name == auto_backend_name(layout, q.device, q.dtype, q.shape[-1])
    torch.testing.assert_close(
        _attend(layout, q, k, v, weight, "auto"), _attend(layout, q, k, v, weight, "dense"), atol=1e-4, rtol=1e-4
    )


def test_auto_chooses_for_the_inputs_dtype_and_head_dim(monkeypatch) -> None:
    import clear_dit.backends

    seen = []
    choose = clear_dit.backends.auto_backend_name
    monkeypatch.setattr(clear_dit.backends, "auto_backend_name", lambda *a: seen.append(a) or choose(*a))
    layout = CLEARLayout((12, 20), 5, 3, 2)
    q = torch.randn(1, layout.q_len, HEADS, 24, dtype=torch.bfloat16)
    select_backend("auto", layout, q)
    assert seen == [(layout, q.device, torch.bfloat16, 24, None)]  # bf16 and fp32 choices differ on some layouts


def test_registry() -> None:
    assert {"dense", "tiled", "flex", "triton", "xformers"} <= set(BACKENDS)
    assert {"dense", "tiled", "flex"} <= set(available_backends("cpu"))


def test_xformers_is_listed_with_its_reason_where_it_cannot_run() -> None:
    """xformers has no CPU kernels (and is optional): listed, unavailable on CPU, with a one-line reason."""
    xformers = BACKENDS["xformers"]
    cpu_reason = xformers.unavailable_reason(torch.device("cpu"), torch.float16)
    if find_spec("xformers") is None:
        assert cpu_reason.startswith("xformers is not importable") and "CUDA" in cpu_reason
        assert xformers.unavailable_reason(torch.device("cuda"), torch.float16) == cpu_reason
    else:
        assert "needs a CUDA device" in cpu_reason
    assert "\n" not in cpu_reason and "xformers" not in available_backends("cpu")
    with pytest.raises(ValueError, match="backend 'xformers' is unavailable on cpu"):
        _call(backend="xformers")


# --- input validation --------------------------------------------------------------------------------


def _call(q=None, k=None, v=None, **overrides):
    kwargs = dict(grid=(4, 4), text_len=2, window_size=2)
    kwargs.update(overrides)
    default = torch.randn(1, 18, 2, 4)
    return clear_attention(
        default if q is None else q, default if k is None else k, default if v is None else v, **kwargs
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window_size=0), "window_size"),
        (dict(window_size=-3), "window_size"),
        (dict(text_len=3), "seq length 18"),
        (dict(grid=(4, 4), down_factor=3), "divisible by down_factor"),
        (dict(backend="nope"), "known backends: 'auto', 'dense', 'tiled', 'flex'"),
        (dict(down_factor=2, spatial_weight=torch.ones(3, 3)), "spatial_weight"),
        (dict(down_factor=2, spatial_weight=torch.ones(1, 2, 1, 2)), "spatial_weight"),
        (dict(spatial_weight=torch.ones(2, 2)), "spatial_weight pools keys: it needs down_factor > 1"),
        (dict(grid=(4, 4, 1)), r"grid must be two positive ints \(h, w\), got \(4, 4, 1\)"),
        (dict(grid=(True, 16)), "grid must be two positive ints"),
        (dict(text_len=True), "text_len must be a non-negative int, got True"),
        (dict(window_size=True), "window_size must be a positive int"),
        (dict(scale=0.0), r"scale must be a positive finite number \(default 1/sqrt\(head_dim\)\), got 0.0"),
        (dict(scale=-0.3, backend="dense"), "scale must be a positive finite number"),
        (dict(scale=math.nan), "scale must be a positive finite number"),
        (dict(scale=math.inf, backend="dense"), "scale must be a positive finite number"),
        (dict(grid=(4, 6), text_len=-6, down_factor=4), "grid 4x6 is not divisible by down_factor 4"),
        (dict(reference_grid=(4, 5), text_len=-18, down_factor=2), "reference_grid 4x5 is not divisible by down_fa"),
    ],
)
def test_clear_attention_value_errors(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_layouts_take_any_integer_sizes_and_stay_hashable() -> None:
    layout = CLEARLayout([np.int64(4), 4], np.int64(2), np.int64(2), torch.tensor(1))  # as from a config or array
    assert layout == CLEARLayout((4, 4), 2, 2) and hash(layout) == hash(CLEARLayout((4, 4), 2, 2))
    assert type(layout.window_size) is int and type(layout.down_factor) is int
    q = torch.randn(1, 18, 2, 4)
    dense = clear_attention(q, q, q, grid=(4, 4), text_len=2, window_size=2, backend="dense")
    for backend in ("dense", "tiled"):  # their schedules are cached by the layout
        out = clear_attention_with_layout(q, q, q, layout, backend=backend)
        torch.testing.assert_close(out, dense)


def test_recomputed_backward_equals_dense_gradients_for_distinct_q_k_v() -> None:
    """The backward of "triton" and "xformers" (tiled's, recomputed from the saved q, k, v): without triton here,
    only this runs it with keys and values that differ."""
    layout = CLEARLayout((6, 5), 3, 2, 1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.q_len, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    g = torch.randn(q.shape, generator=gen)
    got = torch.autograd.grad(with_tiled_backward(BACKENDS["dense"], q, k, v, layout, 0.4), (q, k, v), g)
    expected = torch.autograd.grad(BACKENDS["dense"](q, k, v, layout, 0.4), (q, k, v), g)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_auto_takes_dense_where_tiled_would_refuse_a_tiny_fp16_scale() -> None:
    """It failed, telling the user to pick "dense" (fp16's range: tiled's padding keys would take weight)."""
    layout = CLEARLayout((64, 64), 0, 8)
    q = torch.randn(1, layout.q_len, 1, 8, generator=torch.Generator().manual_seed(0)).half()
    assert select_backend("auto", layout, q).name == "tiled"
    assert select_backend("auto", layout, q, scale=0.02).name == "dense"
    out = clear_attention(q, q, q, grid=(64, 64), text_len=0, window_size=8, scale=0.02)
    torch.testing.assert_close(out, clear_attention(q, q, q, grid=(64, 64), text_len=0, window_size=8, scale=0.02,
                                                    backend="dense"), atol=0, rtol=0)  # fmt: skip


def test_the_recomputed_backward_takes_a_tiny_fp16_scale() -> None:
    """Backend "triton" ran such a scale forward (auto picks it on CUDA), then its backward raised tiled's refusal."""
    layout = CLEARLayout((6, 5), 3, 2, 1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.q_len, 2, 8, generator=gen).half().requires_grad_() for _ in range(3))
    g = torch.randn(q.shape, generator=gen).half()
    got = torch.autograd.grad(with_tiled_backward(BACKENDS["dense"], q, k, v, layout, 0.02), (q, k, v), g)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(BACKENDS["dense"](*exact, layout, 0.02), exact, g.double())
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=2e-3)


def test_auto_keeps_tiled_for_a_covering_window_with_a_tiny_fp16_scale() -> None:
    """One unmasked SDPA call, no padding keys to refuse the scale; dense would build an O(seq^2) mask (3 GB here)."""
    layout = CLEARLayout((96, 96), 0, 200)
    q = torch.empty(1, layout.q_len, 1, 8, dtype=torch.float16)
    assert select_backend("auto", layout, q, 0.02).name == "tiled"


def test_meta_tensors_give_the_output_shape() -> None:
    """Shape inference on the meta device (it failed asking autocast about the device)."""
    q = torch.empty(2, 23, 2, 8, device="meta")
    out = clear_attention(q, q, q, grid=(4, 4), text_len=7, window_size=2)
    assert out.shape == q.shape and out.device.type == "meta"


@pytest.mark.parametrize("shape", [(0, 18, 2, 4), (1, 18, 0, 4)], ids=["no-images", "no-heads"])
def test_empty_batches_give_empty_outputs(shape) -> None:
    """And differentiable ones, as SDPA's: a training step may meet an empty batch (also through the recomputed
    backward of "triton" and "xformers", which differentiates "tiled")."""
    q = torch.randn(shape, requires_grad=True)
    layout = CLEARLayout((4, 4), 2, 2)
    for backend in ("dense", "tiled"):
        out = clear_attention(q, q, q, grid=(4, 4), text_len=2, window_size=2, backend=backend)
        assert out.shape == shape
        assert torch.autograd.grad(out.sum(), q)[0].shape == shape
    out = with_tiled_backward(BACKENDS["dense"], q, q, q, layout, 0.5)
    assert torch.autograd.grad(out.sum(), q)[0].shape == shape
    if "flex" in available_backends():  # forward only: flex has no CPU backward
        with torch.no_grad():
            assert clear_attention(q, q, q, grid=(4, 4), text_len=2, window_size=2, backend="flex").shape == shape


def test_integer_tensors_are_refused_by_every_backend() -> None:
    assert available_backends(dtype=torch.int64) == []
    q = torch.ones(1, 18, 2, 4, dtype=torch.int64)
    message = "unavailable on cpu with torch.int64: needs float32, bfloat16, float16 or float64, got torch.int64"
    with pytest.raises(ValueError, match=message):
        clear_attention(q, q, q, grid=(4, 4), text_len=2, window_size=2)
    with pytest.raises(ValueError, match="head_dim must be at least 1"):
        _call(q=torch.randn(1, 18, 2, 0), k=torch.randn(1, 18, 2, 0), v=torch.randn(1, 18, 2, 0))


@pytest.mark.parametrize("backend", ["auto", "dense", "tiled", "flex"])
def test_float8_tensors_are_refused_in_one_line(backend) -> None:
    """float8 is a floating dtype that SDPA does not compute in: refused before the call, not a NotImplementedError
    from inside it."""
    q = torch.ones(1, 18, 2, 4).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs float32, bfloat16, float16 or float64, got torch.float8_e4m3fn$"):
        clear_attention(q, q, q, grid=(4, 4), text_len=2, window_size=2, backend=backend)


def test_clear_attention_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        _call(k=torch.randn(1, 18, 2, 8))
    with pytest.raises(ValueError, match="share a dtype"):
        _call(v=torch.randn(1, 18, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        _call(q=torch.randn(18, 2, 4), k=torch.randn(18, 2, 4), v=torch.randn(18, 2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_clear_attention_rejects_mixed_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        _call(k=torch.randn(1, 18, 2, 4, device="cuda"))


@pytest.mark.parametrize("plain", [False, True], ids=["flash-function", "plain-ops"])
def test_tiled_float64_is_exact_on_both_paths(plain: bool) -> None:
    """float64 scores on both paths (the plain-ops one is what other devices run): equal to dense to float64
    rounding, outputs and gradients."""
    layout = CLEARLayout((22, 12), 5, 3, 2)
    q, k, v, weight = _inputs(layout, batch=2, dtype=torch.float64, requires_grad=True)
    backend = tiled.TiledBackend()
    if plain:
        backend.kernels = tiled.PartKernels()
    scale = HEAD_DIM**-0.5
    outs = [
        attend(q, *(_with_pooled(x, layout, weight) for x in (k, v)), layout, scale)
        for attend in (BACKENDS["dense"], backend)
    ]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    grads = [torch.autograd.grad(out.sum(), (q, k, v, weight)) for out in outs]
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def _block_flags(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """flex's ordered ``(num_blocks, indices)`` -> the set of flagged ``(q block, kv block)`` pairs, as bools."""
    flags = torch.zeros(indices.shape[-2:], dtype=torch.bool)
    for row, (count, cols) in enumerate(zip(num_blocks[0, 0].tolist(), indices[0, 0], strict=True)):
        flags[row, cols[:count].long()] = True
    return flags


@pytest.mark.parametrize(
    "layout,has_full_blocks",
    [
        (CLEARLayout((12, 20), 5, 3, 2), False),  # pooled keys; lengths not multiples of the block
        (CLEARLayout((32, 24), 77, 8, 1, "last"), False),
        (CLEARLayout((16, 16), 30, 5, 1, "first", (8, 16)), False),  # Kontext reference grid
        (CLEARLayout((32, 32), 256, 40), True),  # text rows and a window covering the grid
        (CLEARLayout((48, 48), 200, 20, 4), True),  # blocks of full rows inside every window
        (CLEARLayout((7, 55), 0, 1), False),  # a block with a single allowed entry is still visited
    ],
)
def test_flex_block_mask_equals_create_block_mask(
    monkeypatch: pytest.MonkeyPatch, layout: CLEARLayout, has_full_blocks: bool
) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    from clear_dit.backends import flex
    from clear_dit.mask import mask_predicate

    monkeypatch.setattr(flex, "_MASK_CHUNK", 3 * 128 * 128)  # several chunks, the last one short
    allowed = mask_predicate(layout)
    expected = create_block_mask(lambda b, h, q, k: allowed(q, k), None, None, layout.q_len, layout.kv_len, "cpu")
    got = flex._block_mask.__wrapped__(layout, torch.device("cpu"))
    assert got.shape == expected.shape and got.BLOCK_SIZE == expected.BLOCK_SIZE
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        flags = _block_flags(getattr(got, num), getattr(got, idx))
        assert torch.equal(flags, _block_flags(getattr(expected, num), getattr(expected, idx))), num
    assert _block_flags(got.full_kv_num_blocks, got.full_kv_indices).any() == has_full_blocks


@pytest.mark.parametrize("grid", [(4, 4), (1, 5), (5, 1), (3, 7), (6, 2)])
@pytest.mark.parametrize("reference_grid", [None, (2, 6)])
def test_a_layout_covers_its_grid_exactly_when_its_mask_is_all_true(grid, reference_grid) -> None:
    """``covers_grid`` lets tiled and auto run unmasked SDPA: one key out of a window makes that wrong."""
    for r in range(1, 9):
        layout = CLEARLayout(grid, 2, r, reference_grid=reference_grid)
        assert layout.covers_grid == bool(dense_mask(layout).all()), (grid, reference_grid, r)


def test_tiled_at_the_radius_just_short_of_covering_the_grid() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2 + 16, 2, 8, dtype=torch.float64) for _ in range(3))
    kwargs = dict(grid=(4, 4), text_len=2, window_size=4)  # the corners, 3 rows and 3 columns apart: 18 >= 16
    tiled_out = clear_attention(q, k, v, backend="tiled", **kwargs)
    torch.testing.assert_close(tiled_out, clear_attention(q, k, v, backend="dense", **kwargs))


def test_flex_block_with_a_single_masked_entry_is_partial() -> None:
    """Query block 0 holds the text query and 127 image queries; key block 9 holds 127 image keys and the first
    pooled key: one masked pair (the text query and the pooled key). A block taken as full skips mask_mod in
    compiled flex (CUDA); CPU flex applies it everywhere, so only the block mask shows the difference."""
    from torch.nn.attention.flex_attention import create_block_mask

    from clear_dit.backends import flex
    from clear_dit.mask import mask_predicate

    layout = CLEARLayout((3, 426), 1, 426, 3)
    assert layout.q_len % 128 == 127
    allowed = mask_predicate(layout)
    expected = create_block_mask(lambda b, h, q, k: allowed(q, k), None, None, layout.q_len, layout.kv_len, "cpu")
    got = flex._block_mask.__wrapped__(layout, torch.device("cpu"))
    for name in ("full_kv_num_blocks", "kv_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_compiled_flex_stays_compiled_past_eight_layouts() -> None:
    """A compiled flex_attention compiles again for every layout (a new mask_mod, new lengths): past dynamo's
    default limit of 8 it ran un-compiled, O(seq^2) in memory, without a word. Dynamo's "eager" backend stands in
    for inductor (the same guards and limit, without minutes of compiling)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from clear_dit.backends import flex

    compiled = torch.compile(flex_attention, dynamic=False, backend="eager")
    before = counters["frames"]["ok"]
    for side, radius in [(side, radius) for side in (4, 6, 8) for radius in (1, 2, 3)]:
        layout = CLEARLayout((side, side), 4, radius)
        q = torch.randn(1, 1, layout.q_len, 16, generator=torch.Generator().manual_seed(side))
        block_mask = flex._block_mask.__wrapped__(layout, torch.device("cpu"))
        out = flex.run_flex(compiled, q, q, q, block_mask, 0.25)
        expected = BACKENDS["dense"](*(q.transpose(1, 2),) * 3, layout, 0.25).transpose(1, 2)
        torch.testing.assert_close(out, expected)
    assert counters["frames"]["ok"] - before == 9  # each layout compiled


@pytest.mark.parametrize(
    "layout",
    [
        CLEARLayout((8, 8), 5, 3, 2, "first", (4, 6)),
        CLEARLayout((5, 9), 2, 2, 1, "first", (7, 3)),
        CLEARLayout((6, 6), 0, 4, 3, "last", (3, 9)),
        # widths differ and the window is wider than the narrower grid: its offsets reach past that grid
        CLEARLayout((4, 8), 3, 40, 1, "first", (8, 2)),
        CLEARLayout((6, 2), 0, 5, 2, "first", (2, 10)),
        CLEARLayout((3, 9), 2, 6, 1, "first", (9, 3)),
    ],
)
def test_attention_density_counts_dense_mask_with_a_reference_grid(layout):
    """Target-reference pairs count (FLUX Kontext), in either text position."""
    count = dense_mask(layout).sum().item() / layout.q_len**2
    got = attention_density(layout.grid, layout.text_len, layout.window_size, layout.down_factor, layout.reference_grid)
    assert got == pytest.approx(count, abs=1e-12)


def test_auto_on_cuda_under_the_triton_interpreter_is_tiled(monkeypatch):
    """The interpreter runs the kernel ~1000x slower: a fast check of what tests/test_triton.py finds in minutes."""
    import clear_dit.backends as backends_module

    pytest.importorskip("triton")
    monkeypatch.setattr(backends_module, "TRITON_INTERPRETED", True)
    monkeypatch.setattr(backends_module._TRITON, "unavailable_reason", lambda device, dtype: None)
    assert auto_backend_name(CLEARLayout((64, 64), 512, 16), torch.device("cuda"), torch.float16, 128) == "tiled"


@pytest.mark.parametrize("family", ["intel", "amd"])
@pytest.mark.parametrize("layout", [CLEARLayout((48, 48), 512, 16), CLEARLayout((46, 46), 0, 16)])
def test_float16_takes_bfloat16s_tiles_on_cpu(monkeypatch, family, layout):
    """Both use the reduced-precision rows of TILE_SHAPES (a float16 tiled as float32 would get other tiles)."""
    monkeypatch.setattr(tiled, "CPU_FAMILY", family)
    assert tiled.tile_shape(layout, torch.float16) == tiled.tile_shape(layout, torch.bfloat16)


@pytest.mark.parametrize(
    "layout,bf16,fp16",
    [
        (CLEARLayout((48, 48), 512, 16), "dense", "dense"),
        # measured: fp16 tiled 0.79x / 0.95x of full SDPA here, its dense path 1.01x / 1.02x; bf16 tiled 1.14x at 56^2
        (CLEARLayout((56, 56), 512, 16), "tiled", "dense"),
        (CLEARLayout((60, 60), 512, 16), "tiled", "dense"),
        (CLEARLayout((64, 64), 512, 16), "tiled", "tiled"),
        (CLEARLayout((48, 48), 512, 8), "tiled", "tiled"),
    ],
)
def test_auto_costs_float16_above_bfloat16_on_cpu(monkeypatch, layout, bf16, fp16):
    """PyTorch's CPU flash kernel runs float16 tiles slower than bfloat16's, so its break-even lies further out."""
    monkeypatch.setattr(tiled, "CPU_FAMILY", "amd")
    cpu = torch.device("cpu")
    assert (auto_backend_name(layout, cpu, torch.bfloat16), auto_backend_name(layout, cpu, torch.float16)) == (
        bf16,
        fp16,
    )


@pytest.mark.parametrize(
    "layout",
    [
        CLEARLayout((7, 5), 3, 2, 1, "last"),
        CLEARLayout((8, 8), 5, 3, 2, "first", (4, 6)),
        CLEARLayout((6, 6), 0, 4, 3, "last", (3, 9)),
    ],
)
def test_flex_equals_dense_on_text_last_and_kontext_layouts(layout):
    """Through clear_attention, so that the block mask's cache key is the one the backend builds (a key without the
    text position or the reference grid would serve another layout's mask)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.q_len, 2, 8, generator=gen) for _ in range(3))
    kwargs = _layout_kwargs(layout)
    torch.testing.assert_close(
        clear_attention(q, k, v, backend="flex", **kwargs), clear_attention(q, k, v, backend="dense", **kwargs),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip


def _pool(x, grid, d, weight):  # x: (batch, h*w, heads, dim), token by token from DESIGN.md 1.1
    h, w = grid
    out = []
    for Y in range(h // d):
        for X in range(w // d):
            out.append(sum(weight[i, j] * x[:, (Y * d + i) * w + X * d + j] for i in range(d) for j in range(d)))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(("grid", "ref"), [((4, 6), (2, 4)), ((2, 4), (6, 4))])
def test_kontext_pooled_tokens_pool_each_grid_from_its_own_tokens(backend, grid, ref):
    text_len, r, d = 3, 2, 2
    n_t, n_r = grid[0] * grid[1], ref[0] * ref[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, text_len + n_t + n_r, 2, 8, generator=g) for _ in range(3))
    weight = torch.tensor([[0.7, 0.1], [0.15, 0.05]])
    out = clear_attention(
        q,
        k,
        v,
        grid=grid,
        text_len=text_len,
        window_size=r,
        down_factor=d,
        spatial_weight=weight,
        reference_grid=ref,
        backend=backend,
    )
    s = text_len
    kk, vv = (
        torch.cat([x, _pool(x[:, s : s + n_t], grid, d, weight), _pool(x[:, s + n_t :], ref, d, weight)], dim=1)
        for x in (k, v)
    )
    mask = brute_force_mask(text_len, [grid, ref], r, d)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_default_pooling_weight_is_uniform_mean():
    grid, text_len, r, d = (4, 4), 2, 2, 2
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, text_len + 16, 2, 8, generator=g) for _ in range(3))
    kwargs = dict(grid=grid, text_len=text_len, window_size=r, down_factor=d, backend="dense")
    uniform = torch.full((d, d), 1 / d**2)
    torch.testing.assert_close(
        clear_attention(q, k, v, **kwargs), clear_attention(q, k, v, **kwargs, spatial_weight=uniform)
    )


@pytest.mark.parametrize("backend", available_backends())
def test_under_autocast_mixed_dtypes_are_taken_in_the_autocast_dtype(backend):
    """As scaled_dot_product_attention takes them (SD3.5's qk-norm gives fp32 queries and keys beside bf16 values);
    outside autocast mixed dtypes stay an error."""
    layout = CLEARLayout((4, 6), 3, 2, 2)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, layout.q_len, 2, 8, generator=gen) for _ in range(3))
    kwargs = _layout_kwargs(layout)
    expected = clear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clear_attention(q, k, v.bfloat16(), backend=backend, **kwargs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    with pytest.raises(ValueError, match="query, key and value must share a dtype"):
        clear_attention(q, k, v.bfloat16(), backend=backend, **kwargs)
