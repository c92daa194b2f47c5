"""Patch-parallel CLEAR inference on CPU processes (gloo): equal to one process, traffic as computed, clean faults.

The ranks are real processes started by ``pipelines.parallel.launch_local`` (or torchrun for the CLI); each
loads the session's tiny FLUX pipeline with ``from_pretrained``. One launch runs many configurations (N = 2
on a sub-group of a 3-rank world), because starting a process and importing diffusers costs seconds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import clear_dit
from pipelines.parallel import BandParallel, BandPlan, launch_local, layer_traffic, split_rows

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 128, 96  # 8 x 6 tokens
TEXT = 16  # T5 tokens of the runs with text
#: (ranks, window, down, text tokens, backend, variant); r = 4 on 3 ranks (bands 3/3/2, or 4/2/2 rows for d = 2)
#: makes the last band take halo rows from two ranks up. Variants: "student" (trained-like, non-uniform pooling
#: weights, with proportional attention), "sharp" (queries scaled up: log-sum-exps far from 0 in the text merge),
#: "two-images" (num_images_per_prompt=2: a batch of 2 through the halo exchange and the gathers).
CONFIGS = [
    (2, 3, 1, TEXT, "auto", ""),
    (2, 3, 2, 0, "tiled", ""),
    (2, 3, 1, 0, "dense", ""),
    (2, 3, 2, TEXT, "auto", ""),
    (3, 4, 1, TEXT, "tiled", ""),
    (3, 4, 2, 0, "auto", ""),
    (3, 4, 1, 0, "auto", ""),
    (3, 4, 2, TEXT, "dense", ""),
    (3, 4, 2, TEXT, "auto", "student"),
    (2, 3, 1, TEXT, "auto", "sharp"),
    (3, 4, 1, TEXT, "tiled", "two-images"),
    (2, 3, 2, TEXT, "auto", "bf16"),  # the dtype GPUs run: halo and pooled buffers must keep it
]


def _pipe(path: str, window: int, down: int, backend: str = "auto", variant: str = ""):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clear_dit.patch(pipe, window_size=window, down_factor=down, backend=backend,
                    proportional_attention=variant == "student")  # fmt: skip
    g = torch.Generator().manual_seed(7)  # the same on every rank and in the single-process reference
    with torch.no_grad():
        for name, value in clear_dit.clear_state_dict(pipe).items():
            if variant == "student" and name.endswith("spatial_weight"):
                value.copy_(torch.rand(value.shape, generator=g))
        if variant == "sharp":  # queries pass an RMSNorm: its scale sets the logits' size
            for name, param in pipe.transformer.named_parameters():
                if name.endswith(("norm_q.weight", "norm_added_q.weight")):
                    param.mul_(100)
    return pipe.to(torch.bfloat16) if variant == "bf16" else pipe


def _call(text: int, seed: int = 0, height: int = HEIGHT, variant: str = "") -> dict:
    kwargs = dict(
        num_images_per_prompt=2 if variant == "two-images" else 1,
        height=height,
        width=WIDTH,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    if text:
        return dict(kwargs, prompt="a red circle on a blue background", max_sequence_length=text)
    return dict(kwargs, prompt_embeds=torch.zeros(1, 0, 32), pooled_prompt_embeds=torch.zeros(1, 32))


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


# ------------------------------------------------------------------------------------ rank workers (spawned)


def _members(n: int) -> tuple[int, ...]:
    """World ranks of an N-rank config: N = 2 runs on ranks 1-2, whose ranks in their group are not the world's."""
    return (0, 1, 2) if n == 3 else (1, 2)


