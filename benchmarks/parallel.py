"""Communication of patch-parallel CLEAR (halo rows) against all-gathering keys/values, and 1 vs 2 rank wall time.

Example::

    python benchmarks/parallel.py                          # FLUX.1-dev dims, 2K/4K/8K, 2/4/8 ranks, r = 16
    python benchmarks/parallel.py --window 8 --down 4 --json parallel.json
    python benchmarks/parallel.py --smoke --json /tmp/smoke.json   # tiny sizes, for the test suite

1. From the layouts alone (``pipelines.parallel.layer_traffic``): bytes the busiest rank sends per attention
   layer with the halo scheme (halo rows + pooled all-gather + text log-sum-exp all-reduce) and with an
   all-gather of every band's keys/values (what Ring/Ulysses-style context parallelism moves), and their
   ratio; per denoising step it is that times the number of attention layers (57 in FLUX.1).
2. The same bytes counted on the real tensors of a small gloo run of the tiny model, per kind and rank.
3. Wall time of the tiny pipeline on 1 and on 2 CPU processes (one torch thread each), same settings, in one
   launch: rank 0 alone first (the other rank waits), then both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._args import add_json_arguments, non_negative_int, positive_int, refuse_existing_json
from benchmarks._results import run_meta, write_results
from pipelines.parallel import BandPlan, launch_local, layer_traffic

FLUX_LAYERS = 19 + 38  # FLUX.1 double- + single-stream blocks
TINY_LAYERS, TINY_HEADS, TINY_HEAD_DIM = 3, 2, 64  # pipelines.tiny's transformer
KINDS = ("halo", "pooled", "text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=positive_int, nargs="+", default=[2048, 4096, 8192], help="square image sizes in px")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[2, 4, 8])
    p.add_argument("--window", type=positive_int, default=16, help="CLEAR radius r in tokens")
    p.add_argument("--down", type=positive_int, default=1, help="CLEAR down factor d")
    p.add_argument("--text-len", type=non_negative_int, default=512, help="FLUX.1-dev: 512 T5 tokens")
    p.add_argument("--heads", type=positive_int, default=24)
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--element-size", type=positive_int, default=2, help="bytes per key/value element (bf16: 2)")
    p.add_argument(
        "--tiny-size", type=positive_int, nargs=2, default=[1024, 1024], metavar=("H", "W"), help="timing run, px"
    )
    p.add_argument("--tiny-window", type=positive_int, default=16)
    p.add_argument("--tiny-down", type=positive_int, default=2)
    p.add_argument("--steps", type=positive_int, default=4, help="denoising steps of the timing run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed pipeline runs per rank count (median)")
    add_json_arguments(p, "write the results to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    args = p.parse_args(argv)
    refuse_existing_json(p, args)
    if min(args.ranks) < 2:
        p.error(f"argument --ranks: patch parallelism needs at least 2 ranks, got {min(args.ranks)}")
    if args.smoke:
        args.sizes, args.ranks, args.tiny_size, args.steps, args.repeats = [2048], [2], [128, 96], 1, 1
        args.tiny_window = 3
    return args


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def layout_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in args.sizes:
        grid = (size // 16, size // 16)
        for ranks in args.ranks:
            plan = BandPlan(grid, ranks, args.window, args.down)
            per_rank = layer_traffic(plan, args.text_len, args.heads, args.head_dim, args.element_size)
            halo_scheme = max(sum(r[k] for k in KINDS) for r in per_rank)
            gather = max(r["kv_allgather"] for r in per_rank)
            rows.append(
                {
                    "size": size,
                    "grid": list(grid),
                    "ranks": ranks,
                    "band_rows": max(b - a for a, b in plan.bands),
                    "halo_rows": plan.reach,
                    **{f"{k}_mb": max(r[k] for r in per_rank) / 1e6 for k in KINDS},
                    "halo_scheme_mb": halo_scheme / 1e6,
                    "kv_allgather_mb": gather / 1e6,
                    "ratio": gather / halo_scheme if halo_scheme else None,  # r = 1 without text: nothing to send
                    "halo_scheme_step_gb": FLUX_LAYERS * halo_scheme / 1e9,
                    "kv_allgather_step_gb": FLUX_LAYERS * gather / 1e9,
                }
            )
    return rows


def tiny_run(path: str, height: int, width: int, window: int, down: int, steps: int, repeats: int) -> dict:
    """One rank of the timing run: rank 0 alone (a one-rank group), then both ranks; median seconds per pipeline
    call and the bytes counted per step of the two-rank run."""
    import torch.distributed as dist
    from diffusers import FluxPipeline

    import clear_dit
    from pipelines.parallel import run_parallel_pipeline

    pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clear_dit.patch(pipe, window_size=window, down_factor=down)
    kwargs = dict(prompt="a red circle", height=height, width=width, max_sequence_length=64, output_type="latent")

    def timed(group: dist.ProcessGroup | None) -> tuple[float, dict]:
        def call(n: int):
            generator = torch.Generator().manual_seed(0)
            return run_parallel_pipeline(pipe, num_inference_steps=n, generator=generator, group=group, **kwargs)

        call(1)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier(group)
            start = time.perf_counter()
            out = call(steps)
            times.append(time.perf_counter() - start)
        return statistics.median(times), out.traffic_per_step[dist.get_rank(group)]

    solo = dist.new_group([0])
    result = {}
    if dist.get_rank() == 0:
        result["seconds_1"], _ = timed(solo)
    dist.barrier()
    result["seconds_2"], result["traffic"] = timed(None)
    return result


def measured(args: argparse.Namespace) -> dict:
    from pipelines.tiny import tiny_pipeline_path

    height, width = args.tiny_size
    run_args = (str(tiny_pipeline_path()), height, width, args.tiny_window, args.tiny_down, args.steps, args.repeats)
    results = launch_local(tiny_run, 2, run_args, timeout_s=3600, group_timeout_s=1200)
    failed = [r for r in results if r.exitcode != 0]
    if failed:
        raise SystemExit(f"rank {failed[0].rank} of the timing run failed: {failed[0].error}")
    plan = BandPlan((height // 16, width // 16), 2, args.tiny_window, args.tiny_down)
    model = layer_traffic(plan, 64, TINY_HEADS, TINY_HEAD_DIM, element_size=4)
    check = []
    for rank, result in enumerate(results):
        for kind in KINDS:
            counted, computed = result.value["traffic"].get(kind, 0.0), TINY_LAYERS * model[rank][kind]
            check.append({"rank": rank, "kind": kind, "counted": counted, "computed": computed})
    one, two = results[0].value["seconds_1"], max(r.value["seconds_2"] for r in results)
    return {
        "tiny": {"size": [height, width], "window": args.tiny_window, "down": args.tiny_down, "steps": args.steps},
        "seconds": {"1": one, "2": two},
        "speedup": one / two,
        "traffic_check": check,
        "traffic_matches": all(abs(c["counted"] - c["computed"]) <= 1e-6 * max(1.0, c["computed"]) for c in check),
    }


def print_report(args: argparse.Namespace, rows: list[dict], run: dict) -> None:
    print(
        f"Bytes sent by the busiest rank per attention layer (MB), r={args.window}, d={args.down}, "
        f"{args.heads} heads x {args.head_dim}, text {args.text_len}, {args.element_size}-byte keys/values; "
        f"per step x {FLUX_LAYERS} layers (GB)"
    )
    head = (
        f"{'size':>6} {'grid':>9} {'ranks':>5} {'band':>5} {'halo':>9} {'pooled':>8} {'text':>7} "
        f"{'halo total':>10} {'KV gather':>10} {'ratio':>7} {'step halo':>10} {'step KV':>9}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['size']:>6} {r['grid'][0]:>4}x{r['grid'][1]:<4} {r['ranks']:>5} {r['band_rows']:>5} "
            f"{r['halo_mb']:>9.1f} {r['pooled_mb']:>8.2f} {r['text_mb']:>7.2f} {r['halo_scheme_mb']:>10.1f} "
            f"{r['kv_allgather_mb']:>10.1f} {_ratio(r['ratio']):>7} {r['halo_scheme_step_gb']:>10.2f} "
            f"{r['kv_allgather_step_gb']:>9.2f}"
        )
    tiny = run["tiny"]
    print(
        f"\nCounted on the real tensors of a 2-rank gloo run (tiny model, {tiny['size'][0]}x{tiny['size'][1]} px, "
        f"r={tiny['window']}, d={tiny['down']}): "
        + ("equal to the layout model" if run["traffic_matches"] else "DIFFERENT from the layout model")
    )
    for c in run["traffic_check"]:
        print(f"  rank {c['rank']} {c['kind']:>6}: counted {c['counted']:>10.0f} B, computed {c['computed']:>10.0f} B")
    print(
        f"\nTiny pipeline, {tiny['steps']} steps, one torch thread per process: 1 rank {run['seconds']['1']:.2f} s, "
        f"2 ranks {run['seconds']['2']:.2f} s ({run['speedup']:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = run_meta()
    try:
        rows = layout_rows(args)
        BandPlan((args.tiny_size[0] // 16, args.tiny_size[1] // 16), 2, args.tiny_window, args.tiny_down)
    except ValueError as error:  # sizes, ranks or down factors that no band plan can split
        print(f"error: {error}", file=sys.stderr)
        return 2
    run = measured(args)
    print_report(args, rows, run)
    if args.json:
        write_results(args.json, args, meta, rows=rows, measured=run)
    return 0 if run["traffic_matches"] else 1


if __name__ == "__main__":
    sys.exit(main())
