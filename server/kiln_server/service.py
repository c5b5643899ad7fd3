"""The gRPC API layer: validate, hand jobs to the engine core, stream their events back.

Nothing here runs a model: the batcher and the engines live in the engine core process
(kiln_server.core); this process validates, encodes images and talks gRPC. Every way a
request can end maps to one precise status: INVALID_ARGUMENT (with google.rpc.BadRequest),
NOT_FOUND, RESOURCE_EXHAUSTED (with google.rpc.RetryInfo), UNAVAILABLE while loading or
draining or when the engine core is lost, INTERNAL for an engine fault (never a traceback
text), or the client's own CANCELLED / DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_server.core.client import EngineCoreClient, EngineCoreError
from kiln_server.core.messages import ServedModel
from kiln_server.engines.limits import EngineLimits
from kiln_server.events import (
    Decoded,
    Failed,
    Finished,
    JobEvent,
    Progress,
    Queued,
    Refused,
    Started,
)
from kiln_server.image_inputs import apply_overlay
from kiln_server.imaging import EncodedImage, encode_image
from kiln_server.lora.listing import LoraCatalog
from kiln_server.metrics import UNKNOWN_MODEL, ServerMetrics
from kiln_server.models.registry import ModelRegistry
from kiln_server.pipeline.families import scheduler_names_for
from kiln_server.pipeline.flux_prompts import FluxPromptTokenizer
from kiln_server.pipeline.params import GenerationParams
from kiln_server.pipeline.prompts import PromptTokenizer
from kiln_server.validation import (
    FieldViolation,
    LoraMissing,
    LorasUnsupported,
    ModelNotFound,
    RequestBudget,
    RequestInvalid,
    ServedLimits,
    validate_request,
)
from kiln_server.wire import MalformedRequest, add_lenient_service

logger = logging.getLogger(__name__)
# A client whose deadline passes cancels the call itself, and its deadline started before
# the server's copy of it (sent as a timeout, counted from arrival), so the server sees the
# cancellation slightly ahead of its own deadline: a cancellation this close to the deadline
# is the deadline's.
DEADLINE_SLACK_SECONDS = 0.5


def status_details(code: int, message: str, *details: Any) -> grpc.Status:
    """A grpc.Status with `code`, `message` and each detail message packed (the rich error
    model: google.rpc.BadRequest, RetryInfo, ...)."""
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> NoReturn:
    """End the RPC with a rich status (code, message, google.rpc details)."""
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")


def bad_request_status(error: RequestInvalid) -> grpc.Status:
    """INVALID_ARGUMENT carrying one google.rpc.BadRequest violation per field (NOT_FOUND,
    with the same details, when the only problem is LoRAs no folder holds)."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )
    code = code_pb2.NOT_FOUND if isinstance(error, LoraMissing) else code_pb2.INVALID_ARGUMENT
    return status_details(code, str(error), bad_request)


def loras_unsupported_status(error: LorasUnsupported) -> grpc.Status:
    """FAILED_PRECONDITION: the model's backend applies no LoRAs; BadRequest names `loras`."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="loras", description=error.message)
        ]
    )
    return status_details(code_pb2.FAILED_PRECONDITION, str(error), bad_request)


def queue_full_status(message: str, retry_after: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED carrying google.rpc.RetryInfo: the queue is full, or a token has
    its most calls in flight (`kiln_server.auth`)."""
    seconds = int(retry_after)
    delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after - seconds) * 1e9))
    return status_details(
        code_pb2.RESOURCE_EXHAUSTED,
        f"{message}; retry in {retry_after:g} s",
        error_details_pb2.RetryInfo(retry_delay=delay),
    )


def png_parameters(params: GenerationParams, seed: int) -> dict[str, Any]:
    """The generation parameters written into each PNG's text chunk."""
    return {
        "model": params.model,
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt or "",
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "scheduler": params.scheduler,
        "seed": seed,
        **({"mode": params.mode, "strength": params.image.strength} if params.image else {}),
    }


