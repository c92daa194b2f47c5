"""The benchmark scripts run end to end at tiny sizes and write well-formed JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``benchmarks/SCRIPT ARGS`` in ``cwd`` as a user would, capturing its output."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_attention_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    proc = _run_benchmark(
        tmp_path, "attention.py", "--smoke", "--threads", "1", "--memory", "--tiles", "2x4", "--flex-compiled",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(x) = full / backend" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["grid"], r["window_size"]) for r in rows] == [([8, 8], 2), ([8, 8], 4), ([16, 16], 2), ([16, 16], 4)]
    # the run a README figure is quoted from: its date, commit and versions (the attention JSON had none)
    meta = result["meta"]
    assert "commit" in meta and meta["torch"] == torch.__version__ and meta["date_utc"].startswith("20")
    assert result["args"]["json"] == str(out)
    for row in rows:
        assert row["seq"] == row["text_len"] + row["grid"][0] * row["grid"][1]
        assert 0 < row["density"] <= 1 and abs(row["ideal_speedup"] * row["density"] - 1) < 1e-9
        assert row["full_ms"] > 0 and row["rounds"] == 1  # --smoke: one round, and the row says so
        assert set(row["backends"]) == {"tiled", "dense", "tiled[2x4]", "flex-compiled"}
        assert row["flex_compile_s"] > 0 and row["flex_mask_s"] > 0
        for entry in row["backends"].values():
            assert entry["ms"] > 0 and abs(entry["speedup"] - row["full_ms"] / entry["ms"]) < 1e-6 * entry["speedup"]
            # the tiny sizes still allocate (tiles, strips, the dense mask): a real, positive measurement
            assert entry["peak_extra_bytes"] > 0
            assert entry["peak_extra_vs_qkv"] == entry["peak_extra_bytes"] / row["qkv_bytes"]


def test_attention_benchmark_rejects_a_bad_tile(tmp_path: Path) -> None:
    proc = _run_benchmark(tmp_path, "attention.py", "--smoke", "--tiles", "4by8")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("error: --tiles: '4by8' is not ROWSxCOLUMNS with positive sizes, e.g. 4x8")


def test_transformer_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "transformer.json"
    proc = _run_benchmark(tmp_path, "transformer.py", "--smoke", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "speedup = full / CLEAR block" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["torch"] and result["meta"]["date_utc"]
    rows = result["rows"]
    # every (size, block kind, radius) of the smoke plan, in order, none skipped
    assert [(r["pixels"], r["block"], r["window_size"]) for r in rows] == [
        (px, kind, radius) for px in (128, 256) for kind in ("double", "single") for radius in (2, 4)
    ]
    for row in rows:
        side = row["pixels"] // 16
        assert row["grid"] == [side, side] and row["seq"] == row["text_len"] + side * side
        assert row["dim"] == row["heads"] * row["head_dim"] == 2 * 16
        assert row["backend"] == "auto" and row["backend_used"] in {"dense", "tiled"}
        assert 0 < row["density"] <= 1
        times = ("full_block_ms", "clear_block_ms", "non_attention_ms", "full_attention_ms", "clear_attention_ms")
        assert all(row[name] > 0 for name in times)
        full, clear, rest = row["full_block_ms"], row["clear_block_ms"], row["non_attention_ms"]
        full_attn, clear_attn = row["full_attention_ms"], row["clear_attention_ms"]
        assert math.isclose(row["speedup"], full / clear)
        assert math.isclose(row["attention_speedup"], full_attn / clear_attn)
        assert math.isclose(row["full_attention_share"], full_attn / full)
        assert math.isclose(row["clear_attention_share"], clear_attn / clear)
        assert math.isclose(row["ideal_if_attention_free"], full / rest)
        assert math.isclose(row["ideal_at_density"], full / (rest + row["density"] * full_attn))
        assert row["ideal_at_density"] <= row["ideal_if_attention_free"]
    # full attention and the no-attention block are measured once per size and block kind, shared by the radii
    for px in (128, 256):
        for kind in ("double", "single"):
            group = [r for r in rows if (r["pixels"], r["block"]) == (px, kind)]
            for name in ("full_block_ms", "non_attention_ms", "full_attention_ms"):
                assert len({r[name] for r in group}) == 1

    # the README tables render from the JSON: one table per block kind, one line per row
    from benchmarks.transformer import format_markdown

    table_rows = [line for line in format_markdown(rows).splitlines() if line.startswith("| ") and " px |" in line]
    by_kind = [row for kind in ("double", "single") for row in rows if row["block"] == kind]
    assert len(table_rows) == len(rows)
    assert all(f"| {row['speedup']:.2f}x |" in line for row, line in zip(by_kind, table_rows, strict=True))


def test_transformer_benchmark_rope_axes_and_bad_sizes(capsys) -> None:
    from benchmarks.transformer import parse_args, rope_axes

    assert rope_axes(128) == (16, 56, 56)  # FLUX.1's axes_dims_rope
    assert all(sum(rope_axes(d)) == d and all(a > 0 and a % 2 == 0 for a in rope_axes(d)) for d in (8, 16, 64, 128))
    with pytest.raises(SystemExit):
        parse_args(["--sizes", "1024", "1000"])
    assert "--sizes must be positive multiples of 16 px" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an interleaved round would rebuild the dense masks it cannot keep
        parse_args(["--backend", "dense", "--sizes", "256", "--radii", "2", "3", "4", "5", "6"])
    assert "--backend dense runs 'dense' at 256 px for radii [2, 3, 4, 5, 6], but 'dense' caches 4 masks" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # "auto" picks dense for windows that cover most of a small grid
        parse_args(["--sizes", "512", "1024", "--radii", "12", "16", "20", "24", "28", "--text-len", "64"])
    assert "--backend auto runs 'dense' at 512 px for radii [12, 16, 20, 24, 28]" in capsys.readouterr().err
    # 4 of them: fine (r6 runs tiled on Intel and AMD; r8 runs dense with Intel's tiles, tiled with AMD's)
    parse_args(["--sizes", "512", "--radii", "6", "12", "16", "20", "24", "--text-len", "64"])


def test_interleaved_medians_say_how_many_rounds_they_are_of() -> None:
    from benchmarks._timing import interleaved_medians

    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 5, 1, 0.0)
    assert medians.rounds == 1 and calls == ["a", "b", "a", "b"]  # a warm-up, then the budget stops after one
    assert interleaved_medians({"a": lambda: None}, 3).rounds == 3


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("distill", ["--window", "0"], "argument --window: must be a positive int, got 0"),
        ("distill", ["--num-val", "0"], "argument --num-val: must be a positive int, got 0"),
        ("distill", ["--bench-warmup", "-1"], "argument --bench-warmup: must be an int >= 0, got -1"),
        ("distill", ["--lr", "nan"], "argument --lr: must be a positive number, got nan"),
        ("parallel", ["--ranks", "0"], "argument --ranks: must be a positive int, got 0"),
        ("parallel", ["--repeats", "0"], "argument --repeats: must be a positive int, got 0"),
    ],
)
def test_benchmarks_refuse_bad_numbers_as_usage_errors(capsys, module: str, argv: list[str], message: str) -> None:
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_parallel_benchmark_refuses_layouts_no_band_plan_splits(capsys) -> None:
    from benchmarks.parallel import main

    assert main(["--sizes", "2048", "--ranks", "2", "--down", "3"]) == 2  # before the 2-process timing run
    err = capsys.readouterr().err
    assert (
        err == "error: cannot split 128 token rows into bands of a multiple of 3 row(s) (the down factor): "
        "128 is not divisible by 3\n"
    )
    # the timing run's own tiny layout too (it failed in both rank processes, after loading the model)
    assert main(["--sizes", "2048", "--ranks", "2", "--tiny-size", "16", "16"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot split 1 token rows into bands")


def test_distill_table_keeps_the_fastest_rounds_speed_and_the_highest_peak(monkeypatch, tmp_path) -> None:
    import benchmarks.distill as bench

    rounds = iter([(1.0, 300.0), (3.0, 150.0), (2.0, 400.0)])  # (samples/s, peak MiB) of each round
    monkeypatch.setattr(bench, "table_model", lambda args, work: work / "model")
    monkeypatch.setattr(bench, "MODES", [("shared", None)])

    def worker(spec: dict) -> dict:
        speed, peak = next(rounds)
        baseline = 500.0 + speed  # each round's own: the JSON's memory fields must all come from one
        memory = {"peak_mib": peak, "peak_rss_mib": baseline + peak, "baseline_rss_mib": baseline}
        return {"teacher": spec["teacher"], "lora_rank": spec["lora_rank"], "samples_per_s": speed, **memory}

    monkeypatch.setattr(bench, "worker", worker)
    args = bench.parse_args(["--smoke", "--rounds", "3"])
    args.rounds = 3  # --smoke sets one round
    (row,) = bench.table(args, tmp_path, tmp_path / "data")
    assert (row["samples_per_s"], row["peak_mib"]) == (3.0, 400.0)
    assert (row["peak_rss_mib"], row["baseline_rss_mib"]) == (902.0, 502.0)  # the highest peak's round


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("attention", ["--rows", "foo"], "--rows: 'foo' is not GRID:RADIUS with positive sizes"),
        ("attention", ["--rows", "8:2", "--backends", "bogus"], "--backends: unknown ['bogus']; known: auto, dense"),
        ("attention", ["--repeats", "0"], "argument --repeats: must be a positive int, got 0"),
        ("transformer", ["--radii", "0"], "argument --radii: must be a positive int, got 0"),
        ("transformer", ["--report", "no-such.json"], "--report: no such result file: no-such.json"),
        ("attention", ["--backends", "tiled", "xformers"], "--backends: ['xformers'] cannot run on cpu with fp32 here"),
        ("attention", ["--backends", "natten"], "--backends: ['natten'] cannot run on cpu with fp32 here"),
        ("attention", ["--budget", "nan"], "argument --budget: must be a positive number, got nan"),
        ("attention", ["--dense-max-seq", "-5"], "argument --dense-max-seq: must be an int >= 0, got -5"),
        ("transformer", ["--budget", "-1"], "argument --budget: must be a positive number, got -1"),
        ("attention", ["--seed", str(2**64)], "argument --seed: must be 0 to 9223372036854775807, got 1844"),
        ("transformer", ["--seed", "-1"], "argument --seed: must be 0 to 9223372036854775807, got -1"),
        ("fidelity.run", ["--work", ".", "--seed", "-1"], "argument --seed: must be 0 to 9223372036854775807"),
        ("fidelity.probe", ["--teacher", ".", "--seed", "1e3"], "argument --seed: expected a whole number, got '1e3'"),
        ("transformer", ["--json", "."], "argument --json: . is a folder; name a file (in it)"),
        ("attention", ["--json", "README.md/x.json"], "argument --json: README.md/x.json: /"),
        ("transformer", ["--json", "/proc/x.json"], "argument --json: /proc/x.json: cannot write in /proc ("),
        ("parallel", ["--json", "benchmarks"], "argument --json: benchmarks is a folder; name a file (in it)"),
        ("parallel", ["--ranks", "2", "1"], "argument --ranks: patch parallelism needs at least 2 ranks, got 1"),
        ("distill", ["--json", "benchmarks"], "argument --json: benchmarks is a folder; name a file (in it)"),
        ("distill", ["--work", "README.md"], "--work README.md is a file; give a folder"),  # a traceback later
        ("distill", ["--work", "benchmarks"], "--work benchmarks holds files but not .clear-dit-bench-distill"),
    ],
)
def test_timing_benchmarks_refuse_bad_arguments_as_usage_errors(
    capsys, monkeypatch, module: str, argv: list[str], message: str
):
    import importlib

    monkeypatch.chdir(ROOT)  # the paths above are relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, argv",
    [("attention", []), ("transformer", []), ("distill", []), ("parallel", []), ("fidelity.probe", ["--teacher", "."])],
)
def test_an_existing_json_file_is_replaced_only_with_overwrite(tmp_path, capsys, module: str, argv: list[str]):
    """The committed results are such files: a --smoke run (tiny rows), or a run stopped after its first row,
    replaced them without a word."""
    import importlib

    parse_args = importlib.import_module(f"benchmarks.{module}").parse_args
    results = tmp_path / "results.json"
    results.write_text('{"rows": [1]}')
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--json", str(results)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: --json {results} exists; pass --overwrite to replace it\n")
    assert parse_args([*argv, "--json", str(results), "--overwrite"]).json == results
    assert parse_args([*argv, "--json", str(tmp_path / "new.json")]).json == tmp_path / "new.json"
    assert results.read_text() == '{"rows": [1]}'


def test_transformer_report_of_another_file_is_a_one_line_error(tmp_path, capsys):
    from benchmarks.transformer import main

    other = tmp_path / "attention.json"
    other.write_text(json.dumps({"rows": [{"pixels": 1024}]}))  # attention.py's rows lack the block columns
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    for path in (other, broken):
        assert main(["--report", str(path)]) == 2
        assert capsys.readouterr().err == f"error: --report: {path} is not a result JSON of benchmarks/transformer.py\n"


def test_transformer_json_keeps_the_sizes_measured_before_a_failure(tmp_path, monkeypatch):
    import benchmarks.transformer as bench

    measure = bench.measure_block

    def stop_at_the_second_size(variants, kind, side, inputs, args):
        if side * 16 == args.sizes[1]:
            raise KeyboardInterrupt  # a long run stopped by hand
        return measure(variants, kind, side, inputs, args)

    monkeypatch.setattr(bench, "measure_block", stop_at_the_second_size)
    out = tmp_path / "transformer.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--smoke", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {row["pixels"] for row in rows} == {128} and len(rows) == 2 * 2  # both blocks x both radii


def test_a_json_path_is_probed_without_harm_and_written_whole_through_links(tmp_path, monkeypatch):
    """The CLI's --out and the benchmarks' --json share one probe (clear_dit.files.check_writable); results are
    written atomically, through a link as a plain write would be."""
    import argparse
    import os

    from benchmarks._args import json_path
    from benchmarks._results import write_results

    old = tmp_path / "r.json"
    old.write_text('{"rows": [1]}')
    assert json_path(str(old)) == old and old.read_text() == '{"rows": [1]}'  # not emptied before the timing
    assert json_path(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no probe or folder left behind
    (tmp_path / "link.json").symlink_to(tmp_path / "gone" / "x.json")
    with pytest.raises(argparse.ArgumentTypeError, match="link.json is a link to .*x.json, whose folder does not"):
        json_path(str(tmp_path / "link.json"))
    (tmp_path / "loop.json").symlink_to(tmp_path / "loop.json")
    with pytest.raises(argparse.ArgumentTypeError, match="loop.json is a link that never reaches a file"):
        json_path(str(tmp_path / "loop.json"))
    (tmp_path / "loop.json").unlink()
    (tmp_path / "ld").symlink_to(tmp_path / "ld")  # a folder that is a loop: refused now, not after the timing
    with pytest.raises(argparse.ArgumentTypeError, match=r"ld/x.json: .*ld cannot be reached \(Too many levels"):
        json_path(str(tmp_path / "ld" / "x.json"))
    (tmp_path / "ld").unlink()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert json_path("~/new.json") == tmp_path / "new.json"  # the home folder, not a folder named ~
    (tmp_path / "gone").mkdir()  # a link to a file yet to be written is written through
    target = json_path(str(tmp_path / "link.json"))
    assert target == tmp_path / "gone" / "x.json"
    args = argparse.Namespace(json=tmp_path / "link.json")
    write_results(args.json, args, {}, rows=[2])
    assert (tmp_path / "link.json").is_symlink() and json.loads(target.read_text())["rows"] == [2]

    write_text = Path.write_text

    def full_disk(path: Path, text: str) -> None:  # a write that fails halfway
        write_text(path, text[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_results(old, args, {}, rows=[3])
    assert old.read_text() == '{"rows": [1]}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "gone", "link.json", "r.json",
    ]  # fmt: skip
    if os.geteuid() != 0:  # root writes anywhere
        tmp_path.chmod(0o555)
        try:
            with pytest.raises(argparse.ArgumentTypeError, match=f"r.json: cannot write in {tmp_path} .Permission"):
                json_path(str(old))
        finally:
            tmp_path.chmod(0o755)


def test_a_json_path_is_checked_without_pathlib_predicates_that_raise(tmp_path, monkeypatch):
    """Up to Python 3.12 Path.is_symlink/is_dir raise PermissionError under a folder that cannot be searched (a
    traceback instead of the probe's one-line error; as root here, that is simulated)."""
    from benchmarks._args import json_path

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_symlink", denied)
    monkeypatch.setattr(Path, "is_dir", denied)
    assert json_path(str(tmp_path / "r.json")) == tmp_path / "r.json"


def test_distill_benchmark_makes_the_data_again_when_its_work_holds_more_than_asked(tmp_path) -> None:
    """make-data keeps the items of an earlier, larger run in the folder: distill trained on all of them while the
    report stated --num-train."""
    import benchmarks.distill as bench
    from training.data import DistillDataset

    bench.make_data(bench.parse_args(["--smoke"]), tmp_path)  # 4 + 2 items
    args = bench.parse_args(["--smoke"])
    args.num_train = 3
    data, _ = bench.make_data(args, tmp_path)
    assert len(DistillDataset(data)) == 5
    args.num_train = 4
    data, _ = bench.make_data(args, tmp_path)  # a larger run resumes it
    assert len(DistillDataset(data)) == 6


def test_distill_table_model_follows_each_of_width_and_layers(tmp_path) -> None:
    import benchmarks.distill as bench

    for width, layers in ((2, (1, 1)), (2, (1, 2)), (2, (2, 2)), (4, (2, 2))):
        argv = ["--width", str(width), "--layers", *map(str, layers)]
        model = bench.table_model(bench.parse_args(argv), tmp_path)
        config = json.loads((model / "transformer" / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_layers"], config["num_single_layers"]) == (width, *layers)


def test_distill_benchmark_accepts_the_work_folder_it_wrote(tmp_path, monkeypatch) -> None:
    import benchmarks.distill as bench

    work = tmp_path / "work"

    def interrupted(args, folder):
        (folder / "prompts.txt").write_text("a\n")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bench, "make_data", interrupted)
    assert bench.main(["--smoke", "--work", str(work)]) == 2
    assert bench.parse_args(["--smoke", "--work", str(work)]).work == work


def _distill_gap(monkeypatch, tmp_path, entries: list[dict], exported: float):
    """benchmarks.distill with each distill run's validation log written as ``entries`` and the exported file's
    gap ``exported``: the gap fields, from the logs alone."""
    import benchmarks.distill as bench

    def cli(*argv):
        logs = tmp_path / f"run-fm{float(argv[argv.index('--fm-weight') + 1]):g}" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "validation.jsonl").write_text("\n".join(json.dumps(e) for e in entries))

    monkeypatch.setattr(bench, "cli", cli)
    monkeypatch.setattr(bench, "exported_gap", lambda *a: exported)
    return bench, bench.gap_reduction(bench.parse_args(["--smoke"]), tmp_path, tmp_path, 0.0)


def test_distill_gap_fields_come_from_their_own_steps_and_models(monkeypatch, tmp_path) -> None:
    entries = [
        {"step": 0, "val_gap": 4.0, "val_fm_teacher": 1.5, "val_fm_student": 2.0},
        {"step": 3, "val_gap": 1.0, "val_fm_teacher": 1.5, "val_fm_student": 1.2},
    ]
    _, gap = _distill_gap(monkeypatch, tmp_path, entries, 1.0)
    assert (gap["fm_teacher"], gap["fm_student_undistilled"], gap["fm_student_distilled"]) == (1.5, 2.0, 1.2)


def test_distill_acceptance_fails_when_the_export_differs(monkeypatch, tmp_path) -> None:
    entries = [{"step": s, "val_gap": g, "val_fm_teacher": 1.0, "val_fm_student": 1.0} for s, g in ((0, 4.0), (3, 1.0))]
    bench, gap = _distill_gap(monkeypatch, tmp_path, entries, 1.5)  # the exported file does not reproduce 1.0
    assert gap["reduction"] == 0.75 and not gap["export_reproduces_student"]
    assert bench.verdict([gap, {**gap, "fm_weight": 1.0}]) == "FAIL"
    monkeypatch.setattr(bench, "make_data", lambda args, work: (work, 0.0))
    monkeypatch.setattr(bench, "gap_reduction", lambda args, work, data, fm: {**gap, "fm_weight": fm})
    row = {"lora_rank": None, "model_params": 1, "trainable_params": 1, "samples_per_s": 1.0, "peak_mib": 1.0}
    monkeypatch.setattr(bench, "table", lambda *a: [{**row, "teacher": "copy"}, {**row, "teacher": "shared"}])
    assert bench.main(["--work", str(tmp_path / "work")]) == 1  # a failed acceptance fails the command


def test_distill_export_check_is_exact_at_the_gaps_real_scale(monkeypatch, tmp_path) -> None:
    """Real gaps are ~1e-4 (results/distill.json): an export 5x off must not count as reproducing the student."""
    entries = [
        {"step": s, "val_gap": g, "val_fm_teacher": 1.0, "val_fm_student": 1.0} for s, g in ((0, 4e-4), (3, 1e-4))
    ]
    _, gap = _distill_gap(monkeypatch, tmp_path, entries, 5e-4)
    assert not gap["export_reproduces_student"]


def test_distill_acceptance_passes_at_exactly_the_required_reduction() -> None:
    import benchmarks.distill as bench

    gap = {"fm_weight": 0.0, "reduction": bench.REQUIRED_REDUCTION, "export_reproduces_student": True}
    assert bench.verdict([gap]) == "pass"
    assert bench.verdict([{**gap, "reduction": bench.REQUIRED_REDUCTION - 1e-9}]) == "FAIL"


def test_distill_memory_ratio_is_against_the_shared_row_of_the_same_student() -> None:
    import benchmarks.distill as bench

    args = bench.parse_args(["--smoke"])
    gap = {"fm_weight": 0.0, "gap_undistilled": 4.0, "gap_distilled": 1.0, "reduction": 0.75, "fm_teacher": 1.0,
           "fm_student_distilled": 1.0, "export_reproduces_student": True}  # fmt: skip
    rows = [
        {
            "teacher": t,
            "lora_rank": r,
            "model_params": 1e6,
            "trainable_params": 1e6,
            "samples_per_s": 1.0,
            "peak_mib": p,
        }
        for t, r, p in (("copy", None, 300.0), ("shared", None, 100.0), ("copy", 4, 150.0), ("shared", 4, 50.0))
    ]
    lines = [line for line in bench.report(args, [gap, {**gap, "fm_weight": 1.0}], rows).splitlines() if "LoRA" in line]
    assert lines[0].endswith("3.00x") and lines[1].endswith("1.00x")
