"""Probe a fidelity teacher: where it decides its shapes, which text encoder carries what, whether it memorises.

    python -m benchmarks.fidelity.probe --teacher DIR [--scenes 16] [--sigmas 0 0.3 0.6 0.8 0.95 1] [--json OUT]

1. **One-step predictions.** Held-out scenes are rendered, encoded with the teacher's VAE, noised to each
   ``sigma`` (one noise from ``--seed``, the same for every scene) and the teacher's clean-image prediction
   ``x_sigma - sigma * v`` is decoded: the scene checker's share of shapes found (a component of the stated
   colour in the stated region), of shapes found with their stated kind, and of backgrounds right, per sigma.
   Sigma 0 is the VAE's round trip; where the shares fall is where the teacher must draw the shapes from its
   caption instead of from the noisy image.
2. **Encoder swap.** Pairs of held-out captions with different backgrounds are sampled as the teacher's
   evaluation samples them (``--steps``, true CFG ``--cfg-scale`` against the empty prompt), but with the T5
   embeddings of the first caption and the pooled CLIP embedding of the second: the share of samples whose
   background is the first caption's (read through T5 attention), the second's (read through the pooled
   vector's global modulation) or neither.
3. **Region selectivity.** One-shape captions (a large circle or square, 4 colourings, in each of the 9 regions)
   at sigma 1, where the one-step prediction is the teacher's mean image for the caption: how far the centre
   of each 3x3 cell moves from the background colour to the shape's (0: background, 1: the shape's colour), in
   the stated cell and in the other eight. A teacher that reads where its caption puts the shape scores about
   1 and 0; one that paints the shape's colour everywhere or nowhere scores the same in both.
4. **Memorisation.** ``--scenes`` of the teacher's own training scenes and as many held-out ones, sampled as its
   evaluation samples them (or with the swap's ``--steps`` and ``--cfg-scale``, which the report names):
   adherence, pass rate and the shares of shapes found and of their kinds on each. A teacher that scores higher
   on the scenes it was trained on memorises them (more scenes would help); one that scores alike generalises
   what it has learnt, and what it lacks is learning (steps, capacity).

Prints the four results; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.cli import seed_arg
from benchmarks._args import add_json_arguments, refuse_existing_json
from benchmarks.fidelity.checker import SceneCheck, check_scene
from benchmarks.fidelity.common import generate, held_out_scenes
from benchmarks.fidelity.train_teacher import T5_LENGTH, embed_ids, predict_velocity, render_batch, tokenize_captions
from clear_dit.files import atomic_write
from training.world import PALETTE, REGIONS, Scene, Shape, region_box, region_center, sample_scenes

__all__ = [
    "cell_color_shift",
    "encoder_swap",
    "memorisation",
    "one_step_predictions",
    "probe",
    "region_scenes",
    "region_selectivity",
    "swap_pairs",
]

#: (kind, shape colour, background) of the region probe's captions: kinds whose large size covers the middle
#: half of a cell, and colour pairs far apart.
_REGION_PROBE = (
    ("circle", "red", "blue"),
    ("square", "yellow", "purple"),
    ("circle", "white", "green"),
    ("square", "cyan", "black"),
)


@torch.no_grad()
def one_step_predictions(
    pipe, scenes: list[Scene], sigmas: list[float], resolution: int, seed: int = 0
) -> dict[float, list[Image.Image]]:
    """The teacher's decoded clean-image prediction for every scene noised to every sigma in ``[0, 1]``."""
    if not all(0 <= s <= 1 for s in sigmas):
        raise ValueError(f"sigmas must lie in [0, 1], got {sigmas}")
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = (pipe.vae.encode(render_batch(scenes, resolution)).latent_dist.mean - shift) * scale
    noise = torch.randn(latents[:1].shape, generator=torch.Generator().manual_seed(seed))  # one for all scenes
    embeds, pooled = embed_ids(pipe, *tokenize_captions(pipe, [s.caption for s in scenes]))
    predictions = {}
    for sigma in sigmas:
        noisy = (1 - sigma) * latents + sigma * noise
        levels = torch.full((len(scenes),), float(sigma))
        flow = predict_velocity(pipe.transformer, noisy, levels, embeds, pooled)
        clean = noisy - sigma * pipe._unpack_latents(flow, resolution, resolution, pipe.vae_scale_factor)
        decoded = pipe.vae.decode(clean / scale + shift).sample.clamp(-1, 1)
        predictions[sigma] = pipe.image_processor.postprocess(decoded)
    return predictions


