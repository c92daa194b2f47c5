"""High-resolution pipeline on the tiny FLUX model: stages, seeds, CLEAR only where asked, the model left as found."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clear_dit
from app.cli import main
from pipelines.highres import HighResFluxPipeline, parse_stages
from pipelines.loading import default_max_sequence_length
from pipelines.stages import check_highres_inputs

REPO = Path(__file__).resolve().parents[1]

STAGES = [(64, 48), (128, 96)]  # (width, height): not square, so a swapped axis shows
FAST = dict(prompt="a red circle", num_inference_steps=2, strength=0.7)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_path):
    return HighResFluxPipeline.from_pretrained(tiny_pipeline_path)


def model_state(pipe):
    """Everything a call may touch, to compare before and after."""
    return dict(
        processors=dict(pipe.transformer.attn_processors),
        theta=pipe.transformer.pos_embed.theta,
        tiling=pipe.vae.use_tiling,
        weights={k: v.clone() for k, v in pipe.transformer.state_dict().items()},
    )


def assert_same_state(pipe, before):
    after = model_state(pipe)
    assert after["processors"].keys() == before["processors"].keys()
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert (after["theta"], after["tiling"]) == (before["theta"], before["tiling"])
    assert after["weights"].keys() == before["weights"].keys()
    for name, value in before["weights"].items():
        torch.testing.assert_close(after["weights"][name], value, atol=0, rtol=0)
    assert clear_dit.patch_handle(pipe) is None


@pytest.fixture(scope="module")
def student_file(pipe, tmp_path_factory):
    """A CLEAR checkpoint (r=2, d=2) whose attention weights differ from the tiny model's."""
    with clear_dit.patch(pipe, window_size=2, down_factor=2):
        tensors = {k: v + 0.05 for k, v in clear_dit.clear_state_dict(pipe).items()}
    path = tmp_path_factory.mktemp("weights") / "student.safetensors"
    save_file(tensors, str(path), metadata={"window_size": "2", "down_factor": "2"})
    return path, tensors


def test_stage_sizes_and_seeded_determinism(pipe):
    out = pipe(**FAST, stages=STAGES, seed=3, output_type="np")
    assert [images.shape for images in out.stage_images] == [(1, 48, 64, 3), (1, 96, 128, 3)]
    assert out.images is out.stage_images[-1]
    generators = [torch.Generator().manual_seed(3 + i) for i in range(len(STAGES))]  # what seed=3 means
    again = pipe(**FAST, stages=STAGES, generator=generators, output_type="np")
    for first, second in zip(out.stage_images, again.stage_images, strict=True):
        np.testing.assert_array_equal(first, second)
    other = pipe(**FAST, stages=STAGES, seed=4, output_type="np")
    assert not np.array_equal(out.images, other.images)


def test_true_cfg_in_every_stage(pipe):
    """One stage is FluxPipeline itself, true CFG included; upscaling stages are guided too."""
    from diffusers import FluxPipeline

    cfg = dict(negative_prompt="a blue square", true_cfg_scale=4.0)
    out = pipe(**FAST, stages=STAGES[:1], seed=3, output_type="np", enable_vae_tiling=False, **cfg)
    reference = FluxPipeline.from_pipe(pipe)(
        FAST["prompt"],
        width=STAGES[0][0],
        height=STAGES[0][1],
        num_inference_steps=FAST["num_inference_steps"],
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        max_sequence_length=default_max_sequence_length(pipe),
        **cfg,
    ).images
    np.testing.assert_allclose(out.images, reference, atol=1e-5)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(pipe.stage_index))
    try:
        pipe(**FAST, stages=STAGES, seed=3, output_type="np")
        plain, calls[:] = list(calls), []
        pipe(**FAST, stages=STAGES, seed=3, output_type="np", **cfg)
    finally:
        hook.remove()
    assert sorted(set(plain)) == [0, 1]
    assert calls == [stage for stage in plain for _ in range(2)]  # two passes per step, in every stage


def test_clear_ntk_tiling_only_while_upscaling_and_callback_per_step(pipe):
    before = model_state(pipe)
    seen = []

    def callback(p, step, timestep, kwargs):
        processor = next(iter(p.transformer.attn_processors.values()))
        clear = isinstance(processor, clear_dit.CLEARFluxAttnProcessor)
        seen.append((p.stage_index, step, clear, clear and processor.proportional_attention))
        seen[-1] += (p.transformer.pos_embed.theta, p.vae.use_tiling)
        return kwargs

    pipe(**FAST, stages=STAGES, seed=0, ntk_factor=4.0, output_type="latent", callback_on_step_end=callback)
    theta = before["theta"]
    assert seen == [
        (0, 0, False, False, theta, True),
        (0, 1, False, False, theta, True),
        (1, 0, True, True, 4 * theta, True),
        (1, 1, True, True, 4 * theta, True),
    ]
    assert_same_state(pipe, before)

    pipe.vae.enable_tiling()  # the caller's own setting survives too
    try:
        tiling = []
        pipe(**FAST, stages=STAGES[:1], seed=0, enable_vae_tiling=False, output_type="latent",
             callback_on_step_end=lambda p, step, t, kwargs: tiling.append(p.vae.use_tiling) or kwargs)  # fmt: skip
        assert tiling == [False, False]
        assert pipe.vae.use_tiling
    finally:
        pipe.vae.disable_tiling()


