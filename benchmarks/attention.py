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
Times are medians after a warm-up; full attention is measured once per grid (it does not depend on r).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from importlib.util import find_spec
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks._timing import median_seconds
from clear_dit import CLEARLayout, attention_density, available_backends, clear_attention
from clear_dit.mask import window_row_extents

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256], help="square token grids (px / 16)")
    p.add_argument("--radii", type=int, nargs="+", default=[8, 16, 32], help="window radii in tokens")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--backends", nargs="+", help="CLEAR backends to time (default: tiled dense; on CUDA: see the docstring)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (CUDA: GPU columns)")
    p.add_argument("--flex", action="store_true", help="also time 'flex' (slow to compile / O(seq^2) on CPU)")
    p.add_argument("--dense-max-seq", type=int, default=20000, help="skip 'dense' (O(seq^2) mask) above this")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per entry (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget", type=float, default=60.0, help="stop repeating an entry after this many seconds")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the rows to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.grids, args.radii, args.text_len, args.heads, args.head_dim = [8, 16], [2, 4], 16, 2, 16
        args.repeats, args.warmup = 1, 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device is available to torch {torch.__version__} here")
    if args.backends is None:
        args.backends = cuda_backends(DTYPES[args.dtype]) if args.device == "cuda" else ["tiled", "dense"]
    if args.flex and "flex" not in args.backends:
        args.backends = [*args.backends, "flex"]
    return args


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
    rows = []
    for side in args.grids:
        grid, seq = (side, side), args.text_len + side * side
        shape = (args.batch, seq, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(device=args.device, dtype=dtype) for _ in range(3))

        def full(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        cuda = args.device == "cuda"
        with torch.no_grad():
            full_s = median_seconds(_synchronized(full) if cuda else full, args.repeats, args.warmup, args.budget)
            for r in args.radii:
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
                    "full_ms": full_s * 1e3,
                    "backends": {},
                    "skipped": {},
                }
                for name in args.backends:
                    reason = _skip_reason(name, seq, args)
                    if reason:
                        row["skipped"][name] = reason
                        continue

                    def clear(name=name, layout=layout, q=q, k=k, v=v):
                        return clear_attention(
                            q,
                            k,
                            v,
                            grid=layout.grid,
                            text_len=layout.text_len,
                            window_size=layout.window_size,
                            backend=name,
                        )

                    fn = partial(_natten, q, k, v, layout) if name == "natten" else clear
                    if not cuda:
                        t = median_seconds(fn, args.repeats, args.warmup, args.budget)
                    else:  # an optional library or kernel failing on this GPU is a finding, not the end of the run
                        try:
                            t = median_seconds(_synchronized(fn), args.repeats, args.warmup, args.budget)
                        except Exception as err:  # noqa: BLE001
                            row["skipped"][name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                            continue
                    row["backends"][name] = {"ms": t * 1e3, "speedup": full_s / t}
                rows.append(row)
                print(format_row(row, args.backends), flush=True)
    return rows


def format_header(backends: list[str]) -> str:
    cols = [f"{'px':>5}", f"{'grid':>8}", f"{'r':>3}", f"{'seq':>6}", f"{'density':>8}", f"{'ideal':>6}"]
    cols += [f"{'full ms':>9}"] + [f"{name + ' ms (x)':>20}" for name in backends]
    return " ".join(cols)


def format_row(row: dict, backends: list[str]) -> str:
    h, w = row["grid"]
    cols = [f"{row['pixels']:>5}", f"{f'{h}x{w}':>8}", f"{row['window_size']:>3}", f"{row['seq']:>6}"]
    cols += [f"{row['density']:>8.4f}", f"{row['ideal_speedup']:>5.1f}x", f"{row['full_ms']:>9.1f}"]
    for name in backends:
        if name in row["backends"]:
            entry = row["backends"][name]
            cols.append(f"{entry['ms']:>11.1f} ({entry['speedup']:>5.2f}x)")
        else:
            cols.append(f"{'skipped':>20}")
    return " ".join(cols)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    print(
        f"CLEAR attention vs full SDPA: text {args.text_len}, heads {args.heads}, head_dim {args.head_dim}, "
        f"batch {args.batch}, {args.dtype}, {where}, torch {torch.__version__}; "
        f"median of {args.repeats} after {args.warmup} warm-up; (x) = full / backend"
    )
    print(format_header(args.backends))
    rows = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": _jsonable(vars(args)), "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


def _jsonable(values: dict) -> dict:
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


if __name__ == "__main__":
    raise SystemExit(main())
