"""The numbers the benchmark scripts print and write are the quantities their headers name (fake clocks, no timing)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch


def _clock(monkeypatch, module, durations):
    """Replace ``module.time`` by a clock that ``tick()`` advances by the next of ``durations``."""
    now, steps = [0.0], iter(durations)

    def tick():
        now[0] += next(steps)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return tick


def test_interleaved_medians_are_medians_of_the_measured_rounds_only(monkeypatch):
    import benchmarks._timing as timing

    tick = _clock(monkeypatch, timing, [100.0, 1.0, 2.0, 6.0])  # a warm-up of 100 s, then 1, 2, 6
    medians = timing.interleaved_medians({"a": tick}, repeats=3, warmup=1)
    assert medians == {"a": 2.0} and medians.rounds == 3  # not min 1, mean 3, or 4 with the warm-up


def _fake_medians(seconds, outputs):
    from benchmarks._timing import Medians

    def medians(fns, repeats, warmup=1, budget_s=float("inf")):
        outputs.update({name: fn() for name, fn in fns.items()})
        result = Medians({name: seconds(name) for name in fns})
        result.rounds = 1
        return result

    return medians


def test_attention_rows_and_table_report_what_was_timed_on_the_same_inputs(monkeypatch, capsys):
    import benchmarks.attention as bench
    from clear_dit import CLEARLayout
    from clear_dit.mask import dense_mask

    seen, outputs = {}, {}
    sdpa, clear = bench.F.scaled_dot_product_attention, bench.clear_attention

    def full_sdpa(q, k, v, **kw):
        seen["full"] = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return sdpa(q, k, v, **kw)

    def clear_attention(q, k, v, **kw):
        seen.setdefault("clear", (q, k, v))
        return clear(q, k, v, **kw)

    monkeypatch.setattr(bench, "F", SimpleNamespace(scaled_dot_product_attention=full_sdpa))
    monkeypatch.setattr(bench, "clear_attention", clear_attention)
    monkeypatch.setattr(bench, "interleaved_medians", _fake_medians(lambda n: 0.004 if n == "full" else 0.002, outputs))
    args = bench.parse_args(["--smoke", "--threads", "1", "--rows", "8:2", "--backends", "tiled", "dense"])
    (row,) = bench.run(args)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert row["full_ms"] == pytest.approx(4.0)
    for name in ("tiled", "dense"):
        assert row["backends"][name]["ms"] == pytest.approx(2.0)
        assert row["backends"][name]["speedup"] == pytest.approx(2.0)  # full / backend
    assert line.count("( 2.00x)") == 2  # the table prints the JSON's ratio, not its inverse
    layout = CLEARLayout((8, 8), args.text_len, 2)
    assert row["density"] == pytest.approx(dense_mask(layout).float().mean().item())  # FLOPs from the mask
    q = seen["clear"][0]
    assert row["qkv_bytes"] == 3 * q.numel() * q.element_size()
    assert all(torch.equal(a, b) for a, b in zip(seen["full"], seen["clear"], strict=True))  # same q, k, v


def test_peak_extra_bytes_leaves_out_the_returned_tensor():
    from benchmarks.attention import peak_extra_bytes

    extra, out = peak_extra_bytes(lambda: torch.ones(4096))
    assert out.shape == (4096,) and extra == 0


def test_compiled_flex_is_compiled_before_it_is_timed(monkeypatch):
    import benchmarks.attention as bench
    from clear_dit import CLEARLayout

    calls = []
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kw: lambda q, k, v, **_: calls.append(1) or q)
    q = torch.randn(1, 16 + 64, 2, 16)
    call, compile_s, mask_s = bench._compiled_flex(CLEARLayout((8, 8), 16, 2), q, q, q)
    assert calls == [1] and compile_s > 0 and mask_s > 0  # the first (compiling) call is not a timed one


def _flat(out):
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out.flatten()


@pytest.mark.parametrize("kind", ["double", "single"])
def test_transformer_rows_time_the_right_blocks_and_print_the_json(monkeypatch, kind):
    import benchmarks.transformer as bench
    from clear_dit import CLEARLayout
    from clear_dit.mask import dense_mask

    seconds = {"full_block": 0.010, "non_attention": 0.004, "full_attention": 0.005}
    seconds |= {"clear_block_2": 0.006, "clear_attention_2": 0.001}
    outputs = {}
    monkeypatch.setattr(bench, "interleaved_medians", _fake_medians(seconds.__getitem__, outputs))
    argv = ["--sizes", "128", "--radii", "2", "--text-len", "8", "--heads", "2", "--head-dim", "16", "--threads", "1"]
    args = bench.parse_args(argv)
    variants = bench.Variants.build(args)
    with torch.no_grad():
        (row,) = bench.measure_block(variants, kind, 8, bench.block_inputs(variants.full, 8, args), args)
    assert (row["full_block_ms"], row["clear_block_ms"], row["non_attention_ms"]) == pytest.approx((10, 6, 4))
    assert (row["full_attention_ms"], row["clear_attention_ms"]) == pytest.approx((5, 1))
    layout = CLEARLayout((8, 8), args.text_len, 2)
    assert row["density"] == pytest.approx(dense_mask(layout).float().mean().item())
    # the CLEAR block is the patched one, the full attention product is SDPA on the block's own q/k/v
    assert not torch.allclose(_flat(outputs["clear_block_2"]), _flat(outputs["full_block"]), atol=1e-4)
    q, k, v = bench._block(variants.no_attention, kind).attn.processor.last_qkv
    full = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert torch.allclose(outputs["full_attention"], full.transpose(1, 2).flatten(2, 3), atol=1e-5)
    cols = bench.format_row(row).split()
    assert cols[7] == "1.67x" and cols[9] == "50.0%" and cols[10] == "16.7%" and cols[11] == "5.00x"
    ideal = 10 / (4 + row["density"] * 5)  # full attention's time scaled by the density, not CLEAR's time
    assert row["ideal_at_density"] == pytest.approx(ideal)
    assert f"| 1.67x | 4 | 50% / 17% | 5.00x | 2.50x | {ideal:.2f}x |" in bench.format_markdown([row])


def test_parallel_layout_units_and_the_measured_speedup(monkeypatch):
    import benchmarks.parallel as bench
    import pipelines.tiny

    args = bench.parse_args(["--smoke"])
    (row,) = bench.layout_rows(args)
    assert row["halo_scheme_step_gb"] == pytest.approx(bench.FLUX_LAYERS * row["halo_scheme_mb"] / 1e3)
    assert row["kv_allgather_step_gb"] == pytest.approx(bench.FLUX_LAYERS * row["kv_allgather_mb"] / 1e3)
    assert row["ratio"] == pytest.approx(row["kv_allgather_mb"] / row["halo_scheme_mb"])

    rank0 = {"seconds_1": 6.0, "seconds_2": 2.0, "traffic": {}}
    rank1 = {"seconds_2": 3.0, "traffic": {}}
    results = [SimpleNamespace(rank=i, exitcode=0, value=v) for i, v in enumerate((rank0, rank1))]
    monkeypatch.setattr(pipelines.tiny, "tiny_pipeline_path", lambda: "unused")
    monkeypatch.setattr(bench, "launch_local", lambda *a, **kw: results)
    run = bench.measured(args)
    assert run["seconds"] == {"1": 6.0, "2": 3.0} and run["speedup"] == 2.0  # the slower rank ends the 2-rank run


def test_distill_worker_speed_is_the_median_measured_step_and_memory_over_baseline(monkeypatch, tmp_path):
    import benchmarks.distill as bench
    import training.distill

    tick = _clock(monkeypatch, bench, [100.0, 100.0, 1.0, 2.0, 6.0])  # 2 warm-up steps, then 3 timed ones

    class FakeDistiller:
        def __init__(self, config):
            self.student = SimpleNamespace(trainable={}, transformer=torch.nn.Linear(1, 1))

        def train_step(self):
            tick()

    monkeypatch.setattr(training.distill, "Distiller", FakeDistiller)
    monkeypatch.setattr(training.distill, "DistillConfig", lambda **kw: kw)
    spec = dict(model="m", data="d", out=str(tmp_path), window=1, batch=4, lora_rank=None, teacher="shared")
    row = bench.worker({**spec, "warmup": 2, "steps": 3, "threads": 1})
    assert row["samples_per_s"] == 2.0  # batch 4 / median step 2 s
    if "peak_rss_mib" in row:
        assert row["peak_mib"] == row["peak_rss_mib"] - row["baseline_rss_mib"]


def test_distill_report_and_reduction(monkeypatch, tmp_path):
    import benchmarks.distill as bench

    def cli(*argv):
        out = tmp_path / f"run-fm{float(argv[argv.index('--fm-weight') + 1]):g}" / "logs"
        out.mkdir(parents=True)
        entries = [{"step": 0, "val_gap": 4.0}, {"step": 3, "val_gap": 1.0}]
        entries = [{**e, "val_fm_teacher": 1.0, "val_fm_student": 2.0} for e in entries]
        (out / "validation.jsonl").write_text("\n".join(json.dumps(e) for e in entries))

    monkeypatch.setattr(bench, "cli", cli)
    monkeypatch.setattr(bench, "exported_gap", lambda *a: 1.0)
    args = bench.parse_args(["--smoke"])
    gap = bench.gap_reduction(args, tmp_path, tmp_path, 0.0)
    assert gap["reduction"] == 0.75 and gap["export_reproduces_student"]
    rows = [
        {"teacher": t, "lora_rank": None, "model_params": 1e6, "trainable_params": 1e6, "samples_per_s": 1.0,
         "peak_mib": peak}
        for t, peak in (("copy", 300.0), ("shared", 100.0))
    ]  # fmt: skip
    text = bench.report(args, [gap, {**gap, "fm_weight": 1.0}], rows)
    copy_line = next(line for line in text.splitlines() if "two models" in line)
    assert copy_line.endswith("3.00x") and "75.0%" in text  # copy's peak / shared's peak; 1 - 1/4


def test_memory_counts_the_mask_a_backend_builds_and_keeps():
    """Measured after the timing rounds had cached it, dense's seq^2 mask was left out: dense looked leanest."""
    import benchmarks.attention as bench
    from clear_dit import CLEARLayout
    from clear_dit.backends import flex
    from clear_dit.backends.dense import _cached_bias

    compiled = flex._compiled_flex_attention()
    # 32^2 tokens: on a 16^2 grid, Intel's 16x16 tile spans the whole grid, and its window bias is seq^2 as well
    args = bench.parse_args(["--smoke", "--threads", "1", "--rows", "32:2", "--backends", "tiled", "dense", "--memory"])
    (row,) = bench.run(args)
    assert flex._compiled_flex_attention() is compiled  # a compiled kernel is kept: not what a size costs
    mask = _cached_bias(CLEARLayout((32, 32), args.text_len, 2), torch.device("cpu"), torch.float32)
    dense, tiled = (row["backends"][name]["peak_extra_bytes"] for name in ("dense", "tiled"))
    assert dense >= mask.numel() * mask.element_size() > tiled