def test_a_clear_base_stage_and_ntk_scaled_once_over_three_stages(pipe):
    """base_attention='clear' (the web UI's CLEAR mode) patches stage 0 too; NTK scales theta once, not per stage."""
    seen = []

    def callback(p, step, timestep, kwargs):
        processor = next(iter(p.transformer.attn_processors.values()))
        seen.append((p.stage_index, getattr(processor, "down_factor", None), p.transformer.pos_embed.theta))
        return kwargs

    theta = pipe.transformer.pos_embed.theta
    pipe("a red circle", stages=[(32, 32), (64, 64), (128, 128)], num_inference_steps=[1, 1, 1], strength=0.5,
         base_attention="clear", window_size=2, down_factor=2, ntk_factor=4.0, seed=0, output_type="latent",
         callback_on_step_end=callback)  # fmt: skip
    assert seen == [(0, 2, theta), (1, 2, 4 * theta), (2, 2, 4 * theta)]
    assert pipe.transformer.pos_embed.theta == theta and clear_dit.patch_handle(pipe) is None


def test_the_base_stage_image_is_the_one_stage_image(pipe):
    """What stage 0 hands on (and returns) is the plain image of its own run, not a converted copy."""
    run = dict(prompt="a red circle", num_inference_steps=2, seed=0)
    alone = pipe(**run, stages=STAGES[:1]).images[0]
    staged = pipe(**run, stages=STAGES, strength=0.5).stage_images[0][0]
    assert alone.mode == staged.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(staged))


def test_0d_tensors_and_arrays_run_as_their_floats(pipe):
    """A 0-d time_shift failed in diffusers' scheduler after the base stage; a bf16 ntk_factor rounded theta."""
    run = dict(prompt="a red circle", num_inference_steps=2, stages=STAGES, seed=3, output_type="np")
    reference = pipe(**run, time_shift=3.0, ntk_factor=2.5).images
    for number in (torch.tensor, np.array, lambda v: torch.tensor(v, dtype=torch.bfloat16)):
        np.testing.assert_array_equal(pipe(**run, time_shift=number(3.0), ntk_factor=number(2.5)).images, reference)


def test_stage_checks_at_their_edges():
    check_highres_inputs([(64, 64), (128, 128)], [1.0])
    check_highres_inputs([(64, 64), (128, 128)], [torch.tensor(0.5)], ntk_factor=np.float32(2))  # 0-d numbers
    with pytest.raises(ValueError, match=r"strength of stage 1 must be in \(0, 1\], got tensor\(True\)"):
        check_highres_inputs([(64, 64), (128, 128)], [torch.tensor(True)])
    with pytest.raises(ValueError, match=r"strength of stage 1 must be in \(0, 1\], got array\('0.5'"):
        check_highres_inputs([(64, 64), (128, 128)], [np.array("0.5")])
    for bad, shown in [(math.inf, "inf"), (10**5000, "<an int of 16610 bits>"), (Fraction(1, 10**400), "Fr")]:
        with pytest.raises(ValueError, match=f"ntk_factor must be > 0 and finite, got {shown}"):  # 0.0 as a float
            check_highres_inputs([(64, 64), (128, 128)], [0.5], ntk_factor=bad)
    check_highres_inputs([(48, 48), (128, 128)], [0.5], down_factor=4)  # a full-attention base stage: 16 px
    check_highres_inputs([(64, 64), (64, 128)], [0.5])  # one side may stay
    check_highres_inputs([(64, 64), (128, 64)], [0.5])
    with pytest.raises(ValueError, match=r"stage 0 size 48x48 must be positive multiples of 64"):
        check_highres_inputs([(48, 48), (128, 128)], [0.5], base_attention="clear", down_factor=4)
    with pytest.raises(ValueError, match=r"stage sizes must increase: stage 1 \(48x128\)"):
        check_highres_inputs([(64, 64), (48, 128)], [0.5])
    with pytest.raises(ValueError, match=r"stage 0 size 0x64 must be positive multiples of 16"):
        check_highres_inputs([(0, 64)], [])
    huge = 10**5000  # more digits than Python prints: named by its size
    with pytest.raises(ValueError, match=r"stage 1 size <an int of 16610 bits>x64 must be positive multiples of 16"):
        check_highres_inputs([(64, 64), (huge + 8, 64)], [0.5])
    with pytest.raises(ValueError, match=r"stage 1 size 64x<an int of 16614 bits> must be .* at most 65536$"):
        check_highres_inputs([(128, 64), (64, 16 * huge)], [0.5])  # PIL's resize failed after the base stage
    check_highres_inputs([(64, 64), (65536, 64)], [0.5])
    with pytest.raises(ValueError, match=r"stage 1 size 65552x64 must be positive multiples of 16 .*, at most 65536"):
        check_highres_inputs([(64, 64), (65552, 64)], [0.5])
    for name in ("guidance_scale", "true_cfg_scale"):  # nan ran into black images, 1e39 failed mid-run
        for scale in (float("nan"), float("inf"), 1e39, -1.0, "2"):
            with pytest.raises(ValueError, match=rf"^{name} must be >= 0 and finite \(at most 3.4e\+38\), got"):
                check_highres_inputs([(64, 64), (128, 128)], [0.5], **{name: scale})
        check_highres_inputs([(64, 64), (128, 128)], [0.5], **{name: 0})
    with pytest.raises(ValueError, match=r"ntk_factor must be > 0 and finite, got 0"):
        check_highres_inputs([(64, 64), (128, 128)], [0.5], ntk_factor=0)


