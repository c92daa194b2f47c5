"""accelerate offload hooks and VAE tiling on a CLEAR-patched pipeline, as far as they run on a CPU."""

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, CpuOffload
from diffusers import FluxPipeline
from flux_models import run
from pipeline_models import transformer_inputs

import clear_dit
from pipelines.tiny import T5_MAX_LENGTH

CALL = dict(prompt="a red circle", num_inference_steps=1, output_type="np", max_sequence_length=T5_MAX_LENGTH)


@pytest.fixture()
def make_pipe(tiny_pipeline_path):
    """Fresh tiny FLUX pipelines (each test patches and hooks its own)."""

    def make():
        pipe = FluxPipeline.from_pretrained(tiny_pipeline_path)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def _generate(pipe, height=64, width=96):
    return pipe(**CALL, height=height, width=width, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("patch_first", [True, False])
def test_model_cpu_offload_runs_patched(make_pipe, patch_first):
    reference_pipe = make_pipe()
    clear_dit.patch(reference_pipe, window_size=2, down_factor=2)
    expected = _generate(reference_pipe)

    pipe = make_pipe()
    if patch_first:
        clear_dit.patch(pipe, window_size=2, down_factor=2)
    pipe.enable_model_cpu_offload(device="cpu")
    if not patch_first:
        clear_dit.patch(pipe, window_size=2, down_factor=2)
    assert isinstance(pipe.transformer._hf_hook, CpuOffload)
    torch.testing.assert_close(_generate(pipe), expected, atol=1e-6, rtol=0)


def test_sequential_cpu_offload_reaches_the_clear_parameters(make_pipe):
    pipe = make_pipe()
    clear_dit.patch(pipe, window_size=2, down_factor=2)
    processor = pipe.transformer.transformer_blocks[0].attn.processor
    calls = []
    processor.register_forward_pre_hook(lambda module, args: calls.append(module))
    run(pipe.transformer, transformer_inputs(pipe.transformer, (4, 4)))
    # processors run through nn.Module.__call__, so module hooks such as accelerate's see them
    assert calls == [processor]
    pipe.enable_sequential_cpu_offload(device="cpu")
    # the pooling weight is offloaded with the rest and brought back by its own hook at call time
    assert isinstance(processor._hf_hook, AlignDevicesHook) and processor._hf_hook.offload
    assert processor.spatial_weight.device.type == "meta"
    assert clear_dit.patch_handle(pipe).down_factor == 2
    # (accelerate 1.15 with torch 2.13 fails to run any model under sequential offload on a CPU-only
    # execution device, patched or not, so the call itself is exercised on GPU machines only)


def test_weights_refused_under_sequential_cpu_offload(make_pipe, tmp_path):
    """Offloaded parameters live on the meta device: a copy into them would be lost without a word."""
    source = make_pipe()
    clear_dit.patch(source, window_size=2)
    path = clear_dit.save_weights(source, tmp_path / "clear_local_2.safetensors")
    for patched in (False, True):
        pipe = make_pipe()
        if patched:
            clear_dit.patch(pipe, window_size=2)
        pipe.enable_sequential_cpu_offload(device="cpu")
        if patched:
            with pytest.raises(ValueError, match="cannot save CLEAR weights of a model under sequential CPU offload"):
                clear_dit.save_weights(pipe, tmp_path / "offloaded.safetensors")
            assert not (tmp_path / "offloaded.safetensors").exists()
        else:
            with pytest.raises(ValueError, match="cannot load CLEAR weights .* before enable_sequential_cpu_offload"):
                clear_dit.load_weights(pipe, path)
            assert clear_dit.patch_handle(pipe) is None  # refused before patching


def test_patch_with_pooling_refused_under_sequential_cpu_offload(make_pipe):
    """New pooling weights would be created on the meta device with no hook to give them data."""
    pipe = make_pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="under sequential CPU offload .* patch before enable_sequential_cpu_offload"):
        clear_dit.patch(pipe, window_size=2, down_factor=2)
    assert clear_dit.patch_handle(pipe) is None
    assert clear_dit.patch(pipe, window_size=2).down_factor == 1  # no pooling weights: nothing to lose


def test_vae_tiling_with_a_patched_pipeline(make_pipe, monkeypatch):
    pipe = make_pipe()
    clear_dit.patch(pipe, window_size=2)
    pipe.vae.enable_tiling()
    tiled = []
    original = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda *a, **kw: tiled.append(1) or original(*a, **kw))
    image = _generate(pipe, height=128, width=96)  # above the tiny VAE's 64 px tile
    assert image.shape == (1, 128, 96, 3) and tiled