def test_the_parallel_timing_run_times_calls_after_an_untimed_warm_up(monkeypatch, tiny_pipeline_path):
    """Each group's first pipeline call (allocations, one-off set-up) is slow: timed, it would be the 1- or 2-rank
    time of a one-round run and the printed speedup."""
    import torch.distributed as dist

    import benchmarks.parallel as bench
    import pipelines.parallel

    now, seen = [0.0], []

    def run_parallel_pipeline(pipe, num_inference_steps, generator, group, **kwargs):
        now[0] += 1.0 if group in seen else 100.0
        seen.append(group)
        return SimpleNamespace(traffic_per_step={0: {"halo": 1.0}})

    monkeypatch.setattr(pipelines.parallel, "run_parallel_pipeline", run_parallel_pipeline)
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    monkeypatch.setattr(dist, "new_group", lambda ranks: "solo")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    result = bench.tiny_run(str(tiny_pipeline_path), 64, 64, 2, 1, 2, 1)
    assert (result["seconds_1"], result["seconds_2"], result["traffic"]) == (1.0, 1.0, {"halo": 1.0})


def test_attention_column_n_is_the_rounds_that_ran_not_repeats():
    import benchmarks.attention as bench

    argv = "--rows 8:2 --text-len 16 --heads 2 --head-dim 16 --backends tiled --threads 1".split()
    argv += "--repeats 3 --warmup 0 --budget 1e-9".split()
    (row,) = bench.run(bench.parse_args(argv))
    assert row["rounds"] == 1  # the budget stopped after one round


