"""Distillation losses (DESIGN.md 1.3) with diffusers' SD3/FLUX timestep sampling and loss weighting.

``loss = L_fm + a * L_out + b * L_attn`` per sample, each term weighted by the timestep weighting scheme
exactly as diffusers' ``train_dreambooth_flux.py`` weights its flow-matching loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

__all__ = ["WEIGHTING_SCHEMES", "TimestepSampler", "weighted_mse", "DistillLosses", "distill_losses"]

#: The ``--weighting-scheme`` choices of diffusers' SD3/FLUX training scripts.
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


@dataclass(frozen=True)
class TimestepSampler:
    """Draws training timesteps as diffusers' FLUX script does: a density over the scheduler's grid.

    Args:
        sigmas: the scheduler's training sigmas ``(num_train_timesteps,)`` (``scheduler.sigmas`` right
            after construction), descending from 1.
        weighting_scheme: one of :data:`WEIGHTING_SCHEMES`; selects both the density and the loss weight.
        logit_mean, logit_std: parameters of the ``logit_normal`` density.
        mode_scale: parameter of the ``mode`` density.
    """

    sigmas: torch.Tensor
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"unknown weighting scheme {self.weighting_scheme!r}; choose one of {', '.join(WEIGHTING_SCHEMES)}"
            )

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Sigmas ``(batch,)`` on the scheduler's grid for density samples ``u`` in ``[0, 1)``."""
        indices = (u * len(self.sigmas)).long().clamp(0, len(self.sigmas) - 1)
        return self.sigmas[indices]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sigma ``(1,)`` drawn from the scheme's density with ``generator`` (on CPU, for reproducibility)."""
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme,
            batch_size=1,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        return self.from_uniform(u)

    def weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights ``(batch,)`` for ``sigmas`` ``(batch,)``."""
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=sigmas).float()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """``mean((w * (pred - target)^2)`` over all but the batch dim, in fp32: ``(batch,)``.

    Args:
        pred, target: ``(batch, ...)``, same shape.
        weighting: ``(batch,)`` per-sample weights.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if weighting.numel() != pred.shape[0]:
        raise ValueError(
            f"weighting {tuple(weighting.shape)} must hold one weight per sample of the batch of {pred.shape[0]}"
        )
    w = weighting.float().reshape(-1, *([1] * (pred.dim() - 1)))
    return (w * (pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


@dataclass
class DistillLosses:
    """The batch-mean losses of one micro-batch; ``total`` carries the gradient."""

    total: torch.Tensor
    fm: torch.Tensor
    out: torch.Tensor
    attn: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_fm": float(self.fm),
            "loss_out": float(self.out),
            "loss_attn": float(self.attn),
        }


def distill_losses(
    student_velocity: torch.Tensor,
    teacher_velocity: torch.Tensor,
    flow_target: torch.Tensor,
    student_attention: Sequence[torch.Tensor],
    teacher_attention: Sequence[torch.Tensor],
    weighting: torch.Tensor,
    out_weight: float = 0.5,
    attn_weight: float = 0.5,
    fm_weight: float = 1.0,
) -> DistillLosses:
    """``fm_weight * L_fm + out_weight * L_out + attn_weight * L_attn``, per sample weighted, batch-averaged.

    Args:
        student_velocity, teacher_velocity, flow_target: ``(batch, seq, channels)`` packed velocities;
            the flow-matching target is ``noise - x0``.
        student_attention, teacher_attention: attention outputs of the aligned layers, each
            ``(batch, tokens, dim)``; ``L_attn`` is the mean over layers (0 when no layer is aligned).
        weighting: ``(batch,)`` from :meth:`TimestepSampler.weighting`.
    """
    if len(student_attention) != len(teacher_attention):
        raise ValueError(
            f"{len(student_attention)} student and {len(teacher_attention)} teacher attention outputs to align"
        )
    fm = weighted_mse(student_velocity, flow_target, weighting)
    out = weighted_mse(student_velocity, teacher_velocity.detach(), weighting)
    if student_attention:
        per_layer = [
            weighted_mse(s, t.detach(), weighting) for s, t in zip(student_attention, teacher_attention, strict=True)
        ]
        attn = torch.stack(per_layer).mean(dim=0)
    else:
        attn = torch.zeros_like(fm)
    total = fm_weight * fm + out_weight * out + attn_weight * attn
    return DistillLosses(total=total.mean(), fm=fm.detach().mean(), out=out.detach().mean(), attn=attn.detach().mean())
