"""LoRA (peft) on a CLEAR-patched pipeline: load before or after patch, set_adapters, fuse/unfuse, unload; and CLEAR
weights loaded into a LoRA-carrying transformer (peft's `.base_layer.` names)."""

import pytest
import torch
from diffusers import FluxPipeline
from flux_models import run
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pipeline_models import flux_transformer_variant, transformer_inputs

import clear_dit

CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA on the attention projections and a feed-forward layer, written by FluxPipeline.save_lora_weights."""
    folder = tmp_path_factory.mktemp("lora")
    transformer = flux_transformer_variant(folder / "base")
    torch.manual_seed(5)
    config = LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"], init_lora_weights=False)
    transformer.add_adapter(config)
    FluxPipeline.save_lora_weights(folder / "style", transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "style"


def test_lora_before_or_after_patch_set_adapters_fuse_and_unload(tiny_pipe, lora_dir):
    pipe = tiny_pipe
    transformer = pipe.transformer
    inputs = transformer_inputs(transformer, (4, 6))
    with clear_dit.patch(pipe, window_size=2):
        base = run(transformer, inputs)

    handle = clear_dit.patch(pipe, window_size=2)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    styled = run(transformer, inputs)
    assert (styled - base).abs().max() > 1e-3
    assert all(isinstance(p, clear_dit.CLEARFluxAttnProcessor) for p in transformer.attn_processors.values())
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    torch.testing.assert_close(run(transformer, inputs), base, **CLOSE)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    torch.testing.assert_close(run(transformer, inputs), styled, **CLOSE)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(transformer, inputs), base, **CLOSE)
    assert clear_dit.patch_handle(pipe) is handle
    handle.unpatch()

    pipe.load_lora_weights(lora_dir, adapter_name="style")  # LoRA first, then CLEAR
    with clear_dit.patch(pipe, window_size=2):
        torch.testing.assert_close(run(transformer, inputs), styled, **CLOSE)


def test_clear_weights_load_into_a_lora_carrying_transformer(tiny_pipeline_path, lora_dir, tmp_path):
    student, pipe = (FluxPipeline.from_pretrained(tiny_pipeline_path) for _ in range(2))
    clear_dit.patch(student, window_size=2, down_factor=2)
    with torch.no_grad():
        for name, param in student.transformer.named_parameters():
            if clear_dit.weights.is_clear_key(name):
                param.add_(torch.randn_like(param) * 0.05)
    path = clear_dit.save_weights(student, tmp_path / "clear.safetensors")
    student.load_lora_weights(lora_dir, adapter_name="style")
    inputs = transformer_inputs(pipe.transformer, (4, 6))
    expected = run(student.transformer, inputs)

    pipe.load_lora_weights(lora_dir, adapter_name="style")
    assert any(".base_layer." in name for name in pipe.transformer.state_dict())
    handle = clear_dit.load_weights(pipe, path)
    assert (handle.window_size, handle.down_factor) == (2, 2)
    torch.testing.assert_close(run(pipe.transformer, inputs), expected, **CLOSE)
    saved = clear_dit.clear_state_dict(student)
    loaded = clear_dit.clear_state_dict(pipe)
    assert set(loaded) == set(saved) and not any("base_layer" in name or "lora" in name for name in loaded)
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)

    pipe.fuse_lora()
    with pytest.raises(ValueError, match="carry a fused LoRA: call unfuse_lora"):
        clear_dit.load_weights(pipe, path)
    # saved, the fused layers would carry the LoRA into the CLEAR file: applied twice beside the LoRA later
    with pytest.raises(ValueError, match=r"carry a fused LoRA: call unfuse_lora\(\) before saving CLEAR weights"):
        clear_dit.save_weights(pipe, tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()


def test_highres_gives_a_lora_carrying_model_its_weights_back(tiny_pipeline_path, lora_dir, tmp_path):
    """The CLEAR stages load the student's projections into peft's base layers; the teacher's come back after."""
    from pipelines.highres import HighResFluxPipeline

    student = FluxPipeline.from_pretrained(tiny_pipeline_path)
    clear_dit.patch(student, window_size=2)
    with torch.no_grad():
        for name, param in student.transformer.named_parameters():
            if clear_dit.weights.is_clear_key(name):
                param.add_(1.0)
    path = clear_dit.save_weights(student, tmp_path / "clear_local_2.safetensors")
    pipe = HighResFluxPipeline.from_pipe(FluxPipeline.from_pretrained(tiny_pipeline_path))
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    before = {k: v.clone() for k, v in clear_dit.clear_state_dict(pipe).items()}
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append(
            torch.equal(
                clear_dit.clear_state_dict(p)["transformer_blocks.0.attn.to_q.weight"],
                clear_dit.read_weights(path).tensors["transformer_blocks.0.attn.to_q.weight"],
            )
        )
        return kwargs

    pipe("a red circle", stages=[(64, 64), (128, 128)], num_inference_steps=1, clear_weights=path,
         output_type="latent", callback_on_step_end=callback)  # fmt: skip
    assert seen == [False, True]  # the student's projections in the CLEAR stage only
    after = clear_dit.clear_state_dict(pipe)
    assert all(torch.equal(after[k], v) for k, v in before.items())
