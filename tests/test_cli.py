"""The ``clear-dit`` command line, run as a subprocess on the tiny model (``python -m app.cli``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FAST = ["--height", "64", "--width", "128", "--steps", "2"]


@pytest.fixture
def cli(tiny_pipeline_path):
    """Run ``clear-dit ARGS`` with the session's tiny-model cache; returns the CompletedProcess."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def _settings(path: Path) -> dict:
    with Image.open(path) as image:
        image.load()
        return {"size": image.size, **image.text, "json": json.loads(image.text["clear-dit"])}


def test_help_lists_generate(cli):
    proc = _ok(cli("--help"))
    assert "generate" in proc.stdout


def test_generate_full_attention(cli, tmp_path):
    out = tmp_path / "full.png"
    proc = _ok(cli("generate", "--prompt", "a red circle", *FAST, "--seed", "7", "--out", str(out)))
    assert "full attention:" in proc.stdout and str(out) in proc.stdout
    meta = _settings(out)
    assert meta["size"] == (128, 64)
    assert meta["prompt"] == "a red circle" and meta["attention"] == "full"
    assert meta["json"] == {
        "prompt": "a red circle",
        "model": "tiny",
        "height": 64,
        "width": 128,
        "steps": 2,
        "guidance": 3.5,
        "seed": 7,
        "max_sequence_length": 64,
        "attention": "full",
    }


def test_generate_with_true_cfg_is_the_pipelines_own(cli, tmp_path, tiny_pipe):
    out = tmp_path / "cfg.png"
    args = ("--true-cfg", "3", "--negative-prompt", "a blue square")
    _ok(cli("generate", "--prompt", "a red circle", *FAST, *args, "--seed", "7", "--out", str(out)))
    meta = _settings(out)["json"]
    assert meta["true_cfg_scale"] == 3.0 and meta["negative_prompt"] == "a blue square"
    expected = tiny_pipe(
        "a red circle",
        negative_prompt="a blue square",
        true_cfg_scale=3.0,
        height=64,
        width=128,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        max_sequence_length=64,
    ).images[0]
    with Image.open(out) as image:
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_generate_with_a_down_factor_into_a_new_folder(cli, tmp_path):
    out = tmp_path / "new" / "sub" / "pooled.png"  # folders that do not exist yet are made
    proc = _ok(cli("generate", "--prompt", "a red circle", *FAST, "--window", "4", "--down", "2", "--out", str(out)))
    assert "CLEAR r=4 d=2" in proc.stdout
    meta = _settings(out)
    assert meta["size"] == (128, 64) and (meta["json"]["window"], meta["json"]["down"]) == (4, 2)


def test_compare_times_each_side_after_an_untimed_one_step_warm_up(tmp_path, monkeypatch, capsys):
    from diffusers import FluxPipeline

    from app.cli import main

    steps, call = [], FluxPipeline.__call__

    def counted(self, *args, **kwargs):
        steps.append(kwargs["num_inference_steps"])
        if len(steps) in (2, 4):  # the timed calls, long enough for the printed 0.01 s: full clearly slower
            time.sleep(3.0 if len(steps) == 2 else 0.3)  # a margin a loaded machine cannot eat
        return call(self, *args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "__call__", counted)
    out = tmp_path / "compare.png"
    assert main(["generate", "--prompt", "a red circle", *FAST, "--window", "2", "--compare", "--out", str(out)]) == 0
    assert steps == [1, 2, 1, 2]  # full: warm-up, timed; CLEAR: warm-up, timed
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    full_s, clear_s = float(lines["full attention"].split()[0]), float(lines["CLEAR r=2 (backend auto)"].split()[0])
    speedup = float(lines["speedup"].split("x")[0])  # full / CLEAR, not the other way round
    assert speedup > 1 and speedup == pytest.approx(full_s / clear_s, rel=0.05)


