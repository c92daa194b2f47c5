"""``patch`` / ``unpatch``: install CLEAR processors on diffusers transformers, ControlNets and pipelines.

What can be patched is one table, :data:`MODEL_FAMILIES`: for each family the model classes, the
processor that replaces their attention, and how the image token grid is read from a forward call.
A pipeline is patched through its ``transformer`` and ``controlnet`` components (a
``FluxMultiControlNetModel`` through each of its nets).
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    ContextParallelConfig,
    FluxControlNetModel,
    FluxMultiControlNetModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn
from torch.utils.hooks import RemovableHandle

from .attention import available_backends
from .backends import BACKENDS
from .mask import check_window_config
from .processors import CLEARAttnProcessor, CLEARFluxAttnProcessor, CLEARJointAttnProcessor

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FAMILIES",
    "ModelFamily",
    "PIPELINE_COMPONENTS",
    "PatchHandle",
    "SUPPORTED_MODELS",
    "check_patch_settings",
    "image_grid_from_ids",
    "image_grids_from_ids",
    "patch",
    "patch_handle",
    "patchable_models",
    "resolve_transformer",
    "unpatch",
]

_HANDLE_ATTR = "_clear_dit_patch"

#: Pipeline attributes that hold models to patch, in this order.
PIPELINE_COMPONENTS = ("transformer", "controlnet")


def image_grids_from_ids(img_ids: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """``(grid, reference_grid)`` described by FLUX ``img_ids`` ``([batch,] n, 3)``.

    Target tokens have ``img_ids[:, 0] == 0`` and come first; FLUX Kontext appends reference-image tokens
    with ``img_ids[:, 0] == 1`` (``reference_grid`` is ``None`` without them). Each group is a row-major
    grid whose last token sits at ``(h - 1, w - 1)``. Reads the ids with one device sync.
    """
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    is_target = ids[:, 0] == 0
    first_row = ids[:, 1] == 0  # exact in any dtype (bf16 rounds ids above 256: the grid's widths come from row 0)
    n_target, w, wr = is_target.sum(), (is_target & first_row).sum(), (~is_target & first_row).sum()
    # the ids diffusers builds for such grids (integers cast to the ids' dtype), token for token, on the device:
    # one sync in all (torch.compile breaks its graph once, where the grid is read)
    index = torch.arange(ids.shape[0], device=ids.device)
    local = torch.where(is_target, index, index - n_target)
    width = torch.where(is_target, w, wr).clamp(min=1)
    expected = torch.stack([local // width, local % width], dim=1).to(torch.float32).to(ids.dtype)
    stats = torch.stack(
        [
            n_target,
            torch.diff(is_target.long()).clamp(min=0).sum(),  # a target token after a reference token
            w,
            wr,
            (ids[:, 1:] != expected).any(dim=1).sum(),
        ]
    ).tolist()
    n_target, misplaced, w, wr, wrong = (int(v) for v in stats)
    n_reference = ids.shape[0] - n_target
    h, hr = (n_target // w if w else 0), (n_reference // wr if wr else 0)
    valid = not misplaced and not wrong and h * w == n_target > 0 and (not n_reference or hr * wr == n_reference)
    if not valid:
        raise ValueError(
            f"img_ids of {ids.shape[0]} tokens do not describe a row-major grid {h}x{w} (rows of {w} tokens)"
            + (f" followed by a reference grid {hr}x{wr}" if n_reference else "")
        )
    return (h, w), ((hr, wr) if n_reference else None)


def image_grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int]:
    """``(h, w)`` of the row-major image grid described by FLUX ``img_ids`` ``([batch,] h*w, 3)``."""
    grid, reference = image_grids_from_ids(img_ids)
    if reference is not None:
        raise ValueError("img_ids hold a reference image (FLUX Kontext): use image_grids_from_ids")
    return grid


def _flux_grids(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    img_ids = inputs.get("img_ids")
    if img_ids is None:
        raise ValueError(f"a CLEAR-patched {type(model).__name__} needs `img_ids` to know the image token grid")
    grid, reference = image_grids_from_ids(img_ids)
    return {"clear_grid": grid, "clear_reference_grid": reference}


def _sd3_grids(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    latents = inputs.get("hidden_states")
    if latents is None or latents.dim() != 4:
        raise ValueError(
            f"a CLEAR-patched {type(model).__name__} needs latent `hidden_states` (batch, channels, height, width) "
            "to know the image token grid"
        )
    p = model.config.patch_size
    return {"clear_grid": (int(latents.shape[-2]) // p, int(latents.shape[-1]) // p)}


@dataclass(frozen=True)
class ModelFamily:
    """How to patch one diffusers model class.

    Attributes:
        model: the model class.
        processor: the :class:`~clear_dit.processors.CLEARAttnProcessor` subclass installed on every attention.
        grid_kwargs: ``(model, forward kwargs) -> attention kwargs`` (``clear_grid``, ...), run before each forward.
        forwards_attention_kwargs: the model hands its ``joint_attention_kwargs`` to every attention call, so the
            grid travels with them (also through gradient checkpointing); otherwise (``FluxControlNetModel``)
            a pre-hook on each attention module adds the grid of the model's current call.
        replaces: the diffusers processors CLEAR stands in for; any other (IP-Adapter, PAG, custom) does more
            than attention and is refused rather than silently dropped.
        refused_methods: model methods that would silently replace CLEAR by full attention while patched.
    """

    model: type[nn.Module]
    processor: type[CLEARAttnProcessor]
    grid_kwargs: Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
    replaces: tuple[type, ...]
    forwards_attention_kwargs: bool = True
    refused_methods: tuple[str, ...] = ()


MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(FluxTransformer2DModel, CLEARFluxAttnProcessor, _flux_grids, (FluxAttnProcessor,)),
    ModelFamily(
        FluxControlNetModel, CLEARFluxAttnProcessor, _flux_grids, (FluxAttnProcessor,), forwards_attention_kwargs=False
    ),
    # SD3's fuse/unfuse swap processors wholesale (FusedJointAttnProcessor2_0 / the saved pre-fusion ones);
    # fusing keeps to_q/to_k/to_v, which CLEAR uses, so a model fused before patch() is fine
    ModelFamily(
        SD3Transformer2DModel,
        CLEARJointAttnProcessor,
        _sd3_grids,
        (JointAttnProcessor2_0, FusedJointAttnProcessor2_0),
        refused_methods=("fuse_qkv_projections", "unfuse_qkv_projections"),
    ),
)
SUPPORTED_MODELS: tuple[type[nn.Module], ...] = tuple(family.model for family in MODEL_FAMILIES)


def _family(model: nn.Module) -> ModelFamily:
    for family in MODEL_FAMILIES:
        if isinstance(model, family.model):
            return family
    supported = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
    raise ValueError(
        f"clear_dit cannot patch {type(model).__name__}; supported transformers: {supported} "
        f"(or a pipeline whose .{' / .'.join(PIPELINE_COMPONENTS)} are among them)"
    )


def _expand(model: nn.Module) -> list[nn.Module]:
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model patches its original module
    return [getattr(m, "_orig_mod", m) for m in model.nets] if isinstance(model, FluxMultiControlNetModel) else [model]


def patchable_models(pipe_or_model: Any) -> list[nn.Module]:
    """The models :func:`patch` acts on: a pipeline's transformer and ControlNet(s), or the model itself.

    Raises a one-line ``ValueError`` naming the class when one of them is not supported.
    """
    if isinstance(pipe_or_model, nn.Module):
        models = _expand(pipe_or_model)
    else:
        components = [getattr(pipe_or_model, name, None) for name in PIPELINE_COMPONENTS]
        models = [m for component in components if component is not None for m in _expand(component)]
    for model in models or [pipe_or_model]:
        _family(model)
    return list({id(model): model for model in models}.values())  # a net listed twice is patched once


def resolve_transformer(pipe_or_transformer: Any) -> nn.Module:
    """The transformer of a pipeline (the model that CLEAR weights belong to), or the model itself."""
    model = _expand(getattr(pipe_or_transformer, "transformer", pipe_or_transformer))[0]
    _family(model)
    return model


@dataclass(eq=False)
class _ModelPatch:
    """One patch of one model: what it installs, and what to bring back when it ends.

    A patch of a patched model covers the one ``below`` it, which resumes when this one ends (nested ``with``
    blocks) unless its handle has ended meanwhile; ``original_processors`` are the model's from before any patch.
    """

    model: nn.Module
    family: ModelFamily
    original_processors: dict[str, Any]
    processors: dict[str, nn.Module]
    below: tuple[PatchHandle, _ModelPatch] | None = None
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    guarded: list[str] = field(default_factory=list)

    def install(self) -> None:
        """Put this patch's processors, grid hooks and guards on the model (each recorded as it goes on, so that
        :meth:`suspend` takes off what a failure half-way put on)."""
        set_processors(self.model, self.processors)
        attention_names = [name.removesuffix(".processor") for name in self.processors]
        self.hooks, self.guarded = [], []
        _add_grid_hooks(self.model, self.family, attention_names, self.hooks)
        _add_guards(self.model, self.family, self.guarded)

    def suspend(self) -> None:
        """Take this patch's hooks and guards off (a patch above it takes over the model)."""
        for hook in self.hooks:
            hook.remove()
        for name in self.guarded:
            self.model.__dict__.pop(name, None)
        self.hooks, self.guarded = [], []

    def restore(self) -> None:
        """End this patch: the nearest patch below that its handle still holds resumes, else the originals."""
        self.suspend()
        below = self.below
        while below is not None and below[0]._record(self.model) is not below[1]:  # its handle has ended it
            below = below[1].below
        if below is not None:
            below[1].install()
            setattr(self.model, _HANDLE_ATTR, below[0])
            return
        set_processors(self.model, self.original_processors)
        vars(self.model).pop(_HANDLE_ATTR, None)  # not set yet when a patch fails half-way


