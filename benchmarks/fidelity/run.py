"""The fidelity protocol: how close do CLEAR students stay to their teacher, distilled or not, at 1x/2x/4x?

    python -m benchmarks.fidelity.run --teacher TEACHER_DIR --work WORK_DIR          # the full protocol
    python -m benchmarks.fidelity.run --work WORK_DIR --smoke --results OUT_DIR      # end to end on toy sizes

Steps (each one skipped when its output is already in ``WORK_DIR``, so an interrupted run resumes; a student
there made with other settings is refused, not reused):

1. ``clear-dit make-data``: the teacher (``benchmarks.fidelity.train_teacher``) draws its own distillation
   set from fresh world captions at its training resolution.
2. ``clear-dit distill``: one CLEAR student per variant. Radii keep FLUX's ratio of radius to token grid
   (r = 8 / 16 / 32 on FLUX's 64 x 64 grid at 1024 px, so r = 2 / 4 / 8 on a 256 px teacher's 16 x 16
   grid), and the published down-factor-4 variants (r = 16 and 8 with d = 4). 3000 steps of batch 4 at a
   peak learning rate of 5e-4 on a cosine schedule: on teacher 9d this brought r16 from 23.8 dB / SSIM 0.912
   (1000 steps at the trainer's default constant 1e-4) to 25.2 dB / 0.931 (benchmarks/fidelity/README.md).
3. Evaluation on held-out world scenes with fixed seeds, for the teacher, each training-free student (CLEAR
   on the teacher's own weights) and each distilled student: at the training resolution with the plain
   pipeline, and at 2x / 4x with ``pipelines.highres`` (teacher-drawn base image, SDEdit upscaling with
   CLEAR; the teacher's reference there is the same recipe with a window covering the whole grid, i.e. full
   attention). Metrics: PSNR and SSIM against the teacher, the scene checker's adherence, attention density,
   wall time per image.
4. ``RESULTS/fidelity.{json,md}`` and ``RESULTS/fidelity_grid.png`` (teacher | training-free | distilled);
   a ``RESULTS`` that holds them already (the default's are committed results) needs ``--overwrite``.

Teacher, data and students are all sampled with the same true classifier-free guidance (``--cfg-scale``, by
default the one the teacher was evaluated with: ``cfg_scale`` in its ``training/config.json``); with guidance,
students are distilled with caption dropout (their unconditional branch is sampled too) and without ``L_fm``
(guided samples do not follow the teacher's conditional flow).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

import clear_dit
from app.cli import seed_arg
from benchmarks.fidelity import train_teacher
from benchmarks.fidelity.checker import check_scene
from benchmarks.fidelity.common import generate, held_out_scenes, image_grid
from benchmarks.fidelity.metrics import psnr, ssim
from clear_dit.files import nearest_existing
from clear_dit.weights import is_clear_key
from pipelines.loading import default_max_sequence_length, load_pipeline
from training.data import DistillDataset
from training.world import sample_scenes

logger = logging.getLogger(__name__)

#: FLUX.1's token grid side at 1024 px, the reference of the published radii.
FLUX_GRID = 64
#: (FLUX radius, down factor) of the published CLEAR checkpoints.
PUBLISHED = ((8, 1), (16, 1), (32, 1), (16, 4), (8, 4))
#: Caption dropout of the distillation when sampling uses true CFG (the teacher's own, in training).
CAPTION_DROPOUT = 0.1
#: The students' learning-rate schedule (a diffusers.optimization name) and its warm-up steps.
DISTILL_SCHEDULE, DISTILL_WARMUP = "cosine", 100
#: The distillation prompts come from this seed offset: disjoint from teacher training and held-out scenes.
DATA_OFFSET = 2_000_000


@dataclasses.dataclass(frozen=True)
class Variant:
    """A CLEAR configuration: FLUX's radius it corresponds to, and the radius/down factor used here."""

    flux_radius: int
    down: int
    window: int

    @property
    def name(self) -> str:
        return f"r{self.flux_radius}" + (f"_down{self.down}" if self.down > 1 else "")


