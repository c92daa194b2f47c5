"""The Gradio web UI: generate with CLEAR in the browser, side by side with full attention.

:class:`GenerationEngine` owns the one loaded pipeline and switches it between full attention and CLEAR
(re-patching with :func:`clear_dit.patch`, never reloading). :class:`Callbacks` turns widget values into
engine calls and engine results into widget values; it is plain Python, so the tests call it directly.
:func:`build_demo` wires both into a ``gr.Blocks`` app whose ``generate`` and ``compare`` events are also
named API endpoints for ``gradio_client``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import gradio as gr
import numpy as np
import torch
from PIL import Image, PngImagePlugin

import clear_dit
from app.errors import is_out_of_memory
from app.inputs import SEED_LIMIT, attention_saving, blank, not_utf8
from clear_dit.weights import check_weights, config_from_filename, read_weights, read_weights_config
from pipelines.highres import HighResFluxPipeline
from pipelines.loading import default_max_sequence_length, load_pipeline
from pipelines.stages import check_highres_inputs, parse_stages

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_MODES",
    "Callbacks",
    "Comparison",
    "GenerationCancelled",
    "GenerationEngine",
    "GenerationSettings",
    "Generation",
    "PUBLISHED_WEIGHTS",
    "build_demo",
    "launch",
]

ATTENTION_MODES = ("full", "clear")
MIN_SIDE, MAX_SIDE = 64, 8192
MAX_STEPS = 100
MAX_GUIDANCE, MAX_TRUE_CFG = 20.0, 10.0  # the sliders' ranges: the API is held to them too
MAX_WINDOW = 64
DOWN_FACTORS = (1, 2, 4)
#: The published CLEAR checkpoints (hub repo Huage001/CLEAR), as ``(label, path for load_weights)``.
PUBLISHED_WEIGHTS = [
    (f"{name} (published)", f"Huage001/CLEAR/{name}.safetensors")
    for name in ("clear_local_32", "clear_local_16", "clear_local_8", "clear_local_16_down_4", "clear_local_8_down_4")
]
NO_WEIGHTS = "none: zero-shot CLEAR with the model's own projections"
SIZE_PRESETS = ["512 x 512", "768 x 768", "1024 x 1024", "1024 x 768", "768 x 1024", "1536 x 1024", "2048 x 2048"]

ProgressFn = Callable[[int, int, str], None]


class GenerationCancelled(RuntimeError):
    """The user pressed cancel while their generation ran."""


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines one image; written into the PNG metadata."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 3.5
    true_cfg: float = 1.0
    seed: int = 0
    attention: str = "clear"
    window_size: int = 16
    down_factor: int = 1
    weights: str | None = None
    upscale: str = ""  # high-resolution mode: "WxH[,WxH...]" to upscale to after width x height; "" = off
    strength: float = 0.7  # SDEdit strength of the upscale stages

    @property
    def stages(self) -> list[tuple[int, int]]:
        """``(width, height)`` of every stage: the generated one, then the upscaled ones."""
        return [(self.width, self.height), *(parse_stages(self.upscale) if self.upscale.strip() else [])]


@contextlib.contextmanager
def _warnings_of(name: str) -> Iterator[list[str]]:
    """The messages logger ``name`` warns of inside the block (still logged as well)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


@dataclass
class Generation:
    image: Image.Image
    path: Path
    seconds: float
    settings: GenerationSettings
    warnings: tuple[str, ...] = ()  # what the pipeline warned of in this run (shown to the user, not just logged)


@dataclass
class Comparison:
    full: Generation
    clear: Generation
    density: float  # fraction of (query, key) pairs CLEAR computes
    heatmap: np.ndarray  # (height, width, 3) uint8
    mean_abs_diff: float  # in 0..255 pixel units

    @property
    def speedup(self) -> float:
        return self.full.seconds / self.clear.seconds

    def summary(self) -> str:
        s = self.clear.settings
        mse = _mse(self.full.image, self.clear.image)
        psnr = f"PSNR {10 * np.log10(255.0**2 / mse):.1f} dB" if mse > 0 else "identical images"
        return (
            f"**full attention** {self.full.seconds:.2f} s · **CLEAR** (r={s.window_size}, d={s.down_factor}) "
            f"{self.clear.seconds:.2f} s · **speedup {self.speedup:.2f}x**  \n"
            f"attention density {self.density:.1%} ({attention_saving(self.density)}) "
            f"· mean |difference| {self.mean_abs_diff:.1f}/255 · {psnr}  \n"
            "wall times of the whole pipeline call (text encoders, denoising, VAE decode), same seed, each after "
            "an untimed 1-step warm-up" + "".join(f"\n\nwarning: {warning}" for warning in self.clear.warnings)
        )


