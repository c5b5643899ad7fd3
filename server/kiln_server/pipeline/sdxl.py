"""Kiln's SDXL denoising loop, split into steps so requests can share UNet calls.

`prepare` turns a request into a DenoiseState (prompt embeddings, seeded latents, its own
scheduler); `denoise_step` advances any number of states that share a latent shape with a
single UNet call, each row carrying its own timestep; `decode` runs the VAE;
`preview_pixels` draws a preview (latent-to-RGB map or the learned preview decoder). Requests
with different LoRAs (or none) share the UNet call: before it, each row is given its
request's LoRAs (`loras`, a LoraLibrary, on backends that apply them); a LoRA's
text-encoder part applies when `prepare` encodes that request's prompts. The result for
one request equals diffusers' StableDiffusionXLPipeline on the same components, seeds and
scheduler (tests compare them). The pipeline never knows which runtime runs its engines.

Everything per step stays on the engines' device: latents, per-row timesteps, scheduler
state and the guidance arithmetic. Only the initial noise comes from the host (CPU
generators seeded seed + i, so a seed draws the same composition on every device), and
only finished images and preview pixels leave, as uint8 tensors the caller moves off the
engine thread.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln_server.engines.base import Engine, EngineSet
from kiln_server.engines.limits import PREVIEW_LATENT_RGB, declared_limits
from kiln_server.models.loader import SDXLModelFiles
from kiln_server.pipeline.families import rows_per_image
from kiln_server.pipeline.params import (
    GenerationParams,
    ImageConditioning,
    LoraUse,
    PreviewParams,
)
from kiln_server.pipeline.previews import EncodedPreview, LatentPreviewer
from kiln_server.pipeline.prompts import EncodedPrompts, PromptEncoder, PromptTokenizer
from kiln_server.pipeline.schedulers import make_scheduler

if TYPE_CHECKING:
    from kiln_server.lora.library import LoraLibrary


def to_uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any layout) as uint8 levels 0-255, rounded to the nearest."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _start_at_strength(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an image-conditioned request runs: the last int(steps x strength)
    steps of the schedule, the scheduler told where it begins (diffusers' `get_timesteps`)."""
    start = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    timesteps: torch.Tensor = scheduler.timesteps[start:]
    return timesteps


def _keep_photo(state: DenoiseState, photo: PhotoLatents) -> torch.Tensor:
    """After a step of an inpainting request on a plain UNet (`photo.blends`): where the
    mask keeps, the photo's latents re-noised to the next timestep (clean after the last),
    as diffusers' SDXL inpaint pipeline blends them."""
    assert photo.image is not None and photo.mask is not None
    proper = photo.image
    following = state.step_index + 1
    if following < len(state.timesteps):
        proper = state.scheduler.add_noise(
            photo.image, photo.noise, state.timesteps[following : following + 1]
        )
    return (1 - photo.mask) * proper + photo.mask * state.latents


def decode_in_chunks(engine: Engine, latents: torch.Tensor, per_call: int | None) -> torch.Tensor:
    """`engine`'s images of `latents` ([N, C, h, w]), at most `per_call` per call (None:
    all at once)."""
    parts = latents.split(per_call or latents.shape[0])
    pieces = [engine.infer({"latent": part})["images"] for part in parts]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@dataclass
class PhotoLatents:
    """What an image-conditioned request keeps for its denoising loop, on the device.

    `image` is the photo's sampled latents (scaled), one row per output, and `noise` the
    noise each output started from; an inpainting request with a plain UNet re-noises
    `image` to the next timestep after every step and blends it in where `mask` (binary,
    latent size, 1 = repaint) is 0. `unet_extra` is what an inpainting UNet takes beside
    the latents: the mask and the masked photo's latents, one row per output.
    """

    image: torch.Tensor | None
    noise: torch.Tensor
    mask: torch.Tensor | None = None
    unet_extra: torch.Tensor | None = None

    @property
    def blends(self) -> bool:
        """True for inpainting on a plain UNet: the photo is blended in after each step."""
        return self.mask is not None and self.unet_extra is None


