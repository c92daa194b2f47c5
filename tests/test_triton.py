"""Backend "triton": its block schedule against the dense mask, the kernel against "dense", its gradients, its
availability, and the "auto" choice.

The kernel tests run where a kernel can run: on CUDA (compiled), or under Triton's interpreter on CPU. Triton
fixes interpreter vs compiler when ``triton.language`` is imported (``TRITON_INTERPRET`` at that moment), which
in a pytest process has long happened; so on a CPU machine one test re-runs this file in a fresh process with
``TRITON_INTERPRET=1`` set from its start, where the kernel tests run (in the interpreter: small shapes only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from clear_dit import CLEARLayout  # noqa: E402
from clear_dit.attention import clear_attention_with_layout  # noqa: E402
from clear_dit.backends import BACKENDS, auto_backend_name, select_backend  # noqa: E402
from clear_dit.backends.triton import INTERPRETED, MAX_HEAD_DIM, Tiling, block_schedule, choose_tiling  # noqa: E402
from clear_dit.mask import dense_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None
kernel_test = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="no CUDA here: runs in test_kernel_under_the_interpreter's TRITON_INTERPRET=1 process"
)
outer_test = pytest.mark.skipif(INTERPRETED, reason="checked by the outer (non-interpreted) run")
TRITON = BACKENDS["triton"]


# --- the schedule ------------------------------------------------------------------------------------


def _tile_of_tokens(layout: CLEARLayout, tile: tuple[int, int]) -> tuple[list[tuple], torch.Tensor]:
    """The tiles of every grid as records (start, h, w, y0, x0), and the tile index of every image token."""
    records, index = [], []
    start = layout.image_start
    for h, w in layout.image_grids:
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cols = -(-w // tile[1])
        index.append(len(records) + (y // tile[0]) * cols + x // tile[1])
        records += [(start, h, w, y0, x0) for y0 in range(0, h, tile[0]) for x0 in range(0, w, tile[1])]
        start += h * w
    return records, torch.cat([i.flatten() for i in index])


SCHEDULE_LAYOUTS = [
    CLEARLayout((19, 37), 4, 3),
    CLEARLayout((13, 9), 0, 5, 1, "last"),
    CLEARLayout((12, 20), 5, 7, 2),
    CLEARLayout((6, 4), 2, 40),  # the window covers the grid
    CLEARLayout((10, 14), 3, 4, 2, "first", (6, 18)),  # Kontext: a reference grid of another shape
    CLEARLayout((10, 14), 0, 3, 1, "last", (12, 8)),
]


@outer_test
@pytest.mark.parametrize("layout", SCHEDULE_LAYOUTS, ids=lambda lay: f"{lay.grid}-r{lay.window_size}")
@pytest.mark.parametrize("tiling", [Tiling((4, 4), (4, 4)), Tiling((8, 16), (8, 8)), Tiling((2, 8), (4, 8))], ids=str)
def test_schedule_visits_exactly_the_key_tiles_of_the_mask(layout: CLEARLayout, tiling: Tiling) -> None:
    """Per query tile: visited key tiles = those with an allowed (query, key) pair in the dense mask; full ones =
    those with every pair allowed that are whole tiles (the kernel loads them without bounds)."""
    image = slice(layout.image_start, layout.image_start + layout.num_image)
    allowed = dense_mask(layout)[image, image].float()  # image queries x image keys
    q_records, q_index = _tile_of_tokens(layout, tiling.query)
    k_records, k_index = _tile_of_tokens(layout, tiling.key)
    q_onehot = torch.nn.functional.one_hot(q_index, len(q_records)).float()
    k_onehot = torch.nn.functional.one_hot(k_index, len(k_records)).float()
    pairs = q_onehot.T @ allowed @ k_onehot  # allowed pairs per (query tile, key tile)
    sizes = q_onehot.sum(0)[:, None] * k_onehot.sum(0)[None, :]
    whole = k_onehot.sum(0) == tiling.key[0] * tiling.key[1]

    schedule = block_schedule(layout, tiling)
    assert [tuple(r) for r in schedule.query_tiles.tolist()] == q_records
    k_id = {record: i for i, record in enumerate(k_records)}
    shape = (len(q_records), len(k_records))
    full, boundary = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
    for ptr, tiles, visited in ((schedule.full_ptr, schedule.full_tiles, full),
                                (schedule.partial_ptr, schedule.partial_tiles, boundary)):  # fmt: skip
        for i in range(len(q_records)):
            ids = [k_id[tuple(record)] for record in tiles[ptr[i] : ptr[i + 1]].tolist()]
            assert len(set(ids)) == len(ids)  # each key tile at most once per list
            visited[i, ids] = True
    assert not (full & boundary).any()
    assert torch.equal(full | boundary, pairs > 0)
    assert torch.equal(full, (pairs == sizes) & whole[None, :])


@outer_test
def test_schedule_is_cached_per_layout_and_tiling() -> None:
    layout, tiling = CLEARLayout((19, 37), 4, 3), Tiling((8, 16), (8, 8))
    assert block_schedule(layout, tiling) is block_schedule(CLEARLayout((19, 37), 4, 3), Tiling((8, 16), (8, 8)))
    assert block_schedule(layout, tiling) is not block_schedule(layout, Tiling((4, 4), (4, 4)))


@outer_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("grid", [(128, 128), (3, 5), (1, 40)])
def test_tiling_blocks_are_powers_of_two_of_at_least_16(dtype, head_dim: int, grid) -> None:
    tiling = choose_tiling(CLEARLayout(grid, 7, 4), head_dim, dtype)
    for th, tw in (tiling.query, tiling.key):
        block = th * tw
        assert block >= 16 and block & (block - 1) == 0


# --- the kernel against "dense" ----------------------------------------------------------------------

# (grid, text_len, radius, down_factor, text_position, reference_grid, batch, heads, head_dim): odd grids that
# are not tile multiples and span several tiles, text 0 and > 0 first and last, pooled keys, Kontext
KERNEL_CASES = [
    ((7, 5), 3, 2, 1, "first", None, 2, 2, 16),
    ((9, 21), 4, 3, 1, "last", None, 1, 1, 16),
    ((8, 20), 5, 3, 2, "first", None, 2, 1, 16),
    ((13, 9), 0, 4, 1, "first", None, 1, 1, 32),
    ((12, 16), 0, 3, 2, "last", None, 1, 1, 16),
    ((9, 11), 6, 2, 1, "first", None, 1, 1, 24),  # head_dim not a power of two: padded channels
    ((8, 12), 3, 3, 2, "first", (6, 10), 1, 1, 16),
    ((6, 4), 2, 40, 1, "last", None, 1, 1, 16),  # the window covers the grid
    ((16, 16), 3, 20, 1, "first", None, 1, 1, 128),  # mostly full key tiles (no mask), FLUX's head_dim
]


@outer_test
def test_kernel_cases_visit_full_boundary_and_skip_tiles() -> None:
    """The cases above exercise every kind of key tile of the fp32 kernel: full, boundary, and skipped ones."""
    kinds = set()
    for grid, t, r, d, pos, ref, _, _, dim in KERNEL_CASES:
        layout = CLEARLayout(grid, t, r, d, pos, ref)
        tiling = choose_tiling(layout, dim, torch.float32)
        schedule = block_schedule(layout, tiling)
        (kh, kw), nq = tiling.key, schedule.query_tiles.shape[0]
        nk = sum(-(-h // kh) * -(-w // kw) for h, w in layout.image_grids)
        full, boundary = schedule.full_tiles.shape[0], schedule.partial_tiles.shape[0]
        present = {"full": full > 0, "boundary": boundary > 0, "skipped": full + boundary < nq * nk}
        kinds |= {name for name, yes in present.items() if yes}
    assert kinds == {"full", "boundary", "skipped"}


def _case_id(case) -> str:
    grid, t, r, d, pos, ref, b, h, dim = case
    return f"{grid[0]}x{grid[1]}-t{t}-r{r}-d{d}-{pos}{'-ref' if ref else ''}-b{b}h{h}D{dim}"


def _inputs(layout: CLEARLayout, batch: int, heads: int, dim: int, requires_grad: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, layout.q_len, heads, dim)
    q, k, v = (torch.randn(shape, generator=gen).to(KERNEL_DEVICE).requires_grad_(requires_grad) for _ in range(3))
    weight = None
    if layout.down_factor > 1:  # a random pooling weight, so that pooled keys differ from a plain mean
        d = layout.down_factor
        weight = torch.rand((d, d), generator=gen).to(KERNEL_DEVICE).requires_grad_(requires_grad)
    return q, k, v, weight


@kernel_test
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_triton_equals_dense(case) -> None:
    grid, t, r, d, pos, ref, batch, heads, dim = case
    layout = CLEARLayout(grid, t, r, d, pos, ref)
    q, k, v, weight = _inputs(layout, batch, heads, dim)
    expected = clear_attention_with_layout(q, k, v, layout, spatial_weight=weight, backend="dense")
    got = clear_attention_with_layout(q, k, v, layout, spatial_weight=weight, backend="triton")
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, *([torch.bfloat16] if KERNEL_DEVICE == "cuda" else [])])
def test_triton_half_precision_close_to_float32(dtype) -> None:
    layout = CLEARLayout((10, 20), 4, 3, 2, "last")
    q, k, v, weight = _inputs(layout, 1, 1, 64)
    expected = clear_attention_with_layout(q, k, v, layout, spatial_weight=weight, backend="dense")
    got = clear_attention_with_layout(
        q.to(dtype), k.to(dtype), v.to(dtype), layout, spatial_weight=weight, backend="triton"
    )
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@kernel_test
def test_triton_on_non_contiguous_inputs_and_custom_scale() -> None:
    layout = CLEARLayout((10, 12), 5, 3, 2)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, layout.q_len, 16, generator=gen).transpose(1, 2).to(KERNEL_DEVICE) for _ in range(3))
    assert not q.is_contiguous()
    expected = clear_attention_with_layout(q, k, v, layout, scale=0.3, backend="dense")
    got = clear_attention_with_layout(q, k, v, layout, scale=0.3, backend="triton")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@kernel_test
@pytest.mark.parametrize("radius", [6, 20], ids=["boundary-tiles", "full-tiles"])
def test_triton_on_queries_keys_and_values_of_different_layouts(radius: int) -> None:
    """q a transposed view, k contiguous, v a slice of wider rows (as from a fused projection): each is read with
    its own strides, in boundary and in full (unmasked) key tiles."""
    layout = CLEARLayout((16, 16), 3, radius)
    if radius == 20:
        assert block_schedule(layout, choose_tiling(layout, 32, torch.float32)).full_tiles.shape[0] > 0
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, layout.q_len, 32, generator=gen).transpose(1, 2).to(KERNEL_DEVICE)
    k = torch.randn(1, layout.q_len, 2, 32, generator=gen).to(KERNEL_DEVICE)
    v = torch.randn(1, layout.q_len, 2, 48, generator=gen)[..., 16:].to(KERNEL_DEVICE)
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    expected = clear_attention_with_layout(q, k, v, layout, backend="dense")
    torch.testing.assert_close(
        clear_attention_with_layout(q, k, v, layout, backend="triton"), expected, atol=1e-5, rtol=1e-5
    )


@kernel_test
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale-0.3"])
@pytest.mark.parametrize("layout", [CLEARLayout((10, 6), 2, 3, 2), CLEARLayout((9, 7), 0, 2, 1, "last")], ids=str)
def test_triton_gradients_equal_dense(layout: CLEARLayout, scale) -> None:
    q, k, v, weight = _inputs(layout, 2, 1, 16, requires_grad=True)
    inputs = [x for x in (q, k, v, weight) if x is not None]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)

    def grads(name: str):
        out = clear_attention_with_layout(q, k, v, layout, spatial_weight=weight, scale=scale, backend=name)
        return torch.autograd.grad(out, inputs, grad_out)

    names = ("query", "key", "value", "spatial_weight")
    for name, got, expected in zip(names, grads("triton"), grads("dense"), strict=False):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"grad {name}: {m}")


@kernel_test
def test_triton_gradient_of_value_only() -> None:
    """Only the inputs that need a gradient get one (the others are not differentiated)."""
    layout = CLEARLayout((7, 9), 3, 2)
    q, k, _, _ = _inputs(layout, 1, 1, 16)
    v = torch.randn_like(q).requires_grad_(True)
    expected = torch.autograd.grad(clear_attention_with_layout(q, k, v, layout, backend="dense").sum(), v)
    got = torch.autograd.grad(clear_attention_with_layout(q, k, v, layout, backend="triton").sum(), v)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)


@outer_test
@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="kernel tests run in this process")
def test_kernel_under_the_interpreter() -> None:
    """The kernel tests of this file, in a fresh process whose triton is imported with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}