def _mse(a: Image.Image, b: Image.Image) -> float:
    return float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())


# A perceptual black -> purple -> orange -> yellow ramp for the difference heat map.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def difference_heatmap(a: Image.Image, b: Image.Image) -> tuple[np.ndarray, float]:
    """Per-pixel ``|a - b|`` (mean over RGB) as a ``(height, width, 3)`` uint8 heat map scaled to its maximum.

    Returns the heat map and the mean absolute difference in 0..255 units.
    """
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=-1)
    scaled = diff / max(diff.max(), 1e-8) * (len(_RAMP) - 1)
    anchors = np.arange(len(_RAMP))
    heat = np.stack([np.interp(scaled, anchors, _RAMP[:, c]) for c in range(3)], axis=-1)
    return heat.round().astype(np.uint8), float(diff.mean())


def _png_metadata(settings: GenerationSettings, model: str, seconds: float) -> PngImagePlugin.PngInfo:
    if settings.attention == "full" and not settings.upscale.strip():  # a weights file selected but not used
        settings = replace(settings, weights=None)
    if settings.true_cfg <= 1:  # no true CFG: the negative prompt was not used either
        settings = replace(settings, negative_prompt="", true_cfg=1.0)
    info = PngImagePlugin.PngInfo()
    record = {**asdict(settings), "model": model, "seconds": round(seconds, 3), "clear_dit": clear_dit.__version__}
    info.add_text("clear-dit", json.dumps(record))
    attention = f"CLEAR r={settings.window_size} d={settings.down_factor}" if settings.attention == "clear" else "full"
    info.add_text(
        "parameters",
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\nSteps: {settings.steps}, "
        f"Guidance: {settings.guidance}, Seed: {settings.seed}, Size: {settings.width}x{settings.height}, "
        f"Model: {model}, Attention: {attention}, Weights: {settings.weights or 'none'}"
        + (f", Upscale: {settings.upscale} (strength {settings.strength})" if settings.upscale.strip() else ""),
    )
    return info


_abandoned: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("_abandoned", default=None)


