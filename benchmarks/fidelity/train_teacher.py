"""Train the fidelity benchmark's teacher: a small FLUX pipeline, from scratch, that draws the world's scenes.

    python -m benchmarks.fidelity.train_teacher --out DIR [--minutes 65] [--smoke]

The result is a normal FLUX pipeline folder (``FluxPipeline.from_pretrained(DIR)``, ``clear-dit generate
--model DIR``); what training leaves besides (config, loss log, held-out evaluation, sample grid) goes to
``DIR/training/``. The recipe, within one time budget (``--minutes``, default 65 minutes on 2 CPU cores):

1. Tokenizers trained on the world's vocabulary with the tiny pipeline's helpers (:mod:`pipelines.tiny`), its
   CLIP text encoder, and a T5 encoder of the teacher's own size (``--t5-dim``, ``--t5-layers``; 32 relative
   position buckets, so that offsets of 0-7 tokens are told apart). Both are **trained jointly** with the
   transformer (``--no-train-text-encoders`` freezes them at their seeded random initialisation). They must
   be: FLUX gives text tokens no position of their own (``txt_ids`` are zeros, so joint attention treats
   the text as a set), so which colour goes with which shape or with the background can only come from the
   T5 encoder's context mixing, and a random T5 hardly mixes (the output for "red" changes by 4% between
   "a red circle on a blue background" and "a blue circle on a red background"). Teachers trained on frozen
   random encoders drew their captions' colours in the wrong places.
2. An ``AutoencoderKL`` with the tiny pipeline's config (16 latent channels, scale factor 8), trained on random
   crops of rendered scenes (MSE + a small KL term) for ``--vae-share`` of the budget; its ``shift_factor`` and
   ``scaling_factor`` are then set from the latent statistics of the training scenes, as FLUX's are.
3. Latent distributions and token ids of the training scenes cached once.
4. A ``FluxTransformer2DModel`` (the tiny config with more layers and no guidance embedding: the teacher is
   not guidance-distilled) trained from scratch with the rectified-flow loss of diffusers' FLUX training
   script (timesteps from ``compute_density_for_timestep_sampling``, weights from
   ``compute_loss_weighting_for_sd3``), AdamW with warmup and cosine decay, and an EMA of the weights (saved).
   Timesteps are drawn uniformly by default, not logit-normal: the scene's layout and colours are decided in
   the first sampling steps (sigma >= 0.9), which logit-normal draws for 1.4% of the samples (uniform: 10%),
   and a teacher trained so left them to chance. As in diffusers' script, the drawn ``u`` indexes the
   descending schedule, so sigma is about ``1 - u``: a positive ``--logit-mean`` draws *low*-noise timesteps,
   a negative one high-noise ones. ``--caption-dropout`` of the captions are replaced by the
   empty one, so that the teacher can be sampled with classifier-free guidance (``true_cfg_scale``).
   ``--sigma-one-share`` of the samples are drawn at sigma 1 instead, where the caption is all the model sees,
   and ``--cell-weight`` weighs the loss on the tokens of the 3x3 cells the caption states a shape in: a weight
   of the caption alone, so the optimum is unchanged (both off by default). ``--highres-share`` of the steps
   draw their batch from the first ``--highres-scenes`` scenes rendered at twice the resolution instead: a
   teacher trained at one resolution only meets RoPE positions it never saw in the 2x stage of the
   high-resolution pipeline, and draws the background there without the shapes (off by default).
5. The pipeline saved with ``save_pretrained``, reloaded with ``from_pretrained``, and sampled on held-out
   scenes (with ``--cfg-scale``): the scene checker's adherence and the VAE's reconstruction quality go to
   ``training/eval.json``.

``--init-from DIR`` trains the teacher in ``DIR`` further (its VAE, text encoders and transformer; no VAE phase,
the whole budget for step 4) into ``--out``. ``--vae-from DIR`` builds a new teacher (text encoders and
transformer of this run's sizes) on the trained VAE of ``DIR``, latent shift and scale included: no VAE phase, so
that teachers of other sizes can be compared on the same latents.

``--device cuda`` trains (and evaluates) on a GPU, ``--mixed-precision bf16`` runs the forward passes of both
phases under bf16 autocast (fp32 weights and optimiser state). Random draws come from CPU generators on any
device, so a run's batches, noise and timesteps are the same everywhere; its numbers are not bit for bit.

Without ``--steps``/``--vae-steps`` each phase runs as many steps as fit in its share of the budget, measured
on its first steps; the counts are recorded in ``training/config.json`` so that a run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.checker import check_scene
from benchmarks.fidelity.common import generate, held_out_scenes, image_grid
from benchmarks.fidelity.metrics import psnr
from pipelines.tiny import TRANSFORMER_CONFIG, VAE_CONFIG, build_tiny_pipeline
from training.world import Scene, region_box, render, sample_scenes, world_corpus

logger = logging.getLogger(__name__)

#: T5 length of the teacher: its tokenizer has one token per word of the world, and the longest caption of the
#: world takes 30 words, 2 commas and the end token.
T5_LENGTH = 40
#: The first steps of a phase, timed to fit the phase into its share of the budget (all inside the warmup).
_PROBE_STEPS = 20


@dataclasses.dataclass
class TeacherConfig:
    """Every setting of a teacher run (written to ``training/config.json``)."""

    out: str
    resolution: int = 256
    num_scenes: int = 4000
    max_shapes: int = 3
    seed: int = 0
    minutes: float = 65.0
    vae_share: float = 0.25
    vae_steps: int | None = None
    vae_crop: int = 64  # conv net: small crops teach it as well as whole images, at a fraction of the cost
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    steps: int | None = None
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 100
    ema_decay: float = 0.999
    weighting_scheme: str = "none"  # uniform timesteps (module docstring); "logit_normal" as FLUX's script
    logit_mean: float = 0.0  # of "logit_normal": < 0 draws more high-noise timesteps (module docstring)
    sigma_one_share: float = 0.0  # of the samples drawn at sigma 1 instead (the caption is all they show)
    cell_weight: float = 1.0  # loss weight of the tokens in the caption's stated cells, relative to the others
    highres_share: float = 0.0  # of the steps drawn from scenes rendered at twice the resolution
    highres_scenes: int = 1000  # the first this many training scenes, at twice the resolution
    caption_dropout: float = 0.1
    cfg_scale: float = 4.0  # true classifier-free guidance of the evaluation samples (1: none)
    layers: int = 2
    single_layers: int = 4
    heads: int = 2
    train_text_encoders: bool = True
    t5_dim: int = 64
    t5_layers: int = 3
    eval_scenes: int = 64
    eval_steps: int = 20
    device: str = "cpu"  # "cuda" (or "cuda:N") trains and evaluates on a GPU
    mixed_precision: str = "no"  # "bf16": forward passes under bf16 autocast, fp32 weights
    init_from: str | None = None  # a teacher folder to go on training (its VAE kept, no VAE phase)
    draws_after: int = 0  # transformer steps its ancestors (--init-from) drew; this run's draws follow theirs
    vae_from: str | None = None  # a pipeline folder whose VAE a new teacher takes (no VAE phase)
    overwrite: bool = False


#: ``--smoke``: the same code paths on toy sizes, in seconds.
SMOKE = dict(
    resolution=64,
    num_scenes=8,
    vae_steps=2,
    vae_crop=32,
    vae_batch_size=2,
    vae_channels=(8, 8, 16, 16),
    steps=3,
    batch_size=2,
    warmup=1,
    layers=1,
    single_layers=1,
    t5_dim=16,
    t5_layers=1,
    eval_scenes=2,
    eval_steps=2,
)


#: What a teacher run writes into ``--out``: the pipeline's files, and ``training/`` with what training leaves.
_RUN_ENTRIES = ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_RUN_ENTRIES += ("transformer", "vae", "training")
_TRAINING_FILES = ("log.jsonl", "config.json", "eval.json", "samples.png")


def _check_out(out: Path, overwrite: bool) -> None:
    """One-line error unless ``out`` may be written: missing, empty, or (with ``overwrite``) a teacher run's folder,
    finished or not, that holds nothing else (never a project checkout, a downloaded pipeline or one's files)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace a previous teacher there")
    training = out / "training"
    others = [p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES]
    if training.is_dir():
        others += [f"training/{p.name}" for p in training.iterdir() if p.name not in _TRAINING_FILES]
    if others or not training.is_dir():
        found = f" ({', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        raise FileExistsError(f"{out} holds files that are not a teacher run{found}; refusing to delete them")


def _prepare_out(out: Path, overwrite: bool) -> None:
    _check_out(out, overwrite)
    if out.exists() and any(out.iterdir()):
        for entry in out.iterdir():  # the entries, not the folder: --out may be a symbolic link to one
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


#: ``--mixed-precision`` values: autocast dtype of the forward passes (``None``: fp32 throughout).
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16}


