"""The distillation trainer on the tiny FLUX model: what trains, what stays, resume, export, errors."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from PIL import Image
from pipeline_models import transformer_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import clear_dit
from app import launch
from app.cli import main
from app.launch import WORLD_SIZE_VARIABLES, alone_under_cpu_launch, requested_processes
from clear_dit.weights import is_clear_key
from training.data import DistillDataset, generate_dataset
from training.distill import (
    RUN_FILE,
    TRAINABLE_FILE,
    DistillConfig,
    Distiller,
    SampleStream,
    TrainState,
    check_run,
    latest_checkpoint,
    make_batch,
    train,
)
from training.losses import TimestepSampler, distill_losses, weighted_mse
from training.student import Student

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_pipeline_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = tmp_path_factory.mktemp("distill") / "data"
    prompts = ["a red circle", "a blue square", "a cup of coffee", "a mountain lake", "a city street at night"]
    return generate_dataset(pipe, prompts, out, resolution=64, num=6, steps=2, batch_size=3, model_name="tiny")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models step fastest on one thread (on a busy machine, two threads mostly wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def fresh_transformer(tiny_pipeline_path):
    return lambda: FluxTransformer2DModel.from_pretrained(tiny_pipeline_path, subfolder="transformer").eval()


def a_second_later() -> None:
    """Wait for the next wall-clock second before a resume: tensorboard reads event files in name order, whose
    first field is the second each was made in, then pid and a per-process counter compared as text ('10' before
    '9'); a real restart after a kill comes seconds later, in another process."""
    time.sleep(1.01 - time.time() % 1)


def config(tmp_path, data_dir, name="run", **overrides) -> DistillConfig:
    settings = dict(
        model="tiny",
        data=str(data_dir),
        out=str(tmp_path / name),
        window=1,
        max_steps=3,
        batch_size=2,
        lr=1e-3,
        checkpoint_every=0,
        validate_every=0,
        num_validation=2,
        validation_images=False,
    )
    return DistillConfig(**{**settings, **overrides})


def train_killed_in(method: str, step: int, cfg: DistillConfig, monkeypatch) -> None:
    """Run ``cfg`` until ``Distiller.<method>`` is called at ``step``: a KeyboardInterrupt (a kill) stops it there."""
    original = getattr(Distiller, method)

    def killed(self, *args):
        if self.state.step == step:
            raise KeyboardInterrupt
        return original(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(Distiller, method, killed)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)


def held_out_inputs(distiller: Distiller) -> dict:
    ds = distiller.dataset
    batch = make_batch(
        [ds[4], ds[5]],
        [torch.Generator().manual_seed(i) for i in range(2)],
        distiller.sampler,
        ds.info,
        distiller.guidance,
        torch.device("cpu"),
        torch.float32,
    )
    return batch.inputs


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def test_timesteps_and_weighting_follow_diffusers_flux_script(tiny_pipeline_path):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_pipeline_path, subfolder="scheduler")
    sampler = TimestepSampler(scheduler.sigmas, "logit_normal")
    u = torch.tensor([0.0, 0.3, 0.999])
    indices = (u * scheduler.config.num_train_timesteps).long()
    # train_dreambooth_flux.py: timesteps = scheduler.timesteps[indices]; the model gets timesteps / 1000
    torch.testing.assert_close(sampler.from_uniform(u), scheduler.timesteps[indices] / 1000)
    assert TimestepSampler(scheduler.sigmas, "sigma_sqrt").weighting(torch.tensor([0.5])).item() == 4.0
    assert TimestepSampler(scheduler.sigmas, "sigma_sqrt").weighting(torch.tensor([0.2])).item() == pytest.approx(25)
    cosmap = TimestepSampler(scheduler.sigmas, "cosmap").weighting(torch.tensor([0.2]))  # 2 / (pi (1 - 2s + 2s^2))
    assert cosmap.item() == pytest.approx(2 / (math.pi * (1 - 0.4 + 0.08)))
    with pytest.raises(ValueError, match="unknown weighting scheme"):
        TimestepSampler(scheduler.sigmas, "uniform")

    g = torch.Generator().manual_seed(0)
    pred, target, teacher = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    w = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(weighted_mse(pred, target, w), ((pred - target) ** 2).mean((1, 2)) * w)
    attn_s, attn_t = [torch.randn(2, 5, 6, generator=g) for _ in range(2)], [torch.randn(2, 5, 6, generator=g)] * 2
    losses = distill_losses(pred, teacher, target, attn_s, attn_t, w, out_weight=0.5, attn_weight=0.25)
    attn = (weighted_mse(attn_s[0], attn_t[0], w) + weighted_mse(attn_s[1], attn_t[1], w)) / 2
    expected = weighted_mse(pred, target, w) + 0.5 * weighted_mse(pred, teacher, w) + 0.25 * attn
    torch.testing.assert_close(losses.total, expected.mean())


@pytest.mark.parametrize("lora_rank, down", [(None, 1), (2, 2)])
def test_only_trainable_tensors_change_and_the_teacher_stays(tmp_path, data_dir, fresh_transformer, lora_rank, down):
    cfg = config(tmp_path, data_dir, window=1, down=down, lora_rank=lora_rank, validation_images=lora_rank is None)
    cfg.num_validation = 1
    distiller = Distiller(cfg)
    student = distiller.student
    teacher_before = fresh_transformer()
    inputs = held_out_inputs(distiller)
    with torch.no_grad():
        untrained = forward(student.transformer, inputs)
    trainable = {name for name, p in student.transformer.named_parameters() if p.requires_grad}
    assert trainable == set(student.trainable)  # the base model is frozen: no gradients kept for it
    distiller.fit()
    assert all(p.grad is None for name, p in student.transformer.named_parameters() if name not in trainable)

    reference = forward(teacher_before, inputs)
    with student.teacher() as teacher:
        torch.testing.assert_close(forward(teacher, inputs), reference, atol=0, rtol=0)  # bit for bit
    trained = forward(student.transformer, inputs)
    assert (trained - untrained).abs().max() > 1e-6

    before = teacher_before.state_dict()
    after = {name.replace(".base_layer", ""): t for name, t in student.transformer.state_dict().items()}
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    if lora_rank is None:  # exactly the attention projections
        assert changed == {name for name in before if is_clear_key(name)}
    else:  # nothing of the base model: the adapter (and the pooling weights) hold the change
        assert changed == set()
        assert all(".lora_" in name or "spatial_weight" in name for name in student.trainable)
        assert all(after[name].abs().max() > 0 for name in after if ".lora_B." in name)  # initialised to 0
    if down > 1:
        assert all(not torch.equal(t, torch.full_like(t, 1 / down**2)) for n, t in after.items() if "spatial" in n)

    # The export (LoRA merged) reproduces the student in a fresh model loaded the way users load it.
    path = distiller.export()
    assert path.name == ("clear_local_1.safetensors" if down == 1 else "clear_local_1_down_2.safetensors")
    # The published key layout (diffusers' names, DESIGN.md 1.2) with our metadata.
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        spatial = {k: tuple(f.get_slice(k).get_shape()) for k in keys if k.endswith("spatial_weight")}
    assert {k for k in keys if not k.endswith("spatial_weight")} == {name for name in before if is_clear_key(name)}
    assert set(spatial.values()) == ({(1, 1, 1, 2, 1, 2, 1)} if down > 1 else set())
    assert len(spatial) == (3 if down > 1 else 0)  # one per attention layer of the tiny model
    assert (metadata["window_size"], metadata["down_factor"]) == ("1", str(down))
    assert metadata["base_model"] == "tiny"  # the teacher it was distilled from (--model), not just its class
    exported = forward(student.transformer, inputs)
    torch.testing.assert_close(exported, trained, atol=1e-5, rtol=1e-5)
    fresh = fresh_transformer()
    clear_dit.load_weights(fresh, path)
    torch.testing.assert_close(forward(fresh, inputs), exported, atol=0, rtol=0)
    if lora_rank is None:  # and the command line takes it
        args = ["generate", "--prompt", "a cup", "--weights", str(path), "--height", "64", "--width", "64"]
        assert main([*args, "--steps", "1", "--out", str(tmp_path / "student.png")]) == 0

    logs = [json.loads(line) for line in (tmp_path / "run/logs/train.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2, 3]
    assert {"loss", "loss_fm", "loss_out", "loss_attn", "lr", "grad_norm", "samples_per_s"} <= set(logs[0])
    gaps = [json.loads(line) for line in (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gaps] == [0, 3] and gaps[0]["val_gap"] > 0
    assert (tmp_path / "run/validation/step-000003.png").is_file() == (lora_rank is None)
    if lora_rank is None:  # teacher | student, one row per held-out prompt, each at the data's 64 px
        with Image.open(tmp_path / "run/validation/step-000003.png") as grid:
            assert grid.size == (2 * 64, 64)


def test_lora_initialisation_is_a_function_of_the_seed(fresh_transformer):
    def lora_a(seed: int) -> torch.Tensor:
        transformer = fresh_transformer()
        torch.manual_seed(1000 + seed * 7)  # whatever state the global generator is in
        state = torch.random.get_rng_state()
        student = Student(transformer, window_size=1, lora_rank=2, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
        return torch.cat([p.detach().flatten() for n, p in student.trainable.items() if ".lora_A." in n])

    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    torch.manual_seed(5)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_an_exception_inside_the_teacher_block_gives_the_student_back(fresh_transformer, lora_rank):
    """An OOM or a Ctrl-C while the teacher runs must not leave the teacher's weights and processors in the student."""
    student = Student(fresh_transformer(), window_size=1, down_factor=2, lora_rank=lora_rank)
    with torch.no_grad():  # as after training: the student's tensors differ from the teacher's
        for p in student.trainable.values():
            p.add_(0.01)
    inputs = transformer_inputs(student.transformer, (4, 4), text_len=8)
    before = forward(student.transformer, inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with student.teacher() as teacher:
            forward(teacher, inputs)
            raise RuntimeError("inside the teacher block")
    torch.testing.assert_close(forward(student.transformer, inputs), before, atol=0, rtol=0)


def test_attention_layers_are_hooked_once_each_in_execution_order(fresh_transformer):
    student = Student(fresh_transformer(), window_size=1, attn_layers=[2, 0, -1])  # 2 and -1: the same layer
    assert student.capture.names == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    with student.capture.recording() as outputs:
        forward(student.transformer, transformer_inputs(student.transformer, (4, 4), text_len=8))
    assert len(outputs) == 2


def test_gradient_checkpointing_recompute_adds_nothing_to_a_recording(fresh_transformer):
    transformer = fresh_transformer()
    transformer.enable_gradient_checkpointing()
    transformer.train()
    student = Student(transformer, window_size=1)
    inputs = transformer_inputs(transformer, (4, 4), text_len=8)
    with student.capture.recording() as outputs:
        velocity = student.transformer(**inputs)[0]
    assert len(outputs) == 3
    (velocity.square().mean() + sum(o.square().mean() for o in outputs)).backward()  # recomputes every block
    assert len(outputs) == 3
    forward(student.transformer, inputs)  # outside recording: nothing is kept
    assert student.capture._outputs is None


def test_the_shared_teacher_of_an_upcast_student_keeps_its_storage_dtype(fresh_transformer):
    """The frozen copy is taken before the fp32 upcast: bf16 memory, and the bf16 model without autocast too."""
    reference_model = fresh_transformer().bfloat16()
    inputs = transformer_inputs(reference_model, (4, 4), text_len=8)
    floating = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point() and k != "guidance"]
    inputs.update({k: inputs[k].bfloat16() for k in floating})
    reference = forward(reference_model, inputs)
    student = Student(fresh_transformer().bfloat16(), window_size=1, trainable_dtype=torch.float32)
    assert {p.dtype for p in student.trainable.values()} == {torch.float32}
    with student.teacher() as teacher:
        torch.testing.assert_close(forward(teacher, inputs), reference, atol=0, rtol=0)


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (its mixed precision included);
    reset it around a test that needs another, as accelerate's own AccelerateTestCase does."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_trains_fp32_master_weights_and_keeps_the_bf16_teacher(
    tmp_path, data_dir, fresh_transformer, fresh_accelerate_state
):
    distiller = Distiller(config(tmp_path, data_dir, mixed_precision="bf16", max_steps=2, num_validation=1))
    student = distiller.student
    assert {p.dtype for p in student.trainable.values()} == {torch.float32}
    frozen = {p.dtype for name, p in student.transformer.named_parameters() if name not in student.trainable}
    assert frozen == {torch.bfloat16}
    inputs = held_out_inputs(distiller)
    inputs = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "guidance" else v
              for k, v in inputs.items()}  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's prepared forward runs (outputs in fp32)
        reference = forward(fresh_transformer().bfloat16(), inputs).float()
    before = {k: v.clone() for k, v in student.trainable_state_dict().items()}
    distiller.fit()
    assert all(not torch.equal(before[k], v) for k, v in student.trainable_state_dict().items())
    with student.teacher() as teacher:
        torch.testing.assert_close(forward(teacher, inputs), reference, atol=0, rtol=0)
    logs = [json.loads(line) for line in (tmp_path / "run/logs/train.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in logs)


def test_attention_alignment_layers_and_guidance(tmp_path, data_dir):
    distiller = Distiller(config(tmp_path, data_dir, attn_layers=[0, -1], guidance=2.0, max_steps=1))
    assert distiller.student.capture.names == ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    inputs = held_out_inputs(distiller)
    assert inputs["guidance"].tolist() == [2.0, 2.0]  # the tiny teacher is guidance-distilled (guidance_embeds)
    with distiller.student.capture.recording() as outputs:
        forward(distiller.student.transformer, inputs)
    assert [tuple(o.shape) for o in outputs] == [(2, 64 + 16, 128)] * 2  # (batch, text + image tokens, 2 heads x 64)
    other = forward(distiller.student.transformer, {**inputs, "guidance": torch.full((2,), 3.5)})
    assert not torch.equal(other, forward(distiller.student.transformer, inputs))

    no_attn = Distiller(config(tmp_path, data_dir, "run2", attn_layers=[], max_steps=1, num_validation=0))
    no_attn.fit()
    (log,) = [json.loads(line) for line in (tmp_path / "run2/logs/train.jsonl").read_text().splitlines()]
    assert log["loss_attn"] == 0 and log["loss"] == pytest.approx(log["loss_fm"] + 0.5 * log["loss_out"])
    with pytest.raises(ValueError, match=r"attention layers \[3\] out of range: the model has 3"):
        Distiller(config(tmp_path, data_dir, "run3", attn_layers=[3]))


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, data_dir, monkeypatch):
    settings = dict(
        max_steps=4, checkpoint_every=2, keep_checkpoints=1, lr_scheduler="linear", grad_accum=2, batch_size=1
    )
    settings.update(num_validation=0)
    full = train(config(tmp_path, data_dir, "full", **settings))

    train_killed_in("train_step", 3, config(tmp_path, data_dir, "resumed", **settings), monkeypatch)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(FileExistsError, match="holds a distillation run; pass --resume latest to continue it or"):
        train(config(tmp_path, data_dir, "resumed", **settings))
    a_second_later()
    resumed = train(config(tmp_path, data_dir, "resumed", resume="latest", **settings))

    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in path.read_text().splitlines()]
        for path in (tmp_path / "full/logs/train.jsonl", tmp_path / "resumed/logs/train.jsonl")
    ]
    assert [e["step"] for e in logs[1]] == [1, 2, 3, 4] and logs[0] == logs[1]  # step 3 logged once, same losses
    assert [e["lr"] for e in logs[0]] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])  # --lr-scheduler linear
    # tensorboard: the resumed attempt's event file purges the killed attempt's step 3 for readers
    assert len(list((tmp_path / "resumed/logs/distill").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(tmp_path / "resumed/logs/distill"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [
        (e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in logs[0]
    ]
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-4"]  # keep last 1


def test_checkpointing_accumulation_and_clipping_shape_the_step_as_asked(tmp_path, data_dir, fresh_transformer):
    def step(name, **settings):
        return load_file(train(config(tmp_path, data_dir, name, max_steps=1, num_validation=0, **settings)))

    plain = step("plain")  # batch 2
    checkpointed, accumulated = step("gc", gradient_checkpointing=True), step("accum", batch_size=1, grad_accum=2)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    for k in plain:  # the same mean gradient, summed in another order (Adam magnifies float noise, see the DDP test)
        torch.testing.assert_close(plain[k], accumulated[k], atol=5e-5, rtol=1e-4)
    # a gradient clipped to 1e-12 is far below AdamW's eps (1e-8): the step shrinks ~10^4 times
    base = {k: v for k, v in fresh_transformer().state_dict().items() if k in plain}
    clipped = step("clipped", max_grad_norm=1e-12)
    moved, moved_clipped = (sum(float((w[k] - base[k]).abs().sum()) for k in base) for w in (plain, clipped))
    assert 0 < moved_clipped < 1e-3 * moved


def test_caption_dropout_swaps_in_the_datas_negative_caption(data_dir, tiny_pipeline_path):
    from diffusers import FluxPipeline

    ds = DistillDataset(data_dir)
    negative = ds.negative()
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float32)
    embeds, pooled, _ = pipe.encode_prompt("", prompt_2=None, max_sequence_length=ds.info.text_seq_len)
    torch.testing.assert_close(negative["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(negative["pooled_prompt_embeds"], pooled[0], atol=1e-5, rtol=1e-5)

    sampler = TimestepSampler(torch.linspace(1, 0.01, 1000), "none")
    items = [ds[i] for i in range(6)] * 4

    def batch(dropout):
        generators = [torch.Generator().manual_seed(i) for i in range(len(items))]
        args = (sampler, ds.info, None, torch.device("cpu"), torch.float32)
        return make_batch(items, generators, *args, negative=negative, caption_dropout=dropout).inputs

    rare = [
        not torch.equal(a, b)
        for a, b in zip(batch(0.0)["encoder_hidden_states"], batch(0.1)["encoder_hidden_states"], strict=True)
    ]
    assert 0 < sum(rare) <= len(items) // 4  # p is the fraction dropped (about 2 of 24), not kept
    plain, dropped = batch(0.0), batch(0.5)
    # the caption draw comes after latent, noise and sigma: those are the same with or without dropout
    for key in ("hidden_states", "timestep"):
        torch.testing.assert_close(plain[key], dropped[key], atol=0, rtol=0)
    texts = zip(plain["encoder_hidden_states"], dropped["encoder_hidden_states"], strict=True)
    swapped = [not torch.equal(a, b) for a, b in texts]
    assert 0 < sum(swapped) < len(items)
    for i, is_swapped in enumerate(swapped):
        expected = negative if is_swapped else items[i]
        torch.testing.assert_close(dropped["encoder_hidden_states"][i], expected["prompt_embeds"], atol=0, rtol=0)
        torch.testing.assert_close(dropped["pooled_projections"][i], expected["pooled_prompt_embeds"], atol=0, rtol=0)
    torch.testing.assert_close(batch(0.5)["encoder_hidden_states"], dropped["encoder_hidden_states"])  # seeded


@pytest.mark.parametrize("flag", [dict(overwrite=True), dict(resume="latest")], ids=["overwrite", "resume"])
def test_a_folder_that_holds_no_run_is_never_written_to(tmp_path, data_dir, flag):
    """--overwrite and --resume act on a previous run; a folder of the user's own files is refused, untouched."""
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    files = {out / "clear_local_1.safetensors": b"published", out / "logs" / "notes.txt": b"mine"}
    for path, data in files.items():
        path.write_bytes(data)
    with pytest.raises(FileExistsError, match="is not empty and holds no distillation run"):
        train(config(tmp_path, data_dir, "mine", max_steps=1, num_validation=0, **flag))
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(files)
    assert all(path.read_bytes() == data for path, data in files.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(max_grad_norm=0.0), "--max-grad-norm must be > 0, got 0.0"),
        (dict(max_grad_norm=-1.0), "--max-grad-norm must be > 0, got -1.0"),
        (dict(weighting_scheme="logit_normal", logit_std=-1.0), "--logit-std must be > 0, got -1.0"),
        (dict(lr_scheduler="piecewise_constant"), "--lr-scheduler 'piecewise_constant' is not one of"),
        (dict(mixed_precision="fp16"), "--mixed-precision fp16 needs a CUDA device"),
        (dict(resume="latest", overwrite=True), "pass one of them"),
        (dict(weighting_scheme="mode", mode_scale=10.0), "--mode-scale must be in [-1, 1.75] for the 'mode' scheme"),
        (dict(lr_warmup_steps=2), "--lr-scheduler constant has no warmup (diffusers ignores it)"),
        (dict(lr=0.0), "--lr must be positive, got 0.0"),
        (dict(keep_checkpoints=0), "--keep-checkpoints must be a positive int, got 0"),  # [:-0] kept them all
        (dict(fm_weight=0.0, out_weight=0.0, attn_weight=0.0), "--attn-weight are all 0: no loss to train on"),
    ],
)
def test_settings_that_would_train_wrong_or_crash_late_are_refused(tmp_path, data_dir, monkeypatch, overrides, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config(tmp_path, data_dir, **overrides))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights", [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)])
def test_one_loss_term_alone_is_a_run(tmp_path, data_dir, weights):
    fm, out, attn = weights
    config(tmp_path, data_dir, fm_weight=fm, out_weight=out, attn_weight=attn).check()


def test_warmup_steps_reach_the_schedule(tmp_path, data_dir):
    train(config(tmp_path, data_dir, num_validation=0, lr_scheduler="constant_with_warmup", lr_warmup_steps=2))
    lines = (tmp_path / "run/logs/train.jsonl").read_text().splitlines()
    assert [json.loads(line)["lr"] for line in lines] == pytest.approx([0.0, 5e-4, 1e-3])


def test_validation_losses_are_the_mean_squared_gaps_of_fixed_draws(tmp_path, data_dir):
    """val_gap is the mean over the held-out batches of the student's mean squared gap to the teacher (as README and
    the distillation benchmark read it), on the same noise every time."""
    distiller = Distiller(config(tmp_path, data_dir, num_validation=2))
    values = distiller.validation_losses()
    gaps = []
    for batch in distiller.held_out_batches():
        with distiller.student.teacher() as teacher:
            expected = forward(teacher, batch.inputs)
        gaps.append(float((forward(distiller.student.transformer, batch.inputs) - expected).pow(2).mean()))
    assert len(gaps) == 2 and values["val_gap"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-6)
    assert distiller.validation_losses() == values


def test_resume_refuses_data_of_another_size_or_held_out_split(tmp_path, data_dir):
    """The training order and the held-out items depend on both: a resume on grown data would train on items it
    held out before."""
    train(config(tmp_path, data_dir, max_steps=1, num_validation=1))
    with pytest.raises(ValueError, match="data held_out: 1 -> 2"):
        train(config(tmp_path, data_dir, max_steps=2, num_validation=2, resume="latest"))
    smaller = tmp_path / "smaller"
    shutil.copytree(data_dir, smaller)
    manifest = smaller / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("".join(line + "\n" for line in lines[:-1]))
    with pytest.raises(ValueError, match=f"data items: {len(lines)} -> {len(lines) - 1}"):
        train(config(tmp_path, smaller, max_steps=2, num_validation=1, resume="latest"))


def test_resume_takes_the_new_lr_and_schedule_and_refuses_another_optimizer(tmp_path, data_dir):
    settings = dict(max_steps=2, checkpoint_every=1, lr_scheduler="linear", num_validation=0, weight_decay=0.0)
    train(config(tmp_path, data_dir, **settings))
    # a finished run extended to 4 steps at a new rate: the linear schedule of 4 steps from step 3 on (the saved
    # optimizer held the old schedule's last rate, 0, and the old lr)
    train(config(tmp_path, data_dir, **{**settings, "max_steps": 4, "lr": 2e-3, "resume": "latest"}))
    lines = (tmp_path / "run/logs/train.jsonl").read_text().splitlines()
    assert [json.loads(line)["lr"] for line in lines] == pytest.approx([1e-3, 5e-4, 1e-3, 5e-4])
    state = torch.load(tmp_path / "run/checkpoint-4/optimizer.bin", weights_only=False)
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.0]
    train(config(tmp_path, data_dir, **{**settings, "max_steps": 5, "weight_decay": 0.25, "resume": "latest"}))
    state = torch.load(tmp_path / "run/checkpoint-5/optimizer.bin", weights_only=False)
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.25]  # the resumed run's, as run.json says
    with pytest.raises(ValueError, match=r"optimizer: 'adamw' -> 'prodigy'"):  # its saved state fits no other optimizer
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 6, "optimizer": "prodigy", "resume": "latest"}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(weight_decay=-5.0), r"--weight-decay must be >= 0, got -5.0"),
        (dict(fm_weight=-1.0), r"--fm-weight must be >= 0, got -1.0"),
        (dict(attn_weight=float("nan")), r"--attn-weight must be >= 0, got nan"),
        (dict(down=3), r"has a 4x4 token grid, not divisible by down factor 3"),
        (dict(backend="bogus"), r"unknown backend 'bogus'"),
        (dict(attn_layers=[99]), r"attention layers \[99\] out of range: the model has 3"),
    ],
)
def test_settings_that_cannot_train_fail_before_the_run_folder_is_written(tmp_path, data_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path, data_dir, **overrides))
    assert not (tmp_path / "run").exists()  # a corrected rerun is not refused as "already holds a run"


