"""Image similarity of a student's images to its teacher's: PSNR and SSIM (Wang et al. 2004, Gaussian window)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["psnr", "ssim", "to_tensor"]


def to_tensor(images: Image.Image | list[Image.Image] | torch.Tensor) -> torch.Tensor:
    """Images as float64 ``(batch, channels, height, width)`` in [0, 1]; a tensor is taken as already so."""
    if isinstance(images, torch.Tensor):
        return images.double() if images.ndim == 4 else images.double()[None]
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = to_tensor(a), to_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def psnr(a, b, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image ``(batch,)``; ``inf`` for identical images."""
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image ``(batch,)``, averaged over channels and window positions.

    Standard constants (K1 = 0.01, K2 = 0.03) and an 11x11 Gaussian window of sigma 1.5, applied without
    padding ("valid" positions only), as in the reference implementation.
    """
    a, b = _pair(a, b)
    channels = a.shape[1]
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size} px on each side for SSIM, got {tuple(a.shape[-2:])}")
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
