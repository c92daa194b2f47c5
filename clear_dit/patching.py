"""``patch`` / ``unpatch``: install CLEAR processors on a diffusers transformer (or pipeline)."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .attention import available_backends
from .backends import BACKENDS
from .mask import check_window_config
from .processors import CLEARFluxAttnProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "PatchHandle",
    "patch",
    "patch_handle",
    "unpatch",
    "resolve_transformer",
    "image_grid_from_ids",
    "SUPPORTED_MODELS",
]

SUPPORTED_MODELS: tuple[type[nn.Module], ...] = (FluxTransformer2DModel,)
_HANDLE_ATTR = "_clear_dit_patch"


def resolve_transformer(pipe_or_transformer: Any) -> nn.Module:
    """The transformer of a pipeline, or the model itself; a clear error for anything unsupported."""
    model = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(model, SUPPORTED_MODELS):
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(
            f"clear_dit cannot patch {type(model).__name__}; supported transformers: {supported} "
            "(or a pipeline whose .transformer is one of them)"
        )
    return model


def image_grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of the row-major image grid described by FLUX ``img_ids`` ``([batch,] h*w, 3)``."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    last = ids[-1, 1:3].tolist()
    h, w = int(last[0]) + 1, int(last[1]) + 1
    if h * w != ids.shape[0]:
        raise ValueError(
            f"img_ids of {ids.shape[0]} tokens do not describe a row-major grid ending at row {h - 1}, col {w - 1}"
        )
    return h, w


@dataclass
class PatchHandle:
    """What :func:`patch` installed; ``unpatch()`` (or leaving the ``with`` block) restores the model exactly."""

    transformer: nn.Module = field(repr=False)
    window_size: int
    down_factor: int
    backend: str
    proportional_attention: bool
    num_layers: int
    _original_processors: dict[str, Any] = field(repr=False)
    _hook: torch.utils.hooks.RemovableHandle = field(repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "down_factor": self.down_factor,
            "backend": self.backend,
            "proportional_attention": self.proportional_attention,
        }

    @property
    def processors(self) -> dict[str, CLEARFluxAttnProcessor]:
        return dict(self.transformer.attn_processors)

    def unpatch(self) -> None:
        if getattr(self.transformer, _HANDLE_ATTR, None) is not self:
            return
        self._hook.remove()
        self.transformer.set_attn_processor(dict(self._original_processors))
        delattr(self.transformer, _HANDLE_ATTR)

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()


def _grid_hook(forward_params: list[str]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(forward_params, args, strict=False)), **kwargs}
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            raise ValueError("a CLEAR-patched FLUX transformer needs `img_ids` to know the image token grid")
        joint = dict(kwargs.get("joint_attention_kwargs") or {})
        joint["clear_grid"] = image_grid_from_ids(img_ids)
        kwargs["joint_attention_kwargs"] = joint
        return (), kwargs

    return hook


def patch(
    pipe_or_transformer: Any,
    window_size: int = 16,
    down_factor: int = 1,
    backend: str = "auto",
    proportional_attention: bool = False,
) -> PatchHandle:
    """Install CLEAR attention on every attention layer of a FLUX transformer.

    Args:
        pipe_or_transformer: a ``FluxTransformer2DModel`` or a pipeline with one as ``.transformer``.
        window_size: radius ``r`` in tokens (16 = 256 px at FLUX's 16 px per token).
        down_factor: ``d > 1`` adds ``d x d`` pooled keys/values with a learnable ``spatial_weight``.
        backend: attention backend name, or ``"auto"``.
        proportional_attention: softmax scale for resolutions above the training one.

    Returns:
        A :class:`PatchHandle`; ``with clear_dit.patch(pipe): ...`` unpatches on exit. Patching a
        patched model first restores its original processors.
    """
    transformer = resolve_transformer(pipe_or_transformer)
    check_window_config(window_size, down_factor)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend != "auto" and backend not in available_backends(transformer.device, transformer.dtype):
        logger.warning("backend %r is not available for %s/%s", backend, transformer.device, transformer.dtype)
    unpatch(transformer)

    originals = dict(transformer.attn_processors)
    reference = next(transformer.parameters())
    processors = {
        name: CLEARFluxAttnProcessor(window_size, down_factor, backend, proportional_attention).to(
            device=reference.device, dtype=reference.dtype
        )
        for name in originals
    }
    transformer.set_attn_processor(processors)
    forward_params = list(inspect.signature(transformer.forward).parameters)
    hook = transformer.register_forward_pre_hook(_grid_hook(forward_params), with_kwargs=True)
    handle = PatchHandle(
        transformer=transformer,
        window_size=window_size,
        down_factor=down_factor,
        backend=backend,
        proportional_attention=proportional_attention,
        num_layers=len(originals),
        _original_processors=originals,
        _hook=hook,
    )
    setattr(transformer, _HANDLE_ATTR, handle)
    logger.info("patched %d attention layers with CLEAR (%s)", handle.num_layers, handle.config)
    return handle


def patch_handle(pipe_or_transformer: Any) -> PatchHandle | None:
    """The active :class:`PatchHandle` of a model, or ``None`` when it is not patched."""
    return getattr(resolve_transformer(pipe_or_transformer), _HANDLE_ATTR, None)


def unpatch(pipe_or_transformer: Any) -> None:
    """Restore the processors a model had before :func:`patch`; a no-op on an unpatched model."""
    handle = patch_handle(pipe_or_transformer)
    if handle is not None:
        handle.unpatch()
