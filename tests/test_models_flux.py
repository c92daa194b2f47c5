"""FLUX ControlNet (plain, union, multi) and FLUX Kontext (target + reference image) at the model level."""

import pytest
import torch
from clear_oracle import diffusers_attention_under_mask
from diffusers import FluxMultiControlNetModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from dit_models import controlnet_inputs, kontext_inputs, tiny_flux_controlnet
from flux_models import flux_inputs, run, tiny_flux_transformer

import clear_dit
from clear_dit.patching import image_grids_from_ids


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    return tiny_flux_transformer(tmp_path_factory.mktemp("transformer"))


@pytest.fixture(scope="module")
def union(tmp_path_factory):
    return tiny_flux_controlnet(tmp_path_factory.mktemp("union"), num_mode=3)


def controlnet_run(net, inputs):
    with torch.no_grad():
        blocks, single = net(**inputs)
    return torch.cat(blocks + single, dim=1)


@pytest.mark.parametrize("mode", [None, 2])
def test_controlnet_local_attention_equals_diffusers_under_the_clear_mask(tmp_path, union, mode):
    net = union if mode is not None else tiny_flux_controlnet(tmp_path / "plain")
    grid, r = (4, 6), 2
    inputs = controlnet_inputs(grid, text_len=4, mode=mode)
    reference = controlnet_run(net, inputs)
    with clear_dit.patch(net, window_size=8):
        torch.testing.assert_close(controlnet_run(net, inputs), reference, atol=1e-5, rtol=1e-5)
    with diffusers_attention_under_mask([grid], r, text_position="first"):
        oracle = controlnet_run(net, inputs)  # the union mode token counts as one more text token
    with clear_dit.patch(net, window_size=r) as handle:
        assert handle.num_layers == 2
        torch.testing.assert_close(controlnet_run(net, inputs), oracle, atol=1e-5, rtol=1e-5)
    assert (oracle - reference).abs().max() > 1e-3


def test_patch_covers_every_net_of_a_multi_controlnet(tmp_path, transformer, union):
    plain = tiny_flux_controlnet(tmp_path / "plain")
    multi = FluxMultiControlNetModel([plain, union])
    pipe_like = type("Pipe", (), {"transformer": transformer, "controlnet": multi})()
    handle = clear_dit.patch(pipe_like, window_size=2)
    assert handle.models == [transformer, plain, union] and handle.num_layers == 3 + 2 + 2
    assert clear_dit.patch_handle(pipe_like) is handle and clear_dit.patch_handle(union) is handle
    clear_dit.unpatch(union)  # one model on its own
    assert isinstance(union.attn_processors["transformer_blocks.0.attn.processor"], FluxAttnProcessor)
    assert handle.models == [transformer, plain]
    clear_dit.unpatch(pipe_like)
    assert all(clear_dit.patch_handle(m) is None for m in (transformer, plain, union))
    assert not any(isinstance(p, clear_dit.CLEARFluxAttnProcessor) for p in plain.attn_processors.values())


@pytest.mark.parametrize(("grid", "ref"), [((4, 6), (4, 6)), ((4, 4), (6, 2))])
def test_kontext_reference_tokens_share_the_target_coordinates(transformer, grid, ref):
    inputs = kontext_inputs(grid, ref, text_len=3)
    assert image_grids_from_ids(inputs["img_ids"]) == (grid, ref)
    reference = run(transformer, inputs)
    with clear_dit.patch(transformer, window_size=8):
        torch.testing.assert_close(run(transformer, inputs), reference, atol=1e-5, rtol=1e-5)
    with diffusers_attention_under_mask([grid, ref], 2, text_position="first"):
        oracle = run(transformer, inputs)
    with clear_dit.patch(transformer, window_size=2):
        out = run(transformer, inputs)
    assert out.shape == (1, grid[0] * grid[1] + ref[0] * ref[1], 16)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert (oracle - reference).abs().max() > 1e-3


@pytest.mark.parametrize("backend", clear_dit.available_backends())
def test_kontext_backends_equal_the_dense_oracle_with_pooled_tokens(transformer, backend):
    inputs = kontext_inputs((4, 6), (2, 4))
    with clear_dit.patch(transformer, window_size=2, down_factor=2, backend="dense"):
        oracle = run(transformer, inputs)
    with clear_dit.patch(transformer, window_size=2, down_factor=2, backend=backend, proportional_attention=True):
        scaled = run(transformer, inputs)
    with clear_dit.patch(transformer, window_size=2, down_factor=2, backend=backend):
        out = run(transformer, inputs)
    torch.testing.assert_close(out, oracle, atol=1e-4, rtol=1e-4)
    assert (scaled - out).abs().max() > 1e-4


def test_img_ids_that_are_not_target_then_reference_grids_are_refused():
    ids = kontext_inputs((2, 3), (2, 2))["img_ids"]
    with pytest.raises(ValueError, match=r"row-major grid 2x3 \(rows of 3 tokens\) followed by a reference grid 1x2"):
        image_grids_from_ids(ids[:-1])
    with pytest.raises(ValueError, match="row-major grid"):
        image_grids_from_ids(torch.cat([ids[6:], ids[:6]]))  # reference first
    assert image_grids_from_ids(flux_inputs((3, 5))["img_ids"][None]) == ((3, 5), None)


def test_diffusers_attention_backends_and_context_parallelism_fail_fast(transformer):
    from diffusers import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()
    inputs = flux_inputs((4, 4))
    with clear_dit.patch(transformer, window_size=1):
        expected = run(transformer, inputs)
        with pytest.raises(ValueError, match=r"set_attention_backend\('_native_flash'\) would compute full attention"):
            transformer.set_attention_backend("_native_flash")
        with pytest.raises(ValueError, match="context parallelism splits the sequence of FluxTransformer2DModel"):
            transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
        # refused before any side effect: no processor, no model attribute, no global backend changed
        assert _AttentionBackendRegistry.get_active_backend() == active and transformer._parallel_config is None
        assert all(p._attention_backend is None for p in transformer.attn_processors.values())
        torch.testing.assert_close(run(transformer, inputs), expected, atol=0, rtol=0)
    assert "set_attention_backend" not in vars(transformer)  # diffusers' own method is back

    transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    try:
        with pytest.raises(ValueError, match="context parallelism splits the sequence"):
            clear_dit.patch(transformer, window_size=1)
    finally:
        transformer._parallel_config = None
