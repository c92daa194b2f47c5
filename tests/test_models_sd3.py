"""SD3 / SD3.5 (SD3Transformer2DModel): text-last joint attention, qk-norm and SD3.5's image-only attn2."""

import pytest
import torch
from clear_oracle import diffusers_attention_under_mask
from diffusers.models.attention_processor import JointAttnProcessor2_0
from dit_models import TINY_SD3_CONFIG, TINY_SD35_CONFIG, sd3_inputs, tiny_sd3_transformer
from flux_models import run

import clear_dit

CONFIGS = {"sd3": TINY_SD3_CONFIG, "sd3.5": TINY_SD35_CONFIG}


@pytest.fixture(params=list(CONFIGS), scope="module")
def model(request, tmp_path_factory):
    return tiny_sd3_transformer(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])


def test_radius_larger_than_grid_reproduces_full_attention(model):
    inputs = sd3_inputs((4, 6))
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=8) as handle:
        assert handle.num_layers == len(model.attn_processors) == (3 if model.config.dual_attention_layers else 2)
        patched = run(model, inputs)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in model.attn_processors.values())


def test_small_radius_equals_diffusers_attention_under_the_clear_mask(model):
    grid, r = (4, 6), 2
    inputs = sd3_inputs(grid, batch=2)
    full = run(model, inputs)
    with diffusers_attention_under_mask([grid], r, text_position="last"):
        oracle = run(model, inputs)  # diffusers' own JointAttnProcessor2_0, CLEAR mask injected into SDPA
    with clear_dit.patch(model, window_size=r):
        out = run(model, inputs)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    assert (oracle - full).abs().max() > 1e-3


@pytest.mark.parametrize("backend", clear_dit.available_backends())
def test_backends_equal_the_dense_oracle_with_pooled_tokens(model, backend):
    inputs = sd3_inputs((4, 6), text_len=3)
    with clear_dit.patch(model, window_size=2, down_factor=2, backend="dense"):
        oracle = run(model, inputs)
    with clear_dit.patch(model, window_size=2, down_factor=2, backend=backend):
        out = run(model, inputs)
    torch.testing.assert_close(out, oracle, atol=1e-4, rtol=1e-4)


def test_grid_comes_from_the_latent_shape_and_patch_size(model):
    with clear_dit.patch(model, window_size=1, backend="dense"):
        for grid in [(4, 6), (6, 2)]:
            out = run(model, sd3_inputs(grid))
            assert out.shape[-2:] == (grid[0] * TINY_SD3_CONFIG["patch_size"], grid[1] * TINY_SD3_CONFIG["patch_size"])
    with clear_dit.patch(model, window_size=1, down_factor=2):
        with pytest.raises(ValueError, match="grid 3x2 is not divisible by down_factor 2"):
            run(model, sd3_inputs((3, 2)))


def test_methods_that_would_bring_full_attention_back_are_refused(model):
    inputs = sd3_inputs((4, 4))
    with clear_dit.patch(model, window_size=1):
        expected = run(model, inputs)
        with pytest.raises(ValueError, match=r"fuse_qkv_projections\(\) on the CLEAR-patched SD3Transformer2DModel"):
            model.fuse_qkv_projections()
        with pytest.raises(ValueError, match=r"set_attention_backend\('flash'\) would compute full attention"):
            model.set_attention_backend("flash")
        model.set_attention_backend("native")  # a no-op for CLEAR
        # (enable|disable)_xformers_memory_efficient_attention swap SD3's processors (disable: for AttnProcessor2_0,
        # not even joint attention), and the next forward failed on a shape
        for switch in ("xformers_memory_efficient_attention", "npu_flash_attention", "xla_flash_attention"):
            with pytest.raises(ValueError, match=r"set_use_.*\(\) on the CLEAR-patched SD3"):
                getattr(model, f"disable_{switch}")()
        assert all(isinstance(p, clear_dit.CLEARJointAttnProcessor) for p in model.attn_processors.values())
        torch.testing.assert_close(run(model, inputs), expected, atol=0, rtol=0)
    model.fuse_qkv_projections()  # unpatched: diffusers' own methods are back
    model.unfuse_qkv_projections()


