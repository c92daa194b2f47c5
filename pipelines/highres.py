"""Progressive high-resolution FLUX generation with CLEAR (the official recipe, DESIGN.md 1.4).

Stage 0 generates at a base resolution with the model's own (full) attention; every further stage
upscales the previous stage's image in pixel space and refines it with SDEdit (img2img at a given
strength) using CLEAR attention, NTK-scaled RoPE, proportional attention and a fixed time shift, with
VAE tiling for encode and decode. The shared model is changed only while a call runs: processors,
attention weights, RoPE theta and VAE tiling are restored afterwards, also when a stage raises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

import clear_dit
from clear_dit.patching import check_patch_settings
from clear_dit.weights import ClearWeights, check_weights

from .loading import default_max_sequence_length
from .stages import brief, check_highres_inputs, parse_stages

logger = logging.getLogger(__name__)

__all__ = [
    "HighResFluxPipeline",
    "check_highres_inputs",
    "HighResFluxPipelineOutput",
    "ntk_scaled_rope",
    "parse_stages",
    "resolve_clear_settings",
    "vae_tiling",
]


@dataclass
class HighResFluxPipelineOutput(FluxPipelineOutput):
    """``images``: the last stage's images; ``stage_images[i]``: stage ``i``'s, in the same ``output_type``."""

    stage_images: list[Any] | None = None


def resolve_clear_settings(
    window_size: int | None,
    down_factor: int | None,
    clear_weights: str | os.PathLike | ClearWeights | None,
    backend: str = "auto",
    proportional_attention: bool = False,
) -> tuple[int, int, ClearWeights | None]:
    """``(window_size, down_factor, weights)`` of the CLEAR stages: the values given, else those of
    ``clear_weights`` (a file, hub path or :func:`clear_dit.read_weights` result: its metadata or name), else
    radius 16 and ``d = 1``; checked as :func:`clear_dit.patch` checks them, before any stage runs."""
    weights = clear_weights
    if weights is not None and not isinstance(weights, ClearWeights):
        weights = clear_dit.read_weights(weights, window_size, down_factor)
    window = window_size if window_size is not None else weights.window_size if weights is not None else 16
    down = down_factor if down_factor is not None else weights.down_factor if weights is not None else 1
    window, down = check_patch_settings(window, down, backend, proportional_attention)
    if weights is not None:
        weights.check_loadable()  # the upscale stages load it: not after the base stage
        weights = dataclasses.replace(weights, window_size=window, down_factor=down)
    return window, down, weights


@contextmanager
def ntk_scaled_rope(transformer: torch.nn.Module, ntk_factor: float) -> Iterator[None]:
    """Multiply the RoPE base ``theta`` of a FLUX transformer by ``ntk_factor`` inside the block only."""
    pos_embed = transformer.pos_embed
    theta = pos_embed.theta
    pos_embed.theta = theta * ntk_factor
    try:
        yield
    finally:
        pos_embed.theta = theta


@contextmanager
def vae_tiling(vae: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Tiled VAE encode/decode inside the block; the VAE's own setting is restored on exit."""
    was = vae.use_tiling
    vae.use_tiling = enabled
    try:
        yield
    finally:
        vae.use_tiling = was


@contextmanager
def _clear_attention(
    transformer: torch.nn.Module,
    window_size: int,
    down_factor: int,
    weights: ClearWeights | None,
    backend: str,
    proportional_attention: bool,
) -> Iterator[None]:
    """CLEAR processors (and the student's weights, if any) inside the block; the teacher's on exit."""
    teacher = {}
    if weights is not None:  # keep what apply_weights overwrites, off the accelerator (by published names: a
        # LoRA-carrying model holds them as peft's `.base_layer.` weights)
        state = clear_dit.clear_state_dict(transformer)
        teacher = {k: v.to("cpu", copy=True) for k, v in state.items() if k in weights.tensors}
    try:
        if weights is None:
            clear_dit.patch(transformer, window_size, down_factor, backend, proportional_attention)
        else:
            clear_dit.apply_weights(transformer, weights, backend, proportional_attention)
        yield
    finally:
        clear_dit.unpatch(transformer)
        state = clear_dit.clear_state_dict(transformer)  # detached views of the parameters themselves
        with torch.no_grad():
            for name, value in teacher.items():
                state[name].copy_(value)


def _whole(value: Any) -> int:
    """``value`` as an int if it is a whole number (2, 2.0, numpy or torch scalars), else ``ValueError``."""
    try:
        whole = not isinstance(value, bool) and float(value).is_integer()
    except OverflowError:  # an int past float's range: no size, step count or seed takes it
        whole = False
    if not whole:
        raise ValueError(f"not a whole number: {brief(value)}")
    return int(value)


