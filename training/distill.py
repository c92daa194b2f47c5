"""The distillation trainer: a CLEAR student from any FLUX teacher, with ONE model in memory.

``loss = L_fm + a * L_out + b * L_attn`` (DESIGN.md 1.3) on cached latents and text embeddings
(:mod:`training.data`); the teacher's velocity and attention outputs come from the same transformer with
its original attention and weights (:class:`training.student.Student`). accelerate provides DDP,
mixed precision, gradient accumulation and the checkpoint state; launch with
``accelerate launch --multi_gpu --num_processes N -m app.cli distill ...`` (or ``torchrun --nproc_per_node N
-m app.cli distill ...``) for several GPUs, or several CPU processes over gloo on a machine without GPUs.
``accelerate launch --cpu --num_processes N -m app.cli distill ...`` works as well: accelerate starts one
process for it (N only through ``mpirun``), which starts the N itself (:mod:`app.launch`).

The loss: the paper's ``L_fm + 0.5 L_out + 0.5 L_attn`` assumes a trained teacher, whose self-generated samples
follow its own flow, so that the flow-matching target and the teacher agree. For a teacher that does not (the
randomly initialised tiny model: its held-out ``L_fm`` is 1.44 and a student gets below it), ``L_fm`` pulls the
student away from the teacher and the gap grows; ``fm_weight=0`` distils the teacher alone, the configuration
of the tiny-model acceptance test and ``benchmarks/distill.py`` (gap -75% in 200 steps; x203 with ``L_fm``).

Reproducibility: the sample order, the timesteps, the noise and the latent draws of every sample are a
function of ``(seed, position of the sample in the global sample stream)``, not of any RNG state. A run
resumed from a checkpoint therefore reproduces the uninterrupted run bit for bit (CPU, fp32), and N
processes with batch B follow the same sample stream as one process with batch N*B.

Run folder::

    run.json                      the configuration and the data's shapes (a resumed run must match)
    checkpoint-{step}/            accelerate state: trainable tensors, optimizer, scheduler, RNG, position
    logs/train.jsonl              per optimizer step: losses, lr, grad norm, samples/s
    logs/validation.jsonl         per validation: the held-out student - teacher velocity gap, both L_fm
    validation/step-{step:06d}.png    held-out prompts, teacher | student
    clear_local_{R}[_down_{D}].safetensors   the exported student (clear_dit.save_weights)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import SchedulerType, get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from clear_dit.files import atomic_write
from clear_dit.patching import check_patch_settings
from pipelines.loading import TINY, model_source, published_model_name

from .data import DataInfo, DistillDataset, complete_lines
from .losses import WEIGHTING_SCHEMES, TimestepSampler, distill_losses
from .student import TEACHER_MODES, Student

logger = logging.getLogger(__name__)

__all__ = [
    "Distiller",
    "DistillConfig",
    "RunPlan",
    "check_run",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "train",
    "export_name",
    "latest_checkpoint",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
#: diffusers' schedulers that need no argument beyond warmup and total steps (piecewise_constant needs step rules).
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)
OPTIMIZERS = ("adamw", "prodigy")
#: The learning rate when --lr is not given: AdamW's step size; Prodigy estimates the step itself and its lr
#: only scales that estimate (1.0 as its authors and diffusers' training scripts use it).
DEFAULT_LR = {"adamw": 1e-4, "prodigy": 1.0}
RUN_FILE = "run.json"
TRAINABLE_FILE = "trainable.safetensors"
#: Fixed density quantiles of the validation timesteps (mapped through the scheduler's sigma grid).
VALIDATION_QUANTILES = (0.125, 0.375, 0.625, 0.875)
DEFAULT_VALIDATION_ITEMS = 4
#: Config fields a resumed run must share with the run it continues (the rest may change, e.g. max_steps).
#: The optimizer is one of them: its saved state (Prodigy's estimates, AdamW's moments) fits no other optimizer.
RUN_IDENTITY = (
    "model",
    "window",
    "down",
    "lora_rank",
    "teacher",
    "seed",
    "batch_size",
    "grad_accum",
    "attn_layers",
    "optimizer",
)


@dataclass
class DistillConfig:
    """Settings of a distillation run; the CLI's ``clear-dit distill`` flags map one to one onto these."""

    model: str
    data: str
    out: str
    window: int
    down: int = 1
    backend: str = "auto"
    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    lora_rank: int | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    fm_weight: float = 1.0  # the paper's; 0 for a teacher whose samples do not follow its flow (module docstring)
    out_weight: float = 0.5
    attn_weight: float = 0.5
    attn_layers: list[int] | None = None
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5
    caption_dropout: float = 0.0
    teacher: str = "shared"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    num_validation: int | None = None
    validation_images: bool = True
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        """One-line ``ValueError`` for any setting out of range, before anything is loaded; integer types normalised."""
        try:
            self.window, self.down = check_patch_settings(self.window, self.down, self.backend)
        except ValueError as err:  # named as the flags of `clear-dit distill`, which these settings are
            raise ValueError(str(err).replace("window_size", "--window").replace("down_factor", "--down")) from None
        positive = ("max_steps", "batch_size", "grad_accum", "keep_checkpoints")
        for name in (*positive, "checkpoint_every", "validate_every", "lr_warmup_steps", "num_validation"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"--{name.replace('_', '-')} must be an int, got {value!r}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(self, name)}")
        for name in ("checkpoint_every", "validate_every", "num_validation", "lr_warmup_steps"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lora_rank is not None and self.lora_rank <= 0:
            raise ValueError(f"--lora-rank must be a positive int, got {self.lora_rank}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        for name in ("weight_decay", "fm_weight", "out_weight", "attn_weight"):  # < 0 pushes away from the target
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "fm_weight", "out_weight", "attn_weight", "guidance", "logit_mean"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
        if self.fm_weight == self.out_weight == self.attn_weight == 0:  # weight decay alone would shrink the student
            raise ValueError("--fm-weight, --out-weight and --attn-weight are all 0: no loss to train on")
        if self.weighting_scheme == "mode" and not -1 <= self.mode_scale <= MAX_MODE_SCALE:
            raise ValueError(  # beyond it the 'mode' density leaves [0, 1] and timesteps wrap around
                f"--mode-scale must be in [-1, {MAX_MODE_SCALE:.2f}] for the 'mode' scheme, got {self.mode_scale}"
            )
        if self.lr_scheduler == "polynomial" and _learning_rate(self) <= 1e-7:  # diffusers' lr_end
            raise ValueError(
                f"--lr-scheduler polynomial decays the rate to 1e-7: --lr must be above it, got {_learning_rate(self)}"
            )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(
                "--lr-scheduler constant has no warmup (diffusers ignores it): use constant_with_warmup, or no "
                "--lr-warmup-steps"
            )
        for name in ("max_grad_norm", "logit_std"):  # a clip norm <= 0 zeroes or flips every gradient
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("--mixed-precision fp16 needs a CUDA device (CPU autocast runs bf16): use bf16 or no")
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite discards it: pass one of them")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        choices = {
            "mixed_precision": MIXED_PRECISION,
            "optimizer": OPTIMIZERS,
            "weighting_scheme": WEIGHTING_SCHEMES,
            "teacher": TEACHER_MODES,
            "lr_scheduler": LR_SCHEDULERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )


#: The largest ``--mode-scale`` whose SD3 'mode' density stays in [0, 1]: ``2 / (pi - 2)``.
MAX_MODE_SCALE = 2 / (math.pi - 2)


def export_name(window: int, down: int = 1) -> str:
    """The published file naming: ``clear_local_{R}[_down_{D}].safetensors``."""
    return f"clear_local_{window}" + (f"_down_{down}" if down > 1 else "") + ".safetensors"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The completed ``checkpoint-{step}`` folder with the highest step, or ``None``."""
    found = sorted(_checkpoints(Path(run_dir)), key=lambda item: item[0])
    return found[-1][1] if found else None


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    out = []
    for path in run_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / TRAINABLE_FILE).is_file():
            out.append((int(step), path))
    return out


@dataclass
class TrainState:
    """The position of the run, saved in every checkpoint (accelerate custom state).

    ``micro_step`` counts each process's micro-batches: the sample stream's position is ``micro_step *
    batch_size * processes``, so a checkpoint resumes only on as many processes as wrote it (on others, samples
    would be trained twice or skipped)."""

    step: int = 0
    micro_step: int = 0
    processes: int = 1

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = int(state.get("processes", self.processes))  # older checkpoints do not record it
        if saved != self.processes:
            raise ValueError(
                f"--resume: its checkpoint was written by {saved} process{'es' if saved > 1 else ''}, this run has "
                f"{self.processes}: resume it with {saved} (the sample order depends on the process count)"
            )
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


def _seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` wrapped to the 64 bits ``manual_seed`` takes: derived seeds of a
    ``--seed`` up to 2**63 - 1 pass them (below 2**64 the seed is unchanged)."""
    return torch.Generator().manual_seed(seed % 2**64)


class SampleStream:
    """Which item, noise, latent draw and timestep each position of the global sample stream gets.

    Position ``p`` belongs to epoch ``p // n``; each epoch is a permutation of the ``n`` training items
    seeded by ``(seed, epoch)``; the random draws of position ``p`` come from a generator seeded by
    ``(seed, p)``. Nothing depends on the process count or on where a run was interrupted.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def item(self, position: int) -> int:
        epoch = position // self.num_items
        if self._perm is None or self._perm[0] != epoch:
            g = _seeded(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_items, generator=g))
        return int(self._perm[1][position % self.num_items])

    def generator(self, position: int) -> torch.Generator:
        return _seeded((self.seed << 32) + position)


def _resolve_model(model: str) -> str:
    """A folder or hub id for ``from_pretrained``; ``"tiny"`` is the built-in offline tiny pipeline."""
    if model == TINY:
        from pipelines.tiny import tiny_pipeline_path

        return str(tiny_pipeline_path())
    return model


def load_teacher(model: str, dtype: torch.dtype = torch.float32):
    """``(transformer, scheduler)`` of a FLUX pipeline folder or hub id (no VAE, no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    source = _resolve_model(model)
    try:
        transformer = FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load a FLUX transformer and scheduler from {model!r}: {str(err).splitlines()[0]}"
        ) from err
    return transformer, scheduler


def check_data_fits(info: DataInfo, transformer: torch.nn.Module, folder: str) -> None:
    """Refuse data whose latent or text-encoder shapes do not fit the transformer."""
    config = transformer.config
    channels, h, w = info.latent_shape
    problems = []
    if channels * 4 != config.in_channels:
        problems.append(
            f"latents have {channels} channels (x4 packed = {channels * 4}), model takes {config.in_channels}"
        )
    if h % 2 or w % 2:
        problems.append(f"latent grid {h}x{w} is not divisible by the 2x2 packing")
    if info.text_dim != config.joint_attention_dim:
        problems.append(f"T5 embeddings have {info.text_dim} dims, model takes {config.joint_attention_dim}")
    if info.pooled_dim != config.pooled_projection_dim:
        problems.append(
            f"CLIP pooled embeddings have {info.pooled_dim} dims, model takes {config.pooled_projection_dim}"
        )
    if problems:
        raise ValueError(f"data {folder} was made with another model: {'; '.join(problems)}")


@dataclass
class _Batch:
    """Transformer inputs of one micro-batch, plus the flow-matching target and the loss weights."""

    inputs: dict[str, Any]
    target: torch.Tensor
    weighting: torch.Tensor


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """``(b, c, h, w)`` -> FLUX's 2x2-packed ``(b, h/2 * w/2, 4c)``."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def make_batch(
    items: list[dict[str, Any]],
    generators: list[torch.Generator],
    sampler: TimestepSampler,
    info: DataInfo,
    guidance: float | None,
    device: torch.device,
    dtype: torch.dtype,
    sigmas: torch.Tensor | None = None,
    negative: dict[str, torch.Tensor] | None = None,
    caption_dropout: float = 0.0,
) -> _Batch:
    """Noised, packed inputs for a list of dataset items, each with its own generator.

    A sample draws (in this order, on CPU): its latent from the cached posterior, its noise, its sigma from
    the weighting scheme's density (``sigmas`` overrides the draw, for validation) and, with
    ``caption_dropout`` > 0, whether its caption is swapped for ``negative`` (:meth:`DistillDataset.negative`:
    the unconditional branch of true CFG is then distilled too). Latents are scaled as the VAE's
    ``(z - shift) * scale``; ``x_t = (1 - sigma) * x0 + sigma * noise``, target ``noise - x0``.
    """
    from diffusers import FluxPipeline

    x0, noise, drawn, texts = [], [], [], []
    for item, g in zip(items, generators, strict=True):
        mean, logvar = item["latent_mean"], item["latent_logvar"]
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        x0.append((z - info.vae_shift_factor) * info.vae_scaling_factor)
        noise.append(torch.randn(mean.shape, generator=g))
        drawn.append(sampler.sample(g))
        dropped = caption_dropout > 0 and float(torch.rand((), generator=g)) < caption_dropout
        texts.append(negative if dropped else item)
    x0, noise = torch.stack(x0), torch.stack(noise)
    sigma = torch.cat(drawn) if sigmas is None else sigmas
    s = sigma.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    b, _, h, w = x0.shape
    text_len = info.text_seq_len
    inputs = {
        "hidden_states": _pack(noisy).to(device, dtype),
        "encoder_hidden_states": torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype),
        "pooled_projections": torch.stack([t["pooled_prompt_embeds"] for t in texts]).to(device, dtype),
        "timestep": sigma.to(device, dtype),
        "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
        "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if guidance is not None:
        inputs["guidance"] = torch.full((b,), guidance, device=device, dtype=torch.float32)
    return _Batch(inputs, _pack(noise - x0).to(device), sampler.weighting(sigma).to(device))


def _read_run_file(path: Path, advice: str = "pass --overwrite to start the run over") -> dict[str, Any]:
    """A run.json: its ``config`` and ``data`` records, or a one-line ValueError naming the file (and ``advice``)."""
    try:
        record = json.loads(path.read_text())
        if not (isinstance(record.get("config"), dict) and isinstance(record.get("data"), dict)):
            raise ValueError("no 'config' and 'data' records")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is damaged ({err}); {advice}") from None
    return record


def _check_run_dir(config: DistillConfig, record: dict[str, Any]) -> Path | None:
    """Check RUN_DIR against --resume/--overwrite (reads only); returns the checkpoint to resume from."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run folder; choose another --out")
    run_file = out / RUN_FILE
    if out.is_dir() and any(out.iterdir()) and not run_file.is_file():  # --overwrite and --resume act on runs only
        raise FileExistsError(f"{out} is not empty and holds no distillation run (no {RUN_FILE}); choose another --out")
    if config.resume is not None:
        checkpoint = latest_checkpoint(out) if config.resume == "latest" else Path(config.resume)
        if config.resume != "latest" and not (checkpoint / TRAINABLE_FILE).is_file():
            raise FileNotFoundError(f"--resume {config.resume}: not a checkpoint folder (no {TRAINABLE_FILE})")
        origin = checkpoint.parent / RUN_FILE if checkpoint is not None else run_file
        elsewhere = origin.resolve() != run_file.resolve()  # a checkpoint of another folder
        own = latest_checkpoint(out) if elsewhere else None
        if own is not None:  # resuming cuts the run in --out back to the checkpoint's step, deleting its checkpoints
            raise FileExistsError(
                f"--resume {config.resume} is a checkpoint of another folder, and {out} holds a run with checkpoints "
                f"of its own (the latest: {own.name}): resume into a new --out, or pass --resume latest to continue "
                "the run there"
            )
        if run_file.is_file():
            _check_same_run(_read_run_file(run_file), record, str(out))
        if elsewhere and origin.is_file():  # the run that wrote that checkpoint must match too
            advice = f"repair or delete it to resume from {checkpoint} (unchecked against its run), or drop --resume"
            _check_same_run(_read_run_file(origin, advice), record, f"from {checkpoint}")
        if checkpoint is None:
            if _finished_without_checkpoints(config):
                raise FileExistsError(
                    f"--resume latest: {out} holds a finished run and no checkpoint to continue it from "
                    "(--checkpoint-every 0); pass --overwrite to start it over"
                )
            logger.warning("--resume latest: no checkpoint in %s yet, starting a new run", out)
        return checkpoint
    if run_file.is_file() and not config.overwrite:
        if _finished_without_checkpoints(config):
            raise FileExistsError(f"{out} already holds a finished distillation run; pass --overwrite to start over")
        raise FileExistsError(
            f"{out} already holds a distillation run; pass --resume latest to continue it or --overwrite to start over"
        )
    target = out / export_name(config.window, config.down)
    previous = _previous_export(run_file) if config.overwrite and target.exists() else None
    if previous is not None and previous != target.name:  # a damaged run.json: a file of that name is taken as ours
        raise FileExistsError(f"{target} is not the export of the run in {out}; move it or choose another --out")
    return None


