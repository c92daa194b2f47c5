"""Tiny real SD3 / SD3.5 transformers and FLUX ControlNets built from configs (saved and re-loaded with
from_pretrained), and the inputs their pipelines pass them."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxControlNetModel, SD3Transformer2DModel
from flux_models import TINY_FLUX_CONFIG, flux_inputs

TINY_SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=16,
)
#: SD3.5: an image-only second attention in block 0 and RMS qk-norm.
TINY_SD35_CONFIG = {**TINY_SD3_CONFIG, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}


def tiny_sd3_transformer(folder: Path, config: dict = TINY_SD3_CONFIG, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    SD3Transformer2DModel(**config).save_pretrained(folder)
    return SD3Transformer2DModel.from_pretrained(folder).eval()


def sd3_inputs(grid: tuple[int, int], text_len: int = 5, batch: int = 1, seed: int = 0) -> dict:
    """SD3 transformer call kwargs for an ``h x w`` token grid (latents of ``2h x 2w``)."""
    h, w = grid
    p = TINY_SD3_CONFIG["patch_size"]
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, TINY_SD3_CONFIG["in_channels"], h * p, w * p, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TINY_SD3_CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY_SD3_CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )


def tiny_flux_controlnet(folder: Path, num_mode: int | None = None, seed: int = 1) -> FluxControlNetModel:
    """A FLUX ControlNet matching the tiny transformer, with randomised (non-zero) output projections."""
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_FLUX_CONFIG.items() if k not in ("num_layers", "num_single_layers")}
    net = FluxControlNetModel(**config, num_layers=1, num_single_layers=1, num_mode=num_mode)
    with torch.no_grad():
        for param in net.parameters():  # diffusers zero-initialises the output projections
            param.add_(torch.randn_like(param) * 0.02)
    net.save_pretrained(folder)
    return FluxControlNetModel.from_pretrained(folder).eval()


def controlnet_inputs(grid: tuple[int, int], text_len: int = 5, mode: int | None = None, seed: int = 0) -> dict:
    inputs = flux_inputs(grid, text_len=text_len, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs["controlnet_cond"] = torch.randn(inputs["hidden_states"].shape, generator=g)
    if mode is not None:
        inputs["controlnet_mode"] = torch.tensor([[mode]])
    return inputs


def kontext_inputs(grid: tuple[int, int], reference: tuple[int, int], text_len: int = 5, seed: int = 0) -> dict:
    """FLUX Kontext call: target tokens then reference tokens, whose img_ids have a leading 1."""
    inputs = flux_inputs(grid, text_len=text_len, seed=seed)
    ref = flux_inputs(reference, text_len=text_len, seed=seed + 1)
    ref_ids = ref["img_ids"].clone()
    ref_ids[:, 0] = 1
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], ref["hidden_states"]], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids], dim=0)
    return inputs
