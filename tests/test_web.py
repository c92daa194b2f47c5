"""The web UI: callbacks on the tiny model, the named API through gradio_client, and a real browser (Chromium)."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import clear_dit
from app.web import _RAMP, Callbacks, GenerationCancelled, GenerationEngine, GenerationSettings, build_demo, launch
from pipelines.loading import load_pipeline

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
# The README's screenshot is refreshed only on request, so a test run leaves the checkout clean.
SCREENSHOT = REPO / "docs" / "webui.png"
UPDATE_SCREENSHOT = os.environ.get("CLEAR_DIT_UPDATE_SCREENSHOT") == "1"
BASE = dict(
    prompt="a red circle on a blue background",
    negative_prompt="",
    width=64,
    height=64,
    steps=2,
    guidance=3.5,
    true_cfg=1.0,
    seed=7,
    attention="clear",
    window_size=2,
    down_factor=1,
    weights=None,
    upscale="",
    strength=0.7,
)


def values(**changes) -> list:
    return list({**BASE, **changes}.values())


def session(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


@pytest.fixture(scope="module", autouse=True)
def gradio_cache(tmp_path_factory):
    """The files gradio serves are cached under pytest's temp dir, not in the machine's shared /tmp/gradio."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield


@pytest.fixture(scope="module")
def engine(tiny_pipeline_path, tmp_path_factory) -> GenerationEngine:
    """One engine (one loaded tiny pipeline) for the module, as the app shares one across sessions."""
    return GenerationEngine.load("tiny", output_dir=tmp_path_factory.mktemp("webui"))


@pytest.fixture(scope="module")
def cb(engine) -> Callbacks:
    return Callbacks(engine)


def read_png(source: str | Path | bytes) -> Image.Image:
    """A PNG file (or its bytes), checked to really be one."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_generate_writes_png_with_settings_and_grows_gallery(cb):
    path, summary, files, gallery = cb.generate(*values(), gallery=[("old.png", "old")], request=session("a"))
    image = read_png(path)
    assert image.size == (64, 64) and files == [path] and "CLEAR r=2 d=1" in summary
    assert gallery[0] == ("old.png", "old") and gallery[1][0] == path
    record = json.loads(image.text["clear-dit"])
    assert {k: record[k] for k in BASE} == {**BASE, "true_cfg": 1.0}
    assert record["model"] == "tiny" and record["seconds"] > 0
    assert "Seed: 7" in image.text["parameters"]
    assert Path(path).parent.name == "a"  # one folder per browser session


def test_compare_same_seed_full_equals_plain_full_and_stats(cb, engine):
    steps = []
    progress = lambda p, desc, unit: steps.append((p, desc))  # noqa: E731 (gr.Progress's call signature)
    full, clear, pair, heat, summary, files, gallery = cb.compare(*values(height=128), gallery=[], progress=progress)
    assert [p for p, _ in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert steps[0][1].startswith("full attention") and steps[-1][1].startswith("CLEAR")
    assert read_png(full).size == read_png(clear).size == (64, 128)
    assert pair == (full, clear) and files == [full, clear] and len(gallery) == 2
    assert heat.shape == (128, 64, 3) and heat.dtype == np.uint8
    density = clear_dit.attention_density((8, 4), engine.text_len, 2, 1)
    assert f"attention density {100 * density:.1f}%" in summary and "speedup" in summary
    # r=2 on an 8x4 grid is really local: the images differ; the full image is a plain full-attention run
    assert np.abs(np.asarray(read_png(full), float) - np.asarray(read_png(clear), float)).max() > 0
    plain, *_ = cb.generate(*values(height=128, attention="full"))
    assert np.array_equal(np.asarray(read_png(plain)), np.asarray(read_png(full)))


def test_compare_statistics_are_those_of_the_two_images(engine):
    c = engine.compare(GenerationSettings(**{**BASE, "height": 128}))
    assert c.speedup == c.full.seconds / c.clear.seconds  # full / CLEAR: > 1 when CLEAR is faster
    full, clear = (np.asarray(g.image, np.float64) for g in (c.full, c.clear))
    assert c.mean_abs_diff == pytest.approx(np.abs(full - clear).mean())
    assert c.heatmap.max() > 0  # the images differ, so does the heat map
    hottest = np.unravel_index(np.abs(full - clear).mean(-1).argmax(), full.shape[:2])
    assert tuple(c.heatmap[hottest]) == tuple(_RAMP[-1])  # scaled to the largest difference: the ramp's end there
    summary = c.summary()
    assert f"speedup {c.speedup:.2f}x" in summary and f"mean |difference| {c.mean_abs_diff:.1f}/255" in summary
    saving = f"{1 / c.density:.2f}x fewer attention FLOPs ({1 - c.density:.1%} saved)"  # the CLI's words
    assert f"attention density {c.density:.1%} ({saving})" in summary


def test_a_density_above_full_attention_is_not_called_saved(cb):
    """r=64 on a 4x4 grid with 2x2 pooled keys: more than full attention (it said '-1.0% ... saved')."""
    *_, summary, _, _ = cb.compare(*values(window_size=64, down_factor=2))
    assert "% more attention FLOPs than full attention (the window covers the image)" in summary
    assert "saved" not in summary


def test_window_covering_the_grid_reproduces_full_attention(cb):
    _, _, _, heat, summary, *_ = cb.compare(*values(window_size=8))  # 4x4 grid: every token in every window
    assert "mean |difference| 0.0/255" in summary


def test_switching_window_repatches_the_same_pipeline(cb, engine):
    pipe, transformer = engine.pipe, engine.pipe.transformer
    cb.generate(*values(window_size=3, down_factor=2))
    handle = clear_dit.patch_handle(pipe)
    assert (handle.window_size, handle.down_factor) == (3, 2)
    cb.generate(*values(window_size=5))
    assert clear_dit.patch_handle(pipe).config["window_size"] == 5
    cb.generate(*values(attention="full"))
    assert clear_dit.patch_handle(pipe) is None
    assert engine.pipe is pipe and engine.pipe.transformer is transformer


def test_weights_file_is_loaded_and_full_attention_gets_its_projections_back(cb, engine, tmp_path):
    other = load_pipeline("tiny", torch.float32)
    clear_dit.patch(other, window_size=4)
    with torch.no_grad():
        other.transformer.transformer_blocks[0].attn.to_q.weight.mul_(1.5)
    weights = clear_dit.save_weights(other, tmp_path / "mine.safetensors")
    assert Callbacks.weights_selected(str(weights), 16, "1") == (4, "1")  # the file's own radius (metadata)
    assert Callbacks.weights_selected("Huage001/CLEAR/clear_local_8_down_4.safetensors", 16, "1") == (8, "4")

    to_q = engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    original = to_q.detach().clone()
    before, *_ = cb.generate(*values(attention="full"))
    cb.generate(*values(window_size=4, weights=str(weights)))
    assert torch.equal(to_q, other.transformer.transformer_blocks[0].attn.to_q.weight)
    after, *_ = cb.generate(*values(attention="full"))
    assert torch.equal(to_q, original)
    assert np.array_equal(np.asarray(read_png(before)), np.asarray(read_png(after)))


def test_weights_used_with_another_radius_say_so_in_the_summary(cb, tmp_path):
    """Allowed (the paper reuses radii), but the library's warning reached the server log alone."""
    weights = _weights_file(tmp_path, window=4)
    _, summary, *_ = cb.generate(*values(window_size=2, weights=str(weights)))
    warning = "clear_local_4.safetensors was made for window radius 4, down factor 1; used with window radius 2, "
    assert f"warning: {warning}down factor 1 as asked" in summary
    *_, summary, _, _ = cb.compare(*values(window_size=2, weights=str(weights)))
    assert f"warning: {warning}down factor 1 as asked" in summary
    for same in (dict(window_size=4), dict(window_size=2, attention="full")):  # as made, or not used at all
        _, summary, *_ = cb.generate(*values(**{**dict(weights=str(weights)), **same}))
        assert "warning" not in summary


