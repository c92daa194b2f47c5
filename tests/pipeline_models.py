"""Tiny real pipelines for every pipeline class CLEAR supports, built from the tiny FLUX pipeline's parts
(pipelines.tiny) and, for SD3, from configs; every new model goes through save_pretrained/from_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipelines.tiny import TRANSFORMER_CONFIG, VAE_CONFIG, train_clip_tokenizer, train_t5_tokenizer


def saved(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` written with save_pretrained and read back with its class's from_pretrained."""
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


def flux_transformer_variant(folder: Path, seed: int = 0, **overrides) -> FluxTransformer2DModel:
    """The tiny pipeline's transformer config with changes (Fill/Control channels, schnell's no guidance)."""
    torch.manual_seed(seed)
    return saved(FluxTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides}), folder)


def flux_controlnet(folder: Path, num_mode: int | None = None, seed: int = 1) -> FluxControlNetModel:
    """A ControlNet for the tiny pipeline, with randomised (non-zero) output projections."""
    torch.manual_seed(seed)
    config = {k: v for k, v in TRANSFORMER_CONFIG.items() if k not in ("num_layers", "num_single_layers")}
    net = FluxControlNetModel(**config, num_layers=1, num_single_layers=1, num_mode=num_mode)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return saved(net, folder)


def transformer_inputs(transformer: FluxTransformer2DModel, grid: tuple[int, int], text_len: int = 4) -> dict:
    """FluxTransformer2DModel call kwargs shaped for ``transformer``'s config, as FluxPipeline passes them."""
    h, w = grid
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((1,), 0.5),
        guidance=torch.full((1,), 3.5) if cfg.guidance_embeds else None,
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


SD3_CLIP_DIM = 16  # two CLIP encoders, concatenated and zero-padded to the T5 width
SD3_T5_DIM = 32


def tiny_sd3_pipeline(folder: Path, dual_attention: bool = False) -> StableDiffusion3Pipeline:
    """A tiny SD3 (or, with ``dual_attention``, SD3.5: attn2 in block 0 and qk RMS-norm) pipeline, saved and loaded."""
    work = folder.with_name(folder.name + "-tokenizers")
    tokenizer = train_clip_tokenizer(work / "clip")
    tokenizer_3 = train_t5_tokenizer(work / "t5")

    def clip(seed: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=SD3_CLIP_DIM,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=SD3_CLIP_DIM,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    torch.manual_seed(2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=SD3_T5_DIM,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
    )
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=VAE_CONFIG["latent_channels"],
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=SD3_T5_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=2 * SD3_CLIP_DIM,
        out_channels=VAE_CONFIG["latent_channels"],
        pos_embed_max_size=32,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual_attention else {}),
    )
    torch.manual_seed(4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=clip(0),
        tokenizer=tokenizer,
        text_encoder_2=clip(1),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return StableDiffusion3Pipeline.from_pretrained(folder)
