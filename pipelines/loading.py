"""Loading a FLUX pipeline by name: the built-in tiny model, a local folder, or a Hugging Face hub id.

Every failure a user can cause (a folder that is not there, a hub id that cannot be reached) is raised as a
``FileNotFoundError`` or ``ValueError`` with a one-line message naming the model, so that entry points can
report it without a traceback.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

TINY = "tiny"
#: What the command line and the web UI run: FLUX.1 text-to-image (other pipelines: ``clear_dit.patch`` in Python).
SUPPORTED = "FLUX.1 text-to-image pipelines (a FluxTransformer2DModel on 4 x the VAE's latent channels)"
#: FLUX.1's T5 limit; FluxPipeline rejects a longer ``max_sequence_length``.
FLUX_MAX_SEQUENCE_LENGTH = 512
SCHNELL_MAX_SEQUENCE_LENGTH = 256


def _looks_like_path(model: str) -> bool:
    """True for strings that can only be a file-system path (a hub id is ``name`` or ``owner/name``)."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def model_source(model: str) -> Literal["tiny", "folder", "hub"]:
    """Where :func:`load_pipeline` gets ``model`` from; checks local folders without importing diffusers.

    Raises:
        FileNotFoundError: ``model`` is a path (absolute, relative with ``./``, or ``a/b/c``) that does not exist.
        ValueError: ``model`` is an existing path that is not a diffusers pipeline folder.
    """
    if model == TINY:
        return "tiny"
    path = Path(model).expanduser()
    if path.is_file():
        raise ValueError(f"{model!r} is a file, not a diffusers pipeline folder (one with a model_index.json)")
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a diffusers pipeline folder (it has no model_index.json)")
        return "folder"
    if _looks_like_path(model):
        raise FileNotFoundError(f"model folder not found: {model}")
    return "hub"


def published_model_name(model: str) -> str:
    """What files made from ``model`` may say they were made from: a hub id as is, a local folder by its name (a
    hub cache snapshot by its repo id), never its path (a user's home folder in a file they publish)."""
    folder = Path(model).expanduser()
    if model == TINY or not folder.exists():
        return model
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def load_pipeline(model: str = TINY, torch_dtype: torch.dtype = torch.float32):
    """Load a ``FluxPipeline``.

    Args:
        model: ``"tiny"`` (the built-in offline model, see :mod:`pipelines.tiny`), a local folder written by
            ``save_pretrained`` (or a hub snapshot), or a hub id such as ``"black-forest-labs/FLUX.1-dev"``.
        torch_dtype: dtype of the loaded weights.

    Raises:
        FileNotFoundError: ``model`` names a local folder that does not exist.
        ValueError: the folder is not a diffusers pipeline, or not a FLUX.1 text-to-image one (SD3, FLUX
            Control and Fill pipelines are patched from Python: :func:`clear_dit.patch`), or lacks a component's
            folder (a partial copy), or the hub id cannot be fetched (offline, unknown, gated without a token).
    """
    source = model_source(model)
    from diffusers import FluxPipeline

    if source == "tiny":
        from .tiny import load_tiny_pipeline

        return load_tiny_pipeline(torch_dtype=torch_dtype)
    if source == "folder":
        logger.info("loading %s from the local folder %s", FluxPipeline.__name__, model)
        return _checked_flux(model, Path(model).expanduser(), torch_dtype)

    logger.info("fetching %s from the Hugging Face hub", model)
    from huggingface_hub import snapshot_download

    # the config files first: an SD3, Control or Fill pipeline is refused before tens of GB of weights download
    configs = _from_hub(model, lambda: snapshot_download(model, allow_patterns=list(CONFIG_FILES)))
    if not (configs / "model_index.json").is_file():  # a repo of single files (a checkpoint, LoRA, GGUF)
        raise ValueError(f"{model!r} on the hub is not a diffusers pipeline (it has no model_index.json)")
    _check_channels(model, _check_index(model, configs), _channels(configs))
    return _checked_flux(model, _from_hub(model, lambda: FluxPipeline.download(model)), torch_dtype)


#: The files of a pipeline folder that say which pipeline it is, read before any weights.
CONFIG_FILES = ("model_index.json", "transformer/config.json", "vae/config.json")


def _from_hub(model: str, download: Callable[[], str]) -> Path:
    """The folder ``download()`` fetched into the hub cache; a one-line ``ValueError`` where it could not."""
    try:
        return Path(download())
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP, offline and not-found errors are all OSErrors
        reason = " ".join(str(err).split())
        if len(reason) > 200:
            reason = reason[:200] + "..."
        raise ValueError(
            f"could not load model {model!r}: it is no local folder, and the Hugging Face hub could not provide it "
            f"(offline, unknown or gated?): {reason}"
        ) from err


