"""The CLI passes on and records what it was given: the density line's numbers, PNG metadata (a weights file's down
factor, the backend, highres's strength/guidance/CFG/seed), --overwrite of stage PNGs and data folders, --parallel's
checks, one-line library errors, the relaunch's argv, the port's upper bound."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

import clear_dit
from app.cli import main
from clear_dit import mask
from clear_dit.mask import in_window


def _meta(path):
    with Image.open(path) as image:
        image.load()
        return dict(image.text), json.loads(image.text["clear-dit"])


def test_density_line_numbers_are_attention_densitys():
    from app.cli import _density_line

    args = type("Args", (), {"height": 64, "width": 128})()
    d = clear_dit.attention_density((4, 8), 64, 1, 1)
    line = _density_line(args, 1, 1, 64, 16)
    assert line == (
        f"attention density: {d:.1%} of full attention (4x8 image + 64 text tokens) -> "
        f"{1 / d:.2f}x fewer attention FLOPs ({1 - d:.1%} saved)"
    )
    square = type("Args", (), {"height": 32, "width": 32})()  # a window covering the grid: exactly full attention
    assert clear_dit.attention_density((2, 2), 64, 8, 1) == 1.0
    assert "0.0% more attention FLOPs than full attention" in _density_line(square, 8, 1, 64, 16)


def test_png_metadata_skips_unset_values_and_names_the_software(tmp_path):
    from app.cli import _save_png

    out = tmp_path / "x.png"
    _save_png(Image.new("RGB", (8, 8)), out, {"prompt": "x", "weights": None})
    text, settings = _meta(out)
    assert "weights" not in text and settings == {"prompt": "x", "weights": None}
    assert text["Software"] == f"clear-dit {clear_dit.__version__}"


def test_generate_records_the_weights_files_down_factor_and_backend(tmp_path, capsys):
    from pipelines.loading import load_pipeline

    with clear_dit.patch(load_pipeline("tiny"), window_size=2, down_factor=2) as handle:
        weights = clear_dit.save_weights(handle.transformer, tmp_path / "student.safetensors")
    out = tmp_path / "w.png"
    args = ["generate", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "1"]
    assert main([*args, "--weights", str(weights), "--backend", "dense", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    _, settings = _meta(out)
    assert (settings["window"], settings["down"], settings["backend"]) == (2, 2, "dense")
    assert "CLEAR r=2 d=2 (backend dense)" in printed
    assert f"attention density: {clear_dit.attention_density((4, 4), 64, 2, 2):.1%}" in printed


def test_highres_runs_and_records_what_it_was_given_and_keeps_stage_files(tmp_path, monkeypatch, capsys):
    from diffusers.utils import logging as diffusers_logging

    from pipelines.highres import HighResFluxPipeline

    seen, call = [], HighResFluxPipeline.__call__
    monkeypatch.setattr(HighResFluxPipeline, "__call__", lambda self, *a, **k: seen.append(k) or call(self, *a, **k))
    out = tmp_path / "big.png"
    args = ["highres", "--prompt", "x", "--stages", "32x32,64x64", "--steps", "2", "--strength", "0.5"]
    args += ["--guidance", "2", "--true-cfg", "2", "--negative-prompt", "blurry", "--seed", "5", "--window", "1"]
    args += ["--backend", "dense", "--save-stages", "--out", str(out)]
    stage0 = tmp_path / "big-stage0.png"
    stage0.write_bytes(b"mine")
    assert main(args) == 2  # an existing stage file needs --overwrite as the final one does
    assert "exists; pass --overwrite" in capsys.readouterr().err and stage0.read_bytes() == b"mine"
    prior = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_warning()
        assert main([*args, "--overwrite"]) == 0
        assert diffusers_logging.get_verbosity() == logging.ERROR  # quieted without -v
    finally:
        diffusers_logging.set_verbosity(prior)
    (kwargs,) = seen
    assert (kwargs["strength"], kwargs["guidance_scale"], kwargs["seed"]) == (0.5, 2.0, 5)
    assert (kwargs["true_cfg_scale"], kwargs["negative_prompt"]) == (2.0, "blurry")
    for path in (stage0, out):
        _, settings = _meta(path)
        assert settings["strength"] == 0.5 and settings["guidance"] == 2.0 and settings["seed"] == 5
        assert settings["true_cfg_scale"] == 2.0 and settings["negative_prompt"] == "blurry"
        assert settings["backend"] == "dense"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--parallel needs a distributed launch of its processes: accelerate launch --multi_gpu --num_processes N"),
        (["--true-cfg", "2"], "--true-cfg is not supported with --parallel yet"),
    ],
)
def test_parallel_checks(tmp_path, monkeypatch, capsys, extra, message):
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)  # one variable missing is no launch
    args = ["generate", "--prompt", "x", "--window", "2", "--parallel", *extra, "--out", str(tmp_path / "p.png")]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_multi_line_library_error_is_one_line(tmp_path, monkeypatch, capsys):
    import pipelines.loading

    def broken(model):
        raise ValueError("first line\n  second line")

    monkeypatch.setattr(pipelines.loading, "model_source", broken)
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == "error: first line second line\n"


def test_distill_passes_its_own_argv_to_the_relaunch(tmp_path, monkeypatch):
    import app.launch
    import training.distill

    seen = []
    monkeypatch.setattr(training.distill, "check_run", lambda config: None)
    monkeypatch.setattr(app.launch, "relaunch_lost_cpu_processes", lambda argv: seen.append(argv) or 7)
    argv = ["distill", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--window", "2"]
    assert main(argv) == 7 and seen == [argv]


def test_generate_parallel_passes_its_own_argv_to_the_relaunch(tmp_path, monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2 -m app.cli generate ... --parallel` starts one process: it failed
    with 'needs a distributed launch' while distill relaunched itself as the N processes asked for."""
    import app.launch

    seen = []
    monkeypatch.setattr(app.launch, "relaunch_lost_cpu_processes", lambda argv: seen.append(argv) or 7)
    for name in app.launch.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what accelerate launch --cpu gives its one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    argv = ["generate", "--prompt", "x", "--window", "2", "--parallel", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 7 and seen == [argv]
    assert main(argv[:-3] + ["--out", str(tmp_path / "y.png")]) != 7  # without --parallel: no relaunch
    assert len(seen) == 1
    # a split the N processes cannot make: refused once, here, not by each of them after the relaunch
    launcher = ["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "app.cli"]
    monkeypatch.setattr(app.launch, "_parent_argv", lambda: [*launcher, *argv])
    capsys.readouterr()
    assert main([*argv, "--height", "16"]) == 2 and len(seen) == 1
    assert capsys.readouterr().err == (
        "error: --parallel: cannot split 1 token rows into 2 bands of a multiple of 1 row(s) each: use at most 1 "
        "ranks or a taller image\n"
    )


def test_make_data_overwrite_starts_over(tmp_path, tiny_pipeline_path, capsys):
    from training.data import DistillDataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["make-data", "--prompts", str(prompts), "--out", str(tmp_path / "data"), "--resolution", "32"]
    assert main([*base, "--steps", "1"]) == 0
    prompts.write_text("a blue square\n")
    assert main([*base, "--steps", "2", "--overwrite"]) == 0
    assert DistillDataset(tmp_path / "data").prompts == ["a blue square"]


def test_app_refuses_port_65536(capsys):
    assert main(["app", "--port", "65536"]) == 2
    assert "--port must be 1 to 65535, got 65536" in capsys.readouterr().err


@pytest.fixture
def weights_d2(tmp_path, tiny_pipeline_path):
    from pipelines.loading import load_pipeline

    with clear_dit.patch(load_pipeline("tiny"), window_size=2, down_factor=2) as handle:
        return clear_dit.save_weights(handle.transformer, tmp_path / "student.safetensors")


def test_generate_passes_backend_to_load_weights(tmp_path, monkeypatch, weights_d2):
    """--backend dense with --weights ran auto while it printed and recorded dense."""
    seen, real = [], clear_dit.load_weights
    monkeypatch.setattr(clear_dit, "load_weights", lambda *a, **k: seen.append(k) or real(*a, **k))
    args = ["generate", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "1"]
    assert main([*args, "--weights", str(weights_d2), "--backend", "dense", "--out", str(tmp_path / "w.png")]) == 0
    assert seen and seen[0].get("backend") == "dense"


def test_highres_passes_ntk_and_time_shift(tmp_path, monkeypatch, tiny_pipeline_path):
    from pipelines.highres import HighResFluxPipeline

    seen, call = [], HighResFluxPipeline.__call__
    monkeypatch.setattr(HighResFluxPipeline, "__call__", lambda self, *a, **k: seen.append(k) or call(self, *a, **k))
    args = ["highres", "--prompt", "x", "--stages", "32x32,64x64", "--steps", "2", "--window", "1"]
    assert main([*args, "--ntk", "5", "--time-shift", "2", "--out", str(tmp_path / "h.png")]) == 0
    assert (seen[0]["ntk_factor"], seen[0]["time_shift"]) == (5.0, 2.0)


def test_highres_checks_the_weights_files_down_factor_before_loading(tmp_path, monkeypatch, capsys, weights_d2):
    import pipelines.loading

    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    args = ["highres", "--prompt", "x", "--stages", "32x32,48x48", "--weights", str(weights_d2)]
    assert main([*args, "--out", str(tmp_path / "h.png")]) == 2
    assert "(the down factor of" in capsys.readouterr().err


def test_make_data_images_refuses_generation_options(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    assert main(["make-data", "--images", str(tmp_path / "raw"), "--out", str(tmp_path / "d"), "--seed", "3"]) == 2
    assert "--seed applies to generated data (--prompts), not to --images" in capsys.readouterr().err


def test_make_data_passes_max_sequence_length(tmp_path, monkeypatch):
    import training.data

    seen = []

    def stop_here(*args, **kwargs):
        seen.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(training.data, "generate_dataset", stop_here)
    (tmp_path / "p.txt").write_text("a cat\n")
    args = ["make-data", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "d"), "--resolution", "32"]
    assert main([*args, "--max-sequence-length", "16"]) == 1
    assert seen[0]["max_sequence_length"] == 16


@pytest.mark.parametrize("layers", ["", ",", " , "])
def test_distill_refuses_an_empty_attn_layers_list(tmp_path, capsys, layers):
    """It switched L_attn off while --attn-weight stayed 0.5 (a whole run trained without it)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--window", "2",
              "--attn-layers", layers])  # fmt: skip
    assert exit_info.value.code == 2
    assert "expected 'all' or comma-separated layer indices" in capsys.readouterr().err


def test_a_huge_window_is_counted_in_what_the_grid_spans():
    """attention_density (the CLI's density line) looped over every row of the window: --window 100000 hung
    generate after the image was made, for about 40 minutes."""
    calls = []

    def counting(dy, dx, window_size):
        calls.append(1)
        return in_window(dy, dx, window_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mask, "in_window", counting)
        assert clear_dit.attention_density((2, 2), 64, 100_000) == 1.0
    assert len(calls) < 200


def test_text_that_is_not_utf8_is_named_wherever_the_surrogate_sits():
    from app.inputs import not_utf8

    assert not_utf8("a caf\udce9 cat") == "not UTF-8 text: 'a caf\\\\udce9 cat'"
    assert not_utf8("a café cat") is None


def test_generate_parallel_refuses_a_split_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import pipelines.parallel

    monkeypatch.setattr(pipelines.parallel, "init_parallel", lambda: pytest.fail("reached init_parallel"))
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    argv = [
        "generate",
        "--prompt",
        "x",
        "--window",
        "2",
        "--parallel",
        "--height",
        "16",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(argv) == 2 and "--parallel: cannot split 1 token rows into 2 bands" in capsys.readouterr().err