def test_student_weights_only_in_clear_stages(pipe, student_file):
    path, tensors = student_file
    before = model_state(pipe)
    name = "transformer_blocks.0.attn.to_q.weight"
    seen = []

    def callback(p, step, timestep, kwargs):
        processor = next(iter(p.transformer.attn_processors.values()))
        weight = p.transformer.state_dict()[name]
        clear = [getattr(processor, key, None) for key in ("window_size", "down_factor")]
        seen.append((p.stage_index, *clear, torch.equal(weight, tensors[name])))
        return kwargs

    pipe(
        **FAST,
        stages=[(64, 64), (128, 128)],
        seed=0,
        clear_weights=path,
        output_type="latent",
        callback_on_step_end=callback,
    )
    assert seen == [(0, None, None, False), (0, None, None, False), (1, 2, 2, True), (1, 2, 2, True)]  # the file's r, d
    assert_same_state(pipe, before)


def test_each_stage_draws_from_its_own_generator(pipe):
    run = dict(FAST, stages=[(64, 48), (128, 96)], output_type="latent")
    a = pipe(**run, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]).stage_images
    b = pipe(**run, generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(99)]).stage_images
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    assert not torch.equal(a[1], b[1])


def test_model_restored_after_an_exception_in_a_stage(pipe, student_file):
    before = model_state(pipe)

    def fail_in_upscale(p, step, timestep, kwargs):
        if p.stage_index == 1:
            raise RuntimeError("boom")
        return kwargs

    with pytest.raises(RuntimeError, match="boom"):
        pipe(**FAST, stages=[(64, 64), (128, 128)], clear_weights=student_file[0], callback_on_step_end=fail_in_upscale)
    assert_same_state(pipe, before)