def test_a_published_weights_name_typed_by_hand_is_the_published_file(cb, tmp_path, monkeypatch):
    """'clear_local_16' typed into the dropdown was looked for as a local file, not found."""
    hub = "Huage001/CLEAR/clear_local_16.safetensors"
    for typed in ("clear_local_16", " clear_local_16.safetensors", "clear_local_16 (published)", hub):
        assert cb.settings(*values(weights=typed, window_size=16)).weights == hub
    assert Callbacks.weights_selected("clear_local_8_down_4", 16, "1") == (8, "4")
    monkeypatch.chdir(tmp_path)  # a local file of that name is the user's own
    _weights_file(tmp_path, window=16).rename(tmp_path / "clear_local_16")
    assert cb.settings(*values(weights="clear_local_16", window_size=16)).weights == "clear_local_16"
    assert cb.settings(*values(weights="clear_local_17", window_size=16)).weights == "clear_local_17"


def _weights_file(folder: Path, window: int = 2) -> Path:
    other = load_pipeline("tiny", torch.float32)
    clear_dit.patch(other, window_size=window)
    with torch.no_grad():
        other.transformer.transformer_blocks[0].attn.to_q.weight.mul_(1.5)
    return clear_dit.save_weights(other, folder / f"clear_local_{window}.safetensors")


def test_weights_after_a_pooled_zero_shot_patch_leave_full_attention_working(tmp_path):
    """The first weights file snapshots the projections to restore: not the pooling weights of a d=2 patch."""
    cb = Callbacks(GenerationEngine.load("tiny", output_dir=tmp_path / "out"))  # no snapshot taken yet
    weights = _weights_file(tmp_path)
    before, *_ = cb.generate(*values(attention="full"))
    cb.generate(*values(window_size=2, down_factor=2))
    cb.generate(*values(window_size=2, weights=str(weights)))
    for _ in range(2):
        after, *_ = cb.generate(*values(attention="full"))
        assert np.array_equal(np.asarray(read_png(before)), np.asarray(read_png(after)))


def test_switching_a_weights_files_radius_replaces_the_patch(tmp_path):
    """load_weights on a patched model covers the patch in place: one more kept alive per switch, unwound only
    when full attention came back."""
    engine = GenerationEngine.load("tiny", output_dir=tmp_path / "out")
    weights = _weights_file(tmp_path)
    for window in (2, 3, 4, 2):
        engine._set_attention(GenerationSettings(**{**BASE, "window_size": window, "weights": str(weights)}))
    handle = clear_dit.patch_handle(engine.pipe)
    (record,) = handle._patches
    assert handle.window_size == 2 and record.below is None