def test_the_sample_stream_draws_training_items_only_shuffled_per_seed_and_epoch(tmp_path, data_dir):
    distiller = Distiller(config(tmp_path, data_dir, num_validation=2))
    assert distiller.num_train == 4 and distiller.held_out() == [4, 5]  # the last items, never trained on
    assert {distiller.stream.item(p) for p in range(200)} == set(range(4))
    first, second = SampleStream(64, 0), SampleStream(64, 1)
    epochs = [[first.item(p) for p in range(e * 64, (e + 1) * 64)] for e in range(2)]
    assert all(sorted(epoch) == list(range(64)) for epoch in epochs) and epochs[0] != epochs[1]
    assert [second.item(p) for p in range(64)] != epochs[0]  # --seed changes the order
    # and the draws: seed 1 at position 0 is not seed 0 at position 1
    assert not torch.equal(torch.randn(8, generator=second.generator(0)), torch.randn(8, generator=first.generator(1)))


@pytest.mark.parametrize("seed", [2**32, 2**63 - 1])
def test_the_sample_stream_takes_every_seed_of_the_command_line(seed):
    """--seed goes up to 2**63 - 1; its derived seeds (seed << 32, seed * 100003) wrap to the 64 bits manual_seed
    takes (they overflowed at the first step, after the run folder was written). Small seeds keep their streams."""
    stream = SampleStream(4, seed)
    assert sorted(stream.item(p) for p in range(4)) == [0, 1, 2, 3]
    assert torch.randn(2, generator=stream.generator(7)).shape == (2,)
    small = SampleStream(4, 3)
    expected = torch.randn(4, generator=torch.Generator().manual_seed((3 << 32) + 5))
    assert torch.equal(torch.randn(4, generator=small.generator(5)), expected)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(3 * 100_003 + 1))
    assert [small.item(p) for p in range(4, 8)] == order.tolist()


