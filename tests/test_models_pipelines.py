"""One full call of every supported pipeline class, patched: FLUX t2i / schnell-like / img2img / inpaint / Fill /
Control / Kontext / ControlNet (union, multi), SD3 and SD3.5 (text-to-image and img2img)."""

import pytest
import torch
from diffusers import (
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxMultiControlNetModel,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3PAGPipeline,
)
from PIL import Image
from pipeline_models import flux_controlnet, flux_transformer_variant, tiny_sd3_pipeline

import clear_dit
from pipelines.tiny import T5_MAX_LENGTH

HEIGHT, WIDTH = 64, 96  # a 4 x 6 token grid
CALL = dict(prompt="a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=1, output_type="pil")


@pytest.fixture(scope="module")
def flux_pipe(tiny_pipeline_path):
    pipe = FluxPipeline.from_pretrained(tiny_pipeline_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int, size=(WIDTH, HEIGHT)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def _mask() -> Image.Image:
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (16, 16, 64, 48))
    return mask


def _variant(name, flux_pipe, folder):
    """(pipeline, extra call kwargs) for one FLUX pipeline class, sharing the tiny pipeline's parts."""
    if name == "t2i":
        return flux_pipe, {}
    if name == "schnell":  # no guidance embedding, guidance_scale 0
        transformer = flux_transformer_variant(folder, guidance_embeds=False)
        return FluxPipeline.from_pipe(flux_pipe, transformer=transformer), {"guidance_scale": 0.0}
    if name == "img2img":
        return FluxImg2ImgPipeline.from_pipe(flux_pipe), {"image": _image(1), "strength": 1.0}
    if name == "inpaint":
        return FluxInpaintPipeline.from_pipe(flux_pipe), {"image": _image(1), "mask_image": _mask(), "strength": 1.0}
    if name == "fill":  # latents + masked-image latents + packed 8x8 mask as input channels
        transformer = flux_transformer_variant(folder, in_channels=64 + 64 + 256, out_channels=64)
        pipe = FluxFillPipeline.from_pipe(flux_pipe, transformer=transformer)
        return pipe, {"image": _image(1), "mask_image": _mask()}
    if name == "control":  # Canny/Depth: control-image latents concatenated as channels
        transformer = flux_transformer_variant(folder, in_channels=128, out_channels=64)
        return FluxControlPipeline.from_pipe(flux_pipe, transformer=transformer), {"control_image": _image(2)}
    if name == "kontext":  # a 3 x 4 token reference image after the target's tokens
        return FluxKontextPipeline.from_pipe(flux_pipe), {
            "image": _image(3, (64, 48)),
            "_auto_resize": False,
            "max_area": HEIGHT * WIDTH,
        }
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["t2i", "schnell", "img2img", "inpaint", "fill", "control", "kontext"])
def test_flux_pipelines_run_patched(flux_pipe, tmp_path, name):
    pipe, extra = _variant(name, flux_pipe, tmp_path / "transformer")
    seen = []
    with clear_dit.patch(pipe, window_size=2):
        probe = pipe.transformer.register_forward_pre_hook(  # runs after CLEAR's hook: sees the grid it read
            lambda module, args, kwargs: seen.append(kwargs["joint_attention_kwargs"]), with_kwargs=True
        )
        image = pipe(**CALL, **extra, max_sequence_length=T5_MAX_LENGTH).images[0]
        probe.remove()
    assert image.size == (WIDTH, HEIGHT)
    reference = (3, 4) if name == "kontext" else None
    assert seen and all(kw["clear_grid"] == (4, 6) and kw["clear_reference_grid"] == reference for kw in seen)


@pytest.mark.parametrize("multi", [False, True])
def test_flux_controlnet_pipeline_patches_the_controlnets_too(flux_pipe, tmp_path, multi):
    union = flux_controlnet(tmp_path / "union", num_mode=4)
    if multi:
        controlnet = FluxMultiControlNetModel([flux_controlnet(tmp_path / "plain"), union])
        extra = {
            "control_image": [_image(4), _image(5)],
            "control_mode": [None, 2],
            "controlnet_conditioning_scale": [1.0, 0.5],
        }
    else:
        controlnet, extra = union, {"control_image": _image(4), "control_mode": 2}
    pipe = FluxControlNetPipeline.from_pipe(flux_pipe, controlnet=controlnet)
    with clear_dit.patch(pipe, window_size=2) as handle:
        nets = list(controlnet.nets) if multi else [controlnet]
        assert handle.models == [pipe.transformer, *nets]
        assert all(isinstance(p, clear_dit.CLEARFluxAttnProcessor) for n in nets for p in n.attn_processors.values())
        image = pipe(**CALL, **extra, max_sequence_length=T5_MAX_LENGTH).images[0]
    assert image.size == (WIDTH, HEIGHT)


