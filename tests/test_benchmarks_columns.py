"""The benchmarks' reports: every printed column from its own JSON field, the checks that fail a run, and the
inputs of what they time (killing tests of mutants that survived the smoke and honesty tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

# -- transformer.py ---------------------------------------------------------------------------------------------

_TRANSFORMER_ROW = {
    "pixels": 128, "grid": [8, 8], "block": "double", "window_size": 2, "backend_used": "dense",
    "density": 0.25, "full_block_ms": 11.0, "clear_block_ms": 7.0, "non_attention_ms": 3.0,
    "full_attention_ms": 5.0, "clear_attention_ms": 2.0, "full_attention_share": 0.4, "clear_attention_share": 0.3,
    "speedup": 1.5, "attention_speedup": 2.5, "ideal_if_attention_free": 3.5, "ideal_at_density": 2.2,
}  # fmt: skip


def test_transformer_table_prints_every_column_from_its_own_json_field():
    import benchmarks.transformer as bench

    cols = bench.format_row(_TRANSFORMER_ROW).split()
    assert cols == ["128", "double", "2", "dense", "0.2500", "11.0", "7.0", "1.50x", "3.0", "40.0%", "30.0%",
                    "2.50x", "3.50x", "2.20x"]  # fmt: skip


def test_transformer_markdown_prints_full_then_clear_ms():
    import benchmarks.transformer as bench

    assert "| 128 px | 2 | dense | 11 | 7 | 1.50x | 3 | 40% / 30% | 2.50x | 3.50x | 2.20x |" in bench.format_markdown(
        [_TRANSFORMER_ROW]
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--head-dim", "12"], "--head-dim must be a positive multiple of 8"),  # T6
        (["--backend", "nope"], "--backend must be 'auto' or one of"),  # T7
    ],
)
def test_transformer_refuses_bad_head_dim_and_backend(capsys, argv, message):
    import benchmarks.transformer as bench

    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_transformer_non_attention_times_the_no_attention_block(monkeypatch):
    import benchmarks.transformer as bench
    from benchmarks._timing import Medians

    outputs = {}

    def medians(fns, repeats, warmup=1, budget_s=float("inf")):
        outputs.update({name: fn() for name, fn in fns.items()})
        result = Medians({name: 0.001 for name in fns})
        result.rounds = 1
        return result

    monkeypatch.setattr(bench, "interleaved_medians", medians)
    args = bench.parse_args("--sizes 128 --radii 2 --text-len 8 --heads 2 --head-dim 16 --threads 1".split())
    variants = bench.Variants.build(args)
    inputs = bench.block_inputs(variants.full, 8, args)
    with torch.no_grad():
        bench.measure_block(variants, "single", 8, inputs, args)
        want = bench._block(variants.no_attention, "single")(**inputs, joint_attention_kwargs={"clear_grid": (8, 8)})
    flat = [torch.cat([t.flatten() for t in out]) for out in (outputs["non_attention"], want)]
    assert torch.equal(*flat)


def test_transformer_rotary_table_is_fluxs_own_over_text_and_image_ids():
    from diffusers import FluxPipeline

    import benchmarks.transformer as bench

    args = bench.parse_args("--sizes 128 --radii 2 --text-len 8 --heads 2 --head-dim 16".split())
    model = bench.build_model(args)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    want = model.pos_embed(torch.cat([torch.zeros(8, 3), img_ids]))
    got = bench.block_inputs(model, 8, args)["image_rotary_emb"]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# -- distill.py -------------------------------------------------------------------------------------------------


def test_distill_worker_peak_is_measured_from_the_worker_start(monkeypatch, tmp_path):
    """A peak reached before the worker (here: 400 MiB allocated and freed) is not what training added."""
    import benchmarks.distill as bench
    import training.distill

    big = torch.ones(100 * 2**20)  # 400 MiB, touched
    del big

    class FakeDistiller:
        def __init__(self, config):
            self.student = SimpleNamespace(trainable={}, transformer=torch.nn.Linear(1, 1))

        def train_step(self):
            pass

    monkeypatch.setattr(training.distill, "Distiller", FakeDistiller)
    monkeypatch.setattr(training.distill, "DistillConfig", lambda **kw: kw)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    spec = dict(model="m", data="d", out=str(tmp_path), window=1, batch=1, lora_rank=None, teacher="shared")
    row = bench.worker({**spec, "warmup": 0, "steps": 1, "threads": 1})
    assert row["peak_mib"] < 100


def _gap(bench, monkeypatch, tmp_path):
    entries = [
        {"step": 0, "val_gap": 4.0, "val_fm_teacher": 1.0, "val_fm_student": 2.0},
        {"step": 3, "val_gap": 1.0, "val_fm_teacher": 1.0, "val_fm_student": 1.5},
    ]

    def cli(*argv):
        logs = tmp_path / f"run-fm{float(argv[argv.index('--fm-weight') + 1]):g}" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "validation.jsonl").write_text("\n".join(json.dumps(e) for e in entries))

    monkeypatch.setattr(bench, "cli", cli)
    monkeypatch.setattr(bench, "exported_gap", lambda *a: 1.0)
    return bench.gap_reduction(bench.parse_args(["--smoke"]), tmp_path, tmp_path, 0.0)


def test_distill_gap_fields_are_step_0_and_the_last_step(monkeypatch, tmp_path):
    import benchmarks.distill as bench

    gap = _gap(bench, monkeypatch, tmp_path)
    assert (gap["gap_undistilled"], gap["gap_distilled"]) == (4.0, 1.0)


def test_distill_report_prints_each_column_from_its_own_field(monkeypatch, tmp_path):
    import benchmarks.distill as bench

    gap = _gap(bench, monkeypatch, tmp_path)
    rows = [
        {"teacher": t, "lora_rank": r, "model_params": 9e6, "trainable_params": 2e6, "samples_per_s": 4.0,
         "peak_mib": 100.0}
        for t, r in (("copy", None), ("shared", None), ("copy", 4), ("shared", 4))
    ]  # fmt: skip
    lines = bench.report(bench.parse_args(["--smoke"]), [gap, {**gap, "fm_weight": 1.0}], rows).splitlines()
    assert lines[2].split()[-5:] == ["4", "1", "75.0%", "1.5", "same"]  # step 0, distilled, ..., student L_fm
    copy_full = next(line for line in lines if "two models" in line and "full" in line)
    assert copy_full.split()[-4:] == ["2.00M", "4.00", "100", "1.00x"]  # trainable, samples/s, peak, x shared


def test_distill_a_window_that_covers_the_grid_is_a_usage_error(capsys):
    import benchmarks.distill as bench

    with pytest.raises(SystemExit) as info:  # 64 px: 4x4 tokens; r = 5 sees them all, the step-0 gap is 0
        bench.parse_args(["--window", "5"])
    assert info.value.code == 2 and "--window 5 sees all 4x4 tokens at --resolution 64" in capsys.readouterr().err


# -- parallel.py ------------------------------------------------------------------------------------------------


def _parallel_run(matches=True):
    check = [{"rank": 0, "kind": "halo", "counted": 10.0, "computed": 10.0 if matches else 11.0}]
    return {"tiny": {"size": [128, 96], "window": 3, "down": 2, "steps": 1}, "seconds": {"1": 6.0, "2": 3.0},
            "speedup": 2.0, "traffic_check": check, "traffic_matches": matches}  # fmt: skip


def test_parallel_report_prints_every_column_from_its_own_json_field(capsys):
    import benchmarks.parallel as bench

    row = {"size": 2048, "grid": [128, 128], "ranks": 2, "band_rows": 64, "halo_rows": 15, "halo_mb": 11.0,
           "pooled_mb": 2.0, "text_mb": 3.0, "halo_scheme_mb": 16.0, "kv_allgather_mb": 64.0, "ratio": 4.0,
           "halo_scheme_step_gb": 0.91, "kv_allgather_step_gb": 3.65}  # fmt: skip
    bench.print_report(bench.parse_args(["--smoke"]), [row], _parallel_run())
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["2048", "128x128", "2", "64", "11.0", "2.00", "3.00", "16.0", "64.0", "4.0x", "0.91",
                                "3.65"]  # fmt: skip
    assert lines[-1].endswith("1 rank 6.00 s, 2 ranks 3.00 s (2.00x)")


def test_parallel_one_mismatching_count_fails_the_check_and_the_command(monkeypatch, tmp_path):
    import benchmarks.parallel as bench
    import pipelines.tiny
    from pipelines.parallel import BandPlan, layer_traffic

    args = bench.parse_args(["--smoke"])
    plan = BandPlan((args.tiny_size[0] // 16, args.tiny_size[1] // 16), 2, args.tiny_window, args.tiny_down)
    model = layer_traffic(plan, 64, bench.TINY_HEADS, bench.TINY_HEAD_DIM, element_size=4)
    traffic = [{k: bench.TINY_LAYERS * model[rank][k] for k in bench.KINDS} for rank in (0, 1)]
    traffic[1]["halo"] += 4096  # one count of one rank off
    rank0 = {"seconds_1": 6.0, "seconds_2": 3.0, "traffic": traffic[0]}
    rank1 = {"seconds_2": 3.0, "traffic": traffic[1]}
    results = [SimpleNamespace(rank=i, exitcode=0, value=v) for i, v in enumerate((rank0, rank1))]
    monkeypatch.setattr(pipelines.tiny, "tiny_pipeline_path", lambda: "unused")
    monkeypatch.setattr(bench, "launch_local", lambda *a, **kw: results)
    run = bench.measured(args)
    assert [c["counted"] == c["computed"] for c in run["traffic_check"]].count(False) == 1
    assert not run["traffic_matches"]
    monkeypatch.setattr(bench, "measured", lambda args: _parallel_run(matches=False))
    assert bench.main(["--smoke"]) == 1