def test_interrupt_stops_remaining_stages(pipe):
    def interrupt(p, step, timestep, kwargs):
        p._interrupt = True
        return kwargs

    calls = []
    out = pipe(**FAST, stages=STAGES, seed=0, callback_on_step_end=lambda *a: calls.append(a) or interrupt(*a))
    assert len(out.stage_images) == 1 and out.images[0].size == STAGES[0]
    assert len(calls) == 1  # the stage stops at its next step too, as FluxPipeline does


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(stages=[(64, 72)]), r"stage 0 size 64x72 must be positive multiples of 16"),
        (
            dict(stages=[(64, 64), (96, 96)], down_factor=4),
            r"stage 1 size 96x96 .* multiples of 64 \(16\*d, CLEAR down factor d=4\)",
        ),
        (dict(stages=[(128, 128), (64, 64)]), r"stage sizes must increase: stage 1 \(64x64\)"),
        (dict(stages=[(64, 64), (64, 64)]), r"stage sizes must increase"),
        (dict(stages=[(64, 64), (128, 128)], strength=0.0), r"strength of stage 1 must be in \(0, 1\], got 0.0"),
        (dict(stages=[(64, 64), (128, 128)], strength=1.5), r"strength of stage 1 must be in \(0, 1\]"),
        (dict(stages=[(64, 64), (128, 128)], strength=[0.5, 0.5]), r"strength has 2 entries; expected one per"),
        (dict(stages=[(64, 64), (128, 128)], strength="0.7"), r"strength of stage 1 must be in \(0, 1\], got '0.7'"),
        (dict(stages=[(64, 64), (128, 128)], strength=None), r"strength of stage 1 must be in \(0, 1\], got None"),
        (dict(stages=[(64, 64), (128, 128)], ntk_factor="2"), r"ntk_factor must be > 0 and finite, got '2'"),
        (dict(stages=[(64, 64), (128, 128)], time_shift="3"), r"time_shift must be in .*, got '3'"),
        (dict(stages=[]), r"stages is empty; give at least one \(width, height\)"),
        (dict(stages=[], strength=[]), r"stages is empty; give at least one \(width, height\)"),  # not "-1 entries"
        (
            dict(stages=[(64, 64), (128, 128)], seed=2**64 - 1),
            r"seed must be a whole number in \[-2\*\*63, 2\*\*64 - 2\]",
        ),
        (dict(stages=[(64, 64)], seed=1.5), r"seed must be a whole number in \[-2\*\*63, 2\*\*64 - 1\], got 1.5"),
        (dict(stages=[(64, 64)], seed=-(2**63) - 1), r"seed must be a whole number in \[-2\*\*63, 2\*\*64 - 1\]"),
        (dict(stages=[(64, 64)], seed=10**400), r"seed must be a whole number in \[-2\*\*63, 2\*\*64 - 1\]"),
        (
            dict(stages=[(64, 64)], seed=-(10**5000)),
            r"2\*\*64 - 1\], got <a negative int of 16610 bits>$",
        ),  # unprintable
        (dict(stages=[(10**400, 64)]), r"stages must be \(width, height\) pairs"),  # past float's range
        (dict(stages=[(10**5000, 64)]), r"pairs or a 'WxH,WxH' string, got \[\(<an int of 16610 bits>, 64\)\]$"),
        (dict(stages=[(64, 64), (128, 128)], strength=10**5000), r"\(0, 1\], got <an int of 16610 bits>$"),
        (dict(stages=[(64, 64), (128, 128)], time_shift=10**5000), r"dynamic shift\), got <an int of 16610 bits>$"),
        (dict(stages=[(64, 64)], seed=0, generator=torch.Generator()), r"either seed or generator"),
        (
            dict(stages=[(64, 64)], num_images_per_prompt=0),
            r"num_images_per_prompt must be a whole number >= 1, got 0$",
        ),
        (dict(stages=[(64, 64)], num_images_per_prompt=1.5), r"num_images_per_prompt must be a whole number >= 1"),
        (dict(stages=[(64, 64)], output_type="jpg"), r"output_type must be one of"),
        (dict(stages=[(64, 64), (128, 128)], guidance_scale=float("nan")), r"guidance_scale must be >= 0 and fin"),
        (dict(stages=[(64, 64), (128, 128)], time_shift=0.0), r"time_shift must be in \[1e-06, 1e\+06\] .*, got 0.0"),
        (dict(stages=[(64, 64), (128, 128)], time_shift=-1.0), r"time_shift must be in \["),
        (dict(stages=[(64, 64), (128, 128)], time_shift=1e39), r"time_shift must be in .*, got 1e\+39"),
        (dict(stages=[(64, 64), (128, 128)], time_shift=1e-20), r"time_shift must be in .*, got 1e-20"),
        (dict(stages=[(64, 64), (128, 128)], window_size=0), r"window_size must be a positive int .*, got 0"),
        (dict(stages=[(64, 64), (128, 128)], down_factor=0), r"down_factor must be a positive int .*, got 0"),
        (dict(stages=[(64, 64), (128, 128)], backend="bogus"), r"unknown backend 'bogus'"),
        (dict(stages=[(64, 64), (128, 128)], proportional_attention="false"), r"proportional_attention must be True"),
        # each of these failed in the first upscale stage, after the whole base stage
        (dict(stages=[(64, 64), (128, 128)], resample="lanczos"), r"resample must be a PIL.Image.Resampling filter"),
        (dict(stages=[(64, 64), (128, 128)], strength=1e-17), r"upscale stage 1: strength 1e-17 of 2 steps runs no"),
        (
            dict(stages=[(64, 64), (128, 128)], num_images_per_prompt=2, generator=[None, [torch.Generator()] * 3]),
            r"generator of stage 1 has 3 entries; expected one per image \(2\)$",
        ),
        (dict(stages=[(64, 64), (128, 128)], strength=[0.5, 0.5]), r"expected one per upscale stage \(1\)$"),
    ],
)
def test_bad_input_is_a_clear_value_error_before_any_step(pipe, kwargs, message):
    steps = []

    def callback(p, step, timestep, callback_kwargs):
        steps.append((p.stage_index, step))
        return callback_kwargs

    with pytest.raises(ValueError, match=message):
        pipe("a red circle", num_inference_steps=2, callback_on_step_end=callback, **kwargs)
    assert steps == []  # not after a whole base stage


def test_weights_that_do_not_fit_the_model_fail_before_any_step(pipe, student_file, tmp_path):
    steps = []

    def callback(p, step, timestep, callback_kwargs):
        steps.append((p.stage_index, step))
        return callback_kwargs

    run = dict(stages=[(64, 64), (128, 128)], num_inference_steps=2, callback_on_step_end=callback)
    tensors = dict(student_file[1])
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    short = tmp_path / "short.safetensors"
    save_file(tensors, str(short), metadata={"window_size": "2", "down_factor": "2"})
    with pytest.raises(
        ValueError, match=rf"short.safetensors does not match FluxTransformer2DModel: missing keys: {dropped}"
    ):
        pipe("a red circle", clear_weights=short, **run)
    pipe.transformer.fuse_qkv_projections()
    try:
        with pytest.raises(ValueError, match=r"cannot load CLEAR weights of a model with fused QKV projections"):
            pipe("a red circle", clear_weights=student_file[0], **run)
    finally:
        pipe.transformer.unfuse_qkv_projections()
    assert steps == []  # not after a whole base stage