def test_attention_table_prints_density_and_ideal_of_the_row(monkeypatch, capsys):
    import benchmarks.attention as bench

    monkeypatch.setattr(bench, "interleaved_medians", _fake_medians(lambda n: 0.004 if n == "full" else 0.002, {}))
    (row,) = bench.run(bench.parse_args(["--smoke", "--threads", "1", "--rows", "8:2", "--backends", "tiled"]))
    cols = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert cols[4] == f"{row['density']:.4f}" and cols[5] == f"{1 / row['density']:.1f}x"


def test_transformer_each_radius_times_its_own_block_and_attention(monkeypatch):
    import benchmarks.transformer as bench
    from clear_dit import clear_attention

    outputs = {}
    monkeypatch.setattr(bench, "interleaved_medians", _fake_medians(lambda n: 0.001, outputs))
    argv = "--sizes 128 --radii 2 4 --text-len 8 --heads 2 --head-dim 16 --threads 1 --repeats 5".split()
    args = bench.parse_args(argv)
    variants = bench.Variants.build(args)
    with torch.no_grad():
        rows = bench.measure_block(variants, "single", 8, bench.block_inputs(variants.full, 8, args), args)
        q, k, v = bench._block(variants.no_attention, "single").attn.processor.last_qkv
        for r in (2, 4):  # each radius's own attention, and its own block
            want = clear_attention(q, k, v, grid=(8, 8), text_len=8, window_size=r)
            assert torch.allclose(outputs[f"clear_attention_{r}"], want, atol=1e-6)
    assert not torch.allclose(_flat(outputs["clear_block_2"]), _flat(outputs["clear_block_4"]), atol=1e-5)
    assert [row["rounds"] for row in rows] == [1, 1]  # what interleaved_medians ran, not --repeats


