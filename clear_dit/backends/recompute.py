"""Exact gradients for forward-only CLEAR kernels: the backward recomputes through ``"tiled"``.

The ``"triton"`` and ``"xformers"`` backends have fast forwards and no backward of their own; wrapped here, the
forward saves its inputs and the backward differentiates the same attention through the ``"tiled"`` backend's
differentiable path (plain ops, exact: the same gradients as ``"dense"``; in float32 for a float16 scale too
small for it), so training works with them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..mask import CLEARLayout
from .tiled import TiledBackend, scale_fits

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, CLEARLayout, float], torch.Tensor]


class _TiledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward: Forward, query, key, value, layout: CLEARLayout, scale: float):
        ctx.save_for_backward(query, key, value)
        ctx.layout, ctx.scale = layout, scale
        return forward(query, key, value, layout, scale)

    @staticmethod
    def backward(ctx, grad_out):
        needed = ctx.needs_input_grad[1:4]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needed, strict=True)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            # fp16 with a tiny scale: tiled's padding keys would take weight (it refuses); in fp32 they do not, and
            # the memory stays linear (dense's would not, at the sizes the fast forward ran)
            upcast = not scale_fits(ctx.scale, inputs[0].dtype)
            out = TiledBackend()(*(t.float() if upcast else t for t in inputs), ctx.layout, ctx.scale)
            grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype)))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs), None, None)


def with_tiled_backward(
    forward: Forward, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: CLEARLayout, scale: float
) -> torch.Tensor:
    """``forward(query, key, value, layout, scale)`` (shapes of :class:`~clear_dit.backends.base.AttentionBackend`),
    differentiable: its gradients are those of the ``"tiled"`` backend on the same inputs."""
    return _TiledBackward.apply(forward, query, key, value, layout, scale)