def test_checkpoints_are_ordered_by_step_and_the_last_step_is_kept(tmp_path, data_dir):
    train(config(tmp_path, data_dir, max_steps=3, checkpoint_every=2, keep_checkpoints=5, num_validation=0))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):  # another sample stream half-way through a run
        train(config(tmp_path, data_dir, max_steps=4, seed=1, num_validation=0, resume="latest"))

    distiller = Distiller(config(tmp_path, data_dir, "big", keep_checkpoints=2, num_validation=0))
    for step in (5, 40, 300):  # names that sort otherwise as text: checkpoint-1000 < checkpoint-300
        (tmp_path / "big" / f"checkpoint-{step}").mkdir()
        (tmp_path / "big" / f"checkpoint-{step}" / "trainable.safetensors").write_bytes(b"")
    distiller.state.step = 1000
    distiller.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "big").glob("checkpoint-*")) == ["checkpoint-1000", "checkpoint-300"]
    assert latest_checkpoint(tmp_path / "big").name == "checkpoint-1000"


def test_overwrite_deletes_only_the_previous_runs_own_export(tmp_path, data_dir):
    run = tmp_path / "run"
    train(config(tmp_path, data_dir, max_steps=1, num_validation=0))
    assert (run / "clear_local_1.safetensors").is_file()
    (run / "clear_local_16.safetensors").write_bytes(b"published")  # the user's, kept beside the run
    train(config(tmp_path, data_dir, window=2, max_steps=1, num_validation=0, overwrite=True))
    assert not (run / "clear_local_1.safetensors").exists() and (run / "clear_local_2.safetensors").is_file()
    assert (run / "clear_local_16.safetensors").read_bytes() == b"published"
    # a file of the user's with the name of the new export is refused before anything is cleared
    (run / "clear_local_3.safetensors").write_bytes(b"published")
    with pytest.raises(FileExistsError, match=r"clear_local_3.safetensors is not the export of the run in .*run; move"):
        train(config(tmp_path, data_dir, window=3, max_steps=1, num_validation=0, overwrite=True))
    assert (run / "clear_local_3.safetensors").read_bytes() == b"published"
    assert (run / "clear_local_2.safetensors").is_file() and (run / "logs").is_dir()


def test_overwrite_discards_the_previous_runs_validation_images(tmp_path, data_dir, monkeypatch):
    """The old run's step-*.png stayed beside the new run's."""

    def grid(self, path: Path) -> None:  # the file, without drawing it
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")

    monkeypatch.setattr(Distiller, "validation_grid", grid)
    settings = dict(validate_every=1, validation_images=True)
    train(config(tmp_path, data_dir, max_steps=2, **settings))
    train(config(tmp_path, data_dir, max_steps=1, overwrite=True, **settings))
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == ["step-000000.png", "step-000001.png"]


