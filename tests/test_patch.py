"""clear_dit.patch / unpatch on a tiny real FluxTransformer2DModel."""

import json
import math
import types

import numpy as np
import pytest
import torch
from clear_oracle import diffusers_attention_under_mask
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from dit_models import sd3_inputs, tiny_flux_controlnet, tiny_sd3_transformer
from flux_models import flux_inputs, run, tiny_flux_transformer

import clear_dit
from clear_dit.patching import image_grid_from_ids


@pytest.fixture()
def model(tmp_path):
    return tiny_flux_transformer(tmp_path / "transformer")


@pytest.mark.parametrize("backend", ["auto", *clear_dit.available_backends()])
@pytest.mark.parametrize("text_len", [0, 5])
def test_radius_larger_than_grid_reproduces_full_attention(model, backend, text_len):
    inputs = flux_inputs((6, 4), text_len=text_len)
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=8, backend=backend):
        patched = run(model, inputs)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", clear_dit.available_backends())
@pytest.mark.parametrize("down_factor", [1, 2])
def test_small_radius_equals_dense_oracle(model, backend, down_factor):
    inputs = flux_inputs((6, 8), text_len=3, batch=2)
    full = run(model, inputs)
    with clear_dit.patch(model, window_size=2, down_factor=down_factor, backend="dense"):
        oracle = run(model, inputs)
    if down_factor == 1:  # the oracle itself, against diffusers' own processors under the mask written as loops
        with diffusers_attention_under_mask([(6, 8)], 2, text_position="first"):
            independent = run(model, inputs)
        torch.testing.assert_close(oracle, independent, atol=1e-5, rtol=1e-5)
    with clear_dit.patch(model, window_size=2, down_factor=down_factor, backend=backend):
        out = run(model, inputs)
    torch.testing.assert_close(out, oracle, atol=1e-4, rtol=1e-4)
    assert (oracle - full).abs().max() > 1e-3  # the local window really changes the result


def test_unpatch_restores_the_original_processors(model):
    inputs = flux_inputs((4, 4))
    originals = dict(model.attn_processors)
    reference = run(model, inputs)
    handle = clear_dit.patch(model, window_size=1, down_factor=2)
    assert handle.num_layers == 3 == len(originals)
    assert all(isinstance(p, clear_dit.CLEARFluxAttnProcessor) for p in model.attn_processors.values())
    assert clear_dit.patch_handle(model) is handle
    clear_dit.unpatch(model)
    assert clear_dit.patch_handle(model) is None
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())
    assert not any("spatial_weight" in k for k in model.state_dict())
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_context_manager_and_repatch(model):
    inputs = flux_inputs((4, 4))
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=1) as handle:
        assert handle.config == {
            "window_size": 1,
            "down_factor": 1,
            "backend": "auto",
            "proportional_attention": False,
        }
        second = clear_dit.patch(model, window_size=2)  # re-patching replaces the first patch
        assert clear_dit.patch_handle(model) is second
        assert next(iter(model.attn_processors.values())).window_size == 2
    # the first handle is stale: leaving its block does not touch the second patch
    assert clear_dit.patch_handle(model) is second
    second.unpatch()
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_nested_patches_come_back_in_order(model):
    """The inner block of nested ``with`` blocks ended with the model on full attention, loaded pooling weights
    gone, and the outer block patched nothing."""
    inputs = flux_inputs((6, 6), text_len=2)
    reference = run(model, inputs)
    with clear_dit.patch(model, window_size=1, down_factor=2) as outer:
        with torch.no_grad():
            for processor in model.attn_processors.values():
                processor.spatial_weight.copy_(torch.linspace(0.1, 0.9, 4).view(1, 1, 1, 2, 1, 2, 1))
        outer_processors, outer_out = dict(model.attn_processors), run(model, inputs)
        with clear_dit.patch(model, window_size=2, down_factor=2) as inner:
            assert clear_dit.patch_handle(model) is inner
            assert outer.processors == outer_processors  # its own, not the ones covering them
            assert (run(model, inputs) - outer_out).abs().max() > 1e-4
        assert clear_dit.patch_handle(model) is outer
        assert all(model.attn_processors[k] is v for k, v in outer_processors.items())
        torch.testing.assert_close(run(model, inputs), outer_out, atol=0, rtol=0)
        with pytest.raises(ValueError, match="would compute full attention"):  # its guards are back too
            model.set_attention_backend("flash")
    assert clear_dit.patch_handle(model) is None and "set_attention_backend" not in vars(model)
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_a_patch_whose_handle_ended_beneath_another_is_skipped_and_unpatch_ends_all(model):
    inputs = flux_inputs((4, 4))
    reference = run(model, inputs)
    first = clear_dit.patch(model, window_size=1)
    first_out = run(model, inputs)
    middle = clear_dit.patch(model, window_size=2)
    top = clear_dit.patch(model, window_size=3)
    middle.unpatch()  # covered: nothing changes now, and it does not come back
    assert clear_dit.patch_handle(model) is top
    top.unpatch()
    assert clear_dit.patch_handle(model) is first
    torch.testing.assert_close(run(model, inputs), first_out, atol=0, rtol=0)
    clear_dit.patch(model, window_size=2)
    clear_dit.unpatch(model)  # every patch of the model ends
    assert clear_dit.patch_handle(model) is None
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())


