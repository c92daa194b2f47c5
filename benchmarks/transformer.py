"""End-to-end speed of one FLUX double block and one single block: full attention vs CLEAR, side by side.

Example::

    python benchmarks/transformer.py                    # fp32, 1024/2048/4096 px, r = 8/16/32, 2 heads x 128
    python benchmarks/transformer.py --sizes 1024 2048 --radii 16 --heads 4 --json out.json
    python benchmarks/transformer.py --smoke --json /tmp/smoke.json   # tiny sizes, for the test suite
    python benchmarks/transformer.py --report benchmarks/results/transformer_cpu_fp32.json   # README tables

The blocks are diffusers' own ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``, taken from a
randomly initialised ``FluxTransformer2DModel`` (one block of each kind) with FLUX's head size and RoPE axes;
the rotary table comes from the model's own ``FluxPosEmbed`` over FLUX's text + image ids, once per size as
the model does for all its blocks, and is applied to q/k inside every block's processor (so its cost is in the
block). Full attention is the unpatched block (diffusers' ``FluxAttnProcessor``, native SDPA); CLEAR is a copy
of the same model (same weights) after ``clear_dit.patch(model, window_size=r, backend=...)``, its blocks called
with the ``clear_grid`` kwarg the patched model's hook passes, i.e. the processors a patched model uses.

Per size and block kind, measured side by side on the same inputs:

- ``full_block_ms`` / ``clear_block_ms``: the block's forward with full / CLEAR attention;
- ``non_attention_ms``: the block with only the attention product replaced by a no-op of the same shapes (the
  processor still projects, normalises and rotates q/k/v and returns ``value`` as the attention output), i.e.
  everything CLEAR cannot speed up;
- ``full_attention_ms`` / ``clear_attention_ms``: the attention product alone, on the very q/k/v tensors the
  block computed: diffusers' ``dispatch_attention_fn`` (what ``FluxAttnProcessor`` calls) and
  ``clear_dit.clear_attention`` with the layout and backend the CLEAR processor uses.

Derived: ``speedup = full_block / clear_block``; attention shares ``attention_ms / block_ms``;
``ideal_if_attention_free = full_block / non_attention`` (the bound if attention cost nothing) and
``ideal_at_density = full_block / (non_attention + density * full_attention)`` (CLEAR attention running at
its FLOP ratio). Times are medians over rounds that run every measurement of one size and block kind once, in
turn, after a warm-up round: on a shared machine a change of load then hits all of them alike. With fewer heads
than FLUX's 24, attention's share is larger than in FLUX: its cost grows with ``heads``, that of the projections
and MLPs with ``heads^2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

import clear_dit
from app.cli import seed_arg
from benchmarks._args import add_json_arguments, non_negative_int, positive_float, positive_int, refuse_existing_json
from benchmarks._results import run_meta, write_results
from benchmarks._timing import interleaved_medians
from clear_dit import CLEARFluxAttnProcessor, CLEARLayout, attention_density, clear_attention
from clear_dit.backends import auto_backend_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKS = ("double", "single")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split of ``head_dim`` over (id, row, column): ``(16, 56, 56)`` for 128, scaled for others."""
    half = (head_dim - head_dim // 8) // 2 // 2 * 2  # row/column axes: even, about 7/16 of head_dim each
    return head_dim - 2 * half, half, half


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[1024, 2048, 4096], help="square image sizes in px")
    p.add_argument("--radii", type=positive_int, nargs="+", default=[8, 16, 32], help="CLEAR window radii in tokens")
    p.add_argument("--text-len", type=non_negative_int, default=512, help="FLUX.1-dev: 512 T5 tokens")
    p.add_argument(
        "--heads", type=positive_int, default=2, help="attention heads (FLUX.1: 24; fewer keeps CPU runs short)"
    )
    p.add_argument("--head-dim", type=positive_int, default=128, help="FLUX.1: 128")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", default="auto", help="CLEAR backend passed to clear_dit.patch")
    p.add_argument("--repeats", type=positive_int, default=5, help="measured rounds per size and block kind (median)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up rounds")
    p.add_argument(
        "--budget",
        type=positive_float,
        default=200.0,
        help="no new round of a size and block kind after this many seconds (200: three rounds at 4096 px on 2 "
        "cores; one round there is too few, single runs of its CLEAR blocks have been 1.2 s off)",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=seed_arg, default=0)
    add_json_arguments(p, "write the rows to this JSON file (after each size)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    p.add_argument("--report", type=Path, help="print the Markdown tables of a result JSON (as in the README), no run")
    args = p.parse_args(argv)
    refuse_existing_json(p, args)
    if args.smoke:
        args.sizes, args.radii, args.text_len, args.heads, args.head_dim = [128, 256], [2, 4], 8, 2, 16
        args.repeats, args.warmup = 1, 0
    bad_sizes = [s for s in args.sizes if s <= 0 or s % 16]
    if bad_sizes:
        p.error(f"--sizes must be positive multiples of 16 px (one FLUX token per 16 px), got {bad_sizes}")
    if args.head_dim < 8 or args.head_dim % 8:
        p.error(f"--head-dim must be a positive multiple of 8 (FLUX RoPE splits it over 3 axes), got {args.head_dim}")
    if args.backend != "auto" and args.backend not in clear_dit.available_backends("cpu", DTYPES[args.dtype]):
        p.error(f"--backend must be 'auto' or one of {clear_dit.available_backends('cpu', DTYPES[args.dtype])}")
    if args.report and not args.report.is_file():
        p.error(f"--report: no such result file: {args.report}")
    from clear_dit.backends.dense import _cached_bias

    kept = _cached_bias.cache_info().maxsize
    for px in args.sizes:  # an interleaved round would rebuild masks inside the timed blocks
        dense = _dense_radii(args, px)
        if len(dense) > kept:
            p.error(
                f"--backend {args.backend} runs 'dense' at {px} px for radii {dense}, but 'dense' caches {kept} "
                f"masks: time at most {kept} of them per run"
            )
    return args


def _dense_radii(args: argparse.Namespace, px: int) -> list[int]:
    """The radii whose CLEAR blocks run backend "dense" at ``px`` (each with its own O(seq^2) cached mask)."""
    if args.backend != "auto":
        return list(args.radii) if args.backend == "dense" else []
    grid, cpu = (px // 16, px // 16), torch.device("cpu")
    return [
        r
        for r in args.radii
        if auto_backend_name(CLEARLayout(grid, args.text_len, r), cpu, DTYPES[args.dtype]) == "dense"
    ]


class _NoAttentionProcessor(CLEARFluxAttnProcessor):
    """The CLEAR processor with the attention product replaced by a no-op: everything around it still runs.

    It returns ``value`` (the attention output's shape, real numbers, no work) and keeps the last q/k/v, so
    the attention product can be timed alone on exactly the tensors the block computed.
    """

    def __init__(self) -> None:
        super().__init__(window_size=1)
        self.last_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _attend(self, query, key, value, grid, text_position, reference_grid=None) -> torch.Tensor:
        self.last_qkv = (query, key, value)
        return value.flatten(2, 3)


def build_model(args: argparse.Namespace) -> FluxTransformer2DModel:
    """A random FLUX transformer with one double and one single block of FLUX's shape (but ``args.heads``)."""
    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        axes_dims_rope=rope_axes(args.head_dim),
    )
    if DTYPES[args.dtype] != torch.float32:  # built in float32; cast only when asked (diffusers warns on a cast)
        model = model.to(DTYPES[args.dtype])
    return model.eval()


def block_inputs(model: FluxTransformer2DModel, side: int, args: argparse.Namespace) -> dict:
    """Keyword arguments of a block call for a ``side x side`` token grid, as ``FluxTransformer2DModel`` makes them.

    ``hidden_states`` ``(batch, side*side, dim)``, ``encoder_hidden_states`` ``(batch, text_len, dim)``, ``temb``
    ``(batch, dim)``; ``image_rotary_emb`` from the model's ``FluxPosEmbed`` over ``[txt_ids] + [img_ids]``.
    """
    dim, dtype = model.inner_dim, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    ids = torch.cat([torch.zeros(args.text_len, 3), img_ids.reshape(-1, 3)])
    return dict(
        hidden_states=torch.randn(args.batch, side * side, dim, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(args.batch, args.text_len, dim, generator=gen).to(dtype),
        temb=torch.randn(args.batch, dim, generator=gen).to(dtype),
        image_rotary_emb=model.pos_embed(ids),
    )


@dataclass
class Variants:
    """Copies of one random model (same weights): stock (full attention), no attention product, CLEAR per radius.

    Separate copies, each set up once, so the interleaved timing rounds only call blocks and never swap
    processors.
    """

    full: FluxTransformer2DModel
    no_attention: FluxTransformer2DModel
    clear: dict[int, FluxTransformer2DModel]

    @classmethod
    def build(cls, args: argparse.Namespace) -> Variants:
        full = build_model(args)
        no_attention = copy.deepcopy(full)
        for kind in BLOCKS:
            _block(no_attention, kind).attn.set_processor(_NoAttentionProcessor())
        clear = {}
        for r in args.radii:
            clear[r] = copy.deepcopy(full)
            clear_dit.patch(clear[r], window_size=r, backend=args.backend)
        return cls(full, no_attention, clear)


def _block(model: FluxTransformer2DModel, kind: str) -> nn.Module:
    return model.transformer_blocks[0] if kind == "double" else model.single_transformer_blocks[0]


def measure_block(variants: Variants, kind: str, side: int, inputs: dict, args: argparse.Namespace) -> list[dict]:
    """One row per radius for the ``kind`` block at a ``side x side`` grid (see the module docstring)."""
    grid = (side, side)
    clear_kwargs = {"joint_attention_kwargs": {"clear_grid": grid}}  # what clear_dit.patch's model hook passes
    no_attention = _block(variants.no_attention, kind)
    no_attention(**inputs, **clear_kwargs)
    q, k, v = no_attention.attn.processor.last_qkv

    def clear_block_fn(block: nn.Module) -> Callable[[], object]:
        return lambda: block(**inputs, **clear_kwargs)

    def clear_attention_fn(r: int) -> Callable[[], torch.Tensor]:
        return lambda: clear_attention(q, k, v, grid=grid, text_len=args.text_len, window_size=r, backend=args.backend)

    fns = {
        "full_block": lambda: _block(variants.full, kind)(**inputs),
        "non_attention": clear_block_fn(no_attention),
        "full_attention": lambda: dispatch_attention_fn(q, k, v).flatten(2, 3),  # as FluxAttnProcessor calls it
    }
    for r, model in variants.clear.items():
        fns[f"clear_block_{r}"] = clear_block_fn(_block(model, kind))
        fns[f"clear_attention_{r}"] = clear_attention_fn(r)
    medians = interleaved_medians(fns, args.repeats, args.warmup, args.budget)
    ms = {name: s * 1e3 for name, s in medians.items()}

    full_block_ms, non_attention_ms, full_attention_ms = ms["full_block"], ms["non_attention"], ms["full_attention"]
    rows = []
    for r in args.radii:
        clear_block_ms, clear_attention_ms = ms[f"clear_block_{r}"], ms[f"clear_attention_{r}"]
        density = attention_density(grid, args.text_len, r)
        layout = CLEARLayout(grid, args.text_len, r)
        rows.append(
            {
                "pixels": side * 16,
                "grid": list(grid),
                "block": kind,
                "window_size": r,
                "text_len": args.text_len,
                "seq": args.text_len + side * side,
                "rounds": medians.rounds,
                "heads": args.heads,
                "head_dim": args.head_dim,
                "dim": variants.full.inner_dim,
                "batch": args.batch,
                "dtype": args.dtype,
                "threads": args.threads,
                "backend": args.backend,
                "backend_used": auto_backend_name(layout, q.device, q.dtype)
                if args.backend == "auto"
                else args.backend,
                "density": density,
                "full_block_ms": full_block_ms,
                "clear_block_ms": clear_block_ms,
                "non_attention_ms": non_attention_ms,
                "full_attention_ms": full_attention_ms,
                "clear_attention_ms": clear_attention_ms,
                "full_attention_share": full_attention_ms / full_block_ms,
                "clear_attention_share": clear_attention_ms / clear_block_ms,
                "speedup": full_block_ms / clear_block_ms,
                "attention_speedup": full_attention_ms / clear_attention_ms,
                "ideal_if_attention_free": full_block_ms / non_attention_ms,
                "ideal_at_density": full_block_ms / (non_attention_ms + density * full_attention_ms),
            }
        )
    return rows


def run(args: argparse.Namespace, after_size: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every size and block kind; ``after_size`` gets the rows so far after each size."""
    torch.set_num_threads(args.threads)
    variants = Variants.build(args)
    rows = []
    with torch.no_grad():
        for px in args.sizes:
            side = px // 16
            inputs = block_inputs(variants.full, side, args)
            for kind in BLOCKS:
                for row in measure_block(variants, kind, side, inputs, args):
                    rows.append(row)
                    print(format_row(row), flush=True)
            if after_size is not None:
                after_size(rows)
    return rows


COLUMNS = (
    ("px", 5),
    ("block", 6),
    ("r", 3),
    ("backend", 7),
    ("density", 7),
    ("full ms", 9),
    ("CLEAR ms", 9),
    ("speedup", 7),
    ("no-attn ms", 10),
    ("attn% full", 10),
    ("attn% CLEAR", 11),
    ("attn x", 6),
    ("ideal free", 10),
    ("ideal dens", 10),
)


def format_header() -> str:
    return " ".join(f"{name:>{width}}" for name, width in COLUMNS)


def format_row(row: dict) -> str:
    values = (
        row["pixels"],
        row["block"],
        row["window_size"],
        row["backend_used"],
        f"{row['density']:.4f}",
        f"{row['full_block_ms']:.1f}",
        f"{row['clear_block_ms']:.1f}",
        f"{row['speedup']:.2f}x",
        f"{row['non_attention_ms']:.1f}",
        f"{100 * row['full_attention_share']:.1f}%",
        f"{100 * row['clear_attention_share']:.1f}%",
        f"{row['attention_speedup']:.2f}x",
        f"{row['ideal_if_attention_free']:.2f}x",
        f"{row['ideal_at_density']:.2f}x",
    )
    return " ".join(f"{value:>{width}}" for value, (_, width) in zip(values, COLUMNS, strict=True))


MARKDOWN_HEADER = (
    "| image | r | backend | full ms | CLEAR ms | speedup | non-attention ms | attention share full / CLEAR "
    "| attention speedup | ideal, attention free | ideal, at density |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_markdown(rows: list[dict]) -> str:
    """The README tables of a result: one per block kind, one line per size and radius."""
    tables = []
    for kind in BLOCKS:
        lines = [f"{kind} block ({'FluxTransformerBlock' if kind == 'double' else 'FluxSingleTransformerBlock'}):", ""]
        lines.append(MARKDOWN_HEADER)
        for row in (row for row in rows if row["block"] == kind):
            lines.append(
                f"| {row['pixels']} px | {row['window_size']} | {row['backend_used']} | {row['full_block_ms']:.0f} "
                f"| {row['clear_block_ms']:.0f} | {row['speedup']:.2f}x | {row['non_attention_ms']:.0f} "
                f"| {100 * row['full_attention_share']:.0f}% / {100 * row['clear_attention_share']:.0f}% "
                f"| {row['attention_speedup']:.2f}x | {row['ideal_if_attention_free']:.2f}x "
                f"| {row['ideal_at_density']:.2f}x |"
            )
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        try:
            print(format_markdown(json.loads(args.report.read_text())["rows"]))
        except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
            print(f"error: --report: {args.report} is not a result JSON of benchmarks/transformer.py", file=sys.stderr)
            return 2
        return 0
    print(
        f"FLUX blocks, full attention vs CLEAR ({args.backend}): sizes {args.sizes} px, radii {args.radii}, "
        f"text {args.text_len}, heads {args.heads}, head_dim {args.head_dim}, batch {args.batch}, {args.dtype}, "
        f"{args.threads} threads, torch {torch.__version__}, diffusers {diffusers.__version__}; median of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up (at least one, no new round after "
        f"{args.budget:g} s; each row's JSON 'rounds' says how many ran); "
        "speedup = full / CLEAR block, attn% = attention product / block, "
        "ideal free = full / no-attn, ideal dens = full / (no-attn + density * full attention)"
    )
    print(format_header())
    meta = run_meta(diffusers=diffusers.__version__)

    def write(rows: list[dict]) -> None:  # after every size, so that a long run that stops early keeps what it measured
        if args.json:
            write_results(args.json, args, meta, rows=rows)

    run(args, write)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