def test_compare_times_the_generation_not_the_weights_loading(cb, tmp_path, monkeypatch):
    weights = _weights_file(tmp_path)
    load, clock, skipped = clear_dit.load_weights, time.perf_counter, [0.0]

    def slow_load(*args, **kwargs):  # a large file read from disk or the hub: 1000 s on the clock the app reads
        skipped[0] += 1000.0
        return load(*args, **kwargs)

    monkeypatch.setattr(clear_dit, "load_weights", slow_load)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skipped[0])
    full, clear, *_ = cb.compare(*values(weights=str(weights)))
    records = [json.loads(read_png(path).text["clear-dit"]) for path in (full, clear)]
    assert skipped[0] == 1000.0 and records[1]["seconds"] < 1000.0 and records[1]["weights"] == str(weights)
    assert records[0]["weights"] is None  # the full-attention image used no weights file


def test_an_image_is_the_pipelines_own_with_its_seed_and_negative_prompt(cb, engine):
    """As the CLI: same seed, same image; under true CFG against the negative prompt the user wrote."""
    changes = dict(attention="full", true_cfg=3.0, negative_prompt="a blue square")
    path, *_ = cb.generate(*values(**changes))
    expected = engine.pipe(
        BASE["prompt"],
        negative_prompt="a blue square",
        true_cfg_scale=3.0,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=engine.text_len,
        generator=torch.Generator().manual_seed(BASE["seed"]),
    ).images[0]
    assert np.array_equal(np.asarray(read_png(path)), np.asarray(expected))


def test_true_cfg_applies_against_the_empty_negative_prompt(cb):
    """As `clear-dit generate --true-cfg`: the scale the PNG records is the one the image was drawn with."""
    plain, *_ = cb.generate(*values(attention="full"))
    guided, *_ = cb.generate(*values(attention="full", true_cfg=6.0))
    assert json.loads(read_png(guided).text["clear-dit"])["true_cfg"] == 6.0
    assert not np.array_equal(np.asarray(read_png(plain)), np.asarray(read_png(guided)))


def test_high_resolution_mode_upscales_in_stages_and_restores_the_model(cb, engine):
    before, *_ = cb.generate(*values(attention="full"))
    seen = []
    progress = lambda p, desc, unit: seen.append(desc)  # noqa: E731
    path, summary, *_ = cb.generate(*values(upscale="128x96", strength=0.5), progress=progress)
    image = read_png(path)
    assert image.size == (128, 96) and "high resolution 64x64 → 128x96" in summary and "· 128x96, 2 steps" in summary
    assert seen[0] == "stage 1/2: denoising step 1/2" and seen[-1] == "stage 2/2: denoising step 1/1"
    assert json.loads(image.text["clear-dit"])["upscale"] == "128x96"
    assert "Upscale: 128x96 (strength 0.5)" in image.text["parameters"]
    assert clear_dit.patch_handle(engine.pipe) is None  # the shared model is as before: same full-attention image
    after, *_ = cb.generate(*values(attention="full"))
    assert np.array_equal(np.asarray(read_png(before)), np.asarray(read_png(after)))
    assert "warning" not in summary
    # 2 steps at strength 0.7 start stage 2 from pure noise: a "high resolution" image that is a new one, said
    _, summary, *_ = cb.generate(*values(upscale="128x96", strength=0.7))
    assert "warning: upscale stage 1: strength 0.7 of 2 steps starts from pure noise" in summary


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=100), "width 100 px is not allowed: width and height: multiples of 16 px"),
        (dict(height=32), "height 32 px is not allowed"),
        (dict(width=64, height=80, down_factor=2), "multiples of 32 px"),
        (dict(width=100, down_factor=2, attention="full"), "not allowed: width and height: multiples of 16 px"),
        (dict(prompt="  "), "the prompt is empty"),
        (dict(steps=0), "steps must be 1 to 100"),
        (dict(width=None), "width is missing"),
        (dict(upscale="128x100"), "stage 1 size 128x100 must be positive multiples of 16"),
        (dict(upscale="64x64"), "stage sizes must increase"),
        (dict(upscale="big"), "stage size 'big' is not WIDTHxHEIGHT"),
        (dict(guidance=float("nan")), "guidance must be a finite number, got nan"),  # all black before
        (dict(guidance=25.0), "guidance must be 0 to 20, got 25.0"),
        (dict(guidance=-0.5), "guidance must be 0 to 20, got -0.5"),
        (dict(seed=2**63, upscale="128x96"), "seed must be 0 to 9223372036854775807, got 9223372036854775808"),
        # a browser sends a lone surrogate as JSON's \ud800; the tokenizer's TypeError said nothing of it
        (dict(prompt="a \ud800 cat"), "the prompt is not UTF-8 text: 'a "),
        (dict(negative_prompt="\udce9", true_cfg=2.0), "the negative prompt is not UTF-8 text"),
        (dict(guidance=None), "guidance is missing"),
        (dict(true_cfg=0.5), r"true CFG scale must be 1 \(off\) to 10, got 0.5"),
        (dict(seed=2**64), "seed must be 0 to 9223372036854775807, got 18446744073709551616"),
        (dict(prompt="\t\n"), "the prompt is empty: describe the image you want"),
        (dict(seed=float("inf")), "seed must be a finite number, got inf"),
        (dict(width="abc"), "width must be a number, got 'abc'"),
        (dict(true_cfg=11.0), r"true CFG scale must be 1 \(off\) to 10, got 11.0"),
        (dict(window_size=0), "window radius must be 1 to 64 tokens, got 0"),
        (dict(steps=101), "steps must be 1 to 100, got 101"),
        (dict(upscale="9000x9000"), "upscale sizes must be at most 8192 px per side, got 9000x9000"),
    ],
)
def test_bad_input_is_a_readable_error(cb, changes, message):
    with pytest.raises(gr.Error, match=message):
        cb.generate(*values(**changes))