def test_packed_hidden_states_name_the_latent_shape_sd3_needs(model):
    inputs = sd3_inputs((4, 4))
    inputs["hidden_states"] = inputs["hidden_states"].flatten(2).transpose(1, 2)  # packed tokens, as FLUX takes them
    with clear_dit.patch(model, window_size=1):
        with pytest.raises(ValueError, match=r"needs latent `hidden_states` \(batch, channels, height, width\)"):
            run(model, inputs)


def test_ip_adapters_are_refused_while_patched_and_unpatch_survives_added_layers(model):
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    inputs = sd3_inputs((4, 4))
    reference = run(model, inputs)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    layer = SD3IPAdapterJointAttnProcessor2_0(width, width, model.config.attention_head_dim, timesteps_emb_dim=16)
    projection = IPAdapterTimeImageProjection(
        embed_dim=width, output_dim=width, hidden_dim=64, heads=1, num_queries=4, timestep_in_dim=16
    )
    adapter = {
        "ip_adapter": {f"{i}.{k}": v for i in range(len(model.attn_processors)) for k, v in layer.state_dict().items()},
        "image_proj": projection.state_dict(),
    }
    originals = dict(model.attn_processors)
    handle = clear_dit.patch(model, window_size=1)
    with pytest.raises(
        ValueError, match=r"load_ip_adapter\(\) on the CLEAR-patched SD3Transformer2DModel: CLEAR does not"
    ):
        model._load_ip_adapter_weights(adapter, low_cpu_mem_usage=False)  # what pipe.load_ip_adapter() calls
    assert all(isinstance(p, clear_dit.CLEARJointAttnProcessor) for p in model.attn_processors.values())
    # layers added behind the guard's back (the loader adds image-projection attention) do not block unpatch
    guard = vars(model).pop("set_attn_processor")  # which the loader calls: past that guard too
    type(model)._load_ip_adapter_weights(model, adapter, low_cpu_mem_usage=False)
    model.set_attn_processor = guard
    assert len(model.attn_processors) > len(originals)
    handle.unpatch()
    assert clear_dit.patch_handle(model) is None
    assert all(model.attn_processors[name] is processor for name, processor in originals.items())
    assert "_load_ip_adapter_weights" not in model.__dict__
    del model.image_proj  # back to the model without an adapter
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_processors_that_do_more_than_attention_are_not_dropped(model):
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    inputs = sd3_inputs((4, 4))
    reference = run(model, inputs)
    originals = dict(model.attn_processors)
    model.set_attn_processor({**originals, "transformer_blocks.1.attn.processor": PAGJointAttnProcessor2_0()})
    try:
        with pytest.raises(ValueError, match=r"would drop the PAGJointAttnProcessor2_0 of SD3Transformer2DModel"):
            clear_dit.patch(model, window_size=1)
        assert clear_dit.patch_handle(model) is None
    finally:
        model.set_attn_processor(originals)
    model.fuse_qkv_projections()  # fused before patch: to_q/to_k/to_v stay, and CLEAR uses them
    with clear_dit.patch(model, window_size=8):
        torch.testing.assert_close(run(model, inputs), reference, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()


def test_a_pipeline_with_an_unsupported_model_names_it(model):
    from diffusers import SD3ControlNetModel

    controlnet = SD3ControlNetModel(**{k: v for k, v in TINY_SD3_CONFIG.items() if k != "pos_embed_max_size"})
    pipe_like = type("Pipe", (), {"transformer": model, "controlnet": controlnet})()
    with pytest.raises(
        ValueError,
        match=r"cannot patch SD3ControlNetModel; supported transformers: FluxTransformer2DModel, "
        r"FluxControlNetModel, SD3Transformer2DModel \(or a pipeline whose \.transformer / \.controlnet",
    ):
        clear_dit.patch(pipe_like, window_size=2)
    assert clear_dit.patch_handle(model) is None  # nothing was patched