def test_a_checkpoint_of_another_folder_is_not_resumed_into_a_run(tmp_path, data_dir, monkeypatch):
    """Resuming cuts the run in --out back to the checkpoint's step: a mistyped --out lost its later checkpoints,
    logs and export."""
    settings = dict(checkpoint_every=2, num_validation=0)
    train(config(tmp_path, data_dir, "a", max_steps=4, **settings))
    train(config(tmp_path, data_dir, "b", max_steps=2, **settings))
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"--resume .*b.checkpoint-2 is a checkpoint of another folder, and .*"
                       r"checkpoints of its own \(the latest: checkpoint-4\): resume into a new --out"):  # fmt: skip
        train(config(tmp_path, data_dir, "a", max_steps=3, resume=str(tmp_path / "b" / "checkpoint-2"), **settings))
    assert {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before
    resumed = config(tmp_path, data_dir, "c", max_steps=3, resume=str(tmp_path / "b" / "checkpoint-2"), **settings)
    train_killed_in("save_checkpoint", 3, resumed, monkeypatch)  # into a new folder it continues; an attempt
    assert train(resumed).is_file()  # killed before its first checkpoint there is taken up by the same command
    lines = (tmp_path / "c" / "logs" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3]


def test_a_non_finite_gradient_stops_the_run_before_it_is_checkpointed(tmp_path, data_dir, monkeypatch):
    """The loss is taken before the step: a nan gradient with a finite loss made the weights nan, and its
    checkpoint and export were written without an error."""
    import training.distill as distill_module

    losses = distill_module.distill_losses

    def nan_gradient(*args, **kwargs):  # adds 0 to the loss, and nan to its gradient
        out = losses(*args, **kwargs)
        return dataclasses.replace(out, total=out.total + (args[0] - args[0].detach()).abs().sqrt().sum())

    monkeypatch.setattr(distill_module, "distill_losses", nan_gradient)
    with pytest.raises(FloatingPointError, match="^gradient norm became nan at step 1; lower --lr"):
        train(config(tmp_path, data_dir, max_steps=1, checkpoint_every=1, num_validation=0))
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not list((tmp_path / "run").glob("*.safetensors"))


def test_clear_errors(tmp_path, data_dir):
    with pytest.raises(ValueError, match="^--window must be a positive int"):
        train(config(tmp_path, data_dir, window=0))
    with pytest.raises(ValueError, match="^--down must be a positive int"):
        train(config(tmp_path, data_dir, down=0))
    with pytest.raises(ValueError, match="not enough"):
        train(config(tmp_path, data_dir, num_validation=6))
    with pytest.raises(FileNotFoundError, match="no info.json"):
        train(config(tmp_path, tmp_path))
    with pytest.raises(ValueError, match=re.escape("--caption-dropout must be in [0, 1), got 1.0")):
        train(config(tmp_path, data_dir, caption_dropout=1.0))

    train(config(tmp_path, data_dir, max_steps=1, num_validation=0))
    with pytest.raises(FileExistsError, match="already holds a finished distillation run; pass --overwrite"):
        train(config(tmp_path, data_dir, max_steps=1, num_validation=0))
    with pytest.raises(ValueError, match="window: 1 -> 2"):
        train(config(tmp_path, data_dir, window=2, max_steps=1, num_validation=0, resume="latest"))

    other = tmp_path / "other-data"  # data whose text encoder does not fit the model
    other.mkdir()
    for path in data_dir.rglob("*"):
        if path.is_file():
            (other / path.relative_to(data_dir)).parent.mkdir(parents=True, exist_ok=True)
            (other / path.relative_to(data_dir)).write_bytes(path.read_bytes())
    info = json.loads((other / "info.json").read_text())

    def made_by_another_model(**changes):  # its info.json, and shards that agree with it
        (other / "info.json").write_text(json.dumps({**info, **changes}))
        now = {**info, **changes}
        for shard in (other / "shards").glob("*.safetensors"):
            tensors = load_file(data_dir / "shards" / shard.name)
            pad = now["text_dim"] - info["text_dim"]
            tensors["prompt_embeds"] = torch.nn.functional.pad(tensors["prompt_embeds"], (0, pad))
            pad = now["pooled_dim"] - info["pooled_dim"]
            tensors["pooled_prompt_embeds"] = torch.nn.functional.pad(tensors["pooled_prompt_embeds"], (0, pad))
            for key in ("latent_mean", "latent_logvar"):
                tensors[key] = tensors[key][:, : now["latent_shape"][0]].contiguous()
            save_file(tensors, shard)

    made_by_another_model(text_dim=48)
    with pytest.raises(ValueError, match="made with another model: T5 embeddings have 48 dims, model takes 32"):
        train(config(tmp_path, other, "run2"))
    made_by_another_model(pooled_dim=info["pooled_dim"] + 8)  # else a shape error mid-forward, after run.json
    with pytest.raises(ValueError, match="made with another model: CLIP pooled embeddings have 40 dims, model takes"):
        train(config(tmp_path, other, "run2"))
    made_by_another_model(latent_shape=[8, *info["latent_shape"][1:]])
    with pytest.raises(ValueError, match=r"made with another model: latents have 8 channels \(x4 packed = 32\)"):
        train(config(tmp_path, other, "run2"))
    (other / "negative.safetensors").unlink()  # data made before the file existed
    with pytest.raises(FileNotFoundError, match="has no negative.safetensors .* re-run make-data on it"):
        train(config(tmp_path, other, "run3", caption_dropout=0.1))
    made_by_another_model(height=128)
    with pytest.raises(ValueError, match="data resolution"):  # resuming a run on data of another resolution
        train(config(tmp_path, other, max_steps=2, num_validation=0, resume="latest"))
    assert len(DistillDataset(data_dir)) == 6


def test_model_and_out_paths_are_named_for_what_they_are(tmp_path, data_dir):
    from pipelines.tiny import tiny_pipeline_path

    """A missing local --model was reported as a failed hub download; --out a file as '[Errno 17] File exists'."""
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {re.escape(str(tmp_path))}/nope"):
        train(config(tmp_path, data_dir, model=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="cannot load a FLUX transformer and scheduler from .* it has no"):
        check_run(config(tmp_path, data_dir, "run-data", model=str(data_dir)))  # once, before N processes start
    # what distillation needs of a model: the transformer, scheduler and VAE, without the text encoders' gigabytes
    partial = tmp_path / "flux-partial"
    for sub in ("transformer", "scheduler", "vae"):
        shutil.copytree(Path(tiny_pipeline_path()) / sub, partial / sub)
    check_run(config(tmp_path, data_dir, "run-partial", model=str(partial)))
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(FileExistsError, match="afile is a file, not a run folder; choose another --out"):
        train(config(tmp_path, data_dir, "afile"))
    assert (tmp_path / "afile").read_text() == "mine"


def test_ddp_on_cpu_gives_the_loss_curve_of_one_process(tmp_path, data_dir, capsys):
    """`accelerate launch --num_processes 2 --cpu` as the issue writes it: accelerate starts one process, which
    starts the two (app/launch.py); they train as one process with the same global batch does."""
    common = ["distill", "--data", str(data_dir), "--window", "1", "--max-steps", "2", "--lr", "1e-3"]
    common += ["--num-validation", "2", "--no-validation-images", "--checkpoint-every", "2"]
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "2", "--cpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "app.cli"]
    env = {k: v for k, v in os.environ.items() if k not in WORLD_SIZE_VARIABLES and k != "MASTER_ADDR"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun leaves a log folder there
    ddp = subprocess.run(
        [*launch, *common, "--batch-size", "1", "--out", str(tmp_path / "ddp")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "starting 2 CPU processes (machine 1 of 1) with torch.distributed.run" in ddp.stderr
    assert re.search(r"distill: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", ddp.stderr)  # one progress bar, rank 0's
    assert main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    assert "wrote" in capsys.readouterr().out
    # both extended by a step from their checkpoints: the two processes resume as one does
    longer = [*common[:6], "3", *common[7:], "--resume", "latest"]  # --max-steps 3
    resumed = subprocess.run([*launch, *longer, "--batch-size", "1", "--out", str(tmp_path / "ddp")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert main([*longer, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0

    assert torch.load(tmp_path / "ddp/checkpoint-2/custom_checkpoint_1.pkl", weights_only=True)["processes"] == 2
    assert {p.name for p in (tmp_path / "ddp/checkpoint-2").glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    curves = [
        [json.loads(line) for line in (tmp_path / name / "logs/train.jsonl").read_text().splitlines()]
        for name in ("ddp", "one")
    ]
    for a, b in zip(*curves, strict=True):
        for key in ("loss", "loss_fm", "loss_out", "loss_attn", "grad_norm", "epoch"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert [line["step"] for line in curves[0]] == [1, 2, 3]
    a, b = (load_file(tmp_path / name / "clear_local_1.safetensors") for name in ("ddp", "one"))
    for k in a:  # Adam divides by sqrt(v): float noise in tiny gradients moves weights by up to ~1e-5
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4)
    # killed after its last checkpoint: the resume at step 3 asks whether step 3 was validated; only the main
    # process reads the logs, so every process must get its answer (or they disagree on running the validation)
    (tmp_path / "ddp/clear_local_1.safetensors").unlink()
    again = subprocess.run([*launch, *longer, "--batch-size", "1", "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "ddp/clear_local_1.safetensors").is_file()
    validated = [json.loads(line)["step"] for line in (tmp_path / "ddp/logs/validation.jsonl").read_text().splitlines()]
    assert validated == [0, 2, 3]  # each once: the last max-steps run's 2, the resumed run's 3


def test_a_failure_inside_the_relaunched_processes_ends_in_one_line_each(tmp_path, data_dir):
    """What relaunch_lost_cpu_processes starts (python -m app.launch: torchrun): the processes' own errors, then one
    line, not torchrun's ChildFailedError traceback (40 lines)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "app.launch", "--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "app.cli"]
    args = ["distill", "--data", str(data_dir), "--window", "1", "--model", str(tmp_path / "no-model")]
    env = {k: v for k, v in os.environ.items() if k not in WORLD_SIZE_VARIABLES and k != "MASTER_ADDR"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))  # torchrun leaves a log folder there
    proc = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert sum("no-model" in line for line in errors) == 2, proc.stderr[-3000:]  # one line from each process
    assert re.match(r"error: process \d failed with exit code 1 \(its error is above\)$", errors[-1])
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_launcher_variables_the_run_does_not_follow_are_said(tmp_path, data_dir, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")  # accelerate launch --gradient_accumulation_steps
    with caplog.at_level("WARNING", logger="training.distill"):
        distiller = Distiller(config(tmp_path, data_dir, grad_accum=1, num_validation=0))
    assert distiller.accelerator.gradient_accumulation_steps == 1  # --grad-accum, as run.json records
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 (accelerate launch --gradient_accumulation_steps) is ignored" in (
        caplog.text
    )
    caplog.clear()
    from training.distill import _warn_about_the_environment

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for name, value in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING", logger="training.distill"):
        _warn_about_the_environment(config(tmp_path, data_dir, grad_accum=2))
    assert "joining a group of WORLD_SIZE=2 processes at 10.0.0.1:29500 as RANK 0" in caplog.text


def test_the_cli_checks_a_run_before_it_starts_processes(tmp_path, data_dir, monkeypatch, capsys):
    import app.launch

    monkeypatch.setattr(app.launch, "relaunch_lost_cpu_processes", lambda argv: pytest.fail("processes started"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    base = ["distill", "--data", str(data_dir), "--window", "1", "--max-steps", "1"]
    for extra, message in (
        (["--out", str(tmp_path / "taken")], "is not empty and holds no distillation run"),
        (["--out", str(tmp_path / "x"), "--num-validation", "6"], "not enough for 6 held-out validation items"),
        (["--out", str(tmp_path / "x"), "--backend", "bogus"], "unknown backend 'bogus'"),
    ):
        writes = []
        monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
        assert main([*base, *extra]) in (1, 2)
        assert len(writes) == 1 and writes[0].startswith("error: ") and message in writes[0]  # one write: ranks
        assert writes[0].endswith("\n") and writes[0].count("\n") == 1  # sharing stderr cannot split the line
    assert not (tmp_path / "x").exists()


def test_cpu_launch_detection_reads_the_launcher_and_refuses_what_it_cannot_start(tmp_path, data_dir, monkeypatch):
    script = ["-m", "app.cli", "distill", "--num_processes", "7", "--out", "launch"]  # the script's, not the launcher's
    assert requested_processes(["python", "/bin/accelerate", "launch", "--cpu", "--num_processes", "3", *script]) == 3
    module = ["python", "-m", "accelerate.commands.launch"]
    assert requested_processes([*module, "--num-processes=2", "--cpu", "x.py"]) == 2
    assert requested_processes([*module, "--cpu", *script]) is None
    assert requested_processes(["/usr/bin/bash", "run.sh"]) is None
    assert requested_processes(["accelerate", "launch", "--cpu"]) is None  # no script: not a launch
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 4\n")
    assert requested_processes(["/bin/accelerate-launch", "--config_file", str(config_file), "--cpu", *script]) == 4

    lone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert alone_under_cpu_launch(lone)
    assert not alone_under_cpu_launch({**lone, "WORLD_SIZE": "2"})  # torchrun's (or mpirun's) ranks
    assert not alone_under_cpu_launch({"ACCELERATE_USE_CPU": "True"})  # --num_processes 1: no MASTER_ADDR
    assert not alone_under_cpu_launch({"MASTER_ADDR": "127.0.0.1"})

    for name in WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in lone.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(launch, "_parent_argv", lambda: ["accelerate", "launch", "--cpu", "x.py"])
    with pytest.raises(
        ValueError, match="asked for several processes but started one .* use accelerate launch --multi"
    ):
        launch.relaunch_lost_cpu_processes(["distill"])
    monkeypatch.setattr(launch, "_parent_argv", lambda: ["/usr/bin/bash", "run.sh"])
    assert launch.relaunch_lost_cpu_processes(["distill"]) is None  # the variables of a job script, no launch
    monkeypatch.setattr(launch, "_parent_argv", lambda: ["accelerate", "launch", "--num_processes", "1", "x.py"])
    assert launch.relaunch_lost_cpu_processes(["distill"]) is None  # one process asked, one running


def test_ranks_of_any_launcher_are_not_relaunched():
    """Intel MPI and MVAPICH set PMI_SIZE / MV2_COMM_WORLD_SIZE, not WORLD_SIZE: each of N ranks would start N more."""
    lone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert {"WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"} <= set(WORLD_SIZE_VARIABLES)
    for name in WORLD_SIZE_VARIABLES:
        assert not alone_under_cpu_launch({**lone, name: "2"}), name


def test_the_relaunch_keeps_the_launchs_port_and_returns_its_exit_code(monkeypatch):
    """A failed run exited 0 for scripts and CI, or ignored --main_process_port."""
    for name in WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(ACCELERATE_USE_CPU="True", MASTER_ADDR="127.0.0.1", MASTER_PORT="12345").items():
        monkeypatch.setenv(name, value)
    commands = []
    monkeypatch.setattr(
        launch.subprocess, "run", lambda command: commands.append(command) or SimpleNamespace(returncode=3)
    )
    monkeypatch.setattr(
        launch, "_parent_argv", lambda: ["accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"]
    )
    assert launch.relaunch_lost_cpu_processes(["distill"]) == 3
    assert "--master_port 12345" in " ".join(commands[-1])


def test_a_process_killed_by_a_signal_is_a_failure(monkeypatch, capsys):
    """The OOM killer's SIGKILL (exit code -9) made python -m app.launch exit 0."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def killed(args):
        raise ChildFailedError("app.cli", {1: ProcessFailure(local_rank=1, pid=1, exitcode=-9, error_file="/none")})

    monkeypatch.setattr(torch.distributed.run, "run", killed)
    assert launch.torchrun(["--nproc_per_node", "2", "x.py"]) == 1
    assert capsys.readouterr().err == "error: process 1 was killed by signal 9 (SIGKILL; out of memory?)\n"


def test_cpu_launch_reads_accelerates_default_config_and_spreads_over_machines(tmp_path, monkeypatch):
    import accelerate.commands.config as accelerate_config

    default = tmp_path / "default_config.yaml"  # what `accelerate config` writes for 2 CPU processes
    default.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n")
    for module in (accelerate_config, accelerate_config.config_args):
        monkeypatch.setattr(module, "default_config_file", str(default))
    assert requested_processes(["accelerate", "launch", "-m", "app.cli", "distill"]) == 2
    assert requested_processes(["accelerate", "launch", "--cpu", "-m", "app.cli"]) is None  # --cpu skips it

    for name in WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    commands = []
    monkeypatch.setattr(
        launch.subprocess, "run", lambda command: commands.append(command) or SimpleNamespace(returncode=0)
    )
    machines = ["accelerate", "launch", "--cpu", "--num_machines", "2", "--machine_rank", "1", "-m", "app.cli"]
    monkeypatch.setattr(launch, "_parent_argv", lambda: [*machines[:2], "--num_processes", "4", *machines[2:]])
    assert launch.relaunch_lost_cpu_processes(["distill"]) == 0
    command = " ".join(commands[-1])
    assert "--nproc_per_node 2 --nnodes 2 --node_rank 1 --master_addr 10.0.0.1" in command  # 4 in all, 2 here
    monkeypatch.setattr(launch, "_parent_argv", lambda: [*machines[:2], "--num_processes", "3", *machines[2:]])
    with pytest.raises(ValueError, match="3 processes on 2 machines: .* a multiple of --num_machines"):
        launch.relaunch_lost_cpu_processes(["distill"])
    zero = ["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "0", "x.py"]
    monkeypatch.setattr(launch, "_parent_argv", lambda: zero)
    with pytest.raises(ValueError, match="2 processes on 0 machines"):  # a ZeroDivisionError before
        launch.relaunch_lost_cpu_processes(["distill"])
    for rank in ("2", "-1"):  # torchrun waited for a machine 3 of 2 forever
        beyond = [*machines[:2], "--num_processes", "4", *machines[2:]]
        beyond[beyond.index("--machine_rank") + 1] = rank
        monkeypatch.setattr(launch, "_parent_argv", lambda beyond=beyond: beyond)
        with pytest.raises(ValueError, match=rf"--machine_rank {rank} is not one of 0\.\.1 \(--num_machines\)"):
            launch.relaunch_lost_cpu_processes(["distill"])


def test_bad_distill_arguments_fail_before_a_cpu_launch_starts_processes(tmp_path, monkeypatch, capsys):
    for name in WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(launch, "_parent_argv", lambda: ["accelerate", "launch", "--num_processes", "2", "x.py"])
    monkeypatch.setattr(launch.subprocess, "run", lambda command: pytest.fail(f"started {command}"))
    assert main(["distill", "--data", str(tmp_path / "missing"), "--window", "2", "--out", str(tmp_path / "run")]) != 0
    assert "data folder not found" in capsys.readouterr().err


def test_benchmark_smoke(tmp_path, tiny_pipeline_path, capsys):
    from benchmarks.distill import main

    assert main(["--smoke", "--threads", "1", "--json", str(tmp_path / "distill.json")]) == 0
    out = capsys.readouterr().out
    assert "held-out velocity gap" in out and "shared weights (ours)" in out and "acceptance (" in out
    result = json.loads((tmp_path / "distill.json").read_text())
    assert [g["fm_weight"] for g in result["gap"]] == [0.0, 1.0]
    assert all(g["gap_undistilled"] > 0 and g["gaps"][0]["step"] == 0 for g in result["gap"])
    assert all(g["export_reproduces_student"] and g["fm_teacher"] > 0 for g in result["gap"])
    assert [(r["teacher"], r["lora_rank"]) for r in result["table"]] == [
        ("copy", None),
        ("shared", None),
        ("copy", 4),
        ("shared", 4),
    ]
    assert all(r["samples_per_s"] > 0 for r in result["table"])


def test_prodigy_trains_and_tensorboard_holds_the_logged_values(tmp_path, data_dir):
    cfg = config(tmp_path, data_dir, optimizer="prodigy", lr=None, num_validation=1, validate_every=2)
    distiller = Distiller(cfg)
    assert type(distiller.optimizer.optimizer).__name__ == "Prodigy"
    before = {k: v.clone() for k, v in distiller.student.trainable_state_dict().items()}
    distiller.fit()
    after = distiller.student.trainable_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)

    logs = [json.loads(line) for line in (tmp_path / "run/logs/train.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in logs] == [1.0, 1.0, 1.0]  # Prodigy's default: its lr scales the step it estimates
    assert logs[0]["prodigy_d"] < logs[-1]["prodigy_d"]  # ... and the estimate grows from d0 as it trains
    assert len({e["loss"] for e in logs}) == 3

    (events,) = (tmp_path / "run/logs/distill").glob("events.out.tfevents.*")
    tensorboard = EventAccumulator(str(events.parent))
    tensorboard.Reload()
    for name in ("loss", "loss_fm", "loss_out", "loss_attn", "lr", "samples_per_s"):
        scalars = tensorboard.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2, 3], name
        assert [s.value for s in scalars] == pytest.approx([e[name] for e in logs], rel=1e-6), name
    gaps = [json.loads(line) for line in (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()]
    assert [(s.step, pytest.approx(s.value, rel=1e-6)) for s in tensorboard.Scalars("validation/val_gap")] == [
        (g["step"], g["val_gap"]) for g in gaps
    ]


def test_acceptance_64_samples_halve_the_held_out_gap_and_the_export_reproduces_the_student(
    tmp_path, tiny_pipeline_path, fresh_transformer
):
    """Issue 6 on CPU: 64 self-generated samples and 200 steps halve the held-out gap to the teacher, and the
    export is the student. The tiny teacher is random, so its velocity is far from the flow target of its own
    samples (held-out L_fm ~1.44, which the student can undercut): the paper's L_fm would pull the student off
    the teacher, so this distils the teacher alone (--fm-weight 0); benchmarks/distill.py shows both losses."""
    from pipelines.tiny import tiny_corpus

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_corpus()) + "\n")
    data = tmp_path / "data"
    make = ["make-data", "--prompts", str(prompts), "--out", str(data), "--resolution", "64", "--num", "68"]
    assert main([*make, "--steps", "4", "--batch-size", "17"]) == 0
    cfg = config(tmp_path, data, max_steps=200, batch_size=4, num_validation=4, fm_weight=0.0)
    distiller = Distiller(cfg)
    assert distiller.num_train == 64
    distiller.fit()

    gaps = [json.loads(line) for line in (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gaps] == [0, 200]
    assert gaps[1]["val_gap"] <= 0.5 * gaps[0]["val_gap"], gaps

    path = distiller.export()
    fresh = fresh_transformer()
    clear_dit.load_weights(fresh, path)
    for batch in distiller.held_out_batches():
        torch.testing.assert_close(
            forward(fresh, batch.inputs), forward(distiller.student.transformer, batch.inputs), atol=0, rtol=0
        )
    assert distiller.validation_losses(fresh)["val_gap"] == gaps[1]["val_gap"]


def test_held_out_items_whose_prompts_are_also_trained_on_are_named(tmp_path, data_dir, caplog):
    """data_dir cycles 5 prompts over 6 items: held out are the last items, item 5 has item 0's prompt."""
    with caplog.at_level("WARNING", logger="training.distill"):
        Distiller(config(tmp_path, data_dir, num_validation=2))
    assert "1 of the 2 held-out items share their prompt with training items" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="training.distill"):
        Distiller(config(tmp_path, data_dir, name="other", num_validation=1, max_steps=1))
    assert "1 of the 1 held-out items" in caplog.text


@pytest.mark.parametrize("change", [{"batch_size": 1}, {"grad_accum": 2}, {"attn_layers": [0]}, {"teacher": "copy"}])
def test_resume_refuses_another_sample_stream_or_teacher(tmp_path, data_dir, change):
    """The saved position counts samples of one batch size and accumulation; the targets come from one teacher."""
    settings = dict(max_steps=1, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"{key}: "):
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 2, "resume": "latest", **change}))


def test_a_checkpoint_of_another_folder_is_checked_against_the_run_that_wrote_it(tmp_path, data_dir):
    train(config(tmp_path, data_dir, "a", max_steps=2, checkpoint_every=2, num_validation=0))
    checkpoint = tmp_path / "a" / "checkpoint-2"
    with pytest.raises(ValueError, match=rf"cannot resume from {re.escape(str(checkpoint))}: .*batch_size: 2 -> 3"):
        train(config(tmp_path, data_dir, "b", max_steps=3, batch_size=3, num_validation=0, resume=str(checkpoint)))
    assert not (tmp_path / "b").exists()


def test_a_refused_resume_leaves_the_out_folder_as_it_was(tmp_path, data_dir):
    """Refused by the checkpoint's contents, or by its step: a run.json written before would refuse every rerun."""
    train(config(tmp_path, data_dir, "a", max_steps=2, checkpoint_every=2, down=2, num_validation=0))
    (tmp_path / "a" / RUN_FILE).unlink()  # a checkpoint copied out of its run folder
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    with pytest.raises(ValueError, match="trainable state does not match"):
        train(config(tmp_path, data_dir, "b", max_steps=3, num_validation=0, resume=checkpoint))
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"its checkpoint is at step 2, past --max-steps 1; pass --max-steps 2 or"):
        train(config(tmp_path, data_dir, "b", max_steps=1, down=2, num_validation=0, resume=checkpoint))
    assert not (tmp_path / "b").exists()
    train(config(tmp_path, data_dir, "b", max_steps=3, down=2, num_validation=0, resume=checkpoint))
    assert json.loads((tmp_path / "b" / RUN_FILE).read_text())["config"]["max_steps"] == 3


def test_a_resume_names_the_settings_it_changes_once(tmp_path, data_dir, caplog, monkeypatch):
    settings = dict(max_steps=1, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    monkeypatch.chdir(tmp_path)  # --out relative, --resume absolute: one run folder, checked once
    resume = dict(out="run", resume=str(tmp_path / "run" / "checkpoint-1"), max_steps=2, fm_weight=0.5)
    with caplog.at_level("WARNING", logger="training.distill"):
        train(dataclasses.replace(config(tmp_path, data_dir, **settings), **resume))
    assert caplog.text.count("with changed settings: max_steps: 1 -> 2; fm_weight: 1.0 -> 0.5") == 1
    assert "resuming run with changed settings" in caplog.text


def test_a_batch_larger_than_the_training_items_is_said(tmp_path, data_dir, caplog):
    with caplog.at_level("WARNING", logger="training.distill"):
        Distiller(config(tmp_path, data_dir, batch_size=5, num_validation=2))
    assert "a step takes 5 samples (batch size 5 x 1 processes) of 4 training items: each step repeats" in caplog.text


def test_a_resumed_run_keeps_the_checkpoint_it_resumed_from(tmp_path, data_dir):
    """Until it writes a newer one, it is the only way back if this attempt is killed too."""
    settings = dict(checkpoint_every=2, keep_checkpoints=3, num_validation=0)
    train(config(tmp_path, data_dir, max_steps=2, **settings))
    train(config(tmp_path, data_dir, max_steps=3, resume="latest", **settings))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_accumulated_steps_log_the_mean_loss_of_their_samples(tmp_path, data_dir):
    """batch 1 x accumulation 2 sees the samples and weights of one batch of 2: the same logged losses."""
    one = Distiller(config(tmp_path, data_dir, "one", max_steps=1, num_validation=0, batch_size=2)).train_step()
    acc = Distiller(config(tmp_path, data_dir, "acc", max_steps=1, num_validation=0, batch_size=1,
                           grad_accum=2)).train_step()  # fmt: skip
    for key in ("loss", "loss_fm", "loss_out", "loss_attn"):
        assert acc[key] == pytest.approx(one[key], rel=1e-5), key


def test_only_the_main_process_writes_the_export_and_the_trainable_checkpoint(tmp_path, data_dir, monkeypatch):
    distiller = Distiller(config(tmp_path, data_dir, max_steps=1, num_validation=0))
    calls = []
    monkeypatch.setattr(distiller.student, "export", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(distiller, "accelerator", SimpleNamespace(is_main_process=False, wait_for_everyone=lambda: None,
                                                                  end_training=lambda: None))  # fmt: skip
    distiller.export()
    weights = ["the model's state"]
    distiller._save_hook([], weights, str(tmp_path))
    assert calls == [] and weights == [] and not (tmp_path / TRAINABLE_FILE).exists()


def test_resume_latest_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, data_dir, caplog):
    from training.distill import _check_run_dir

    with caplog.at_level("WARNING", logger="training.distill"):
        assert _check_run_dir(config(tmp_path, data_dir, "fresh", resume="latest"), {}) is None
    assert f"--resume latest: no checkpoint in {tmp_path / 'fresh'} yet, starting a new run" in caplog.text


def test_resuming_an_earlier_checkpoint_drops_the_abandoned_attempts_later_ones(tmp_path, data_dir):
    """Rotation keeps the highest steps: the abandoned attempt's checkpoint-4 would outlive the new checkpoint-3."""
    train(config(tmp_path, data_dir, max_steps=4, num_validation=0, checkpoint_every=1, keep_checkpoints=4))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    resumed = config(tmp_path, data_dir, max_steps=3, num_validation=0, checkpoint_every=1, keep_checkpoints=1)
    train(dataclasses.replace(resumed, resume=str(out / "checkpoint-2")))
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_lora_student_trained_in_bf16_exports_its_float32_merge(tmp_path, data_dir, caplog, fresh_accelerate_state):
    """Merged in bf16, a short run's LoRA deltas round away; the export holds the float32 merge, and says when
    the weights run in bf16 would lose much of the change."""
    pytest.importorskip("peft")
    cfg = config(tmp_path, data_dir, lora_rank=2, mixed_precision="bf16", max_steps=2, num_validation=1, lr=1e-4)
    distiller = Distiller(cfg)
    distiller.fit()
    layers = {n: m for n, m in distiller.student.transformer.named_modules() if hasattr(m, "get_delta_weight")}
    with torch.no_grad():
        trained = {n: m.base_layer.weight.float() + m.get_delta_weight("default").float() for n, m in layers.items()}
    with caplog.at_level("WARNING", logger="training.student"):
        path = distiller.export()
    saved = load_file(path)
    assert trained and all(saved[f"{name}.weight"].dtype == torch.float32 for name in trained)
    for name, weight in trained.items():
        torch.testing.assert_close(saved[f"{name}.weight"], weight, atol=1e-6, rtol=1e-6)
    assert "the exported LoRA student is float32: in torch.bfloat16, its merged projections would lose" in caplog.text


def test_batches_are_the_rectified_flow_inputs_of_their_items(data_dir):
    """x_t = (1 - s) x0 + s noise, target noise - x0, timestep s (the model takes sigma), the scheme's weights:
    rebuilt here from the same generators and FluxPipeline's own packing."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    ds = DistillDataset(data_dir)
    items, sigmas = [ds[i] for i in range(3)], torch.tensor([0.2, 0.55, 0.9])
    sampler = TimestepSampler(torch.linspace(1, 0.01, 1000), "logit_normal")
    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = make_batch(items, generators, sampler, ds.info, None, torch.device("cpu"), torch.float32, sigmas=sigmas)
    x0, noise = [], []
    for i, item in enumerate(items):  # the documented draw order: latent sample, then noise
        g = torch.Generator().manual_seed(10 + i)
        mean, logvar = item["latent_mean"], item["latent_logvar"]
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        x0.append((z - ds.info.vae_shift_factor) * ds.info.vae_scaling_factor)
        noise.append(torch.randn(mean.shape, generator=g))
    x0, noise = torch.stack(x0), torch.stack(noise)
    b, c, h, w = x0.shape
    pack = lambda x: FluxPipeline._pack_latents(x, b, c, h, w)  # noqa: E731
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.inputs["hidden_states"], pack((1 - s) * x0 + s * noise))
    torch.testing.assert_close(batch.target, pack(noise - x0))
    torch.testing.assert_close(batch.inputs["timestep"], sigmas)
    torch.testing.assert_close(batch.weighting, compute_loss_weighting_for_sd3("logit_normal", sigmas=sigmas).float())
    sqrt = make_batch(items, generators, TimestepSampler(sampler.sigmas, "sigma_sqrt"), ds.info, None,
                      torch.device("cpu"), torch.float32, sigmas=sigmas)  # fmt: skip
    torch.testing.assert_close(sqrt.weighting, sigmas**-2)


def test_a_training_step_logs_the_loss_of_its_weights(tmp_path, data_dir):
    """out and attn weights told apart (both default to 0.5): the logged total is w fm + a out + b attn."""
    cfg = config(tmp_path, data_dir, max_steps=1, num_validation=0, fm_weight=0.2, out_weight=0.3, attn_weight=0.7,
                 attn_layers=[0])  # fmt: skip
    distiller = Distiller(cfg)
    logged = distiller.train_step()
    expected = 0.2 * logged["loss_fm"] + 0.3 * logged["loss_out"] + 0.7 * logged["loss_attn"]
    assert logged["loss_out"] != logged["loss_attn"]
    assert logged["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "scheme, kw",
    [("logit_normal", dict(logit_mean=1.0, logit_std=0.5)), ("mode", dict(mode_scale=0.8)), ("none", {})],
)
def test_timestep_density_is_the_schemes_with_its_parameters(scheme, kw):
    """sample() draws u from the scheme's density (diffusers' compute_density_for_timestep_sampling), with
    the caller's logit_mean/logit_std/mode_scale, then maps it onto the sigma grid."""
    sigmas = torch.linspace(1, 0.001, 1000)
    sampler = TimestepSampler(sigmas, scheme, **kw)
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = torch.cat([sampler.sample(g) for _ in range(50)])
    us = []
    for _ in range(50):  # hand-written densities, same draws
        if scheme == "logit_normal":
            u = torch.sigmoid(torch.normal(mean=1.0, std=0.5, size=(1,), generator=ref))
        else:
            u = torch.rand(size=(1,), generator=ref)
            if scheme == "mode":
                u = 1 - u - 0.8 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        us.append(u)
    expected = sigmas[(torch.cat(us) * 1000).long().clamp(0, 999)]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_weighted_mse_accumulates_in_float32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 64, 8, generator=g).bfloat16()
    target = (0.37 * torch.randn(4, 64, 8, generator=g)).bfloat16()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = ((pred.double() - target.double()) ** 2).mean((1, 2)) * w.double()
    got = weighted_mse(pred, target, w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_no_gradient_reaches_the_teacher_targets():
    g = torch.Generator().manual_seed(0)
    s_v = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    t_v = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 4, generator=g)
    s_a = [torch.randn(2, 5, 6, generator=g, requires_grad=True)]
    t_a = [torch.randn(2, 5, 6, generator=g, requires_grad=True)]
    distill_losses(s_v, t_v, target, s_a, t_a, torch.ones(2)).total.backward()
    assert s_v.grad is not None and s_a[0].grad is not None
    assert t_v.grad is None and t_a[0].grad is None  # stop-gradient on the teacher's velocity and attention


@pytest.mark.parametrize("mode", ["copy", "shared"])
def test_the_teacher_is_the_full_attention_model_and_builds_no_graph(fresh_transformer, mode):
    reference_model = fresh_transformer()
    inputs = transformer_inputs(reference_model, (4, 4), text_len=8)
    with torch.no_grad():
        reference = reference_model(**inputs)[0]
    student = Student(fresh_transformer(), window_size=1, teacher=mode)
    with student.teacher() as teacher:
        out = teacher(**inputs)[0]
    assert not out.requires_grad  # no autograd graph kept through the (shared) trainable parameters
    torch.testing.assert_close(out, reference, atol=0, rtol=0)
    with torch.no_grad():  # and the student is CLEAR (window 1 on a 4x4 grid is not full attention)
        assert not torch.equal(student.transformer(**inputs)[0], reference)


def test_lora_adapts_exactly_the_attention_projections(fresh_transformer):
    pytest.importorskip("peft")
    base = fresh_transformer()
    projections = {
        n.removesuffix(".weight") for n, _ in base.named_parameters() if is_clear_key(n) and n.endswith(".weight")
    }
    student = Student(fresh_transformer(), window_size=1, lora_rank=2)
    adapted = {n.split(".lora_A.")[0] for n in student.trainable if ".lora_A." in n}
    assert adapted == projections
    from peft.tuners.lora import LoraLayer

    layers = [m for m in student.transformer.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling == {"default": 1.0} for m in layers)  # B @ A unscaled: --lr means it for any rank


def test_a_trainable_state_is_loaded_only_whole(fresh_transformer):
    student = Student(fresh_transformer(), window_size=1, attn_layers=[-3])  # -len(layers): the first layer
    assert student.capture.names == ["transformer_blocks.0.attn"]
    state = dict(student.trainable_state_dict())
    first = next(iter(state))
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['.*'\]\), 0 unexpected .* another --window"):
        student.load_trainable_state_dict({k: v for k, v in state.items() if k != first})  # a KeyError before
    with pytest.raises(ValueError, match=r"0 missing \(e\.g\. \[\]\), 1 unexpected \(e\.g\. \['extra'\]\)"):
        student.load_trainable_state_dict({**state, "extra": state[first]})


def test_a_torn_last_log_line_does_not_block_a_resume(tmp_path, data_dir, caplog):
    """A kill or a full disk can cut the logger's last write short: resuming then failed on it with a bare
    JSONDecodeError, at every later try; a line that is whole but no log line's names the file."""
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    log = tmp_path / "run/logs/train.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 0.1')
    with caplog.at_level("WARNING", logger="training.data"):
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 3, "resume": "latest"}))
    assert f"{log} ends in a torn line" in caplog.text
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    with open(log, "a") as f:
        f.write('["step", 4]\n')
    with pytest.raises(ValueError, match=r"train.jsonl line 4 is not a log line of clear-dit's \((KeyError|TypeError)"):
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 4, "resume": "latest"}))