def test_an_interrupt_is_one_line_and_exit_code_130(tmp_path, monkeypatch, capsys):
    import pipelines.loading
    from app.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the model loads

    monkeypatch.setattr(pipelines.loading, "load_pipeline", interrupted)
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_generate_clear_window(cli, tmp_path):  # needs clear_dit.patch
    out = tmp_path / "clear.png"
    proc = _ok(cli("generate", "--prompt", "a red circle", *FAST, "--window", "2", "--out", str(out)))
    assert "CLEAR r=2" in proc.stdout and "attention density" in proc.stdout
    meta = _settings(out)
    assert meta["size"] == (128, 64)
    assert meta["json"]["window"] == 2 and meta["json"]["down"] == 1 and meta["json"]["backend"] == "auto"


def test_compare_writes_side_by_side(cli, tmp_path):  # needs clear_dit.patch
    out = tmp_path / "compare.png"
    proc = _ok(cli("generate", "--prompt", "a red circle", *FAST, "--window", "2", "--compare", "--out", str(out)))
    for text in ("full attention:", "CLEAR r=2", "speedup:", "attention density:", "fewer attention FLOPs", "saved"):
        assert text in proc.stdout, text
    meta = _settings(out)
    assert meta["size"] == (256, 64)
    assert meta["attention"] == "left: full attention, right: CLEAR r=2"


def test_generate_with_weights_file(cli, tmp_path, tiny_pipe):  # needs clear_dit.load_weights
    """A file named like the published ones (clear_local_{r}) defines CLEAR by itself."""
    from safetensors.torch import save_file

    names = re.compile(r"\.attn\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")  # DESIGN.md 1.2
    attn = {k: v.contiguous() for k, v in tiny_pipe.transformer.state_dict().items() if names.search(k)}
    weights = tmp_path / "clear_local_2.safetensors"
    save_file(attn, str(weights))
    out = tmp_path / "weights.png"
    _ok(cli("generate", "--prompt", "a red circle", *FAST, "--weights", str(weights), "--out", str(out)))
    meta = _settings(out)["json"]
    assert meta["window"] == 2 and meta["weights"] == str(weights)


BAD = {
    "size not a multiple of 16": (["--height", "100"], "multiple of 16"),
    "steps below 1": (["--steps", "0"], "--steps"),
    "window below 1": (["--window", "0"], "--window"),
    "down without window": (["--down", "2"], "--down needs --window or --weights"),
    "size not a multiple of 16*d": (["--window", "4", "--down", "4", "--height", "96"], "multiple of 64"),
    "compare without window": (["--compare"], "--compare needs --window"),
    "unknown backend": (["--window", "4", "--backend", "no-such-backend"], "backend 'no-such-backend'"),
    "missing model folder": (["--model", "{tmp}/no-such-folder"], "model folder not found"),
    "missing weights file": (["--weights", "{tmp}/no-such.safetensors"], "weights file not found"),
    "weights folder": (["--weights", "{tmp}"], "is a folder, not a CLEAR weights file (.safetensors)"),
    "hub id offline": (["--model", "someone/no-such-model"], "'someone/no-such-model'"),
    "not an int": (["--steps", "many"], "invalid int value"),
    "true cfg below 1": (["--true-cfg", "0"], "--true-cfg must be >= 1 (1: off), got 0.0"),
    "guidance not a number": (["--guidance", "nan"], "argument --guidance: expected a finite number, got 'nan'"),
    "true cfg infinite": (["--true-cfg", "inf"], "argument --true-cfg: expected a finite number, got 'inf'"),
    "guidance beyond float32": (["--guidance", "1e39"], "--guidance: expected a number within float32's range"),
    "negative prompt without true cfg": (["--negative-prompt", "blurry"], "--negative-prompt needs --true-cfg"),
    "seed beyond torch's": (["--seed", str(2**64)], "argument --seed: must be 0 to 9223372036854775807, got 1844"),
    "negative seed": (["--seed", "-1"], "argument --seed: must be 0 to 9223372036854775807, got -1"),
    # int() refuses 4300+ digits: "expected a whole number" (it is one), with all 5000 digits in the line
    "5000-digit seed": (["--seed", "9" * 5000], "argument --seed: must be 0 to 9223372036854775807, got 5000 digits"),
    "blank prompt": (["--prompt", "  "], "argument --prompt: empty: describe the image you want"),
    "zero height": (["--height", "0"], "--height must be a positive multiple of 16"),
    "huge width": (["--width", "8192000"], "--width must be at most 65536 px, got 8192000"),
    "negative guidance": (["--guidance", "-1"], "--guidance must be >= 0, got -1.0"),
    "parallel compare": (["--window", "2", "--compare", "--parallel"], "--parallel runs CLEAR attention"),
}


