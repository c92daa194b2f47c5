"""Shared fixtures: the tiny FLUX pipeline, built offline once per test session into a temporary cache."""

from __future__ import annotations

import os

# No test may reach a model hub (DESIGN.md 3); set before huggingface_hub is imported so it takes effect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> Path:
    """A fresh cache root for the session, also exported as ``CLEAR_DIT_CACHE`` (``load_pipeline("tiny")``)."""
    from pipelines.tiny import CACHE_ENV

    root = tmp_path_factory.mktemp("clear-dit-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_pipeline_path(tiny_cache_dir) -> Path:
    """Folder of the tiny FLUX pipeline, built (offline) by ``save_pretrained`` for this session."""
    from pipelines.tiny import tiny_pipeline_path as build

    return build(tiny_cache_dir)


@pytest.fixture
def tiny_pipe(tiny_pipeline_path):
    """A fresh fp32 ``FluxPipeline`` loaded with ``from_pretrained`` from the session's tiny pipeline.

    Function-scoped (loading takes a fraction of a second), so a test that patches it cannot leak into others.
    """
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_pipeline_path, dtype=torch.float32)


@pytest.fixture
def deny_searching(monkeypatch):
    """``deny_searching(folder)``: from then on the test sees ``folder`` as a user without search (x) permission
    on it does: its entries cannot be looked at. Simulated, since the tests run as root, whom permissions do not
    stop."""
    stat = Path.stat

    def deny(folder: Path) -> None:
        def denied(self, **kwargs):
            if folder in Path(self).absolute().parents:
                raise PermissionError(13, "Permission denied", str(self))
            return stat(self, **kwargs)

        monkeypatch.setattr(Path, "stat", denied)

    return deny
