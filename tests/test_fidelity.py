"""The fidelity benchmark end to end on toy sizes: teacher training (saved and reloaded as a FLUX pipeline),
the protocol's evaluation and report, and the whole protocol once the distillation CLI exists."""

import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import clear_dit
from benchmarks.fidelity import probe, run, train_teacher
from benchmarks.fidelity.common import held_out_scenes
from pipelines.loading import default_max_sequence_length, load_pipeline
from pipelines.tiny import VAE_CONFIG
from training.world import PALETTE, REGIONS, Scene, region_center, render, sample_scenes


@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "teacher"
    assert train_teacher.main(["--out", str(out), "--smoke", "--steps", "4"]) == 0
    return out


def test_teacher_smoke_run_saves_a_loadable_pipeline(smoke_teacher, capsys):
    out = smoke_teacher
    summary = json.loads((out / "training" / "eval.json").read_text())
    assert summary["num_scenes"] == 2 and 0 <= summary["adherence"] <= 1 and summary["vae_psnr"] > 0
    assert summary["cfg_scale"] == train_teacher.TeacherConfig.cfg_scale > 1  # samples drawn with true CFG

    config = json.loads((out / "training" / "config.json").read_text())
    assert config["steps"] == 4 and config["vae_steps"] == 2 and config["resolution"] == 64
    phases = [json.loads(line) for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert [(p["phase"], p["step"]) for p in phases] == [("vae", 2), ("transformer", 4)]
    # the lr that step 4 used (cosine from step 1 to 4, at 2/3 of the way), not the next step's
    factor = 0.1 + 0.45 * (1 + math.cos(2 * math.pi / 3))
    assert phases[-1]["lr"] == pytest.approx(train_teacher.TeacherConfig.lr * factor)
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


def _text_encoder_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name in ("text_encoder", "text_encoder_2")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def test_teacher_trains_its_text_encoders_unless_told_not_to(smoke_teacher, tmp_path):
    cfg = train_teacher.parse_args(["--out", "unused", "--smoke"])
    untrained = _text_encoder_weights(train_teacher.build_teacher(cfg, tmp_path / "work"))
    trained = load_pipeline(str(smoke_teacher))
    assert trained.text_encoder_2.config.d_model == cfg.t5_dim == trained.transformer.config.joint_attention_dim
    assert trained.text_encoder_2.config.relative_attention_num_buckets == 32
    changed = {k for k, v in _text_encoder_weights(trained).items() if not torch.equal(v, untrained[k])}
    assert any(k.startswith("text_encoder.") for k in changed) and any(k.startswith("text_encoder_2.") for k in changed)

    frozen_out = tmp_path / "frozen"
    assert train_teacher.main(["--out", str(frozen_out), "--smoke", "--steps", "2", "--no-train-text-encoders"]) == 0
    frozen = _text_encoder_weights(load_pipeline(str(frozen_out)))
    assert all(torch.equal(v, untrained[k]) for k, v in frozen.items())
    assert json.loads((frozen_out / "training" / "config.json").read_text())["train_text_encoders"] is False


def test_teacher_embeds_token_ids_as_the_pipeline_encodes_prompts(smoke_teacher):
    pipe = load_pipeline(str(smoke_teacher))
    captions = ["a small cyan star at the center on a plain black background", ""]
    embeds, pooled = train_teacher.embed_ids(pipe, *train_teacher.tokenize_captions(pipe, captions))
    with torch.no_grad():
        expected, expected_pooled, _ = pipe.encode_prompt(captions, max_sequence_length=train_teacher.T5_LENGTH)
    torch.testing.assert_close(embeds, expected)  # fp32 tolerance: autograd-enabled kernels may differ in ulps
    torch.testing.assert_close(pooled, expected_pooled)


def test_teacher_goes_on_training_from_a_previous_one(smoke_teacher, tmp_path, capsys):
    out = tmp_path / "continued"
    assert train_teacher.main(["--out", str(out), "--smoke", "--steps", "2", "--init-from", str(smoke_teacher)]) == 0
    config = json.loads((out / "training" / "config.json").read_text())
    assert config["init_from"] == str(smoke_teacher) and config["vae_steps"] == 0 and config["steps"] == 2
    phases = [json.loads(line)["phase"] for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert phases == ["transformer"]
    before, after = load_pipeline(str(smoke_teacher)), load_pipeline(str(out))
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    vae_before = before.vae.state_dict()
    assert all(torch.equal(value, vae_before[key]) for key, value in after.vae.state_dict().items())
    transformer_before = before.transformer.state_dict()
    assert not all(torch.equal(value, transformer_before[key]) for key, value in after.transformer.state_dict().items())

    highres = tmp_path / "highres"
    argv = ["--out", str(highres), "--smoke", "--steps", "2", "--init-from", str(smoke_teacher)]
    assert train_teacher.main([*argv, "--highres-share", "1", "--highres-scenes", "3"]) == 0
    records = [json.loads(line) for line in (highres / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["size"] for r in records] == [2 * train_teacher.SMOKE["resolution"]]  # every step drawn at 2x
    assert json.loads((highres / "training" / "config.json").read_text())["highres_share"] == 1.0
    assert [json.loads(line)["size"] for line in (out / "training" / "log.jsonl").read_text().splitlines()] == [
        train_teacher.SMOKE["resolution"]
    ]

    parent = json.loads((smoke_teacher / "training" / "config.json").read_text())
    assert config["draws_after"] == parent["steps"] and parent["draws_after"] == 0  # draws on, not again
    assert train_teacher._transformer_draw_seed(train_teacher.TeacherConfig(**config)) != parent["seed"] + 2

    for source in (out, out / "training", tmp_path):  # --out itself, inside it, above it
        assert train_teacher.main(["--out", str(out), "--smoke", "--overwrite", "--init-from", str(source)]) == 2
        err = capsys.readouterr().err  # after the progress bars of the loads above
        assert "must lie outside --out" in err and "(--out is emptied first)" in err
    assert train_teacher.main(["--out", str(out), "--smoke", "--overwrite", "--vae-from", str(out)]) == 2
    assert "--vae-from" in capsys.readouterr().err
    tiny = tmp_path / "tiny"  # a FLUX pipeline, not a teacher: refused after loading, before --out is emptied
    load_pipeline("tiny").save_pretrained(tiny)
    assert train_teacher.main(["--out", str(out), "--smoke", "--overwrite", "--init-from", str(tiny)]) == 2
    assert "is not a fidelity teacher" in capsys.readouterr().err
    assert (out / "model_index.json").is_file()  # refused before anything was deleted
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", "--init-from", str(tmp_path / "nope")]) == 2
    assert "is not a pipeline folder (no model_index.json)" in capsys.readouterr().err


def test_new_teacher_takes_the_vae_of_another(smoke_teacher, tmp_path, capsys):
    out = tmp_path / "wider"
    argv = ["--out", str(out), "--smoke", "--steps", "2", "--vae-from", str(smoke_teacher), "--heads", "4"]
    argv += ["--vae-crop", "8"]  # no VAE phase: its crop size is not checked
    assert train_teacher.main(argv) == 0
    config = json.loads((out / "training" / "config.json").read_text())
    assert config["vae_from"] == str(smoke_teacher) and config["vae_steps"] == 0 and config["heads"] == 4
    phases = [json.loads(line)["phase"] for line in (out / "training" / "log.jsonl").read_text().splitlines()]
    assert phases == ["transformer"]  # no VAE phase
    donor, new = load_pipeline(str(smoke_teacher)), load_pipeline(str(out))
    assert (new.vae.config.shift_factor, new.vae.config.scaling_factor) == (
        donor.vae.config.shift_factor,
        donor.vae.config.scaling_factor,
    )
    vae_before = donor.vae.state_dict()
    assert all(torch.equal(value, vae_before[key]) for key, value in new.vae.state_dict().items())
    assert new.transformer.config.num_attention_heads == 4 != donor.transformer.config.num_attention_heads

    argv = ["--out", str(tmp_path / "t"), "--smoke", "--vae-from", str(smoke_teacher), "--init-from", str(out)]
    assert train_teacher.main(argv) == 2
    assert "--vae-from is for a new teacher only" in capsys.readouterr().err
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", "--vae-from", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(f"error: --vae-from {tmp_path} holds no VAE (no vae/config.json)\n")
    other = tmp_path / "other" / "vae"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"latent_channels": 4}))
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", "--vae-from", str(other.parent)]) == 2
    assert "its VAE has 4 latent channels, the teacher takes 16" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_teacher_in_bf16_autocast_takes_the_same_draws_and_keeps_fp32_weights(smoke_teacher, tmp_path):
    out = tmp_path / "bf16"
    assert train_teacher.main(["--out", str(out), "--smoke", "--steps", "4", "--mixed-precision", "bf16"]) == 0
    config = json.loads((out / "training" / "config.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["device"] == "cpu"
    logs = [
        [json.loads(line) for line in (folder / "training" / "log.jsonl").read_text().splitlines()]
        for folder in (smoke_teacher, out)
    ]
    for fp32, bf16 in zip(*logs, strict=True):  # same batches, noise and timesteps: losses within bf16's rounding
        assert (fp32["phase"], fp32["step"]) == (bf16["phase"], bf16["step"])
        assert fp32["loss"] != bf16["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    pipe = load_pipeline(str(out))
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}


def test_teacher_rejects_bad_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", "--resolution", "72"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert train_teacher.main(["--out", str(tmp_path / "mine"), "--smoke", "--overwrite"]) == 2
    assert "not a teacher run" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    for flag, value, message in (
        ("--caption-dropout", "1", "--caption-dropout must be in [0, 1), got 1.0"),
        ("--cfg-scale", "0.5", "--cfg-scale must be >= 1 (1: no guidance), got 0.5"),
        ("--weighting-scheme", "cosmap", "--weighting-scheme must be none, logit_normal or mode, got 'cosmap'"),
        ("--sigma-one-share", "1.5", "--sigma-one-share must be in [0, 1], got 1.5"),
        ("--cell-weight", "0", "--cell-weight must be > 0 (1: every token alike), got 0.0"),
        ("--highres-share", "-0.1", "--highres-share must be in [0, 1] (0: the training resolution only), got -0.1"),
        ("--highres-share", "0.5 --highres-scenes 9", "--highres-scenes must be in 1..--num-scenes (8), got 9"),
        ("--mixed-precision", "fp16", "--mixed-precision must be no or bf16, got 'fp16'"),
        ("--device", "tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        ("--device", "cuda", "--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
        ("--num-scenes", "0", "--num-scenes must be at least 1, got 0"),
        ("--eval-scenes", "0", "--eval-scenes must be at least 1, got 0"),
        ("--steps", "-1", "--steps must be at least 1, got -1"),
        ("--vae-channels", "8 8", "--vae-channels takes 4 positive channel counts, got [8, 8]"),
        ("--lr", "0", "--lr must be positive, got 0.0"),
    ):
        assert train_teacher.main(["--out", str(tmp_path / "t"), "--smoke", flag, *value.split()]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "t").exists()
    assert train_teacher.main(["--out", str(tmp_path / "t"), "--warmup", "5"]) == 2  # steps fitted (no --smoke)
    assert "--warmup must exceed the 20 probe steps when --steps is fitted" in capsys.readouterr().err

    checkout = tmp_path / "checkout"  # a project with a training/ package: no teacher run, --overwrite or not
    (checkout / "training").mkdir(parents=True)
    (checkout / "training" / "world.py").write_text("mine")
    (checkout / "README.md").write_text("mine")
    assert train_teacher.main(["--out", str(checkout), "--smoke", "--overwrite"]) == 2
    assert "holds files that are not a teacher run (README.md, training/world.py)" in capsys.readouterr().err
    download = tmp_path / "download"  # a pipeline folder without training/: someone's model, not a run
    (download / "transformer").mkdir(parents=True)
    (download / "model_index.json").write_text("{}")
    assert train_teacher.main(["--out", str(download), "--smoke", "--overwrite"]) == 2
    assert "not a teacher run" in capsys.readouterr().err and (download / "model_index.json").is_file()
    (tmp_path / "file").write_text("mine")
    assert train_teacher.main(["--out", str(tmp_path / "file"), "--smoke"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage error: the sizes are the teacher's
        train_teacher.parse_args(["--out", "x", "--init-from", "y", "--heads", "4"])
    assert "--init-from keeps its teacher's sizes: --heads cannot change them" in capsys.readouterr().err


def test_probe_one_step_predictions_span_the_vae_round_trip_to_the_caption_alone(smoke_teacher):
    pipe = load_pipeline(str(smoke_teacher))
    scene = held_out_scenes(1)[0]
    shape = scene.shapes[0]
    moved = Scene(  # the same caption, the shape elsewhere in its region
        shapes=(dataclasses.replace(shape, center=region_center(shape.region)), *scene.shapes[1:]),
        background=scene.background,
        texture=scene.texture,
    )
    assert moved.caption == scene.caption and moved != scene
    predictions = probe.one_step_predictions(pipe, [scene, moved], [0.0, 1.0], resolution=64)
    with torch.no_grad():
        round_trip = pipe.vae.decode(pipe.vae.encode(train_teacher.render_batch([scene], 64)).latent_dist.mean).sample
    expected = np.asarray(pipe.image_processor.postprocess(round_trip.clamp(-1, 1))[0], dtype=int)
    assert np.abs(np.asarray(predictions[0.0][0], dtype=int) - expected).max() <= 1  # sigma 0: the image itself
    # sigma 1: pure noise, the prediction reads the caption only
    assert np.array_equal(np.asarray(predictions[1.0][0]), np.asarray(predictions[1.0][1]))
    assert not np.array_equal(np.asarray(predictions[0.0][0]), np.asarray(predictions[0.0][1]))
    with pytest.raises(ValueError, match=r"sigmas must lie in \[0, 1\], got \[1.5\]"):
        probe.one_step_predictions(pipe, [scene], [1.5], resolution=64)


def test_memorisation_probe_samples_both_sets_alike(smoke_teacher):
    pipe = load_pipeline(str(smoke_teacher))
    scenes = held_out_scenes(2)
    seen = probe.memorisation(pipe, scenes, scenes, resolution=64, steps=2, cfg_scale=2.0)
    assert seen["training"] == seen["held_out"]  # the same scenes and seeds: the same samples and scores
    other = probe.memorisation(pipe, sample_scenes(2, 0), scenes, resolution=64, steps=2, cfg_scale=2.0)
    assert other["held_out"] == seen["held_out"] and other["training"]["captions"] != seen["training"]["captions"]


def test_region_probe_scores_a_render_one_in_its_stated_cell_and_zero_elsewhere():
    scenes = probe.region_scenes()
    assert len({s.caption for s in scenes}) == 36 and all(len(s.shapes) == 1 for s in scenes)
    for scene in scenes[::5]:
        shift = probe.cell_color_shift(render(scene, 96), scene)
        stated = REGIONS.index(scene.shapes[0].region)
        assert shift[stated] == pytest.approx(1, abs=0.02)
        assert np.abs(np.delete(shift, stated)).max() < 1e-9
    # the mean of a cell: half of its middle in the shape's colour scores 0.5
    scene = scenes[0]
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    image[8:24, 8:16] = PALETTE[scene.shapes[0].color]  # top-left cell (0-32 px), left half of its middle
    assert probe.cell_color_shift(Image.fromarray(image), scene)[0] == pytest.approx(0.5)


def test_probe_cli_reports_all_four_probes(smoke_teacher, tmp_path, capsys):
    out = tmp_path / "new folder" / "probe.json"
    argv = ["--teacher", str(smoke_teacher), "--scenes", "2", "--sigmas", "0", "1", "--steps", "2"]
    assert probe.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["sigma"] for r in result["one_step"]] == [0.0, 1.0]
    assert all(0 <= r["shapes_found"] <= 1 and 0 <= r["background_ok"] <= 1 for r in result["one_step"])
    assert all(0 <= r["kind_right"] <= r["shapes_found"] for r in result["one_step"])
    swap = result["swap"]
    assert swap["pairs"] == 2 and swap["steps"] == 2 and swap["cfg_scale"] == train_teacher.TeacherConfig.cfg_scale
    assert sum(swap["background_follows"].values()) == pytest.approx(1)
    assert all(v * 2 == int(v * 2) for v in swap["background_follows"].values())  # shares of 2 pairs
    regions = result["regions"]
    assert regions["captions"] == 36
    assert regions["selectivity"] == pytest.approx(regions["stated_cell"] - regions["other_cells"])
    config = json.loads((smoke_teacher / "training" / "config.json").read_text())
    seen = result["memorisation"]
    assert (seen["steps"], seen["cfg_scale"]) == (2, swap["cfg_scale"])  # --steps reaches it; the report says so
    training = sample_scenes(2, config["seed"], config["max_shapes"])  # the teacher's first training scenes
    assert seen["training"]["captions"] == [s.caption for s in training]
    held_out = held_out_scenes(2, config["seed"], config["max_shapes"])
    assert seen["held_out"]["captions"] == [s.caption for s in held_out]
    assert all(0 <= seen[k]["kind_right"] <= seen[k]["shapes_found"] <= 1 for k in ("training", "held_out"))
    assert all(0 <= seen[k]["pass_rate"] <= seen[k]["adherence"] for k in ("training", "held_out"))
    report = capsys.readouterr().out
    assert "| sigma | shapes found | of their kind | background right |" in report and "Encoder swap (2 pairs" in report
    assert "Region selectivity at sigma 1 (36 one-shape captions" in report
    assert f"Memorisation (2 steps, CFG {swap['cfg_scale']:g}):" in report
    assert f"| 2 training | {seen['training']['adherence']:.3f} | {seen['training']['pass_rate']:.3f} |" in report
    assert f"| 2 held-out | {seen['held_out']['adherence']:.3f} |" in report

    assert probe.main(["--teacher", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} is not a fidelity teacher (no training/config.json)\n"
    assert probe.main([*argv[:2], "--scenes", "0"]) == 2
    assert capsys.readouterr().err == "error: --scenes must be at least 1, got 0\n"
    assert probe.main([*argv[:2], "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1, got 0\n"
    assert probe.main([*argv[:2], "--cfg-scale", "0.5"]) == 2
    assert capsys.readouterr().err == "error: --cfg-scale must be >= 1 (1: no guidance), got 0.5\n"
    with pytest.raises(SystemExit) as exit_info:  # not a traceback after all the probing
        probe.main([*argv[:2], "--json", str(tmp_path)])
    assert exit_info.value.code == 2 and f"{tmp_path} is a folder; name a file (in it)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pair 0 has one background"):
        a = held_out_scenes(1)[0]
        probe.encoder_swap(load_pipeline(str(smoke_teacher)), [(a, a)], 64, 1, 1.0)


def test_vae_crops_stay_inside_and_half_of_them_hold_a_shape():
    from training.world import sample_scenes

    generator = torch.Generator().manual_seed(0)
    scenes = sample_scenes(200, 0, 3)
    holding = 0
    for scene in scenes:
        y, x = train_teacher._crop_corner(scene, 256, 64, generator)
        assert 0 <= y <= 192 and 0 <= x <= 192
        holding += any(x <= s.center[0] * 256 < x + 64 and y <= s.center[1] * 256 < y + 64 for s in scene.shapes)
    assert 0.5 < holding / len(scenes) < 0.8  # shape-centred half, plus random crops that happen to hold one


def test_stated_cell_weights_mark_the_tokens_of_the_captions_cells():
    def shape(region):
        return {"kind": "circle", "color": "red", "region": region, "size": "small", "center": region_center(region)}

    scenes = [Scene((shape("top left"),), "blue"), Scene((shape("center"), shape("bottom right")), "blue")]
    scenes.append(Scene((shape("top right"),), "blue"))  # off the diagonal: rows are y, columns are x
    weights = train_teacher.stated_cell_weights(scenes, 6, 5.0).view(3, 6, 6)  # 3x3 cells of 2x2 tokens
    stated = torch.zeros(3, 6, 6, dtype=torch.bool)
    stated[0, :2, :2] = stated[1, 2:4, 2:4] = stated[1, 4:, 4:] = stated[2, :2, 4:] = True
    for index in range(3):
        inside, outside = weights[index][stated[index]], weights[index][~stated[index]]
        assert torch.allclose(inside, 5 * outside[0]) and torch.allclose(outside, outside[0])
    assert torch.allclose(weights.mean(dim=(1, 2)), torch.ones(3))
    assert torch.equal(train_teacher.stated_cell_weights(scenes, 6, 1.0), torch.ones(3, 36))
    # 16 tokens do not split into 3 cells: a token belongs to the cell that holds its centre (5 + 6 + 5)
    top_left = train_teacher.stated_cell_weights(scenes[:1], 16, 2.0).view(16, 16)
    assert (top_left[:5, :5] > 1).all() and (top_left[5:, :] < 1).all() and (top_left[:, 5:] < 1).all()


def test_phase_without_a_step_count_fits_its_time_budget(tmp_path):
    calls = []
    phase = train_teacher._Phase("probe", None, seconds=0.0, log=tmp_path / "log.jsonl")
    probe = train_teacher._PROBE_STEPS + 1  # the first step is not timed: it holds the one-off costs
    assert phase.run(lambda i: calls.append(i) or {"loss": 0.0}) == probe
    assert calls == list(range(probe)) and phase.steps == probe


def test_variants_keep_fluxs_radius_to_grid_ratio():
    assert [(v.name, v.window, v.down) for v in run.variants_for(256)] == [
        ("r8", 2, 1),
        ("r16", 4, 1),
        ("r32", 8, 1),
        ("r16_down4", 4, 4),
        ("r8_down4", 2, 4),
    ]
    assert [v.window for v in run.variants_for(1024)] == [8, 16, 32, 16, 8]  # FLUX's own
    assert [v.window for v in run.variants_for(64)] == [1, 1, 2, 1, 1]  # at least one token
    with pytest.raises(ValueError, match="not divisible by down factor 4"):
        run.variants_for(48)


def test_protocol_evaluation_and_report(smoke_teacher, tmp_path):
    pipe = load_pipeline(str(smoke_teacher))
    teacher_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    variants = [v for v in run.variants_for(64) if v.name in ("r16", "r16_down4")]
    weights = {}
    for v in variants:  # stand-ins for distilled students: the training-free weights, written and read back
        with clear_dit.patch(pipe, window_size=v.window, down_factor=v.down):
            weights[v.name] = clear_dit.save_weights(pipe, tmp_path / f"{v.name}.safetensors")
    cfg = run.ProtocolConfig(work=str(tmp_path), **run.SMOKE, cfg_scale=2.0)
    rows, images = run.evaluate(pipe, cfg, 64, variants, weights)

    scales = (1, 2) if importlib.util.find_spec("pipelines.highres") else (1,)
    assert cfg.scales == scales
    assert len(rows) == len(scales) * (1 + 2 * len(variants))
    for k, v in pipe.transformer.state_dict().items():  # every student was undone
        assert torch.equal(v, teacher_state[k]), k
    teacher = rows[0]
    assert teacher["student"] == "teacher" and teacher["psnr"] == 99.0 and teacher["ssim"] == pytest.approx(1.0)
    by_key = {(r["scale"], r["student"], r["variant"]): r for r in rows}
    for v in variants:
        free, distilled = by_key[1, "training-free", v.name], by_key[1, "distilled", v.name]
        assert free["density"] == distilled["density"] < 1
        assert free["psnr"] == distilled["psnr"] and free["ssim"] == distilled["ssim"]  # same weights, same images
        assert images[1, "distilled", v.name][0].size == (64, 64)

    keys = (
        "num_data",
        "distill_steps",
        "distill_lr",
        "eval_steps",
        "cfg_scale",
        "eval_scenes",
        "highres_scenes",
        "scales",
    )
    meta = {"smoke": True, "teacher": str(smoke_teacher), "resolution": 64, "text_len": 128}
    meta |= {k: getattr(cfg, k) for k in (*keys, "grid_rows")}
    paths = run.write_report(rows, images, meta, tmp_path / "results", "r16")
    assert [p.name for p in paths] == ["fidelity_smoke.json", "fidelity_smoke.md", "fidelity_smoke_grid.png"]
    assert json.loads(paths[0].read_text())["rows"] == rows
    table = [line for line in paths[1].read_text().splitlines() if line.startswith("| 1x")]
    assert len(table) == 1 + 2 * len(variants)
    assert f"{cfg.eval_scenes} at 1x, {cfg.highres_scenes} at 2x." in paths[1].read_text()
    assert f"{cfg.eval_scenes} at 1x. Radii" in run._markdown(rows[:1], meta | {"scales": (1,)})
    assert f"held-out scenes: {cfg.highres_scenes} at 2x. Radii" in run._markdown(rows[1:], meta | {"scales": (2,)})
    grid = Image.open(paths[2])
    # one row per scene shown at every scale: the high-res scales evaluate fewer scenes
    shown = min(cfg.grid_rows, cfg.eval_scenes, *(cfg.highres_scenes for s in scales if s > 1))
    assert grid.size == (3 * len(scales) * 256, 16 + shown * 256)


def test_protocol_needs_a_teacher(tmp_path, capsys):
    assert run.main(["--work", str(tmp_path), "--results", str(tmp_path / "results")]) == 2
    assert "no teacher pipeline in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-scenes", "0"], "--eval-scenes must be at least 1, got 0"),
        (["--highres-scenes", "0"], "--highres-scenes must be at least 1, got 0"),
        (["--eval-steps", "0"], "--eval-steps must be at least 1, got 0"),
        (["--num-data", "0"], "--num-data must be at least 1, got 0"),
        (["--distill-lr", "0"], "--distill-lr must be positive and finite, got 0.0"),
        (["--distill-lr", "inf"], "--distill-lr must be positive and finite, got inf"),  # after make-data before
        (["--results", "/proc/version/out"], "--results /proc/version/out: /proc/version is a file, not a folder"),
        (["--variants", "r16", "r99"], r"unknown --variants \['r99'\]; choose from \['r8', 'r16'"),
    ],
)
def test_protocol_refuses_bad_settings_before_any_work(tmp_path, capsys, extra, message):
    teacher = tmp_path / "teacher"  # a teacher's config is all run() reads before the variants are checked
    (teacher / "training").mkdir(parents=True)
    (teacher / "model_index.json").write_text("{}")
    (teacher / "training" / "config.json").write_text(json.dumps({"resolution": 256}))
    results = ["--results", str(tmp_path / "results")]  # not the committed report's folder (extra may name one)
    assert run.main(["--work", str(tmp_path / "work"), "--teacher", str(teacher), *results, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "work" / "data").exists()


def test_protocol_names_a_results_folder_that_cannot_be_reached(tmp_path, capsys, deny_searching):
    """Path.exists raised PermissionError, whose line named neither --results nor what was wrong."""
    (tmp_path / "locked").mkdir()
    deny_searching(tmp_path / "locked")
    results = tmp_path / "locked" / "results"
    assert run.main(["--work", str(tmp_path / "work"), "--results", str(results)]) == 2
    assert capsys.readouterr().err == f"error: --results {results} cannot be reached (Permission denied)\n"


def test_held_out_scenes_are_not_the_teachers_training_scenes():
    """train_teacher draws sample_scenes(num, seed, max_shapes): scoring on those would flatter every student."""
    training = {s.caption for s in sample_scenes(64, 0)}
    held = [s.caption for s in held_out_scenes(32, 0)]
    assert len(set(held) & training) < len(held) // 4


def test_a_distilled_student_gives_the_teacher_its_weights_back(tmp_path):
    """The rows after a distilled student (the next student, the next scale's teacher) run the teacher's weights."""
    from flux_models import tiny_flux_transformer

    teacher = tiny_flux_transformer(tmp_path / "teacher")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distilled = tiny_flux_transformer(tmp_path / "student", seed=7)
    clear_dit.patch(distilled, window_size=2)
    weights = clear_dit.save_weights(distilled, tmp_path / "clear_local_2.safetensors")
    with run.student(SimpleNamespace(transformer=teacher), run.Variant(16, 1, 2), weights):
        assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the student's are in
    assert clear_dit.patch_handle(teacher) is None
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_smoke_protocol_never_deletes_an_unfinished_teacher(tmp_path, capsys):
    teacher = tmp_path / "teacher"  # a teacher run still training: no model_index.json until it ends
    (teacher / "training").mkdir(parents=True)
    (teacher / "training" / "checkpoint-4000.pt").write_bytes(b"an hour of training")
    assert run.main(["--work", str(tmp_path / "work"), "--teacher", str(teacher), "--smoke"]) == 2
    assert "holds no teacher pipeline (no model_index.json) but is not empty" in capsys.readouterr().err
    assert (teacher / "training" / "checkpoint-4000.pt").read_bytes() == b"an hour of training"


def test_protocol_reuses_a_student_only_if_it_was_made_with_its_settings(tmp_path, capsys, monkeypatch):
    cfg = run.ProtocolConfig(work=str(tmp_path / "work"), cfg_scale=3.0)
    (tmp_path / "data").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data").symlink_to(tmp_path / "data")  # the same folder, spelt another way
    variant = run.variants_for(256)[1]
    run_dir = tmp_path / "work" / "runs" / variant.name
    run_dir.mkdir(parents=True)
    exported = run_dir / f"clear_local_{variant.window}.safetensors"
    exported.write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match="no run.json"):
        run.distill(cfg, tmp_path / "teacher", tmp_path / "work" / "data", variant)
    settings = run.distill_settings(cfg, tmp_path / "teacher", tmp_path / "data", variant)
    assert settings["caption_dropout"] == run.CAPTION_DROPOUT and settings["fm_weight"] == 0.0
    (run_dir / "run.json").write_text(json.dumps({"config": settings | {"optimizer": "adamw"}, "data": {}}))
    assert run.distill(cfg, tmp_path / "teacher", tmp_path / "work" / "data", variant) == exported
    other = dataclasses.replace(cfg, distill_lr=2e-4, distill_steps=1000)
    with pytest.raises(FileExistsError, match=r"max_steps 3000 \(protocol: 1000\); lr 0.0005 \(protocol: 0.0002\)"):
        run.distill(other, tmp_path / "teacher", tmp_path / "work" / "data", variant)
    assert exported.read_bytes() == b"weights"  # refused, not overwritten
    grown = dataclasses.replace(cfg, num_data=cfg.num_data + 2)  # make-data grew the set the student was made on
    (run_dir / "run.json").write_text(json.dumps({"config": settings, "data": {"items": cfg.num_data}}))
    assert run.distill(cfg, tmp_path / "teacher", tmp_path / "work" / "data", variant) == exported
    with pytest.raises(FileExistsError, match=f"data items {cfg.num_data} \\(protocol: num_data {grown.num_data}\\)"):
        run.distill(grown, tmp_path / "teacher", tmp_path / "work" / "data", variant)
    # the CLI says so in one line and exits 2 (the teacher's config is all it reads before)
    teacher = tmp_path / "teacher"
    (teacher / "training").mkdir(parents=True)
    (teacher / "model_index.json").write_text("{}")
    (teacher / "training" / "config.json").write_text(json.dumps({"resolution": 256, "cfg_scale": 3.0}))
    monkeypatch.setattr(run, "make_data", lambda cfg, teacher, resolution: tmp_path / "work" / "data")
    monkeypatch.setattr(run, "check_data_size", lambda cfg, data: None)  # of the data step, stubbed above
    argv = ["--work", str(tmp_path / "work"), "--teacher", str(teacher), "--variants", variant.name]
    argv += ["--results", str(tmp_path / "results")]
    assert run.main([*argv, "--distill-lr", "2e-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "lr 0.0005 (protocol: 0.0002)" in err


@pytest.mark.skipif(
    importlib.util.find_spec("training.distill") is None, reason="needs the distillation CLI (branch distill)"
)
def test_protocol_smoke_end_to_end(smoke_teacher, tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--work", str(tmp_path / "work"), "--teacher", str(smoke_teacher), "--smoke", "--results", str(results)]
    assert run.main([*argv, "--distill-lr", "2e-4"]) == 0
    rows = json.loads((results / "fidelity_smoke.json").read_text())["rows"]
    assert {r["student"] for r in rows} == {"teacher", "training-free", "distilled"}
    student = json.loads((tmp_path / "work" / "runs" / "r16" / "run.json").read_text())["config"]
    assert (student["lr"], student["lr_scheduler"], student["max_steps"]) == (
        2e-4,
        "cosine",
        run.SMOKE["distill_steps"],
    )
    assert (results / "fidelity_smoke_grid.png").is_file()
    # a WORK whose data an earlier run made larger (make-data keeps its items): new students would train on all
    assert run.main([*argv, "--num-data", str(run.SMOKE["num_data"] - 1)]) == 2  # its report: --overwrite asked
    assert "fidelity_smoke_grid.png already; pass --overwrite to replace" in capsys.readouterr().err
    assert run.main([*argv, "--num-data", str(run.SMOKE["num_data"] - 1), "--overwrite"]) == 2
    assert "data holds 4 items of an earlier run, not --num-data 3; move it away or pass --num-data 4" in (
        capsys.readouterr().err
    )


def test_timed_draws_follow_an_untimed_one_step_draw(monkeypatch):
    """One-off costs of a configuration's first call are not sampling time (else the teacher, drawn first,
    would be slowed by them and every student's speedup inflated)."""
    calls = []

    def generate(pipe, prompts, seeds, resolution, steps, cfg_scale=1.0):
        calls.append((len(prompts), steps, seeds))
        return [Image.new("RGB", (resolution, resolution))] * len(prompts)

    monkeypatch.setattr(run, "generate", generate)
    cfg = run.ProtocolConfig(work="", eval_steps=5, cfg_scale=1.0)
    images, seconds = run._draw(None, None, cfg, 64, 1, held_out_scenes(3), None, None)
    assert calls == [(1, 1, [0]), (3, 5, [0, 1, 2])] and len(images) == 3 and seconds >= 0  # scene i: seed i

    def highres(prompt, seed, num_inference_steps, **kwargs):  # above 1x: one highres call per scene
        calls.append((prompt, seed, num_inference_steps))
        return dataclasses.make_dataclass("Out", ["images"])([Image.new("RGB", (128, 128))])

    calls.clear()
    monkeypatch.setattr(run, "default_max_sequence_length", lambda pipe: 16)
    scenes = held_out_scenes(3)
    run._draw(None, highres, cfg, 64, 2, scenes, None, None)
    assert calls == [(scenes[0].caption, 0, 1)] + [(s.caption, i, 5) for i, s in enumerate(scenes)]


def test_teacher_out_may_be_a_symbolic_link_to_a_folder(tmp_path):
    target, link = tmp_path / "disk", tmp_path / "teacher"
    target.mkdir()
    link.symlink_to(target)
    assert train_teacher.main(["--out", str(link), "--smoke", "--steps", "1"]) == 0
    assert (target / "model_index.json").is_file()
    assert train_teacher.main(["--out", str(link), "--smoke", "--steps", "1", "--overwrite"]) == 0
    assert link.is_symlink() and (target / "training" / "config.json").is_file()


def test_compare_scores_the_students_images_and_averages_psnr_per_image():
    from benchmarks.fidelity.metrics import psnr, ssim

    scenes = sample_scenes(2, 5)
    renders = [render(scene, 64) for scene in scenes]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in scenes]
    out = run._compare(renders, noise, scenes)  # (student images, reference images, scenes)
    assert out["adherence"] > 0.9  # the renders are checked, not the noise
    assert out["ssim"] == pytest.approx(float(ssim(renders, noise).mean()))
    mixed = run._compare(renders, [renders[0], noise[1]], scenes)  # identical images count 99 dB each
    assert mixed["psnr"] == pytest.approx((99 + float(psnr(renders[1], noise[1])[0])) / 2)


def test_report_rows_print_their_own_numbers():
    common = dict(scale=1, size=64, seconds_per_image=1.0)
    rows = [
        {**common, "student": "teacher", "variant": "full", "window": None, "down": None, "psnr": 99.0,
         "ssim": 1.0, "adherence": 0.5, "pass_rate": 0.25, "density": 1.0, "seconds_per_image": 2.0, "speedup": 1.0},
        {**common, "student": "distilled", "variant": "r16_down4", "window": 1, "down": 4, "psnr": 21.5,
         "ssim": 0.8, "adherence": 0.6, "pass_rate": 0.125, "density": 0.3, "speedup": 2.0},
    ]  # fmt: skip
    meta = {"smoke": False, "teacher": "t", "resolution": 64, "text_len": 40, "num_data": 1, "distill_steps": 1,
            "distill_lr": 1e-4, "eval_steps": 1, "cfg_scale": 1.0, "scales": (1,), "eval_scenes": 2,
            "highres_scenes": 1}  # fmt: skip
    assert "| 1, d=4 | 21.50 | 0.8000 | 0.600 | 0.125 | 0.300 | 1.00 | 2.00 |" in run._markdown(rows, meta)


def test_protocol_evaluation_rows_and_grid_follow_each_variant(monkeypatch, tmp_path):
    """Each row is its own student's: held-out scenes, speedup as teacher time over student time, the density of
    its own down factor, 2x/4x only for --highres-variants; the grid shows the headline variant's images (the
    drawing is faked: one plain colour per configuration, 2 s per teacher image, 0.5 s per student image)."""
    drawn = []
    colours = {}

    def draw(pipe, highres, cfg, resolution, scale, scenes, variant, weights):
        drawn.append((scale, [s.caption for s in scenes], variant and variant.name, weights))
        colour = colours.setdefault((scale, variant and variant.name, weights), (len(colours) * 20, 0, 0))
        return [Image.new("RGB", (resolution * scale,) * 2, colour)] * len(scenes), 2.0 if variant is None else 0.5

    import pipelines.highres

    monkeypatch.setattr(run, "_draw", draw)
    monkeypatch.setattr(run, "student", lambda pipe, variant, weights: contextlib.nullcontext())
    monkeypatch.setattr(run, "default_max_sequence_length", lambda pipe: 16)
    monkeypatch.setattr(pipelines.highres.HighResFluxPipeline, "from_pipe", classmethod(lambda cls, pipe: "highres"))
    variants = [v for v in run.variants_for(64) if v.name in ("r8", "r16", "r16_down4")]
    weights = {v.name: tmp_path / f"{v.name}.safetensors" for v in variants}
    cfg = run.ProtocolConfig(work="", eval_scenes=3, highres_scenes=2, scales=(1, 2), highres_variants=("r16",))
    cfg.cfg_scale = 1.0
    rows, images = run.evaluate(None, cfg, 64, variants, weights)

    held_out = [s.caption for s in held_out_scenes(3)]
    assert all(captions == held_out[: 3 if scale == 1 else 2] for scale, captions, _, _ in drawn)
    by_key = {(r["scale"], r["student"], r["variant"]): r for r in rows}
    assert {(scale, name) for scale, _, name in by_key if scale == 2} == {(2, "full"), (2, "r16")}
    for (scale, student, _), row in by_key.items():
        assert row["speedup"] == (1.0 if student == "teacher" else 4.0)
        if student != "teacher":
            grid = 64 * scale // 16
            assert row["density"] == clear_dit.attention_density((grid, grid), 16, row["window"], row["down"])
    down4 = by_key[1, "distilled", "r16_down4"]
    assert down4["down"] == 4 and down4["density"] != clear_dit.attention_density((4, 4), 16, down4["window"], 1)

    meta = dataclasses.asdict(cfg) | {"teacher": "t", "resolution": 64, "text_len": 16}
    grid_png = run.write_report(rows, images, meta, tmp_path / "results", "r16")[2]
    grid = Image.open(grid_png).convert("RGB")
    expected = [
        colours[scale, name, path]
        for scale in (1, 2)
        for name, path in ((None, None), ("r16", None), ("r16", weights["r16"]))
    ]
    assert [grid.getpixel((j * 256 + 128, 16 + 128)) for j in range(6)] == expected
    assert run.parse_args(["--work", "w", "--highres-variants", "r16"]).highres_variants == ("r16",)


def test_protocol_refuses_a_student_made_on_more_data_or_another_seed(tmp_path):
    """A student distilled on a larger set (make-data grew it, then a smaller --num-data was asked) or from
    another seed was made with other settings than the protocol's, and would be reported as its."""
    cfg = run.ProtocolConfig(work=str(tmp_path / "work"), cfg_scale=1.0, num_data=8)
    variant = run.variants_for(256)[1]
    run_dir = tmp_path / "work" / "runs" / variant.name
    run_dir.mkdir(parents=True)
    (run_dir / f"clear_local_{variant.window}.safetensors").write_bytes(b"weights")
    settings = run.distill_settings(cfg, tmp_path / "teacher", tmp_path / "data", variant)
    assert settings["seed"] == cfg.seed
    (run_dir / "run.json").write_text(json.dumps({"config": settings, "data": {"items": 10}}))
    with pytest.raises(FileExistsError, match=r"data items 10 \(protocol: num_data 8\)"):
        run.distill(cfg, tmp_path / "teacher", tmp_path / "data", variant)
    (run_dir / "run.json").write_text(json.dumps({"config": settings | {"seed": 1}, "data": {"items": 8}}))
    with pytest.raises(FileExistsError, match=r"seed 1 \(protocol: 0\)"):
        run.distill(cfg, tmp_path / "teacher", tmp_path / "data", variant)


def test_protocol_resumes_an_interrupted_distillation_with_its_settings(tmp_path, monkeypatch):
    """An interrupted student (logs, no exported weights) is resumed, not started over into the same folder;
    every setting, the seed included, reaches the CLI."""
    calls = []
    cfg = run.ProtocolConfig(work=str(tmp_path / "work"), cfg_scale=1.0, seed=3)
    variant = run.variants_for(256)[3]  # r16_down4
    run_dir = tmp_path / "work" / "runs" / variant.name
    exported = run_dir / f"clear_local_{variant.window}_down_4.safetensors"

    def run_cli(*args):
        calls.append(args)
        exported.write_bytes(b"weights")

    monkeypatch.setattr(run, "run_cli", run_cli)
    (run_dir / "logs").mkdir(parents=True)
    assert run.distill(cfg, tmp_path / "teacher", tmp_path / "data", variant) == exported
    args = list(calls[0])
    assert args[0] == "distill" and args[args.index("--resume") + 1] == "latest"
    assert args[args.index("--seed") + 1] == "3" and args[args.index("--down") + 1] == "4"
    assert args[args.index("--out") + 1] == str(run_dir)

    calls.clear()
    exported.unlink()
    (run_dir / "logs").rmdir()
    run.distill(cfg, tmp_path / "teacher", tmp_path / "data", variant)
    assert "--resume" not in calls[0]  # a fresh student starts afresh


def test_protocol_distills_on_prompts_apart_from_the_teachers_captions(tmp_path, monkeypatch):
    """The distillation set's prompts are neither the teacher's training captions nor the held-out ones: a
    student distilled on either would be judged on what it was fitted to."""
    calls = []
    monkeypatch.setattr(run, "run_cli", lambda *args: calls.append(args))
    cfg = run.ProtocolConfig(work=str(tmp_path), num_data=16, cfg_scale=1.0)
    assert run.make_data(cfg, tmp_path / "teacher", 64) == tmp_path / "data"
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 16 and calls[0][0] == "make-data"
    teacher = {s.caption for s in sample_scenes(16, cfg.seed)} | {s.caption for s in held_out_scenes(16, cfg.seed)}
    assert len(set(prompts) & teacher) < 4  # a few short captions may recur by chance, not the whole list


def test_encoder_swap_tells_which_encoder_the_background_follows(monkeypatch):
    """The sample gets the T5 embeddings of the pair's first caption and the pooled CLIP vector of its second:
    a teacher that reads the background through T5 scores "t5", one that reads it through CLIP "clip"."""
    monkeypatch.setattr(probe, "tokenize_captions", lambda pipe, captions: (captions, captions))
    monkeypatch.setattr(probe, "embed_ids", lambda pipe, clip, t5: (list(t5), list(clip)))  # the captions stand in
    pairs = probe.swap_pairs(held_out_scenes(8))
    scenes = {s.caption: s for pair in pairs for s in pair}

    def teacher(reads):
        def pipe(prompt_embeds, pooled_prompt_embeds, height, **kwargs):
            (caption,) = prompt_embeds if reads == "t5" else pooled_prompt_embeds
            return dataclasses.make_dataclass("Out", ["images"])([render(scenes[caption], height)])

        return pipe

    assert pairs and probe.encoder_swap(teacher("t5"), pairs, 64, 1, 2.0) == ["t5"] * len(pairs)
    assert probe.encoder_swap(teacher("clip"), pairs, 64, 1, 2.0) == ["clip"] * len(pairs)


def test_region_selectivity_compares_the_stated_cell_with_the_eight_others(monkeypatch):
    """A teacher whose mean image is the caption's render paints its stated cell and no other: 1 and 0."""
    monkeypatch.setattr(
        probe,
        "one_step_predictions",
        lambda pipe, scenes, sigmas, resolution, seed: {1.0: [render(s, resolution) for s in scenes]},
    )
    result = probe.region_selectivity(None, 96)
    assert result["captions"] == 36 and result["stated_cell"] == pytest.approx(1, abs=0.02)
    assert result["other_cells"] == pytest.approx(0, abs=1e-9)
    assert result["selectivity"] == pytest.approx(result["stated_cell"])


def test_teacher_evaluation_scores_samples_and_vae_apart_on_held_out_scenes(tmp_path, monkeypatch):
    """The pass rate is the samples', the VAE's PSNR is on [0, 1] images as every other PSNR here, and both are
    measured on held-out scenes (a faked teacher: its samples are the renders, its VAE decodes to black)."""
    from types import SimpleNamespace

    from diffusers.image_processor import VaeImageProcessor

    import pipelines.loading
    from benchmarks.fidelity.metrics import psnr

    cfg = train_teacher.parse_args(["--out", str(tmp_path), "--smoke", "--eval-scenes", "3", "--resolution", "128"])
    (tmp_path / "training").mkdir()
    vae = SimpleNamespace(
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
        decode=lambda z: SimpleNamespace(sample=-torch.ones_like(z)),
    )
    pipe = SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(), device=torch.device("cpu"))
    pipe.to = lambda device: pipe
    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda folder: pipe)
    scenes = {s.caption: s for s in held_out_scenes(cfg.eval_scenes, cfg.seed, cfg.max_shapes)}
    first = next(iter(scenes.values()))
    wrong = next(c for c in PALETTE if c not in (first.background, *(s.color for s in first.shapes)))
    drawn = {**scenes, first.caption: dataclasses.replace(first, background=wrong)}  # the first sample fails
    monkeypatch.setattr(
        train_teacher,
        "generate",
        lambda pipe, prompts, seeds, resolution, steps, cfg_scale: [render(drawn[p], resolution) for p in prompts],
    )
    summary = train_teacher.evaluate(tmp_path, cfg)
    assert [s["caption"] for s in summary["scenes"]] == list(scenes)
    assert summary["pass_rate"] == pytest.approx(2 / 3) and 2 / 3 < summary["adherence"] < 1  # passed, not scored
    assert summary["vae_adherence"] < 0.5  # the samples' adherence, not the VAE's
    renders = [render(s, cfg.resolution) for s in scenes.values()]
    black = [Image.new("RGB", image.size) for image in renders]
    assert summary["vae_psnr"] == pytest.approx(float(psnr(black, renders).mean()), abs=1e-6)


def test_compare_reports_the_fraction_of_passed_scenes_beside_the_mean_score():
    from benchmarks.fidelity.checker import check_scene

    scenes = sample_scenes(2, 5)
    renders = [render(s, 64) for s in scenes]
    other = "red" if scenes[1].background != "red" else "blue"
    stated = [scenes[0], dataclasses.replace(scenes[1], background=other)]  # the second image fails its scene
    out = run._compare(renders, renders, stated)
    checks = [check_scene(i, s) for i, s in zip(renders, stated, strict=True)]
    assert out["pass_rate"] == np.mean([c.passed for c in checks]) == 0.5
    assert out["adherence"] == np.mean([c.score for c in checks]) > 0.5


def _evaluate_r16_on_three_scenes(monkeypatch, draw) -> list[dict]:
    """``run.evaluate``'s rows (teacher, then the training-free r16 student) at 1x on 3 scenes drawn by ``draw``."""
    monkeypatch.setattr(run, "_draw", draw)
    monkeypatch.setattr(run, "student", lambda pipe, variant, weights: contextlib.nullcontext())
    monkeypatch.setattr(run, "default_max_sequence_length", lambda pipe: 16)
    variants = [v for v in run.variants_for(128) if v.name == "r16"]
    cfg = run.ProtocolConfig(work="", eval_scenes=3, scales=(1,), cfg_scale=1.0)
    return run.evaluate(None, cfg, 128, variants, {})[0]


def test_evaluate_checks_each_image_against_its_own_scene(monkeypatch):
    """Flat-colour images (the other evaluate test) score alike against any scene: renders do not."""

    def draw(pipe, highres, cfg, resolution, scale, scenes, variant, weights):
        return [render(s, resolution * scale) for s in scenes], 1.0

    rows = _evaluate_r16_on_three_scenes(monkeypatch, draw)
    assert [r["adherence"] for r in rows] == [1.0, 1.0]


def test_the_warm_up_draw_is_not_timed(monkeypatch):
    def generate(pipe, prompts, seeds, resolution, steps, cfg_scale=1.0):
        if steps == 1:  # the warm-up: one-off costs
            time.sleep(0.5)
        return [Image.new("RGB", (resolution, resolution))] * len(prompts)

    monkeypatch.setattr(run, "generate", generate)
    cfg = run.ProtocolConfig(work="", eval_steps=5, cfg_scale=1.0)
    _, seconds = run._draw(None, None, cfg, 64, 1, held_out_scenes(2), None, None)
    assert seconds < 0.1


def test_variants_round_to_the_nearest_radius():
    assert [v.window for v in run.variants_for(192)] == [2, 3, 6, 3, 2]  # a 12 x 12 grid: r8 -> 1.5 -> 2


def test_seconds_per_image_is_the_timed_draw_over_all_its_images(monkeypatch):
    import types

    clock = iter([10.0, 18.0])  # the timed draw of 4 images takes 8 s
    monkeypatch.setattr(run, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(run, "generate", lambda pipe, prompts, seeds, res, steps, cfg_scale=1.0:
                        [Image.new("RGB", (res, res))] * len(prompts))  # fmt: skip
    cfg = run.ProtocolConfig(work="", eval_steps=5, cfg_scale=1.0)
    _, seconds = run._draw(None, None, cfg, 64, 1, held_out_scenes(4), None, None)
    assert seconds == 2.0


def test_pass_rate_counts_only_scenes_with_every_item_right():
    from benchmarks.fidelity.checker import check_scene

    scenes = sample_scenes(2, 5)
    renders = [render(s, 64) for s in scenes]
    shape = scenes[0].shapes[0]
    wrong = dataclasses.replace(shape, size="small" if shape.size == "large" else "large")
    stated = [dataclasses.replace(scenes[0], shapes=(wrong, *scenes[0].shapes[1:])), scenes[1]]
    check = check_scene(renders[0], stated[0])
    assert not check.passed and check.score > 0.5  # most items right, the stated size wrong
    assert run._compare(renders, renders, stated)["pass_rate"] == 0.5


def test_a_results_path_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    report = tmp_path / "fidelity.json"
    report.write_text("{}")
    assert run.main(["--work", str(tmp_path / "work"), "--results", str(report)]) == 2
    assert capsys.readouterr().err == f"error: --results {report}: {report} is a file, not a folder\n"
    assert not (tmp_path / "work").exists() and report.read_text() == "{}"


def test_the_probe_writes_its_json_whole(tmp_path, monkeypatch):
    """A run stopped while writing (a full disk) keeps the results that were there."""
    from pathlib import Path

    old = tmp_path / "probe.json"
    old.write_text('{"old": 1}')
    monkeypatch.setattr(probe, "probe", lambda *a: {"new": 2})
    monkeypatch.setattr(probe, "format_report", lambda result: "report")
    write_text = Path.write_text

    def full_disk(path, text):
        write_text(path, text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        probe.main(["--teacher", str(tmp_path), "--json", str(old), "--overwrite"])
    assert old.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["probe.json"]


@pytest.mark.parametrize("smoke", [False, True])
def test_a_results_folder_holding_a_report_needs_overwrite(tmp_path, capsys, smoke):
    """The default --results holds the committed report: the README's full-run command replaced it unasked."""
    results = tmp_path / "results"
    results.mkdir()
    stem = "fidelity_smoke" if smoke else "fidelity"
    (results / f"{stem}.md").write_text("mine")
    argv = ["--work", str(tmp_path / "work"), "--results", str(results)] + (["--smoke"] if smoke else [])
    assert run.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --results {results} holds {stem}.md already; pass --overwrite to replace\n"
    )
    assert not (tmp_path / "work").exists() and (results / f"{stem}.md").read_text() == "mine"
    run.parse_args([*argv, "--overwrite"]).check()  # asked: taken


def test_a_work_folder_below_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    argv = ["--work", str(tmp_path / "afile" / "sub"), "--smoke", "--results", str(tmp_path / "res")]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Not a directory" in err and err.count("\n") == 1


def test_student_rows_score_the_students_images_not_the_teachers(monkeypatch):
    """The teacher draws flat grey (adherence < 1), each student the scene's render (adherence 1): a student row
    scored on the teacher's images would report the teacher's adherence (PSNR and SSIM are symmetric)."""

    def draw(pipe, highres, cfg, resolution, scale, scenes, variant, weights):
        if variant is None:
            return [Image.new("RGB", (resolution * scale,) * 2, (128, 128, 128)) for _ in scenes], 1.0
        return [render(s, resolution * scale) for s in scenes], 1.0

    rows = _evaluate_r16_on_three_scenes(monkeypatch, draw)
    assert rows[0]["adherence"] < 1.0
    assert rows[1]["student"] == "training-free" and rows[1]["adherence"] == 1.0 and rows[1]["pass_rate"] == 1.0


def test_the_highres_reference_window_covers_the_whole_grid(monkeypatch):
    """At 2x/4x the teacher row is labelled full attention (density 1): its CLEAR window must cover the grid."""
    seen = []

    def highres(prompt, seed, num_inference_steps, window_size, down_factor, **kwargs):
        seen.append((window_size, down_factor))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    monkeypatch.setattr(run, "default_max_sequence_length", lambda pipe: 16)
    cfg = run.ProtocolConfig(work="", eval_steps=1, cfg_scale=1.0)
    for scale in (2, 4):
        seen.clear()
        run._draw(None, highres, cfg, 256, scale, held_out_scenes(1), None, None)
        grid = 256 * scale // 16
        assert seen and all(clear_dit.attention_density((grid, grid), 16, w, d) == 1.0 for w, d in seen), seen


def test_one_step_prediction_of_an_oracle_teacher_is_the_clean_latent(monkeypatch):
    """A teacher whose velocity is exactly noise - latent (the flow x = (1 - s) x0 + s noise) predicts x0 at every
    sigma: the probe must decode x_sigma - sigma * v."""
    latents = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(0))
    decoded = []
    vae = SimpleNamespace(
        config=SimpleNamespace(shift_factor=0.0, scaling_factor=1.0),
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=latents)),
        decode=lambda z: decoded.append(z.clone()) or SimpleNamespace(sample=z),
    )
    pipe = SimpleNamespace(
        vae=vae, transformer=None, vae_scale_factor=8, _unpack_latents=lambda flow, h, w, f: flow,
        image_processor=SimpleNamespace(postprocess=lambda x: x),
    )  # fmt: skip
    monkeypatch.setattr(probe, "render_batch", lambda scenes, resolution: None)
    monkeypatch.setattr(probe, "tokenize_captions", lambda pipe, captions: (None, None))
    monkeypatch.setattr(probe, "embed_ids", lambda pipe, clip, t5: (None, None))
    monkeypatch.setattr(probe, "predict_velocity", lambda transformer, noisy, levels, e, p: noise - latents)
    probe.one_step_predictions(pipe, held_out_scenes(2), [0.0, 0.5, 1.0], 64)
    assert len(decoded) == 3
    for z in decoded:
        torch.testing.assert_close(z, latents, atol=1e-6, rtol=0)