def test_a_missing_weights_file_is_one_plain_line(cb, tmp_path):
    """Not 'generation failed: FileNotFoundError: ...' with a traceback in the log."""
    missing = tmp_path / "clear_local_2.safetensors"
    with pytest.raises(gr.Error) as err:
        cb.generate(*values(weights=str(missing)))
    assert err.value.message == f"CLEAR weights file not found: {missing}"


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
        MemoryError("Unable to allocate 74.5 GiB"),
    ],
)
def test_running_out_of_memory_is_a_readable_error_and_the_next_request_works(cb, engine, monkeypatch, error):
    """As the CLI's: CUDA's, the CPU allocator's and numpy's alike (the CPU ones said "generation failed")."""
    with monkeypatch.context() as m:
        m.setattr(engine.pipe.__class__, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(error))
        with pytest.raises(gr.Error, match="out of memory at 64x64 with clear attention: try a smaller size"):
            cb.generate(*values())
        m.setattr(engine.pipe.__class__, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
        with pytest.raises(gr.Error, match="generation failed: RuntimeError: bug"):  # any other error as before
            cb.generate(*values())
    image, *_ = cb.generate(*values())
    assert read_png(image).size == (64, 64)


def test_compare_refuses_high_resolution_mode(cb):
    with pytest.raises(gr.Error, match="compare runs single-stage generation"):
        cb.compare(*values(upscale="128x128"))


def test_compare_checks_its_clear_half_before_the_full_one(cb, engine):
    """With "full" selected for Generate, compare's CLEAR half still pools: its sizes are checked up front."""
    before = set(engine.output_dir.rglob("*.png"))
    with pytest.raises(gr.Error, match="width 80 px is not allowed: .*multiples of 32 px"):
        cb.compare(*values(attention="full", down_factor=2, width=80))
    assert set(engine.output_dir.rglob("*.png")) == before  # no full-attention image was made first


def test_a_failed_weights_switch_leaves_a_working_engine(cb, engine):
    before, *_ = cb.generate(*values(attention="full"))
    cb.generate(*values(window_size=3))
    with pytest.raises(gr.Error, match="CLEAR weights file not found: /nonexistent/clear.safetensors"):
        cb.generate(*values(weights="/nonexistent/clear.safetensors"))
    after, *_ = cb.generate(*values(attention="full"))
    assert clear_dit.patch_handle(engine.pipe) is None
    assert np.array_equal(np.asarray(read_png(before)), np.asarray(read_png(after)))


def test_cancel_stops_a_running_generation(cb, engine):
    assert not engine.cancel("nobody")  # cancelling a session that runs nothing does nothing
    others = []
    progress = lambda p, desc, unit: others.append(engine.cancel("other"))  # noqa: E731 (another tab's cancel)
    path, *_ = cb.generate(*values(steps=3), progress=progress, request=session("c"))
    assert others == [False] * 3 and read_png(path).size == (64, 64)  # not its job: it runs on
    progress = lambda p, desc, unit: engine.cancel("c")  # noqa: E731 (the user presses cancel after step 1)
    with pytest.raises(gr.Error, match="cancelled"):
        cb.generate(*values(steps=3), progress=progress, request=session("c"))
    path, *_ = cb.generate(*values(), request=session("c"))
    assert read_png(path).size == (64, 64)


def test_a_cancel_between_the_halves_of_compare_stops_the_second(cb, engine):
    """Pressed while the full-attention image is saved, no denoising step is left to see it: compare must."""
    save = Image.Image.save

    def save_then_cancel(image, *args, **kwargs):
        save(image, *args, **kwargs)
        assert engine.cancel("between")

    switches, switch = [], engine._set_attention

    def recorded_switch(s):
        switches.append(s.attention)
        return switch(s)

    mp = pytest.MonkeyPatch()
    mp.setattr(Image.Image, "save", save_then_cancel)
    mp.setattr(engine, "_set_attention", recorded_switch)
    try:
        with pytest.raises(gr.Error, match="cancelled"):
            cb.compare(*values(), request=session("between"))
    finally:
        mp.undo()
    assert switches == ["full"]  # the CLEAR half never started: no weights loaded, no warm-up step
    assert not engine.cancel("between")  # nothing runs any more


def test_the_client_chosen_session_cannot_choose_where_files_go(cb, engine):
    for hostile in ("../../escaped", "/tmp/absolute", "a/b"):
        path, *_ = cb.generate(*values(), request=session(hostile))
        assert Path(path).resolve().parent.parent == engine.output_dir.resolve()
    path, *_ = cb.generate(*values(), request=session("plain_hash-1"))
    assert Path(path).parent == engine.output_dir / "plain_hash-1"


@pytest.mark.parametrize("problem", ["missing", "not safetensors", "another model's"])
def test_compare_checks_the_weights_before_the_full_half(cb, engine, tmp_path, problem):
    """A file the CLEAR half cannot load failed only after the full half had run (and written its PNG)."""
    weights = {"missing": str(tmp_path / "none.safetensors"), "not safetensors": str(REPO / "README.md")}.get(problem)
    if weights is None:
        save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(3, 3)}, tmp_path / "clear_local_2.safetensors")
        weights = str(tmp_path / "clear_local_2.safetensors")
    before = set(engine.output_dir.rglob("*.png"))
    message = {"missing": "not found", "not safetensors": "not a readable safetensors", "another model's": "match"}
    with pytest.raises(gr.Error, match=message[problem]):
        cb.compare(*values(weights=weights), request=session("bad-weights"))
    assert set(engine.output_dir.rglob("*.png")) == before