def variants_for(resolution: int, published: tuple[tuple[int, int], ...] = PUBLISHED) -> list[Variant]:
    """Scale FLUX's radii to the token grid of ``resolution`` (16 px per token), at least 1 token."""
    grid = resolution // 16
    out = []
    for flux_radius, down in published:
        if grid % down:
            raise ValueError(f"the {grid}x{grid} token grid of {resolution} px is not divisible by down factor {down}")
        out.append(Variant(flux_radius, down, max(1, round(grid * flux_radius / FLUX_GRID))))
    return out


@dataclasses.dataclass
class ProtocolConfig:
    work: str
    teacher: str | None = None
    results: str = "benchmarks/results"
    num_data: int = 512
    data_steps: int = 20
    distill_steps: int = 3000
    distill_batch_size: int = 4
    distill_lr: float = 5e-4  # peak of DISTILL_SCHEDULE after DISTILL_WARMUP steps (README: the recipe)
    eval_scenes: int = 32
    highres_scenes: int = 8
    eval_steps: int = 20
    cfg_scale: float | None = None  # None: the teacher's own (training/config.json), 1 without one
    scales: tuple[int, ...] = (1, 2, 4)
    variants: tuple[str, ...] = tuple(f"r{r}" + (f"_down{d}" if d > 1 else "") for r, d in PUBLISHED)
    highres_variants: tuple[str, ...] | None = None  # the variants evaluated at 2x/4x (None: all of them)
    grid_rows: int = 4
    seed: int = 0
    smoke: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """One-line ``ValueError`` for a count or step number below 1, before an hour of data and students."""
        counts = ("num_data", "data_steps", "distill_steps", "distill_batch_size", "eval_scenes", "eval_steps")
        counts += ("grid_rows",) + (("highres_scenes",) if any(s > 1 for s in self.scales) else ())
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.distill_lr) and self.distill_lr > 0):
            raise ValueError(f"--distill-lr must be positive and finite, got {self.distill_lr}")
        results = Path(self.results)
        try:
            nearest = nearest_existing(results)
        except ValueError as err:
            raise ValueError(f"--results {err}") from None
        if not nearest.is_dir():  # found only when the report is written, after every student and image
            raise ValueError(f"--results {self.results}: {nearest} is a file, not a folder")
        held = [p.name for p in report_paths(results, self.smoke) if p.exists()]
        if held and not self.overwrite:
            raise ValueError(f"--results {self.results} holds {', '.join(held)} already; pass --overwrite to replace")


def report_paths(results: Path, smoke: bool) -> list[Path]:
    """The report's files in ``results``: ``fidelity[_smoke].json``, ``.md`` and ``_grid.png``."""
    stem = "fidelity_smoke" if smoke else "fidelity"
    return [results / f"{stem}.json", results / f"{stem}.md", results / f"{stem}_grid.png"]


SMOKE = dict(
    num_data=4,
    data_steps=2,
    distill_steps=2,
    distill_batch_size=2,
    eval_scenes=2,
    highres_scenes=1,
    eval_steps=2,
    scales=(1, 2),
    variants=("r16", "r16_down4"),
    grid_rows=2,
)


def run_cli(*args: str) -> None:
    """Run ``clear-dit ARGS`` (as ``python -m app.cli``); a failure raises with the command's last output."""
    command = [sys.executable, "-m", "app.cli", *args]
    logger.info("running %s", " ".join(command[2:]))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"`clear-dit {' '.join(args[:1])}` failed ({result.returncode}): " + " | ".join(tail))


def make_data(cfg: ProtocolConfig, teacher: Path, resolution: int) -> Path:
    """The teacher's self-generated distillation set in ``WORK/data`` (``clear-dit make-data`` resumes it)."""
    work = Path(cfg.work)
    prompts = work / "prompts.txt"
    scenes = sample_scenes(cfg.num_data, cfg.seed + DATA_OFFSET)
    prompts.write_text("".join(s.caption + "\n" for s in scenes))
    data = work / "data"
    run_cli(
        "make-data",
        *("--model", str(teacher), "--prompts", str(prompts), "--out", str(data)),
        *("--resolution", str(resolution), "--num", str(cfg.num_data), "--steps", str(cfg.data_steps)),
        *("--seed", str(cfg.seed), "--true-cfg", str(cfg.cfg_scale), "--batch-size", "8"),
    )
    return data


