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


def test_ssim_equals_the_formula_window_by_window():
    """Wang et al. 2004 written out per window: Gaussian weights exp(-d^2 / (2 * 1.5^2)) over 11 x 11, weighted means,
    variances and covariance, K1 = 0.01, K2 = 0.03, averaged over the valid positions (textured images, where the
    contrast-structure term and the window's shape matter)."""
    g = torch.Generator().manual_seed(4)
    a = torch.rand(1, 1, 14, 13, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    weights = [[math.exp(-((i - 5) ** 2 + (j - 5) ** 2) / (2 * 1.5**2)) for j in range(11)] for i in range(11)]
    total = sum(map(sum, weights))
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for y in range(14 - 10):
        for x in range(13 - 10):
            cells = [(weights[i][j] / total, a[0, 0, y + i, x + j].item(), b[0, 0, y + i, x + j].item())
                     for i in range(11) for j in range(11)]  # fmt: skip
            mu_a, mu_b = sum(w * p for w, p, _ in cells), sum(w * q for w, _, q in cells)
            var_a = sum(w * (p - mu_a) ** 2 for w, p, _ in cells)
            var_b = sum(w * (q - mu_b) ** 2 for w, _, q in cells)
            cov = sum(w * (p - mu_a) * (q - mu_b) for w, p, q in cells)
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    assert ssim(a, b).item() == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_ssim_is_the_mean_over_channels():
    """Every other SSIM test has one channel or symmetric inputs: the worst channel passed them too."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64)
    b = a.clone()
    b[:, 0] = (b[:, 0] + 0.3 * torch.rand(1, 32, 32, generator=g, dtype=torch.float64)).clamp(0, 1)
    per_channel = [ssim(a[:, c : c + 1], b[:, c : c + 1]).item() for c in range(3)]
    assert ssim(a, b).item() == pytest.approx(sum(per_channel) / 3)


def test_a_single_chw_tensor_is_taken_as_is():
    """Tensors are in [0, 1] already: only PIL images and uint8 arrays are divided by 255."""
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_tensor(x), x.double()[None])


def test_ssim_and_psnr_do_not_depend_on_the_units_given_their_range():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    torch.testing.assert_close(ssim(a * 255, b * 255, data_range=255), ssim(a, b))
    torch.testing.assert_close(psnr(a * 255, b * 255, data_range=255), psnr(a, b))


def test_psnr_is_per_image():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    b = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.01)]).double()
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64))
