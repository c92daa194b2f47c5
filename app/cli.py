"""The ``clear-dit`` command line (also ``python -m app.cli``).

Each subcommand is one small function registered in :data:`SUBCOMMANDS` with the function that declares its
arguments. User errors (bad arguments, a missing model or weights file, an unreachable hub) end the program
with exit code 1 or 2 and one line ``error: ...`` on stderr, never a traceback (``-v`` adds the details).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import is_out_of_memory
from app.inputs import SEED_LIMIT, attention_saving, blank, not_utf8
from pipelines.stages import FLOAT32_MAX, MAX_SIDE

logger = logging.getLogger("clear_dit.cli")

PROG = "clear-dit"
LATENT_PATCH = 16  # pixels per FLUX image token: VAE factor 8 x 2x2 packing

#: Defaults that depend on the model: the tiny one runs in seconds on a CPU, real FLUX.1 uses its own.
TINY_DEFAULTS = {"height": 256, "width": 256, "steps": 4}
FLUX_DEFAULTS = {"height": 1024, "width": 1024, "steps": 28}


class CLIError(Exception):
    """A mistake in the command line: reported as ``error: <message>``, exit code 2."""


def _finite(text: str) -> float:
    """argparse type of every float option: ``nan`` and ``inf`` parse as floats but pass no range check, and the
    values become float32 tensors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if abs(value) > FLOAT32_MAX:  # options become float32 tensors, where such a value overflows
        raise argparse.ArgumentTypeError(f"expected a number within float32's range (at most 3.4e38), got {text!r}")
    return value


def seed_arg(text: str) -> int:
    """argparse type of ``--seed`` (here and in the benchmarks): a whole number in ``[0, SEED_LIMIT)``."""
    try:
        value = int(text)
    except ValueError:
        if text.strip().lstrip("+-").isdigit():  # digits past int()'s limit of 4300
            raise argparse.ArgumentTypeError(f"must be 0 to {SEED_LIMIT - 1}, got {len(text.strip())} digits") from None
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 0 to {SEED_LIMIT - 1}, got {value}")
    return value


def _text(text: str) -> str:
    """argparse type of negative prompts (:func:`app.inputs.not_utf8`)."""
    if reason := not_utf8(text):
        raise argparse.ArgumentTypeError(reason)
    return text


def _prompt(text: str) -> str:
    """argparse type of prompts: :func:`_text`, not :func:`app.inputs.blank`."""
    if reason := blank(text):
        raise argparse.ArgumentTypeError(reason)
    return _text(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> exit code`` as the subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


# --------------------------------------------------------------------------------------------------- generate


def _true_cfg_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--true-cfg",
        type=_finite,
        default=1.0,
        help="true classifier-free guidance scale against --negative-prompt, two transformer passes per step "
        "(default: 1, off; for teachers without a guidance embedding)",
    )
    p.add_argument("--negative-prompt", type=_text, default="", help="negative prompt of --true-cfg (default: empty)")