def set_processors(model: nn.Module, processors: dict[str, Any]) -> None:
    """Install ``processors`` (``{"...processor": processor}``, as ``model.attn_processors`` names them), also on a
    patched model, whose ``set_attn_processor`` :func:`patch` refuses: for code that swaps CLEAR's processors out
    on purpose and puts them back (the shared teacher, the band-parallel runner)."""
    # layer by layer: set_attn_processor refuses a dict once a loader has added attention layers
    for name, processor in processors.items():
        model.get_submodule(name.removesuffix(".processor")).set_processor(processor)


@dataclass
class PatchHandle:
    """What :func:`patch` installed; ``unpatch()`` (or leaving the ``with`` block) restores the models exactly.

    ``transformer`` is the first patched model (a pipeline's transformer); ``models`` lists all of them
    (with a ControlNet pipeline, the ControlNet(s) too); ``num_layers`` counts their attention layers.
    """

    transformer: nn.Module = field(repr=False)
    window_size: int
    down_factor: int
    backend: str
    proportional_attention: bool
    num_layers: int
    _patches: list[_ModelPatch] = field(repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "down_factor": self.down_factor,
            "backend": self.backend,
            "proportional_attention": self.proportional_attention,
        }

    @property
    def models(self) -> list[nn.Module]:
        """The models this handle patched and has not ended (a newer patch may cover them for now)."""
        return [p.model for p in self._patches]

    @property
    def processors(self) -> dict[str, CLEARAttnProcessor]:
        """This handle's processors of ``transformer`` (empty once the handle has ended)."""
        record = self._record(self.transformer)
        return dict(record.processors) if record is not None else {}

    def _record(self, model: nn.Module) -> _ModelPatch | None:
        """This handle's patch of ``model``; ``None`` when it did not patch it or has ended that patch."""
        return next((p for p in self._patches if p.model is model), None)

    def _release(self, model: nn.Module) -> None:
        """End this handle's patch of one model (unpatched on its own)."""
        record = self._record(model)
        if record is not None:
            record.restore()
            self._patches.remove(record)

    def unpatch(self) -> None:
        for p in self._patches:
            if getattr(p.model, _HANDLE_ATTR, None) is self:
                p.restore()
        self._patches.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()