def equivalence_worker(path: str) -> dict:
    """Every config of CONFIGS, then bad inputs on one rank."""
    import torch.distributed as dist

    from pipelines.parallel import run_parallel_pipeline

    rank = dist.get_rank()
    pair = dist.new_group(list(_members(2)))
    latents, traffic, group_ranks = [], [], []
    for n, window, down, text, backend, variant in CONFIGS:
        if rank not in _members(n):
            latents.append(None)
            traffic.append(None)
            group_ranks.append(None)
            continue
        pipe = _pipe(path, window, down, backend, variant)
        out = run_parallel_pipeline(pipe, group=pair if n == 2 else None, **_call(text, variant=variant))
        latents.append(out.latents)
        traffic.append(out.traffic_per_step)
        group_ranks.append(out.rank)
    pipe = _pipe(path, 4, 1)
    bad_height = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT, height=32 if rank == 2 else HEIGHT)))
    bad_seed = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT, seed=int(rank == 1))))
    other_prompt = dict(_call(TEXT), prompt="a cat" if rank == 2 else "a red circle on a blue background")
    bad_prompt = _error(lambda: run_parallel_pipeline(pipe, **other_prompt))
    other_t5 = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT), prompt_2="a cat" if rank == 2 else None))
    bad_guidance = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT), guidance_scale=5.0 if rank else 3.5))
    all_bad = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT, height=32)))  # every rank refuses it
    plain = run_parallel_pipeline(pipe, **_call(TEXT)).traffic_per_step[rank]
    guided = run_parallel_pipeline(pipe, **_call(TEXT), true_cfg_scale=2.0, negative_prompt="").traffic_per_step[rank]
    from diffusers import FluxKontextPipeline
    from PIL import Image as PILImage

    kontext = FluxKontextPipeline.from_pipe(pipe)
    reference = PILImage.new("RGB", (64, 48), "red")
    bad_kontext = _error(lambda: run_parallel_pipeline(kontext, **_call(TEXT), image=reference, _auto_resize=False))

    def stop_rank_0(p, step, timestep, kwargs):
        p._interrupt = rank == 0  # a callback that stops one rank only
        return kwargs

    interrupted = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT), callback_on_step_end=stop_rank_0))

    def batched_ids(module, args, kwargs):  # the 3-D ids older pipelines pass
        return args, {**kwargs, "img_ids": kwargs["img_ids"][None]}

    hook = pipe.transformer.register_forward_pre_hook(batched_ids, with_kwargs=True)
    batched = run_parallel_pipeline(pipe, **_call(TEXT)).latents
    hook.remove()
    return {"latents": latents, "traffic": traffic, "bad_height": bad_height, "bad_seed": bad_seed,
            "bad_prompt": bad_prompt, "other_t5": other_t5, "bad_guidance": bad_guidance, "all_bad": all_bad,
            "plain": plain, "guided": guided, "bad_kontext": bad_kontext, "interrupted": interrupted,
            "batched_ids": batched, "group_ranks": group_ranks}  # fmt: skip


def surviving_faulty_worker(path: str) -> tuple[float, str, bool]:
    """Rank 0 fails inside a block, catches its error and lives on (a notebook, a server): the others must not wait
    for it to exit. Returns the seconds until this rank's error, the error, and whether its group is still up."""
    import torch.distributed as dist

    from pipelines.parallel import run_parallel_pipeline

    pipe, rank = _pipe(path, 4, 2), dist.get_rank()  # (a failure tears the group down)
    if rank == 0:
        pipe.transformer.single_transformer_blocks[1].register_forward_pre_hook(
            lambda module, args: (_ for _ in ()).throw(RuntimeError("injected fault in a transformer block"))
        )
    start = time.monotonic()
    error = _error(lambda: run_parallel_pipeline(pipe, **_call(TEXT)))
    seconds = time.monotonic() - start
    if rank == 0:
        time.sleep(15)
    return seconds, error, dist.is_initialized()


def faulty_worker(path: str, fail_rank: int) -> None:
    """Rank ``fail_rank`` raises inside the second single-stream block, in the middle of the collectives."""
    import torch.distributed as dist

    from pipelines.parallel import run_parallel_pipeline

    pipe = _pipe(path, 4, 2)
    if dist.get_rank() == fail_rank:

        def fault(module, args):
            raise RuntimeError("injected fault in a transformer block")

        pipe.transformer.single_transformer_blocks[1].register_forward_pre_hook(fault)
    run_parallel_pipeline(pipe, **_call(TEXT))


# ------------------------------------------------------------------------------------------------------ tests


