"""clear-dit: CLEAR (convolution-like local attention) for diffusion transformers in diffusers."""

from .attention import available_backends, clear_attention, pool_tokens, proportional_scale
from .mask import CLEARLayout, attention_density

__version__ = "0.1.0"

__all__ = [
    "CLEARLayout",
    "attention_density",
    "available_backends",
    "clear_attention",
    "pool_tokens",
    "proportional_scale",
]