def _compiled(layout: CLEARLayout, dtype: torch.dtype, head_dim: int, sm: int, shared_memory: int = 101376):
    """The kernel compiled for CUDA compute capability ``sm`` with the arguments of a real launch (no GPU needed)
    on a GPU whose blocks get ``shared_memory`` bytes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clear_dit.backends.triton import _KERNEL, kernel_launch

    q = torch.zeros(1, layout.q_len, 2, head_dim, dtype=dtype)
    kv = torch.zeros(1, layout.kv_len, 2, head_dim, dtype=dtype)
    launch = kernel_launch(q, kv, kv, q, layout, 0.1, shared_memory)
    kernel = _KERNEL[0]
    names = [name for name in kernel.arg_names if name not in launch.constexprs]
    types = [_POINTER[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
             for a in launch.args]  # fmt: skip
    signature = dict(zip(names, types, strict=True)) | dict.fromkeys(launch.constexprs, "constexpr")
    source = ASTSource(fn=kernel, signature=signature, constexprs=launch.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", sm, 32), options=launch.options)


@outer_test
def test_kernel_compiles_for_a_gpu_target() -> None:
    """The compiled path (what the interpreter does not check: typing, constexpr helpers, layouts, ptxas), for
    an H100/H200 (sm_90) target, with the arguments of a real launch; needs no GPU. bf16: the dtype FLUX runs in,
    which the interpreter cannot run."""
    compiled = _compiled(CLEARLayout((20, 24), 7, 5, 2), torch.bfloat16, 64, 90)
    assert "cubin" in compiled.asm and compiled.metadata.shared < 228 * 1024  # fits an sm_90 SM's shared memory


@outer_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(("sm", "shared_memory"), [(86, 101376), (75, 65536)], ids=["sm86", "sm75"])
def test_kernel_fits_the_shared_memory_of_consumer_gpus(dtype, head_dim: int, sm: int, shared_memory: int) -> None:
    """A block gets at most 99 KB of shared memory on sm_86/sm_89 (RTX 30/40), 64 KB on Turing (T4, RTX 20),
    163 KB on A100, 227 KB on H100; a kernel that needs more fails to launch. fp32 tiles at head_dim 128 needed
    104 KB on sm_86, 16-bit ones at head_dim 128 96 KB on sm_75."""
    compiled = _compiled(CLEARLayout((64, 64), 7, 8, 2), dtype, head_dim, sm, shared_memory)
    assert compiled.metadata.shared <= shared_memory


@outer_test
def test_fp32_dots_use_tf32_only_where_torch_matmuls_may(monkeypatch) -> None:
    """The dense oracle's rule (torch.backends.cuda.matmul.allow_tf32, off by default): the interpreter has no
    TF32, so only the launch shows it."""
    from clear_dit.backends.triton import kernel_launch

    layout = CLEARLayout((8, 8), 3, 2)
    q = torch.zeros(1, layout.q_len, 1, 16)
    for allowed, precision in ((False, "ieee"), (True, "tf32")):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allowed)
        assert kernel_launch(q, q, q, q, layout, 0.1).constexprs["PRECISION"] == precision
    assert kernel_launch(q.half(), q.half(), q.half(), q.half(), layout, 0.1).constexprs["PRECISION"] == "ieee"


@outer_test
def test_kernel_compiles_for_head_dims_below_16() -> None:
    """tl.dot needs block sides of at least 16: the interpreter runs narrower ones, the GPU compiler refuses them."""
    assert "cubin" in _compiled(CLEARLayout((8, 8), 3, 2), torch.float16, 8, 90).asm


# --- availability and "auto" -------------------------------------------------------------------------


@outer_test
def test_unavailable_reasons() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert TRITON.unavailable_reason(cuda, dtype) is None
    assert "float16, bfloat16 or float32" in TRITON.unavailable_reason(cuda, torch.float64)
    assert "TRITON_INTERPRET=1" in TRITON.unavailable_reason(cpu, torch.float32)
    assert "CUDA" in TRITON.unavailable_reason(torch.device("mps"), torch.float32)
    with pytest.raises(ValueError, match="unavailable on cpu"):
        select_backend("triton", CLEARLayout((4, 4), 2, 2), torch.zeros(1, 18, 1, 16))


@kernel_test
@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="the interpreter's own limits")
def test_interpreter_runs_on_cpu_but_refuses_bfloat16() -> None:
    assert TRITON.unavailable_reason(torch.device("cpu"), torch.float32) is None
    for device in ("cpu", "cuda"):  # the interpreter runs CUDA tensors too, through host copies
        assert "bfloat16" in TRITON.unavailable_reason(torch.device(device), torch.bfloat16)
    assert auto_backend_name(CLEARLayout((64, 64), 512, 8), torch.device("cpu")) == "tiled"  # never on CPU
    # nor on CUDA while interpreted: ~1000x slower than the compiled kernel
    assert auto_backend_name(CLEARLayout((64, 64), 512, 8), torch.device("cuda"), torch.float16, 64) == "tiled"


@kernel_test
def test_kernel_refuses_keys_of_another_layout() -> None:
    """The kernel reads key and value unchecked: keys without the pooled tokens were read past their end."""
    layout = CLEARLayout((4, 4), 2, 2, 2)
    q = torch.randn(1, layout.q_len, 1, 16, device=KERNEL_DEVICE)
    short = torch.randn(1, layout.kv_len - 4, 1, 16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"backend 'triton': key must be \(1, 22, 1, 16\) .* got \(1, 18, 1, 16\)"):
        TRITON(q, short, short, layout, 0.25)


@outer_test
def test_head_dim_beyond_the_kernel_is_refused() -> None:
    layout = CLEARLayout((4, 4), 2, 2)
    q = torch.zeros(1, layout.q_len, 1, MAX_HEAD_DIM * 2)
    with pytest.raises(ValueError, match=f"head_dim <= {MAX_HEAD_DIM}"):
        TRITON(q, q, q, layout, 0.1)


@outer_test
@pytest.mark.parametrize(
    "layout,dtype,head_dim,expected",
    [
        (CLEARLayout((64, 64), 512, 16), None, None, "triton"),
        (CLEARLayout((64, 64), 512, 16), torch.bfloat16, 128, "triton"),
        (CLEARLayout((16, 16), 512, 8, 2), torch.float32, 64, "triton"),
        (CLEARLayout((64, 64), 512, 16), torch.float64, 128, "tiled"),  # the kernel has no float64
        (CLEARLayout((64, 64), 512, 16), torch.float16, MAX_HEAD_DIM, "triton"),
        (CLEARLayout((64, 64), 512, 16), torch.float16, 2 * MAX_HEAD_DIM, "tiled"),
        (CLEARLayout((8, 8), 16, 20), torch.float16, 128, "tiled"),  # covers the grid: one flash SDPA call
    ],
)
def test_auto_on_cuda(layout: CLEARLayout, dtype, head_dim, expected: str) -> None:
    assert auto_backend_name(layout, torch.device("cuda"), dtype, head_dim) == expected


@outer_test
def test_without_triton_the_backend_says_why_and_auto_uses_tiled() -> None:
    """A process where ``import triton`` fails (``sys.modules['triton'] = None`` makes Python refuse it)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from clear_dit import CLEARLayout\n"
        "from clear_dit.backends import BACKENDS, auto_backend_name\n"
        "print(BACKENDS['triton'].unavailable_reason(torch.device('cuda'), torch.float16))\n"
        "print(auto_backend_name(CLEARLayout((64, 64), 512, 16), torch.device('cuda'), torch.float16, 128))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    reason, choice = proc.stdout.strip().splitlines()
    assert reason.startswith("triton is not importable") and "clear-dit[triton]" in reason
    assert choice == "tiled"


@outer_test
def test_benchmark_cuda_columns_and_natten_window() -> None:
    """benchmarks/attention.py --device cuda times "triton" against flex (and the optional libraries)."""
    from benchmarks.attention import cuda_backends, natten_kernel_size, parse_args
    from clear_dit.mask import window_row_extents

    if torch.cuda.is_available():
        assert parse_args(["--device", "cuda"]).backends[:2] == ["triton", "flex"]
    else:
        with pytest.raises(SystemExit):  # argparse's one-line error, not a traceback
            parse_args(["--device", "cuda"])
        assert cuda_backends(torch.bfloat16)[:2] == ["triton", "flex"]
    assert parse_args([]).backends == ["tiled", "dense"]  # the CPU default is unchanged
    for r in (8, 16, 32):
        side, area = natten_kernel_size(r), sum(2 * half + 1 for _, half in window_row_extents(r))
        assert side % 2 == 1 and (side - 2) ** 2 < area < (side + 2) ** 2