def _cancelled_while_waiting(engine, session: str) -> list[str]:
    """A generation of ``session`` waiting behind a held engine (an abandoned run), cancelled there: its outcome."""
    outcome = []

    def run():
        try:
            engine.generate(GenerationSettings(**BASE), session)
            outcome.append("ran")
        except GenerationCancelled:
            outcome.append("cancelled")

    with engine._lock:  # the abandoned run
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 30
        while not engine._runs.get(session) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cancel(session)
    thread.join(60)
    return outcome


def test_a_cancel_while_waiting_for_the_engine_is_not_lost(engine):
    """A cancelled event's thread cannot be stopped, only abandoned; the next run waits for it to let go of the
    engine, and its own cancel then found nothing running, so it ran all its steps for nobody."""
    assert _cancelled_while_waiting(engine, "waiting") == ["cancelled"] and not engine.cancel("waiting")


def test_a_cancel_of_a_run_waiting_behind_its_own_sessions_abandoned_run_holds(engine, monkeypatch):
    """Cancels were kept per session: the abandoned run, ending, cleared the cancel of the run waiting behind it."""
    outcome, first_step = {}, threading.Event()
    release = threading.Event()
    steps = engine.pipe.__class__.__call__

    def paused(self, *args, **kwargs):  # the first run waits at its first step until released
        callback = kwargs["callback_on_step_end"]

        def hold(pipe, i, t, state):
            if threading.current_thread().name == "A":
                first_step.set()
                release.wait(30)
            return callback(pipe, i, t, state)

        return steps(self, *args, **{**kwargs, "callback_on_step_end": hold})

    monkeypatch.setattr(engine.pipe.__class__, "__call__", paused)

    def run(name):
        try:
            engine.generate(GenerationSettings(**BASE), "same-tab")
            outcome[name] = "ran"
        except GenerationCancelled:
            outcome[name] = "cancelled"

    a = threading.Thread(target=run, args=("A",), name="A")
    a.start()
    assert first_step.wait(30) and engine.cancel("same-tab")  # A: cancelled, stops at its next step
    b = threading.Thread(target=run, args=("B",), name="B")
    b.start()
    deadline = time.monotonic() + 30
    while len(engine._runs.get("same-tab", ())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.cancel("same-tab")  # B, waiting behind A
    release.set()
    a.join(60)
    b.join(60)
    assert outcome == {"A": "cancelled", "B": "cancelled"}


def test_an_event_cancelled_before_its_run_registers_does_not_run(engine, monkeypatch):
    """The Stop button (or a closed tab) while the worker thread is still before engine.generate (parsing, the
    weights header): engine.cancel found no run, and the abandoned run then ran to its end for nobody."""
    import anyio

    validate, ran, finished = engine.validate, [], threading.Event()

    def slow_validate(s):
        time.sleep(0.5)
        validate(s)

    monkeypatch.setattr(engine, "validate", slow_validate)

    def handler(request=None):
        try:
            ran.append(engine.generate(GenerationSettings(**BASE), "early"))
        finally:
            finished.set()

    wrapped = Callbacks(engine).cancellable(handler)

    async def cancelled_early():
        with anyio.move_on_after(0.1):
            await wrapped(request=session("early"))

    anyio.run(cancelled_early)
    assert finished.wait(60) and ran == []


def test_a_run_cancelled_while_it_waits_makes_no_step(engine, monkeypatch):
    """'before it starts': not one denoising step (nor a weights switch) once it gets the engine."""
    calls, pipeline_call = [], engine.pipe.__class__.__call__
    monkeypatch.setattr(
        engine.pipe.__class__, "__call__", lambda self, *a, **k: calls.append(1) or pipeline_call(self, *a, **k)
    )
    assert _cancelled_while_waiting(engine, "queued") == ["cancelled"] and calls == []


@pytest.mark.parametrize("seed", [2**53 + 1, 2**63 - 100, str(2**53 + 1)])
def test_large_seeds_are_used_exactly(cb, seed):
    """Seeds went through a float (53 bits): 2**53 + 1 became another seed, 2**63 - 100 was refused; an API client
    may send the number as a string (gr.Number passes it on as it is)."""
    path, summary, *_ = cb.generate(*values(seed=seed), request=session("seeds"))
    assert json.loads(read_png(path).text["clear-dit"])["seed"] == int(seed) and f"seed {seed}" in summary


def test_the_largest_seed_of_the_command_line_is_taken_for_every_stage(cb):
    """The command line takes 2**63 - 1; the web refused it, and refused one less per upscale stage (stage i uses
    seed + i, which torch takes up to 2**64 - 1)."""
    from app.cli import seed_arg

    seed = seed_arg(str(2**63 - 1))
    path, summary, *_ = cb.generate(*values(seed=seed, upscale="128x96"), request=session("seeds"))
    assert json.loads(read_png(path).text["clear-dit"])["seed"] == seed and f"seed {seed}" in summary


def test_a_weights_path_under_home_is_read_as_the_library_reads_it(cb, tmp_path, monkeypatch):
    """``~/student.safetensors`` loaded (the library expands ~) but its radius was not read from it, and a rewrite of
    the file was not seen (the file checks took ~ literally)."""
    from app.web import weights_config

    monkeypatch.setenv("HOME", str(tmp_path))
    student = _weights_file(tmp_path, window=3).rename(tmp_path / "student.safetensors")
    assert weights_config("~/student.safetensors") == (3, 1)  # from the metadata: the name says nothing
    assert Callbacks.weights_selected("~/student.safetensors", 16, "1") == (3, "1")
    plain, *_ = cb.generate(*values(weights=str(student), window_size=3))
    home, *_ = cb.generate(*values(weights="~/student.safetensors", window_size=3))
    assert np.array_equal(np.asarray(read_png(home)), np.asarray(read_png(plain)))
    with safe_open(str(student), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(student)
    name = next(k for k in tensors if k.endswith("to_k.weight"))
    save_file({**tensors, name: tensors[name] * 2}, str(student), metadata=metadata)  # rewritten after training on
    again, *_ = cb.generate(*values(weights="~/student.safetensors", window_size=3))
    assert not np.array_equal(np.asarray(read_png(again)), np.asarray(read_png(home)))


def test_rewritten_weights_file_is_loaded_again(cb, engine, tmp_path):
    weights = tmp_path / "clear_local_2.safetensors"
    with clear_dit.patch(engine.pipe, window_size=2):
        clear_dit.save_weights(engine.pipe, weights)
    first, *_ = cb.generate(*values(weights=str(weights)))
    tensors = load_file(weights)
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    name = next(k for k in tensors if k.endswith("to_q.weight"))
    tensors[name] = tensors[name] * 3  # a newer checkpoint under the same name
    save_file(tensors, str(weights), metadata=metadata)
    second, *_ = cb.generate(*values(weights=str(weights)))
    assert not np.array_equal(np.asarray(read_png(first)), np.asarray(read_png(second)))


def test_png_metadata_records_no_negative_prompt_without_true_cfg(cb):
    path, *_ = cb.generate(*values(negative_prompt="blurry", true_cfg=1.0))
    settings = json.loads(read_png(path).text["clear-dit"])
    assert settings["negative_prompt"] == "" and settings["true_cfg"] == 1.0
    assert "Negative prompt: \n" in read_png(path).text["parameters"]


def test_the_apps_weights_file_is_preselected(tmp_path, engine):
    weights = _weights_file(tmp_path, window=3)
    own = GenerationEngine(engine.pipe, "tiny", str(weights), tmp_path / "out")
    demo = build_demo(engine=own)
    (dropdown,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and "CLEAR weights" in b.label]
    assert dropdown.value == str(weights) and dropdown.choices[0] == (f"{weights.name} (--weights)", str(weights))
    (window,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "window"]
    assert window.value == 3  # the file's own radius


def test_small_helpers():
    assert Callbacks.apply_preset("1536 x 1024") == (1536, 1024)
    assert 0 <= Callbacks.random_seed() < 2**32
    assert Callbacks.weights_selected(None, 16, "2") == (16, "2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(engine=engine)
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def api_client(tmp_path):
    """gradio_client.Client(url) that downloads under tmp_path (not gradio's shared cache), and whose empty staging
    folders (gradio_client stages each download in a fresh folder of the system temp dir and leaves it) go."""
    from gradio_client import Client

    temp = Path(tempfile.gettempdir())
    before = set(temp.iterdir())
    yield lambda url: Client(url, verbose=False, download_files=tmp_path / "downloads")
    for folder in set(temp.iterdir()) - before:
        if re.fullmatch("[0-9a-f]{40}", folder.name) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def test_gradio_client_named_endpoint_returns_an_image(server, api_client):
    client = api_client(server)
    # the parameters left out take the UI's defaults
    path, summary, files = client.predict(prompt="a cat", width=80, height=64, steps=2, seed=3, api_name="/generate")
    assert read_png(path).size == (80, 64) and "CLEAR" in summary and files == [path]
    assert json.loads(read_png(path).text["clear-dit"])["seed"] == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width="abc"), "width must be a number, got 'abc'"),
        (dict(seed="abc"), "seed must be a number, got 'abc'"),
        (dict(seed=1.5), "seed must be a whole number, got 1.5"),
        (dict(height=64.5), "height must be a whole number, got 64.5"),
        (dict(down_factor="3"), "down factor must be one of (1, 2, 4), got 3"),
        (dict(steps=101), "steps must be 1 to 100, got 101"),
        (dict(guidance=None), "guidance is missing"),
        (dict(guidance="abc"), "guidance must be a number, got 'abc'"),
        (dict(true_cfg=11), "true CFG scale must be 1 (off) to 10, got 11.0"),
        (dict(window_size=65), "window radius must be 1 to 64 tokens, got 65"),
    ],
)
def test_bad_input_through_the_api_is_a_readable_error(server, api_client, changes, message):
    """gradio's own number handling ran first: 'abc' failed with no message and 1.5 was rounded to seed 2; its
    slider range check named no setting ('Value 101 is greater than maximum value 100.')."""
    from gradio_client.exceptions import AppError

    kwargs = {**dict(prompt="a cat", width=64, height=64, steps=1, seed=1, window_size=2), **changes}
    with pytest.raises(AppError, match=re.escape(message)):
        api_client(server).predict(**kwargs, api_name="/generate")


