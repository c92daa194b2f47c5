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
from .patching import PatchHandle, patch, patch_handle, resolve_transformer

logger = logging.getLogger(__name__)

__all__ = [
    "ClearWeights",
    "apply_weights",
    "read_weights",
    "load_weights",
    "save_weights",
    "clear_state_dict",
    "is_clear_key",
    "config_from_filename",
]

_CLEAR_KEY = re.compile(
    r"^(?:transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)"
    r"|single_transformer_blocks\.\d+\.attn\.(?:to_q|to_k|to_v)\.(?:weight|bias)"
    r"|(?:single_)?transformer_blocks\.\d+\.attn\.processor\.spatial_weight)$"
)
_FILENAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?")
_HUB_PATH = re.compile(r"^[\w.-]+/[\w.-]+/.+\.safetensors$")


def is_clear_key(name: str) -> bool:
    """True for the state-dict names a CLEAR checkpoint holds (the trainable attention parameters)."""
    return bool(_CLEAR_KEY.match(name))


def clear_state_dict(pipe_or_transformer: Any) -> dict[str, torch.Tensor]:
    """The CLEAR parameters of a (patched) transformer, by their diffusers state-dict names."""
    transformer = resolve_transformer(pipe_or_transformer)
    return {name: tensor for name, tensor in transformer.state_dict().items() if is_clear_key(name)}


def config_from_filename(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(window_size, down_factor)`` from the published naming ``clear_local_{r}[_down_{d}]``."""
    match = _FILENAME.search(Path(path).name)
    if match is None:
        return None, None
    return int(match.group(1)), int(match.group(2) or 1)


def _expected_shapes(transformer: torch.nn.Module, down_factor: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the CLEAR tensors the transformer holds once patched with ``down_factor``."""
    shapes = {
        name: tuple(t.shape)
        for name, t in transformer.state_dict().items()
        if is_clear_key(name) and not name.endswith("processor.spatial_weight")
    }
    if down_factor > 1:
        d = down_factor
        shapes.update({f"{name}.spatial_weight": (1, 1, 1, d, 1, d, 1) for name in transformer.attn_processors})
    return shapes


def save_weights(pipe_or_transformer: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the CLEAR parameters of a patched model to ``path`` (safetensors, with metadata).

    Raises:
        ValueError: the model is not patched.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    transformer = resolve_transformer(pipe_or_transformer)
    handle = patch_handle(transformer)
    if handle is None:
        raise ValueError("save_weights needs a CLEAR-patched model: call clear_dit.patch(...) first")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = {name: t.detach().contiguous().cpu() for name, t in clear_state_dict(transformer).items()}
    metadata = {
        "format": "clear-dit",
        "window_size": str(handle.window_size),
        "down_factor": str(handle.down_factor),
        "base_model": type(transformer).__name__,
        "clear_dit_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never leaves a half-written file under the final name
    return path


def _resolve_path(path: str | os.PathLike) -> Path:
    local = Path(path).expanduser()
    if local.is_file():
        return local
    text = str(path)
    if local.exists() or not _HUB_PATH.match(text):
        raise FileNotFoundError(f"CLEAR weights file not found: {text}")
    owner, repo, filename = text.split("/", 2)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(f"{owner}/{repo}", filename))
    except Exception as err:  # the hub client raises many types; they all mean the same to the caller
        raise ValueError(
            f"could not fetch {filename!r} from hub repo {owner}/{repo} ({type(err).__name__}); "
            "check the name and your connection, or pass a local file"
        ) from err


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


@dataclass(frozen=True)
class ClearWeights:
    """CLEAR tensors read from a file, with the radius and down factor they are for (see :func:`read_weights`)."""

    tensors: dict[str, torch.Tensor] = field(repr=False)
    window_size: int
    down_factor: int
    name: str


def read_weights(
    path: str | os.PathLike, window_size: int | None = None, down_factor: int | None = None
) -> ClearWeights:
    """Read a CLEAR checkpoint and resolve its radius and down factor, without touching any model.

    Args:
        path: a local ``.safetensors`` file, or ``"owner/repo/filename.safetensors"`` on the hub.
        window_size, down_factor: override the file's metadata; needed for files without metadata
            whose name does not follow ``clear_local_{r}[_down_{d}]``.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file or unknown radius.
    """
    file = _resolve_path(path)
    tensors, metadata = _read_file(file)
    name_r, name_d = config_from_filename(file)
    meta_r = int(metadata["window_size"]) if "window_size" in metadata else None
    meta_d = int(metadata["down_factor"]) if "down_factor" in metadata else None
    window_size = window_size or meta_r or name_r
    if window_size is None:
        raise ValueError(
            f"{file.name} has no CLEAR metadata and its name is not clear_local_{{r}}[_down_{{d}}]: pass window_size"
        )
    has_pool = any(k.endswith("processor.spatial_weight") for k in tensors)
    down_factor = down_factor or meta_d or name_d or 1
    if has_pool and down_factor == 1:
        raise ValueError(f"{file.name} holds pooling weights (spatial_weight) but down_factor is 1: pass down_factor")
    return ClearWeights(tensors=tensors, window_size=window_size, down_factor=down_factor, name=file.name)


def apply_weights(
    pipe_or_transformer: Any, weights: ClearWeights, backend: str = "auto", proportional_attention: bool = False
) -> PatchHandle:
    """Patch a model with CLEAR (see :func:`clear_dit.patch`) and copy ``weights`` into it.

    Raises:
        ValueError: keys/shapes that do not match the model (the first few are named); the model is
        left untouched then.
    """
    transformer = resolve_transformer(pipe_or_transformer)
    tensors, down_factor = weights.tensors, weights.down_factor
    expected = _expected_shapes(transformer, down_factor)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing keys: {_first(missing)}" if missing else "",
            f"unexpected: {_first(unexpected)}" if unexpected else "",
        ]
        problems = "; ".join(p for p in parts if p)
        raise ValueError(f"{weights.name} does not match {type(transformer).__name__}: {problems}")
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {shape}" for k, shape in expected.items() if tuple(tensors[k].shape) != shape
    ]
    if wrong:
        raise ValueError(f"{weights.name} has tensors of the wrong shape: {_first(wrong)}")

    handle = patch(
        transformer,
        window_size=weights.window_size,
        down_factor=down_factor,
        backend=backend,
        proportional_attention=proportional_attention,
    )
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
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
        pipe_or_transformer: a FLUX pipeline or ``FluxTransformer2DModel``.
        path: a local ``.safetensors`` file, or ``"owner/repo/filename.safetensors"`` on the hub.
        window_size, down_factor: override the file's metadata; needed for files without metadata
            whose name does not follow ``clear_local_{r}[_down_{d}]``.
        backend: attention backend for the installed processors.
        proportional_attention: see :func:`clear_dit.patch`.

    Returns:
        The :class:`PatchHandle` of the patched model.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, unknown radius, or keys/shapes
        that do not match the model (the first few are named).
    """
    transformer = resolve_transformer(pipe_or_transformer)
    weights = read_weights(path, window_size, down_factor)
    return apply_weights(transformer, weights, backend=backend, proportional_attention=proportional_attention)