def _finished_without_checkpoints(config: DistillConfig) -> bool:
    """Whether ``--out`` holds the run's export and no checkpoint (``--checkpoint-every 0``): nothing to resume."""
    out = Path(config.out)
    return latest_checkpoint(out) is None and (out / export_name(config.window, config.down)).exists()


def _previous_export(run_file: Path) -> str | None:
    """The name of the export of the run ``run_file`` describes; ``None`` if it is damaged."""
    try:
        previous = _read_run_file(run_file)["config"]
        return export_name(previous["window"], previous.get("down", 1))
    except (ValueError, KeyError):
        return None


def _write_run_dir(config: DistillConfig, record: dict[str, Any], resuming: bool) -> None:
    """Clear what --overwrite discards (only the trainer's own files) and write run.json (main process)."""
    out = Path(config.out)
    if config.overwrite and not resuming and (out / RUN_FILE).is_file():
        for path in [*out.glob("checkpoint-*"), *out.glob(".checkpoint-*.tmp"), out / "logs", out / "validation"]:
            shutil.rmtree(path, ignore_errors=True)
        previous = _previous_export(out / RUN_FILE)  # its export only: others may be the user's
        if previous is None:
            logger.warning("%s is damaged: the export of the run it described, if any, is left", out / RUN_FILE)
        else:
            (out / previous).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / RUN_FILE) as tmp:  # a torn run.json would block both --resume and --overwrite
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _run_record(config: DistillConfig, dataset: DistillDataset, held_out: int) -> dict[str, Any]:
    """What run.json records: the config, and what identifies the data: its shapes, encoding, size and held-out
    count (the training order and the held-out split depend on both, so a resume on grown data would train on
    items held out before), how it was made and a digest of its prompts (data made again in the same folder with
    other prompts or settings is another data set)."""
    info = dataset.info
    prompts = hashlib.sha256(json.dumps(dataset.prompts).encode()).hexdigest()[:16]
    data = info.shape_summary() | info.encoding() | {"items": len(dataset), "held_out": held_out}
    return {"config": _identity_config(config), "data": data | {"made": info.settings, "prompts": prompts}}