@torch.no_grad()
def encoder_swap(
    pipe, pairs: list[tuple[Scene, Scene]], resolution: int, steps: int, cfg_scale: float, seed: int = 0
) -> list[str]:
    """Per pair ``(a, b)``: ``"t5"`` if the sample drawn with T5 of ``a`` and pooled CLIP of ``b`` has ``a``'s
    background, ``"clip"`` if ``b``'s, ``"neither"`` otherwise."""
    verdicts = []
    empty_embeds, empty_pooled = embed_ids(pipe, *tokenize_captions(pipe, [""]))
    guidance = (
        {"negative_prompt_embeds": empty_embeds, "negative_pooled_prompt_embeds": empty_pooled} if cfg_scale > 1 else {}
    )
    for index, (a, b) in enumerate(pairs):
        if a.background == b.background:
            raise ValueError(f"pair {index} has one background ({a.background}) for both captions")
        embeds, pooled = embed_ids(pipe, *tokenize_captions(pipe, [a.caption, b.caption]))
        image = pipe(
            prompt_embeds=embeds[:1],
            pooled_prompt_embeds=pooled[1:],
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + index),
            max_sequence_length=T5_LENGTH,
            true_cfg_scale=cfg_scale,
            **guidance,
        ).images[0]
        seen = check_scene(image, a).background
        verdicts.append("t5" if seen == a.background else "clip" if seen == b.background else "neither")
    return verdicts


def swap_pairs(scenes: list[Scene]) -> list[tuple[Scene, Scene]]:
    """Consecutive scenes paired, skipping pairs that share a background."""
    return [(a, b) for a, b in zip(scenes[::2], scenes[1::2], strict=False) if a.background != b.background]


def region_scenes() -> list[Scene]:
    """The region probe's one-shape scenes: every colouring of :data:`_REGION_PROBE` in every region."""
    return [
        Scene((Shape(kind, color, region, "large", region_center(region)),), background)
        for kind, color, background in _REGION_PROBE
        for region in REGIONS
    ]