def test_split_rows_and_plan():
    assert split_rows(8, 3) == ((0, 3), (3, 6), (6, 8))
    assert split_rows(8, 3, multiple=2) == ((0, 4), (4, 6), (6, 8))
    assert split_rows(16, 4, multiple=4) == ((0, 4), (4, 8), (8, 12), (12, 16))
    with pytest.raises(ValueError, match="cannot split 8 token rows into 5 bands"):
        split_rows(8, 5, multiple=2)
    with pytest.raises(ValueError, match="cannot split 8 token rows into bands of a multiple of 3"):
        BandPlan((8, 6), 2, window_size=4, down_factor=3)  # at once, not at the plan's first use
    plan = BandPlan((8, 6), 3, window_size=4, down_factor=2)
    assert plan.reach == 3 and plan.halo(2) == (3, 8) and plan.halo(0) == (0, 7)
    moves = {(m.src, m.dst): (m.start, m.stop) for m in plan.transfers}
    assert moves == {(1, 0): (4, 6), (2, 0): (6, 7), (0, 1): (1, 4), (2, 1): (6, 8), (0, 2): (3, 4), (1, 2): (4, 6)}
    # bytes per layer (FLUX.1-dev dims): the halo rows each rank sends vs its whole band to every other rank
    rows = layer_traffic(BandPlan((128, 128), 2, 16), text_len=512, heads=24, head_dim=128)
    assert rows[0]["halo"] == 15 * 128 * 24 * 2 * 128 * 2
    assert rows[0]["kv_allgather"] == 64 * 128 * 24 * 2 * 128 * 2


@pytest.fixture(scope="module")
def equivalence(tiny_pipeline_path):
    results = launch_local(equivalence_worker, 3, (str(tiny_pipeline_path),), timeout_s=400, group_timeout_s=120)
    for result in results:
        assert result.exitcode == 0, f"rank {result.rank}: {result.error}"
    return [result.value for result in results]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[f"N{n}-r{r}-d{d}-t{t}-{b}{v and '-' + v}"
                                                           for n, r, d, t, b, v in CONFIGS])  # fmt: skip
def test_parallel_latents_equal_single_process(equivalence, tiny_pipeline_path, index):
    n, window, down, text, backend, variant = CONFIGS[index]
    expected = _pipe(str(tiny_pipeline_path), window, down, backend, variant)(**_call(text, variant=variant)).images
    for group_rank, rank in enumerate(_members(n)):
        assert equivalence[rank]["group_ranks"][index] == group_rank
        latents = equivalence[rank]["latents"][index]
        assert latents.shape == expected.shape and latents.dtype == expected.dtype
        tolerance = 0.05 if variant == "bf16" else 1e-4  # bf16: a few ulps of latents up to about 4
        assert (latents.float() - expected.float()).abs().max().item() <= tolerance, f"rank {rank}"