def test_the_down_factor_is_taken_as_the_api_page_lists_it(server, api_client):
    client = api_client(server)
    assert "Literal['1', '2', '4']" in str(client.view_api(print_info=False, return_format="str"))
    for down in ("2", 2):  # as listed, and as API clients passed it before
        kwargs = dict(prompt="a cat", width=64, height=64, steps=1, window_size=2, down_factor=down)
        _, summary, _ = client.predict(**kwargs, api_name="/generate")
        assert "CLEAR r=2 d=2" in summary


def test_a_job_cancelled_through_the_api_stops_the_generation(server, engine, api_client):
    """gradio_client's Job.cancel() (or a closed tab) cancels the event without the Stop button: the generation
    must stop too, not run to its last step holding the engine (and write its PNG) for nobody."""
    client = api_client(server)
    seed = 424242
    job = client.submit(prompt="a cat", width=512, height=512, steps=100, seed=seed, api_name="/generate")
    deadline = time.monotonic() + 60
    while engine._running is None and time.monotonic() < deadline:  # wait until it runs
        time.sleep(0.05)
    assert engine._running is not None
    time.sleep(0.5)
    job.cancel()
    deadline = time.monotonic() + 30
    while engine._running is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine._running is None  # stopped at a denoising step, well before 100 of them
    assert not [p for p in engine.output_dir.rglob(f"*-{seed}-*.png")]