def _per_stage(value: Any, count: int, name: str, per: str = "stage") -> list[Any]:
    """A scalar repeated ``count`` times, or a sequence (a 1-d numpy array or tensor too) that must have ``count``
    entries, one per ``per``."""
    if getattr(value, "ndim", 0) == 1 and hasattr(value, "tolist"):  # as stages take them
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries; expected one per {per} ({count})")
        return list(value)
    return [value] * count


class HighResFluxPipeline(FluxPipeline):
    """FLUX text-to-image at high resolution by progressive SDEdit upscaling with CLEAR attention.

    Same components as :class:`~diffusers.FluxPipeline`, so ``from_pretrained`` and ``from_pipe`` work as for
    it; the components are shared, never copied. Stages run on ``FluxPipeline`` / ``FluxImg2ImgPipeline``
    views of these components with their own scheduler copies, so the shared scheduler is not touched either.

    Example::

        pipe = HighResFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)
        out = pipe("a lighthouse", stages=[(1024, 1024), (2048, 2048)], clear_weights="clear_local_16.safetensors")
        out.images[0].save("out.png")  # out.stage_images[0][0] is the 1024 px base image
    """

    def _stage_pipeline(self, cls: type[FluxPipeline], scheduler_overrides: dict[str, Any], desc: str) -> FluxPipeline:
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **scheduler_overrides)
        pipe = cls(**{**self.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(**{**getattr(self, "_progress_bar_config", {}), "desc": desc})
        return pipe

    def _decode(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Packed latents ``(batch, h*w, 64)`` -> pixels ``(batch, 3, height, width)`` in [-1, 1]."""
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        stages: Sequence[tuple[int, int]] = ((1024, 1024), (2048, 2048)),
        strength: float | Sequence[float] = 0.7,
        num_inference_steps: int | Sequence[int] = 28,
        guidance_scale: float = 3.5,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator | list[torch.Generator]] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        base_attention: str = "full",
        window_size: int | None = None,
        down_factor: int | None = None,
        clear_weights: str | ClearWeights | None = None,
        backend: str = "auto",
        ntk_factor: float = 10.0,
        proportional_attention: bool = True,
        time_shift: float | None = 3.0,
        enable_vae_tiling: bool = True,
        resample: PIL.Image.Resampling = PIL.Image.Resampling.LANCZOS,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
    ) -> HighResFluxPipelineOutput | tuple:
        """Generate at ``stages[0]``, then upscale and refine at every further stage size.

        Args:
            prompt, prompt_2: as for ``FluxPipeline``; or pass ``prompt_embeds`` and ``pooled_prompt_embeds``.
                The prompt is encoded once and reused by every stage.
            stages: ``(width, height)`` per stage, increasing; multiples of 16 (``16 * d`` for CLEAR stages
                with down factor ``d``). One stage is plain text-to-image.
            strength: SDEdit strength in (0, 1] of the upscale stages (a float, or one per upscale stage).
            num_inference_steps: scheduler steps of each stage (an int, or one per stage); an upscale stage
                runs ``strength`` of them, as in ``FluxImg2ImgPipeline``.
            negative_prompt, true_cfg_scale: true classifier-free guidance in every stage, as in
                ``FluxPipeline`` (on when ``true_cfg_scale > 1`` and a negative prompt is given, ``""`` included);
                the negative prompt is encoded once.
            seed: stage ``i`` draws its noise from ``torch.Generator("cpu").manual_seed(seed + i)``.
            generator: one generator for all stages in turn, or one entry per stage (a generator or a
                per-image list); exclusive with ``seed``.
            base_attention: ``"full"`` (the model's own attention) or ``"clear"`` for stage 0.
            window_size, down_factor, backend: CLEAR settings (radius 16 by default, see :func:`clear_dit.patch`); with
                ``clear_weights`` (a file, hub path, or :func:`clear_dit.read_weights` result) the file's radius
                and down factor are used unless given, and its attention weights replace the model's during
                the CLEAR stages only. Checked before the first stage runs (:func:`resolve_clear_settings`).
            ntk_factor: RoPE ``theta`` multiplier of the upscale stages (1 disables NTK scaling).
            proportional_attention: softmax scale ``sqrt(log(N_k, 4608) / head_dim)`` in the CLEAR stages; at
                FLUX's training size (1024 px, 512 text tokens) it equals the default scale.
            time_shift: fixed flow-matching shift (in [1e-6, 1e6]) of the upscale stages instead of the
                resolution-dependent dynamic shift (``None``: the scheduler's own setting).
            enable_vae_tiling: tiled VAE encode/decode during the call.
            resample: PIL filter used to upscale each stage's image to the next size.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (packed latents ``(batch, h*w, 64)``).
            callback_on_step_end: called as ``callback(self, step, timestep, callback_kwargs)`` at every step of
                every stage; ``self.stage_index`` tells the stage; setting ``self._interrupt = True`` stops the
                remaining steps and stages.
            max_sequence_length: T5 length; by default the tokenizer's limit, at most 512 (256 for a transformer
                without guidance embedding, such as FLUX.1-schnell's).

        Returns:
            :class:`HighResFluxPipelineOutput` (or ``(images, stage_images)`` with ``return_dict=False``).
        """
        if clear_dit.patch_handle(self.transformer) is not None:
            raise ValueError(
                "the transformer is already CLEAR-patched: unpatch it first; this pipeline installs CLEAR "
                "(window_size/down_factor/clear_weights) only for the stages that use it"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt or prompt_embeds (with pooled_prompt_embeds), not both")
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and not prompt:
            raise ValueError("prompt is an empty list: pass one prompt or more")
        stages = parse_stages(stages) if isinstance(stages, str) else stages
        try:  # pairs of whole numbers: tuples, lists, numpy rows
            stages = [(_whole(w), _whole(h)) for w, h in stages]
        except (TypeError, ValueError):
            shown = brief(stages)
            raise ValueError(f"stages must be (width, height) pairs or a 'WxH,WxH' string, got {shown}") from None
        count = len(stages)
        if not count:  # before the per-stage lists, whose counts it would make -1 and 0
            check_highres_inputs(stages, [])
        strengths = _per_stage(strength, count - 1, "strength", "upscale stage")
        steps = _per_stage(num_inference_steps, count, "num_inference_steps")  # its own error for a wrong count
        try:
            steps = [_whole(n) for n in steps]
            if any(n < 1 for n in steps):  # none for no stages: check_highres_inputs says that
                raise ValueError
        except (TypeError, ValueError):
            given = brief(num_inference_steps)
            raise ValueError(f"num_inference_steps must be whole numbers >= 1 for every stage, got {given}") from None
        try:
            num_images_per_prompt = _whole(num_images_per_prompt)
            if num_images_per_prompt < 1:
                raise ValueError
        except (TypeError, ValueError):
            shown = brief(num_images_per_prompt)
            raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {shown}") from None
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None:  # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; stage i uses seed + i
            try:
                seed = _whole(seed)
                if not -(2**63) <= seed <= 2**64 - count:
                    raise ValueError
            except (TypeError, ValueError):
                shown = brief(seed)
                raise ValueError(f"seed must be a whole number in [-2**63, 2**64 - {count}], got {shown}") from None
        if isinstance(generator, Sequence):
            generators = _per_stage(generator, count, "generator")
        elif seed is not None:
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]
        else:
            generators = [generator] * count
        window, down, weights = resolve_clear_settings(
            window_size, down_factor, clear_weights, backend, proportional_attention
        )
        check_highres_inputs(
            stages, strengths, ntk_factor, base_attention, down, output_type, self.vae_scale_factor * 2, time_shift,
            guidance_scale, true_cfg_scale,
        )  # fmt: skip
        # plain floats from here on: diffusers' scheduler fails on a 0-d tensor's shift, a bf16 one rounds theta
        strengths, ntk_factor = [float(v) for v in strengths], float(ntk_factor)
        time_shift = None if time_shift is None else float(time_shift)
        if weights is not None:  # before the base stage runs, not after it (keys, shapes, fused or offloaded)
            check_weights(self.transformer, weights)
        try:
            resample = PIL.Image.Resampling(resample)
        except (TypeError, ValueError):
            raise ValueError(f"resample must be a PIL.Image.Resampling filter, got {brief(resample)}") from None
        for i, (n, s) in enumerate(zip(steps[1:], strengths, strict=True), start=1):
            start = int(n - min(n * s, n))  # FluxImg2ImgPipeline's start step, rounded down
            if start >= n:
                raise ValueError(f"upscale stage {i}: strength {s:g} of {n} steps runs no step; raise it or the steps")
            if s < 1 and start == 0:
                logger.warning(
                    "upscale stage %d: strength %g of %d steps starts from pure noise (the start step rounds down "
                    "to 0), so the stage ignores the image before it: use more steps or a lower strength",
                    i,
                    s,
                    n,
                )

        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")  # text-encoder LoRA layers too, as FluxPipeline
        max_sequence_length = max_sequence_length or default_max_sequence_length(self)
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds, _ = self.encode_prompt(
                prompt=prompt,
                prompt_2=prompt_2,
                device=device,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        if pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(
                f"pooled_prompt_embeds has {pooled_prompt_embeds.shape[0]} rows, prompt_embeds {prompt_embeds.shape[0]}"
            )
        prompts = prompt_embeds.shape[0]
        for i, g in enumerate(generators):
            if isinstance(g, list) and len(g) != prompts * num_images_per_prompt:
                images = prompts * num_images_per_prompt
                raise ValueError(f"generator of stage {i} has {len(g)} entries; expected one per image ({images})")
        # FluxPipeline repeats only the embeddings it encodes itself: repeat once here, one image per row in stages
        prompt_embeds, pooled_prompt_embeds = (
            t.repeat_interleave(num_images_per_prompt, dim=0) for t in (prompt_embeds, pooled_prompt_embeds)
        )
        cfg: dict[str, Any] = {}
        if true_cfg_scale > 1 and negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * prompts
            negative_embeds, negative_pooled, _ = self.encode_prompt(
                prompt=negative_prompt,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )
            cfg = dict(
                true_cfg_scale=true_cfg_scale,
                negative_prompt_embeds=negative_embeds,
                negative_pooled_prompt_embeds=negative_pooled,
            )

        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            tensor_inputs = callback_on_step_end.tensor_inputs

        def on_step_end(stage_pipe: FluxPipeline, step: int, timestep: torch.Tensor, kwargs: dict) -> dict:
            # what a FluxPipeline callback reads of its pipeline (properties over these attributes)
            for name in ("_num_timesteps", "_guidance_scale", "_joint_attention_kwargs", "_current_timestep"):
                setattr(self, name, getattr(stage_pipe, name, None))
            result = callback_on_step_end(self, step, timestep, kwargs)
            stage_pipe._interrupt = self._interrupt
            return result

        self._interrupt = False
        self.num_stages = count
        stage_images: list[Any] = []
        image: list[PIL.Image.Image] | None = None
        with ExitStack() as restore:
            restore.enter_context(vae_tiling(self.vae, enable_vae_tiling))
            for i, (width, height) in enumerate(stages):
                if self._interrupt:
                    logger.info("interrupted: stopping before stage %d", i)
                    break
                self.stage_index = i
                if i == (0 if base_attention == "clear" else 1):
                    restore.enter_context(
                        _clear_attention(self.transformer, window, down, weights, backend, proportional_attention)
                    )
                if i == 1:
                    restore.enter_context(ntk_scaled_rope(self.transformer, ntk_factor))
                desc = f"stage {i + 1}/{count} {width}x{height}"
                kwargs = dict(
                    prompt_embeds=prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    width=width,
                    height=height,
                    num_inference_steps=steps[i],
                    guidance_scale=guidance_scale,
                    num_images_per_prompt=1,
                    generator=generators[i],
                    output_type="latent",
                    joint_attention_kwargs=joint_attention_kwargs,
                    callback_on_step_end=on_step_end if callback_on_step_end is not None else None,
                    callback_on_step_end_tensor_inputs=tensor_inputs,
                    max_sequence_length=max_sequence_length,
                    **cfg,
                )
                if i == 0:
                    stage_pipe = self._stage_pipeline(FluxPipeline, {}, desc)
                else:
                    shift = {} if time_shift is None else {"use_dynamic_shifting": False, "shift": time_shift}
                    stage_pipe = self._stage_pipeline(FluxImg2ImgPipeline, shift, desc)
                    kwargs.update(
                        image=[im.resize((width, height), resample) for im in image], strength=strengths[i - 1]
                    )
                latents = stage_pipe(**kwargs).images
                self._interrupt = self._interrupt or stage_pipe.interrupt

                last = i == count - 1 or self._interrupt
                pixels = None if last and output_type == "latent" else self._decode(latents, width, height)
                if not last:
                    image = self.image_processor.postprocess(pixels, output_type="pil")
                if output_type == "latent":
                    stage_images.append(latents)
                elif output_type == "pil" and not last:
                    stage_images.append(image)
                else:
                    stage_images.append(self.image_processor.postprocess(pixels, output_type=output_type))
        self.maybe_free_model_hooks()

        if not return_dict:
            return stage_images[-1], stage_images
        return HighResFluxPipelineOutput(images=stage_images[-1], stage_images=stage_images)