@pytest.mark.parametrize("index", [3, 7])  # on a group of ranks 1-2, and on all three
def test_counted_traffic_matches_the_layout_model(equivalence, index):
    n, window, down, text, *_ = CONFIGS[index]
    plan = BandPlan((HEIGHT // 16, WIDTH // 16), n, window, down)
    layers = 3  # the tiny transformer: 1 double-stream + 2 single-stream blocks
    model = layer_traffic(plan, text, heads=2, head_dim=64, element_size=4)
    for group_rank, rank in enumerate(_members(n)):
        counted = equivalence[rank]["traffic"][index][group_rank]
        for kind in ("halo", "pooled", "text"):
            assert counted.get(kind, 0.0) == pytest.approx(layers * model[group_rank][kind]), (rank, kind)
        assert counted["halo"] > 0 and counted["output"] > 0


def test_bad_input_on_one_rank_fails_every_rank_with_its_message(equivalence):
    split = "cannot split 2 token rows into 3 bands"
    assert equivalence[2]["bad_height"].startswith("ValueError: " + split)
    for rank in (0, 1):
        assert equivalence[rank]["bad_height"].startswith("RankFailedError: rank 2 failed: ValueError: " + split)
    for rank in range(3):  # different seeds: every rank refuses, naming rank 1
        assert equivalence[rank]["bad_seed"].startswith("ValueError: ranks [1] got other transformer inputs")
        assert equivalence[rank]["bad_prompt"].startswith("ValueError: ranks [2] got other transformer inputs")
        # the same CLIP prompt, another T5 one: only encoder_hidden_states tell them apart
        assert equivalence[rank]["other_t5"].startswith("ValueError: ranks [2] got other transformer inputs")
        assert equivalence[rank]["bad_guidance"].startswith("ValueError: ranks [1, 2] got other transformer inputs")
        # the same bad input everywhere: every rank raises its own ValueError (not "rank 0 failed")
        assert equivalence[rank]["all_bad"].startswith("ValueError: cannot split 2 token rows into 3 bands")
        assert (
            equivalence[rank]["bad_kontext"].startswith("ValueError: ")
            and "Kontext" in equivalence[rank]["bad_kontext"]
        )


def test_batched_3d_img_ids_give_the_single_process_latents(equivalence, tiny_pipeline_path):
    expected = _pipe(str(tiny_pipeline_path), 4, 1)(**_call(TEXT)).images
    for rank in range(3):
        assert (equivalence[rank]["batched_ids"] - expected).abs().max().item() <= 1e-4, f"rank {rank}"


def test_a_rank_stopped_early_is_named_on_every_rank(equivalence):
    for rank in range(3):
        assert equivalence[rank]["interrupted"] == (
            "ValueError: ranks [0] finished denoising while the others still ran steps: every rank must run the same "
            "steps (a callback interrupted one rank only?)"
        )


def test_traffic_is_per_denoising_step_with_true_cfg_too(equivalence):
    """True CFG runs two transformer calls a step: twice the bytes a step, not the same bytes per call."""
    for rank in range(3):
        plain, guided = equivalence[rank]["plain"], equivalence[rank]["guided"]
        assert guided["halo"] == pytest.approx(2 * plain["halo"]) and plain["halo"] > 0


def test_rank_fingerprints_tell_a_different_guidance_from_float_noise():
    from pipelines.parallel import _fingerprint, _same_fingerprint

    def fingerprint(guidance: float) -> tuple:
        return _fingerprint({"guidance": torch.tensor([guidance])}, (8, 6))

    assert not _same_fingerprint(fingerprint(3.5), fingerprint(3.6))  # other inputs: other images
    assert _same_fingerprint(fingerprint(1.0), fingerprint(1.0 + 1e-6))  # GPUs may round differently
    # NaN latents on every rank (an fp16 overflow) are the same inputs, not "other transformer inputs"
    assert _same_fingerprint(fingerprint(math.nan), fingerprint(math.nan))
    assert not _same_fingerprint(fingerprint(math.nan), fingerprint(1.0))
    signs = {"hidden_states": torch.tensor([1.0, -1.0])[None, :, None]}  # the sum of zeros, not their magnitude
    zeros = {"hidden_states": torch.zeros(1, 2, 1)}
    assert not _same_fingerprint(_fingerprint(signs, (1, 2)), _fingerprint(zeros, (1, 2)))


def test_the_group_timeout_comes_from_the_environment(monkeypatch):
    from pipelines.parallel import TIMEOUT_ENV, _timeout_s

    monkeypatch.setenv(TIMEOUT_ENV, "5")
    assert _timeout_s(None) == 5.0 and _timeout_s(30) == 30
    monkeypatch.setenv(TIMEOUT_ENV, "abc")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV} must be a number of seconds, got 'abc'"):
        _timeout_s(None)


def test_init_parallel_names_each_missing_launch_variable(monkeypatch):
    from pipelines.parallel import init_parallel

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match=r"needs a distributed launch \(MASTER_ADDR not set\)"):
        init_parallel()


def crashing_worker(stamps: str) -> None:
    (Path(stamps) / str(os.getpid())).write_text(repr(time.monotonic()))  # CLOCK_MONOTONIC: one clock for all
    os._exit(3)  # dies without a report (killed, segfault)


