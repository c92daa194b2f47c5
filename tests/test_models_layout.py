"""The layouts issue 4 adds to the mask: text last (SD3) and a reference grid sharing coordinates (Kontext)."""

import pytest
import torch
import torch.nn.functional as F
from clear_oracle import brute_force_mask

import clear_dit
from clear_dit.mask import CLEARLayout, attention_density, dense_mask

CASES = [
    # text_len, grid, reference_grid, window_size, down_factor
    (3, (4, 6), None, 2, 1),
    (0, (4, 4), None, 3, 2),
    (2, (4, 6), (6, 4), 2, 1),
    (3, (2, 4), (4, 6), 3, 2),
]


@pytest.mark.parametrize("text_position", ["first", "last"])
@pytest.mark.parametrize(("text_len", "grid", "ref", "r", "d"), CASES)
def test_mask_predicate_matches_the_documented_rule(text_len, grid, ref, r, d, text_position):
    layout = CLEARLayout(grid, text_len, r, d, text_position, ref)
    grids = [grid] + ([ref] if ref else [])
    expected = brute_force_mask(text_len, grids, r, d, text_position)
    torch.testing.assert_close(dense_mask(layout), expected, atol=0, rtol=0)
    density = attention_density(grid, text_len, r, d, reference_grid=ref)
    assert density * layout.q_len**2 == pytest.approx(expected.sum().item())


def test_layout_validation_and_geometry():
    layout = CLEARLayout((4, 6), 3, 2, 2, "last", (2, 4))
    assert layout.image_grids == ((4, 6), (2, 4))
    assert (layout.num_image, layout.text_start, layout.image_start) == (32, 32, 0)
    assert layout.num_pooled == 6 + 2 and layout.kv_len == 3 + 32 + 8
    assert CLEARLayout((2, 2), 1, 2, reference_grid=(3, 1)).covers_grid is False  # (2, 1) apart: 5 >= 4
    assert CLEARLayout((2, 2), 1, 3, reference_grid=(3, 1)).covers_grid is True
    with pytest.raises(ValueError, match="text_position must be 'first' or 'last', got 'middle'"):
        CLEARLayout((4, 4), 1, 2, text_position="middle")
    with pytest.raises(ValueError, match="reference_grid 3x4 is not divisible by down_factor 2"):
        CLEARLayout((4, 4), 1, 2, 2, reference_grid=(3, 4))


def _qkv(seq: int, batch: int = 2, heads: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("backend", clear_dit.available_backends())
@pytest.mark.parametrize("d", [1, 2])
def test_text_last_is_text_first_with_the_sequence_rotated(backend, d):
    grid, text_len = (4, 6), 3
    q, k, v = _qkv(text_len + 24)
    kwargs = dict(grid=grid, text_len=text_len, window_size=2, down_factor=d, backend=backend)
    first = clear_dit.clear_attention(q, k, v, **kwargs)
    rot = [t.roll(-text_len, dims=1) for t in (q, k, v)]  # [image] + [text]
    last = clear_dit.clear_attention(*rot, **kwargs, text_position="last")
    torch.testing.assert_close(last, first.roll(-text_len, dims=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", clear_dit.available_backends())
def test_reference_grid_attention_equals_masked_sdpa(backend):
    grid, ref, text_len, r = (4, 6), (6, 2), 3, 2
    q, k, v = _qkv(text_len + 24 + 12)
    out = clear_dit.clear_attention(
        q, k, v, grid=grid, text_len=text_len, window_size=r, reference_grid=ref, backend=backend
    )
    mask = brute_force_mask(text_len, [grid, ref], r)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"seq length 39 != text_len \+ image tokens = 2 \+ 4\*6 \+ 6\*2"):
        clear_dit.clear_attention(q, k, v, grid=grid, text_len=2, window_size=r, reference_grid=ref)


@pytest.mark.parametrize("backend", [b for b in clear_dit.available_backends() if b != "dense"])
@pytest.mark.parametrize(
    ("text_len", "grid", "ref", "r", "d", "text_position"),
    [
        (3, (10, 18), (12, 6), 3, 2, "first"),  # several tiles, reference taller than the target
        (5, (4, 4), (20, 12), 2, 1, "first"),  # reference far larger: cropped to the reach of the target
        (0, (9, 17), None, 2, 1, "last"),
        (4, (16, 8), None, 3, 4, "last"),
    ],
)
def test_backends_equal_dense_on_multi_tile_layouts(backend, text_len, grid, ref, r, d, text_position):
    n = grid[0] * grid[1] + (ref[0] * ref[1] if ref else 0)
    q, k, v = _qkv(text_len + n, batch=1)
    kwargs = dict(
        grid=grid, text_len=text_len, window_size=r, down_factor=d, text_position=text_position, reference_grid=ref
    )
    expected = clear_dit.clear_attention(q, k, v, **kwargs, backend="dense")
    torch.testing.assert_close(
        clear_dit.clear_attention(q, k, v, **kwargs, backend=backend), expected, atol=1e-5, rtol=1e-5
    )