def test_pngs_in_a_chosen_output_dir_outlive_their_session(cb, engine):
    path, *_ = cb.generate(*values(), request=session("kept"))
    cb.end_session(request=session("kept"))
    assert Path(path).is_file() and not engine.owns_output_dir


def test_a_closed_tab_stops_its_running_generation(engine):
    """gradio's unload event reaches end_session while the tab's generation runs: it must stop there."""
    started, outcome = threading.Event(), []

    def run():
        settings = GenerationSettings(**{**BASE, "width": 256, "height": 256, "steps": 100})
        try:
            engine.generate(settings, "closing-tab", lambda i, n, desc: started.set())
            outcome.append("ran to the end")
        except GenerationCancelled:
            outcome.append("cancelled")

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(120)
    engine.end_session("closing-tab")
    thread.join(120)
    assert outcome == ["cancelled"]


def test_a_closed_browser_session_takes_its_pngs_along(api_client):
    """Without an output_dir the PNGs go to a temp folder of the engine's: a session's subfolder goes when its
    browser tab closes (gradio's unload event); they piled up in /tmp before."""
    owned = GenerationEngine.load("tiny")
    folder = owned.output_dir
    demo = build_demo(engine=owned)
    port = free_port()
    launch(demo, port=port, block=False, quiet=True)
    client = api_client(f"http://127.0.0.1:{port}/")
    try:
        tab = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # what a browser tab keeps open
        tab.request("GET", f"/gradio_api/heartbeat/{client.session_hash}")
        assert tab.getresponse().read1(64).startswith(b"data: ALIVE")
        other = owned.generate(GenerationSettings(**BASE), session="other-tab")
        client.predict(prompt="a cat", width=64, height=64, steps=1, api_name="/generate")
        pngs = list((folder / client.session_hash).glob("*.png"))
        assert len(pngs) == 1 and read_png(pngs[0]).size == (64, 64)
        tab.close()
        deadline = time.monotonic() + 60
        while (folder / client.session_hash).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (folder / client.session_hash).exists()
        assert other.path.is_file()  # another session's images stay
    finally:
        client.close()
        demo.close()


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "app.cli", "app", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "/nonexistent/flux"], 1, "error: model folder not found: /nonexistent/flux"),
        (["--port", "0"], 2, "error: --port must be 1 to 65535, got 0"),
        (["--port", "70000"], 2, "error: --port must be 1 to 65535, got 70000"),
        (["--weights", "missing.safetensors"], 2, "error: weights file not found: missing.safetensors"),
        (["--weights", "README.md"], 2, "error: README.md is not a readable safetensors file: "),
        (["--host", "999.1.1.1"], 2, "error: --host 999.1.1.1 is not an address or a resolvable host name: "),
    ],
)
def test_cli_app_rejects_bad_arguments_in_one_line(args, code, message):
    proc = cli(*args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code and err.count("\n") == 1 and err.startswith(message), err


def test_cli_app_on_a_port_in_use_says_so_before_loading_the_model():
    """gradio said 'Cannot find empty port ... pass server_port to launch()', after the model had loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("--port", str(port))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --port {port} on 127.0.0.1 is not free (") and "images go to" not in out


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_cli_app_stopped_while_it_starts_stops_and_takes_its_folder_along(tiny_pipeline_path, sig, delay):
    """SIGTERM (and Ctrl-C's KeyboardInterrupt) raised wherever the main thread was: inside a finalizer during the
    server's start it was dropped, and the server ran on (a service manager then SIGKILLs it, leaving the folder)."""
    import signal

    proc = cli("--port", str(free_port()))
    try:
        first = proc.stdout.readline()
        assert first.startswith("images go to "), first + proc.stderr.read()
        time.sleep(delay)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    folder = Path(first.split()[3])
    assert proc.returncode == 0 and not folder.exists(), err[-2000:]


def test_cli_app_leaves_the_signal_handlers_as_it_found_them(monkeypatch, capsys):
    """main() may run in a longer-lived process (a notebook, a test): its SIGTERM must not stay a no-op."""
    import signal

    import app.web
    from app.cli import main

    def refused(*args, **kwargs):
        raise OSError("Cannot find empty port")

    monkeypatch.setattr(app.web, "launch", refused)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert main(["app", "--port", str(free_port())]) == 1
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert capsys.readouterr().err.endswith("error: Cannot find empty port\n")


def test_cli_app_serves_the_named_endpoints(tiny_pipeline_path):
    port = free_port()
    proc = cli("--port", str(port))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=5) as response:
                    info = json.load(response)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the app did not start within 180 s"
                time.sleep(1)
        assert {"/generate", "/compare"} <= set(info["named_endpoints"])
    finally:
        proc.terminate()  # SIGTERM, as a service manager stops it
        out, _ = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out  # the user is told where to point the browser
    folder = re.search(r"^images go to (\S+) ", out, re.MULTILINE)
    assert folder and Path(folder[1]).name.startswith("clear-dit-webui-")
    assert proc.returncode == 0 and not Path(folder[1]).exists()  # shut down as on Ctrl-C: its temp folder went


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server, wait_until="domcontentloaded")
        page.locator("#compare").wait_for(timeout=60_000)
        yield page
        browser.close()