def test_a_checkpoint_resumes_only_on_as_many_processes_as_wrote_it(tmp_path, data_dir):
    """Its position is per process (micro-steps): 2 processes' checkpoint resumed on 1 trained samples again."""
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    state_file = tmp_path / "run/checkpoint-2/custom_checkpoint_1.pkl"
    state = torch.load(state_file, weights_only=True)
    assert state == {"step": 2, "micro_step": 2, "processes": 1}  # the lr scheduler's is custom_checkpoint_0
    torch.save({**state, "processes": 2}, state_file)  # as 2 processes write it
    with pytest.raises(ValueError, match=r"checkpoint was written by 2 processes, this run has 1: resume it with 2"):
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 3, "resume": "latest"}))
    del state["processes"]  # a checkpoint from before the count was saved
    torch.save(state, state_file)
    train(config(tmp_path, data_dir, **{**settings, "max_steps": 3, "resume": "latest"}))


def test_a_validation_cut_short_by_a_kill_is_made_when_its_checkpoint_resumes(tmp_path, data_dir, monkeypatch):
    """The checkpoint of a step is written before its validation (which may run long pipelines): a kill during
    the validation lost it for good, the resume starting after it. Each validated step is logged once."""
    settings = dict(max_steps=4, checkpoint_every=2, validate_every=2, num_validation=2)
    train_killed_in("validate", 2, config(tmp_path, data_dir, **settings), monkeypatch)
    train(config(tmp_path, data_dir, resume="latest", **settings))
    train(config(tmp_path, data_dir, resume="latest", **settings))  # from checkpoint-4, whose validation is logged
    lines = (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]
    # and a resume from a step that is not validated (validate_every 3) validates none
    train(config(tmp_path, data_dir, **{**settings, "validate_every": 3, "max_steps": 5}, resume="latest"))
    lines = (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4, 5]