def test_peak_extra_bytes_follows_allocation_order():
    from benchmarks.attention import peak_extra_bytes

    def fn():
        out = torch.ones(16)
        for _ in range(3):  # three temporaries, one alive at a time
            x = torch.ones(1 << 16)
            del x
        return out

    extra, _ = peak_extra_bytes(fn)
    assert extra == 4 * (1 << 16)  # one temporary, not the sum of all allocations


def _recording_medians(record):
    from benchmarks._timing import Medians

    def medians(fns, repeats, warmup=1, budget_s=float("inf")):
        outputs = {n: fn() for n, fn in fns.items()}
        record.update(budget_s=budget_s, warmup=warmup, threads=torch.get_num_threads(), outputs=outputs)
        result = Medians({name: 0.001 for name in fns})
        result.rounds = 1
        return result

    return medians


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_attention_honours_threads_budget_batch_dtype_warmup_and_dense_max_seq(monkeypatch, keep_threads):
    import benchmarks.attention as bench

    seen, full_dtypes = {}, set()
    sdpa = bench.F.scaled_dot_product_attention

    def full_sdpa(q, k, v, **kw):
        full_dtypes.update(t.dtype for t in (q, k, v))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(bench, "F", SimpleNamespace(scaled_dot_product_attention=full_sdpa))
    monkeypatch.setattr(bench, "interleaved_medians", _recording_medians(seen))
    torch.set_num_threads(2)
    argv = "--rows 8:2 --text-len 16 --heads 2 --head-dim 16 --backends tiled dense --threads 1 --budget 7 --batch 2"
    argv += " --dtype bf16 --warmup 3"
    (row,) = bench.run(bench.parse_args([*argv.split(), "--dense-max-seq", "50"]))
    assert seen["threads"] == 1 and seen["budget_s"] == 7.0 and seen["warmup"] == 3
    assert row["qkv_bytes"] == 3 * 2 * row["seq"] * 2 * 16 * 2  # batch 2 x seq x heads 2 x head_dim 16, bf16
    assert seen["outputs"]["tiled"].shape[0] == 2
    # full SDPA runs in the benchmark's dtype too (an fp32 baseline would inflate bf16 speedups)
    assert full_dtypes == {torch.bfloat16} and {t.dtype for t in seen["outputs"].values()} == {torch.bfloat16}
    assert row["seq"] == 80 and "dense" in row["skipped"] and "dense" not in row["backends"]  # 80 > 50
    (row,) = bench.run(bench.parse_args([*argv.split(), "--dense-max-seq", "80"]))
    assert "dense" in row["backends"] and not row["skipped"]  # the limit itself is run


def test_transformer_honours_threads_budget_dtype_and_warmup(monkeypatch, keep_threads):
    import benchmarks.transformer as bench

    seen, full_dtypes = {}, set()
    dispatch = bench.dispatch_attention_fn

    def full_attention(q, k, v, *args, **kwargs):
        full_dtypes.update(t.dtype for t in (q, k, v))
        return dispatch(q, k, v, *args, **kwargs)

    monkeypatch.setattr(bench, "dispatch_attention_fn", full_attention)
    monkeypatch.setattr(bench, "interleaved_medians", _recording_medians(seen))
    monkeypatch.setattr(bench, "BLOCKS", ("single",))
    torch.set_num_threads(2)
    argv = "--sizes 128 --radii 2 --text-len 8 --heads 2 --head-dim 16 --threads 1 --budget 7 --dtype bf16 --warmup 3"
    bench.run(bench.parse_args(argv.split()))
    assert seen["threads"] == 1 and seen["budget_s"] == 7.0 and seen["warmup"] == 3
    assert full_dtypes == {torch.bfloat16}
    assert seen["outputs"]["full_attention"].dtype == seen["outputs"]["clear_attention_2"].dtype == torch.bfloat16


def test_transformer_report_of_a_json_list_is_a_one_line_error(tmp_path, capsys):
    from benchmarks.transformer import main

    other = tmp_path / "list.json"
    other.write_text("[1]")
    assert main(["--report", str(other)]) == 2
    assert capsys.readouterr().err == f"error: --report: {other} is not a result JSON of benchmarks/transformer.py\n"