def test_a_patch_failing_half_way_leaves_every_model_as_it_was(model, tmp_path, monkeypatch):
    net = tiny_flux_controlnet(tmp_path / "net")
    pipe = types.SimpleNamespace(transformer=model, controlnet=net)
    inputs = flux_inputs((4, 4))
    reference = run(model, inputs)
    add_hooks = clear_dit.patching._add_grid_hooks

    def fail_on_the_controlnet(m, *args):
        if m is net:
            raise RuntimeError("injected")
        add_hooks(m, *args)

    monkeypatch.setattr(clear_dit.patching, "_add_grid_hooks", fail_on_the_controlnet)
    with pytest.raises(RuntimeError, match="injected"):
        clear_dit.patch(pipe, window_size=1)
    for m in (model, net):
        assert clear_dit.patch_handle(m) is None and not m._forward_pre_hooks and "set_attention_backend" not in vars(m)
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)
    first = clear_dit.patch(model, window_size=1)
    first_out = run(model, inputs)
    with pytest.raises(RuntimeError, match="injected"):  # over a patch: that patch stays in place
        clear_dit.patch(pipe, window_size=2)
    assert clear_dit.patch_handle(model) is first and clear_dit.patch_handle(net) is None
    assert len(model._forward_pre_hooks) == 1
    torch.testing.assert_close(run(model, inputs), first_out, atol=0, rtol=0)