def check_data_size(cfg: ProtocolConfig, data: Path) -> None:
    """FileExistsError unless ``data`` holds ``num_data`` items: make-data keeps an earlier, larger run's, and new
    students would train on all of them while the report states ``num_data``."""
    held = len(DistillDataset(data))
    if held != cfg.num_data:
        raise FileExistsError(
            f"{data} holds {held} items of an earlier run, not --num-data {cfg.num_data}; move it away or pass "
            f"--num-data {held}"
        )


def distill_settings(cfg: ProtocolConfig, teacher: Path, data: Path, variant: Variant) -> dict[str, object]:
    """The ``clear-dit distill`` settings of ``variant``'s student, by their ``DistillConfig`` names (the CLI's
    flags map one to one onto these, and its ``run.json`` records them)."""
    settings: dict[str, object] = {
        "model": str(teacher),
        "data": str(data),
        "window": variant.window,
        "down": variant.down,
        "max_steps": cfg.distill_steps,
        "batch_size": cfg.distill_batch_size,
        "lr": cfg.distill_lr,
        "lr_scheduler": DISTILL_SCHEDULE,
        "lr_warmup_steps": DISTILL_WARMUP,
        "seed": cfg.seed,
    }
    if cfg.cfg_scale > 1:
        # Sampled with true CFG, students need their unconditional branch distilled too; and the data follow
        # the guided flow, not the teacher's conditional one, so L_fm would pull the student off the teacher.
        settings |= {"caption_dropout": CAPTION_DROPOUT, "fm_weight": 0.0}
    return settings