def test_resume_refuses_data_made_again_with_other_prompts_or_settings(tmp_path, data_dir):
    """make-data --overwrite into the same folder with the same --num: shapes and size agree, the items do not."""
    train(config(tmp_path, data_dir, max_steps=1, num_validation=1, checkpoint_every=1))
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    info = json.loads((other / "info.json").read_text())
    (other / "info.json").write_text(json.dumps({**info, "settings": {**info["settings"], "seed": 99}}))
    with pytest.raises(ValueError, match=r"data made: \{.*'seed': 0.*\} -> \{.*'seed': 99.*\}"):
        train(config(tmp_path, other, max_steps=2, num_validation=1, checkpoint_every=1, resume="latest"))
    (other / "info.json").write_text(json.dumps(info))
    manifest = other / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**e, "prompt": e["prompt"] + "!"}) + "\n" for e in entries))
    with pytest.raises(ValueError, match=r"data prompts: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        train(config(tmp_path, other, max_steps=2, num_validation=1, checkpoint_every=1, resume="latest"))
    run = json.loads((tmp_path / "run/run.json").read_text())  # written before these were recorded
    del run["data"]["made"], run["data"]["prompts"]
    (tmp_path / "run/run.json").write_text(json.dumps(run))
    train(config(tmp_path, other, max_steps=2, num_validation=1, checkpoint_every=1, resume="latest"))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_a_checkpoint_folder_without_its_trainable_file_is_neither_latest_nor_resumable(tmp_path, data_dir):
    """A checkpoint half-copied by hand: resumed, it failed inside accelerate."""
    train(config(tmp_path, data_dir, max_steps=2, checkpoint_every=2, num_validation=0))
    (tmp_path / "run/checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match=r"checkpoint-9: not a checkpoint folder \(no trainable.safetensors\)"):
        train(config(tmp_path, data_dir, "b", resume=str(tmp_path / "run/checkpoint-9"), num_validation=0))
    assert not (tmp_path / "b").exists()


def test_a_run_killed_between_its_last_checkpoint_and_its_export_resumes_to_the_export(tmp_path, data_dir):
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=0)
    export = train(config(tmp_path, data_dir, **settings))
    weights = load_file(export)
    export.unlink()
    assert train(config(tmp_path, data_dir, resume="latest", **settings)) == export
    again = load_file(export)
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_a_new_start_under_resume_latest_drops_the_killed_attempts_logs(tmp_path, data_dir, monkeypatch):
    """Killed before its first checkpoint: the next attempt starts anew, and the killed one's validation of step 0
    is not logged twice."""
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=2)
    train_killed_in("train_step", 1, config(tmp_path, data_dir, **settings), monkeypatch)
    train(config(tmp_path, data_dir, resume="latest", **settings))
    lines = (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2]