def _add_grid_hooks(
    model: nn.Module, family: ModelFamily, attention_names: list[str], hooks: list[RemovableHandle]
) -> None:
    """Add to ``hooks`` a forward pre-hook on ``model`` that reads the grid of each call and brings it to every CLEAR
    processor (and, for models that do not pass it on, one per attention layer)."""
    forward_params = list(inspect.signature(model.forward).parameters)
    current: dict[str, Any] = {}  # grid kwargs of the model's current call, for models that do not forward them

    def read_grid(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = {**dict(zip(forward_params, args, strict=False)), **kwargs}
        grid_kwargs = family.grid_kwargs(module, kwargs)
        if family.forwards_attention_kwargs:
            # a copy: never mutate the caller's dict
            kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}), **grid_kwargs}
        else:
            if getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
                # its recomputation in backward would read the grid of the model's latest call, not of this one
                raise ValueError(
                    f"a CLEAR-patched {type(module).__name__} cannot train with gradient checkpointing: "
                    "disable_gradient_checkpointing() first"
                )
            current.clear()
            current.update(grid_kwargs)
        return (), kwargs

    def add_grid(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, **current}

    hooks.append(model.register_forward_pre_hook(read_grid, with_kwargs=True))
    if not family.forwards_attention_kwargs:
        for name in attention_names:
            hooks.append(model.get_submodule(name).register_forward_pre_hook(add_grid, with_kwargs=True))