def _check_student_run(run_dir: Path, settings: dict[str, object], num_data: int) -> None:
    """Refuse a student run in ``run_dir`` made with other settings than ``settings`` (its ``run.json``), or on a
    data set of other than ``num_data`` items (make-data grows the set in place): reused or resumed, it would be
    reported under the protocol's settings."""
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        if any(run_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{run_dir} holds CLEAR weights but no run.json: cannot tell how they were made")
        return
    record = json.loads(run_file.read_text())
    saved = record["config"]

    def same(name: str, value: object) -> bool:
        if name in ("model", "data"):  # the same folder however it was spelt
            return Path(str(saved.get(name))).resolve() == Path(str(value)).resolve()
        return saved.get(name) == value

    diffs = [
        f"{name} {saved.get(name)!r} (protocol: {value!r})" for name, value in settings.items() if not same(name, value)
    ]
    items = record.get("data", {}).get("items")  # absent in runs before it was recorded
    if items is not None and items != num_data:
        diffs.append(f"data items {items} (protocol: num_data {num_data})")
    if diffs:
        raise FileExistsError(
            f"{run_dir} holds a student distilled with other settings: {'; '.join(diffs)}; move it away or run the "
            "protocol with the settings it was made with"
        )


def distill(cfg: ProtocolConfig, teacher: Path, data: Path, variant: Variant) -> Path:
    """``clear-dit distill`` one student into ``WORK/runs/NAME``; returns its exported weights file.

    A student already there is reused (or its interrupted run resumed) only if it was made with the same settings.
    """
    run_dir = Path(cfg.work) / "runs" / variant.name
    exported = run_dir / (f"clear_local_{variant.window}" + (f"_down_{variant.down}" if variant.down > 1 else ""))
    exported = exported.with_suffix(".safetensors")
    settings = distill_settings(cfg, teacher, data, variant)
    _check_student_run(run_dir, settings, cfg.num_data)
    if exported.is_file():
        logger.info("%s: already distilled (%s)", variant.name, exported)
        return exported
    args = [arg for name, value in settings.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    args += ["--out", str(run_dir)]
    if (run_dir / "logs").exists():
        args += ["--resume", "latest"]
    run_cli("distill", *args)
    if not exported.is_file():
        raise FileNotFoundError(f"clear-dit distill did not write {exported}")
    return exported


@contextlib.contextmanager
def student(pipe, variant: Variant, weights: Path | None) -> Iterator[None]:
    """``pipe`` as a CLEAR student (training-free when ``weights`` is None); the teacher is restored on exit."""
    transformer = pipe.transformer
    saved = {k: v.clone() for k, v in transformer.state_dict().items() if is_clear_key(k)}
    if weights is None:
        handle = clear_dit.patch(pipe, window_size=variant.window, down_factor=variant.down)
    else:
        handle = clear_dit.load_weights(pipe, weights, window_size=variant.window, down_factor=variant.down)
    try:
        yield
    finally:
        handle.unpatch()
        transformer.load_state_dict(saved, strict=False)


def _draw(
    pipe,
    highres,
    cfg: ProtocolConfig,
    resolution: int,
    scale: int,
    scenes,
    variant: Variant | None,
    weights: Path | None,
) -> tuple[list[Image.Image], float]:
    """Images of ``scenes`` (seed i for scene i) and the wall time per image. At 1x ``pipe`` draws them as it is
    (the caller patches it); above, ``highres`` draws a full-attention base image and upscales it with CLEAR
    (``variant`` None: a window covering the whole grid, i.e. the full-attention reference). A one-step draw of
    the first scene goes first, untimed: one-off costs (first calls, per-layout schedules) are not sampling time,
    and would otherwise fall on whichever configuration runs first (the teacher, inflating every speedup)."""
    prompts, seeds = [s.caption for s in scenes], list(range(len(scenes)))

    def draw(prompts: list[str], seeds: list[int], steps: int) -> list[Image.Image]:
        if scale == 1:
            return generate(pipe, prompts, seeds, resolution, steps, cfg_scale=cfg.cfg_scale)
        stages = [(resolution * 2**i, resolution * 2**i) for i in range(int(math.log2(scale)) + 1)]
        grid = resolution * scale // 16
        window, down = (math.ceil(math.sqrt(2) * grid) + 1, 1) if variant is None else (variant.window, variant.down)
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            out = highres(
                prompt,
                stages=stages,
                num_inference_steps=steps,
                negative_prompt="",
                true_cfg_scale=cfg.cfg_scale,
                seed=seed,
                base_attention="full",
                window_size=window,
                down_factor=down,
                clear_weights=None if weights is None else str(weights),
                max_sequence_length=default_max_sequence_length(highres),
            )
            images.extend(out.images)
        return images

    draw(prompts[:1], seeds[:1], 1)
    start = time.perf_counter()
    images = draw(prompts, seeds, cfg.eval_steps)
    return images, (time.perf_counter() - start) / len(images)


def _compare(images: list[Image.Image], reference: list[Image.Image], scenes) -> dict:
    checks = [check_scene(image, scene) for image, scene in zip(images, scenes, strict=True)]
    return {
        "psnr": float(psnr(images, reference).clamp(max=99.0).mean()),  # identical images: report 99 dB, not inf
        "ssim": float(ssim(images, reference).mean()),
        "adherence": float(np.mean([c.score for c in checks])),
        "pass_rate": float(np.mean([c.passed for c in checks])),
    }


def evaluate(
    pipe, cfg: ProtocolConfig, resolution: int, variants: list[Variant], weights: dict[str, Path]
) -> tuple[list[dict], dict[tuple, list[Image.Image]]]:
    """Metric rows per (scale, student) and the images, keyed ``(scale, kind, variant name)``.

    Scales above 1 need ``pipelines.highres``; without it they are dropped from ``cfg.scales`` with a warning.
    """
    text_len = default_max_sequence_length(pipe)
    rows, images = [], {}
    highres_only = [v for v in variants if cfg.highres_variants is None or v.name in cfg.highres_variants]
    highres = None
    if any(s > 1 for s in cfg.scales):
        try:
            from pipelines.highres import HighResFluxPipeline
        except ImportError:
            logger.warning("pipelines.highres is not available: evaluating at 1x only")
            cfg.scales = (1,)
        else:
            highres = HighResFluxPipeline.from_pipe(pipe)
    for scale in cfg.scales:
        scenes = held_out_scenes(cfg.eval_scenes if scale == 1 else cfg.highres_scenes, cfg.seed)
        size, grid = resolution * scale, resolution * scale // 16
        teacher_images, teacher_time = _draw(pipe, highres, cfg, resolution, scale, scenes, None, None)
        images[scale, "teacher", ""] = teacher_images
        rows.append(
            {"scale": scale, "size": size, "student": "teacher", "variant": "full", "window": None, "down": None}
            | _compare(teacher_images, teacher_images, scenes)
            | {"density": 1.0, "seconds_per_image": teacher_time, "speedup": 1.0}
        )
        for variant in variants if scale == 1 else highres_only:
            for kind, path in (("training-free", None), ("distilled", weights.get(variant.name))):
                if kind == "distilled" and path is None:
                    continue
                logger.info("%dx: %s %s", scale, kind, variant.name)
                # At 1x the student is patched here; the high-resolution pipeline installs CLEAR itself.
                with student(pipe, variant, path) if scale == 1 else contextlib.nullcontext():
                    result, seconds = _draw(pipe, highres, cfg, resolution, scale, scenes, variant, path)
                images[scale, kind, variant.name] = result
                density = clear_dit.attention_density((grid, grid), text_len, variant.window, variant.down)
                rows.append(
                    {"scale": scale, "size": size, "student": kind, "variant": variant.name}
                    | {"window": variant.window, "down": variant.down}
                    | _compare(result, teacher_images, scenes)
                    | {"density": density, "seconds_per_image": seconds, "speedup": teacher_time / seconds}
                )
    return rows, images


def _markdown(rows: list[dict], meta: dict) -> str:
    above = [f"{scale}x" for scale in meta["scales"] if scale > 1]
    held_out = [f"{meta['eval_scenes']} at 1x"] if 1 in meta["scales"] else []
    held_out += [f"{meta['highres_scenes']} at {'/'.join(above)}"] if above else []
    lines = [
        "# Fidelity of CLEAR students to their teacher"
        + (" (smoke run: toy sizes, meaningless numbers)" * meta["smoke"]),
        "",
        f"Teacher: `{meta['teacher']}` ({meta['resolution']} px, T5 length {meta['text_len']}); "
        f"{meta['num_data']} self-generated samples, {meta['distill_steps']} distillation steps per student "
        f"(lr {meta['distill_lr']:g}, {DISTILL_SCHEDULE}); "
        f"{meta['eval_steps']} sampling steps, true CFG scale {meta['cfg_scale']:g}; "
        f"held-out scenes: {', '.join(held_out)}. "
        "Radii keep FLUX's ratio to the token grid (rN = FLUX's r=N at 1024 px).",
        "",
        "| scale | student | variant | window | PSNR (dB) | SSIM | adherence | pass rate | density | s/image "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        window = "-" if r["window"] is None else f"{r['window']}" + (f", d={r['down']}" if r["down"] > 1 else "")
        lines.append(
            f"| {r['scale']}x ({r['size']} px) | {r['student']} | {r['variant']} | {window} | {r['psnr']:.2f} | "
            f"{r['ssim']:.4f} | {r['adherence']:.3f} | {r['pass_rate']:.3f} | {r['density']:.3f} | "
            f"{r['seconds_per_image']:.2f} | {r['speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    rows: list[dict], images: dict[tuple, list[Image.Image]], meta: dict, results: Path, headline: str
) -> list[Path]:
    """Write ``fidelity[_smoke].json``/``.md`` and the image grid into ``results``; returns the paths."""
    results.mkdir(parents=True, exist_ok=True)
    paths = report_paths(results, meta["smoke"])
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    paths[1].write_text(_markdown(rows, meta))
    columns, labels = [], []
    for scale in meta["scales"]:
        for kind, name in (("teacher", ""), ("training-free", headline), ("distilled", headline)):
            if (scale, kind, name) in images:
                columns.append(images[scale, kind, name])
                labels.append(f"{scale}x {kind} {name}".strip())
    num_rows = min(meta["grid_rows"], min(len(c) for c in columns))
    image_grid([[column[i] for column in columns] for i in range(num_rows)], labels).save(paths[2])
    return paths


def run(cfg: ProtocolConfig) -> list[Path]:
    """The whole protocol (module docstring); returns the files written under ``cfg.results``."""
    cfg.check()
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = Path(cfg.teacher) if cfg.teacher else work / "teacher"
    if not (teacher / "model_index.json").is_file():
        if not cfg.smoke:
            raise FileNotFoundError(
                f"no teacher pipeline in {teacher}: train one with `python -m benchmarks.fidelity.train_teacher "
                f"--out {teacher}` (about an hour) or pass --teacher"
            )
        if teacher.exists() and any(teacher.iterdir()):  # a teacher still training, or someone's files
            raise FileExistsError(
                f"{teacher} holds no teacher pipeline (no model_index.json) but is not empty: an unfinished "
                "teacher run? let it finish, or move it away for a smoke teacher"
            )
        if train_teacher.main(["--out", str(teacher), "--smoke"]):
            raise RuntimeError(f"the smoke teacher could not be trained into {teacher}")
    teacher_config = json.loads((teacher / "training" / "config.json").read_text())
    resolution = teacher_config["resolution"]
    if cfg.cfg_scale is None:
        cfg.cfg_scale = float(teacher_config.get("cfg_scale", 1.0))
    if cfg.cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), got {cfg.cfg_scale}")
    variants = [v for v in variants_for(resolution) if v.name in cfg.variants]
    unknown = sorted(set(cfg.variants) - {v.name for v in variants})
    if unknown or not variants:
        raise ValueError(f"unknown --variants {unknown}; choose from {[v.name for v in variants_for(resolution)]}")

    unknown = set(cfg.highres_variants or ()) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"--highres-variants {sorted(unknown)} are not among the evaluated variants {cfg.variants}")

    data = make_data(cfg, teacher, resolution)
    check_data_size(cfg, data)
    weights = {v.name: distill(cfg, teacher, data, v) for v in variants}

    pipe = load_pipeline(str(teacher))
    pipe.set_progress_bar_config(disable=True)
    rows, images = evaluate(pipe, cfg, resolution, variants, weights)
    meta = dataclasses.asdict(cfg) | {
        "teacher": str(teacher),
        "resolution": resolution,
        "text_len": default_max_sequence_length(pipe),
        "variants": [dataclasses.asdict(v) | {"name": v.name} for v in variants],
    }
    headline = "r16" if "r16" in weights else variants[0].name
    return write_report(rows, images, meta, Path(cfg.results), headline)


def parse_args(argv: list[str] | None = None) -> ProtocolConfig:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.run", description=__doc__.split("\n")[0])
    defaults = ProtocolConfig(work="")
    parser.add_argument("--work", required=True, help="folder for the data set, student runs (and smoke teacher)")
    parser.add_argument("--teacher", help="teacher pipeline folder (default WORK/teacher; trained there in --smoke)")
    parser.add_argument("--results", default=defaults.results, help="where the tables and the grid go")
    parser.add_argument("--smoke", action="store_true", help="toy sizes end to end (a smoke teacher if none)")
    parser.add_argument("--overwrite", action="store_true", help="replace the report files --results holds")
    for name in ("num_data", "data_steps", "distill_steps", "distill_batch_size", "eval_scenes", "highres_scenes"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(defaults, name)}")
    parser.add_argument(
        "--distill-lr", type=float, help=f"peak learning rate, cosine schedule (default {defaults.distill_lr:g})"
    )
    parser.add_argument("--eval-steps", type=int, help=f"default {defaults.eval_steps}")
    parser.add_argument("--cfg-scale", type=float, help="true CFG scale of all sampling (default: the teacher's)")
    parser.add_argument("--seed", type=seed_arg, help=f"default {defaults.seed}")
    parser.add_argument("--scales", type=int, nargs="+", choices=(1, 2, 4), help="default 1 2 4")
    parser.add_argument("--variants", nargs="+", help=f"default {' '.join(defaults.variants)}")
    parser.add_argument("--highres-variants", nargs="+", help="the variants also evaluated at 2x/4x (default: all)")
    args = vars(parser.parse_args(argv))
    settings = SMOKE.copy() if args["smoke"] else {}
    settings |= {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if v is not None}
    return ProtocolConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = run(parse_args(argv))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
