"""Kiln's FLUX denoising loop, split into steps so requests can share transformer calls.

The FLUX counterpart of pipeline/sdxl.py with the interface the batcher drives:
`prepare` turns a request into a FluxDenoiseState (prompt embeddings, seeded packed
latents, its own flow-matching scheduler shifted for its own image size); `denoise_step`
advances any number of states that share an image size with one transformer call, each
row carrying its own timestep (and, on a dev-style model, its own distilled guidance);
`decode` unpacks, unscales and runs the VAE; `preview_pixels` draws a latent-to-RGB
preview of the predicted clean latents. One request's images equal diffusers'
FluxPipeline on the same components, seeds and settings (tests compare them).

Guidance: on a dev-style model (the transformer embeds guidance) `guidance_scale` is the
distilled guidance, one row per image, and a negative prompt is refused (it would need a
second scale). On a schnell-style model a request with a `negative_prompt` and
`guidance_scale` > 1 runs true classifier-free guidance, as FluxPipeline's
`true_cfg_scale = guidance_scale` with that negative prompt (two rows per image);
without a negative prompt `guidance_scale` has no effect there, as in diffusers.
Text-to-image only: image conditioning and LoRAs are refused with ValueError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kiln_server.engines.flux_components import PACK
from kiln_server.engines.flux_engines import FluxEngineSet, flux_declared_limits
from kiln_server.engines.limits import PREVIEW_LATENT_RGB
from kiln_server.models.flux_loader import FluxModelFiles
from kiln_server.pipeline.families import rows_per_image
from kiln_server.pipeline.flux_previews import flux_previewer
from kiln_server.pipeline.flux_prompts import (
    FluxPromptEmbedding,
    FluxPromptEncoder,
    FluxPromptTokenizer,
)
from kiln_server.pipeline.flux_schedulers import make_flux_scheduler
from kiln_server.pipeline.params import GenerationParams, ImageConditioning, PreviewParams
from kiln_server.pipeline.previews import EncodedPreview
from kiln_server.pipeline.sdxl import StepResult, decode_in_chunks, to_uint8_pixels


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents as transformer tokens [B, (h/2)(w/2), 4C]: each 2x2 patch of
    every channel becomes one token, row-major (diffusers' `_pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens [B, seq, 4C] as latents [B, C, h, w]."""
    b, _, values = tokens.shape
    c = values // (PACK * PACK)
    patches = tokens.view(b, latent_height // PACK, latent_width // PACK, c, PACK, PACK)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, latent_height, latent_width)


def image_start(steps: int, strength: float) -> int:
    """The first schedule index an img2img request of `strength` runs from, as diffusers'
    FLUX img2img computes it: int(steps - steps x strength) (in floating point, so 4 steps
    at strength 0.6 start at index 1, where SDXL's rounding starts at 2)."""
    return int(max(steps - min(steps * strength, steps), 0))


def latent_image_ids(token_rows: int, token_columns: int, device: torch.device) -> torch.Tensor:
    """Position ids [rows x columns, 3] of the image tokens: (0, row, column), float32
    (diffusers' `_prepare_latent_image_ids`)."""
    ids = torch.zeros(token_rows, token_columns, 3)
    ids[..., 1] += torch.arange(token_rows)[:, None]
    ids[..., 2] += torch.arange(token_columns)[None, :]
    return ids.reshape(token_rows * token_columns, 3).to(device)


@dataclass
class FluxDenoiseState:
    """One request's progress through the FLUX denoising loop.

    `latents` hold all of the request's outputs as packed tokens [num_outputs, seq, 4C] on
    the engines' device; the scheduler and the generators (CPU, one per output, seeded
    seed + i) belong to this request alone. `negative` is set only under true CFG.
    `denoised` is the latest prediction of the clean latents (packed), for previews.
    """

    params: GenerationParams
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator]
    positive: FluxPromptEmbedding
    negative: FluxPromptEmbedding | None
    guidance: torch.Tensor | None
    img_ids: torch.Tensor
    step_index: int = 0
    denoised: torch.Tensor | None = None
    # Where `timesteps` start in the scheduler's schedule (img2img skips the first ones).
    offset: int = 0

    @property
    def total_steps(self) -> int:
        """Transformer evaluations this request needs."""
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        """True once every timestep has been taken."""
        return self.step_index >= self.total_steps

    @property
    def rows(self) -> int:
        """Rows this request adds to a transformer batch (doubled under true CFG)."""
        return self.params.num_outputs * (2 if self.negative is not None else 1)


