"""clear-dit: CLEAR (convolution-like local attention) for diffusion transformers in diffusers."""

from ._version import __version__ as __version__
from .attention import available_backends, clear_attention, pool_tokens, proportional_scale
from .mask import CLEARLayout, attention_density
from .patching import PatchHandle, patch, patch_handle, unpatch
from .processors import CLEARFluxAttnProcessor
from .weights import ClearWeights, apply_weights, clear_state_dict, load_weights, read_weights, save_weights

__all__ = [
    "ClearWeights",
    "apply_weights",
    "read_weights",
    "clear_state_dict",
    "load_weights",
    "save_weights",
    "CLEARFluxAttnProcessor",
    "PatchHandle",
    "patch",
    "patch_handle",
    "unpatch",
    "CLEARLayout",
    "attention_density",
    "available_backends",
    "clear_attention",
    "pool_tokens",
    "proportional_scale",
]