def _check_true_cfg(args: argparse.Namespace) -> dict:
    """``true_cfg_scale``/``negative_prompt`` pipeline arguments of ``--true-cfg`` (empty when it is off)."""
    if args.true_cfg < 1:
        raise CLIError(f"--true-cfg must be >= 1 (1: off), got {args.true_cfg}")
    if args.true_cfg == 1:
        if args.negative_prompt:
            raise CLIError("--negative-prompt needs --true-cfg above 1")
        return {}
    return {"true_cfg_scale": args.true_cfg, "negative_prompt": args.negative_prompt}


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=_prompt, required=True, help="text prompt")
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (built-in offline test model, default), a local pipeline folder, or a hub id "
        "such as black-forest-labs/FLUX.1-dev",
    )
    p.add_argument("--height", type=int, help="image height in px, a multiple of 16 (default: 256 tiny, 1024 else)")
    p.add_argument("--width", type=int, help="image width in px, a multiple of 16 (default: 256 tiny, 1024 else)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4 tiny, 28 else)")
    p.add_argument("--guidance", type=_finite, default=3.5, help="guidance scale (default: 3.5)")
    _true_cfg_arguments(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed (default: 0)")
    p.add_argument("--window", type=int, help="CLEAR window radius in tokens (e.g. 8, 16, 32); default: full attention")
    p.add_argument(
        "--down", type=int, help="CLEAR down factor d: adds (h/d)*(w/d) pooled keys (needs --window or --weights)"
    )
    p.add_argument("--weights", help="CLEAR weights (.safetensors file or hub 'repo_id/file'); they define CLEAR")
    p.add_argument("--backend", default="auto", help="CLEAR attention backend (default: auto)")
    p.add_argument("--compare", action="store_true", help="run full attention and CLEAR; write them side by side")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="patch-parallel CLEAR over the ranks of 'torchrun --nproc_per_node N -m app.cli' or 'accelerate launch': "
        "one band of image rows per rank (NCCL on GPUs, gloo on CPUs)",
    )
    p.add_argument("--out", default="clear-dit.png", help="output PNG (default: clear-dit.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _validate_generate(args: argparse.Namespace) -> None:
    defaults = TINY_DEFAULTS if args.model == "tiny" else FLUX_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    clear = args.window is not None or args.weights is not None
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.window is not None and args.window < 1:
        raise CLIError(f"--window must be at least 1 (a radius in tokens), got {args.window}")
    if args.down is not None:
        if args.down < 1:
            raise CLIError(f"--down must be at least 1, got {args.down}")
        if not clear:
            raise CLIError("--down needs --window or --weights: it sets the pooled tokens of CLEAR attention")
    multiple = LATENT_PATCH * (args.down or 1)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < multiple or value % multiple:
            why = f"{LATENT_PATCH} x --down {args.down}" if (args.down or 1) > 1 else "one image token is 16 px"
            raise CLIError(f"--{name} must be a positive multiple of {multiple} ({why}), got {value}")
        if value > MAX_SIDE:
            raise CLIError(f"--{name} must be at most {MAX_SIDE} px, got {value}")
    if args.guidance < 0:
        raise CLIError(f"--guidance must be >= 0, got {args.guidance}")
    args.cfg = _check_true_cfg(args)
    if args.compare and not clear:
        raise CLIError("--compare needs --window or --weights (full attention is compared with CLEAR)")
    if args.backend != "auto" and not clear:
        raise CLIError("--backend applies to CLEAR attention: pass --window or --weights")
    if args.parallel:
        if not clear or args.compare:
            raise CLIError("--parallel runs CLEAR attention: pass --window or --weights, without --compare")
        if args.cfg:
            raise CLIError("--true-cfg is not supported with --parallel yet")
        from app.launch import WORKING_COMMANDS, alone_under_cpu_launch
        from pipelines.parallel import LAUNCH_VARIABLES

        launched = all(name in os.environ for name in LAUNCH_VARIABLES)
        if not launched and not alone_under_cpu_launch(os.environ):  # that one relaunches itself as N processes
            raise CLIError(f"--parallel needs a distributed launch of its processes: {WORKING_COMMANDS}")
    _check_weights_path(args.weights)
    from pipelines.loading import model_source

    model_source(args.model)  # a missing folder fails here, before the slow imports
    _check_png_out(args.out, args.overwrite)
    down = args.down
    if args.weights is not None and Path(args.weights).expanduser().is_file() and args.down is None:
        from clear_dit.weights import read_weights_config

        try:
            _, down = read_weights_config(args.weights)
        except ValueError as err:
            raise CLIError(str(err)) from None
        multiple = LATENT_PATCH * (down or 1)  # the file's down factor: sizes must fit it, before the model loads
        for name in ("height", "width"):
            if getattr(args, name) % multiple:
                raise CLIError(
                    f"--{name} must be a multiple of {multiple} ({LATENT_PATCH} x the down factor {down} of "
                    f"{args.weights}), got {getattr(args, name)}"
                )
    # every rank loads the model first (minutes for FLUX): a split that cannot be made fails now, once in the lone
    # process of `accelerate launch --cpu` (before it relaunches itself as N)
    if args.parallel:
        from app.launch import launched_world_size
        from pipelines.parallel import split_rows

        try:
            world_size = launched_world_size(os.environ)
            if world_size is not None:
                split_rows(args.height // LATENT_PATCH, world_size, down or 1)
        except ValueError as err:
            raise CLIError(f"--parallel: {err}") from None


def _check_png_out(out: str, overwrite: bool) -> Path:
    """``--out`` as a path: a .png file that may be written (a folder, or a file where a folder should be, is an
    error now, not after the generation)."""
    from clear_dit.files import check_writable

    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {out}")
    try:
        check_writable(out)
    except ValueError as err:
        raise CLIError(f"--out {err}") from None
    if path.exists() and not overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    return path


def _save_png(image, path: Path, settings: dict) -> None:
    """Write ``image`` as a temporary file renamed into place: an interrupted save leaves ``path`` as it was."""
    from clear_dit.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(settings))


def _check_weights_path(weights: str | None) -> None:
    if weights is not None:
        # A relative 'owner/repo/file' that is not on disk may be a hub path: the library resolves those.
        maybe_hub = weights.count("/") >= 2 and not weights.startswith((".", "/", "~"))
        if not Path(weights).expanduser().exists() and not maybe_hub:
            raise CLIError(f"weights file not found: {weights}")


def _check_backend(args: argparse.Namespace, device, dtype) -> None:
    import clear_dit

    if args.backend == "auto":
        return
    available = clear_dit.available_backends(device, dtype)
    if args.backend not in available:
        raise CLIError(
            f"unknown or unavailable backend {args.backend!r} on {device} with {dtype}; "
            f"choose one of: auto, {', '.join(available)}"
        )


def _enable_clear(pipe, args: argparse.Namespace) -> tuple[int | None, int]:
    """Install CLEAR on ``pipe``; returns the ``(window, down)`` in effect."""
    import clear_dit

    if args.weights is not None:
        kwargs = {"backend": args.backend} if args.backend != "auto" else {}
        handle = clear_dit.load_weights(pipe, args.weights, window_size=args.window, down_factor=args.down, **kwargs)
    else:
        handle = clear_dit.patch(pipe, window_size=args.window, down_factor=args.down or 1, backend=args.backend)
    window = getattr(handle, "window_size", None) or args.window
    down = getattr(handle, "down_factor", None) or args.down or 1
    return window, down


def _quiet_libraries(verbose: bool) -> None:
    """Silence diffusers'/transformers' warnings (hub retries, optional packages) unless ``-v``: they bury results."""
    if verbose:
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its download retries: 5 warnings (twice, through the root handler)


def _clear_label(window: int | None, down: int) -> str:
    return "CLEAR" + (f" r={window}" if window else "") + (f" d={down}" if down > 1 else "")


def _generate_once(pipe, args: argparse.Namespace, max_sequence_length: int, label: str, steps: int):
    import torch

    pipe.set_progress_bar_config(desc=label, leave=False)
    device = pipe._execution_device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    image = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        max_sequence_length=max_sequence_length,
        **args.cfg,
    ).images[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return image, time.perf_counter() - start


def _timed(pipe, args, max_sequence_length: int, label: str, warmup: bool):
    if warmup:  # one-off costs (allocations, compilation) out of the timing
        _generate_once(pipe, args, max_sequence_length, f"{label} (warm-up)", 1)
    return _generate_once(pipe, args, max_sequence_length, label, args.steps)


def _png_info(settings: dict):
    from PIL.PngImagePlugin import PngInfo

    import clear_dit

    info = PngInfo()
    info.add_text("Software", f"clear-dit {clear_dit.__version__}")
    for key, value in settings.items():
        if value is not None:
            info.add_itxt(key, str(value))
    info.add_itxt("clear-dit", json.dumps(settings))
    return info


def _density_line(args, window: int, down: int, max_sequence_length: int, scale: int) -> str:
    import clear_dit

    grid = (args.height // scale, args.width // scale)
    density = clear_dit.attention_density(grid, max_sequence_length, window, down)
    tokens = f"{grid[0]}x{grid[1]} image + {max_sequence_length} text tokens"
    head = f"attention density: {density:.1%} of full attention ({tokens})"
    return f"{head} -> {attention_saving(density)}"


def _device_and_dtype(device=None):
    """The device to run on (``device``, else CUDA when present) and its dtype: bf16 on CUDA, fp32 on CPU."""
    import torch

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


@subcommand("generate", "generate an image with full or CLEAR attention", _generate_arguments)
def cmd_generate(args: argparse.Namespace) -> int:
    _validate_generate(args)
    clear = args.window is not None or args.weights is not None

    parallel_device = None
    if args.parallel:
        from app.launch import relaunch_lost_cpu_processes
        from pipelines.parallel import init_parallel

        code = relaunch_lost_cpu_processes(args._argv)
        if code is not None:  # the N processes of `accelerate launch --cpu --num_processes N` ran (see app/launch.py)
            return code

        parallel_device = init_parallel()
    device, dtype = _device_and_dtype(parallel_device)
    if clear:
        _check_backend(args, device, dtype)

    _quiet_libraries(args.verbose)
    from pipelines.loading import default_max_sequence_length, load_pipeline

    pipe = load_pipeline(args.model, torch_dtype=dtype).to(device)
    max_sequence_length = default_max_sequence_length(pipe)
    scale = pipe.vae_scale_factor * 2

    settings = {
        "prompt": args.prompt,
        "model": args.model,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance": args.guidance,
        **args.cfg,
        "seed": args.seed,
        "max_sequence_length": max_sequence_length,
    }
    lines = []
    if args.compare:
        if args.weights is not None:  # weights the model cannot load fail the CLEAR half: before the full half
            from clear_dit.weights import check_weights, read_weights

            check_weights(pipe, read_weights(args.weights, args.window, args.down, tensors=False))
        full, full_s = _timed(pipe, args, max_sequence_length, "full attention", warmup=True)
        window, down = _enable_clear(pipe, args)
        label = _clear_label(window, down)
        clear_image, clear_s = _timed(pipe, args, max_sequence_length, label, warmup=True)
        image = _side_by_side(full, clear_image)
        settings["attention"] = f"left: full attention, right: {label}"
        lines += [
            f"full attention: {full_s:.2f} s",
            f"{label} (backend {args.backend}): {clear_s:.2f} s",
            f"speedup: {full_s / clear_s:.2f}x (wall time, after a 1-step warm-up of each)",
        ]
    elif clear:
        window, down = _enable_clear(pipe, args)
        label = _clear_label(window, down)
        if args.parallel:
            image, seconds, report = _generate_parallel(pipe, args, max_sequence_length, label)
            if image is None:  # ranks > 0: rank 0 writes the image and the report
                return 0
            settings["parallel"] = report
        else:
            image, seconds = _timed(pipe, args, max_sequence_length, label, warmup=False)
        settings["attention"] = label
        lines.append(f"{label} (backend {args.backend}): {seconds:.2f} s")
        if args.parallel:
            lines.append(report)
    else:
        image, seconds = _timed(pipe, args, max_sequence_length, "full attention", warmup=False)
        settings["attention"] = "full"
        lines.append(f"full attention: {seconds:.2f} s")
    if clear:
        settings.update(window=window, down=down, weights=args.weights, backend=args.backend)
        if window is not None:
            lines.append(_density_line(args, window, down, max_sequence_length, scale))

    out = Path(args.out).expanduser()
    _save_png(image, out, settings)
    lines.append(f"wrote {out} ({image.width}x{image.height})")
    print("\n".join(lines))
    return 0


def _generate_parallel(pipe, args: argparse.Namespace, max_sequence_length: int, label: str):
    """``generate --parallel`` on this rank: ``(image or None on ranks > 0, seconds, communication report)``."""
    import torch
    import torch.distributed as dist

    from pipelines.parallel import run_parallel_pipeline, traffic_report

    rank = dist.get_rank()
    pipe.set_progress_bar_config(desc=label, leave=False, disable=rank != 0)
    start = time.perf_counter()
    result = run_parallel_pipeline(
        pipe,
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        max_sequence_length=max_sequence_length,
    )
    seconds = time.perf_counter() - start
    report = traffic_report(result.traffic_per_step, dist.get_backend())
    dist.barrier()
    dist.destroy_process_group()
    return (result.images[0] if rank == 0 else None), seconds, report


def _side_by_side(left, right):
    from PIL import Image

    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


# ---------------------------------------------------------------------------------------------------- highres


def _highres_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=_prompt, required=True, help="text prompt")
    p.add_argument("--model", default="tiny", help="'tiny' (default), a local pipeline folder, or a hub id")
    p.add_argument(
        "--stages",
        required=True,
        help="WIDTHxHEIGHT per stage, increasing, at least two (a base image and its upscales), e.g. "
        "1024x1024,2048x2048",
    )
    p.add_argument("--strength", type=_finite, default=0.7, help="SDEdit strength of the upscale stages (default: 0.7)")
    p.add_argument("--ntk", type=_finite, default=10.0, help="RoPE theta factor of the upscale stages (default: 10)")
    p.add_argument(
        "--time-shift", type=_finite, default=3.0, help="upscale stages' fixed time shift, in [1e-6, 1e6] (default: 3)"
    )
    p.add_argument("--window", type=int, help="CLEAR radius of the upscale stages (default: 16, or the weights file's)")
    p.add_argument("--down", type=int, help="CLEAR down factor d: pooled keys; stage sizes must be multiples of 16*d")
    p.add_argument("--weights", help="CLEAR weights (.safetensors file or hub 'repo_id/file') for the upscale stages")
    p.add_argument("--backend", default="auto", help="CLEAR attention backend (default: auto)")
    p.add_argument("--steps", type=int, help="denoising steps per stage (default: 4 tiny, 28 else)")
    p.add_argument("--guidance", type=_finite, default=3.5, help="guidance scale (default: 3.5)")
    _true_cfg_arguments(p)
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed; stage i uses seed + i (default: 0)")
    p.add_argument("--save-stages", action="store_true", help="also write every earlier stage as OUT-stage{i}.png")
    p.add_argument("--out", default="clear-dit-highres.png", help="output PNG (default: clear-dit-highres.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _validate_highres(args: argparse.Namespace) -> list[Path]:
    """Check the arguments before any model loads; returns the output paths (earlier stages first)."""
    from pipelines.stages import check_highres_inputs, parse_stages

    if args.steps is None:
        args.steps = (TINY_DEFAULTS if args.model == "tiny" else FLUX_DEFAULTS)["steps"]
    for name, low in (("steps", 1), ("window", 1), ("down", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise CLIError(f"--{name} must be at least {low}, got {value}")
    if args.guidance < 0:
        raise CLIError(f"--guidance must be >= 0, got {args.guidance}")
    _check_weights_path(args.weights)
    args.cfg = _check_true_cfg(args)
    try:
        args.stages = parse_stages(args.stages)
        if len(args.stages) == 1:  # no upscale stage: CLEAR, --strength and --ntk would be recorded but unused
            raise CLIError(
                f"--stages {args.stages[0][0]}x{args.stages[0][1]} has no upscale stage: give two or more "
                "sizes (for one image: clear-dit generate)"
            )
        strengths = [args.strength] * (len(args.stages) - 1)
        check_highres_inputs(
            args.stages, strengths, ntk_factor=args.ntk, down_factor=args.down or 1, time_shift=args.time_shift
        )
    except ValueError as err:
        message = str(err).replace(" (None: the scheduler's dynamic shift)", "")  # the CLI cannot pass None
        raise CLIError(message.replace("ntk_factor", "--ntk").replace("time_shift", "--time-shift")) from None
    from pipelines.loading import model_source

    model_source(args.model)  # a missing folder fails here, before the slow imports
    out = _check_png_out(args.out, args.overwrite)
    outs = [out.with_name(f"{out.stem}-stage{i}.png") for i in range(len(args.stages) - 1)] if args.save_stages else []
    for path in outs:
        _check_png_out(str(path), args.overwrite)
    return [*outs, out]


@subcommand("highres", "generate a high-resolution image by progressive upscaling with CLEAR", _highres_arguments)
def cmd_highres(args: argparse.Namespace) -> int:
    outs = _validate_highres(args)
    device, dtype = _device_and_dtype()
    _check_backend(args, device, dtype)
    _quiet_libraries(args.verbose)
    from pipelines.highres import HighResFluxPipeline, resolve_clear_settings
    from pipelines.loading import load_pipeline

    try:  # reads the weights file's header: an unreadable one is bad input, as in generate
        window, down, weights = resolve_clear_settings(args.window, args.down, args.weights, args.backend)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if down != (args.down or 1):  # the weights file's down factor: the sizes must fit it, before the model loads
        from pipelines.stages import check_highres_inputs

        try:
            check_highres_inputs(args.stages, [args.strength] * (len(args.stages) - 1), down_factor=down)
        except ValueError as err:
            raise CLIError(f"{err} (the down factor of {args.weights})") from None
    pipe = HighResFluxPipeline.from_pipe(load_pipeline(args.model, torch_dtype=dtype).to(device))
    start = time.perf_counter()
    result = pipe(
        args.prompt,
        stages=args.stages,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        window_size=window,
        down_factor=down,
        clear_weights=weights,
        backend=args.backend,
        ntk_factor=args.ntk,
        time_shift=args.time_shift,
        **args.cfg,
    )
    seconds = time.perf_counter() - start
    settings = {
        "prompt": args.prompt,
        "model": args.model,
        "stages": ",".join(f"{w}x{h}" for w, h in args.stages),
        "strength": args.strength,
        "ntk": args.ntk,
        "time_shift": args.time_shift,
        "steps": args.steps,
        "guidance": args.guidance,
        **args.cfg,
        "seed": args.seed,
        "window": window,
        "down": down,
        "weights": args.weights,
        "backend": args.backend,
    }
    images = [stage[0] for stage in result.stage_images][-len(outs) :]
    lines = [f"{len(args.stages)} stage{'s' * (len(args.stages) > 1)} in {seconds:.2f} s"]
    for path, image in zip(outs, images, strict=True):
        _save_png(image, path, settings)
        lines.append(f"wrote {path} ({image.width}x{image.height})")
    print("\n".join(lines))
    return 0


# -------------------------------------------------------------------------------------------------- make-data


def _make_data_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="text file, one prompt per line: the teacher generates an image per prompt")
    source.add_argument("--images", help="folder of images with captions (name.txt or name.json beside name.png)")
    p.add_argument("--model", default="tiny", help="teacher: 'tiny' (default), a local pipeline folder, or a hub id")
    p.add_argument("--out", required=True, help="data folder (re-running resumes it)")
    p.add_argument(
        "--resolution", type=int, help="square image size in px, multiple of 16 (default: 256 tiny, 1024 else)"
    )
    p.add_argument("--num", type=int, help="number of images to generate, prompts cycled (default: one per prompt)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 4 tiny, 28 else)")
    p.add_argument("--guidance", type=_finite, help="guidance scale (default: 3.5)")
    _true_cfg_arguments(p)
    p.add_argument("--seed", type=seed_arg, help="image i uses seed SEED + i (default: 0)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (default: 1)")
    p.add_argument(
        "--max-sequence-length",
        type=int,
        help="T5 tokens (default: the tokenizer's limit, at most 512; 256 for FLUX.1-schnell)",
    )
    p.add_argument("--overwrite", action="store_true", help="discard all data in --out and start over")


def _given(**values) -> dict:
    """The options given on the command line, for a library call whose own defaults serve the others."""
    return {k: v for k, v in values.items() if v is not None}


@subcommand(
    "make-data", "generate (or import) distillation data: images, VAE latents, text embeddings", _make_data_arguments
)
def cmd_make_data(args: argparse.Namespace) -> int:
    defaults = TINY_DEFAULTS if args.model == "tiny" else FLUX_DEFAULTS
    cfg = _check_true_cfg(args)
    generation = {"--num": args.num, "--steps": args.steps, "--guidance": args.guidance, "--seed": args.seed}
    given = [flag for flag, value in generation.items() if value is not None] + (["--true-cfg"] if cfg else [])
    if args.images and given:
        raise CLIError(f"{', '.join(given)} applies to generated data (--prompts), not to --images")
    resolution = defaults["height"] if args.resolution is None else args.resolution  # 0 is an error, not the default
    steps = defaults["steps"] if args.steps is None else args.steps
    for flag, value in (("--steps", steps), ("--num", args.num), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be at least 1, got {value}")
    if resolution < LATENT_PATCH or resolution % LATENT_PATCH or resolution > MAX_SIDE:
        raise CLIError(
            f"--resolution must be a positive multiple of {LATENT_PATCH} px, at most {MAX_SIDE}, got {resolution}"
        )
    from pipelines.loading import FLUX_MAX_SEQUENCE_LENGTH as LIMIT

    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= LIMIT:
        raise CLIError(f"--max-sequence-length must be 1 to {LIMIT} (FLUX's T5 limit), got {args.max_sequence_length}")
    if args.guidance is not None and args.guidance < 0:
        raise CLIError(f"--guidance must be >= 0, got {args.guidance}")
    from clear_dit.files import nearest_existing

    out = Path(args.out).expanduser()
    try:
        nearest = nearest_existing(out)
    except ValueError as err:
        raise CLIError(f"--out {err}") from None
    if nearest == out and not out.is_dir():
        raise CLIError(f"--out {args.out} is a file, not a data folder")
    if not nearest.is_dir():
        raise CLIError(f"--out {args.out}: {nearest} is a file, not a folder")
    if args.images:
        images = Path(args.images).expanduser().resolve()
        if images.exists() and not images.is_dir():
            raise CLIError(f"--images {args.images} is a file; name the folder of images and captions")
        if out.resolve() == images or out.resolve() in images.parents:
            raise CLIError(f"--out {args.out} holds --images {args.images}: choose a data folder outside it")
    _quiet_libraries(args.verbose)
    from pipelines.loading import load_pipeline
    from training.data import DistillDataset, generate_dataset, import_images, read_prompts

    prompts = read_prompts(Path(args.prompts).expanduser()) if args.prompts else None
    device, dtype = _device_and_dtype()
    pipe = load_pipeline(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    common = dict(
        resolution=resolution,
        batch_size=args.batch_size,
        max_sequence_length=args.max_sequence_length,
        model_name=args.model,
        overwrite=args.overwrite,
    )
    if prompts is not None:
        out = generate_dataset(
            pipe, prompts, out, num=args.num, steps=steps, **_given(guidance=args.guidance, seed=args.seed),
            **common, **cfg,
        )  # fmt: skip
    else:
        out = import_images(pipe, Path(args.images).expanduser(), out, **common)
    print(f"{out}: {len(DistillDataset(out))} items at {resolution}x{resolution} (info.json, manifest.jsonl)")
    return 0


# ---------------------------------------------------------------------------------------------------- distill


def _layers(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers:  # an empty list would switch L_attn off while --attn-weight says otherwise
        raise argparse.ArgumentTypeError(
            f"expected 'all' or comma-separated layer indices, got {text!r} (no L_attn: --attn-weight 0)"
        )
    return layers


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    # Choices are checked by DistillConfig.check (its errors list them): building the parser stays import-free.
    p.add_argument("--model", default="tiny", help="teacher: 'tiny' (default), a local pipeline folder, or a hub id")
    p.add_argument("--data", required=True, help="data folder written by `clear-dit make-data`")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, validation images, the export")
    p.add_argument("--window", type=int, required=True, help="CLEAR radius in tokens (e.g. 8, 16, 32)")
    p.add_argument("--down", type=int, default=1, help="CLEAR down factor d: pooled keys/values (default: 1, none)")
    p.add_argument("--backend", default="auto", help="CLEAR attention backend (default: auto)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per process per micro-step (default: 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=_finite, help="learning rate (default: 1e-4 with adamw, 1.0 with prodigy)")
    p.add_argument("--optimizer", default="adamw", help="adamw (default) or prodigy (pip install prodigyopt)")
    p.add_argument("--weight-decay", type=_finite, default=1e-4, help="default: 1e-4")
    p.add_argument("--lr-scheduler", default="constant", help="diffusers.optimization schedule (default: constant)")
    p.add_argument(
        "--lr-warmup-steps", type=int, default=0, help="default: 0 (not with --lr-scheduler constant: it has none)"
    )
    p.add_argument("--max-grad-norm", type=_finite, default=1.0, help="gradient clipping (default: 1.0)")
    p.add_argument(
        "--lora-rank",
        type=int,
        help="train a LoRA of this rank on the projections instead of them (exported merged, in float32)",
    )
    p.add_argument("--mixed-precision", default="no", help="no (default), bf16 or fp16")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--fm-weight",
        type=_finite,
        default=1.0,
        help="weight of L_fm, the flow-matching loss (default: 1, the paper's, for a trained teacher). 0 distils the "
        "teacher alone: use it for a teacher whose samples do not follow its own flow, e.g. the random tiny one "
        "(logs/validation.jsonl: its val_fm_teacher above the student's val_fm_student)",
    )
    p.add_argument("--out-weight", type=_finite, default=0.5, help="weight a of L_out (default: 0.5)")
    p.add_argument("--attn-weight", type=_finite, default=0.5, help="weight b of L_attn (default: 0.5)")
    p.add_argument(
        "--attn-layers", type=_layers, default=None, help="layers aligned by L_attn: 'all' or '0,1,5' (default: all)"
    )
    p.add_argument(
        "--weighting-scheme", default="none", help="none, sigma_sqrt, logit_normal, mode or cosmap (default: none)"
    )
    p.add_argument("--logit-mean", type=_finite, default=0.0, help="logit_normal mean (default: 0)")
    p.add_argument("--logit-std", type=_finite, default=1.0, help="logit_normal std (default: 1)")
    p.add_argument("--mode-scale", type=_finite, default=1.29, help="'mode' scheme scale, -1 to 1.75 (default: 1.29)")
    p.add_argument(
        "--guidance", type=_finite, default=3.5, help="guidance embedding of guidance-distilled teachers (default: 3.5)"
    )
    p.add_argument(
        "--caption-dropout",
        type=_finite,
        default=0.0,
        help="fraction of samples trained with the data's negative (empty) caption: distils the unconditional "
        "branch of true CFG too (default: 0)",
    )
    p.add_argument("--teacher", default="shared", help="shared: one model (default); copy: two models (official)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints, 0: none (500)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept (default: 3)")
    p.add_argument("--validate-every", type=int, default=500, help="steps between validations (default: 500)")
    p.add_argument(
        "--num-validation",
        type=int,
        help="held-out data items for validation, 0: none (default: 4, a quarter of a smaller data set)",
    )
    p.add_argument(
        "--no-validation-images", dest="validation_images", action="store_false", help="log the gap only, no grid"
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="default: 0")
    p.add_argument(
        "--resume", help="'latest' or a checkpoint folder: continue a run in --out ('latest' without one: a new run)"
    )
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")


@subcommand(
    "distill",
    "distill a CLEAR student from a FLUX teacher; N processes (DDP): accelerate launch --multi_gpu --num_processes N "
    "-m app.cli distill ... on GPUs, accelerate launch --cpu --num_processes N -m app.cli distill ... on CPUs",
    _distill_arguments,
)
def cmd_distill(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from app.launch import relaunch_lost_cpu_processes
    from training.distill import DistillConfig, check_run, train

    config = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    plan = check_run(config)  # bad settings, data or --out fail here once, not in each of N processes
    code = relaunch_lost_cpu_processes(args._argv)
    if code is not None:  # the N processes of `accelerate launch --cpu --num_processes N` ran (see app/launch.py)
        return code
    _quiet_libraries(args.verbose)
    from accelerate import PartialState

    path = train(config, plan)
    if PartialState().is_main_process:
        print(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------------------- app


def _app_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (default), a local pipeline folder, or a hub id")
    p.add_argument("--weights", help="CLEAR weights offered first in the UI (.safetensors file or hub 'repo_id/file')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")


@subcommand("app", "start the web UI: generate and compare full vs CLEAR attention in the browser", _app_arguments)
def cmd_app(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1 to 65535, got {args.port}")
    try:  # else the server reports it as 'cannot find empty port'
        family, kind, _, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as err:
        raise CLIError(f"--host {args.host} is not an address or a resolvable host name: {err}") from None
    with socket.socket(family, kind) as probe:  # before the model loads; gradio's own error names launch()'s args
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as err:
            raise CLIError(
                f"--port {args.port} on {args.host} is not free ({err.strerror}): choose another --port"
            ) from None
    _check_weights_path(args.weights)
    if args.weights is not None and Path(args.weights).expanduser().is_file():
        from clear_dit.weights import read_weights_config

        try:  # the header only: a broken file fails here, not at the first click in the UI
            read_weights_config(args.weights)
        except ValueError as err:
            raise CLIError(str(err)) from None
    from pipelines.loading import model_source

    model_source(args.model)  # a missing folder fails here, before the slow imports
    _quiet_libraries(args.verbose)
    try:
        from app.web import GenerationEngine, build_demo, launch
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise CLIError("the web UI needs gradio: pip install 'clear-dit[app]'") from None
    engine = GenerationEngine.load(args.model, args.weights)
    # A service manager stops the server with SIGTERM: shut down as on Ctrl-C, so that the temp folder goes too. A
    # flag, not an exception: one raised while a finalizer runs (as during the server's start) is dropped; Ctrl-C's
    # KeyboardInterrupt the same way. Restored after: main() may run inside a longer-lived process (a notebook, a
    # test), whose SIGTERM must not stay a no-op. Set before the first line, which tells a supervisor it started.
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"images go to {engine.output_dir} (each browser session's until it ends, all until the server stops)",
            flush=True,
        )
        demo = build_demo(engine=engine)
        launch(demo, host=args.host, port=args.port, share=args.share, block=False)
        try:
            while not stop.wait(0.5):
                pass
        finally:
            demo.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# ------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CLEAR: linear-time local attention for FLUX diffusion transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details and show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for command in SUBCOMMANDS.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _parser=sub)
    return parser


def _error_line(message: str) -> None:
    """``error: MESSAGE`` in one write: print() writes the newline apart, and lines of several ranks ran together."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # -v after the command too: taken from what the command left, as exact tokens (an option on the command's
    # parser would read a prompt such as "-vivid sunset" as -v, and make --v ambiguous)
    if "-v" in unknown or "--verbose" in unknown:
        args.verbose = True
        unknown = [token for token in unknown if token not in ("-v", "--verbose")]
    if unknown:  # after the command: its parser's error, which names its --help, not the top-level one
        after = argv.index(unknown[0]) >= argv.index(args.command)  # >=: the command's name given twice
        (args._parser if after else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args._argv = argv  # a command that relaunches itself (distill under `accelerate launch --cpu`) passes it on
    try:
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return args._run(args)
    except CLIError as err:
        _error_line(str(err))
        return 2
    except (ValueError, FileNotFoundError, OSError) as err:  # the library's messages for user errors
        if args.verbose:
            logger.exception("details")
        _error_line(_one_line(err))
        return 1
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        if args.verbose:
            logger.exception("details")
        _error_line(f"out of memory ({_one_line(err)[:200]}): try a smaller size or fewer steps")
        return 1
    except KeyboardInterrupt:
        _error_line("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
