"""Tiny real diffusers models built from configs for the tests (saved and re-loaded with from_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(folder: Path, seed: int = 0) -> FluxTransformer2DModel:
    """A randomly initialised FLUX transformer, written with save_pretrained and read back."""
    torch.manual_seed(seed)
    FluxTransformer2DModel(**TINY_FLUX_CONFIG).save_pretrained(folder)
    return FluxTransformer2DModel.from_pretrained(folder).eval()


def flux_inputs(grid: tuple[int, int], text_len: int = 5, batch: int = 1, seed: int = 0) -> dict:
    """Transformer call kwargs as FluxPipeline passes them, for an ``h x w`` token grid."""
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, TINY_FLUX_CONFIG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TINY_FLUX_CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY_FLUX_CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]