def test_several_prompts_and_images_per_prompt_match_single_prompt_runs(pipe):
    """Each image of a batch is the one its prompt and its own generators give alone, true CFG included."""

    def generators(*seeds):  # per stage, one generator per image
        return [[torch.Generator().manual_seed(100 * stage + s) for s in seeds] for stage in range(len(STAGES))]

    prompts, cfg = ["a red circle", "a blue square"], dict(negative_prompt="", true_cfg_scale=2.0)
    common = dict(stages=STAGES, num_inference_steps=2, num_images_per_prompt=2, output_type="np", **cfg)
    batch = pipe(prompts, generator=generators(0, 1, 2, 3), **common).images
    assert batch.shape == (4, *STAGES[-1][::-1], 3)
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, generator=generators(2 * i, 2 * i + 1), **common).images
        np.testing.assert_allclose(batch[2 * i : 2 * i + 2], alone, atol=1e-4)


def test_read_weights_object_takes_the_radius_given(pipe, student_file):
    windows = []

    def callback(p, step, timestep, kwargs):
        processor = next(iter(p.transformer.attn_processors.values()))
        windows.append((p.stage_index, getattr(processor, "window_size", None), getattr(processor, "down_factor", 1)))
        return kwargs

    weights = clear_dit.read_weights(student_file[0])  # r=2, d=2 in its metadata
    run = dict(stages=[(64, 64), (128, 128)], seed=0, output_type="latent", callback_on_step_end=callback)
    pipe(**FAST, clear_weights=weights, window_size=4, **run)
    pipe(**FAST, clear_weights=student_file[0], window_size=4, **run)
    assert windows == [(0, None, 1), (0, None, 1), (1, 4, 2), (1, 4, 2)] * 2


def test_patched_transformer_is_refused(pipe):
    with clear_dit.patch(pipe, window_size=2), pytest.raises(ValueError, match="already CLEAR-patched"):
        pipe("a red circle", stages=[(64, 64)])


def test_from_pipe_shares_the_components(pipe):
    from diffusers import FluxPipeline

    base = FluxPipeline(**pipe.components)
    highres = HighResFluxPipeline.from_pipe(base)
    assert highres.transformer is base.transformer and highres.vae is base.vae


def test_parse_stages():
    assert parse_stages("1024x768, 2048X1536") == [(1024, 768), (2048, 1536)]
    with pytest.raises(ValueError, match=r"'1024' is not WIDTHxHEIGHT"):
        parse_stages("1024")
    with pytest.raises(ValueError, match=r"^stage size '1+\.\.\.1+x64' is not WIDTHxHEIGHT"):
        parse_stages("64x64," + "1" * 5000 + "x64")  # more digits than int() reads, shortened in the message


def test_cli_writes_final_and_stage_pngs(tiny_pipeline_path, tmp_path):
    out = tmp_path / "big.png"
    args = ["highres", "--prompt", "a red circle", "--stages", "64x64,128x96", "--steps", "2", "--seed", "1"]
    args += ["--window", "2", "--down", "2", "--ntk", "4", "--save-stages", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out} (128x96)" in proc.stdout
    with Image.open(out) as final, Image.open(tmp_path / "big-stage0.png") as base:
        assert (final.size, base.size) == ((128, 96), (64, 64))
        settings = json.loads(final.text["clear-dit"])
    assert settings["stages"] == "64x64,128x96" and (settings["window"], settings["down"], settings["ntk"]) == (2, 2, 4)