def _identity_config(config: DistillConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("resume", "overwrite", "out")}


def _check_same_run(saved: dict[str, Any], now: dict[str, Any], what: str) -> None:
    """Refuse to resume ``what`` (a run folder, or "from CHECKPOINT") with other RUN_IDENTITY settings or data;
    say which of the other settings change."""
    diffs = [
        f"{k}: {saved['config'].get(k)!r} -> {now['config'].get(k)!r}"
        for k in RUN_IDENTITY
        if saved["config"].get(k) != now["config"].get(k)
    ]
    diffs += [
        f"data {k}: {saved['data'][k]!r} -> {v!r}"
        for k, v in now["data"].items()
        if k in saved["data"] and saved["data"][k] != v  # run.json files before the data's size was recorded
    ]
    if diffs:
        raise ValueError(
            f"cannot resume {what}: it holds a different run ({'; '.join(diffs)}); use --overwrite or another --out"
        )
    changed = [
        f"{k}: {v!r} -> {now['config'][k]!r}"
        for k, v in saved["config"].items()
        if k not in RUN_IDENTITY and k in now["config"] and v != now["config"][k]
    ]
    if changed:
        logger.warning("resuming %s with changed settings: %s", what, "; ".join(changed))


def _truncate_log(path: Path, step: int) -> int | None:
    """Drop log lines of steps after ``step`` (written by the interrupted run after its last checkpoint), and a
    torn last line (the interrupted run's last write); returns the step of the last line kept (None: none)."""
    if not path.is_file():
        return None
    kept, last = [], None
    for number, line in enumerate(complete_lines(path), start=1):
        try:
            logged = json.loads(line)["step"] if line.strip() else None
            keep = logged is not None and logged <= step
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} line {number} is not a log line of clear-dit's ({err!r}): {line[:80]}") from None
        if keep:
            kept.append(line)
            last = logged
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    return last