@dataclass
class DenoiseState:
    """One request's progress through the denoising loop.

    Latents hold all of the request's outputs [num_outputs, C, h, w] on the engines'
    device; the scheduler and the generators (CPU, one per output, seeded seed + i) belong
    to this request alone.
    """

    params: GenerationParams
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator]
    prompts: EncodedPrompts
    time_ids: torch.Tensor
    step_kwargs: dict[str, Any]
    step_index: int = 0
    denoised: torch.Tensor | None = None
    photo: PhotoLatents | None = None
    # The LoRAs its rows apply, as the model's LoraLibrary names them (scale 0 left out).
    loras: tuple[LoraUse, ...] = ()

    @property
    def total_steps(self) -> int:
        """UNet evaluations this request needs (Heun needs about two per step)."""
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        """True once every timestep has been taken."""
        return self.step_index >= self.total_steps

    @property
    def rows(self) -> int:
        """Rows this request adds to a UNet batch (doubled under guidance)."""
        return self.params.num_outputs * _sdxl_rows_per_image(self.params)


@dataclass(frozen=True)
class StepResult:
    """What one batched step cost: its seconds on the engine thread and its UNet rows.

    On a GPU the seconds are paced by the device (see `SDXLPipeline.denoise_step`), so in
    a steady stream of steps they measure the device's time per step.
    """

    engine_seconds: float
    rows: int