def _refuse_attention_backend(model: nn.Module, backend: str) -> None:
    """``set_attention_backend`` of a patched model: only ``"native"`` (a no-op for CLEAR) is accepted."""
    if str(getattr(backend, "value", backend)).lower() == "native":  # diffusers' AttentionBackendName too
        type(model).set_attention_backend(model, backend)
        return
    raise ValueError(
        f"set_attention_backend({backend!r}) would compute full attention in the CLEAR-patched "
        f"{type(model).__name__}; choose a CLEAR backend with clear_dit.patch(..., backend=NAME) "
        f"(available: {', '.join(available_backends())}) or call clear_dit.unpatch(...) first"
    )


def _is_context_parallel(config: Any) -> bool:
    return isinstance(config, ContextParallelConfig) or getattr(config, "context_parallel_config", None) is not None


def _context_parallel_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"diffusers context parallelism splits the sequence of {type(model).__name__} for full attention, "
        "which CLEAR cannot follow; use pipelines.parallel for patch-parallel CLEAR inference"
    )


def _refuse_context_parallelism(model: nn.Module, *, config: Any, cp_plan: Any = None) -> None:
    """``enable_parallelism`` of a patched model: tensor parallelism (head sharding) only."""
    if _is_context_parallel(config):
        raise _context_parallel_error(model)
    type(model).enable_parallelism(model, config=config, cp_plan=cp_plan)


def _refuse(method: str) -> Callable[..., None]:
    def refused(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            f"{method}() on the CLEAR-patched {type(model).__name__} would replace CLEAR by full attention; "
            "call clear_dit.unpatch(...) first (and patch again afterwards)"
        )

    return refused