class GenerationEngine:
    """Owns the loaded pipeline; one generation at a time (a lock), attention switched by re-patching.

    Args:
        pipe: a FLUX pipeline; the engine patches and unpatches its transformer, so give it its own copy.
        model: the name it was loaded by (shown in the UI and written into the PNG metadata).
        weights: default CLEAR weights file (local path or ``owner/repo/file.safetensors``).
        output_dir: where the PNGs go (one subfolder per browser session), kept as they are; default a fresh
            temp folder, whose session subfolders go when their browser session ends and which goes with the engine.
    """

    def __init__(
        self, pipe: Any, model: str = "tiny", weights: str | None = None, output_dir: str | Path | None = None
    ) -> None:
        self.pipe = pipe
        self.model = model
        self.weights = weights
        self.pipe.set_progress_bar_config(disable=True)
        self.pixels_per_token = self.pipe.vae_scale_factor * 2  # VAE downsampling x FLUX's 2x2 latent packing
        self.text_len = default_max_sequence_length(pipe)  # T5 tokens in the joint sequence
        self.has_negative_prompt = "negative_prompt" in inspect.signature(self.pipe.__call__).parameters
        self.owns_output_dir = not output_dir
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="clear-dit-webui-"))
        if self.owns_output_dir:  # at the latest when the server exits
            weakref.finalize(self, shutil.rmtree, self.output_dir, ignore_errors=True)
        self._lock = threading.Lock()
        self._attention: tuple | None = None  # what the transformer runs now; None: unknown, set it up
        self._base_projections: dict[str, torch.Tensor] | None = None  # originals, kept once weights are loaded
        self._weights_loaded = False
        self._highres: HighResFluxPipeline | None = None  # a view of the same components, made on first use
        self._running: str | None = None  # the session whose run holds the engine
        self._run: object | None = None  # that run's token
        self._runs: dict[str, set[object]] = {}  # each session's runs, running or waiting for the engine
        self._runs_lock = threading.Lock()
        self._cancelled: set[object] = set()  # tokens of cancelled runs

    @classmethod
    def load(
        cls,
        model: str = "tiny",
        weights: str | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        output_dir: str | Path | None = None,
    ) -> GenerationEngine:
        """Load ``model`` (``"tiny"``, a local folder or a hub id); default CUDA + bfloat16 if there, else CPU."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return cls(load_pipeline(model, dtype).to(device), model, weights, output_dir)

    def size_rule(self, down_factor: int = 1) -> str:
        step = self.pixels_per_token * down_factor
        return f"width and height: multiples of {step} px, {MIN_SIDE} to {MAX_SIDE} px"

    def validate(self, s: GenerationSettings) -> None:
        """Raise a one-line ``ValueError`` naming the first bad setting and what is allowed."""
        if reason := blank(s.prompt):
            raise ValueError(f"the prompt is {reason}")
        for name, text in (("prompt", s.prompt), ("negative prompt", s.negative_prompt)):
            if reason := not_utf8(text):  # a browser sends a lone surrogate as JSON's \ud800
                raise ValueError(f"the {name} is {reason}")
        if s.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {s.attention!r}")
        if s.down_factor not in DOWN_FACTORS:
            raise ValueError(f"down factor must be one of {DOWN_FACTORS}, got {s.down_factor}")
        down = s.down_factor if s.attention == "clear" else 1  # full attention pools nothing
        for name, side in (("width", s.width), ("height", s.height)):
            if not MIN_SIDE <= side <= MAX_SIDE or side % (self.pixels_per_token * down):
                raise ValueError(f"{name} {side} px is not allowed: {self.size_rule(down)}")
        if not 1 <= s.steps <= MAX_STEPS:
            raise ValueError(f"steps must be 1 to {MAX_STEPS}, got {s.steps}")
        if not 0 <= s.guidance <= MAX_GUIDANCE:  # NaN fails every comparison, so it fails here too
            raise ValueError(f"guidance must be 0 to {MAX_GUIDANCE:g}, got {s.guidance}")
        if not 1 <= s.true_cfg <= MAX_TRUE_CFG:
            raise ValueError(f"true CFG scale must be 1 (off) to {MAX_TRUE_CFG:g}, got {s.true_cfg}")
        if not 1 <= s.window_size <= MAX_WINDOW:
            raise ValueError(f"window radius must be 1 to {MAX_WINDOW} tokens, got {s.window_size}")
        if not 0 <= s.seed < SEED_LIMIT:  # as the command line's --seed
            raise ValueError(f"seed must be 0 to {SEED_LIMIT - 1}, got {s.seed}")
        clear_dit.mask.check_window_config(s.window_size, s.down_factor)
        if s.upscale.strip():
            stages = s.stages
            if any(max(size) > MAX_SIDE for size in stages):
                raise ValueError(f"upscale sizes must be at most {MAX_SIDE} px per side, got {s.upscale}")
            strengths = [s.strength] * (len(stages) - 1)
            check_highres_inputs(stages, strengths, 1.0, s.attention, s.down_factor, unit=self.pixels_per_token)

    def cancel(self, session: str) -> bool:
        """Stop ``session``'s generation at its next denoising step, or before it starts while it waits for the
        engine (behind an abandoned one, say); False when it has none."""
        with self._runs_lock:
            runs = self._runs.get(session)
            if not runs:
                return False
            self._cancelled |= runs  # per run: a run of the session that ends cannot clear another's cancel
            return True

    def _restore_base_projections(self) -> None:
        if self._weights_loaded:
            params = dict(self.pipe.transformer.named_parameters())
            with torch.no_grad():
                for name, value in self._base_projections.items():
                    params[name].copy_(value)
            self._weights_loaded = False

    def _set_attention(self, s: GenerationSettings) -> None:
        """Bring the transformer to ``s``'s attention; a no-op when it already runs it."""
        wanted = ("full",) if s.attention == "full" else ("clear", s.window_size, s.down_factor, s.weights)
        if s.attention == "clear" and s.weights and Path(s.weights).is_file():  # a rewritten file is new weights
            stat = Path(s.weights).stat()
            wanted += (stat.st_mtime_ns, stat.st_size)
        if wanted == self._attention:
            return
        self._attention = None  # unknown until the switch below completes (it may fail half-way)
        clear_dit.unpatch(self.pipe)  # a patch (or load_weights) on a patched model would cover, not replace, it
        if s.attention == "full" or s.weights is None:
            self._restore_base_projections()
            if s.attention == "clear":
                clear_dit.patch(self.pipe, window_size=s.window_size, down_factor=s.down_factor)
        else:
            if self._base_projections is None:  # full attention needs the original projections back later
                self._base_projections = {k: v.detach().cpu().clone() for k, v in self._clear_params().items()}
            self._weights_loaded = True
            clear_dit.load_weights(self.pipe, s.weights, window_size=s.window_size, down_factor=s.down_factor)
        self._attention = wanted

    def _clear_params(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.pipe.transformer.named_parameters() if clear_dit.weights.is_clear_key(k)}

    @contextlib.contextmanager
    def _session_runs(self, session: str) -> Iterator[None]:
        """The engine's one run at a time, ``session``'s: a cancel pressed during it holds until it ends."""
        token = object()
        with self._runs_lock:
            self._runs.setdefault(session, set()).add(token)
            abandoned = _abandoned.get()
            if abandoned is not None and abandoned.is_set():  # its event was cancelled before the run got here
                self._cancelled.add(token)
        try:
            with self._lock:  # a cancel while it waited holds: the run stops at its first check
                self._running, self._run = session, token
                try:
                    self._stop_if_cancelled()  # cancelled while it waited: not one step, nor a weights load
                    yield
                finally:
                    self._running = self._run = None
        finally:
            with self._runs_lock:
                self._runs[session].discard(token)
                if not self._runs[session]:
                    del self._runs[session]
                self._cancelled.discard(token)

    def end_session(self, session: str) -> None:
        """A browser session has ended (its tab closed or reloaded): stop its runs at their next denoising step
        (gradio does not cancel a running event of a closed tab: it ran on, for nobody, and every other tab queued
        behind it), then remove its PNGs, unless they go to an ``output_dir`` the caller chose (gradio keeps its
        own copies of what it showed)."""
        self.cancel(session)
        if self.owns_output_dir:
            with self._lock:
                shutil.rmtree(self.output_dir / _session_folder(session), ignore_errors=True)

    def _stop_if_cancelled(self) -> None:
        if self._run in self._cancelled:
            raise GenerationCancelled("generation cancelled")

    def generate(
        self, s: GenerationSettings, session: str = "", progress: ProgressFn | None = None, stage: str = ""
    ) -> Generation:
        """One image with ``s``; PNG written under ``output_dir/session``; progress(step, total, desc)."""
        self.validate(s)
        with self._session_runs(session):
            return self._generate(s, session, progress, stage or s.attention)

    def _generate(
        self, s: GenerationSettings, session: str, progress: ProgressFn | None, stage: str, warmup: bool = False
    ) -> Generation:
        def cancel_only(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            self._stop_if_cancelled()
            return kwargs

        def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            self._stop_if_cancelled()
            if progress is not None:
                n = pipe.num_timesteps  # of this stage: an upscale stage runs `strength` of the steps
                where = f"stage {pipe.stage_index + 1}/{pipe.num_stages}" if s.upscale.strip() else stage
                progress(i + 1, n, f"{where}: denoising step {i + 1}/{n}")
            return kwargs

        common = dict(
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            max_sequence_length=self.text_len,
            callback_on_step_end=on_step_end,
        )
        common.update(self._true_cfg(s))
        warnings = _weights_mismatch(s)
        try:
            if s.upscale.strip():
                start = time.perf_counter()  # the high-resolution pipeline loads its weights per call: timed too
                with _warnings_of("pipelines.highres") as stages:  # an upscale stage that ignores its image
                    image = self._run_highres(s, common)
                warnings += stages
            else:
                self._set_attention(s)  # not timed: loading a weights file is not generation
                if warmup:  # one-off costs (first calls, kernels compiled per size and radius) are not this side's
                    quiet = dict(common, num_inference_steps=1, callback_on_step_end=cancel_only)
                    self.pipe(s.prompt, width=s.width, height=s.height, **quiet)
                generator = torch.Generator("cpu").manual_seed(s.seed)  # as the CLI: same seed, same image
                start = time.perf_counter()
                image = self.pipe(s.prompt, width=s.width, height=s.height, generator=generator, **common)
                image = image.images[0]
        except (MemoryError, RuntimeError) as err:  # CUDA's OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size = "x".join(map(str, s.stages[-1]))
            raise ValueError(
                f"out of memory at {size} with {s.attention} attention: "
                "try a smaller size, CLEAR attention or a smaller window"
            ) from err
        seconds = time.perf_counter() - start
        folder = self.output_dir / _session_folder(session)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{s.seed}-{stage.replace(' ', '_')}-{time.time_ns()}.png"
        image.save(path, pnginfo=_png_metadata(s, self.model, seconds))
        logger.info("generated %s in %.2f s", path, seconds)
        return Generation(image=image, path=path, seconds=seconds, settings=s, warnings=tuple(warnings))

    def _true_cfg(self, s: GenerationSettings) -> dict:
        """True CFG against the negative prompt (empty by default) above scale 1, as ``clear-dit --true-cfg``."""
        if self.has_negative_prompt and s.true_cfg > 1:
            return {"negative_prompt": s.negative_prompt, "true_cfg_scale": s.true_cfg}
        return {}

    def _run_highres(self, s: GenerationSettings, common: dict) -> Image.Image:
        """Progressive upscaling; it installs CLEAR itself, on the unpatched model with its own projections."""
        self._set_attention(replace(s, attention="full"))
        if self._highres is None:
            self._highres = HighResFluxPipeline.from_pipe(self.pipe)
            self._highres.set_progress_bar_config(disable=True)
        out = self._highres(
            s.prompt,
            stages=s.stages,
            strength=s.strength,
            seed=s.seed,
            base_attention=s.attention,
            window_size=s.window_size,
            down_factor=s.down_factor,
            clear_weights=s.weights,
            **common,
        )
        return out.images[0]

    def compare(self, s: GenerationSettings, session: str = "", progress: ProgressFn | None = None) -> Comparison:
        """Full attention, then CLEAR, same seed; ``s.attention`` is ignored."""
        full_s, clear_s = replace(s, attention="full"), replace(s, attention="clear")
        self.validate(clear_s)
        if clear_s.weights:  # weights the model cannot load fail the CLEAR half: before the full half, not after
            header = read_weights(clear_s.weights, clear_s.window_size, clear_s.down_factor, tensors=False)
            check_weights(self.pipe, header)
        if s.upscale.strip():
            raise ValueError("compare runs single-stage generation: empty 'Upscale to' (high-resolution mode) first")

        def stage_progress(offset: int) -> ProgressFn | None:
            if progress is None:
                return None
            return lambda i, n, desc: progress(offset + i, 2 * n, desc)

        with self._session_runs(session):  # both halves: a cancel between them stops the second
            full = self._generate(full_s, session, stage_progress(0), "full attention", warmup=True)
            self._stop_if_cancelled()
            clear = self._generate(clear_s, session, stage_progress(s.steps), "CLEAR", warmup=True)
        grid = (s.height // self.pixels_per_token, s.width // self.pixels_per_token)
        density = clear_dit.attention_density(grid, self.text_len, s.window_size, s.down_factor)
        heatmap, mean_diff = difference_heatmap(full.image, clear.image)
        return Comparison(full=full, clear=clear, density=density, heatmap=heatmap, mean_abs_diff=mean_diff)


def _as_float(name: str, value: Any) -> float:
    if value is None or value == "":
        raise ValueError(f"{name} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return number


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):  # as it is: a float holds 53 bits, seeds take 63
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,40}\s*", value):  # an API client's "123": not via float
        return int(value)
    number = _as_float(name, value)
    if number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(number)


def _session_folder(session: str) -> str:
    """The output subfolder of a browser session: its hash as it is if it is a plain name, else a digest of it
    (the client chooses its session hash: '../x' or '/abs' must not choose where files go)."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", session or ""):
        return session
    return "session-" + hashlib.sha256((session or "").encode()).hexdigest()[:16] if session else "default"


def _weights_mismatch(s: GenerationSettings) -> list[str]:
    """A warning for the user when CLEAR runs ``s.weights`` with another radius or down factor than the file was
    made for: allowed (the paper reuses radii), but the library's warning reached the server log alone."""
    if s.weights is None or (s.attention != "clear" and not s.upscale.strip()):
        return []
    made = dict(zip(("window radius", "down factor"), weights_config(s.weights), strict=True))
    used = {"window radius": s.window_size, "down factor": s.down_factor}
    if all(made[k] in (None, used[k]) for k in made):
        return []
    declared = ", ".join(f"{k} {v}" for k, v in made.items() if v is not None)
    asked = ", ".join(f"{k} {v}" for k, v in used.items())
    return [f"{Path(s.weights).name} was made for {declared}; used with {asked} as asked"]


def weights_path(choice: str | None) -> str | None:
    """The path :func:`clear_dit.load_weights` takes for a weights choice: ``None`` for none; the hub path of a
    published file typed by hand (``clear_local_16``, with ``.safetensors`` or its label's " (published)"), unless
    a local file has that name; else the path with ``~`` expanded, as the library reads it."""
    if not choice or choice == NO_WEIGHTS:
        return None
    text = str(choice).strip()
    published = {name: path for label, path in PUBLISHED_WEIGHTS for name in (label, Path(path).name, Path(path).stem)}
    if text in published and not Path(text).expanduser().is_file():
        return published[text]
    return os.path.expanduser(text)


def weights_config(path: str | None) -> tuple[int | None, int | None]:
    """``(window_size, down_factor)`` a weights file declares (metadata of a local file, else its name)."""
    path = weights_path(path)
    if path is None:
        return None, None
    if Path(path).is_file():
        with contextlib.suppress(ValueError):  # an unreadable file gets its readable error when it is loaded
            return read_weights_config(path)
    return config_from_filename(path)


def _slider(*args: Any, **kwargs: Any) -> gr.Slider:
    """A ``gr.Slider`` whose value reaches :meth:`Callbacks.settings` as sent: gradio's own check of an API client's
    value names no setting ("Value 101 is greater than maximum value 100.") and fails on ``None`` or ``'abc'`` with
    no message at all; :meth:`GenerationEngine.validate` names the setting and its range. (Not a subclass: gradio
    writes a ``.pyi`` file beside the module of every component subclass.)"""
    slider = gr.Slider(*args, **kwargs)
    slider.preprocess = lambda payload: payload  # type: ignore[method-assign]
    return slider


class Callbacks:
    """The UI's event handlers: widget values in, widget values out; errors become ``gr.Error``.

    ``generate`` and ``compare`` are the named API endpoints, so their parameter names are the API's.
    """

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def settings(
        self,
        prompt: str,
        negative_prompt: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        true_cfg: float,
        seed: float,
        attention: str,
        window_size: float,
        down_factor: float,
        weights: str | None,
        upscale: str = "",
        strength: float = 0.7,
    ) -> GenerationSettings:
        """Widget values -> validated :class:`GenerationSettings` (``ValueError`` on bad input)."""
        s = GenerationSettings(
            prompt=prompt or "",
            negative_prompt=negative_prompt or "",
            width=_as_int("width", width),
            height=_as_int("height", height),
            steps=_as_int("steps", steps),
            guidance=_as_float("guidance", guidance),
            true_cfg=_as_float("true CFG scale", true_cfg),
            seed=_as_int("seed", seed),
            attention=str(attention).lower(),
            window_size=_as_int("window radius", window_size),
            down_factor=_as_int("down factor", down_factor),
            weights=weights_path(weights),
            upscale=upscale or "",
            strength=_as_float("strength", strength),
        )
        self.engine.validate(s)
        return s

    @staticmethod
    def _progress(progress: gr.Progress | None) -> ProgressFn | None:
        return None if progress is None else lambda i, n, desc: progress((i, n), desc=desc, unit="steps")

    @staticmethod
    def _session(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "default"

    @staticmethod
    def _run(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except GenerationCancelled as err:
            raise gr.Error("cancelled", print_exception=False) from err
        except (ValueError, FileNotFoundError, OSError) as err:
            raise gr.Error(str(err), print_exception=False) from err
        except Exception as err:  # the server must survive anything a request does; log it for the operator
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {type(err).__name__}: {err}") from err

    def generate(
        self,
        prompt: str,
        negative_prompt: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        true_cfg: float,
        seed: float,
        attention: str,
        window_size: float,
        down_factor: float,
        weights: str | None,
        upscale: str,
        strength: float,
        gallery: list | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio finds its progress tracker by this default)
        request: gr.Request | None = None,
    ) -> tuple[str, str, list[str], list]:
        """One image with the chosen attention -> ``(PNG path, summary, [PNG path], gallery entries)``."""
        values = (prompt, negative_prompt, width, height, steps, guidance, true_cfg, seed, attention)
        values += (window_size, down_factor, weights, upscale, strength)

        def work():
            s = self.settings(*values)
            g = self.engine.generate(s, self._session(request), self._progress(progress))
            clear = f"CLEAR r={s.window_size} d={s.down_factor}"
            label = "full attention" if s.attention == "full" else clear
            if s.upscale.strip():
                sizes = " → ".join(f"{w}x{h}" for w, h in s.stages)
                label = f"high resolution {sizes} (base: {s.attention}, upscaling: {clear})"
            size = "x".join(map(str, s.stages[-1]))
            summary = f"**{label}** {g.seconds:.2f} s · {size}, {s.steps} steps, seed {s.seed}"
            for warning in g.warnings:
                gr.Warning(warning)
                summary += f"\n\nwarning: {warning}"
            return str(g.path), summary, [str(g.path)], [*(gallery or []), (str(g.path), f"{label}, seed {s.seed}")]

        return self._run(work)

    def compare(
        self,
        prompt: str,
        negative_prompt: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        true_cfg: float,
        seed: float,
        attention: str,
        window_size: float,
        down_factor: float,
        weights: str | None,
        upscale: str,
        strength: float,
        gallery: list | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
        request: gr.Request | None = None,
    ) -> tuple[str, str, tuple[str, str], np.ndarray, str, list[str], list]:
        """Full vs CLEAR, same seed -> ``(full PNG, CLEAR PNG, slider pair, heat map, summary, PNGs, gallery)``.

        ``attention`` is ignored (both run); it is a parameter so both endpoints take the same inputs.
        """
        values = (prompt, negative_prompt, width, height, steps, guidance, true_cfg, seed, attention)
        values += (window_size, down_factor, weights, upscale, strength)

        def work():
            s = self.settings(*values)
            c = self.engine.compare(s, self._session(request), self._progress(progress))
            for warning in c.clear.warnings:
                gr.Warning(warning)
            paths = [str(c.full.path), str(c.clear.path)]
            entries = [
                *(gallery or []),
                (paths[0], f"full attention, seed {s.seed}"),
                (paths[1], f"CLEAR r={s.window_size} d={s.down_factor}, seed {s.seed}"),
            ]
            return paths[0], paths[1], tuple(paths), c.heatmap, c.summary(), paths, entries

        return self._run(work)

    def cancel(self, request: gr.Request | None = None) -> None:
        if self.engine.cancel(self._session(request)):
            gr.Info("cancelling at the next denoising step")

    def end_session(self, request: gr.Request | None = None) -> None:
        self.engine.end_session(self._session(request))

    def cancellable(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        """``handler`` (``generate`` or ``compare``) as the UI's event function: run in a worker thread that the
        event may abandon, and stopped at its next denoising step when the event is cancelled in any way (the
        Stop button, ``gradio_client``'s ``Job.cancel()``, a closed tab). Gradio runs a plain function in a thread
        it cannot interrupt: the generation went on to its last step, holding the engine, for nobody."""
        signature = inspect.signature(handler)

        @functools.wraps(handler)  # the same signature: the API's parameters, gr.Progress and gr.Request
        async def run(*args: Any, **kwargs: Any) -> Any:
            request = signature.bind_partial(*args, **kwargs).arguments.get("request")
            work = functools.partial(handler, *args, **kwargs)
            abandoned = threading.Event()
            _abandoned.set(abandoned)  # the worker thread runs in a copy of this context
            try:
                return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                abandoned.set()  # before cancel(): a run registering in between sees one or the other
                self.engine.cancel(self._session(request))
                raise

        return run

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, 2**32 - 1)

    @staticmethod
    def apply_preset(preset: str) -> tuple[int, int]:
        width, height = (int(v) for v in preset.split("x"))
        return width, height

    @staticmethod
    def weights_selected(path: str | None, window_size: int, down_factor: int | str) -> tuple[int, str]:
        """Set radius and down factor to what the chosen weights file was trained with (when it says)."""
        r, d = weights_config(path)
        return r or window_size, str(d or down_factor)


def _theme() -> gr.themes.Base:
    # System fonts: the default theme fetches Google Fonts, which offline and firewalled machines cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_demo(model: str = "tiny", weights: str | None = None, engine: GenerationEngine | None = None) -> gr.Blocks:
    """The web UI as a ``gr.Blocks`` app; the model is loaded here, once, and shared by all sessions.

    Named API endpoints: ``/generate`` and ``/compare`` (inputs: the settings widgets; see the app's API page).
    """
    engine = engine or GenerationEngine.load(model, weights)
    model, weights = engine.model, engine.weights
    cb = Callbacks(engine)
    tiny = model == "tiny"
    size, steps = (256, 4) if tiny else (1024, 28)
    weight_choices = [(NO_WEIGHTS, NO_WEIGHTS), *PUBLISHED_WEIGHTS]
    if weights:
        weight_choices.insert(0, (f"{Path(weights).name} (--weights)", weights))
    r0, d0 = weights_config(weights)

    # gradio's copies of the images it served: older than a day swept daily, all of them at shutdown
    with gr.Blocks(title="clear-dit", delete_cache=(86400, 86400)) as demo:
        gr.Markdown(
            f"## clear-dit: CLEAR local attention vs full attention\nModel `{model}` on "
            f"{engine.pipe.transformer.device}. **Compare** runs both with the same seed."
        )
        gallery_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt", lines=2, value="a lighthouse on a cliff at sunset", elem_id="prompt"
                )
                # explicit "" values: gradio_client then treats these inputs as optional
                negative = gr.Textbox("", label="Negative prompt", visible=engine.has_negative_prompt)
                preset = gr.Dropdown(SIZE_PRESETS, label="Size preset", value=None)
                with gr.Row():
                    # no precision=0: gradio would round 64.5 (and fail on 'abc' with no message) before _as_int
                    width = gr.Number(label="Width", value=size, elem_id="width")
                    height = gr.Number(label="Height", value=size, elem_id="height")
                gr.Markdown(
                    f"Limits: {engine.size_rule()}; with down factor d: multiples of {engine.pixels_per_token}·d."
                )
                with gr.Row():
                    steps_in = _slider(1, MAX_STEPS, value=steps, step=1, label="Steps", elem_id="steps")
                    guidance = _slider(0, MAX_GUIDANCE, value=3.5, step=0.1, label="Guidance")
                true_cfg = _slider(
                    1,
                    MAX_TRUE_CFG,
                    value=1,
                    step=0.1,
                    label="True CFG scale (against the negative prompt; 1: off)",
                    visible=engine.has_negative_prompt,
                )
                with gr.Row():
                    seed = gr.Number(
                        label="Seed",
                        value=0,
                        info="a browser keeps 15-16 digits: a longer seed is rounded (the summary shows the one used)",
                    )
                    dice = gr.Button("Random seed", scale=0)
                attention = gr.Radio(["full", "clear"], value="clear", label="Attention (Generate)")
                with gr.Row():
                    window = _slider(
                        1, MAX_WINDOW, value=r0 or 16, step=1, label="Window radius (tokens)", elem_id="window"
                    )
                    # strings: the API page lists a dropdown's choices as strings, so '2' must be one; custom values
                    # let the ints API clients passed before through to validate(), which names the allowed ones
                    down = gr.Dropdown(
                        [str(d) for d in DOWN_FACTORS], value=str(d0 or 1), label="Down factor", allow_custom_value=True
                    )
                weights_in = gr.Dropdown(
                    weight_choices,
                    value=weights or NO_WEIGHTS,
                    allow_custom_value=True,
                    label="CLEAR weights (name, local path or owner/repo/file.safetensors)",
                )
                upload = gr.File(label="or upload a .safetensors file", file_types=[".safetensors"], height=80)
                with gr.Accordion("High-resolution mode (progressive upscaling with CLEAR)", open=False):
                    upscale = gr.Textbox(
                        "",
                        label="Upscale to (WxH, comma-separated, increasing; empty: off)",
                        placeholder=f"{2 * size}x{2 * size}",
                        elem_id="upscale",
                    )
                    strength = _slider(0.05, 1, value=0.7, step=0.05, label="SDEdit strength of the upscale stages")
                    gr.Markdown(
                        "Generate runs stage 0 at Width x Height with the attention chosen above, then upscales and "
                        "refines each further size (stages 1, 2, ...) with CLEAR (window radius, down factor and "
                        "weights above), NTK-scaled RoPE, proportional attention, a fixed time shift and VAE tiling."
                    )
            with gr.Column(scale=3):
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cmp_btn = gr.Button("Compare full vs CLEAR", variant="primary", elem_id="compare")
                    stop_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                summary = gr.Markdown(elem_id="summary")
                with gr.Tabs() as tabs:
                    with gr.Tab("Result", id="result"):
                        result = gr.Image(label="Result", type="filepath", format="png", elem_id="result")
                    with gr.Tab("Compare", id="compare"):
                        with gr.Row():
                            full_img = gr.Image(label="Full attention", type="filepath", format="png", elem_id="full")
                            clear_img = gr.Image(label="CLEAR", type="filepath", format="png", elem_id="clear")
                        with gr.Row():
                            slider = gr.ImageSlider(label="Slider: full | CLEAR", type="filepath", format="png")
                            heat = gr.Image(label="|full - CLEAR| heat map", format="png", elem_id="heatmap")
                files = gr.File(label="PNG downloads (settings in the PNG metadata)", file_count="multiple")
                gallery = gr.Gallery(label="This session", columns=6, height=260, format="png")

        inputs = [prompt, negative, width, height, steps_in, guidance, true_cfg, seed, attention, window, down]
        inputs += [weights_in, upscale, strength]
        limit = {"concurrency_limit": 1, "concurrency_id": f"generate:{model}"}  # one generation at a time

        gen_event = gen_btn.click(
            cb.cancellable(cb.generate),
            [*inputs, gallery_state],
            [result, summary, files, gallery_state],
            api_name="generate",
            **limit,
        )
        cmp_event = cmp_btn.click(
            cb.cancellable(cb.compare),
            [*inputs, gallery_state],
            [full_img, clear_img, slider, heat, summary, files, gallery_state],
            api_name="compare",
            **limit,
        )
        private = {"queue": False, "api_visibility": "private"}
        gen_btn.click(lambda: gr.Tabs(selected="result"), None, tabs, **private)
        cmp_btn.click(lambda: gr.Tabs(selected="compare"), None, tabs, **private)
        gallery_state.change(lambda entries: entries, gallery_state, gallery, **private)
        stop_btn.click(cb.cancel, None, None, cancels=[gen_event, cmp_event], **private)
        dice.click(cb.random_seed, None, seed, **private)
        preset.input(cb.apply_preset, preset, [width, height], **private)
        weights_in.change(cb.weights_selected, [weights_in, window, down], [window, down], **private)
        upload.upload(lambda path: path, upload, weights_in, **private)
        demo.unload(cb.end_session)
    return demo


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Start the server with its queue and print its address; ``block=False`` returns at once (tests)."""
    demo.queue(max_size=64)
    return demo.launch(
        server_name=host, server_port=port, share=share, theme=_theme(), prevent_thread_lock=not block, quiet=quiet
    )