class SDXLPipeline:
    """Runs SDXL-family models on an EngineSet, one denoising step at a time."""

    def __init__(
        self, files: SDXLModelFiles, engines: EngineSet, *, prompt_cache_size: int = 256
    ) -> None:
        self.files = files
        self.engines = engines
        self.dims = files.dims
        self.prompt_encoder = PromptEncoder(
            PromptTokenizer.for_model(files),
            engines,
            force_zeros_for_empty_prompt=files.force_zeros_for_empty_prompt,
            cache_size=prompt_cache_size,
        )
        self.previewer = LatentPreviewer.for_model(files.kiln_config)
        self.device = engines.device
        self.limits = declared_limits(engines, files.dims)
        self._step_done: torch.cuda.Event | None = None
        # Set when the model serves LoRAs (a backend that applies them, with LoRA folders):
        # the per-row adapters of the UNet (and text encoders). None: LoRAs are refused.
        self.loras: LoraLibrary | None = None

    @property
    def backend(self) -> str:
        """Name of the runtime executing the engines."""
        return self.engines.backend

    def rows_for(self, params: GenerationParams) -> int:
        """UNet rows a request adds to each step it shares: two per image under
        classifier-free guidance, else one."""
        return params.num_outputs * _sdxl_rows_per_image(params)

    def prepare(self, params: GenerationParams) -> DenoiseState:
        """Encode prompts, seed latents and set up a scheduler for one request.

        An image-conditioned request (img2img, inpainting) encodes its photo with the VAE
        encoder and starts part-way into the schedule, as diffusers' SDXL img2img and
        inpaint pipelines do. The request's LoRAs are made resident if they are not (the
        batcher admits a job only once they are); a LoRA that cannot be used raises its
        `LoraError`, and LoRAs on a model that serves none raise ValueError.
        """
        loras: tuple[LoraUse, ...] = ()
        encoder_loras = None
        if self.loras is not None:
            loras = self.loras.uses(params.loras)
            self.loras.ensure_resident(loras)
            encoder_loras = self.loras.text_encoder_loras(loras)
        elif any(use.scale != 0.0 for use in params.loras):
            raise ValueError("loras: this model serves no LoRAs")
        prompts = self.prompt_encoder.encode(params.prompt, params.negative_prompt, encoder_loras)
        scheduler = make_scheduler(params.scheduler, self.files.scheduler_config)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if params.image is not None:
            timesteps = _start_at_strength(
                scheduler, params.num_inference_steps, params.image.strength
            )
        generators = [torch.Generator().manual_seed(seed) for seed in params.seeds]
        photo = None
        if params.image is None:
            latents = self._noise(params, generators) * scheduler.init_noise_sigma
        else:
            latents, photo = self._photo_latents(
                params, params.image, scheduler, timesteps, generators
            )
        step_signature = inspect.signature(scheduler.step).parameters
        step_kwargs: dict[str, Any] = {}
        if "eta" in step_signature:
            step_kwargs["eta"] = 0.0
        if "generator" in step_signature:
            step_kwargs["generator"] = generators
        # SDXL micro-conditioning: original size, crop top-left, target size.
        time_ids = torch.tensor(
            [[params.height, params.width, 0, 0, params.height, params.width]],
            dtype=torch.float32,
            device=self.device,
        )
        return DenoiseState(
            params=params,
            scheduler=scheduler,
            timesteps=timesteps,
            latents=latents,
            generators=generators,
            prompts=prompts,
            time_ids=time_ids,
            step_kwargs=step_kwargs,
            photo=photo,
            loras=loras,
        )

    def _noise(self, params: GenerationParams, generators: list[torch.Generator]) -> torch.Tensor:
        """One draw of initial noise per output from its own generator (as diffusers does
        for a generator list), on the device."""
        shape = (
            1,
            self.dims.latent_channels,
            params.height // self.dims.vae_scale_factor,
            params.width // self.dims.vae_scale_factor,
        )
        return torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        ).to(self.device)

    def _encode(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Sampled, scaled latents of one image ([1, 3, H, W] in [-1, 1]) per generator:
        the VAE encoder gives the distribution, and each output draws its sample from its own
        generator, as diffusers' `retrieve_latents` does."""
        assert self.engines.vae_encoder is not None, "validation admits images only with one"
        inputs = {"images": images.to(self.device)}
        parameters = self.engines.vae_encoder.infer(inputs)["latent_parameters"]
        mean, logvar = parameters.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        samples = [
            mean + std * torch.randn(mean.shape, generator=g, dtype=torch.float32).to(self.device)
            for g in generators
        ]
        return torch.cat(samples) * self.files.vae_scaling_factor

    def _photo_latents(
        self,
        params: GenerationParams,
        conditioning: ImageConditioning,
        scheduler: Any,
        timesteps: torch.Tensor,
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, PhotoLatents]:
        """Initial latents and the loop's photo state of an image-conditioned request.

        The draws come in diffusers' order: the photo's latent sample (unless an
        inpainting UNet starts from pure noise), each output's noise, then (inpainting) the
        masked photo's latent sample. Each output's noise comes from its own generator
        (seed + i), as for text-to-image.
        """
        # As diffusers' VaeImageProcessor: levels / 255 in float32, then to [-1, 1].
        levels = torch.from_numpy(conditioning.image).permute(2, 0, 1)[None].float() / 255.0
        pixels = 2.0 * levels - 1.0
        inpaint = conditioning.mask is not None
        from_noise = inpaint and conditioning.strength == 1.0
        # diffusers' img2img samples the photo's latents once per output, each from its
        # own generator; its inpaint pipeline samples them once, from the first generator,
        # for every output.
        samplers = generators[:1] if inpaint else generators
        image = None
        if not (self.dims.inpainting and from_noise):
            image = self._encode(pixels, samplers).expand(params.num_outputs, -1, -1, -1)
        noise = self._noise(params, generators)
        if from_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            assert image is not None
            start = timesteps[:1].repeat(params.num_outputs)
            latents = scheduler.add_noise(image, noise, start)
        photo = PhotoLatents(image=image, noise=noise)
        if conditioning.mask is not None:
            repaint = (torch.from_numpy(conditioning.mask) >= 0.5).float()[None, None]
            mask = torch.nn.functional.interpolate(repaint, size=latents.shape[-2:]).to(self.device)
            photo.mask = mask
            if self.dims.inpainting:
                masked = self._encode(pixels * (repaint < 0.5), samplers)
                extra = torch.cat([mask, masked], dim=1)
                photo.unet_extra = extra.expand(params.num_outputs, -1, -1, -1)
            else:
                # diffusers samples the masked photo's latents for a plain UNet too and
                # never uses them; the draw still advances the first generator, and the
                # scheduler's later draws (ancestral noise) depend on where it left it.
                torch.randn(noise.shape[1:], generator=samplers[0])
        return latents, photo

    def _unet_inputs(self, states: list[DenoiseState]) -> dict[str, torch.Tensor]:
        """Stack every state's rows: per state [uncond x N, cond x N] under guidance."""
        samples, timesteps, contexts, pooled, time_ids = [], [], [], [], []
        for state in states:
            t = state.timesteps[state.step_index]
            model_input = state.scheduler.scale_model_input(state.latents, t)
            if state.photo is not None and state.photo.unet_extra is not None:
                model_input = torch.cat([model_input, state.photo.unet_extra], dim=1)
            n = state.params.num_outputs
            branches = [state.prompts.positive]
            if state.params.do_classifier_free_guidance:
                branches = [state.prompts.negative, state.prompts.positive]
            for embedding in branches:
                samples.append(model_input)
                contexts.append(embedding.hidden_states.expand(n, -1, -1))
                pooled.append(embedding.pooled.expand(n, -1))
            rows = state.rows
            # expand, not float(t): reading a GPU scalar on the host would sync every step.
            timesteps.append(t.to(torch.float32).reshape(1).expand(rows))
            time_ids.append(state.time_ids.expand(rows, -1))
        return {
            "sample": torch.cat(samples),
            "timestep": torch.cat(timesteps),
            "encoder_hidden_states": torch.cat(contexts),
            "text_embeds": torch.cat(pooled),
            "time_ids": torch.cat(time_ids),
        }

    def denoise_step(self, states: list[DenoiseState]) -> StepResult:
        """Advance every state by one timestep with one UNet call.

        All states must share a latent shape (the batcher groups them so). Each state's
        scheduler then steps on its own slice of the prediction.
        """
        if not states:
            return StepResult(0.0, 0)
        started = time.perf_counter()
        inputs = self._unet_inputs(states)
        if self.loras is not None:
            self.loras.assign([state.loras for state in states for _ in range(state.rows)])
        noise_pred = self.engines.unet.infer(inputs)["noise_pred"]
        offset = 0
        for state in states:
            prediction = noise_pred[offset : offset + state.rows]
            offset += state.rows
            if state.params.do_classifier_free_guidance:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + state.params.guidance_scale * (cond - uncond)
            t = state.timesteps[state.step_index]
            output = state.scheduler.step(
                prediction, t, state.latents, **state.step_kwargs, return_dict=True
            )
            state.latents = output.prev_sample
            state.denoised = getattr(output, "pred_original_sample", None)
            if state.photo is not None and state.photo.blends:
                state.latents = _keep_photo(state, state.photo)
            state.step_index += 1
        self._pace()
        return StepResult(time.perf_counter() - started, int(inputs["sample"].shape[0]))

    def _pace(self) -> None:
        """On a GPU, let the engine thread run at most one step ahead of the device.

        Kernel launches return at once, so without this the thread could queue many steps
        ahead: progress would be reported before the work ran, a cancellation would stop
        work only after every queued step, and step times would measure launching. Waiting
        for the previous step (not this one) keeps the next launch overlapping this one.
        """
        if self.device.type != "cuda":
            return
        done = torch.cuda.Event(blocking=True)  # blocking: the wait sleeps, never spins
        done.record(torch.cuda.current_stream(self.device))
        previous, self._step_done = self._step_done, done
        if previous is not None:
            previous.synchronize()

    def decode(self, state: DenoiseState) -> torch.Tensor:
        """Final images of a finished state: uint8 [N, H, W, 3] on the engines' device.

        The VAE decodes in chunks of at most the engine's declared images per call.
        """
        latents = state.latents / self.files.vae_scaling_factor
        images = decode_in_chunks(self.engines.vae_decoder, latents, self.limits.vae_decoder_images)
        return to_uint8_pixels(images).permute(0, 2, 3, 1).contiguous()

    def preview_size(self, state: DenoiseState, options: PreviewParams) -> int:
        """Longest side of a preview: `options.max_size`, or less when the final images laid
        side by side are smaller (a preview is never upscaled past them)."""
        params = state.params
        full_size = max(params.width * params.num_outputs, params.height)
        return min(options.max_size, full_size)

    def preview_method(self, method: str | None) -> str:
        """The preview method `method` names; None: the best this model's engines serve
        (the learned decoder when they have one). ValueError for one they do not serve."""
        methods = self.limits.preview_methods
        if method is None:
            return methods[0]
        if method not in methods:
            raise ValueError(
                f"preview method {method!r} is not served for this model; it serves "
                f"{', '.join(methods)}"
            )
        return method

    def preview_pixels(
        self, state: DenoiseState, method: str | None = None, size: int | None = None
    ) -> torch.Tensor:
        """The current prediction of the clean image (the latents before the first step) as
        RGB pixels: uint8 [h, N*w, 3] on the engines' device, outputs side by side.

        "latent_rgb" maps each latent pixel linearly to RGB, at latent size. "decoder" runs
        the learned preview decoder (in chunks of its declared images per call) and, when
        `size` is given, downscales the strip on the device so its longest side is `size`
        (the host copy and the encode then stay small); else it stays at full image size.
        `method` None is the model's best (`preview_method`).
        """
        latents = state.denoised if state.denoised is not None else state.latents
        if self.preview_method(method) == PREVIEW_LATENT_RGB:
            return self.previewer.to_rgb(latents)
        assert self.engines.preview_decoder is not None
        images = decode_in_chunks(
            self.engines.preview_decoder, latents, self.limits.preview_decoder_images
        )
        # [N, 3, H, W] -> [1, 3, H, N*W]: the outputs side by side, as the encoder expects.
        strip = torch.cat(list(images.float()), dim=-1).unsqueeze(0)
        height, width = strip.shape[-2:]
        if size is not None and max(height, width) > size:
            # The same target size LatentPreviewer.encode computes, so it resizes no further.
            scale = size / max(height, width)
            target = (max(1, round(height * scale)), max(1, round(width * scale)))
            strip = torch.nn.functional.interpolate(
                strip, size=target, mode="bilinear", antialias=True
            )
        return to_uint8_pixels(strip[0]).permute(1, 2, 0).contiguous()

    def preview(self, state: DenoiseState, options: PreviewParams) -> EncodedPreview:
        """An encoded preview now, on the calling thread (warm-up and the reference path)."""
        size = self.preview_size(state, options)
        pixels = self.preview_pixels(state, options.method, size).cpu().numpy()
        return self.previewer.encode(pixels, size, options.format, options.quality)

    def generate(self, params: GenerationParams) -> list[np.ndarray]:
        """Run one request start to finish, alone: the in-process reference path. Its
        LoRAs stay resident but pinned by nothing after it."""
        state = self.prepare(params)
        try:
            while not state.finished:
                self.denoise_step([state])
        finally:
            if self.loras is not None:
                self.loras.assign([])
        return list(self.decode(state).cpu().numpy())


def _sdxl_rows_per_image(params: GenerationParams) -> int:
    return rows_per_image(
        "sdxl",
        distilled_guidance=False,
        guidance_scale=params.guidance_scale,
        negative_prompt=params.negative_prompt is not None,
    )