def test_cli_records_the_clear_settings_in_effect(tmp_path, capsys):
    out = tmp_path / "big.png"
    args = ["highres", "--prompt", "a red circle", "--stages", "64x64,128x128", "--steps", "1", "--out", str(out)]
    assert main(args) == 0
    with Image.open(out) as image:
        settings = json.loads(image.text["clear-dit"])
    assert (settings["window"], settings["down"]) == (16, 1)  # the defaults the run used, not null


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stages", "128x128,64x64"], "error: stage sizes must increase"),
        (["--stages", "64x64,96x96", "--down", "4"], "error: stage 1 size 96x96 must be positive multiples of 64"),
        (["--stages", "64x64,128x128", "--strength", "1.5"], "error: strength of stage 1 must be in (0, 1]"),
        (["--stages", "64x64,128x128", "--ntk", "0"], "error: --ntk must be > 0"),
        (
            ["--stages", "64x64,128x128", "--time-shift", "0"],
            "error: --time-shift must be in [1e-06, 1e+06], got 0.0\n",
        ),
        (["--stages", "64"], "error: stage size '64' is not WIDTHxHEIGHT"),
        (["--stages", "64x64", "--weights", "missing.safetensors"], "error: weights file not found"),
        (["--stages", "64x64,128x128", "--out", "x.jpg"], "error: --out must be a .png file"),
        (["--stages", "64x64,128x128", "--out", "{existing}"], "exists; pass --overwrite"),
        (["--stages", "64x64", "--window", "8"], "error: --stages 64x64 has no upscale stage: give two or more sizes"),
        (["--stages", "64x64,128x128", "--guidance", "-1"], "error: --guidance must be >= 0, got -1.0"),
        (["--stages", "64x64,128x128", "--window", "0"], "error: --window must be at least 1, got 0"),
        (["--stages", "64x64,128x128", "--weights", "{existing}"], "taken.png is not a readable safetensors file"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"mine")
    args = [a.replace("{existing}", str(existing)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out.png")]  # a run let through writes nothing here
    code = main(["highres", "--prompt", "a red circle", *out, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert existing.read_bytes() == b"mine"


def test_guidance_scale_reaches_every_stage(pipe):
    """FLUX.1-dev's guidance embedding: upscale stages given the default while the PNG recorded the user's."""
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((p.stage_index, p.guidance_scale))
        return kwargs

    pipe("a red circle", stages=[(64, 48), (128, 96)], num_inference_steps=2, strength=0.5, guidance_scale=2.0,
         seed=0, output_type="latent", callback_on_step_end=callback)  # fmt: skip
    assert {stage for stage, _ in seen} == {0, 1} and all(scale == 2.0 for _, scale in seen), seen


def test_an_upscale_stage_starts_from_the_image_before_it(pipe, caplog):
    """FluxImg2ImgPipeline's start step rounds down: 2 steps at strength 0.7 start at sigma 1 (pure noise), so the
    stage ignores the image it is given; at 0.5 it starts one step in. Stage 0 drawn from other noise (its own
    generator), stage 1 from the same: the final images differ only if stage 1 used stage 0's image."""

    def final(stage0_seed: int, strength: float) -> np.ndarray:
        generators = [torch.Generator().manual_seed(s) for s in (stage0_seed, 7)]
        kwargs = dict(prompt="a red circle", num_inference_steps=2, strength=strength)
        return pipe(**kwargs, stages=STAGES, generator=generators, output_type="np").images

    assert not np.array_equal(final(1, 0.5), final(2, 0.5))
    with caplog.at_level("WARNING", logger="pipelines.highres"):
        assert np.array_equal(final(1, 0.7), final(2, 0.7))  # what the warning is about
    assert "upscale stage 1: strength 0.7 of 2 steps starts from pure noise" in caplog.text


def test_text_encoder_lora_scale_callback_attributes_and_input_checks(pipe, monkeypatch):
    scales, seen = [], []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda **kw: scales.append(kw.get("lora_scale")) or encode(**kw))

    def callback(p, step, timestep, kwargs):
        seen.append((p.guidance_scale, p.current_timestep is not None, p.joint_attention_kwargs))
        return kwargs

    pipe(**FAST, stages=STAGES[:1], seed=0, joint_attention_kwargs={"scale": 0.5}, callback_on_step_end=callback)
    assert scales == [0.5]  # FluxPipeline scales its text encoders' LoRA layers by the same scale
    pipe(**FAST, stages=STAGES[:1], joint_attention_kwargs={"scale": 0.5}, negative_prompt="", true_cfg_scale=2.0)
    assert scales == [0.5] * 3  # the negative prompt's encoding too
    assert seen and all(s == (3.5, True, {"scale": 0.5}) for s in seen)

    embeds, pooled, _ = encode(prompt="a red circle", max_sequence_length=default_max_sequence_length(pipe))
    with pytest.raises(ValueError, match="pass prompt or prompt_embeds .*, not both"):
        pipe(**FAST, stages=STAGES[:1], prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match=r"num_inference_steps must be whole numbers >= 1 for every stage, got 1.9"):
        pipe(**{**FAST, "num_inference_steps": 1.9}, stages=STAGES[:1])
    with pytest.raises(ValueError, match=r"num_inference_steps has 3 entries; expected one per stage \(2\)"):
        pipe(**{**FAST, "num_inference_steps": [2, 2, 2]}, stages=STAGES)
    same = pipe(**{**FAST, "num_inference_steps": 2.0}, stages=np.array([[64, 48]]), seed=0, output_type="np").images
    assert same.shape == (1, 48, 64, 3)  # whole numbers of any type, stages as a numpy array
    with pytest.raises(ValueError, match=r"stages must be \(width, height\) pairs"):
        pipe(**FAST, stages=[(64, 48, 3)])
    one = pipe(**FAST, stages="64x48", seed=0, output_type="np").images  # the CLI's string form
    assert one.shape == (1, 48, 64, 3)


def test_weights_under_sequential_offload_are_refused_before_the_base_stage(tiny_pipeline_path, student_file):
    offloaded = HighResFluxPipeline.from_pretrained(tiny_pipeline_path)
    offloaded.enable_sequential_cpu_offload(device="cpu")
    calls = []
    offloaded.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="cannot load CLEAR weights of a model under sequential CPU offload"):
        offloaded(**FAST, stages=STAGES, seed=0, clear_weights=str(student_file[0]))
    assert not calls  # refused before the base stage ran


def test_cli_checks_sizes_against_the_weights_files_down_factor_before_loading(student_file, tmp_path, monkeypatch,
                                                                                capsys):  # fmt: skip
    import pipelines.loading

    monkeypatch.setattr(pipelines.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    args = ["highres", "--prompt", "x", "--stages", "48x48,80x80", "--weights", str(student_file[0])]
    assert main([*args, "--out", str(tmp_path / "x.png")]) == 2  # d = 2 from the file: multiples of 32
    assert "multiples of 32" in capsys.readouterr().err


def test_steps_and_strengths_per_stage_and_proportional_attention_as_given(pipe):
    """Three stages: stage i runs its own step count at its own strength (FluxImg2ImgPipeline runs
    int(steps * strength) of them), and CLEAR's proportional attention is what was asked, on or off."""
    seen = []

    def callback(p, step, timestep, kwargs):
        processor = next(iter(p.transformer.attn_processors.values()))
        seen.append((p.stage_index, getattr(processor, "proportional_attention", None)))
        return kwargs

    stages = [(32, 32), (64, 48), (128, 96)]
    for proportional in (False, True):
        seen.clear()
        pipe(
            prompt="a red circle",
            stages=stages,
            num_inference_steps=[2, 4, 8],
            strength=[0.5, 0.25],
            proportional_attention=proportional,
            seed=0,
            output_type="latent",
            callback_on_step_end=callback,
        )
        assert seen == [(0, None)] * 2 + [(1, proportional)] * 2 + [(2, proportional)] * 2


def test_upscale_stage_runs_the_fixed_time_shift_on_the_resized_image_before_it(pipe, monkeypatch):
    """Stage 1 (4 steps at strength 0.5: FluxImg2ImgPipeline starts at step 2 of sigmas 1, .75, .5, .25) under the
    fixed shift 3: sigma' = 3 s / (1 + 2 s) gives timesteps 750 and 500, by hand; a dynamic shift would not.
    Its input is stage 0's image resized to (width, height)."""
    from diffusers import FluxImg2ImgPipeline

    seen, inputs, call = [], [], FluxImg2ImgPipeline.__call__

    def recording(stage_pipe, *args, **kwargs):
        inputs.append(kwargs["image"][0].copy())
        return call(stage_pipe, *args, **kwargs)

    monkeypatch.setattr(FluxImg2ImgPipeline, "__call__", recording)

    def callback(p, step, timestep, kwargs):
        seen.append((p.stage_index, round(float(timestep))))
        return kwargs

    out = pipe(prompt="a red circle", num_inference_steps=4, strength=0.5, stages=STAGES, seed=0, time_shift=3.0,
               callback_on_step_end=callback)  # fmt: skip
    assert [t for stage, t in seen if stage == 1] == [750, 500]
    expected = out.stage_images[0][0].resize(STAGES[1], Image.Resampling.LANCZOS)
    assert inputs[0].size == STAGES[1] and np.array_equal(np.asarray(inputs[0]), np.asarray(expected))
    seen.clear()  # the value given, not the scheduler config's shift (3 too): unshifted, 500 and 250
    pipe(prompt="a red circle", num_inference_steps=4, strength=0.5, stages=STAGES, seed=0, time_shift=1.0,
         output_type="latent", callback_on_step_end=callback)  # fmt: skip
    assert [t for stage, t in seen if stage == 1] == [500, 250]


def test_one_generator_serves_every_stage_reproducibly(pipe):
    run = dict(FAST, stages=STAGES, output_type="np")
    first = pipe(**run, generator=torch.Generator().manual_seed(5)).images
    np.testing.assert_array_equal(pipe(**run, generator=torch.Generator().manual_seed(5)).images, first)
    assert not np.array_equal(pipe(**run, generator=torch.Generator().manual_seed(6)).images, first)


def test_the_callers_progress_bar_config_reaches_every_stage(pipe, capfd):
    pipe.set_progress_bar_config(disable=True)
    try:
        capfd.readouterr()
        pipe(**FAST, stages=STAGES, seed=0, output_type="latent")
        assert "stage" not in capfd.readouterr().err
    finally:
        pipe.set_progress_bar_config(disable=False)
    pipe(**FAST, stages=STAGES, seed=0, output_type="latent")
    assert "stage 2/2" in capfd.readouterr().err


@pytest.mark.parametrize("steps", [0, [2, 0]])
def test_zero_steps_is_a_clear_error(pipe, steps):
    with pytest.raises(ValueError, match=r"num_inference_steps must be whole numbers >= 1 for every stage, got"):
        pipe(prompt="a red circle", num_inference_steps=steps, stages=STAGES)


def test_a_step_count_past_floats_range_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match=r"num_inference_steps must be whole numbers >= 1 for every stage"):
        pipe(prompt="a red circle", num_inference_steps=10**400, stages=STAGES)
    with pytest.raises(ValueError, match=r"for every stage, got <an int of 16610 bits>$"):  # more digits than print
        pipe(prompt="a red circle", num_inference_steps=10**5000, stages=STAGES)


def test_mismatched_embeddings_and_an_empty_prompt_list_fail_before_any_step(pipe):
    """Pooled embeddings of another batch failed inside the model after the base stage (or were broadcast);
    an empty prompt list failed with an IndexError from the tokenizer."""
    embeds, pooled, _ = pipe.encode_prompt(prompt="a red circle", prompt_2=None, max_sequence_length=32)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds has 2 rows, prompt_embeds 1$"):
        pipe(stages=STAGES, prompt_embeds=embeds, pooled_prompt_embeds=pooled.repeat(2, 1), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds has 1 rows, prompt_embeds 2$"):
        pipe(stages=STAGES, prompt_embeds=embeds.repeat(2, 1, 1), pooled_prompt_embeds=pooled, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt is an empty list: pass one prompt or more"):
        pipe(prompt=[], stages=STAGES, num_inference_steps=2)


def test_per_stage_values_as_numpy_arrays_are_taken_as_stages_are(pipe):
    """They were taken for one value: 'must be whole numbers for every stage, got array([2, 2])'."""
    arrays = dict(stages=np.array(STAGES), num_inference_steps=np.array([2, 3]), strength=np.array([0.5]))
    out = pipe("a red circle", **arrays, seed=0)
    same = pipe("a red circle", stages=STAGES, num_inference_steps=[2, 3], strength=0.5, seed=0)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(same.images[0]))


def test_resample_is_the_filter_used(pipe, monkeypatch):
    from diffusers import FluxImg2ImgPipeline

    inputs, call = [], FluxImg2ImgPipeline.__call__
    monkeypatch.setattr(
        FluxImg2ImgPipeline, "__call__", lambda sp, *a, **k: inputs.append(k["image"][0]) or call(sp, *a, **k)
    )
    out = pipe(**FAST, stages=STAGES, seed=0, resample=Image.Resampling.NEAREST)
    expected = out.stage_images[0][0].resize(STAGES[1], Image.Resampling.NEAREST)
    np.testing.assert_array_equal(np.asarray(inputs[0]), np.asarray(expected))


def test_return_dict_false_is_images_then_stage_images(pipe):
    images, stage_images = pipe(**FAST, stages=STAGES, seed=0, output_type="np", return_dict=False)
    assert images.shape == (1, 96, 128, 3) and len(stage_images) == 2 and stage_images[-1] is images


def test_callback_sees_each_stages_num_timesteps(pipe):
    seen = []

    def callback(p, step, t, kwargs):
        seen.append((p.stage_index, p.num_timesteps))
        return kwargs

    pipe(**{**FAST, "num_inference_steps": [2, 4], "strength": 0.5}, stages=STAGES, seed=0, output_type="latent",
         callback_on_step_end=callback)  # fmt: skip
    assert seen == [(0, 2), (0, 2), (1, 2), (1, 2)]


def test_a_pipeline_callback_gets_its_tensor_inputs(pipe):
    from diffusers.callbacks import PipelineCallback

    class Spy(PipelineCallback):
        tensor_inputs = ["prompt_embeds"]

        def __init__(self):
            super().__init__()
            self.keys = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.keys.append(sorted(callback_kwargs))
            return callback_kwargs

    spy = Spy()
    pipe(**{**FAST, "strength": 0.5}, stages=STAGES, seed=0, output_type="latent", callback_on_step_end=spy)
    assert spy.keys == [["prompt_embeds"]] * 3


def test_the_pure_noise_warning_uses_each_upscale_stages_own_step_count(pipe, caplog):
    with caplog.at_level("WARNING", logger="pipelines.highres"):
        pipe(**{**FAST, "num_inference_steps": [1, 4]}, stages=STAGES, seed=0, output_type="latent")
    assert "starts from pure noise" not in caplog.text  # stage 1 starts at int(4 - 2.8) = 1
    with caplog.at_level("WARNING", logger="pipelines.highres"):
        pipe(**{**FAST, "num_inference_steps": [4, 2]}, stages=STAGES, seed=0, output_type="latent")
    assert "upscale stage 1: strength 0.7 of 2 steps starts from pure noise" in caplog.text


def test_no_pure_noise_warning_at_strength_one(pipe, caplog):
    with caplog.at_level("WARNING", logger="pipelines.highres"):
        pipe(**{**FAST, "num_inference_steps": 1, "strength": 1.0}, stages=STAGES, seed=0, output_type="latent")
    assert "pure noise" not in caplog.text


def test_a_call_after_an_interrupted_one_runs_every_stage(pipe):
    def interrupt(p, step, t, kwargs):
        p._interrupt = True
        return kwargs

    pipe(**FAST, stages=STAGES, seed=0, output_type="latent", callback_on_step_end=interrupt)
    assert len(pipe(**FAST, stages=STAGES, seed=0, output_type="latent").stage_images) == 2


def test_the_edges_of_the_ranges_are_accepted():
    from pipelines.stages import FLOAT32_MAX

    for time_shift in (1e-6, 1e6):
        check_highres_inputs(STAGES, [0.5], time_shift=time_shift)
    check_highres_inputs(STAGES, [0.5], guidance_scale=FLOAT32_MAX, true_cfg_scale=FLOAT32_MAX)
