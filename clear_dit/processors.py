"""Diffusers attention processors that compute CLEAR attention.

One processor per attention family; they share the CLEAR state (radius, pooling weight, backend) and
differ only in how they build the joint sequence:

- :class:`CLEARFluxAttnProcessor` (FLUX.1 transformer and ControlNet, Kontext): ``[text] + [image]``
  (``+ [reference image]``), RoPE, ``(batch, seq, heads, head_dim)``.
- :class:`CLEARJointAttnProcessor` (SD3 / SD3.5 MMDiT): ``[image] + [text]``, no RoPE, optional qk-norm;
  SD3.5's image-only ``attn2`` is the same call without text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import nn

from .attention import clear_attention_with_layout, proportional_scale
from .mask import CLEARLayout

__all__ = ["CLEARAttnProcessor", "CLEARFluxAttnProcessor", "CLEARJointAttnProcessor"]


def _module_call(forward: Callable) -> Callable:
    """A ``__call__`` that runs ``nn.Module.__call__`` (so module hooks, e.g. accelerate's offload, apply) but shows
    ``forward``'s signature: diffusers' attention drops every kwarg its processor's ``__call__`` does not name."""

    @functools.wraps(forward)
    def __call__(self: nn.Module, *args, **kwargs):
        return nn.Module.__call__(self, *args, **kwargs)

    return __call__


class CLEARAttnProcessor(nn.Module):
    """What every CLEAR processor holds and checks; subclasses implement ``forward`` for one attention family.

    The image token grid is not state of the processor: :func:`clear_dit.patch` installs a forward
    pre-hook on the model that reads it from the model's inputs and passes it to every processor as
    the ``clear_grid`` (and, for FLUX Kontext, ``clear_reference_grid``) attention kwarg, so one
    patched model serves any resolution.

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
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        grid: tuple[int, int],
        text_position: str,
        reference_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """CLEAR attention of ``(batch, seq, heads, head_dim)`` q/k/v; every non-image token is text.

        Returns ``(batch, seq, heads * head_dim)`` in the query's dtype.
        """
        n_image = grid[0] * grid[1] + (reference_grid[0] * reference_grid[1] if reference_grid else 0)
        layout = CLEARLayout(
            grid, query.shape[1] - n_image, self.window_size, self.down_factor, text_position, reference_grid
        )
        scale = proportional_scale(layout.kv_len, query.shape[-1]) if self.proportional_attention else None
        out = clear_attention_with_layout(
            query, key, value, layout, spatial_weight=self.spatial_weight, scale=scale, backend=self.backend
        )
        return out.flatten(2, 3).to(query.dtype)


class CLEARFluxAttnProcessor(CLEARAttnProcessor):
    """Drop-in replacement for diffusers' ``FluxAttnProcessor`` computing CLEAR attention.

    Serves ``FluxTransformer2DModel`` and ``FluxControlNetModel`` (whose union mode prepends its mode token
    to the text, so it simply counts as text). With ``clear_reference_grid`` (FLUX Kontext) the image part
    is ``[target h*w] + [reference hr*wr]`` in one coordinate space (rule in :mod:`clear_dit.mask`).
    """

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        clear_grid: tuple[int, int] | None = None,
        clear_reference_grid: tuple[int, int] | None = None,
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

        out = self._attend(query, key, value, clear_grid, "first", clear_reference_grid)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        encoder_out = attn.to_add_out(encoder_out.contiguous())
        return out, encoder_out

    __call__ = _module_call(forward)


class CLEARJointAttnProcessor(CLEARAttnProcessor):
    """Drop-in replacement for diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5) computing CLEAR attention.

    The joint sequence is ``[image h*w] + [text]``; it is built directly in ``(batch, seq, heads, head_dim)``
    (qk-norm acts on ``head_dim`` either way), so no layout copy is made for the CLEAR call. Called without
    ``encoder_hidden_states`` (SD3.5's image-only ``attn2``) it is plain local attention over the image.
    """

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        clear_grid: tuple[int, int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._check_unsupported(attention_mask, clear_grid)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            encoder_key = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            encoder_value = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        out = self._attend(query, key, value, clear_grid, "last")
        if encoder_hidden_states is not None:
            out, encoder_out = out.split_with_sizes([hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is None:
            return out
        return out, encoder_out

    __call__ = _module_call(forward)