class FluxPipeline:
    """Runs FLUX-family models on a FluxEngineSet, one denoising step at a time."""

    def __init__(
        self, files: FluxModelFiles, engines: FluxEngineSet, *, prompt_cache_size: int = 256
    ) -> None:
        self.files = files
        self.engines = engines
        self.dims = files.dims
        self.tokenizer = FluxPromptTokenizer.for_model(files)
        self.prompt_encoder = FluxPromptEncoder(
            self.tokenizer, engines, cache_size=prompt_cache_size
        )
        self.previewer = flux_previewer(files, engines)
        self.device = engines.device
        self.limits = flux_declared_limits(engines, files.dims)
        # Text position ids are all zero (diffusers' `text_ids`), the same for every call.
        self._txt_ids = torch.zeros(files.dims.t5_tokens, 3, device=self.device)
        self._step_done: torch.cuda.Event | None = None
        # FLUX models serve no LoRAs yet; the batcher reads this as SDXLPipeline's.
        self.loras: Any = None

    @property
    def backend(self) -> str:
        """Name of the runtime executing the engines."""
        return self.engines.backend

    def true_cfg(self, params: GenerationParams) -> bool:
        """Whether `params` runs true classifier-free guidance (two rows per image): on a
        schnell-style model, with a negative prompt and guidance_scale above 1."""
        return self.rows_per_image(params) > 1

    def rows_per_image(self, params: GenerationParams) -> int:
        """Transformer rows one image of `params` takes (pipeline.families counts them)."""
        return rows_per_image(
            "flux",
            distilled_guidance=self.dims.guidance_embeds,
            guidance_scale=params.guidance_scale,
            negative_prompt=params.negative_prompt is not None,
        )

    def rows_for(self, params: GenerationParams) -> int:
        """Transformer rows a request adds to each step it shares."""
        return params.num_outputs * self.rows_per_image(params)

    def check(self, params: GenerationParams) -> None:
        """ValueError naming the field and the fix when this pipeline cannot run `params`."""
        multiple = self.dims.size_multiple
        for field_name, value in (("width", params.width), ("height", params.height)):
            if value < multiple or value % multiple:
                raise ValueError(
                    f"{field_name}: {value} is not a positive multiple of {multiple}; FLUX "
                    f"image sides are multiples of {multiple} (8x VAE, 2x2 latent packing)"
                )
        if params.image is not None:
            if params.image.mask is not None:
                raise ValueError(
                    "mask: FLUX models take image-to-image (image, strength) but no mask yet"
                )
            if self.engines.vae_encoder is None:
                raise ValueError("image: this FLUX model is served without a VAE encoder")
        if any(use.scale != 0.0 for use in params.loras):
            raise ValueError("loras: this model serves no LoRAs")
        if self.dims.guidance_embeds and params.negative_prompt is not None:
            raise ValueError(
                "negative_prompt: this FLUX model embeds distilled guidance (guidance_scale) "
                "and takes no negative prompt; leave it unset"
            )

    def prepare(self, params: GenerationParams) -> FluxDenoiseState:
        """Encode prompts, seed latents and set up a scheduler for one request.

        The schedule is shifted for this request's image size when the model's scheduler
        config uses dynamic shifting. ValueError (see `check`) for a request this pipeline
        cannot run.
        """
        self.check(params)
        rows = params.height // self.dims.size_multiple
        columns = params.width // self.dims.size_multiple
        scheduler = make_flux_scheduler(
            params.scheduler,
            self.files.scheduler_config,
            params.num_inference_steps,
            rows * columns,
            self.device,
        )
        positive = self.prompt_encoder.embed(params.prompt)
        negative = None
        if self.true_cfg(params):
            negative = self.prompt_encoder.embed(params.negative_prompt or "")
        generators = [torch.Generator().manual_seed(seed) for seed in params.seeds]
        guidance = None
        if self.dims.guidance_embeds:
            guidance = torch.full((1,), params.guidance_scale, dtype=torch.float32)
            guidance = guidance.to(self.device)
        timesteps, offset = scheduler.timesteps, 0
        if params.image is None:
            latents = self._noise(params, generators)
        else:
            offset = image_start(params.num_inference_steps, params.image.strength)
            timesteps = timesteps[offset:]
            scheduler.set_begin_index(offset)
            latents = self._photo_latents(params, params.image, scheduler, timesteps, generators)
        return FluxDenoiseState(
            params=params,
            scheduler=scheduler,
            timesteps=timesteps,
            offset=offset,
            latents=pack_latents(latents),
            generators=generators,
            positive=positive,
            negative=negative,
            guidance=guidance,
            img_ids=latent_image_ids(rows, columns, self.device),
        )

    def _noise(self, params: GenerationParams, generators: list[torch.Generator]) -> torch.Tensor:
        """One draw of unpacked noise [1, C, h, w] per output from its own generator (as
        diffusers does for a generator list), on the device."""
        scale = self.dims.vae_scale_factor
        shape = (1, self.dims.latent_channels, params.height // scale, params.width // scale)
        return torch.cat(
            [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        ).to(self.device)

    def _photo_latents(
        self,
        params: GenerationParams,
        conditioning: ImageConditioning,
        scheduler: Any,
        timesteps: torch.Tensor,
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """An img2img request's first latents (unpacked), in diffusers' order of draws:
        the photo's latent sample from the first generator (shared by every output), then
        each output's noise from its own; the photo is noised to the first timestep run
        (`scale_noise`: sigma x noise + (1 - sigma) x photo)."""
        assert self.engines.vae_encoder is not None, "check() refuses images without one"
        # As diffusers' VaeImageProcessor: levels / 255 in float32, then to [-1, 1].
        levels = torch.from_numpy(conditioning.image).permute(2, 0, 1)[None].float() / 255.0
        pixels = (2.0 * levels - 1.0).to(self.device)
        parameters = self.engines.vae_encoder.infer({"images": pixels})["latent_parameters"]
        mean, logvar = parameters.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = torch.randn(mean.shape, generator=generators[0], dtype=torch.float32)
        photo = mean + std * sample.to(self.device)
        photo = (photo - self.files.vae_shift_factor) * self.files.vae_scaling_factor
        photo = photo.expand(params.num_outputs, -1, -1, -1)
        noise = self._noise(params, generators)
        start = timesteps[:1].repeat(params.num_outputs)
        latents: torch.Tensor = scheduler.scale_noise(photo, start, noise)
        return latents

    def _transformer_inputs(self, states: list[FluxDenoiseState]) -> dict[str, torch.Tensor]:
        """Stack every state's rows: per state [negative x N, positive x N] under true CFG."""
        samples, contexts, pooled, timesteps, guidance = [], [], [], [], []
        for state in states:
            n = state.params.num_outputs
            branches = [state.positive]
            if state.negative is not None:
                branches = [state.negative, state.positive]
            for embedding in branches:
                samples.append(state.latents)
                contexts.append(embedding.hidden_states.expand(n, -1, -1))
                pooled.append(embedding.pooled.expand(n, -1))
            t = state.timesteps[state.step_index]
            # t / 1000 from the float32 timestep, as diffusers computes it (not the sigma).
            timesteps.append(t.to(torch.float32).reshape(1).expand(state.rows) / 1000)
            if state.guidance is not None:
                guidance.append(state.guidance.expand(state.rows))
        inputs = {
            "hidden_states": torch.cat(samples),
            "encoder_hidden_states": torch.cat(contexts),
            "pooled_projections": torch.cat(pooled),
            "timestep": torch.cat(timesteps),
            "img_ids": states[0].img_ids,
            "txt_ids": self._txt_ids,
        }
        if self.dims.guidance_embeds:
            inputs["guidance"] = torch.cat(guidance)
        return inputs

    def denoise_step(self, states: list[FluxDenoiseState]) -> StepResult:
        """Advance every state by one timestep with one transformer call.

        All states must share an image size (position ids are shared by a call's rows);
        ValueError otherwise. Each state's scheduler then steps on its own slice.
        """
        if not states:
            return StepResult(0.0, 0)
        sizes = {(s.params.height, s.params.width) for s in states}
        if len(sizes) > 1:
            raise ValueError(
                f"one FLUX transformer call takes one image size, got {sorted(sizes)}: "
                "group requests by size"
            )
        started = time.perf_counter()
        inputs = self._transformer_inputs(states)
        velocity = self.engines.transformer.infer(inputs)["noise_pred"]
        offset = 0
        for state in states:
            prediction = velocity[offset : offset + state.rows]
            offset += state.rows
            if state.negative is not None:
                negative, positive = prediction.chunk(2)
                prediction = negative + state.params.guidance_scale * (positive - negative)
            t = state.timesteps[state.step_index]
            sigma = state.scheduler.sigmas[state.offset + state.step_index]
            state.denoised = state.latents - sigma.to(state.latents.device) * prediction
            state.latents = state.scheduler.step(prediction, t, state.latents, return_dict=False)[0]
            state.step_index += 1
        self._pace()
        return StepResult(time.perf_counter() - started, int(inputs["hidden_states"].shape[0]))

    def _pace(self) -> None:
        """On a GPU, let the engine thread run at most one step ahead of the device (the
        reasons are SDXLPipeline._pace's: progress, cancellation and step times stay true)."""
        if self.device.type != "cuda":
            return
        done = torch.cuda.Event(blocking=True)
        done.record(torch.cuda.current_stream(self.device))
        previous, self._step_done = self._step_done, done
        if previous is not None:
            previous.synchronize()

    def _unpacked(self, state: FluxDenoiseState, tokens: torch.Tensor) -> torch.Tensor:
        scale = self.dims.vae_scale_factor
        return unpack_latents(tokens, state.params.height // scale, state.params.width // scale)

    def decode(self, state: FluxDenoiseState) -> torch.Tensor:
        """Final images of a finished state: uint8 [N, H, W, 3] on the engines' device.

        The VAE decodes `latents / scaling_factor + shift_factor` in chunks of at most the
        engine's declared images per call.
        """
        latents = self._unpacked(state, state.latents)
        latents = latents / self.files.vae_scaling_factor + self.files.vae_shift_factor
        images = decode_in_chunks(self.engines.vae_decoder, latents, self.limits.vae_decoder_images)
        return to_uint8_pixels(images).permute(0, 2, 3, 1).contiguous()

    def preview_size(self, state: FluxDenoiseState, options: PreviewParams) -> int:
        """Longest side of a preview: `options.max_size`, or less when the final images laid
        side by side are smaller."""
        params = state.params
        return min(options.max_size, max(params.width * params.num_outputs, params.height))

    def preview_method(self, method: str | None) -> str:
        """The preview method `method` names (None: "latent_rgb", the only one FLUX models
        serve); ValueError for another."""
        if method is None or method == PREVIEW_LATENT_RGB:
            return PREVIEW_LATENT_RGB
        raise ValueError(
            f"preview method {method!r} is not served for this model; it serves "
            f"{PREVIEW_LATENT_RGB}"
        )

    def preview_pixels(
        self, state: FluxDenoiseState, method: str | None = None, size: int | None = None
    ) -> torch.Tensor:
        """The current prediction of the clean image (the noise before the first step) as
        RGB pixels at latent size: uint8 [h, N*w, 3] on the engines' device, outputs side by
        side. `size` is unused (the batcher passes it to every pipeline): the latent map
        draws at latent size and `LatentPreviewer.encode` scales the result."""
        self.preview_method(method)
        tokens = state.denoised if state.denoised is not None else state.latents
        return self.previewer.to_rgb(self._unpacked(state, tokens))

    def preview(self, state: FluxDenoiseState, options: PreviewParams) -> EncodedPreview:
        """An encoded preview now, on the calling thread (warm-up and the reference path)."""
        size = self.preview_size(state, options)
        pixels = self.preview_pixels(state, options.method, size).cpu().numpy()
        return self.previewer.encode(pixels, size, options.format, options.quality)

    def generate(self, params: GenerationParams) -> list[np.ndarray]:
        """Run one request start to finish, alone: the in-process reference path."""
        state = self.prepare(params)
        while not state.finished:
            self.denoise_step([state])
        return list(self.decode(state).cpu().numpy())