@pytest.mark.parametrize("args, message", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_clear_error(cli, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "out.png"
    proc = cli("generate", "--prompt", "x", *FAST, *args, "--out", str(out), HF_HUB_OFFLINE="1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
    assert not out.exists()


def test_existing_out_needs_overwrite(cli, tmp_path):
    out = tmp_path / "taken.png"
    out.write_bytes(b"precious")
    proc = cli("generate", "--prompt", "x", "--out", str(out))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"precious"
    _ok(cli("generate", "--prompt", "x", *FAST, "--out", str(out), "--overwrite"))
    assert _settings(out)["size"] == (128, 64)


def test_out_paths_are_checked_before_any_work_and_saved_whole(tmp_path, monkeypatch, capsys):
    import pipelines.loading
    from app.cli import _check_png_out, _density_line, _save_png, main

    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("mine")
    for out, message in (
        (tmp_path / "folder.png", "folder.png is a folder; name a file (in it)"),
        (tmp_path / "file" / "x.png", "file is a file, not a folder"),
    ):
        assert main(["generate", "--prompt", "x", "--out", str(out), "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert _check_png_out("~/x.png", False) == home / "x.png"  # as --model and --weights, ~ is the home folder

    old = tmp_path / "old.png"  # an interrupted save leaves the file that was there
    Image.new("RGB", (8, 8), "red").save(old)
    before = old.read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _save_png(Image.new("RGB", (8, 8)), old, {"prompt": "x"})
    assert old.read_bytes() == before and not list(tmp_path.glob("*.tmp"))

    link = tmp_path / "link.png"  # written through, as PIL's own save would: the link stays
    link.symlink_to(old)
    _save_png(Image.new("RGB", (8, 4)), _check_png_out(str(link), True), {"prompt": "x"})
    assert link.is_symlink() and Image.open(old).size == (8, 4)

    args = type("Args", (), {"height": 32, "width": 32})()
    assert "0.1% more attention FLOPs than full attention" in _density_line(args, 2, 2, 64, 16)


def test_generate_checks_sizes_against_the_weights_files_down_factor_before_loading(tmp_path, monkeypatch, capsys):
    import clear_dit
    import pipelines.loading
    from app.cli import main
    from pipelines.loading import load_pipeline

    pipe = load_pipeline("tiny")
    with clear_dit.patch(pipe, window_size=2, down_factor=2):
        weights = clear_dit.save_weights(pipe, tmp_path / "student.safetensors")
    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["generate", "--prompt", "x", "--height", "80", "--width", "64", "--weights", str(weights), "--compare"]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
    assert "--height must be a multiple of 32 (16 x the down factor 2 of" in capsys.readouterr().err


def test_make_data_refuses_bad_settings_before_touching_its_folder(tmp_path, tiny_pipeline_path, capsys):
    from app.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    data = tmp_path / "data"
    base = ["make-data", "--prompts", str(prompts), "--out", str(data), "--resolution", "32", "--steps", "1"]
    assert main(base) == 0
    made = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for extra, message in (
        (["--max-sequence-length", "600"], "--max-sequence-length must be 1 to 512 (FLUX's T5 limit), got 600"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 16 px, at most 65536, got 0"),
        (["--resolution", "8192000"], "--resolution must be a positive multiple of 16 px, at most 65536, got 8192000"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--num", "0"], "--num must be at least 1, got 0"),
        (["--guidance", "-5"], "--guidance must be >= 0, got -5.0"),
    ):
        assert main([*base, *extra, "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == made  # nothing deleted or rewritten
    (data / "raw").mkdir()
    assert main(["make-data", "--images", str(data / "raw"), "--out", str(data)]) == 2
    assert "holds --images" in capsys.readouterr().err
    assert main(["make-data", "--images", str(data / "raw"), "--out", str(data / "raw"), "--overwrite"]) == 2
    assert "holds --images" in capsys.readouterr().err
    assert (data / "raw").is_dir()
    # a file where a folder belongs: named as such, not "not found" or an errno
    assert main(["make-data", "--images", str(prompts), "--out", str(tmp_path / "d2")]) == 2
    assert capsys.readouterr().err == f"error: --images {prompts} is a file; name the folder of images and captions\n"
    assert main(["make-data", "--prompts", str(prompts), "--out", str(prompts / "sub")]) == 2
    assert capsys.readouterr().err == f"error: --out {prompts / 'sub'}: {prompts} is a file, not a folder\n"


@pytest.mark.parametrize("problem", ["shapes", "header only"])
def test_compare_refuses_weights_the_model_cannot_load_before_the_full_half(tmp_path, monkeypatch, capsys, problem):
    """A file that fails the CLEAR half failed only after the whole full-attention half had run (minutes on FLUX)."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file, save_file

    import clear_dit
    from app.cli import main
    from pipelines.loading import load_pipeline

    with clear_dit.patch(load_pipeline("tiny"), window_size=2) as handle:
        weights = clear_dit.save_weights(handle.transformer, tmp_path / "clear_local_2.safetensors")
    tensors = load_file(weights)
    if problem == "shapes":  # made for a wider model
        name = next(iter(tensors))
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    else:  # a key the model lacks
        tensors["transformer_blocks.9.attn.to_q.weight"] = tensors.popitem()[1]
    save_file(tensors, weights)
    monkeypatch.setattr(FluxPipeline, "__call__", lambda *a, **k: pytest.fail("a half ran"))
    args = [
        "generate",
        "--prompt",
        "x",
        *FAST,
        "--weights",
        str(weights),
        "--compare",
        "--out",
        str(tmp_path / "c.png"),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err  # (after the loading's progress bars, when another test turned them on)
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and ("wrong shape" if problem == "shapes" else "does not match") in last
    assert "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_the_hubs_download_retries_are_quiet_unless_verbose():
    """A hub --weights path that cannot be fetched printed 24 lines of retries before its one error line."""
    from huggingface_hub.utils import logging as hub_logging

    from app.cli import _quiet_libraries

    before = hub_logging.get_verbosity()
    try:
        hub_logging.set_verbosity_warning()  # the library's default (in-process CLI tests before may have quieted it)
        _quiet_libraries(True)
        assert logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING)
        _quiet_libraries(False)
        assert not logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING)
    finally:
        hub_logging.set_verbosity(before)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "2", "--down", "0"], "--down must be at least 1, got 0"),
        (["--backend", "dense"], "--backend applies to CLEAR attention"),
        (["--weights", "no-such-dir/w.safetensors"], "weights file not found: no-such-dir/w.safetensors"),
        (["--out", "x.jpg"], "--out must be a .png file"),
        (["--out", "/proc/x.png"], "--out /proc/x.png: cannot write in /proc"),  # found before the generation
    ],
)
def test_bad_input_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, args, message):
    import pipelines.loading
    from app.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--prompt", "x", "--out", "x.png", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_a_usage_error(cli, tmp_path):
    """Such bytes reach Python as surrogates, which the tokenizers refused with a TypeError."""
    proc = cli("generate", "--prompt", "caf\udce9", *FAST, "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: argument --prompt: not UTF-8 text: 'caf\\\\udce9'"), proc.stderr
    negative = cli("generate", "--prompt", "x", "--true-cfg", "2", "--negative-prompt", "caf\udce9")
    assert negative.returncode == 2 and "argument --negative-prompt: not UTF-8 text" in negative.stderr


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 74.5 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory"),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1024 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
)
def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys, caplog, error):
    import pipelines.loading
    from app.cli import main

    raised = [error, RuntimeError("a bug")]

    def load(*args, **kwargs):
        raise raised.pop(0)

    monkeypatch.setattr(pipelines.loading, "load_pipeline", load)
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and err.endswith("try a smaller size or fewer steps\n")
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")])
    raised.append(error)
    with caplog.at_level(logging.ERROR):  # and -v shows the traceback of this one
        assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "-v"]) == 1
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [error]


def _fake_call(calls: list[dict]):
    """``FluxPipeline.__call__`` that records its seed and attention, and draws full attention red, CLEAR blue."""

    def call(self, prompt, **kwargs):
        clear = any(type(p).__name__.startswith("CLEAR") for p in self.transformer.attn_processors.values())
        calls.append({**kwargs, "seed": kwargs["generator"].initial_seed(), "clear": clear})
        image = Image.new("RGB", (kwargs["width"], kwargs["height"]), "blue" if clear else "red")
        return type("Output", (), {"images": [image]})()

    return call


def test_compare_is_full_then_clear_with_one_seed_and_full_on_the_left(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from app.cli import main

    calls = []
    monkeypatch.setattr(FluxPipeline, "__call__", _fake_call(calls))
    out = tmp_path / "c.png"
    args = ["--prompt", "x", "--height", "32", "--width", "48", "--steps", "2", "--seed", "9"]
    assert main(["generate", *args, "--window", "1", "--compare", "--out", str(out)]) == 0
    assert [(c["seed"], c["clear"]) for c in calls] == [(9, False), (9, False), (9, True), (9, True)]
    with Image.open(out) as image:
        assert image.size == (96, 32)
        assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((48, 0)) == (0, 0, 255)


def test_the_tiny_models_defaults_are_the_documented_ones(tmp_path, monkeypatch):
    """256 px, 4 steps, guidance 3.5 (README, --help); guidance 0 (FLUX.1-schnell's) is allowed."""
    from diffusers import FluxPipeline

    from app.cli import main

    calls = []
    monkeypatch.setattr(FluxPipeline, "__call__", _fake_call(calls))
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "d.png")]) == 0
    assert main(["generate", "--prompt", "x", "--guidance", "0", "--out", str(tmp_path / "g.png")]) == 0
    assert [(c["height"], c["width"], c["num_inference_steps"], c["guidance_scale"]) for c in calls] == [
        (256, 256, 4, 3.5),
        (256, 256, 4, 0.0),
    ]


@pytest.mark.parametrize(
    "argv, help_of",
    [
        (["generate", "--prompt", "x", "--port", "3"], "clear-dit generate"),
        (["--port=3", "app"], "clear-dit"),
        (["generate", "--prompt", "x", "generate"], "clear-dit generate"),  # the command's name, given twice
    ],
)
def test_an_unknown_option_names_the_help_of_the_parser_it_follows(capsys, argv, help_of):
    from app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    unknown = " ".join(argv[3:] or argv[:1])
    assert capsys.readouterr().err == f"error: unrecognized arguments: {unknown} (see '{help_of} --help')\n"


@pytest.mark.parametrize("prompt", ["-vivid sunset", "-v2 style portrait"])
def test_v_goes_before_or_after_the_command_and_a_prompt_may_start_with_it(prompt, monkeypatch):
    import app.cli

    seen, build = [], app.cli.build_parser

    def parser():
        top = build()
        for command in top._subparsers._group_actions[0].choices.values():
            command.set_defaults(_run=lambda args: seen.append((args.prompt, args.negative_prompt, args.verbose)))
        return top

    monkeypatch.setattr(app.cli, "build_parser", parser)
    command = ["generate", "--prompt", prompt, "--negative-prompt", prompt]
    for argv in (command, ["-v", *command], [*command, "-v"], [*command, "--verbose"]):
        app.cli.main(argv)
    assert seen == [(prompt, prompt, False)] + [(prompt, prompt, True)] * 3


def test_the_largest_seed_is_2_63_minus_1():
    from app.cli import seed_arg

    assert seed_arg(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(argparse.ArgumentTypeError, match="must be 0 to 9223372036854775807, got 9223372036854775808"):
        seed_arg(str(2**63))


def test_a_highres_prompt_that_is_not_utf8_is_a_usage_error(capsys):
    from app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["highres", "--prompt", "caf\udce9", "--stages", "64x64,128x128", "--out", "x.png"])
    assert exit_.value.code == 2
    assert "error: argument --prompt: not UTF-8 text: 'caf\\\\udce9'" in capsys.readouterr().err