def test_a_patch_failing_before_it_installs_leaves_the_patch_beneath_working(model, monkeypatch):
    """Building the new processors failed (out of memory on a GPU) after the patch beneath had lost its hooks and
    guards: every later call said "CLEAR processor called without clear_grid"."""
    inputs = flux_inputs((4, 4))
    clear_dit.patch(model, window_size=1)
    reference = run(model, inputs)
    guards = {k for k in vars(model) if k in ("set_attention_backend", "enable_parallelism")}

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(clear_dit.CLEARFluxAttnProcessor, "__init__", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        clear_dit.patch(model, window_size=2)
    monkeypatch.undo()
    assert len(model._forward_pre_hooks) == 1 and guards == {"set_attention_backend", "enable_parallelism"}
    assert {k for k in vars(model) if k in guards} == guards
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_hooks_and_guards_put_on_before_a_failure_are_taken_off(tmp_path, monkeypatch):
    net = tiny_flux_controlnet(tmp_path / "net")  # a read_grid hook, then one add_grid hook per attention layer
    register, calls = torch.nn.Module.register_forward_pre_hook, []

    def the_second_fails(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return register(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", the_second_fails)
    with pytest.raises(KeyboardInterrupt):
        clear_dit.patch(net, window_size=1)
    monkeypatch.undo()
    assert [m for m in net.modules() if m._forward_pre_hooks] == [] and clear_dit.patch_handle(net) is None
    set_attribute = torch.nn.Module.__setattr__

    def the_second_guard_fails(module, name, value):  # set_attention_backend is on by then
        if name == "enable_parallelism":
            raise KeyboardInterrupt
        set_attribute(module, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", the_second_guard_fails)
    with pytest.raises(KeyboardInterrupt):
        clear_dit.patch(net, window_size=1)
    monkeypatch.undo()
    assert not {"set_attention_backend", "enable_parallelism", "_load_ip_adapter_weights"} & set(vars(net))
    assert [m for m in net.modules() if m._forward_pre_hooks] == [] and clear_dit.patch_handle(net) is None


def test_repatching_with_a_new_radius_keeps_the_pooling_weights(model):
    inputs = flux_inputs((6, 6), text_len=2)
    clear_dit.patch(model, window_size=1, down_factor=2)
    with torch.no_grad():
        for i, processor in enumerate(model.attn_processors.values()):
            processor.spatial_weight.copy_(torch.linspace(0.1, 0.9, 4).view(1, 1, 1, 2, 1, 2, 1) * (i + 1))
    trained = {name: p.spatial_weight.clone() for name, p in model.attn_processors.items()}
    clear_dit.patch(model, window_size=2, down_factor=2)  # only the radius changes
    for name, processor in model.attn_processors.items():
        assert processor.window_size == 2
        torch.testing.assert_close(processor.spatial_weight, trained[name], atol=0, rtol=0)
    with_trained = run(model, inputs)
    clear_dit.unpatch(model)
    with clear_dit.patch(model, window_size=2, down_factor=2):  # a patch from scratch: uniform pooling
        assert all((p.spatial_weight == 0.25).all() for p in model.attn_processors.values())
        assert (run(model, inputs) - with_trained).abs().max() > 1e-4  # the pooling weights matter
    clear_dit.patch(model, window_size=2, down_factor=2)
    clear_dit.patch(model, window_size=1, down_factor=3)  # another pooling size starts uniform
    assert all((p.spatial_weight == 1 / 9).all() for p in model.attn_processors.values())
    clear_dit.unpatch(model)


@pytest.mark.parametrize("value", ["false", "no", 1, None])
def test_proportional_attention_must_be_a_bool(model, value):
    with pytest.raises(ValueError, match=r"proportional_attention must be True or False, got "):
        clear_dit.patch(model, window_size=2, proportional_attention=value)
    assert clear_dit.patch_handle(model) is None
    handle = clear_dit.patch(model, window_size=2, proportional_attention=np.bool_(True))
    assert handle.config["proportional_attention"] is True
    assert all(p.proportional_attention is True for p in model.attn_processors.values())
    handle.unpatch()


def test_an_attention_mask_is_refused_not_dropped(model):
    inputs = flux_inputs((4, 4), text_len=2)
    mask = torch.ones(1, 18, dtype=torch.bool)
    with clear_dit.patch(model, window_size=2):
        with pytest.raises(ValueError, match="CLEAR attention does not take an attention_mask"):
            model(**inputs, joint_attention_kwargs={"attention_mask": mask})


def test_a_compiled_model_patches_its_original_module(model):
    inputs = flux_inputs((4, 6), text_len=2)
    with clear_dit.patch(model, window_size=2):
        expected = run(model, inputs)
    compiled = torch.compile(model, backend="eager")
    handle = clear_dit.patch(compiled, window_size=2)
    assert handle.models == [model] and clear_dit.patch_handle(model) is handle
    torch.testing.assert_close(run(compiled, inputs), expected, atol=1e-6, rtol=1e-6)
    handle.unpatch()


def test_one_patched_model_serves_several_resolutions(model):
    a, b = flux_inputs((6, 4)), flux_inputs((4, 10), text_len=2)
    with clear_dit.patch(model, window_size=2, backend="dense"):
        first_a = run(model, a)
        out_b = run(model, b)
        second_a = run(model, a)
    assert out_b.shape == (1, 40, 16)
    torch.testing.assert_close(first_a, second_a, atol=0, rtol=0)


def test_grid_is_read_from_img_ids():
    ids = flux_inputs((3, 7))["img_ids"]
    assert image_grid_from_ids(ids) == (3, 7)
    assert image_grid_from_ids(ids[None]) == (3, 7)
    with pytest.raises(ValueError, match="row-major grid"):
        image_grid_from_ids(ids[:-2])
    column_major = ids.reshape(3, 7, 3).transpose(0, 1).reshape(-1, 3)  # the same tokens, in another order
    with pytest.raises(ValueError, match="row-major grid"):
        image_grid_from_ids(column_major)
    swapped = ids.clone()
    swapped[[4, 5]] = swapped[[5, 4]]
    with pytest.raises(ValueError, match="row-major grid"):
        image_grid_from_ids(swapped)
    from diffusers import FluxPipeline

    for side in (260, 300, 512):  # bf16 rounds ids above 256 (as diffusers builds them): still this grid
        wide = FluxPipeline._prepare_latent_image_ids(1, 2, side, "cpu", torch.bfloat16)
        assert image_grid_from_ids(wide) == (2, side)


def test_patch_rejects_unsupported_models_and_bad_arguments(model):
    with pytest.raises(ValueError, match=r"cannot patch Linear; supported transformers: FluxTransformer2DModel"):
        clear_dit.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        clear_dit.patch(model, window_size=0)
    with pytest.raises(ValueError, match="down_factor must be a positive int"):
        clear_dit.patch(model, window_size=4, down_factor=0)
    with pytest.raises(ValueError, match="unknown backend 'nope'; known backends: 'auto', 'dense'"):
        clear_dit.patch(model, window_size=4, backend="nope")
    with pytest.raises(ValueError, match=r"unknown backend \['dense'\]; known backends"):  # was: unhashable type
        clear_dit.patch(model, window_size=4, backend=["dense"])
    assert clear_dit.patch_handle(model) is None


def test_the_native_attention_backend_is_allowed_by_name_or_enum(model):
    from diffusers.models.attention_dispatch import AttentionBackendName

    inputs = flux_inputs((4, 4))
    with clear_dit.patch(model, window_size=1):
        expected = run(model, inputs)
        for backend in ("native", AttentionBackendName.NATIVE):  # str() of the enum is 'AttentionBackendName.NATIVE'
            model.set_attention_backend(backend)
            assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName.NATIVE}
            torch.testing.assert_close(run(model, inputs), expected, atol=0, rtol=0)  # and CLEAR still runs


def test_positional_arguments_reach_the_patched_forward(model, tmp_path):
    """transformer(latents, text, ...) as diffusers' own tests call it: the grid hook reads them too."""
    sd3 = tiny_sd3_transformer(tmp_path / "sd3")
    for m, inputs in ((model, flux_inputs((4, 4), text_len=2)), (sd3, sd3_inputs((4, 4)))):
        with clear_dit.patch(m, window_size=1):
            expected = run(m, inputs)
            rest = dict(inputs)
            hidden, text = rest.pop("hidden_states"), rest.pop("encoder_hidden_states")
            with torch.no_grad():
                torch.testing.assert_close(m(hidden, text, **rest)[0], expected, atol=0, rtol=0)


def test_the_callers_joint_attention_kwargs_are_not_mutated(model):
    kwargs = {"scale": 1.0}
    with clear_dit.patch(model, window_size=1), torch.no_grad():
        model(**flux_inputs((4, 4)), joint_attention_kwargs=kwargs)
    assert kwargs == {"scale": 1.0}


def test_tensor_parallel_enable_parallelism_reaches_diffusers(model, monkeypatch):
    from diffusers import FluxTransformer2DModel, ParallelConfig

    calls = []

    def enable_parallelism(self, *, config, cp_plan=None):
        calls.append(config)

    monkeypatch.setattr(FluxTransformer2DModel, "enable_parallelism", enable_parallelism)
    config = ParallelConfig()  # no context-parallel part (head sharding): passed on
    with clear_dit.patch(model, window_size=1):
        model.enable_parallelism(config=config)
    assert calls == [config]


def test_processors_take_the_models_floating_dtype(model):
    model.to(torch.bfloat16)
    with clear_dit.patch(model, window_size=1, down_factor=2):
        assert {p.dtype for proc in model.attn_processors.values() for p in proc.parameters()} == {torch.bfloat16}


def test_attention_switches_are_refused_not_left_to_fail_at_the_next_forward(model):
    """On FLUX they set an attention backend; the next forward then blamed set_attention_backend, never called."""
    inputs = flux_inputs((4, 4))
    with clear_dit.patch(model, window_size=1):
        expected = run(model, inputs)
        for call in (
            "enable_xformers_memory_efficient_attention",
            "disable_npu_flash_attention",
            "enable_xla_flash_attention",
        ):
            with pytest.raises(ValueError, match=r"\(\) on the CLEAR-patched FluxTransformer2DModel would replace"):
                getattr(model, call)()
        torch.testing.assert_close(run(model, inputs), expected, atol=0, rtol=0)
    model.disable_npu_flash_attention()  # unpatched: diffusers' own method again


def test_processors_take_the_compute_dtype_under_layerwise_casting(model):
    """Not the float8 storage dtype, which would round the pooling weights (a uniform 1/9 to 0.109)."""
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with clear_dit.patch(model, window_size=1, down_factor=3):
        assert {p.spatial_weight.dtype for p in model.attn_processors.values()} == {torch.float32}


def test_a_controlnet_with_a_custom_processor_is_refused_and_the_handle_names_the_transformer(model, tmp_path):
    net = tiny_flux_controlnet(tmp_path / "net")
    pipe = types.SimpleNamespace(transformer=model, controlnet=net)
    with clear_dit.patch(pipe, window_size=1) as handle:
        assert handle.transformer is model and handle.models == [model, net]
        assert set(handle.processors) == set(model.attn_processors)
    name = next(iter(net.attn_processors))

    class Custom:  # does more than attention
        def __call__(self, attn, *args, **kwargs):
            raise AssertionError

    net.get_submodule(name.removesuffix(".processor")).set_processor(Custom())
    with pytest.raises(ValueError, match="would drop the Custom of FluxControlNetModel"):
        clear_dit.patch(pipe, window_size=1)
    assert clear_dit.patch_handle(model) is None and clear_dit.patch_handle(net) is None


def test_patch_takes_numpy_integer_settings_as_ints(model):
    import numpy as np

    with clear_dit.patch(model, window_size=np.int64(4), down_factor=np.int32(1)) as handle:
        assert json.loads(json.dumps(handle.config))["window_size"] == 4  # numpy ints would not serialise
        assert type(handle.window_size) is int and type(handle.down_factor) is int


def test_grid_not_divisible_by_down_factor_is_a_clear_error(model):
    with clear_dit.patch(model, window_size=2, down_factor=4):
        with pytest.raises(ValueError, match="grid 6x4 is not divisible by down_factor 4"):
            run(model, flux_inputs((6, 4)))


def test_diffusers_attention_backends_are_refused_not_ignored(model):
    with clear_dit.patch(model, window_size=2):
        for processor in model.attn_processors.values():
            processor._attention_backend = "flash"
        with pytest.raises(ValueError, match="set_attention_backend cannot compute CLEAR"):
            run(model, flux_inputs((4, 4)))


def test_a_controlnet_listed_twice_is_patched_and_unpatched_once(tmp_path):
    import types

    from diffusers import FluxMultiControlNetModel
    from dit_models import tiny_flux_controlnet

    net = tiny_flux_controlnet(tmp_path / "net")
    originals, hooks = dict(net.attn_processors), len(net._forward_pre_hooks)
    pipe = types.SimpleNamespace(transformer=tiny_flux_transformer(tmp_path / "t"), controlnet=None)
    for unpatch in (lambda handle: clear_dit.unpatch(pipe), lambda handle: handle.unpatch()):
        pipe.controlnet = FluxMultiControlNetModel([net, net])  # one net for two conditions
        handle = clear_dit.patch(pipe, window_size=2)
        assert handle.num_layers == len(pipe.transformer.attn_processors) + len(originals)
        unpatch(handle)
        assert all(net.attn_processors[k] is v for k, v in originals.items())
        assert len(net._forward_pre_hooks) == hooks and clear_dit.patch_handle(net) is None


@pytest.mark.parametrize("down_factor", [1, 2])
def test_a_model_with_integer_weights_takes_the_dtype_of_its_floating_ones(model, down_factor):
    """As a bitsandbytes / GGUF model stores some weights: the processors must not take an integer dtype."""
    name, first = next(model.named_parameters())
    owner, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(owner), attr, torch.nn.Parameter(first.detach().to(torch.uint8), requires_grad=False))
    clear_dit.patch(model, window_size=2, down_factor=down_factor)
    dtypes = {p.dtype for processor in model.attn_processors.values() for p in processor.parameters()}
    assert dtypes == ({torch.float32} if down_factor > 1 else set())


def test_proportional_attention_scales_by_the_key_length(model, monkeypatch):
    """sqrt(log_4608(N_k) / head_dim), N_k the keys of the layer (DESIGN.md 1.1): checked by hand values, against
    diffusers' processors run under the mask with that scale, and with pooled keys counted in N_k."""
    assert clear_dit.proportional_scale(4608, 64) == pytest.approx(1 / 8)  # the training length: plain 1/sqrt(d)
    assert clear_dit.proportional_scale(4608**2, 128) == pytest.approx(1 / 8)  # log_4608 = 2
    inputs = flux_inputs((6, 8), text_len=3)
    with clear_dit.patch(model, window_size=2, proportional_attention=True):
        patched = run(model, inputs)
    by_hand = lambda keys, dim: math.sqrt(math.log(keys) / math.log(4608) / dim)  # noqa: E731
    with diffusers_attention_under_mask([(6, 8)], 2, text_position="first", scale=by_hand):
        expected = run(model, inputs)
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)

    import clear_dit.processors as processors

    lengths = []
    monkeypatch.setattr(processors, "proportional_scale", lambda n, d: lengths.append(n) or by_hand(n, d))
    with clear_dit.patch(model, window_size=2, down_factor=2, proportional_attention=True):
        run(model, inputs)
    assert set(lengths) == {3 + 6 * 8 + 3 * 4}  # text + image + pooled keys


def test_compiled_nets_inside_a_multi_controlnet_are_patched_as_their_modules(tmp_path):
    from diffusers import FluxMultiControlNetModel

    net = tiny_flux_controlnet(tmp_path / "net")
    model = tiny_flux_transformer(tmp_path / "t")
    pipe = types.SimpleNamespace(transformer=model, controlnet=FluxMultiControlNetModel([torch.compile(net)]))
    handle = clear_dit.patch(pipe, window_size=2)
    assert handle.models == [model, net] and clear_dit.patch_handle(net) is handle
    clear_dit.unpatch(pipe)
    assert clear_dit.patch_handle(net) is None


def test_a_pipeline_without_a_transformer_is_refused_by_name():
    """A UNet pipeline: an IndexError from patch, and unpatch did nothing without a word."""
    unet_pipe = types.SimpleNamespace(unet=torch.nn.Linear(2, 2), transformer=None, controlnet=None)
    for call in (clear_dit.patch, clear_dit.unpatch):
        with pytest.raises(ValueError, match="clear_dit cannot patch SimpleNamespace"):
            call(unet_pipe)


def test_a_handle_ended_by_unpatch_lists_no_models(tmp_path):
    model = tiny_flux_transformer(tmp_path / "t")
    handle = clear_dit.patch(model, window_size=2)
    clear_dit.unpatch(model)
    assert handle.models == [] and handle.processors == {}


def test_the_grid_of_the_call_wins_over_a_stale_clear_grid_in_joint_attention_kwargs(model):
    """the grid read from img_ids must override any clear_grid the caller's joint_attention_kwargs carry
    (a dict reused from a call at another resolution)."""
    inputs = flux_inputs((4, 6), text_len=2)
    with clear_dit.patch(model, window_size=2):
        expected = run(model, inputs)
        with torch.no_grad():
            out = model(**inputs, joint_attention_kwargs={"clear_grid": (6, 4), "clear_reference_grid": None})[0]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_native_backend_in_any_case_is_accepted_as_diffusers_accepts_it(model):
    """diffusers lower-cases the backend name; the patched model's guard must accept 'NATIVE' like 'native'."""
    with clear_dit.patch(model, window_size=1):
        model.set_attention_backend("NATIVE")
        assert {str(p._attention_backend.value) for p in model.attn_processors.values()} == {"native"}


def test_nested_patches_leave_no_hook_behind(model):
    """the patch beneath a new one must have its hooks taken off, or they leak past unpatch."""
    outer = clear_dit.patch(model, window_size=1)
    inner = clear_dit.patch(model, window_size=2)
    assert len(model._forward_pre_hooks) == 1
    inner.unpatch()
    outer.unpatch()
    assert len(model._forward_pre_hooks) == 0


def test_two_ended_patches_beneath_are_both_skipped(model):
    """the walk down skips every ended patch, not only the nearest one."""
    inputs = flux_inputs((4, 4))
    reference = run(model, inputs)
    first, second = clear_dit.patch(model, window_size=1), clear_dit.patch(model, window_size=2)
    top = clear_dit.patch(model, window_size=3)
    first.unpatch()
    second.unpatch()
    top.unpatch()
    assert clear_dit.patch_handle(model) is None
    assert all(isinstance(p, FluxAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(run(model, inputs), reference, atol=0, rtol=0)


def test_a_context_parallel_config_put_on_the_processors_behind_the_guard_is_refused(model):
    """what diffusers' enable_parallelism sets on every processor for context parallelism (reached by
    type(model).enable_parallelism, past the instance guard) must fail at the forward, not compute silently."""
    with clear_dit.patch(model, window_size=1):
        for processor in model.attn_processors.values():
            processor._parallel_config = object()
        with pytest.raises(ValueError, match="context parallelism"):
            run(model, flux_inputs((4, 4)))


def test_set_attn_processor_is_refused_while_patched(model):
    """It ran full attention while patch_handle() still reported the patch, warning on every layer of every call."""
    with clear_dit.patch(model, window_size=1):
        with pytest.raises(ValueError, match=r"set_attn_processor\(\) on the CLEAR-patched FluxTransformer2DModel"):
            model.set_attn_processor(FluxAttnProcessor())
        assert all(isinstance(p, clear_dit.CLEARFluxAttnProcessor) for p in model.attn_processors.values())
    model.set_attn_processor(FluxAttnProcessor())  # unpatched: diffusers' own method again
    assert "set_attn_processor" not in vars(model)