def fill(page, selector: str, value: str) -> None:
    field = page.locator(selector)
    field.fill(value)
    field.press("Tab")  # commit the value as a user leaving the field does


@needs_chromium
def test_browser_compare_shows_both_images_and_timings(page, server, tmp_path):
    fill(page, "#prompt textarea", "a lighthouse on a cliff at sunset")
    fill(page, "#width input", "128")
    fill(page, "#height input", "96")
    fill(page, "#steps input[type=number]", "2")
    fill(page, "#window input[type=number]", "2")
    page.locator("#compare").click()
    images = {}
    for name in ("full", "clear"):
        img = page.locator(f"#{name} img")
        img.wait_for(timeout=60_000)
        response = page.request.get(img.get_attribute("src"))
        assert response.ok
        images[name] = read_png(response.body())
    assert images["full"].size == images["clear"].size == (128, 96)
    summary = page.locator("#summary").inner_text()
    assert "full attention" in summary and "speedup" in summary and "attention density" in summary
    page.locator("#heatmap img").wait_for(timeout=10_000)
    shot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "webui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert read_png(shot.read_bytes()).width > 0


@needs_chromium
def test_browser_bad_size_shows_the_error(page):
    fill(page, "#width input", "100")
    page.locator("#generate").click()
    page.get_by_text("width 100 px is not allowed").first.wait_for(timeout=30_000)


@needs_chromium
def test_browser_cancel_stops_the_generation_and_the_next_one_runs(page, engine):
    pngs = lambda: sorted(engine.output_dir.rglob("*.png"))  # noqa: E731
    before = pngs()
    fill(page, "#width input", "2048")  # 100 steps at 2048 px run far longer than the cancel takes to arrive
    fill(page, "#height input", "2048")
    fill(page, "#steps input[type=number]", "100")
    page.locator("#generate").click()
    page.get_by_text("denoising step").first.wait_for(timeout=30_000)  # live progress from the step callback
    page.locator("#cancel").click()
    page.wait_for_function("() => !document.body.innerText.includes('denoising step')", timeout=30_000)
    fill(page, "#width input", "512")
    fill(page, "#height input", "512")
    fill(page, "#steps input[type=number]", "2")
    page.locator("#generate").click()
    page.locator("#summary").get_by_text("512x512, 2 steps").wait_for(timeout=60_000)
    new = [p for p in pngs() if p not in before]
    assert len(new) == 1 and json.loads(read_png(new[0]).text["clear-dit"])["steps"] == 2


def test_compare_times_each_side_after_an_untimed_one_step_warm_up(cb, engine, monkeypatch):
    """One-off costs (first calls, kernels compiled per size and radius) would fall on whichever side runs first."""
    calls, call = [], type(engine.pipe).__call__

    def recording(pipe, *args, **kwargs):
        calls.append(kwargs["num_inference_steps"])
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(engine.pipe), "__call__", recording)
    *_, summary, _, _ = cb.compare(*values(steps=2))
    assert calls == [1, 2, 1, 2] and "each after an untimed 1-step warm-up" in summary


def test_compare_clear_half_is_a_plain_clear_run_with_the_same_seed(cb):
    """'same seed' is the point of Compare: the CLEAR image must be what Generate gives with that seed."""
    _, clear, *_ = cb.compare(*values(seed=11))
    plain, *_ = cb.generate(*values(seed=11, attention="clear"))
    assert json.loads(read_png(clear).text["clear-dit"])["seed"] == 11
    assert np.array_equal(np.asarray(read_png(plain)), np.asarray(read_png(clear)))


def test_compare_summary_psnr_is_that_of_the_two_images(cb):
    full, clear, *_, summary, _, _ = cb.compare(*values(height=128))
    a, b = (np.asarray(read_png(p).convert("RGB"), np.float64) for p in (full, clear))
    mse = ((a - b) ** 2).mean()
    assert mse > 0 and f"PSNR {10 * np.log10(255.0**2 / mse):.1f} dB" in summary


def test_compare_warm_up_is_timed_on_neither_side(cb, engine, monkeypatch):
    """A slow first call (kernel compilation) must not land in one side's seconds."""
    clock, skipped, call = time.perf_counter, [0.0], type(engine.pipe).__call__

    def slow_warm_up(pipe, *args, **kwargs):
        if kwargs["num_inference_steps"] == 1:
            skipped[0] += 1000.0
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(engine.pipe), "__call__", slow_warm_up)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + skipped[0])
    full, clear, *_ = cb.compare(*values(steps=2))
    seconds = [json.loads(read_png(p).text["clear-dit"])["seconds"] for p in (full, clear)]
    assert skipped[0] == 2000.0 and max(seconds) < 1000.0


def test_generate_and_compare_share_one_queue_slot(engine):
    """One generation at a time in gradio's queue too: else every waiting job shows as running, with no position."""
    demo = build_demo(engine=engine)
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("generate", "compare")}
    assert {fn.concurrency_limit for fn in fns.values()} == {1}
    assert fns["generate"].concurrency_id == fns["compare"].concurrency_id


def test_attention_is_taken_in_any_case(cb):
    path, summary, *_ = cb.generate(*values(attention="Full"))
    assert json.loads(read_png(path).text["clear-dit"])["attention"] == "full" and "full attention" in summary
