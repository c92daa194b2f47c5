"""The CLEAR student and its full-attention teacher, held in ONE transformer.

The student is the teacher model patched with CLEAR processors; only the attention projections (and the
pooling ``spatial_weight``) train (DESIGN.md 1.3), or a LoRA adapter on those projections. The teacher is
the same module run with its original processors and its original projection weights: a frozen copy of only
the trainable tensors is swapped in for the teacher's forward (or the LoRA adapters are disabled), so memory
is one model plus the trainable part instead of two models. ``teacher="copy"`` keeps a second full model
instead, as the official training code does; it exists to measure the difference (benchmarks/distill.py).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import clear_dit
from clear_dit.patching import set_processors
from clear_dit.weights import is_clear_key

logger = logging.getLogger(__name__)

__all__ = ["LORA_TARGETS", "TEACHER_MODES", "AttentionCapture", "Student", "attention_layer_names"]

#: The projections CLEAR retrains, as peft target module names.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEACHER_MODES = ("shared", "copy")


def attention_layer_names(transformer: nn.Module) -> list[str]:
    """Module names of the attention layers in execution order (FLUX: double blocks, then single blocks)."""
    return [name.removesuffix(".processor") for name in transformer.attn_processors]


def selected_layer_names(model: nn.Module, layers: Sequence[int] | None) -> list[str]:
    """The names of ``layers`` (indices into :func:`attention_layer_names`), once each, in execution order."""
    names = attention_layer_names(model)
    if layers is None:
        layers = range(len(names))
    bad = [i for i in layers if not -len(names) <= i < len(names)]
    if bad:
        raise ValueError(f"attention layers {bad} out of range: the model has {len(names)} (0..{len(names) - 1})")
    return [names[i] for i in sorted({i % len(names) for i in layers})]


class AttentionCapture:
    """Forward hooks that record the outputs of chosen attention layers while :meth:`recording` is active.

    A layer's output is ``(batch, text + image tokens, dim)``: the joint blocks' ``(image, text)`` pair is
    concatenated text first, as the single blocks lay it out. Outside :meth:`recording` (e.g. when gradient
    checkpointing recomputes a block during backward) the hooks record nothing.

    Args:
        model: the transformer to hook.
        layers: indices into :func:`attention_layer_names` (negative allowed); ``None`` is every layer.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        self.names = selected_layer_names(model, layers)
        modules = dict(model.named_modules())
        self._outputs: list[torch.Tensor] | None = None
        self._handles = [modules[name].register_forward_hook(self._hook) for name in self.names]

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._outputs is None:
            return
        if isinstance(output, tuple):
            image, text = output
            output = torch.cat([text, image], dim=1)
        self._outputs.append(output)

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Yields the list the hooked layers append their outputs to, in execution order."""
        self._outputs = []
        try:
            yield self._outputs
        finally:
            self._outputs = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class _FullAttention:
    """The teacher's processor: the layer's original full-attention processor, ignoring CLEAR's grid kwargs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        clear_grid: tuple[int, int] | None = None,
        clear_reference_grid: tuple[int, int] | None = None,
    ) -> Any:
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class Student:
    """A FLUX transformer turned into a trainable CLEAR student that can still act as its own teacher.

    Args:
        transformer: the teacher ``FluxTransformer2DModel`` (weights in their storage dtype); it is patched
            in place and its non-trainable parameters are frozen.
        window_size, down_factor, backend: the CLEAR configuration (see :func:`clear_dit.patch`).
        lora_rank: train a LoRA adapter of this rank on :data:`LORA_TARGETS` instead of the projections.
        attn_layers: attention layers aligned by ``L_attn`` (indices, see :class:`AttentionCapture`);
            ``None`` is all, ``[]`` none.
        teacher: ``"shared"`` (one model, frozen copy of the trainable tensors) or ``"copy"`` (two models).
        trainable_dtype: dtype of the trainable tensors (fp32 master weights under mixed precision);
            ``None`` keeps the model's.
        seed: seeds the LoRA's random initialisation (peft draws it from torch's global generator), so that a
            run is a function of its settings.
    """

    def __init__(
        self,
        transformer: nn.Module,
        *,
        window_size: int,
        down_factor: int = 1,
        backend: str = "auto",
        lora_rank: int | None = None,
        attn_layers: Sequence[int] | None = None,
        teacher: str = "shared",
        trainable_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        if teacher not in TEACHER_MODES:
            raise ValueError(f"teacher must be one of {', '.join(TEACHER_MODES)}, got {teacher!r}")
        if lora_rank is not None and lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive int, got {lora_rank}")
        if clear_dit.patch_handle(transformer) is not None:
            raise ValueError(
                "the transformer is already CLEAR-patched: pass the full-attention teacher (clear_dit.unpatch it first)"
            )
        selected_layer_names(transformer, attn_layers)  # refused before the model is changed
        self.transformer = transformer
        self.lora_rank = lora_rank
        transformer.requires_grad_(False)
        self._teacher_model = copy.deepcopy(transformer) if teacher == "copy" else None
        self._full_processors = {name: _FullAttention(p) for name, p in transformer.attn_processors.items()}

        self.handle = clear_dit.patch(transformer, window_size=window_size, down_factor=down_factor, backend=backend)
        self._clear_processors = dict(transformer.attn_processors)
        if lora_rank is not None:
            from peft import LoraConfig

            with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
                torch.manual_seed(seed)
                transformer.add_adapter(
                    LoraConfig(
                        r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
                    )
                )
        self._trainable = {
            name: p for name, p in transformer.named_parameters() if self._is_trainable(name, lora_rank is not None)
        }
        # The teacher's projection weights, in their storage dtype, taken before any upcast.
        self._teacher_tensors = {}
        if teacher == "shared" and lora_rank is None:
            self._teacher_tensors = {
                name: p.detach().clone() for name, p in self._trainable.items() if "spatial_weight" not in name
            }
        for p in self._trainable.values():
            p.requires_grad_(True)
            if trainable_dtype is not None:
                p.data = p.data.to(trainable_dtype)

        self.capture = AttentionCapture(transformer, attn_layers)
        teacher_model = self._teacher_model or transformer
        self.teacher_capture = (
            AttentionCapture(teacher_model, attn_layers) if self._teacher_model is not None else self.capture
        )
        logger.info(
            "CLEAR student: %d trainable tensors (%.2fM values, %s), teacher %s, %d attention layers aligned",
            len(self._trainable),
            sum(p.numel() for p in self._trainable.values()) / 1e6,
            f"LoRA rank {lora_rank}" if lora_rank else "attention projections",
            teacher,
            len(self.capture.names),
        )

    @staticmethod
    def _is_trainable(name: str, lora: bool) -> bool:
        if name.endswith("processor.spatial_weight"):
            return True
        if lora:
            return ".lora_A." in name or ".lora_B." in name
        return is_clear_key(name)

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by state-dict name."""
        return dict(self._trainable)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._trainable.items()}

    def load_trainable_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`trainable_state_dict`) into the trainable parameters."""
        missing = sorted(set(self._trainable) - set(tensors))
        unexpected = sorted(set(tensors) - set(self._trainable))
        if missing or unexpected:
            raise ValueError(
                f"trainable state does not match this student: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); saved with another --window/--down/--lora-rank?"
            )
        with torch.no_grad():
            for name, p in self._trainable.items():
                p.copy_(tensors[name])

    @contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """The full-attention teacher model with its original weights, under ``torch.no_grad``.

        In shared mode the transformer itself is yielded, switched to its original processors and weights for
        the duration of the block; it is the student again afterwards, bit for bit.
        """
        if self._teacher_model is not None:
            with torch.no_grad():
                yield self._teacher_model
            return
        model = self.transformer
        set_processors(model, self._full_processors)
        stash = {}
        try:
            if self.lora_rank is not None:
                model.disable_adapters()
            for name, tensor in self._teacher_tensors.items():
                stash[name] = self._trainable[name].data
                self._trainable[name].data = tensor
            with torch.no_grad():
                yield model
        finally:
            for name, tensor in stash.items():
                self._trainable[name].data = tensor
            if self.lora_rank is not None:
                model.enable_adapters()
            set_processors(model, self._clear_processors)

    def export(self, path: str | os.PathLike, overwrite: bool = False, base_model: str | None = None) -> Path:
        """Write the student's CLEAR weights with :func:`clear_dit.save_weights` (published key layout).

        A LoRA adapter is merged into the projections for good first, so call this last: afterwards the model
        is a plain patched CLEAR transformer and can no longer act as the teacher.
        """
        if self.lora_rank is not None and getattr(self.transformer, "_hf_peft_config_loaded", False):
            self._merge_lora_in_float32()
            self._teacher_tensors = {}
        return clear_dit.save_weights(self.transformer, path, overwrite=overwrite, base_model=base_model)

    def _merge_lora_in_float32(self) -> None:
        """Merge the adapter into float32 projections, which the export then holds: merged in bf16, the small
        deltas of a short run round away (half of them after a few steps at lr 1e-4). Warns when the merged
        weights, run in the model's 16-bit dtype, would lose much of the trained change all the same."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        low = next((m.base_layer.weight.dtype for m in layers if m.base_layer.weight.dtype != torch.float32), None)
        for layer in layers:
            layer.to(torch.float32)
        bases = [(layer.base_layer, layer.base_layer.weight.detach().clone()) for layer in layers]
        self.transformer.fuse_lora()  # into the base layers' weights, which unload_lora puts back in place
        self.transformer.unload_lora()
        if low is None:
            return
        with torch.no_grad():
            change = sum(float((linear.weight - before).square().sum()) for linear, before in bases) ** 0.5
            lost = sum(float((lin.weight.to(low).float() - lin.weight).square().sum()) for lin, _ in bases) ** 0.5
        if change and lost > 0.1 * change:
            logger.warning(
                "the exported LoRA student is float32: in %s, its merged projections would lose %.0f%% of the "
                "trained change (the LoRA's deltas are below %s's resolution); run it in float32 or float16, or "
                "train the projections themselves (no --lora-rank)",
                low,
                100 * lost / change,
                low,
            )