def test_launch_local_returns_at_once_when_every_rank_died(tmp_path):
    results = launch_local(crashing_worker, 2, (str(tmp_path),), timeout_s=300, group_timeout_s=120)
    returned = time.monotonic()
    died = max(float(p.read_text()) for p in tmp_path.iterdir())
    # at once after the last rank died, not at timeout_s, however long starting the ranks took on a busy machine
    assert returned - died < 30, returned - died
    assert [(r.exitcode, r.error) for r in results] == [(3, "no report (killed or crashed)")] * 2


def hanging_worker() -> None:
    time.sleep(300)


def test_launch_local_kills_ranks_past_the_timeout():
    start = time.monotonic()
    # a group timeout beyond timeout_s: a rank that started late cannot make the other fail first (exit 1)
    results = launch_local(hanging_worker, 2, timeout_s=15, group_timeout_s=120)
    assert time.monotonic() - start < 100  # not the worker's 300 s
    assert [(r.exitcode, r.error) for r in results] == [(-9, "no report (killed or crashed)")] * 2


def test_init_parallel_waits_for_peers_as_long_as_it_is_told(monkeypatch):
    """The timeout reaches the group itself, not only _timeout_s: a dead peer otherwise holds the others 600 s."""
    import torch.distributed as dist

    from pipelines.parallel import TIMEOUT_ENV, init_parallel

    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    timeouts = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout, **kwargs: timeouts.append(timeout))
    init_parallel("gloo")
    init_parallel("gloo", timeout_s=3)
    assert timeouts == [datetime.timedelta(seconds=7), datetime.timedelta(seconds=3)]


def test_the_runner_refuses_controlnet_residuals(tiny_pipe):
    """Residuals of the whole image added to one band: a wrong image or a shape error deep in a block."""
    clear_dit.patch(tiny_pipe, window_size=3)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        runner = BandParallel(tiny_pipe)
        inputs = {"joint_attention_kwargs": {"clear_grid": (8, 6)}, "controlnet_block_samples": [torch.zeros(1)]}
        with pytest.raises(ValueError, match="ControlNet"):
            runner._check_call(inputs)
    finally:
        dist.destroy_process_group()


def test_the_runner_refuses_a_patched_sd3_transformer_by_its_model(tmp_path):
    from dit_models import tiny_sd3_transformer

    transformer = tiny_sd3_transformer(tmp_path)
    clear_dit.patch(transformer, window_size=2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="runs FLUX transformers only, not SD3Transformer2DModel"):
            BandParallel(transformer).__enter__()  # it said the CLEAR patch was missing
    finally:
        dist.destroy_process_group()


def test_a_peer_lost_before_its_call_tears_the_group_down():
    """As a failure inside a call does: a survivor that lives on holds no connections of a larger group."""
    from pipelines.parallel import RankFailedError, _Comm

    comm = object.__new__(_Comm)
    comm.world_size, comm.control, torn = 2, None, []

    def lost(what, fn):
        raise RankFailedError("control failed on rank 0 (a peer died or timed out): Connection closed by peer")

    comm._run, comm.teardown = lost, lambda: torn.append(True)
    with pytest.raises(RankFailedError, match="control failed on rank 0"):
        comm.agree(None, ((), ()))
    assert torn == [True]


def test_run_parallel_pipeline_refuses_return_dict():
    from pipelines.parallel import run_parallel_pipeline

    with pytest.raises(ValueError, match="returns a ParallelOutput: drop return_dict"):
        run_parallel_pipeline(object(), prompt="x", return_dict=False)


def test_a_failing_rank_stops_every_rank_with_its_message(tiny_pipeline_path):
    group_timeout = 90.0
    results = launch_local(faulty_worker, 3, (str(tiny_pipeline_path), 0), timeout_s=200, group_timeout_s=group_timeout)
    assert [r.exitcode for r in results] == [1, 1, 1], [r.error for r in results]
    assert results[0].error == "RuntimeError: injected fault in a transformer block"
    for result in results[1:]:
        assert result.error == "RankFailedError: rank 0 failed: RuntimeError: injected fault in a transformer block"
    # torn down at once: a teardown by the timeout takes longer than the timeout (a tighter bound, with three
    # processes loading a model on two busy cores, measured the machine's load)
    assert max(r.seconds for r in results) < group_timeout


