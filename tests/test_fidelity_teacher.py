"""Smoke test of the fidelity teacher's training: a few steps on toy sizes, saved and reloaded as a FLUX pipeline."""

import json

import torch
from diffusers import FluxPipeline

from benchmarks.fidelity import train_teacher
from pipelines.loading import default_max_sequence_length
from pipelines.tiny import VAE_CONFIG


def test_teacher_smoke_run_saves_a_loadable_pipeline(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert train_teacher.main(["--out", str(out), "--smoke", "--steps", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_scenes"] == 2 and 0 <= summary["adherence"] <= 1

    config = json.loads((out / "training" / "config.json").read_text())
    assert config["steps"] == 4 and config["vae_steps"] == 2 and config["resolution"] == 64
    phases = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [(p["phase"], p["step"]) for p in phases] == [("vae", 2), ("transformer", 4)]
    assert (out / "training" / "samples.png").is_file()

    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.transformer.config.guidance_embeds is False
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.num_single_layers == 1
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor != VAE_CONFIG["scaling_factor"]  # set from the latent statistics
    assert default_max_sequence_length(pipe) == train_teacher.T5_LENGTH
    tokens = pipe.tokenizer("a large red circle at the top left").input_ids
    assert len(tokens) == 2 + 8  # one CLIP token per word of the world
    image = pipe(
        "a small cyan star at the center on a plain black background",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=default_max_sequence_length(pipe),
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)

    # A second run into the same folder is refused, and leaves the first untouched.
    before = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert train_teacher.main(["--out", str(out), "--smoke"]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_teacher_rejects_bad_settings(tmp_path, capsys):
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", "--resolution", "72"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert train_teacher.main(["--out", str(tmp_path / "mine"), "--smoke", "--overwrite"]) == 2
    assert "not a teacher run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_phase_without_a_step_count_fits_its_time_budget(tmp_path):
    calls = []
    phase = train_teacher._Phase("probe", None, seconds=0.0, log=tmp_path / "log.jsonl")
    assert phase.run(lambda i: calls.append(i) or {"loss": 0.0}) == train_teacher._PROBE_STEPS
    assert calls == list(range(train_teacher._PROBE_STEPS)) and phase.steps == train_teacher._PROBE_STEPS