def cell_color_shift(image: Image.Image, scene: Scene) -> np.ndarray:
    """``(9,)``: per 3x3 cell (row-major), the mean over its middle half of how far a pixel lies from the
    background colour towards the colour of the scene's first shape (projection on that segment: 0 at the
    background, 1 at the shape's colour)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = np.asarray(PALETTE[scene.background], dtype=np.float64)
    direction = np.asarray(PALETTE[scene.shapes[0].color], dtype=np.float64) - background
    shift = (pixels - background) @ direction / (direction @ direction)
    height, width = shift.shape
    cells = []
    for region in REGIONS:
        x0, y0, x1, y1 = region_box(region)
        dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
        cells.append(
            shift[
                round((y0 + dy) * height) : round((y1 - dy) * height),
                round((x0 + dx) * width) : round((x1 - dx) * width),
            ].mean()
        )
    return np.asarray(cells)


def region_selectivity(pipe, resolution: int, seed: int = 0) -> dict:
    """The region probe (module docstring): mean colour shift of the stated cell and of the other cells at
    sigma 1 over :func:`region_scenes`, and their difference (``selectivity``)."""
    scenes = region_scenes()
    images = one_step_predictions(pipe, scenes, [1.0], resolution, seed)[1.0]
    stated, other = [], []
    for image, scene in zip(images, scenes, strict=True):
        shift = cell_color_shift(image, scene)
        cell = REGIONS.index(scene.shapes[0].region)
        stated.append(shift[cell])
        other.append(np.delete(shift, cell).mean())
    return {
        "captions": len(scenes),
        "stated_cell": float(np.mean(stated)),
        "other_cells": float(np.mean(other)),
        "selectivity": float(np.mean(stated) - np.mean(other)),
    }


def _shares(checks: list[SceneCheck]) -> dict:
    """Shares of the stated shapes found and found with their kind, and of backgrounds right."""
    shapes = [s for c in checks for s in c.shapes]
    return {
        "shapes_found": float(np.mean([s.found for s in shapes])),
        "kind_right": float(np.mean([s.found and s.kind == s.shape.kind for s in shapes])),
        "background_ok": float(np.mean([c.background_ok for c in checks])),
    }


def memorisation(
    pipe, training: list[Scene], held_out: list[Scene], resolution: int, steps: int, cfg_scale: float
) -> dict:
    """The teacher's samples of its own ``training`` scenes and of ``held_out`` ones (seeds 0, 1, ... as in its
    evaluation): ``{"steps", "cfg_scale", "training": {...}, "held_out": {...}}`` with adherence, pass rate,
    :func:`_shares` and the captions each."""
    result: dict = {"steps": steps, "cfg_scale": cfg_scale}
    for name, scenes in (("training", training), ("held_out", held_out)):
        seeds = list(range(len(scenes)))
        images = generate(pipe, [s.caption for s in scenes], seeds, resolution, steps, cfg_scale=cfg_scale)
        checks = [check_scene(image, scene) for image, scene in zip(images, scenes, strict=True)]
        result[name] = {
            "scenes": len(scenes),
            "adherence": float(np.mean([c.score for c in checks])),
            "pass_rate": float(np.mean([c.passed for c in checks])),
        }
        result[name] |= _shares(checks) | {"captions": [s.caption for s in scenes]}
    return result


def probe(
    teacher: str, scenes: int, sigmas: list[float], steps: int | None, cfg_scale: float | None, seed: int
) -> dict:
    """The four probes: the first on ``scenes`` held-out scenes, the swap on the pairs among ``2 * scenes``, the
    region probe on :func:`region_scenes`, memorisation on the first ``scenes`` training scenes and the first
    held-out ones; settings the teacher was trained and evaluated with (``training/config.json``) unless given."""
    from pipelines.loading import load_pipeline

    config_file = Path(teacher) / "training" / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{teacher} is not a fidelity teacher (no training/config.json)")
    config = json.loads(config_file.read_text())
    resolution, max_shapes = config["resolution"], config["max_shapes"]
    steps = config["eval_steps"] if steps is None else steps
    cfg_scale = config["cfg_scale"] if cfg_scale is None else cfg_scale
    pipe = load_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    held_out = held_out_scenes(2 * scenes, config["seed"], max_shapes)
    training = sample_scenes(min(scenes, config["num_scenes"]), config["seed"], max_shapes)  # its first ones
    rows = []
    probed = held_out[:scenes]
    for sigma, images in one_step_predictions(pipe, probed, sigmas, resolution, seed).items():
        checks = [check_scene(image, scene) for image, scene in zip(images, probed, strict=True)]
        rows.append({"sigma": sigma} | _shares(checks))
    pairs = swap_pairs(held_out)
    if not pairs:
        raise ValueError(f"no pair of the {2 * scenes} held-out scenes has two backgrounds; raise --scenes")
    verdicts = encoder_swap(pipe, pairs, resolution, steps, cfg_scale, seed)
    swap = {k: verdicts.count(k) / len(verdicts) for k in ("t5", "clip", "neither")}
    return {
        "teacher": teacher,
        "scenes": scenes,
        "seed": seed,
        "one_step": rows,
        "swap": {"pairs": len(verdicts), "steps": steps, "cfg_scale": cfg_scale, "background_follows": swap},
        "regions": region_selectivity(pipe, resolution, seed),
        "memorisation": memorisation(pipe, training, probed, resolution, steps, cfg_scale),
    }


def format_report(result: dict) -> str:
    lines = [
        f"One-step clean-image predictions of {result['teacher']} ({result['scenes']} held-out scenes):",
        "",
        "| sigma | shapes found | of their kind | background right |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['sigma']:g} | {r['shapes_found']:.0%} | {r['kind_right']:.0%} | {r['background_ok']:.0%} |"
        for r in result["one_step"]
    ]
    swap = result["swap"]
    follows = swap["background_follows"]
    lines += [
        "",
        f"Encoder swap ({swap['pairs']} pairs, {swap['steps']} steps, CFG {swap['cfg_scale']:g}): the background "
        f"follows T5 {follows['t5']:.0%}, pooled CLIP {follows['clip']:.0%}, neither {follows['neither']:.0%}",
    ]
    regions = result["regions"]
    lines += [
        "",
        f"Region selectivity at sigma 1 ({regions['captions']} one-shape captions; 0: background colour, 1: the "
        f"shape's): stated cell {regions['stated_cell']:.3f}, other cells {regions['other_cells']:.3f}, "
        f"selectivity {regions['selectivity']:.3f}",
    ]
    seen = result["memorisation"]
    lines += ["", f"Memorisation ({seen['steps']} steps, CFG {seen['cfg_scale']:g}):", ""]
    lines += [
        "| scenes | adherence | pass rate | shapes found | of their kind | background right |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {seen[k]['scenes']} {name} | {seen[k]['adherence']:.3f} | {seen[k]['pass_rate']:.3f} | "
        f"{seen[k]['shapes_found']:.0%} | {seen[k]['kind_right']:.0%} | {seen[k]['background_ok']:.0%} |"
        for k, name in (("training", "training"), ("held_out", "held-out"))
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher folder (benchmarks.fidelity.train_teacher's output)")
    parser.add_argument(
        "--scenes",
        type=int,
        default=16,
        help="held-out scenes, and training scenes of the memorisation probe (default 16; pairs among twice that)",
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.0, 0.3, 0.6, 0.8, 0.95, 1.0],
        help="noise levels in [0, 1] (default 0 0.3 0.6 0.8 0.95 1)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="sampling steps of the swap and memorisation probes (default: the teacher's evaluation)",
    )
    parser.add_argument(
        "--cfg-scale",
        type=float,
        help="true CFG of the swap and memorisation probes (default: the teacher's evaluation)",
    )
    parser.add_argument("--seed", type=seed_arg, default=0)
    add_json_arguments(parser, "write the results here")
    args = parser.parse_args(argv)
    refuse_existing_json(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.scenes < 1:
            raise ValueError(f"--scenes must be at least 1, got {args.scenes}")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        if args.cfg_scale is not None and not args.cfg_scale >= 1:
            raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), got {args.cfg_scale}")
        result = probe(args.teacher, args.scenes, args.sigmas, args.steps, args.cfg_scale, args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
