"""The processors against diffusers' own attention where the tiny models hid mistakes: qk-norm weights that are not
all ones (diffusers initialises them to 1, so swapped norms looked right), pooled keys built after RoPE (an oracle
independent of our processors), proportional attention's key count with Kontext reference tokens and on SD3."""

import math

import pytest
import torch
from clear_oracle import diffusers_attention_under_mask
from dit_models import TINY_SD35_CONFIG, sd3_inputs, tiny_sd3_transformer
from flux_models import flux_inputs, run, tiny_flux_transformer

import clear_dit


def _randomise_qk_norms(model, seed=0):
    """diffusers initialises every RMSNorm weight to 1, which hides a swapped or misplaced qk-norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{n}." in name for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                p.copy_(0.25 + 2.5 * torch.rand(p.shape, generator=g))
    return model


def test_flux_qk_norms_with_trained_weights_match_diffusers(tmp_path):
    model = _randomise_qk_norms(tiny_flux_transformer(tmp_path / "t"))
    inputs = flux_inputs((6, 4), text_len=5, batch=2)
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=8):  # window covers the grid: CLEAR == full attention
        torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=1e-5)


def test_sd35_qk_norms_with_trained_weights_match_diffusers(tmp_path):
    model = _randomise_qk_norms(tiny_sd3_transformer(tmp_path / "t", TINY_SD35_CONFIG))
    inputs = sd3_inputs((4, 6), batch=2)
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=8):
        torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=1e-5)


def test_flux_pooled_keys_are_pooled_after_rope(tmp_path):
    model = tiny_flux_transformer(tmp_path / "t")
    grid, r, d = (6, 8), 2, 2
    inputs = flux_inputs(grid, text_len=3, batch=2)
    weight = torch.tensor([[0.7, 0.1], [0.15, 0.05]])  # not symmetric
    # diffusers' own processor: pooled from the keys its SDPA call receives, i.e. after qk-norm and RoPE (DESIGN 1.1)
    with diffusers_attention_under_mask([grid], r, "first", down_factor=d, spatial_weight=weight):
        oracle = run(model, inputs)
    with clear_dit.patch(model, window_size=r, down_factor=d):
        for p in model.attn_processors.values():
            p.spatial_weight.data.copy_(weight.reshape(1, 1, 1, d, 1, d, 1))
        out = run(model, inputs)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)


def _by_hand(keys, dim):  # sqrt(log_4608(N_k) / head_dim), DESIGN.md 1.1
    return math.sqrt(math.log(keys) / math.log(4608) / dim)


def test_kontext_proportional_attention_counts_the_reference_keys(tmp_path):
    from dit_models import kontext_inputs

    model = tiny_flux_transformer(tmp_path / "t")
    grid, ref = (4, 6), (2, 4)
    inputs = kontext_inputs(grid, ref, text_len=3)
    with diffusers_attention_under_mask([grid, ref], 2, text_position="first", scale=_by_hand):
        expected = run(model, inputs)
    with clear_dit.patch(model, window_size=2, proportional_attention=True):
        out = run(model, inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", ["sd3", "sd3.5"])
def test_sd3_proportional_attention_matches_diffusers_under_the_mask(tmp_path, config):
    from dit_models import TINY_SD3_CONFIG

    model = tiny_sd3_transformer(tmp_path / "t", TINY_SD3_CONFIG if config == "sd3" else TINY_SD35_CONFIG)
    grid = (4, 6)
    inputs = sd3_inputs(grid, batch=2)
    with diffusers_attention_under_mask([grid], 2, text_position="last", scale=_by_hand):
        expected = run(model, inputs)
    with clear_dit.patch(model, window_size=2, proportional_attention=True):
        out = run(model, inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_processor_installed_without_patch_says_how_to_install_it(tmp_path):
    model = tiny_flux_transformer(tmp_path / "t")
    model.set_attn_processor(clear_dit.CLEARFluxAttnProcessor(window_size=2))
    with pytest.raises(ValueError, match=r"called without `clear_grid`: install it with clear_dit.patch"):
        run(model, flux_inputs((4, 4)))


def test_sd35_qk_norm_under_autocast_runs_like_diffusers(tmp_path):
    """Under bf16 autocast SD3.5's qk-norm gives fp32 queries/keys beside bf16 values: SDPA takes them in the
    autocast dtype, CLEAR refused them (every forward failed)."""
    model = tiny_sd3_transformer(tmp_path / "t", TINY_SD35_CONFIG)
    inputs = sd3_inputs((4, 4), batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = run(model, inputs)  # diffusers: fp32 q/k (qk-norm) and bf16 v, SDPA casts
        with clear_dit.patch(model, window_size=8):  # window covers the grid: full attention
            out = run(model, inputs)
    torch.testing.assert_close(out.float(), reference.float(), atol=3e-2, rtol=3e-2)