def test_kind_right_counts_only_shapes_found_with_their_stated_kind():
    from benchmarks.fidelity.checker import SceneCheck, ShapeCheck
    from training.world import Shape

    shape = Shape("circle", "red", "center", "large", (0.5, 0.5))
    found = (ShapeCheck(shape, True, "square", "large"), ShapeCheck(shape, True, "circle", "small"))
    assert probe._shares([SceneCheck(found, "blue", True, 0)]) == {
        "shapes_found": 1.0,
        "kind_right": 0.5,
        "background_ok": 1.0,
    }


def test_the_grid_shows_at_most_grid_rows_scenes(tmp_path):
    images = {
        (1, "teacher", ""): [Image.new("RGB", (16, 16))] * 3,
        (1, "training-free", "r16"): [Image.new("RGB", (16, 16))] * 3,
    }
    row = dict(scale=1, size=16, student="teacher", variant="full", window=None, down=None, psnr=99.0, ssim=1.0)
    row |= dict(adherence=0.0, pass_rate=0.0, density=1.0, seconds_per_image=1.0, speedup=1.0)
    meta = dict(smoke=True, teacher="t", resolution=16, text_len=16, num_data=1, distill_steps=1, distill_lr=1e-4)
    meta |= dict(eval_steps=1, cfg_scale=1.0, scales=(1,), eval_scenes=3, highres_scenes=1, grid_rows=1)
    grid = run.write_report([row], images, meta, tmp_path, "r16")[2]
    with Image.open(grid) as image:
        assert image.size == (2 * 256, 16 + 256)


@pytest.mark.parametrize("held", ["fidelity.json", "fidelity.md", "fidelity_grid.png"])
def test_any_one_report_file_held_needs_overwrite(tmp_path, held):
    (tmp_path / held).write_text("mine")
    cfg = run.ProtocolConfig(work=str(tmp_path / "work"), results=str(tmp_path))
    with pytest.raises(ValueError, match=f"holds {held} already; pass --overwrite"):
        cfg.check()
    dataclasses.replace(cfg, overwrite=True).check()