def test_perturbed_attention_guidance_on_a_patched_pipeline_is_one_line(tmp_path):
    """The PAG pipeline assigns a plain processor object over CLEAR's processor module: torch's bare TypeError."""
    pipe = StableDiffusion3PAGPipeline.from_pipe(tiny_sd3_pipeline(tmp_path / "sd3"), pag_applied_layers=["blocks.0"])
    pipe.set_progress_bar_config(disable=True)
    call = dict(CALL, max_sequence_length=16, output_type="pt")
    with clear_dit.patch(pipe, window_size=2):
        with pytest.raises(ValueError, match="perturbed-attention guidance puts full-attention PAG processors on"):
            pipe(**call, pag_scale=3.0)
        assert all(isinstance(p, clear_dit.CLEARJointAttnProcessor) for p in pipe.transformer.attn_processors.values())
        assert pipe(**call, pag_scale=0.0).images.shape[-2:] == (HEIGHT, WIDTH)  # no PAG: CLEAR runs
    assert pipe(**call, pag_scale=3.0).images.shape[-2:] == (HEIGHT, WIDTH)  # unpatched: diffusers' PAG runs


@pytest.mark.parametrize("dual_attention", [False, True], ids=["sd3", "sd3.5"])
def test_sd3_pipeline_runs_patched(tmp_path, dual_attention):
    pipe = tiny_sd3_pipeline(tmp_path / "sd3", dual_attention=dual_attention)
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    with clear_dit.patch(pipe, window_size=2, down_factor=2) as handle:
        assert handle.num_layers == (3 if dual_attention else 2)
        image = pipe(**CALL, max_sequence_length=16).images[0]
        edited = img2img(**CALL, image=_image(6), strength=1.0, max_sequence_length=16).images[0]
    assert image.size == edited.size == (WIDTH, HEIGHT)


def test_patched_flux_controlnet_refuses_gradient_checkpointing(tmp_path):
    """Its grid reaches the attention through per-model state, which a checkpoint's recompute would read stale."""
    from pipeline_models import transformer_inputs

    net = flux_controlnet(tmp_path / "controlnet")
    inputs = transformer_inputs(net, (4, 6))
    inputs["controlnet_cond"] = torch.randn_like(inputs["hidden_states"])
    net.enable_gradient_checkpointing()
    net.train()
    with clear_dit.patch(net, window_size=2):
        with pytest.raises(ValueError, match="cannot train with gradient checkpointing: disable_gradient_checkpoint"):
            net(**inputs)
        with torch.no_grad():  # inference recomputes nothing
            net(**inputs)


def test_a_patched_pipeline_refuses_ip_adapters_before_loading_the_image_encoder(flux_pipe, tmp_path):
    """diffusers' load_ip_adapter loads (and attaches) the image encoder before the model's own guard refuses."""
    missing = str(tmp_path / "no-such-adapter")  # diffusers itself fails on it, only later than the guard
    pipe = FluxPipeline.from_pipe(flux_pipe)
    try:
        with clear_dit.patch(pipe, window_size=2):
            with pytest.raises(ValueError, match=r"load_ip_adapter\(\) on the CLEAR-patched FluxTransformer2DModel"):
                pipe.load_ip_adapter(
                    missing, weight_name="ip.safetensors", image_encoder_pretrained_model_name_or_path=missing
                )
            clear_dit.unpatch(pipe.transformer)  # unpatched through the model: diffusers' method runs again
            with pytest.raises(Exception) as raised:
                pipe.load_ip_adapter(missing, weight_name="ip.safetensors")
            assert "CLEAR" not in str(raised.value)
            assert "load_ip_adapter" not in vars(pipe)
        handle = clear_dit.patch(pipe, window_size=2)
        assert "load_ip_adapter" in vars(pipe)
        # diffusers rebuilds every processor with its class's no-argument constructor: a bare TypeError for CLEAR's
        with pytest.raises(ValueError, match=r"unload_ip_adapter\(\) on the CLEAR-patched FluxTransformer2DModel"):
            pipe.unload_ip_adapter()
        clear_dit.unpatch(pipe)
        assert "load_ip_adapter" not in vars(pipe) and clear_dit.patch_handle(pipe) is None and handle.models == []
        assert "unload_ip_adapter" not in vars(pipe)
        clear_dit.patch(pipe.transformer, window_size=2)  # a patched model alone: its own guard still refuses
        with pytest.raises(ValueError, match=r"load_ip_adapter\(\) on the CLEAR-patched FluxTransformer2DModel"):
            pipe.transformer._load_ip_adapter_weights({}, low_cpu_mem_usage=False)
    finally:
        clear_dit.unpatch(pipe)  # the transformer is flux_pipe's too