def test_a_failed_rank_that_lives_on_does_not_hold_the_others(tiny_pipeline_path):
    results = launch_local(surviving_faulty_worker, 2, (str(tiny_pipeline_path),), timeout_s=200, group_timeout_s=90)
    assert [r.exitcode for r in results] == [0, 0], [r.error for r in results]
    (_, own, own_up), (seconds, other, other_up) = (r.value for r in results)
    assert own == "RuntimeError: injected fault in a transformer block"
    assert other == "RankFailedError: rank 0 failed: RuntimeError: injected fault in a transformer block"
    assert seconds < 10  # rank 0 tore its connections down when it failed, not when it exits 15 s later
    # both tore their group down, the peer too: nothing of a larger group stays blocked on its connections
    assert not own_up and not other_up


def test_cli_parallel_torchrun(tiny_pipe, tmp_path):
    out = tmp_path / "parallel.png"
    argv = ["--prompt", "a red circle", "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", "2"]
    argv += ["--window", "3", "--down", "2", "--seed", "5"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "app.cli", "generate", *argv]
        + ["--parallel", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},  # torchrun leaves a log folder there
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "patch-parallel: 2 ranks over gloo" in proc.stdout and "halo" in proc.stdout
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
    with Image.open(out) as image:
        got = np.asarray(image.convert("RGB"), dtype=np.int16)
    clear_dit.patch(tiny_pipe, window_size=3, down_factor=2)
    tiny_pipe.vae.enable_tiling()  # rank 0 decodes tiled
    expected = tiny_pipe(
        "a red circle",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(5),
        max_sequence_length=64,
    ).images[0]
    assert np.abs(got - np.asarray(expected, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize(
    "extra,env,message",
    [
        (["--window", "3"], {}, "--parallel needs a distributed launch"),
        (["--window", "3"], {"RANK": "0", "WORLD_SIZE": "1"}, "--parallel needs a distributed launch"),  # no master
        ([], {"RANK": "0", "WORLD_SIZE": "1"}, "--parallel runs CLEAR attention"),
        (  # refused before the model loads on every rank
            ["--window", "3", "--height", "32"],
            {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "HF_HUB_OFFLINE": "1"},
            "error: --parallel: cannot split 2 token rows into 3 bands of a multiple of 1 row(s) each: use at most 2",
        ),
        (
            ["--window", "3", "--down", "2", "--height", "64"],
            {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "error: --parallel: cannot split 4 token rows into 3 bands of a multiple of 2 row(s) each",
        ),
    ],
)
def test_cli_parallel_errors(tmp_path, extra, env, message):
    launch = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    clean = {k: v for k, v in os.environ.items() if k not in launch}
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "generate", "--prompt", "x", "--parallel", "--out", str(tmp_path / "x.png")]
        + extra,
        cwd=REPO,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_smoke(tiny_pipeline_path, tmp_path, capsys):
    out = tmp_path / "parallel.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "parallel.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "equal to the layout model" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["size"], row["ranks"], row["grid"]) == (2048, 2, [128, 128])
    assert row["kv_allgather_mb"] > row["halo_scheme_mb"] > 0 and row["ratio"] > 1
    from benchmarks.parallel import layout_rows, parse_args, print_report

    args = parse_args("--sizes 2048 --ranks 2 --window 1 --text-len 0".split())
    (silent,) = layout_rows(args)
    assert silent["halo_scheme_mb"] == 0 and silent["ratio"] is None  # r = 1 without text sends nothing
    print_report(args, [silent], result["measured"])
    assert capsys.readouterr().out.splitlines()[2].split()[9] == "-"  # the ratio column
    assert result["measured"]["traffic_matches"] and result["measured"]["seconds"]["1"] > 0


def test_runner_needs_a_patched_model_and_a_process_group(tiny_pipe, monkeypatch):
    from pipelines.parallel import BandParallel, init_parallel

    with pytest.raises(ValueError, match="CLEAR-patched transformer"):
        BandParallel(tiny_pipe)
    clear_dit.patch(tiny_pipe, window_size=3)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        BandParallel(tiny_pipe)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs a distributed launch .*torchrun --nproc_per_node N"):
        init_parallel()


def test_one_rank_run_in_process_restores_the_model(tiny_pipe):
    import torch.distributed as dist

    from pipelines.parallel import ParallelCLEARFluxAttnProcessor, run_parallel_pipeline

    clear_dit.patch(tiny_pipe, window_size=3, down_factor=2)
    expected = tiny_pipe(**_call(TEXT)).images
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert not tiny_pipe.vae.use_tiling
    try:
        out = run_parallel_pipeline(tiny_pipe, **_call(TEXT))
        decoded = run_parallel_pipeline(tiny_pipe, **{**_call(TEXT), "output_type": "np"})
    finally:
        dist.destroy_process_group()
    assert (out.latents - expected).abs().max().item() <= 1e-4
    assert decoded.images.shape == (1, HEIGHT, WIDTH, 3)
    assert not tiny_pipe.vae.use_tiling  # decoded with tiling, the caller's setting back afterwards
    assert "forward" not in vars(tiny_pipe.transformer)
    processors = tiny_pipe.transformer.attn_processors.values()
    assert not any(isinstance(p, ParallelCLEARFluxAttnProcessor) for p in processors)
    assert clear_dit.patch_handle(tiny_pipe) is not None
    assert out.traffic_per_step[0]["halo"] == 0 and out.traffic_per_step[0]["output"] == 0


def test_band_plan_halo_is_exactly_the_window_reach_for_every_split():
    """Every rank gets exactly the rows within the reach of its band, each from one holder, no empty transfer:
    r = 1 (no halo), windows as tall as the image, more ranks than halo rows."""
    from clear_dit.bands import window_reach

    for h in range(1, 10):
        for n in range(1, h + 1):
            for r in range(1, 12):
                plan = BandPlan((h, 3), n, r)
                reach = window_reach(r)
                for rank, (a, b) in enumerate(plan.bands):
                    lo, hi = plan.halo(rank)
                    assert (lo, hi) == (max(0, a - reach), min(h, b + reach)), (h, n, r, rank)
                    got = [(t.start, t.stop) for t in plan.transfers if t.dst == rank]
                    assert all(start < stop for start, stop in got), (h, n, r, rank, got)
                    rows = sorted([y for s, e in got for y in range(s, e)] + list(range(a, b)))
                    assert rows == list(range(lo, hi)), (h, n, r, rank)


def test_the_layout_report_states_the_busiest_rank():
    """With 3 ranks the middle one sends its halo both ways: the report's figures are its, and the tallest band's."""
    from benchmarks.parallel import layout_rows, parse_args

    (row,) = layout_rows(parse_args("--sizes 2048 --ranks 3 --window 16".split()))
    kv_row = 128 * 24 * 128 * 2 * 2  # a token row's keys and values: 128 tokens x 24 heads x 128 x (k, v) x bf16
    assert row["band_rows"] == 43 and row["halo_rows"] == 15  # 128 rows in bands of 43, 43, 42
    assert row["halo_mb"] == pytest.approx(2 * 15 * kv_row / 1e6)  # up and down
    assert row["halo_scheme_mb"] == pytest.approx(row["halo_mb"] + row["text_mb"] + row["pooled_mb"])


def test_the_early_split_check_takes_the_weights_files_down_factor(tmp_path, monkeypatch, tiny_pipe):
    """Without --down the bands are multiples of the file's down factor: 4 rows split over 3 ranks with d = 1, not
    with d = 2; the run would fail after every rank loaded the model."""
    from app.cli import CLIError, _validate_generate, build_parser

    with clear_dit.patch(tiny_pipe, window_size=3, down_factor=2):
        weights = clear_dit.save_weights(tiny_pipe, tmp_path / "student.safetensors")
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    argv = ["generate", "--prompt", "x", "--parallel", "--weights", str(weights), "--height", "64", "--width", "64"]
    with pytest.raises(CLIError, match=r"cannot split 4 token rows into 3 bands of a multiple of 2 row"):
        _validate_generate(build_parser().parse_args([*argv, "--out", str(tmp_path / "x.png")]))