def _checked_flux(model: str, folder: Path, torch_dtype: torch.dtype):
    """``FluxPipeline.from_pretrained(folder)``, refusing other pipelines with a one-line ``ValueError``: diffusers
    loads the components of an SD3 or FLUX Control folder into a FluxPipeline, which then fails mid-generation."""
    from diffusers import FluxPipeline

    index = _check_index(model, folder)
    takes = _flux_components()
    listed = [name for name, entry in index.items() if name in takes and _is_component(entry)]
    missing = [name for name in listed if not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"{model!r} is an incomplete pipeline folder: its model_index.json lists {', '.join(missing)}, "
            f"which {'has' if len(missing) == 1 else 'have'} no folder there"
        )
    # from the config files, before loading (FLUX.1-Fill's components are 33 GB in float32); from the loaded model
    # where a config leaves a field to its class's default
    pipe, sizes = None, _channels(folder)
    if sizes is None:
        pipe = FluxPipeline.from_pretrained(folder, dtype=torch_dtype)
        sizes = pipe.transformer.config.in_channels, pipe.vae.config.latent_channels
    _check_channels(model, index, sizes)
    return pipe or FluxPipeline.from_pretrained(folder, dtype=torch_dtype)


def _check_index(model: str, folder: Path) -> dict:
    """``folder``'s ``model_index.json``: a FLUX pipeline's, with every component ``FluxPipeline`` takes; a
    one-line ``ValueError`` otherwise."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        entry = index["transformer"]
        if not _is_component(entry):
            raise TypeError(f"transformer: {entry!r}")
        transformer = entry[1]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{model!r}: its model_index.json names no transformer class ({err!r})") from err
    kind = index.get("_class_name", "pipeline")
    if transformer != "FluxTransformer2DModel":
        raise ValueError(f"{model!r} is a {kind} with a {transformer}; this runs {SUPPORTED}")
    # a partial copy or download: diffusers' error names the pipeline folder, not what it lacks, and without a
    # tokenizer folder transformers makes up an empty tokenizer that runs. Only the components FluxPipeline takes:
    # diffusers warns of other entries and loads the rest.
    takes = _flux_components()
    required = [name for name, p in takes.items() if name != "self" and p.default is inspect.Parameter.empty]
    odd = [n for n in takes if n in index and not _is_component(index[n]) and index[n] != [None, None]]
    absent = [n for n in required if n not in odd and not _is_component(index.get(n))]
    if odd or absent:
        raise ValueError(  # diffusers' own error names neither the model nor the entries
            f"{model!r}: its model_index.json gives {', '.join(odd + absent)} as no [library, class] pair (saved "
            f"without them?); this runs {SUPPORTED} with every component"
        )
    return index


def _flux_components() -> Mapping[str, inspect.Parameter]:
    """``FluxPipeline.__init__``'s parameters: the components a FLUX pipeline folder may hold (and ``self``)."""
    from diffusers import FluxPipeline

    return inspect.signature(FluxPipeline.__init__).parameters


def _check_channels(model: str, index: dict, sizes: tuple[int, int] | None) -> None:
    """A one-line ``ValueError`` for ``(transformer in_channels, VAE latent_channels)`` of a pipeline that takes
    its conditions as extra channels; ``None`` (sizes not in the config files) passes."""
    if sizes is None:
        return
    channels, latents = sizes
    kind = index.get("_class_name", "pipeline")
    if channels != 4 * latents:  # FLUX Control (128) and Fill (384) also take their conditions as channels
        raise ValueError(
            f"{model!r} is a {kind} whose transformer takes {channels} input channels, not 4 x {latents} latent "
            f"channels; this runs {SUPPORTED}"
        )


def _channels(folder: Path) -> tuple[int, int] | None:
    """``(transformer in_channels, VAE latent_channels)`` from their ``config.json`` files; ``None`` if either lacks
    its field or cannot be read."""
    try:
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(transformer["in_channels"]), int(vae["latent_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_component(entry: object) -> bool:
    """A ``model_index.json`` entry of a component saved in its own folder: ``[library, class]``, not ``[null, null]``
    (an optional component left out) and not a ``_``-prefixed setting."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)


def default_max_sequence_length(pipe) -> int:
    """The T5 length to run ``pipe`` with: its tokenizer's limit (64 for the tiny model), at most FLUX's 512, or
    256 for a transformer without guidance embedding (FLUX.1-schnell's: trained with 256 text tokens)."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    limit = getattr(tokenizer, "model_max_length", FLUX_MAX_SEQUENCE_LENGTH) or FLUX_MAX_SEQUENCE_LENGTH
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    schnell = getattr(config, "guidance_embeds", True) is False
    return int(min(limit, SCHNELL_MAX_SEQUENCE_LENGTH if schnell else FLUX_MAX_SEQUENCE_LENGTH))


__all__ = [
    "FLUX_MAX_SEQUENCE_LENGTH",
    "SCHNELL_MAX_SEQUENCE_LENGTH",
    "TINY",
    "default_max_sequence_length",
    "load_pipeline",
    "model_source",
    "published_model_name",
]
