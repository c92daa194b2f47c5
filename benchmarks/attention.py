"""Speed of CLEAR attention backends against full attention (unmasked SDPA), side by side in one process.

Example::

    python benchmarks/attention.py                      # fp32, 1024/2048/4096 px, r = 8/16/32, 2 threads
    python benchmarks/attention.py --grids 64 128 --dtype bf16 --json out.json
    python benchmarks/attention.py --smoke --json /tmp/smoke.json   # tiny sizes, for the test suite
    python benchmarks/attention.py --device cuda --dtype bf16 --heads 24 --json gpu.json   # on a GPU

On CUDA (``--device cuda``) the default columns are ``triton`` and ``flex`` (compiled FlexAttention with the
same block mask), plus ``xformers`` where it is installed and ``natten`` (NATTEN's fused ``na2d`` over the image
tokens with a square window of the same area as the circle, text tokens as its additional keys) where natten is
installed; times are taken after ``torch.cuda.synchronize()``. A column that fails on the GPU is reported as
skipped with its error instead of ending the run.

Per row: time of full attention over text + image tokens, of each CLEAR backend (through the public
``clear_attention``), the speedup ``full / backend`` and the ideal speedup ``1 / density`` (the FLOP ratio).
Full attention and the backends of a row run in interleaved rounds (full, backend 1, backend 2, full, ...)
and each time is the median over rounds, so that load on a shared machine hits all of them alike.

``--flex-compiled`` adds ``flex-compiled``: ``torch.compile(flex_attention)`` with the CLEAR block mask,
compiled for every layout, with room for more than dynamo's default 8 compiles of one function (past them it
would silently run un-compiled, as would the ``flex`` column on CUDA); its compile time and the block mask's
build time (the mask evaluated a few query blocks at a time: ~50 s at 4096 px on 2 CPU threads) are reported
apart and excluded from its time.

``--tiles 4x8 16x16`` adds one column per query tile shape, ``tiled[4x8]``: the ``tiled`` backend with that tile
instead of the one :func:`clear_dit.backends.tiled.tile_shape` picks (the sweep behind its ``TILE_SHAPES``).

``--memory`` adds, per backend, the peak extra memory of one call: the high-water mark of the bytes held by
torch's CPU allocator during the call (allocation and free events of the profiler's memory profile),
minus the output; the table prints it as a multiple of ``q + k + v`` (``mem``).

``--rows 64:16 128:8`` replaces the grid x radius product by these ``grid:radius`` pairs (``--rows issue``
is the five rows of issue 3's target table).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
import time
from importlib.util import find_spec
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from app.cli import seed_arg
from benchmarks._args import add_json_arguments, non_negative_int, positive_float, positive_int, refuse_existing_json
from benchmarks._results import run_meta, write_results
from benchmarks._timing import interleaved_medians
from clear_dit import CLEARLayout, attention_density, available_backends, clear_attention
from clear_dit.backends import BACKENDS
from clear_dit.backends.flex import _block_mask, run_flex
from clear_dit.backends.tiled import TiledBackend
from clear_dit.mask import window_row_extents

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", type=positive_int, nargs="+", default=[64, 128, 256], help="square token grids (px / 16)")
    p.add_argument("--radii", type=positive_int, nargs="+", default=[8, 16, 32], help="window radii in tokens")
    p.add_argument("--text-len", type=non_negative_int, default=512)
    p.add_argument("--heads", type=positive_int, default=2)
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--backends", nargs="+", help="CLEAR backends to time (default: tiled dense; on CUDA: see the docstring)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (CUDA: GPU columns)")
    p.add_argument("--flex", action="store_true", help="also time 'flex' (slow to compile / O(seq^2) on CPU)")
    p.add_argument("--flex-compiled", action="store_true", help="also time compiled flex_attention (per layout)")
    p.add_argument("--memory", action="store_true", help="also measure each backend's peak extra memory")
    p.add_argument("--rows", nargs="+", help="grid:radius pairs instead of --grids x --radii; 'issue' = issue 3's")
    p.add_argument("--tiles", nargs="+", default=[], help="also time 'tiled' with these query tiles, e.g. 4x8 16x16")
    p.add_argument(
        "--dense-max-seq", type=non_negative_int, default=20000, help="skip 'dense' (O(seq^2) mask) above this"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="measured runs per entry (median)")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument(
        "--budget",
        type=positive_float,
        default=60.0,
        help="no new round of a row after its rounds took this many seconds",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=seed_arg, default=0)
    add_json_arguments(p, "write the rows to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    args = p.parse_args(argv)
    refuse_existing_json(p, args)
    if args.smoke:
        args.grids, args.radii, args.text_len, args.heads, args.head_dim = [8, 16], [2, 4], 16, 2, 16
        args.repeats, args.warmup = 1, 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device is available to torch {torch.__version__} here")
    if args.device == "cuda" and args.memory:  # it profiles the CPU allocator
        p.error("--memory measures CPU memory: run it without --device cuda")
    if args.backends is None:
        args.backends = cuda_backends(DTYPES[args.dtype]) if args.device == "cuda" else ["tiled", "dense"]
    if args.flex and "flex" not in args.backends:
        args.backends = [*args.backends, "flex"]
    if args.rows == ["issue"]:
        args.rows = ISSUE_ROWS
    args.rows = [_parse_row(p, text) for text in args.rows] if args.rows else None
    known = ["auto", *BACKENDS, "natten"]
    unknown = [name for name in args.backends if name not in known]
    if unknown:
        p.error(f"--backends: unknown {unknown}; known: {', '.join(known)}")
    runnable = ["auto", *available_backends(args.device, DTYPES[args.dtype])]
    runnable += ["natten"] if args.device == "cuda" and find_spec("natten") is not None else []
    unavailable = [name for name in args.backends if name not in runnable]
    if unavailable:
        p.error(
            f"--backends: {unavailable} cannot run on {args.device} with {args.dtype} here; "
            f"available: {', '.join(runnable)}"
        )
    args.tiles = [_parse_tile(p, text) for text in args.tiles]
    return args


def _parse_row(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    grid, _, radius = text.partition(":")
    if not (grid.isdigit() and radius.isdigit() and int(grid) > 0 and int(radius) > 0):
        parser.error(f"--rows: {text!r} is not GRID:RADIUS with positive sizes, e.g. 128:16 (or 'issue')")
    return int(grid), int(radius)


def _parse_tile(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        parser.error(f"--tiles: {text!r} is not ROWSxCOLUMNS with positive sizes, e.g. 4x8")
    return int(rows), int(cols)


def _tile_column(tile: tuple[int, int]) -> str:
    return f"tiled[{tile[0]}x{tile[1]}]"


ISSUE_ROWS = ["64:16", "128:8", "128:16", "128:32", "256:16"]


def _columns(args: argparse.Namespace) -> list[str]:
    tiles = [_tile_column(tile) for tile in args.tiles]
    return [*args.backends, *tiles, *(["flex-compiled"] if args.flex_compiled else [])]


def _forget_backend_caches() -> None:
    """Empty the backends' per-layout caches (dense's seq^2 mask, flex's block mask, tiled's schedules); caches of
    no arguments (a compiled kernel) stay: recompiling inside the measurement is not what a size costs."""
    import clear_dit.backends as backends

    for module in [m for name, m in sys.modules.items() if name.startswith(backends.__name__ + ".")]:
        for value in vars(module).values():
            if hasattr(value, "cache_clear") and inspect.signature(value).parameters:
                value.cache_clear()


def peak_extra_bytes(fn) -> tuple[int, torch.Tensor]:
    """``(peak bytes held by torch's CPU allocator during fn() beyond what it returns, the result)``.

    From the profiler's memory events (every allocation and free, in order): the running sum's maximum,
    minus the bytes of the returned tensor. The inputs (allocated before) do not count; the backends' caches are
    emptied first, so that what a backend builds and keeps for a size (dense's seq^2 mask) counts, as on the first
    call at that size: measured warm, dense looked the leanest backend.
    """
    from torch.profiler import ProfilerActivity, profile

    _forget_backend_caches()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak - out.numel() * out.element_size(), out


def _compiled_flex(layout: CLEARLayout, q, k, v):
    """A fresh ``torch.compile(flex_attention)`` for this layout, as a no-argument callable, its compile time and
    the build time of its block mask."""
    from torch.nn.attention.flex_attention import flex_attention

    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    block_mask = _block_mask.__wrapped__(layout, q.device)  # built here: the "flex" column may have cached it
    sync()
    mask_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def call():
        out = run_flex(compiled, qt, kt, vt, block_mask, q.shape[-1] ** -0.5)
        sync()  # wall time covers the GPU work (CUDA is async)
        return out

    start = time.perf_counter()
    call()
    return call, time.perf_counter() - start, mask_s


def cuda_backends(dtype: torch.dtype) -> list[str]:
    """The GPU columns: the fused kernel, compiled flex, and the optional libraries that are installed."""
    names = [name for name in ("triton", "flex", "xformers") if name in available_backends("cuda", dtype)]
    return names + (["natten"] if find_spec("natten") is not None else [])


def natten_kernel_size(window_size: int) -> int:
    """Odd side of the square window with (about) the area of the circular one: NATTEN's comparable window."""
    area = sum(2 * half + 1 for _, half in window_row_extents(window_size))
    return 2 * round((area**0.5 - 1) / 2) + 1


def _natten(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: CLEARLayout) -> torch.Tensor:
    """NATTEN's 2D neighborhood attention on the image tokens (text first), text tokens as additional keys."""
    from natten.functional import na2d

    t, (h, w) = layout.text_len, layout.grid
    image = [x[:, t:].unflatten(1, (h, w)) for x in (q, k, v)]  # (B, h, w, heads, D)
    kernel = min(natten_kernel_size(layout.window_size), h if h % 2 else h - 1, w if w % 2 else w - 1)
    extra = {"additional_keys": k[:, :t], "additional_values": v[:, :t]} if t else {}
    return na2d(*image, kernel_size=kernel, **extra)


def _synchronized(fn):
    """``fn`` followed by a device synchronization, so that wall time covers the GPU work (CUDA is async)."""

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _skip_reason(backend: str, seq: int, args: argparse.Namespace) -> str | None:
    if backend == "dense" and seq > args.dense_max_seq:
        return f"seq {seq} > --dense-max-seq {args.dense_max_seq} (O(seq^2) mask)"
    return None


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    pairs = args.rows or [(side, r) for side in args.grids for r in args.radii]
    rows, tensors, meta = [], {}, run_meta()
    for side, r in pairs:
        grid, seq = (side, side), args.text_len + side * side
        if side not in tensors:  # one set of inputs per grid, shared by its radii
            shape = (args.batch, seq, args.heads, args.head_dim)
            tensors = {side: [torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3)]}
        q, k, v = tensors[side]
        layout = CLEARLayout(grid, args.text_len, r)
        density = attention_density(grid, args.text_len, r)
        row = {
            "pixels": side * 16,
            "grid": list(grid),
            "text_len": args.text_len,
            "window_size": r,
            "seq": seq,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": args.batch,
            "dtype": args.dtype,
            "threads": args.threads,
            "device": args.device,
            "density": density,
            "ideal_speedup": 1.0 / density,
            "qkv_bytes": 3 * q.numel() * q.element_size(),
            "backends": {},
            "skipped": {},
        }

        def full(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        cuda = args.device == "cuda"
        fns = {"full": _synchronized(full) if cuda else full}
        with torch.no_grad():
            for name in args.backends:
                reason = _skip_reason(name, seq, args)
                if reason:
                    row["skipped"][name] = reason
                    continue
                if name == "natten":
                    fn = functools.partial(_natten, q, k, v, layout)
                else:
                    fn = functools.partial(
                        clear_attention, q, k, v, grid=grid, text_len=args.text_len, window_size=r, backend=name
                    )
                if cuda:  # an optional library or kernel failing on this GPU is a finding, not the end of the run
                    fn = _synchronized(fn)
                    try:
                        fn()
                    except Exception as err:  # noqa: BLE001
                        row["skipped"][name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                        continue
                fns[name] = fn
            for tile in args.tiles:
                fn = functools.partial(TiledBackend(tile), q, k, v, layout, args.head_dim**-0.5)
                fns[_tile_column(tile)] = _synchronized(fn) if cuda else fn
            if args.flex_compiled:
                fns["flex-compiled"], row["flex_compile_s"], row["flex_mask_s"] = _compiled_flex(layout, q, k, v)
            times = interleaved_medians(fns, args.repeats, args.warmup, args.budget)
            row["rounds"] = times.rounds
            for name in fns:
                if name != "full":
                    row["backends"][name] = {"ms": times[name] * 1e3, "speedup": times["full"] / times[name]}
                    if args.memory:
                        extra, _ = peak_extra_bytes(fns[name])
                        row["backends"][name]["peak_extra_bytes"] = extra
                        row["backends"][name]["peak_extra_vs_qkv"] = extra / row["qkv_bytes"]
        row["full_ms"] = times["full"] * 1e3
        rows.append(row)
        print(format_row(row, _columns(args)), flush=True)
        if args.json:  # after every row, so that a long run that stops early keeps what it measured
            write_results(args.json, args, meta, rows=rows)
    return rows


def format_header(backends: list[str]) -> str:
    cols = [f"{'px':>5}", f"{'grid':>8}", f"{'r':>3}", f"{'seq':>6}", f"{'density':>8}", f"{'ideal':>6}"]
    cols += [f"{'n':>2}", f"{'full ms':>9}"] + [f"{name + ' ms (x) [mem]':>30}" for name in backends]
    return " ".join(cols)


def format_row(row: dict, backends: list[str]) -> str:
    h, w = row["grid"]
    cols = [f"{row['pixels']:>5}", f"{f'{h}x{w}':>8}", f"{row['window_size']:>3}", f"{row['seq']:>6}"]
    cols += [f"{row['density']:>8.4f}", f"{row['ideal_speedup']:>5.1f}x", f"{row.get('rounds', ''):>2}"]
    cols += [f"{row['full_ms']:>9.1f}"]
    for name in backends:
        if name in row["backends"]:
            entry = row["backends"][name]
            mem = f"[{entry['peak_extra_vs_qkv']:.2f}]" if "peak_extra_vs_qkv" in entry else ""
            cols.append(f"{entry['ms']:>11.1f} ({entry['speedup']:>5.2f}x) {mem:>7}".rjust(30))
        else:
            cols.append(f"{'skipped':>30}")
    return " ".join(cols)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(
        f"CLEAR attention vs full SDPA: text {args.text_len}, heads {args.heads}, head_dim {args.head_dim}, "
        f"batch {args.batch}, {args.dtype}, {where}, torch {torch.__version__}; "
        f"median of up to {args.repeats} interleaved rounds (column 'n': how many ran within --budget "
        f"{args.budget:g} s) after {args.warmup} warm-up; (x) = full / backend, "
        "[mem] = peak extra memory of a first call at the size (cached masks included) / (q + k + v)"
    )
    print(format_header(_columns(args)))
    run(args)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