def test_a_kill_while_the_validation_grid_is_drawn_is_made_good_on_resume(tmp_path, data_dir, monkeypatch):
    """The grid (full pipelines) is the long part of a validation: logged before it, a kill there left the step
    looking validated, and its grid was never drawn."""
    settings = dict(max_steps=4, checkpoint_every=2, validate_every=2, num_validation=2, validation_images=True)
    train_killed_in("validation_grid", 2, config(tmp_path, data_dir, **settings), monkeypatch)
    train(config(tmp_path, data_dir, resume="latest", **settings))
    lines = (tmp_path / "run/logs/validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "run/validation").iterdir()) == [f"step-00000{i}.png" for i in (0, 2, 4)]


def test_a_damaged_run_json_is_a_one_line_error_and_overwrite_starts_over(tmp_path, data_dir, caplog):
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=0)
    export = train(config(tmp_path, data_dir, **settings))
    (tmp_path / "run/run.json").write_text('{"config": {"mod')  # written by hand, or torn by an older clear-dit
    with pytest.raises(ValueError, match=r"run.json is damaged \(Unterminated string .*\); pass --overwrite"):
        train(config(tmp_path, data_dir, **settings, resume="latest"))
    with caplog.at_level("WARNING", logger="training.distill"):
        assert train(config(tmp_path, data_dir, **settings, overwrite=True)) == export
    assert "run.json is damaged: the export of the run it described, if any, is left" in caplog.text
    assert json.loads((tmp_path / "run/run.json").read_text())["config"]["max_steps"] == 2