def _refuse_ip_adapter(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise ValueError(
        f"load_ip_adapter() on the CLEAR-patched {type(model).__name__}: CLEAR does not run IP-Adapters (their "
        "processors attend with full attention, and patch() refuses to drop them); use the IP-Adapter on an "
        "unpatched model (clear_dit.unpatch(...) first)"
    )


def _refuse_pag(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise ValueError(
        f"perturbed-attention guidance puts full-attention PAG processors on the CLEAR-patched "
        f"{type(model).__name__}: call the pipeline with pag_scale=0, or clear_dit.unpatch(pipe) first"
    )


def _pipeline_guard(method: str, refuse: Callable[..., None]) -> Callable[..., Any]:
    """A pipeline's ``method`` refused by ``refuse`` while its transformer is patched, else diffusers' own: refused
    before it changes anything (load_ip_adapter loads and attaches the image encoder before the model's guard)."""

    def guarded(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        model = resolve_transformer(pipe)
        if patch_handle(model) is not None:
            refuse(model)
        pipe.__dict__.pop(method, None)  # unpatched meanwhile (through the model): diffusers' own method
        return getattr(pipe, method)(*args, **kwargs)

    return guarded


#: Pipeline methods that would put full-attention processors on a patched transformer: diffusers' IP-Adapter
#: loading and unloading (which rebuilds every processor with its class's no-argument constructor) and PAG
#: pipelines' processor swap (a plain object assigned over the CLEAR processor module: torch's bare TypeError).
PIPELINE_GUARDS: dict[str, Callable[..., None]] = {
    "load_ip_adapter": _refuse_ip_adapter,
    "unload_ip_adapter": _refuse("unload_ip_adapter"),
    "_set_pag_attn_processor": _refuse_pag,
}


#: What (enable|disable)_xformers_memory_efficient_attention (on a model or its pipeline) and
#: (enable|disable)_(npu|xla)_flash_attention call: on SD3 they swap every processor for another full-attention one
#: (disable: AttnProcessor2_0, not even joint attention), on FLUX they set an attention backend CLEAR cannot run.
ATTENTION_SWITCHES = (
    "set_use_memory_efficient_attention_xformers",
    "set_use_npu_flash_attention",
    "set_use_xla_flash_attention",
)


def _add_guards(model: nn.Module, family: ModelFamily, guarded: list[str]) -> None:
    """Shadow the model's methods that would silently undo CLEAR by refusing ones (instance attributes), each
    named in ``guarded`` before it is set."""
    guards: dict[str, Callable[..., None]] = {
        "set_attention_backend": _refuse_attention_backend,
        "enable_parallelism": _refuse_context_parallelism,
        # what the pipelines' load_ip_adapter() calls: it puts IP-Adapter processors (full attention) on every layer
        "_load_ip_adapter_weights": _refuse_ip_adapter,
        # any other full-attention processor: it ran while patch_handle() still reported the patch
        "set_attn_processor": _refuse("set_attn_processor"),
        **{name: _refuse(name) for name in (*family.refused_methods, *ATTENTION_SWITCHES)},
    }
    for name, fn in guards.items():
        if hasattr(model, name):
            guarded.append(name)
            setattr(model, name, types.MethodType(fn, model))


def _check_replaceable(model: nn.Module) -> None:
    """Refuse models whose attention processors do more than attention (checked before anything is patched)."""
    family = _family(model)
    if _is_context_parallel(getattr(model, "_parallel_config", None)):
        raise _context_parallel_error(model)
    handle = getattr(model, _HANDLE_ATTR, None)
    record = handle._record(model) if handle is not None else None
    processors = record.original_processors if record is not None else model.attn_processors
    for name, processor in processors.items():
        if not isinstance(processor, family.replaces):
            raise ValueError(
                f"clear_dit.patch would drop the {type(processor).__name__} of {type(model).__name__}.{name} "
                f"(CLEAR replaces {', '.join(cls.__name__ for cls in family.replaces)}): unload IP-Adapters or "
                "custom processors first"
            )


def _reference_parameter(model: nn.Module) -> torch.Tensor:
    """The parameter whose device and dtype the processors take: the first floating one (a quantized model
    stores some weights as integers)."""
    return next(p for p in model.parameters() if p.is_floating_point())


def _check_offload(model: nn.Module, down_factor: int) -> None:
    """Under sequential CPU offload parameters live on the meta device and accelerate's hooks hold their data:
    new pooling weights (``down_factor > 1``) would get none."""
    if down_factor > 1 and _reference_parameter(model).device.type == "meta":
        raise ValueError(
            f"{type(model).__name__} is under sequential CPU offload (parameters on the meta device), where the "
            "pooling weights of down_factor > 1 get no data: patch before enable_sequential_cpu_offload(), "
            "or use enable_model_cpu_offload()"
        )


def _pooling(processor: Any) -> torch.Tensor | None:
    return getattr(processor, "spatial_weight", None)


def _patch_model(model: nn.Module, make_processor: Callable[[type[CLEARAttnProcessor]], nn.Module]) -> _ModelPatch:
    family = _family(model)
    previous = getattr(model, _HANDLE_ATTR, None)
    below = None
    originals = dict(model.attn_processors)
    pooling: dict[str, torch.Tensor] = {}  # a re-patch keeps trained (loaded) pooling weights of the same size
    if previous is not None:
        record = previous._record(model)
        pooling = {name: p.spatial_weight for name, p in originals.items() if _pooling(p) is not None}
        below, originals = (previous, record), record.original_processors
    reference = _reference_parameter(model)
    # diffusers' model.dtype: the compute dtype under enable_layerwise_casting (whose fp8 storage would round the
    # pooling weights), else the first floating parameter's
    dtype = model.dtype if model.dtype.is_floating_point else reference.dtype
    processors = {name: make_processor(family.processor).to(device=reference.device, dtype=dtype) for name in originals}
    with torch.no_grad():
        for name, processor in processors.items():
            kept = pooling.get(name)
            if kept is not None and _pooling(processor) is not None and kept.shape == processor.spatial_weight.shape:
                processor.spatial_weight.copy_(kept)
    patched = _ModelPatch(model, family, originals, processors, below)
    try:
        if below is not None:
            below[1].suspend()  # only now: a failure building the processors (out of memory) leaves it in place
        patched.install()
    except BaseException:
        patched.restore()
        raise
    return patched


def check_patch_settings(
    window_size: int, down_factor: int = 1, backend: str = "auto", proportional_attention: bool = False
) -> tuple[int, int]:
    """Raise the one-line ``ValueError`` :func:`patch` raises for these settings, without a model: for callers that
    patch later (after a long first stage) and want bad settings to fail first. Returns ``(window_size,
    down_factor)`` as Python ints."""
    window_size, down_factor = check_window_config(window_size, down_factor)
    if backend != "auto" and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; known backends: 'auto', {', '.join(map(repr, BACKENDS))}")
    if not isinstance(proportional_attention, (bool, np.bool_)):  # "false" would be truthy
        raise ValueError(f"proportional_attention must be True or False, got {proportional_attention!r}")
    return window_size, down_factor


def patch(
    pipe_or_transformer: Any,
    window_size: int = 16,
    down_factor: int = 1,
    backend: str = "auto",
    proportional_attention: bool = False,
) -> PatchHandle:
    """Install CLEAR attention on every attention layer of a diffusers DiT (see :data:`SUPPORTED_MODELS`).

    Args:
        pipe_or_transformer: a supported model, or a pipeline: its ``transformer`` and ``controlnet``
            (all nets of a ``FluxMultiControlNetModel``) are patched with the same settings.
        window_size: radius ``r`` in tokens (16 = 256 px at FLUX's 16 px per token).
        down_factor: ``d > 1`` adds ``d x d`` pooled keys/values with a learnable ``spatial_weight``.
        backend: attention backend name, or ``"auto"``.
        proportional_attention: softmax scale for resolutions above the training one.

    Returns:
        A :class:`PatchHandle`; ``with clear_dit.patch(pipe): ...`` unpatches on exit. Patching a
        patched model covers the patch in place, which comes back when the new one ends (nested ``with`` blocks;
        :func:`unpatch` ends both); pooling weights (``spatial_weight``, trained or loaded) carry over to the new
        patch when ``down_factor`` stays the same, so a new radius keeps loaded CLEAR weights whole.

    While patched, diffusers methods that would silently bring full attention back
    (``set_attention_backend`` other than ``"native"``, context-parallel ``enable_parallelism``, the pipelines'
    ``load_ip_adapter``, SD3's ``fuse_qkv_projections``, the xformers/NPU/XLA switches such as
    ``enable_xformers_memory_efficient_attention``) raise a ``ValueError`` instead.
    """
    models = patchable_models(pipe_or_transformer)
    window_size, down_factor = check_patch_settings(window_size, down_factor, backend, proportional_attention)
    for model in models:
        _check_replaceable(model)
        _check_offload(model, down_factor)
        if backend != "auto" and backend not in available_backends(model.device, model.dtype):
            logger.warning("backend %r is not available for %s/%s", backend, model.device, model.dtype)

    def make_processor(cls: type[CLEARAttnProcessor]) -> nn.Module:
        return cls(window_size, down_factor, backend, bool(proportional_attention))

    patches: list[_ModelPatch] = []
    try:
        for model in models:
            patches.append(_patch_model(model, make_processor))
    except BaseException:  # the models patched so far go back to what they ran
        for patched in reversed(patches):
            patched.restore()
        raise
    handle = PatchHandle(
        transformer=models[0],
        window_size=window_size,
        down_factor=down_factor,
        backend=backend,
        proportional_attention=bool(proportional_attention),
        num_layers=sum(len(p.original_processors) for p in patches),
        _patches=patches,
    )
    for model in models:
        setattr(model, _HANDLE_ATTR, handle)
    if not isinstance(pipe_or_transformer, nn.Module):
        for method, refuse in PIPELINE_GUARDS.items():
            if hasattr(pipe_or_transformer, method):
                setattr(
                    pipe_or_transformer, method, types.MethodType(_pipeline_guard(method, refuse), pipe_or_transformer)
                )
    logger.info(
        "patched %d attention layers of %s with CLEAR (%s)",
        handle.num_layers,
        ", ".join(type(m).__name__ for m in models),
        handle.config,
    )
    return handle


def patch_handle(pipe_or_transformer: Any) -> PatchHandle | None:
    """The active :class:`PatchHandle` of a model (of a pipeline's transformer), or ``None`` when unpatched."""
    return getattr(resolve_transformer(pipe_or_transformer), _HANDLE_ATTR, None)


def unpatch(pipe_or_transformer: Any) -> None:
    """Restore the processors the model(s) had before :func:`patch` (ending every patch on them, a patch covered
    by a newer one too); a no-op on unpatched models.

    For a pipeline this restores its transformer and ControlNet(s); for a model, just that model.
    """
    for model in patchable_models(pipe_or_transformer):
        while (handle := getattr(model, _HANDLE_ATTR, None)) is not None:
            handle._release(model)
    if not isinstance(pipe_or_transformer, nn.Module):
        for method in PIPELINE_GUARDS:
            vars(pipe_or_transformer).pop(method, None)