class _Logger:
    """JSON-lines logs in RUN_DIR/logs (main process), mirrored to accelerate's trackers (tensorboard)."""

    def __init__(self, accelerator: Any, folder: Path, keep_until: int) -> None:
        self.accelerator = accelerator
        self.folder = folder
        self.last_validation: int | None = None  # the step of the last one logged as the run starts (main process)
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            _truncate_log(folder / "train.jsonl", keep_until)
            self.last_validation = _truncate_log(folder / "validation.jsonl", keep_until)

    def log(self, name: str, values: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.folder / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(values) + "\n")
        step = values["step"]
        self.accelerator.log({f"{name}/{k}": v for k, v in values.items() if k != "step"}, step=step)


def _learning_rate(config: DistillConfig) -> float:
    return DEFAULT_LR[config.optimizer] if config.lr is None else config.lr


def _make_optimizer(config: DistillConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lr = _learning_rate(config)
    if config.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        if lr <= 0.1:
            logger.warning("--optimizer prodigy with --lr %g: Prodigy's lr scales its own step estimate, use ~1.0", lr)
        return Prodigy(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


@dataclass
class RunPlan:
    """What :func:`check_run` found: the data set, its held-out count, run.json's record, the checkpoint to resume."""

    dataset: DistillDataset
    num_validation: int
    record: dict[str, Any]
    resume_from: Path | None


def check_run(config: DistillConfig) -> RunPlan:
    """Every check of a run that needs no model, reading only: the settings, the data (its size against the held-out
    count, its grid against the down factor) and ``--out`` against ``--resume``/``--overwrite``. The CLI runs it
    before it starts N processes, so that a mistake is one error line, not one per process."""
    config.check()
    folder = Path(config.model).expanduser()
    if config.model != TINY:
        if not folder.exists():  # a missing folder said as such, not as a hub error
            model_source(config.model)
        elif not ((folder / "transformer/config.json").is_file() and (folder / "scheduler").is_dir()):
            raise FileNotFoundError(  # what load_teacher reads (no model_index.json or text encoders needed)
                f"cannot load a FLUX transformer and scheduler from {config.model!r}: it has no transformer/ and "
                "scheduler/"
            )
    dataset = DistillDataset(config.data)
    # Held out: the last items of the data set; by default 4, or a quarter of a smaller set.
    num_validation = config.num_validation
    if num_validation is None:
        num_validation = min(DEFAULT_VALIDATION_ITEMS, len(dataset) // 4)
    if len(dataset) <= num_validation:
        raise ValueError(
            f"{config.data} holds {len(dataset)} items: not enough for {num_validation} held-out "
            "validation items plus training data (lower --num-validation or make more data)"
        )
    _, h, w = dataset.info.latent_shape
    if (h // 2) % config.down or (w // 2) % config.down:  # the pooled keys need whole d x d cells
        raise ValueError(
            f"data {config.data} has a {h // 2}x{w // 2} token grid, not divisible by down factor {config.down}: "
            "choose a down factor that divides both sides"
        )
    record = _run_record(config, dataset, num_validation)
    return RunPlan(dataset, num_validation, record, _check_run_dir(config, record))


def _warn_about_the_environment(config: DistillConfig) -> None:
    """Launcher variables a run does not follow, or that make it wait: said, not silently obeyed or ignored."""
    accumulate = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accumulate is not None and accumulate != str(config.grad_accum):
        logger.warning(
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=%s (accelerate launch --gradient_accumulation_steps) is ignored: "
            "the run accumulates --grad-accum %d micro-batches (run.json records it)",
            accumulate,
            config.grad_accum,
        )
    # a plain run with RANK / WORLD_SIZE left in the environment waits for peers that never come
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        logger.warning(
            "joining a group of WORLD_SIZE=%s processes at %s:%s as RANK %s (set in the environment, not by "
            "torchrun): this waits until all of them start; unset these variables for a single-process run",
            world,
            os.environ.get("MASTER_ADDR", "?"),
            os.environ.get("MASTER_PORT", "?"),
            os.environ.get("RANK", "?"),
        )


class Distiller:
    """One distillation run: builds everything from a :class:`DistillConfig`; :meth:`run` trains and exports."""

    def __init__(self, config: DistillConfig, plan: RunPlan | None = None) -> None:
        """``plan``: :func:`check_run`'s result for ``config``, when the caller already checked it (else checked
        here)."""
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

        plan = plan or check_run(config)
        self.config = config
        self.dataset = plan.dataset
        self.negative = self.dataset.negative() if config.caption_dropout > 0 else None
        info = self.dataset.info
        self.num_validation = plan.num_validation
        _warn_about_the_environment(config)
        self.out = Path(config.out)
        trackers = "tensorboard" if _has_tensorboard() else None
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # lets torchrun-started processes without GPUs join over gloo
            # a plugin: accelerate lets $ACCELERATE_GRADIENT_ACCUMULATION_STEPS override the plain argument
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum),
            mixed_precision=config.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        self.resume_from = plan.resume_from  # every process checked before any writes
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.mixed_precision]

        transformer, scheduler = load_teacher(config.model, self.weight_dtype)
        check_data_fits(info, transformer, config.data)
        self.scheduler_config = scheduler.config
        self.guidance = config.guidance if transformer.config.guidance_embeds else None
        transformer.to(acc.device)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        layers = config.attn_layers if config.attn_weight > 0 else []
        self.student = Student(
            transformer,
            window_size=config.window,
            down_factor=config.down,
            backend=config.backend,
            lora_rank=config.lora_rank,
            attn_layers=layers,
            teacher=config.teacher,
            trainable_dtype=torch.float32,
            seed=config.seed,
        )
        self.sampler = TimestepSampler(
            scheduler.sigmas.float().cpu(),
            config.weighting_scheme,
            config.logit_mean,
            config.logit_std,
            config.mode_scale,
        )
        self.num_train = len(self.dataset) - self.num_validation
        prompts = self.dataset.prompts
        trained_on = set(prompts[: self.num_train])
        shared = sum(p in trained_on for p in prompts[self.num_train :])
        if shared:
            logger.warning(
                "%d of the %d held-out items share their prompt with training items (make-data --num cycled the "
                "prompts): validation measures unseen seeds of seen prompts",
                shared,
                self.num_validation,
            )
        if config.batch_size * acc.num_processes > self.num_train:
            logger.warning(
                "a step takes %d samples (batch size %d x %d processes) of %d training items: each step repeats items",
                config.batch_size * acc.num_processes,
                config.batch_size,
                acc.num_processes,
                self.num_train,
            )
        self.stream = SampleStream(self.num_train, config.seed)
        params = list(self.student.trainable.values())
        optimizer = _make_optimizer(config, params)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.model, self.optimizer = acc.prepare(transformer, optimizer)
        self.state = TrainState(processes=acc.num_processes)
        acc.register_for_checkpointing(self.lr_scheduler, self.state)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            if self.state.step > config.max_steps:
                raise ValueError(
                    f"--resume {config.resume}: its checkpoint is at step {self.state.step}, past --max-steps "
                    f"{config.max_steps}; pass --max-steps {self.state.step} or more"
                )
            self._continue_schedule(optimizer)
            logger.info("resumed from %s at step %d", self.resume_from, self.state.step)
            if acc.is_main_process:  # later ones are the abandoned attempt's (as its log lines below): rotation,
                # which keeps the highest steps, would delete this attempt's new checkpoints and keep them
                for step, later in _checkpoints(self.out):
                    if step > self.state.step:
                        logger.info("removing %s of the attempt resumed before it", later)
                        shutil.rmtree(later)
        # run.json once the student is built and its checkpoint loaded: a refused resume leaves --out as it was
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_run_dir(config, plan.record, resuming=self.resume_from is not None)
        acc.wait_for_everyone()
        if trackers and acc.is_main_process:
            # purge_step: readers drop the events the interrupted attempt logged after its last checkpoint.
            purge = {"purge_step": self.state.step + 1 if self.resume_from is not None else 0}
            acc.init_trackers("distill", init_kwargs={"tensorboard": purge})
        # Log lines after the resumed step (or all, for a fresh start) belong to the interrupted attempt.
        self.logs = _Logger(acc, self.out / "logs", self.state.step if self.resume_from is not None else -1)

    def _continue_schedule(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``load_state``: this run's lr, weight decay and schedule, at the step it resumes from.

        ``load_state`` brings back the saved run's learning rate, weight decay and the scheduler's base rates;
        a resumed run may change them (and ``max_steps``, which reshapes a decaying schedule), and run.json
        records this run's values, so they are set here (the optimizer's moments stay the checkpoint's)."""
        config, scheduler = self.config, self.lr_scheduler
        lr = _learning_rate(config)
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["weight_decay"] = lr, config.weight_decay
            group["lr"] = lr * factor(scheduler.last_epoch)  # the rate of the next step, as LambdaLR sets it
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

    # -- checkpoints -------------------------------------------------------------------------------------
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            tensors = {k: v.contiguous().cpu() for k, v in self.student.trainable_state_dict().items()}
            save_file(tensors, os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()  # the frozen base model is not part of a checkpoint: it is reloaded from --model

    def _load_hook(self, models: list, input_dir: str) -> None:
        # loaded on the CPU, then moved: safetensors refuses the "cpu:0" of a multi-process CPU run
        tensors = {
            k: v.to(self.accelerator.device) for k, v in load_file(os.path.join(input_dir, TRAINABLE_FILE)).items()
        }
        self.student.load_trainable_state_dict(tensors)
        models.clear()

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        final = self.out / f"checkpoint-{self.state.step}"
        tmp = self.out / f".checkpoint-{self.state.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # only complete checkpoints carry the final name
            for _, old in sorted(_checkpoints(self.out))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        acc.wait_for_everyone()

    # -- one optimizer step ------------------------------------------------------------------------------
    def micro_batch(self, micro_step: int) -> _Batch:
        acc, b = self.accelerator, self.config.batch_size
        first = micro_step * b * acc.num_processes + acc.process_index * b
        positions = range(first, first + b)
        items = [self.dataset[self.stream.item(p)] for p in positions]
        generators = [self.stream.generator(p) for p in positions]
        return make_batch(
            items,
            generators,
            self.sampler,
            self.dataset.info,
            self.guidance,
            acc.device,
            self.weight_dtype,
            negative=self.negative,
            caption_dropout=self.config.caption_dropout,
        )

    def train_step(self) -> dict[str, float]:
        acc, student = self.accelerator, self.student
        totals: dict[str, float] = {}
        for _ in range(self.config.grad_accum):
            batch = self.micro_batch(self.state.micro_step)
            with acc.accumulate(self.model):
                with student.teacher() as teacher, student.teacher_capture.recording() as t_attn, acc.autocast():
                    v_teacher = teacher(**batch.inputs)[0]
                with student.capture.recording() as s_attn:
                    v_student = self.model(**batch.inputs)[0]
                losses = distill_losses(
                    v_student,
                    v_teacher,
                    batch.target,
                    s_attn,
                    t_attn,
                    batch.weighting,
                    self.config.out_weight,
                    self.config.attn_weight,
                    self.config.fm_weight,
                )
                acc.backward(losses.total)
                if acc.sync_gradients:
                    totals["grad_norm"] = float(
                        acc.clip_grad_norm_(self.student.trainable.values(), self.config.max_grad_norm)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.state.micro_step += 1
            floats = torch.tensor(list(losses.as_floats().values()), device=acc.device)
            floats = acc.reduce(floats, reduction="mean")
            for name, value in zip(losses.as_floats(), floats.tolist(), strict=True):
                totals[name] = totals.get(name, 0.0) + value / self.config.grad_accum
        totals["lr"] = self.lr_scheduler.get_last_lr()[0]
        if "d" in self.optimizer.param_groups[0]:  # Prodigy: the step size it estimated (the step is d * lr)
            totals["prodigy_d"] = float(self.optimizer.param_groups[0]["d"])
        self.lr_scheduler.step()
        self.state.step += 1
        return totals

    # -- validation ----------------------------------------------------------------------------------------
    def held_out(self) -> list[int]:
        return list(range(self.num_train, len(self.dataset)))

    def held_out_batches(self) -> Iterator[_Batch]:
        """The validation inputs: each held-out item noised once (seeded by its position) at every validation
        sigma (fixed density quantiles), one batch ``(len(VALIDATION_QUANTILES), ...)`` per item."""
        sigmas = self.sampler.from_uniform(torch.tensor(VALIDATION_QUANTILES))
        for position, index in enumerate(self.held_out()):
            generators = [_seeded(self.config.seed + 7919 * position) for _ in sigmas]
            item = self.dataset[index]
            yield make_batch(
                [item] * len(sigmas),
                generators,
                self.sampler,
                self.dataset.info,
                self.guidance,
                self.accelerator.device,
                self.weight_dtype,
                sigmas,
            )

    @torch.no_grad()
    def validation_losses(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Held-out losses of ``model`` (default: the student) against the teacher, means over items and sigmas.

        ``val_gap``: mean squared student - teacher velocity difference, what distillation closes.
        ``val_fm_student`` / ``val_fm_teacher``: each model's flow-matching loss ``|v - (noise - x0)|^2``. For a
        teacher whose samples follow its own flow (a trained one), ``val_fm_teacher`` is about the lowest
        ``L_fm`` reachable, so ``L_fm`` pulls the student towards the teacher. A teacher whose ``L_fm`` the
        student can undercut (a randomly initialised one) makes ``L_fm`` pull the student away from it: the gap
        then grows with the default loss and only ``--fm-weight 0`` distills the teacher (see the README).
        """
        acc, student = self.accelerator, self.student
        model = student.transformer if model is None else model
        sums = {"val_gap": 0.0, "val_fm_student": 0.0, "val_fm_teacher": 0.0}
        for batch in self.held_out_batches():
            with acc.autocast():
                with student.teacher() as teacher:
                    v_teacher = teacher(**batch.inputs)[0].float()
                v_student = model(**batch.inputs)[0].float()
            target = batch.target.float()
            sums["val_gap"] += float((v_student - v_teacher).pow(2).mean())
            sums["val_fm_student"] += float((v_student - target).pow(2).mean())
            sums["val_fm_teacher"] += float((v_teacher - target).pow(2).mean())
        return {name: total / len(self.held_out()) for name, total in sums.items()}

    @torch.no_grad()
    def validation_grid(self, path: Path) -> None:
        """Teacher | student images of the held-out prompts at their seeds, one row per prompt."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
        from PIL import Image

        acc, info = self.accelerator, self.dataset.info
        vae = AutoencoderKL.from_pretrained(
            _resolve_model(self.config.model), subfolder="vae", torch_dtype=self.weight_dtype
        )
        vae.to(acc.device)
        steps = int(info.settings.get("steps", 28))
        guidance = float(info.settings.get("guidance", self.config.guidance))
        rows = []
        for index in self.held_out():
            item, entry = self.dataset[index], self.dataset.entries[index]
            images = []
            for role in ("teacher", "student"):
                with self.student.teacher() if role == "teacher" else nullcontext(self.student.transformer) as model:
                    pipe = FluxPipeline(
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
                        vae=vae,
                        text_encoder=None,
                        tokenizer=None,
                        text_encoder_2=None,
                        tokenizer_2=None,
                        transformer=model,
                    )
                    pipe.set_progress_bar_config(disable=True)
                    with acc.autocast():
                        image = pipe(
                            prompt_embeds=item["prompt_embeds"][None].to(acc.device, self.weight_dtype),
                            pooled_prompt_embeds=item["pooled_prompt_embeds"][None].to(acc.device, self.weight_dtype),
                            height=info.height,
                            width=info.width,
                            num_inference_steps=steps,
                            guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(
                                index if entry.get("seed") is None else entry["seed"]
                            ),
                        ).images[0]
                images.append(image)
            rows.append(images)
        w, h = rows[0][0].size
        grid = Image.new("RGB", (2 * w, len(rows) * h))
        for r, pair in enumerate(rows):
            for c, image in enumerate(pair):
                grid.paste(image, (c * w, r * h))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            grid.save(tmp, format="PNG")

    def validate(self) -> float:
        """Log :meth:`validation_losses` (and save the image grid); returns the gap."""
        values = self.validation_losses()
        gap = values["val_gap"]
        if self.config.validation_images and self.accelerator.is_main_process:
            self.validation_grid(self.out / "validation" / f"step-{self.state.step:06d}.png")
        self.logs.log("validation", {"step": self.state.step, **values})  # last: a resume redoes what it lacks
        self.accelerator.wait_for_everyone()
        logger.info("step %d: held-out velocity gap %.6g", self.state.step, gap)
        return gap

    # -- the run -------------------------------------------------------------------------------------------
    def _validation_due(self) -> bool:
        """Whether the current step is validated: every ``validate_every`` steps, and the last."""
        step, config = self.state.step, self.config
        return step == config.max_steps or bool(config.validate_every and step % config.validate_every == 0)

    def _validated_before(self) -> bool:
        """Whether the logs the run resumes with hold a validation of the current step (the main process reads
        them, every process gets its answer: validation runs on all)."""
        from accelerate.utils import broadcast_object_list

        answer = [self.logs.last_validation == self.state.step]
        broadcast_object_list(answer)
        return answer[0]

    def fit(self) -> None:
        """Train to ``max_steps`` (from the resumed step), with checkpoints, logs and validation."""
        config, acc = self.config, self.accelerator
        validating = self.num_validation > 0
        if validating and (self.state.step == 0 or (self._validation_due() and not self._validated_before())):
            self.validate()  # a resumed step's too: the attempt killed during it had checkpointed first
        global_batch = config.batch_size * config.grad_accum * acc.num_processes
        bar = tqdm(
            total=config.max_steps, initial=self.state.step, desc="distill", disable=not acc.is_local_main_process
        )
        while self.state.step < config.max_steps:
            start = time.perf_counter()
            values = self.train_step()
            values["samples_per_s"] = global_batch / (time.perf_counter() - start)
            values["epoch"] = self.state.micro_step * config.batch_size * acc.num_processes / self.num_train
            self.logs.log("train", {"step": self.state.step, **values})
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4g}", lr=f"{values['lr']:.2g}")
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss became {values['loss']} at step {self.state.step}; lower --lr")
            # the loss is taken before the step: a non-finite gradient (clipping turns inf into nan) has already
            # made the weights nan, to be checkpointed and exported; fp16's loss scaler skips such steps itself
            if not math.isfinite(values["grad_norm"]) and not acc.optimizer_step_was_skipped:
                raise FloatingPointError(
                    f"gradient norm became {values['grad_norm']} at step {self.state.step}; lower --lr"
                )
            last = self.state.step == config.max_steps
            if config.checkpoint_every and (self.state.step % config.checkpoint_every == 0 or last):
                self.save_checkpoint()
            if validating and self._validation_due():
                self.validate()
        bar.close()

    def export(self) -> Path:
        """Write RUN_DIR/clear_local_{R}[_down_{D}].safetensors (a LoRA is merged: call it last)."""
        path = self.out / export_name(self.config.window, self.config.down)
        if self.accelerator.is_main_process:
            self.student.export(path, overwrite=True, base_model=published_model_name(self.config.model))
            logger.info("exported the CLEAR student to %s", path)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return path

    def run(self) -> Path:
        """:meth:`fit`, then :meth:`export`; returns the exported file."""
        self.fit()
        return self.export()


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def train(config: DistillConfig, plan: RunPlan | None = None) -> Path:
    """Distill a CLEAR student as ``config`` says (``plan``: its :func:`check_run`, if done already); returns the
    exported ``clear_local_*.safetensors``."""
    return Distiller(config, plan).run()