def final_image(pixels: np.ndarray, params: GenerationParams, seed: int) -> EncodedImage:
    """One decoded output put back over the request's photo (when it has an overlay) and
    encoded as the request asked."""
    if params.overlay is not None:
        pixels = apply_overlay(pixels, params.overlay)
    return encode_image(
        pixels, params.output_format, params.output_quality, png_parameters(params, seed)
    )


# How an engine-side failure (a grpc.StatusCode name) counts in kiln_requests_total.
_FAILED_OUTCOMES = {
    "UNAVAILABLE": "unavailable",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "RESOURCE_EXHAUSTED": "refused",
    "INVALID_ARGUMENT": "invalid",
}


class _Ending:
    """How one Generate call ended, for kiln_requests_total; `model` is the label value."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.outcome = "failed"


class GenerationService(pb_grpc.GenerationServiceServicer):
    """kiln.v1.GenerationService over a registry, the models' tokenizers and the core."""

    def __init__(
        self,
        registry: ModelRegistry,
        is_draining: Callable[[], bool] = lambda: False,
        budget: RequestBudget | None = None,
        metrics: ServerMetrics | None = None,
        max_lora_rank: int = 128,
    ) -> None:
        self.registry = registry
        self.loras = LoraCatalog(max_lora_rank)
        self.is_draining = is_draining
        self.budget = budget or RequestBudget()
        self.metrics = metrics or ServerMetrics()
        self.core: EngineCoreClient | None = None
        self.served: dict[str, ServedModel] = {}
        self.tokenizers: dict[str, PromptTokenizer | FluxPromptTokenizer] = {}
        self._streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active_streams(self) -> int:
        """Generate calls that have been accepted and have not ended."""
        return self._streams

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every Generate call has ended (True) or the timeout passes (False).

        A call ends after its last image and `completed` are written, so waiting here
        rather than on the engine core lets finished jobs finish streaming too.
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def attach(
        self,
        core: EngineCoreClient,
        served: dict[str, ServedModel],
        tokenizers: dict[str, PromptTokenizer | FluxPromptTokenizer],
    ) -> None:
        """Go live on a ready engine core (called once every model is loaded and warm)."""
        self.tokenizers = tokenizers
        self.served = served
        self.core = core

    def model_label(self, request: pb.GenerateRequest) -> str:
        """The `model` label a request counts under in kiln_requests_total."""
        model = request.model or self.registry.default_model
        return model if model in self.registry.models else UNKNOWN_MODEL

    def _count_tokens(self, model: str, text: str) -> int:
        return self.tokenizers[model].count_tokens(text)

    def _max_tokens(self, model: str) -> int:
        return self.tokenizers[model].max_tokens

    def _engine_limits(self, model: str) -> EngineLimits | None:
        served = self.served.get(model)
        return served.limits if served else None

    def _backend(self, model: str) -> str | None:
        served = self.served.get(model)
        return served.backend if served else None

    async def ListModels(
        self,
        request: pb.ListModelsRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ListModelsResponse:
        """Every served model with its defaults and limits."""
        if isinstance(request, MalformedRequest):
            await self._refuse_malformed(request, context)
        infos = []
        for spec in self.registry.models.values():
            served = self.served.get(spec.name)
            limits = ServedLimits.of(spec, served.limits if served else None)
            # Header reads, cached per file version; a thread keeps the loop free.
            loras = await asyncio.to_thread(self.loras.list, spec.lora_dirs)
            infos.append(
                pb.ModelInfo(
                    name=spec.name,
                    family=spec.family,
                    backend=served.backend if served else "",
                    default_width=spec.default_width,
                    default_height=spec.default_height,
                    default_num_inference_steps=spec.default_num_inference_steps,
                    default_guidance_scale=spec.default_guidance_scale,
                    default_scheduler=spec.default_scheduler,
                    min_size=max(limits.min_width, limits.min_height),
                    max_size=min(limits.max_width, limits.max_height),
                    size_multiple=limits.size_multiple,
                    max_num_inference_steps=spec.max_num_inference_steps,
                    max_num_outputs=limits.outputs_for(
                        spec.default_guidance_scale, spec.default_negative_prompt is not None
                    ),
                    max_guidance_scale=spec.max_guidance_scale,
                    max_prompt_tokens=self._max_tokens(spec.name) if served else 0,
                    schedulers=scheduler_names_for(spec.family),
                    device=served.placement if served else "",
                    backend_reason=served.reason if served else "",
                    max_batch_rows=served.max_batch_rows if served else 0,
                    description=spec.description,
                    preview_methods=list(limits.preview_methods),
                    default_preview_method=limits.preview_methods[0],
                    default_strength=spec.default_strength,
                    max_image_bytes=self.budget.images.max_bytes,
                    max_image_pixels=self.budget.images.max_pixels,
                    inpainting=limits.inpainting,
                    loras=[
                        pb.LoraInfo(name=lora.name, rank=lora.rank, format=lora.format)
                        for lora in loras
                    ],
                    max_loras_per_request=self.budget.max_loras,
                    distilled_guidance=limits.distilled_guidance,
                )
            )
        return pb.ListModelsResponse(models=infos, default_model=self.registry.default_model)

    async def _refuse_malformed(
        self, request: MalformedRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        logger.warning("refused a malformed request: %s %s", request.field, request.problem)
        error = RequestInvalid([FieldViolation(request.field, request.problem)])
        await abort_with(context, bad_request_status(error))

    async def Generate(
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Validate, queue, and stream the request's events until images and completion."""
        if isinstance(request, MalformedRequest):
            self.metrics.request_ended(UNKNOWN_MODEL, "invalid")
            await self._refuse_malformed(request, context)
        assert isinstance(request, pb.GenerateRequest)
        ending = _Ending(self.model_label(request))
        try:
            # aclosing: the job is dropped from the core as soon as this call ends, not when
            # the inner generator happens to be collected.
            async with contextlib.aclosing(self._generate(request, context, ending)) as stream:
                async for message in stream:
                    yield message
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            ending.outcome = (
                "deadline_exceeded"
                if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
                else "cancelled"
            )
            raise
        finally:
            self.metrics.request_ended(ending.model, ending.outcome)

    async def _generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, ending: _Ending
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        arrival = time.monotonic()
        request_id = uuid.uuid4().hex[:16]
        log = {"request_id": request_id}
        if self.is_draining():
            ending.outcome = "unavailable"
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        core = self.core
        if core is None:
            ending.outcome = "unavailable"
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "models are still loading; retry when SERVING"
            )
        assert core is not None
        validate = functools.partial(
            validate_request,
            request,
            self.registry,
            self._count_tokens,
            self._max_tokens,
            self._engine_limits,
            self.budget,
            self._backend,
        )
        try:
            # Decoding a photo takes long enough to stall every other stream on the loop.
            params = await asyncio.to_thread(validate) if request.image else validate()
        except RequestInvalid as error:
            logger.info("rejected invalid request: %s", error, extra=log)
            ending.outcome = "not_found" if isinstance(error, LoraMissing) else "invalid"
            await abort_with(context, bad_request_status(error))
        except LorasUnsupported as error:
            logger.info("rejected LoRAs on this backend: %s", error, extra=log)
            ending.outcome = "invalid"
            await abort_with(context, loras_unsupported_status(error))
        except ModelNotFound as error:
            logger.info("rejected unknown model", extra={**log, "model": error.name})
            ending.outcome = "not_found"
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[JobEvent] = asyncio.Queue()

        def on_event(event: JobEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            # The overlay stays here: the engine core never needs the full photo.
            job_id = core.submit(request_id, replace(params, overlay=None), on_event)
        except EngineCoreError as error:
            logger.error("engine core unreachable: %s", error, extra=log)
            ending.outcome = "unavailable"
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        logger.info(
            "request submitted",
            extra={**log, "model": params.model, "steps": params.num_inference_steps},
        )
        self._streams += 1
        self._idle.clear()
        try:
            ending.model = params.model
            stream = self._stream(request_id, params, events, arrival, context, ending)
            async for message in stream:
                yield message
        finally:
            if core.cancel(job_id):
                logger.info("request ended early; job dropped", extra=log)
            self._streams -= 1
            if not self._streams:
                self._idle.set()

    async def _stream(
        self,
        request_id: str,
        params: GenerationParams,
        events: asyncio.Queue[JobEvent],
        arrival: float,
        context: grpc.aio.ServicerContext,
        ending: _Ending,
    ) -> AsyncIterator[pb.GenerateResponse]:
        encode_seconds = 0.0
        while True:
            event = await events.get()
            if isinstance(event, Refused):
                ending.outcome = "refused" if event.retry_after is not None else "unavailable"
                if event.retry_after is not None:
                    logger.warning("queue full; request refused", extra={"request_id": request_id})
                    await abort_with(context, queue_full_status(event.message, event.retry_after))
                await context.abort(grpc.StatusCode.UNAVAILABLE, event.message)
            elif isinstance(event, Queued):
                yield pb.GenerateResponse(
                    request_id=request_id, queued=pb.QueuedEvent(position=event.position)
                )
            elif isinstance(event, Started):
                yield pb.GenerateResponse(
                    request_id=request_id,
                    started=pb.StartedEvent(
                        model=params.model,
                        width=params.width,
                        height=params.height,
                        num_outputs=params.num_outputs,
                        num_inference_steps=params.num_inference_steps,
                        guidance_scale=params.guidance_scale,
                        scheduler=params.scheduler,
                        seed=params.seed,
                        mode=params.mode,
                        strength=params.image.strength if params.image else 0.0,
                    ),
                )
            elif isinstance(event, Progress):
                progress = pb.ProgressEvent(step=event.step, total_steps=event.total_steps)
                if event.preview is not None:
                    progress.preview = event.preview.data
                    progress.preview_mime_type = event.preview.mime_type
                    progress.preview_width = event.preview.width
                    progress.preview_height = event.preview.height
                yield pb.GenerateResponse(request_id=request_id, progress=progress)
            elif isinstance(event, Decoded):
                started = time.perf_counter()
                for index, (pixels, seed) in enumerate(
                    zip(event.pixels, params.seeds, strict=True)
                ):
                    encoded = await asyncio.to_thread(final_image, pixels, params, seed)
                    yield pb.GenerateResponse(
                        request_id=request_id,
                        image=pb.ImageEvent(
                            index=index,
                            seed=seed,
                            data=encoded.data,
                            mime_type=encoded.mime_type,
                            width=encoded.width,
                            height=encoded.height,
                        ),
                    )
                encode_seconds = time.perf_counter() - started
            elif isinstance(event, Finished):
                total = time.monotonic() - arrival
                logger.info(
                    "request completed",
                    extra={"request_id": request_id, "seconds": round(total, 4)},
                )
                inference_seconds = event.inference_seconds + encode_seconds
                ending.outcome = "completed"
                self.metrics.request_completed(
                    params.model,
                    params.num_outputs,
                    event.queue_seconds,
                    inference_seconds,
                    event.engine_seconds,
                )
                yield pb.GenerateResponse(
                    request_id=request_id,
                    completed=pb.CompletedEvent(
                        queue_seconds=event.queue_seconds,
                        inference_seconds=inference_seconds,
                        engine_seconds=event.engine_seconds,
                        total_seconds=total,
                        num_images=params.num_outputs,
                    ),
                )
                return
            elif isinstance(event, Failed):
                ending.outcome = _FAILED_OUTCOMES.get(event.code, "failed")
                await context.abort(grpc.StatusCode[event.code], event.message)


def add_to_server(service: GenerationService, server: grpc.aio.Server) -> None:
    """Serve `service` as kiln.v1.GenerationService on `server`, unparseable requests
    answered with INVALID_ARGUMENT (`kiln_server.wire.add_lenient_service`)."""
    add_lenient_service(server, pb.DESCRIPTOR.services_by_name["GenerationService"], service)