def training_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device``: a CPU, or a CUDA GPU that this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    return device


def _autocast(cfg: TeacherConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = MIXED_PRECISION[cfg.mixed_precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _images_to_tensor(images) -> torch.Tensor:
    """PIL images -> ``(batch, 3, height, width)`` float32 in [-1, 1], as the VAE takes them."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _lr_lambda(warmup: int, total: Callable[[], int]) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% at step ``total()`` (read lazily: it is known after the probe)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total() - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _Phase:
    """Runs a training step function for a fixed number of steps, or as many as fit in ``seconds``."""

    def __init__(self, name: str, steps: int | None, seconds: float, log: Path):
        self.name, self.steps, self.seconds, self.log = name, steps, seconds, log

    def total(self) -> int:
        return self.steps if self.steps is not None else 10**9

    def run(self, step: Callable[[int], dict]) -> int:
        start = time.perf_counter()
        bar = tqdm(total=self.steps, desc=self.name, unit="step")
        i = 0
        with self.log.open("a") as log:
            while i < self.total():
                record = step(i)
                i += 1
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if i == 1:
                    first = time.perf_counter() - start  # one-off costs (allocations, warm-up): not a step's time
                if self.steps is None and i == _PROBE_STEPS + 1:
                    per_step = (time.perf_counter() - start - first) / _PROBE_STEPS
                    self.steps = max(i, int((self.seconds - first) / per_step))
                    bar.total = self.steps
                    logger.info(
                        "%s: %.2f s/step, running %d steps in %.0f s", self.name, per_step, self.steps, self.seconds
                    )
                if i % 10 == 0 or i == self.total():
                    elapsed = time.perf_counter() - start
                    log.write(
                        json.dumps({"phase": self.name, "step": i, "elapsed_s": round(elapsed, 2)} | record) + "\n"
                    )
                    log.flush()
        bar.close()
        return i


def render_batch(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """Scenes rendered as ``(n, 3, resolution, resolution)`` float32 in [-1, 1], as the VAE takes them."""
    return _images_to_tensor([render(scene, resolution) for scene in scenes])


def _crop_corner(scene: Scene, resolution: int, crop: int, generator: torch.Generator) -> tuple[int, int]:
    """Top-left ``(y, x)`` of a VAE training crop: around one of the scene's shapes half of the time (a random
    crop of a 256 px scene mostly holds background, and the small shapes are what the VAE gets wrong), else
    anywhere."""
    high = resolution - crop
    if torch.rand((), generator=generator) < 0.5:
        return tuple(torch.randint(high + 1, (2,), generator=generator).tolist())
    shape = scene.shapes[int(torch.randint(len(scene.shapes), (), generator=generator))]
    jitter = (torch.rand(2, generator=generator) - 0.5) * crop / 2
    cx, cy = shape.center
    y = round(cy * resolution - crop / 2 + float(jitter[0]))
    x = round(cx * resolution - crop / 2 + float(jitter[1]))
    return min(max(y, 0), high), min(max(x, 0), high)


def train_vae(vae, scenes: list[Scene], cfg: TeacherConfig, seconds: float, log: Path) -> int:
    """Train ``vae`` in place on random crops of the rendered scenes; returns the number of steps run."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    device = vae.device
    phase = _Phase("vae", cfg.vae_steps, seconds, log)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    warmup = min(50, max(1, (cfg.vae_steps or 500) // 10))  # a tenth of a given phase, so that its lr decays too
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, phase.total))
    vae.train()

    def step(_: int) -> dict:
        index = torch.randint(len(scenes), (cfg.vae_batch_size,), generator=generator).tolist()
        batch_scenes = [scenes[i] for i in index]
        images = render_batch(batch_scenes, cfg.resolution)
        corners = [_crop_corner(scene, cfg.resolution, cfg.vae_crop, generator) for scene in batch_scenes]
        batch = torch.stack(
            [
                image[:, y : y + cfg.vae_crop, x : x + cfg.vae_crop]
                for image, (y, x) in zip(images, corners, strict=True)
            ]
        ).to(device)
        with _autocast(cfg, device):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample  # CPU generator: drawn there, moved
        mse = torch.nn.functional.mse_loss(recon.float(), batch)
        kl = posterior.kl().float().mean()
        loss = mse + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        lr = schedule.get_last_lr()[0]  # this step's: read before the schedule moves on
        optimizer.step()
        schedule.step()
        return {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(), "lr": lr}

    steps = phase.run(step)
    vae.eval()
    return steps


def tokenize_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ids ``(n, tokenizer_max_length)`` and T5 ids ``(n, T5_LENGTH)``, padded as FluxPipeline pads them."""
    clip = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True)
    t5 = pipe.tokenizer_2(captions, padding="max_length", max_length=T5_LENGTH, truncation=True)
    return torch.tensor(clip.input_ids), torch.tensor(t5.input_ids)


def embed_ids(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 embeddings ``(n, T5_LENGTH, joint_attention_dim)`` and pooled CLIP ``(n, pooled_projection_dim)`` of
    token ids from :func:`tokenize_captions`: what ``pipe.encode_prompt`` computes, with gradients."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0], pooled


@torch.no_grad()
def encode_scenes(pipe, scenes: list[Scene], resolution: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Cache of the training set: latent mean/std ``(n, 16, r/8, r/8)`` (raw, unnormalised), the captions' token
    ids (``clip_ids``, ``t5_ids``) and those of the empty caption (``empty_clip_ids``, ``empty_t5_ids``: batch 1)
    for caption dropout."""
    means, stds, device = [], [], pipe.vae.device
    for start in tqdm(range(0, len(scenes), batch_size), desc="encode", unit="batch"):
        images = render_batch(scenes[start : start + batch_size], resolution).to(device)
        posterior = pipe.vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    clip_ids, t5_ids = tokenize_captions(pipe, [s.caption for s in scenes])
    empty_clip_ids, empty_t5_ids = tokenize_captions(pipe, [""])
    ids = {"clip_ids": clip_ids, "t5_ids": t5_ids, "empty_clip_ids": empty_clip_ids, "empty_t5_ids": empty_t5_ids}
    return {"mean": torch.cat(means), "std": torch.cat(stds)} | {k: v.to(device) for k, v in ids.items()}


def predict_velocity(
    transformer, latents: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """The flow ``noise - clean`` that the teacher predicts, as FluxPipeline calls its transformer (no guidance
    embedding, text tokens at position 0): packed ``(b, h*w/4, 4c)`` for normalised latents ``(b, c, h, w)`` at
    noise levels ``sigmas`` ``(b,)`` (the transformer's timestep), T5 ``embeds`` ``(b, T5_LENGTH, dim)`` and
    pooled CLIP ``(b, pooled_dim)``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return transformer(
        hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w),
        timestep=sigmas,
        guidance=None,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=latents.new_zeros(embeds.shape[1], 3),
        img_ids=img_ids,
        return_dict=False,
    )[0]


def stated_cell_weights(scenes: list[Scene], grid: int, weight: float) -> torch.Tensor:
    """Loss weights ``(n, grid * grid)`` of the packed tokens (row-major): ``weight`` for a token whose centre
    lies in a 3x3 cell that the scene's caption states a shape in, 1 elsewhere, scaled to mean 1 per scene.
    They depend on the caption alone, so the weighted loss has the same minimiser (the conditional mean given
    the noisy image and the caption); they only move the model's effort towards the regions a caption names."""
    centres = (torch.arange(grid) + 0.5) / grid
    weights = torch.ones(len(scenes), grid, grid)
    for index, scene in enumerate(scenes):
        for shape in scene.shapes:
            x0, y0, x1, y1 = region_box(shape.region)
            rows = (centres >= y0) & (centres < y1)
            cols = (centres >= x0) & (centres < x1)
            weights[index][rows[:, None] & cols[None, :]] = weight
    weights = weights.flatten(1)
    return weights / weights.mean(dim=1, keepdim=True)


def _transformer_draw_seed(cfg: TeacherConfig) -> int:
    """Seed of the transformer phase's draws (batches, noise, timesteps, caption dropout): a new teacher's is
    ``seed + 2``; a continued one (``--init-from``) draws on after its ancestors' steps, which the same seed would
    replay in the same order."""
    if not cfg.draws_after:
        return cfg.seed + 2
    return int(np.random.SeedSequence([cfg.seed, 2, cfg.draws_after]).generate_state(1)[0])


def train_transformer(
    pipe, sets: list[tuple[dict[str, torch.Tensor], torch.Tensor]], cfg: TeacherConfig, seconds: float, log: Path
) -> int:
    """Train ``pipe.transformer`` from scratch with the rectified-flow loss, and the text encoders with it if
    ``cfg.train_text_encoders``; leaves the EMA weights in them. ``sets``: ``(cache, cell_weights)`` of the
    training resolution (:func:`encode_scenes`; ``cell_weights`` ``(n, tokens)`` the loss weights of its scenes'
    tokens for captions not dropped, :func:`stated_cell_weights`), then optionally of twice the resolution, which
    ``cfg.highres_share`` of the steps draw from."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    transformer = pipe.transformer
    scheduler = copy.deepcopy(pipe.scheduler)  # its timesteps/sigmas at construction are the training ones
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(_transformer_draw_seed(cfg))  # on the CPU: the same on every device
    device = transformer.device
    phase = _Phase("transformer", cfg.steps, seconds, log)
    trained = [transformer] + ([pipe.text_encoder, pipe.text_encoder_2] if cfg.train_text_encoders else [])
    parameters = [p for module in trained for p in module.parameters()]
    transformer.requires_grad_(True)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):  # loaded ones (--init-from) come with requires_grad
        encoder.requires_grad_(cfg.train_text_encoders)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup, phase.total))
    ema = EMAModel(parameters, decay=cfg.ema_decay, use_ema_warmup=True)
    transformer.train()  # the text encoders stay in eval mode: their dropout would only add noise

    def step(_: int) -> dict:
        # no extra draw without a second set: recorded runs repeat exactly
        highres = len(sets) > 1 and torch.rand(1, generator=generator).item() < cfg.highres_share
        cache, cell_weights = sets[highres]
        n, channels, height, width = cache["mean"].shape
        index = torch.randint(n, (cfg.batch_size,), generator=generator).to(device)
        eps = torch.randn(cache["std"][index].shape, generator=generator).to(device)
        latents = (cache["mean"][index] + cache["std"][index] * eps - shift) * scale
        noise = torch.randn(latents.shape, generator=generator).to(device)
        u = compute_density_for_timestep_sampling(
            cfg.weighting_scheme,
            cfg.batch_size,
            logit_mean=cfg.logit_mean,
            logit_std=1.0,
            mode_scale=1.29,
            generator=generator,
        )
        if cfg.sigma_one_share > 0:  # no extra draw otherwise: recorded runs repeat exactly
            u = torch.where(torch.rand(cfg.batch_size, generator=generator) < cfg.sigma_one_share, 0.0, u)
        indices = (u * scheduler.config.num_train_timesteps).long()  # index 0: timestep 1000, sigma 1
        indices = indices.clamp(max=scheduler.config.num_train_timesteps - 1)  # u = 1 can be drawn
        timesteps = scheduler.timesteps[indices].to(device)
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1).to(device)
        noisy = (1 - sigmas) * latents + sigmas * noise
        drop = (torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout).to(device)
        clip_ids = torch.where(drop[:, None], cache["empty_clip_ids"], cache["clip_ids"][index])
        t5_ids = torch.where(drop[:, None], cache["empty_t5_ids"], cache["t5_ids"][index])
        with _autocast(cfg, device):
            embeds, pooled = embed_ids(pipe, clip_ids, t5_ids)
            pred = predict_velocity(transformer, noisy, timesteps / 1000, embeds, pooled)
        target = FluxPipeline._pack_latents(noise - latents, cfg.batch_size, channels, height, width)
        weighting = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas).view(-1, 1, 1)
        tokens = torch.where(drop[:, None], 1.0, cell_weights[index])[..., None]
        loss = (weighting * tokens * (pred.float() - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        lr = schedule.get_last_lr()[0]  # this step's: read before the schedule moves on
        optimizer.step()
        schedule.step()
        ema.step(parameters)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "size": height * pipe.vae_scale_factor,
        }

    steps = phase.run(step)
    ema.copy_to(parameters)
    for module in trained:
        module.requires_grad_(False).eval()
    return steps


def build_teacher(cfg: TeacherConfig, work_dir: Path):
    """The untrained teacher pipeline: world tokenizers, seeded random text encoders (frozen until
    :func:`train_transformer` trains them), new VAE and transformer."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    t5_config = dict(
        d_model=cfg.t5_dim,
        d_kv=cfg.t5_dim // 2,
        d_ff=2 * cfg.t5_dim,
        num_layers=cfg.t5_layers,
        relative_attention_num_buckets=32,  # 16 a direction: offsets 0-7 exact, then log-spaced up to T5_LENGTH
        relative_attention_max_distance=T5_LENGTH,
    )
    pipe = build_tiny_pipeline(work_dir, corpus=world_corpus(), t5_config=t5_config)
    pipe.tokenizer_2.model_max_length = T5_LENGTH  # read back by pipelines.loading.default_max_sequence_length
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        pipe.vae = AutoencoderKL(**(VAE_CONFIG | dict(block_out_channels=tuple(cfg.vae_channels))))
        torch.manual_seed(cfg.seed + 1)
        pipe.transformer = FluxTransformer2DModel(
            **(
                TRANSFORMER_CONFIG
                | dict(
                    num_layers=cfg.layers,
                    num_single_layers=cfg.single_layers,
                    num_attention_heads=cfg.heads,
                    joint_attention_dim=cfg.t5_dim,
                    guidance_embeds=False,
                )
            )
        )
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.requires_grad_(False).eval()  # built in train mode: dropout would perturb the embeddings
    return pipe


def _continued_teacher(cfg: TeacherConfig):
    """The teacher in ``cfg.init_from``, to be trained further; ``cfg``'s model sizes are set to its own."""
    from pipelines.loading import load_pipeline

    pipe = load_pipeline(cfg.init_from)
    if pipe.transformer.config.guidance_embeds or pipe.tokenizer_2.model_max_length != T5_LENGTH:
        raise ValueError(f"--init-from {cfg.init_from} is not a fidelity teacher (train_teacher's output)")
    model, t5 = pipe.transformer.config, pipe.text_encoder_2.config
    cfg.layers, cfg.single_layers, cfg.heads = model.num_layers, model.num_single_layers, model.num_attention_heads
    cfg.t5_dim, cfg.t5_layers = t5.d_model, t5.num_layers
    parent = Path(cfg.init_from) / "training" / "config.json"
    if parent.is_file():
        recorded = json.loads(parent.read_text())
        cfg.draws_after = int(recorded.get("draws_after", 0)) + int(recorded.get("steps") or 0)
    return pipe


def _check_captions(pipe, scenes: list[Scene]) -> None:
    lengths = [len(ids) for ids in pipe.tokenizer_2([s.caption for s in scenes]).input_ids]
    if max(lengths) > T5_LENGTH:
        raise ValueError(f"a caption takes {max(lengths)} T5 tokens, more than the teacher's {T5_LENGTH}")


@torch.no_grad()
def evaluate(folder: Path, cfg: TeacherConfig) -> dict:
    """Sample the saved pipeline on held-out scenes; scene-checker adherence of samples and VAE round trips."""
    from pipelines.loading import load_pipeline

    pipe = load_pipeline(str(folder)).to(training_device(cfg.device))
    scenes = held_out_scenes(cfg.eval_scenes, cfg.seed, cfg.max_shapes)
    renders = [render(s, cfg.resolution) for s in scenes]
    prompts, seeds = [s.caption for s in scenes], list(range(len(scenes)))
    samples = generate(pipe, prompts, seeds, cfg.resolution, cfg.eval_steps, cfg_scale=cfg.cfg_scale)
    recon = pipe.vae.decode(pipe.vae.encode(_images_to_tensor(renders).to(pipe.device)).latent_dist.mean).sample.cpu()
    recon_images = [pipe.image_processor.postprocess(r[None].clamp(-1, 1))[0] for r in recon]
    checks = [check_scene(image, scene) for image, scene in zip(samples, scenes, strict=True)]
    recon_checks = [check_scene(image, scene) for image, scene in zip(recon_images, scenes, strict=True)]
    grid_rows = [[r, v, s] for r, v, s in zip(renders, recon_images, samples, strict=True)][:16]
    image_grid(grid_rows, ["render", "vae", "teacher"]).save(folder / "training" / "samples.png")
    return {
        "num_scenes": len(scenes),
        "steps": cfg.eval_steps,
        "cfg_scale": cfg.cfg_scale,
        "adherence": float(np.mean([c.score for c in checks])),
        "pass_rate": float(np.mean([c.passed for c in checks])),
        "vae_psnr": float(psnr((recon.clamp(-1, 1) + 1) / 2, (_images_to_tensor(renders) + 1) / 2).mean()),
        "vae_adherence": float(np.mean([c.score for c in recon_checks])),
        "scenes": [{"caption": s.caption} | c.to_dict() for s, c in zip(scenes, checks, strict=True)],
    }


def _check_counts(cfg: TeacherConfig) -> None:
    """One-line ``ValueError`` for counts, sizes and rates out of range (they failed deep inside torch, or after
    the whole training run)."""
    positive = ("num_scenes", "max_shapes", "batch_size", "vae_batch_size", "eval_scenes", "eval_steps", "layers")
    positive += ("single_layers", "heads", "t5_dim", "t5_layers")
    given = ("steps", "vae_steps")  # None: fitted to the budget
    for name in positive + tuple(n for n in given if getattr(cfg, n) is not None):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("minutes", "lr", "vae_lr"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.warmup < 0 or not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"--warmup must be >= 0 and --ema-decay in [0, 1), got {cfg.warmup} and {cfg.ema_decay}")
    if cfg.steps is None and cfg.warmup <= _PROBE_STEPS:
        raise ValueError(
            f"--warmup must exceed the {_PROBE_STEPS} probe steps when --steps is fitted to --minutes (the cosine's "
            "length is known only after them), or give --steps"
        )
    blocks = len(VAE_CONFIG["block_out_channels"])
    if len(cfg.vae_channels) != blocks or min(cfg.vae_channels) < 1:
        raise ValueError(f"--vae-channels takes {blocks} positive channel counts, got {list(cfg.vae_channels)}")


def train_teacher(cfg: TeacherConfig) -> dict:
    """Run the whole recipe (module docstring) into ``cfg.out``; returns the evaluation summary."""
    if cfg.resolution < 16 or cfg.resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 (VAE factor 8 x 2x2 packing), got {cfg.resolution}")
    _check_counts(cfg)
    new_vae = cfg.init_from is None and cfg.vae_from is None
    if new_vae and (not 16 <= cfg.vae_crop <= cfg.resolution or cfg.vae_crop % 16):
        raise ValueError(f"--vae-crop must be a multiple of 16 in 16..{cfg.resolution}, got {cfg.vae_crop}")
    if not 0 < cfg.vae_share < 1:
        raise ValueError(f"--vae-share must be in (0, 1), got {cfg.vae_share}")
    if not 0 <= cfg.caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {cfg.caption_dropout}")
    if cfg.weighting_scheme not in ("none", "logit_normal", "mode"):
        raise ValueError(f"--weighting-scheme must be none, logit_normal or mode, got {cfg.weighting_scheme!r}")
    if not 0 <= cfg.sigma_one_share <= 1:
        raise ValueError(f"--sigma-one-share must be in [0, 1], got {cfg.sigma_one_share}")
    if cfg.cell_weight <= 0:
        raise ValueError(f"--cell-weight must be > 0 (1: every token alike), got {cfg.cell_weight}")
    if cfg.cfg_scale < 1:
        raise ValueError(f"--cfg-scale must be >= 1 (1: no guidance), got {cfg.cfg_scale}")
    if not 0 <= cfg.highres_share <= 1:
        raise ValueError(
            f"--highres-share must be in [0, 1] (0: the training resolution only), got {cfg.highres_share}"
        )
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision must be {' or '.join(MIXED_PRECISION)}, got {cfg.mixed_precision!r}")
    device = training_device(cfg.device)
    if cfg.highres_share > 0 and not 1 <= cfg.highres_scenes <= cfg.num_scenes:
        raise ValueError(f"--highres-scenes must be in 1..--num-scenes ({cfg.num_scenes}), got {cfg.highres_scenes}")
    out = Path(cfg.out)
    if cfg.init_from is not None and cfg.vae_from is not None:
        raise ValueError("--init-from keeps its teacher's VAE: --vae-from is for a new teacher only")
    if cfg.vae_from is not None:
        vae_config = Path(cfg.vae_from) / "vae" / "config.json"
        if not vae_config.is_file():
            raise FileNotFoundError(f"--vae-from {cfg.vae_from} holds no VAE (no vae/config.json)")
        channels, packed = json.loads(vae_config.read_text()).get("latent_channels"), TRANSFORMER_CONFIG["in_channels"]
        if channels is None or 4 * channels != packed:
            raise ValueError(
                f"--vae-from {cfg.vae_from}: its VAE has {channels} latent channels, the teacher takes {packed // 4}"
            )
    for flag, source in (("--init-from", cfg.init_from), ("--vae-from", cfg.vae_from)):
        if source is not None:
            src, target = Path(source).resolve(), out.resolve()
            if src == target or target in src.parents or src in target.parents:
                raise ValueError(f"{flag} {source} must lie outside --out {out} (--out is emptied first)")
    if cfg.init_from is not None and not (Path(cfg.init_from) / "model_index.json").is_file():
        raise FileNotFoundError(f"--init-from {cfg.init_from} is not a pipeline folder (no model_index.json)")
    _check_out(out, cfg.overwrite)
    budget = cfg.minutes * 60
    start = time.perf_counter()
    scenes = sample_scenes(cfg.num_scenes, cfg.seed, cfg.max_shapes)
    with tempfile.TemporaryDirectory() as work_dir:
        # everything read and checked before --out is emptied: a wrong --init-from must not cost the old teacher
        pipe = build_teacher(cfg, Path(work_dir)) if cfg.init_from is None else _continued_teacher(cfg)
        _check_captions(pipe, scenes + held_out_scenes(cfg.eval_scenes, cfg.seed, cfg.max_shapes))
        if cfg.vae_from is not None:
            from diffusers import AutoencoderKL

            pipe.vae = AutoencoderKL.from_pretrained(Path(cfg.vae_from) / "vae")  # latent shift and scale included
        _prepare_out(out, cfg.overwrite)
        (out / "training").mkdir()
        log = out / "training" / "log.jsonl"
        pipe.to(device)
        if new_vae:
            cfg.vae_steps = train_vae(pipe.vae, scenes, cfg, cfg.vae_share * budget, log)
        else:  # a trained VAE kept (--init-from, --vae-from): recorded as it is
            cfg.vae_steps, cfg.vae_channels = 0, tuple(pipe.vae.config.block_out_channels)
        cache = encode_scenes(pipe, scenes, cfg.resolution)
        if new_vae:
            shift = cache["mean"].mean().item()
            scale = 1.0 / (cache["mean"] - shift).std().item()
            pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
            logger.info("latent shift %.4f, scale %.4f", shift, scale)

        grid = cache["mean"].shape[-1] // 2  # packed tokens a side: 2x2 latents each
        sets = [(cache, stated_cell_weights(scenes, grid, cfg.cell_weight).to(device))]
        if cfg.highres_share > 0:
            highres = scenes[: cfg.highres_scenes]
            sets.append(
                (
                    encode_scenes(pipe, highres, 2 * cfg.resolution),
                    stated_cell_weights(highres, 2 * grid, cfg.cell_weight).to(device),
                )
            )
        seconds = max(0.0, 0.95 * budget - (time.perf_counter() - start))  # the rest, less 5% for evaluation
        cfg.steps = train_transformer(pipe, sets, cfg, seconds, log)
        pipe.to("cpu").save_pretrained(out)
    (out / "training" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    summary = evaluate(out, cfg)
    summary["train_minutes"] = (time.perf_counter() - start) / 60
    (out / "training" / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "teacher in %s: adherence %.3f, pass rate %.3f (VAE: %.1f dB, adherence %.3f)",
        out,
        summary["adherence"],
        summary["pass_rate"],
        summary["vae_psnr"],
        summary["vae_adherence"],
    )
    return summary


def parse_args(argv: list[str] | None = None) -> TeacherConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fidelity.train_teacher", description=__doc__.split("\n")[0]
    )
    defaults = TeacherConfig(out="")
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and a few steps: checks the code paths")
    for field in dataclasses.fields(TeacherConfig):
        if field.name in ("out", "overwrite", "init_from", "vae_from", "draws_after"):
            continue
        value = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {value}")
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=None, help=f"default {' '.join(map(str, value))}")
        else:
            kind = float if isinstance(value, float) else str if isinstance(value, str) else int
            parser.add_argument(flag, type=kind, default=None, help=f"default {value}")
    parser.add_argument(
        "--init-from", help="a teacher folder to go on training (VAE and sizes kept, no VAE phase; default: new)"
    )
    parser.add_argument(
        "--vae-from", help="a pipeline folder whose trained VAE a new teacher takes (no VAE phase; default: train one)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous teacher in --out")
    args = parser.parse_args(argv)
    sizes = ("layers", "single_layers", "heads", "t5_dim", "t5_layers", "vae_channels")
    given = [f"--{name.replace('_', '-')}" for name in sizes if getattr(args, name) is not None]
    if args.init_from and given:
        parser.error(f"--init-from keeps its teacher's sizes: {', '.join(given)} cannot change them")
    settings = SMOKE.copy() if args.smoke else {}
    skip = ("smoke", "out", "overwrite", "init_from", "vae_from")
    settings |= {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    return TeacherConfig(
        out=args.out, overwrite=args.overwrite, init_from=args.init_from, vae_from=args.vae_from, **settings
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        summary = train_teacher(cfg)
    except (ValueError, OSError) as error:  # FileNotFoundError, FileExistsError and other file errors
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "scenes"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
