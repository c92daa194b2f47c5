"""PSNR and SSIM of the fidelity benchmark against values known in closed form."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.fidelity.metrics import psnr, ssim, to_tensor


def test_identical_images():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(images, images)).all()
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_known_noise_level():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((1, 3, 256, 256), 0.5)
    sigma = 0.05
    noisy = grey + sigma * torch.randn(grey.shape, generator=g)
    assert psnr(grey, noisy).item() == pytest.approx(-20 * math.log10(sigma), abs=0.05)  # 26.02 dB
    assert psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)).item() == pytest.approx(20.0)
    assert psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 25.5), data_range=255).item() == pytest.approx(20.0)


def test_ssim_closed_forms():
    # Flat images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere.
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat_a, flat_b = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    assert ssim(flat_a, flat_b).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    # An inverted image has covariance -var: SSIM is negative, and symmetric in its arguments.
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(x, 1 - x).item() < 0
    assert ssim(x, x * 0.9).item() == pytest.approx(ssim(x * 0.9, x).item())


def test_ssim_decreases_with_noise():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 64, 64, generator=g)
    values = [ssim(x, x + s * torch.randn(x.shape, generator=g)).item() for s in (0.01, 0.05, 0.2)]
    assert 1 > values[0] > values[1] > values[2]


def test_pil_input_and_errors():
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert to_tensor(image).shape == (1, 3, 32, 32)
    assert to_tensor(image).max().item() == pytest.approx(128 / 255)
    assert ssim(image, [image]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
