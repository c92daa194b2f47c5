"""Loading a FLUX pipeline by name: the built-in tiny model, a local folder, or a Hugging Face hub id.

Every failure a user can cause (a folder that is not there, a hub id that cannot be reached) is raised as a
``FileNotFoundError`` or ``ValueError`` with a one-line message naming the model, so that entry points can
report it without a traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

TINY = "tiny"
#: FLUX.1's T5 limit; FluxPipeline rejects a longer ``max_sequence_length``.
FLUX_MAX_SEQUENCE_LENGTH = 512


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
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model!r} is not a diffusers pipeline folder (it has no model_index.json)")
        return "folder"
    if _looks_like_path(model):
        raise FileNotFoundError(f"model folder not found: {model}")
    return "hub"


def load_pipeline(model: str = TINY, torch_dtype: torch.dtype = torch.float32):
    """Load a ``FluxPipeline``.

    Args:
        model: ``"tiny"`` (the built-in offline model, see :mod:`pipelines.tiny`), a local folder written by
            ``save_pretrained`` (or a hub snapshot), or a hub id such as ``"black-forest-labs/FLUX.1-dev"``.
        torch_dtype: dtype of the loaded weights.

    Raises:
        FileNotFoundError: ``model`` names a local folder that does not exist.
        ValueError: the folder is not a diffusers pipeline, or the hub id cannot be fetched (offline, unknown,
            gated without a token).
    """
    source = model_source(model)
    from diffusers import FluxPipeline

    if source == "tiny":
        from .tiny import load_tiny_pipeline

        return load_tiny_pipeline(torch_dtype=torch_dtype)
    if source == "folder":
        logger.info("loading %s from the local folder %s", FluxPipeline.__name__, model)
        return FluxPipeline.from_pretrained(Path(model).expanduser(), dtype=torch_dtype)

    logger.info("fetching %s from the Hugging Face hub", model)
    try:
        folder = FluxPipeline.download(model)
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP, offline and not-found errors are all OSErrors
        reason = " ".join(str(err).split())
        if len(reason) > 200:
            reason = reason[:200] + "..."
        raise ValueError(
            f"could not load model {model!r}: it is no local folder, and the Hugging Face hub could not provide it "
            f"(offline, unknown or gated?): {reason}"
        ) from err
    return FluxPipeline.from_pretrained(folder, dtype=torch_dtype)


def default_max_sequence_length(pipe) -> int:
    """The T5 length to run ``pipe`` with: its tokenizer's limit (64 for the tiny model), at most FLUX's 512."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    limit = getattr(tokenizer, "model_max_length", FLUX_MAX_SEQUENCE_LENGTH) or FLUX_MAX_SEQUENCE_LENGTH
    return int(min(limit, FLUX_MAX_SEQUENCE_LENGTH))


__all__ = ["FLUX_MAX_SEQUENCE_LENGTH", "TINY", "default_max_sequence_length", "load_pipeline", "model_source"]
