"""Diffusers attention processors that compute CLEAR attention."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import nn

from .attention import clear_attention, proportional_scale

__all__ = ["CLEARFluxAttnProcessor"]


class CLEARFluxAttnProcessor(nn.Module):
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` computing CLEAR attention.

    The image token grid is not state of the processor: :func:`clear_dit.patch` installs a forward
    pre-hook on the transformer that reads it from ``img_ids`` and passes it to every processor as
    the ``clear_grid`` joint-attention kwarg, so one patched model serves any resolution.

    For ``down_factor > 1`` the processor owns the learnable pooling weight ``spatial_weight`` in the
    official shape ``(1, 1, 1, d, 1, d, 1)``, so state-dict keys match the published checkpoints.

    Args:
        window_size: radius ``r`` of the circular window in tokens.
        down_factor: pooling factor ``d`` (1: no pooled tokens).
        backend: a name from :func:`clear_dit.available_backends`, or ``"auto"``.
        proportional_attention: use ``sqrt(log(N_k, 4608) / head_dim)`` as the softmax scale
            (for resolutions above the training one) instead of ``1/sqrt(head_dim)``.
    """

    # Set by diffusers' ``set_attention_backend`` / ``enable_parallelism``; CLEAR cannot honour them.
    _attention_backend = None
    _parallel_config = None

    def __init__(
        self, window_size: int, down_factor: int = 1, backend: str = "auto", proportional_attention: bool = False
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.down_factor = down_factor
        self.backend = backend
        self.proportional_attention = proportional_attention
        if down_factor > 1:
            d = down_factor
            self.spatial_weight = nn.Parameter(torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d)))
        else:
            self.register_parameter("spatial_weight", None)

    def extra_repr(self) -> str:
        return (
            f"window_size={self.window_size}, down_factor={self.down_factor}, backend={self.backend!r}, "
            f"proportional_attention={self.proportional_attention}"
        )

    def _check_unsupported(self, attention_mask: torch.Tensor | None, clear_grid: tuple[int, int] | None) -> None:
        if clear_grid is None:
            raise ValueError(
                "CLEAR processor called without `clear_grid`: install it with clear_dit.patch(...), "
                "which passes the token grid of every forward call"
            )
        if attention_mask is not None:
            raise ValueError("CLEAR attention does not take an attention_mask; it builds its own local mask")
        if self._parallel_config is not None:
            raise ValueError(
                "diffusers context parallelism (enable_parallelism) would compute full attention; "
                "use pipelines.parallel for patch-parallel CLEAR inference"
            )
        if self._attention_backend not in (None, "native"):
            raise ValueError(
                f"attention backend {self._attention_backend!r} set by set_attention_backend cannot compute CLEAR; "
                "choose a CLEAR backend with clear_dit.patch(..., backend=NAME) instead"
            )

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """CLEAR attention of ``(batch, seq, heads, head_dim)`` q/k/v, text first; every non-image token is text.

        Returns ``(batch, seq, heads * head_dim)`` in the query's dtype. Subclasses that compute the same
        attention another way (``pipelines.parallel``: one band of rows per device) override this.
        """
        h, w = grid
        text_len = query.shape[1] - h * w
        scale = None
        if self.proportional_attention:
            kv_len = query.shape[1] + (h // self.down_factor) * (w // self.down_factor) * (self.down_factor > 1)
            scale = proportional_scale(kv_len, query.shape[-1])
        out = clear_attention(
            query,
            key,
            value,
            grid=(h, w),
            text_len=text_len,
            window_size=self.window_size,
            down_factor=self.down_factor,
            spatial_weight=self.spatial_weight,
            scale=scale,
            backend=self.backend,
        )
        return out.flatten(2, 3).to(query.dtype)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        clear_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check_unsupported(attention_mask, clear_grid)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._attend(query, key, value, clear_grid)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states
