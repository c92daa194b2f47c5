"""Helpers shared by the fidelity benchmark's scripts: held-out scenes, sampling a pipeline, image grids."""

from __future__ import annotations

import logging

import torch
from PIL import Image, ImageDraw

from pipelines.loading import default_max_sequence_length
from training.world import Scene, sample_scenes

logger = logging.getLogger(__name__)

__all__ = ["HELD_OUT_OFFSET", "generate", "held_out_scenes", "image_grid"]

#: Held-out scenes are drawn from seed ``seed + HELD_OUT_OFFSET``, never from the training seed.
HELD_OUT_OFFSET = 1_000_000


def held_out_scenes(num: int, seed: int = 0, max_shapes: int = 3) -> list[Scene]:
    """Scenes for evaluation, disjoint in seed from the training scenes of ``seed``."""
    return sample_scenes(num, seed + HELD_OUT_OFFSET, max_shapes)


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int,
    batch_size: int = 4,
    cfg_scale: float = 1.0,
) -> list[Image.Image]:
    """One image per (prompt, seed) with ``pipe`` (a FluxPipeline), in batches, each image from its own seed;
    ``cfg_scale`` > 1 samples with true classifier-free guidance against the empty prompt."""
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(s) for s in seeds[chunk]]
        guidance = {"negative_prompt": [""] * len(generators), "true_cfg_scale": cfg_scale} if cfg_scale > 1 else {}
        out = pipe(
            prompts[chunk],
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            generator=generators,
            max_sequence_length=default_max_sequence_length(pipe),
            **guidance,
        )
        images.extend(out.images)
    return images


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, cell: int = 256) -> Image.Image:
    """Paste ``rows`` of images into one grid (each resized to ``cell`` px), with column labels on top."""
    columns = max(len(row) for row in rows)
    top = 16 if labels else 0
    grid = Image.new("RGB", (columns * cell, top + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(labels or []):
        draw.text((j * cell + 4, 2), label, fill="black")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.BICUBIC), (j * cell, top + i * cell))
    return grid
