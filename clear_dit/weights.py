"""CLEAR checkpoints: the attention projections (+ pooling weights) of a transformer, in safetensors.

Keys are diffusers' own state-dict names (DESIGN.md 1.2), so the published ``Huage001/CLEAR`` files load
unchanged. Files written here also carry metadata (radius, down factor, base model) and configure
themselves on load.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .files import atomic_write
from .mask import check_window_config
from .patching import PatchHandle, patch, patch_handle, resolve_transformer

logger = logging.getLogger(__name__)

__all__ = [
    "ClearWeights",
    "apply_weights",
    "check_weights",
    "read_weights",
    "load_weights",
    "save_weights",
    "clear_state_dict",
    "is_clear_key",
    "config_from_filename",
    "read_weights_config",
]

# FLUX: transformer_blocks.{i}.attn / single_transformer_blocks.{i}.attn; SD3: transformer_blocks.{i}.attn and
# SD3.5's image-only transformer_blocks.{i}.attn2.
_CLEAR_KEY = re.compile(
    r"^(?:transformer_blocks\.\d+\.attn2?\.(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v)\.(?:weight|bias)"
    r"|(?:single_)?transformer_blocks\.\d+\.attn2?\.processor\.spatial_weight)$"
)
# peft wraps a LoRA-carrying Linear: its own weight becomes `<name>.base_layer.weight`.
_LORA_BASE = ".base_layer."
_FILENAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?")
_HUB_PATH = re.compile(r"^[\w.-]+/[\w.-]+/.+\.safetensors$")


def is_clear_key(name: str) -> bool:
    """True for the state-dict names a CLEAR checkpoint holds (the trainable attention parameters)."""
    return bool(_CLEAR_KEY.match(name))


def _clear_names(transformer: torch.nn.Module) -> dict[str, str]:
    """``{published name: parameter name}`` of the CLEAR parameters the transformer holds.

    The names differ only under a LoRA adapter (peft's ``...to_q.base_layer.weight``), whose base weights
    are the CLEAR parameters: the LoRA's own ``lora_A``/``lora_B`` are not.
    """
    names = {}
    for name, _ in transformer.named_parameters():
        published = name.replace(_LORA_BASE, ".")
        if is_clear_key(published):
            names[published] = name
    return names


def clear_state_dict(pipe_or_transformer: Any) -> dict[str, torch.Tensor]:
    """The CLEAR parameters of a (patched) transformer, by their published diffusers state-dict names.

    With a LoRA adapter loaded these are the base weights (fused into them after ``fuse_lora``).
    """
    transformer = resolve_transformer(pipe_or_transformer)
    params = dict(transformer.named_parameters())
    return {published: params[name].detach() for published, name in _clear_names(transformer).items()}


def _check_not_fused(transformer: torch.nn.Module, names: dict[str, str], action: str = "loading") -> None:
    """Loading into LoRA layers whose delta is merged would make a later ``unfuse_lora`` corrupt the weights; saving
    them would write the LoRA into the CLEAR file (applied twice with the LoRA loaded beside it)."""
    fused = [
        published
        for published, name in names.items()
        if _LORA_BASE in name and transformer.get_submodule(name.split(_LORA_BASE)[0]).merged
    ]
    if fused:
        raise ValueError(
            f"{_first(sorted(fused))} carry a fused LoRA: call unfuse_lora() before {action} CLEAR weights "
            "(and fuse_lora() again afterwards)"
        )


def _check_separate_projections(transformer: torch.nn.Module, action: str) -> None:
    """CLEAR weights are the separate ``to_q/to_k/to_v``; after ``fuse_qkv_projections()`` attention runs the fused
    ``to_qkv`` copies instead, so weights loaded into the separate ones would be ignored, and saved ones stale."""
    fused = [name for name, module in transformer.named_modules() if getattr(module, "fused_projections", False)]
    if fused:
        raise ValueError(
            f"cannot {action} CLEAR weights of a model with fused QKV projections ({_first(fused)}): call "
            "unfuse_qkv_projections() first"
        )


def read_weights_config(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(window_size, down_factor)`` a local weights file declares, from its header alone (no tensors read): its
    metadata, else its name (:func:`config_from_filename`); ``None`` for what neither says.

    Raises:
        ValueError: ``path`` is not a readable safetensors file.
    """
    path = Path(path).expanduser()
    _, _, metadata = _read_file(path, tensors=False)
    return _declared_config(path, metadata)


def _declared_config(path: Path, metadata: dict[str, str]) -> tuple[int | None, int | None]:
    """``(window_size, down_factor)`` of a file's metadata, each else from its name; ``None`` where neither says."""
    name_r, name_d = config_from_filename(path)
    meta_r, meta_d = (_metadata_int(path, metadata, key) for key in ("window_size", "down_factor"))
    return meta_r or name_r, meta_d or name_d


def _metadata_int(path: Path, metadata: dict[str, str], key: str) -> int | None:
    if key not in metadata:
        return None
    value = metadata[key]
    if not (value.isascii() and value.isdigit()) or len(value) > 9 or int(value) < 1:
        raise ValueError(
            f"{path.name}: its metadata {key}={value!r} is not a positive whole number (of at most 9 digits)"
        )
    return int(value)


def config_from_filename(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(window_size, down_factor)`` from the published naming ``clear_local_{r}[_down_{d}]``."""
    match = _FILENAME.search(Path(path).name)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2) or 1)


def _expected_shapes(transformer: torch.nn.Module, down_factor: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the CLEAR tensors the transformer holds once patched with ``down_factor``."""
    params = dict(transformer.named_parameters())
    shapes = {
        published: tuple(params[name].shape)
        for published, name in _clear_names(transformer).items()
        if not published.endswith("processor.spatial_weight")
    }
    if down_factor > 1:
        d = down_factor
        shapes.update({f"{name}.spatial_weight": (1, 1, 1, d, 1, d, 1) for name in transformer.attn_processors})
    return shapes


def check_not_offloaded(tensors: dict[str, torch.Tensor], action: str) -> None:
    """A one-line ``ValueError`` for parameters on the meta device: after ``enable_sequential_cpu_offload``
    accelerate keeps their data in its hooks, so a copy into them is silently lost and one out of them fails."""
    offloaded = [name for name, t in tensors.items() if t.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"cannot {action} CLEAR weights of a model under sequential CPU offload ({_first(offloaded)} on the meta "
            "device): load or save them before enable_sequential_cpu_offload(), or use enable_model_cpu_offload()"
        )


def save_weights(
    pipe_or_transformer: Any, path: str | os.PathLike, overwrite: bool = False, base_model: str | None = None
) -> Path:
    """Write the CLEAR parameters of a patched model to ``path`` (safetensors, with metadata: radius, down factor,
    ``base_model``, e.g. ``"black-forest-labs/FLUX.1-dev"``, else the model's class, and ``model_class``).

    Raises:
        ValueError: the model is not patched, or is under sequential CPU offload.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        IsADirectoryError: ``path`` is a folder.
    """
    transformer = resolve_transformer(pipe_or_transformer)
    handle = patch_handle(transformer)
    if handle is None:
        raise ValueError("save_weights needs a CLEAR-patched model: call clear_dit.patch(...) first")
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: name the weights file, e.g. {path / 'clear.safetensors'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    state = clear_state_dict(transformer)
    check_not_offloaded(state, "save")
    _check_separate_projections(transformer, "save")
    _check_not_fused(transformer, _clear_names(transformer), "saving")
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    metadata = {
        "format": "clear-dit",
        "window_size": str(handle.window_size),
        "down_factor": str(handle.down_factor),
        "base_model": base_model or type(transformer).__name__,
        "model_class": type(transformer).__name__,
        "clear_dit_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _resolve_path(path: str | os.PathLike) -> Path:
    local = Path(path).expanduser()
    if local.is_file():
        return local
    text = str(path)
    if local.is_dir():
        raise IsADirectoryError(f"{text} is a folder, not a CLEAR weights file (.safetensors)")
    if local.exists() or text.startswith((".", "/", "~")) or not _HUB_PATH.match(text):  # hub owners start otherwise
        raise FileNotFoundError(f"CLEAR weights file not found: {text}")
    owner, repo, filename = text.split("/", 2)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(f"{owner}/{repo}", filename))
    except Exception as err:  # the hub client raises many types; they all mean the same to the caller
        raise ValueError(
            f"{text} is no local file, and fetching {filename!r} from hub repo {owner}/{repo} failed "
            f"({type(err).__name__}); check the path, the name or your connection"
        ) from err


def _read_file(
    path: Path, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]], dict[str, str]]:
    """``(tensors, shapes, metadata)`` of a safetensors file (``tensors=False``: the header only, no tensor read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
            values = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            metadata = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types
        convert = "; CLEAR weights are .safetensors files (convert a .pt/.bin state dict with safetensors' save_file)"
        hint = "" if path.suffix == ".safetensors" else convert
        raise ValueError(f"{path} is not a readable safetensors file: {err}{hint}") from err
    # loading converts to the model's dtype: integers (a quantized file) would become meaningless weights
    wrong = sorted(f"{k} ({dtype})" for k, dtype in dtypes.items() if not dtype.startswith(("F", "BF")))
    if wrong:
        raise ValueError(f"{path.name} holds tensors that are not floating point: {_first(wrong)}")
    # a training run that diverged saves NaN or inf weights: loaded, every image comes out black
    broken = sorted(k for k, t in values.items() if not torch.isfinite(t.float() if t.element_size() == 1 else t).all())
    if broken:
        raise ValueError(f"{path.name} holds NaN or infinite values (a diverged training run?): {_first(broken)}")
    return values, shapes, metadata


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


@dataclass(frozen=True)
class ClearWeights:
    """CLEAR tensors read from a file, with the radius and down factor they are for (see :func:`read_weights`).

    ``tensors`` is empty when the file was read with ``tensors=False`` (its header only); ``shapes`` holds every
    tensor's name and shape (taken from ``tensors`` when not given).
    """

    tensors: dict[str, torch.Tensor] = field(repr=False)
    window_size: int
    down_factor: int
    name: str
    shapes: dict[str, tuple[int, ...]] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.shapes is None:  # built from tensors (a state dict in memory), as before shapes existed
            object.__setattr__(self, "shapes", {k: tuple(v.shape) for k, v in self.tensors.items()})

    def check_loadable(self) -> None:
        """Raise unless the tensors were read (not the header alone): what loads them into a model calls this."""
        if self.tensors.keys() != self.shapes.keys():
            raise ValueError(f"{self.name} was read without its tensors (tensors=False): read_weights(path) to load it")


def read_weights(
    path: str | os.PathLike, window_size: int | None = None, down_factor: int | None = None, *, tensors: bool = True
) -> ClearWeights:
    """Read a CLEAR checkpoint and resolve its radius and down factor, without touching any model.

    Args:
        path: a local ``.safetensors`` file, or ``"owner/repo/filename.safetensors"`` on the hub.
        window_size, down_factor: override the file's metadata; needed for files without metadata
            whose name does not follow ``clear_local_{r}[_down_{d}]``.
        tensors: ``False`` reads the header alone (names, shapes, metadata): enough for :func:`check_weights`
            before a long run that loads the file later.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, NaN or infinite values (with ``tensors``), or
            unknown radius.
    """
    if window_size is not None:  # 0 is refused, not taken for "not given"
        window_size = check_window_config(window_size)[0]
    if down_factor is not None:
        down_factor = check_window_config(1, down_factor)[1]
    file = _resolve_path(path)
    values, shapes, metadata = _read_file(file, tensors)
    own_r, own_d = _declared_config(file, metadata)
    for name, given, own in (("window_size", window_size, own_r), ("down_factor", down_factor, own_d)):
        if given is None and own == 0:  # a name's clear_local_8_down_0 (metadata's 0 is refused when read)
            flag = "--window" if name == "window_size" else "--down"
            raise ValueError(f"{file.name}: its name gives {name} 0; pass a {name} of at least 1 (clear-dit: {flag})")
        if given is not None and own is not None and given != own:  # allowed (the paper reuses radii), but said
            logger.warning("%s was made for %s %s; using it with %s %s as asked", file.name, name, own, name, given)
    window_size = own_r if window_size is None else window_size
    if window_size is None:
        raise ValueError(
            f"{file.name} has no CLEAR metadata and its name is not clear_local_{{r}}[_down_{{d}}]: pass window_size "
            "(clear-dit: --window)"
        )
    has_pool = any(k.endswith("processor.spatial_weight") for k in shapes)
    down_factor = down_factor or own_d or 1  # given ones are >= 1
    if has_pool and down_factor == 1:
        raise ValueError(
            f"{file.name} holds pooling weights (spatial_weight) but down_factor is 1: pass down_factor (clear-dit: "
            "--down)"
        )
    if shapes and not has_pool and down_factor > 1:  # else: a list of missing spatial_weight keys, said later
        raise ValueError(
            f"{file.name} holds no pooling weights (spatial_weight): it was made for down_factor 1, not "
            f"{down_factor} (clear-dit: --down 1)"
        )
    return ClearWeights(values, window_size, down_factor, file.name, shapes)


def check_weights(pipe_or_transformer: Any, weights: ClearWeights) -> None:
    """Raise the one-line ``ValueError`` :func:`apply_weights` raises when ``weights`` cannot be loaded into the
    model (keys, shapes, fused or offloaded projections), without changing it: for callers that load later."""
    transformer = resolve_transformer(pipe_or_transformer)
    shapes = weights.shapes
    expected = _expected_shapes(transformer, weights.down_factor)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing keys: {_first(missing)}" if missing else "",
            f"unexpected: {_first(unexpected)}" if unexpected else "",
        ]
        problems = "; ".join(p for p in parts if p)
        raise ValueError(f"{weights.name} does not match {type(transformer).__name__}: {problems}")
    wrong = [f"{k} {shapes[k]} vs {shape}" for k, shape in expected.items() if shapes[k] != shape]
    if wrong:
        raise ValueError(f"{weights.name} has tensors of the wrong shape: {_first(wrong)}")

    _check_not_fused(transformer, _clear_names(transformer))
    _check_separate_projections(transformer, "load")
    check_not_offloaded(clear_state_dict(transformer), "load")


def apply_weights(
    pipe_or_transformer: Any, weights: ClearWeights, backend: str = "auto", proportional_attention: bool = False
) -> PatchHandle:
    """Patch a model with CLEAR (see :func:`clear_dit.patch`) and copy ``weights`` into it.

    Raises:
        ValueError: keys/shapes that do not match the model (the first few are named); the model is
        left untouched then.
    """
    transformer = resolve_transformer(pipe_or_transformer)
    weights.check_loadable()
    check_weights(transformer, weights)
    tensors, down_factor = weights.tensors, weights.down_factor

    # a pipeline: its ControlNets get the same attention (the paper's zero-shot transfer)
    handle = patch(
        pipe_or_transformer,
        window_size=weights.window_size,
        down_factor=down_factor,
        backend=backend,
        proportional_attention=proportional_attention,
    )
    params = dict(transformer.named_parameters())
    names = _clear_names(transformer)
    with torch.no_grad():
        for published, value in tensors.items():
            param = params[names[published]]
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    logger.info("loaded %d CLEAR tensors from %s (%s)", len(tensors), weights.name, handle.config)
    return handle


def load_weights(
    pipe_or_transformer: Any,
    path: str | os.PathLike,
    window_size: int | None = None,
    down_factor: int | None = None,
    backend: str = "auto",
    proportional_attention: bool = False,
) -> PatchHandle:
    """Patch a model with CLEAR and load CLEAR attention weights into it (:func:`read_weights` + :func:`apply_weights`).

    Args:
        pipe_or_transformer: a pipeline or transformer :func:`clear_dit.patch` supports; a pipeline's
            ControlNets are patched too (with their own attention weights). Works on a model that carries
            LoRA adapters (their base weights receive the CLEAR ones), unless the LoRA is fused.
        path: a local ``.safetensors`` file, or ``"owner/repo/filename.safetensors"`` on the hub.
        window_size, down_factor: override the file's metadata; needed for files without metadata
            whose name does not follow ``clear_local_{r}[_down_{d}]``.
        backend: attention backend for the installed processors.
        proportional_attention: see :func:`clear_dit.patch`.

    Returns:
        The :class:`PatchHandle` of the patched model. Ending it restores the attention it covered, not the
        weights: loaded weights replace the model's, as ``load_state_dict`` does. After a second file loaded over
        a first, ending the second's handle leaves the first's radius and pooling with the second's projections;
        load the first file again to have it whole.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, unknown radius, or keys/shapes
        that do not match the model (the first few are named).
    """
    resolve_transformer(pipe_or_transformer)  # an unsupported model fails before the file is read
    weights = read_weights(path, window_size, down_factor)
    return apply_weights(pipe_or_transformer, weights, backend=backend, proportional_attention=proportional_attention)