def test_only_the_last_prompt_changed_is_other_data_too(tmp_path, data_dir):
    train(config(tmp_path, data_dir, max_steps=1, num_validation=1, checkpoint_every=1))
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    manifest = other / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    entries[-1]["prompt"] += "!"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(ValueError, match=r"data prompts: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        train(config(tmp_path, other, max_steps=2, num_validation=1, checkpoint_every=1, resume="latest"))


def test_a_checkpoint_from_before_the_process_count_resumes_on_any_count():
    state = TrainState(processes=2)
    state.load_state_dict({"step": 3, "micro_step": 6})
    assert (state.step, state.micro_step) == (3, 6)
    with pytest.raises(ValueError, match="written by 1 process, this run has 2: resume it with 1"):
        TrainState(processes=2).load_state_dict({"step": 3, "micro_step": 6, "processes": 1})


@pytest.mark.parametrize("text", ["{}", "[]", '{"config": {}}', "null"])
def test_a_run_json_without_its_records_is_a_one_line_error(tmp_path, data_dir, text):
    settings = dict(max_steps=1, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    (tmp_path / "run/run.json").write_text(text)
    with pytest.raises(ValueError, match=r"run.json is damaged \(.*\); pass --overwrite to start the run over"):
        train(config(tmp_path, data_dir, **{**settings, "max_steps": 2}, resume="latest"))


def test_a_damaged_run_json_beside_a_checkpoint_of_another_folder_is_named_with_its_way_out(tmp_path, data_dir):
    """--overwrite (the advice for the run's own run.json) is refused with --resume, and would not mend it."""
    settings = dict(max_steps=2, checkpoint_every=2, num_validation=0)
    train(config(tmp_path, data_dir, "a", **settings))
    (tmp_path / "a/run.json").write_text("{")
    with pytest.raises(ValueError, match=r"a/run.json is damaged \(.*\); repair or delete it to resume from .*"
                       r"checkpoint-2 \(unchecked against its run\), or drop --resume"):  # fmt: skip
        train(config(tmp_path, data_dir, "b", **settings, resume=str(tmp_path / "a/checkpoint-2")))
    (tmp_path / "a/run.json").unlink()
    train(config(tmp_path, data_dir, "b", **settings, resume=str(tmp_path / "a/checkpoint-2")))


def test_overwrite_past_a_run_json_without_its_window_keeps_the_exports(tmp_path, data_dir, caplog):
    settings = dict(max_steps=1, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    (tmp_path / "run/run.json").write_text('{"config": {}, "data": {}}')
    with caplog.at_level("WARNING", logger="training.distill"):
        train(config(tmp_path, data_dir, **settings, overwrite=True))
    assert "run.json is damaged: the export of the run it described, if any, is left" in caplog.text


@pytest.mark.parametrize("name", ["run.json", "train.jsonl"])
def test_a_kill_while_run_json_or_a_log_is_rewritten_leaves_it_whole(tmp_path, data_dir, monkeypatch, name):
    settings = dict(max_steps=2, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    path = next((tmp_path / "run").rglob(name))
    before, write_text = path.read_text(), Path.write_text

    def killed_while_writing(self, data, *args, **kwargs):
        if self.name == name or self.name.startswith(f".{name}."):  # the file, or its temporary twin
            write_text(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            train(config(tmp_path, data_dir, **{**settings, "max_steps": 3}, resume="latest"))
    assert path.read_text() == before and not list(path.parent.glob(f".{name}.*"))


def test_l_attn_alone_trains_the_student_and_copy_mode_aligns_the_same_layers(tiny_pipeline_path):
    """L_attn reaches the student's projections (a detached capture logged it but trained nothing), and a copied
    teacher records the same layers as the student (all of them against a subset failed the alignment)."""

    def fresh() -> FluxTransformer2DModel:
        return FluxTransformer2DModel.from_pretrained(tiny_pipeline_path, subfolder="transformer").eval()

    for mode in ("shared", "copy"):
        student = Student(fresh(), window_size=1, teacher=mode, attn_layers=[0])
        assert student.teacher_capture.names == student.capture.names == ["transformer_blocks.0.attn"]
        inputs = transformer_inputs(student.transformer, (4, 4), text_len=8)
        with student.teacher() as teacher, student.teacher_capture.recording() as teacher_attn:
            velocity = teacher(**inputs)[0]
        with student.capture.recording() as student_attn:
            student_velocity = student.transformer(**inputs)[0]
        losses = distill_losses(
            student_velocity, velocity, velocity, student_attn, teacher_attn, torch.ones(1),
            out_weight=0.0, fm_weight=0.0, attn_weight=1.0,
        )  # fmt: skip
        assert losses.attn > 0
        losses.total.backward()
        q = student.trainable["transformer_blocks.0.attn.to_q.weight"]
        assert q.grad is not None and q.grad.abs().max() > 0, mode


def test_weighted_mse_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 1), torch.ones(2))


def test_distill_losses_refuses_unaligned_attention_lists():
    v = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="0 student and 1 teacher attention outputs"):
        distill_losses(v, v, v, [], [torch.zeros(2, 5, 6)], torch.ones(2))


def test_a_density_sample_of_exactly_one_maps_to_the_last_sigma():
    """The 'mode' density maps a uniform 0 to u = 1: one index past the schedule's end without the clamp."""
    sigmas = torch.linspace(1, 0.001, 1000)
    assert TimestepSampler(sigmas, "mode").from_uniform(torch.tensor([1.0])).item() == sigmas[-1].item()


def test_pooling_weights_train_without_lora(fresh_transformer):
    student = Student(fresh_transformer(), window_size=1, down_factor=2)
    spatial = [n for n in student.trainable if n.endswith("processor.spatial_weight")]
    assert len(spatial) == 3 and all(student.trainable[n].requires_grad for n in spatial)


def test_joint_block_capture_is_text_then_image(fresh_transformer):
    student = Student(fresh_transformer(), window_size=1, attn_layers=[0])
    seen = []
    h = student.transformer.transformer_blocks[0].attn.register_forward_hook(lambda m, a, o: seen.append(o))
    with student.capture.recording() as outputs, torch.no_grad():
        student.transformer(**transformer_inputs(student.transformer, (4, 4), text_len=8))
    h.remove()
    image, text = seen[0]
    torch.testing.assert_close(outputs[0], torch.cat([text, image], dim=1), atol=0, rtol=0)


def test_no_attention_layer_is_hooked_when_l_attn_is_off(tmp_path, data_dir):
    distiller = Distiller(config(tmp_path, data_dir, attn_weight=0.0, max_steps=1, num_validation=0))
    assert distiller.student.capture.names == []


def test_weighted_mse_refuses_weights_of_another_batch_size():
    """Broadcast, two weights for one sample gave their mean as its loss without a word."""
    with pytest.raises(ValueError, match=r"weighting \(2,\) must hold one weight per sample of the batch of 1"):
        weighted_mse(torch.ones(1, 3, 4), torch.zeros(1, 3, 4), torch.tensor([1.0, 3.0]))


def test_a_refused_student_leaves_the_model_as_it_was(fresh_transformer):
    t = fresh_transformer()
    with pytest.raises(ValueError, match="out of range"):
        Student(t, window_size=1, attn_layers=[99])
    assert clear_dit.patch_handle(t) is None
    assert all(p.requires_grad for p in t.parameters())


def test_a_student_of_a_patched_model_is_refused(fresh_transformer):
    t = fresh_transformer()
    clear_dit.patch(t, window_size=1)
    with pytest.raises(ValueError, match="patched"):
        Student(t, window_size=1)


def test_resume_latest_does_not_restart_a_finished_run_without_checkpoints(tmp_path, data_dir):
    """checkpoint_every=0: 'already holds a run; pass --resume latest to continue it' — which retrained from step 0
    and replaced the finished run's export and logs."""
    export = train(config(tmp_path, data_dir, max_steps=3, num_validation=0))
    before = export.read_bytes()
    with pytest.raises(FileExistsError, match="already holds a finished distillation run; pass --overwrite to start"):
        train(config(tmp_path, data_dir, max_steps=1, num_validation=0))  # not "pass --resume latest to continue it"
    with pytest.raises(FileExistsError, match="holds a finished run and no checkpoint to continue it from"):
        train(config(tmp_path, data_dir, max_steps=1, num_validation=0, resume="latest"))
    assert export.read_bytes() == before
    lines = (tmp_path / "run/logs/train.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_a_new_start_under_resume_latest_purges_the_killed_attempts_tensorboard_events(tmp_path, data_dir, monkeypatch):
    settings = dict(max_steps=3, checkpoint_every=3, num_validation=2)
    train_killed_in("train_step", 2, config(tmp_path, data_dir, **settings), monkeypatch)
    a_second_later()
    train(config(tmp_path, data_dir, resume="latest", **settings))
    events = EventAccumulator(str(tmp_path / "run/logs/distill"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3]
    assert [s.step for s in events.Scalars("validation/val_gap")] == [0, 3]


def test_overwrite_discards_a_killed_saves_temporary_checkpoint(tmp_path, data_dir, monkeypatch):
    settings = dict(max_steps=3, checkpoint_every=1, num_validation=0)
    train_killed_in("_save_hook", 2, config(tmp_path, data_dir, **settings), monkeypatch)
    assert (tmp_path / "run/.checkpoint-2.tmp").is_dir()  # up to a full trainable and optimizer state
    train(config(tmp_path, data_dir, max_steps=1, checkpoint_every=1, num_validation=0, overwrite=True))
    assert not list((tmp_path / "run").glob(".checkpoint-*.tmp"))


def test_a_polynomial_schedule_with_an_lr_at_its_end_is_refused_by_check(tmp_path, data_dir):
    """diffusers' polynomial schedule decays to lr_end=1e-7 and refuses an lr at or below it, naming lr_end (no
    flag), after the model is loaded (and in every DDP process)."""
    with pytest.raises(ValueError, match="--lr-scheduler polynomial decays the rate to 1e-7: --lr must be above it"):
        config(tmp_path, data_dir, lr=1e-7, lr_scheduler="polynomial").check()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_steps=2.5), "--max-steps must be an int, got 2.5"),  # ran 3 steps and no final validation
        (dict(lr=float("nan")), "--lr must be finite, got nan"),
        (dict(fm_weight=float("inf")), "--fm-weight must be finite, got inf"),
    ],
)
def test_check_refuses_non_integer_counts_and_non_finite_rates(tmp_path, data_dir, overrides, message):
    """The Python API's settings (the CLI's types refuse these): each failed late, or named the wrong setting."""
    with pytest.raises(ValueError, match=re.escape(message)):
        config(tmp_path, data_dir, **overrides).check()


def test_a_stale_temporary_checkpoint_of_the_same_step_is_not_carried_into_the_checkpoint(tmp_path, data_dir):
    distiller = Distiller(config(tmp_path, data_dir, max_steps=1, checkpoint_every=1, num_validation=0))
    stale = tmp_path / "run/.checkpoint-1.tmp"
    stale.mkdir(parents=True)
    (stale / "random_states_1.pkl").write_bytes(b"left by a killed 2-process save")
    distiller.fit()
    assert not (tmp_path / "run/checkpoint-1/random_states_1.pkl").exists()


def test_a_partly_deleted_later_checkpoint_is_replaced_when_its_step_is_saved_again(tmp_path, data_dir):
    """A kill while a resume deleted the abandoned attempt's later checkpoint (trainable file gone first) leaves a
    folder that is no checkpoint; the resumed run reaching that step replaces it."""
    settings = dict(checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, max_steps=2, **settings))
    partial = tmp_path / "run/checkpoint-3"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"half deleted")
    train(config(tmp_path, data_dir, max_steps=3, resume="latest", **settings))
    assert (partial / "trainable.safetensors").is_file() and (partial / "optimizer.bin").read_bytes() != b"half deleted"


def test_a_resumed_runs_checkpoint_records_its_own_initial_lr(tmp_path, data_dir):
    """Behaviourally near-equivalent (LambdaLR reads initial_lr only when built with last_epoch >= 0): the saved
    optimizer groups say the rate the resumed run was given, as run.json does."""
    import torch

    settings = dict(max_steps=1, checkpoint_every=1, num_validation=0)
    train(config(tmp_path, data_dir, **settings))
    train(config(tmp_path, data_dir, **{**settings, "max_steps": 2, "lr": 2e-3, "resume": "latest"}))
    state = torch.load(tmp_path / "run/checkpoint-2/optimizer.bin", weights_only=False)
    assert [g["initial_lr"] for g in state["param_groups"]] == [2e-3]
