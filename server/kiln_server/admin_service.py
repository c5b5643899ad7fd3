"""kiln.v1.ModelAdminService: the admin RPCs, beside GenerationService on the same port.

Every method needs a token with the `admin` scope (`kiln_server.auth` requires it for every
method but Generate and ListModels). GetImportedLora and ImportLora run on the server's
LoRA cache (`kiln_server.lora.imports`); ListModelStates, LoadModel and UnloadModel on the
engine core's model library (`kiln_server.library.admin`).

ImportLora answers a stream that breaks the contract with INVALID_ARGUMENT naming the part
(`header` missing, sent twice or not first; `chunk` empty or over 1 MiB;
`header.size_bytes` not what the stream carried; `content` not a LoRA this server applies,
and why), and a file larger than the whole cache with RESOURCE_EXHAUSTED; each with a
google.rpc.BadRequest violation. An import that fails or is cancelled leaves nothing behind;
a cache folder the server cannot write is INTERNAL naming `--lora-cache-dir`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.rpc import code_pb2, error_details_pb2

from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_client.proto.kiln.v1 import model_admin_service_pb2_grpc as admin_grpc
from kiln_server.library.admin import LibraryAdmin
from kiln_server.lora.imports import (
    ImportedLora,
    ImportRefused,
    ImportResult,
    LoraCache,
    PendingImport,
)
from kiln_server.service import abort_with, status_details
from kiln_server.user_text import shorten
from kiln_server.wire import MalformedRequest, add_lenient_service

__all__ = ["SERVICE_NAME", "ModelAdminService", "add_to_server"]

logger = logging.getLogger(__name__)

SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["ModelAdminService"].full_name


def imported_lora_message(lora: ImportedLora) -> admin_pb.ImportedLora:
    """The wire form of a cached LoRA."""
    return admin_pb.ImportedLora(
        name=lora.name,
        sha256=lora.sha256,
        size_bytes=lora.size_bytes,
        rank=lora.rank,
        format=lora.format,
    )


async def _refuse(
    context: grpc.aio.ServicerContext, field: str, message: str, too_large: bool = False
) -> NoReturn:
    """End the call with INVALID_ARGUMENT (RESOURCE_EXHAUSTED when `too_large`) and a
    google.rpc.BadRequest violation of `field`."""
    code = code_pb2.RESOURCE_EXHAUSTED if too_large else code_pb2.INVALID_ARGUMENT
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    await abort_with(
        context,
        status_details(
            code,
            f"{field}: {message}",
            error_details_pb2.BadRequest(field_violations=[violation]),
        ),
    )


class ModelAdminService(admin_grpc.ModelAdminServiceServicer):
    """kiln.v1.ModelAdminService over the server's LoRA cache."""

    def __init__(self, loras: LoraCache, library: LibraryAdmin | None = None) -> None:
        self.loras = loras
        self.library = library

    # --- the model library ---------------------------------------------------------------

    async def ListModelStates(
        self,
        request: admin_pb.ListModelStatesRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb.ListModelStatesResponse:
        """Every configured model's state, and the memory budget."""
        if isinstance(request, MalformedRequest):
            await _refuse(context, request.field, request.problem)
        return await self._library(context).list_states(context)

    async def LoadModel(
        self,
        request: admin_pb.LoadModelRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb.LoadModelResponse:
        """Make a configured model resident; returns once it is."""
        if isinstance(request, MalformedRequest):
            await _refuse(context, request.field, request.problem)
        return await self._library(context).load(request.model, context)

    async def UnloadModel(
        self,
        request: admin_pb.UnloadModelRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb.UnloadModelResponse:
        """Unload an idle resident model."""
        if isinstance(request, MalformedRequest):
            await _refuse(context, request.field, request.problem)
        return await self._library(context).unload(request.model, context)

    def _library(self, context: grpc.aio.ServicerContext) -> LibraryAdmin:
        assert self.library is not None, "KilnServer sets the library admin"
        return self.library

    # --- the LoRA cache -------------------------------------------------------------------

    async def GetImportedLora(
        self,
        request: admin_pb.GetImportedLoraRequest | MalformedRequest,
        context: grpc.aio.ServicerContext,
    ) -> admin_pb.GetImportedLoraResponse:
        """The LoRA imported from `request.source`; NOT_FOUND when none was."""
        if isinstance(request, MalformedRequest):
            await _refuse(context, request.field, request.problem)
        if not request.source:
            await _refuse(context, "source", "is empty; give the URL a LoRA was imported from")
        lora = await asyncio.to_thread(self.loras.lookup, request.source)
        if lora is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no LoRA in this server's cache was imported from {shorten(request.source, 200)}",
            )
            raise AssertionError("unreachable: context.abort raises")
        return admin_pb.GetImportedLoraResponse(lora=imported_lora_message(lora))

    async def ImportLora(
        self,
        request_iterator: AsyncIterator[admin_pb.ImportLoraRequest | MalformedRequest],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb.ImportLoraResponse:
        """Store the streamed file in the LoRA cache (see the module docstring)."""
        try:
            result = await self._import(request_iterator)
        except ImportRefused as refused:
            logger.info("LoRA import refused: %s", refused)
            await _refuse(context, refused.field, refused.message, refused.kind == "too_large")
        except OSError as error:  # the cache folder: full disk, permissions
            logger.error("cannot store an imported LoRA in %s: %s", self.loras.folder, error)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the server cannot write its LoRA cache folder ({error.strerror or error}); "
                "its operator can free space or fix --lora-cache-dir",
            )
        return admin_pb.ImportLoraResponse(
            lora=imported_lora_message(result.lora), already_present=result.already_present
        )

    async def _import(
        self, messages: AsyncIterator[admin_pb.ImportLoraRequest | MalformedRequest]
    ) -> ImportResult:
        """Receive and store one file; the temporary file is gone before this returns or
        raises (so before the caller hears of a refusal)."""
        pending: PendingImport | None = None
        try:
            async for message in messages:
                if isinstance(message, MalformedRequest):
                    raise ImportRefused(message.field, message.problem)
                part = message.WhichOneof("part")
                if part == "header":
                    if pending is not None:
                        raise ImportRefused(
                            "header", "sent twice; send one header, then the chunks"
                        )
                    header = message.header
                    pending = await asyncio.to_thread(
                        self.loras.begin, header.source, header.size_bytes
                    )
                elif part == "chunk":
                    if pending is None:
                        raise ImportRefused(
                            "header",
                            "the first message must be the header (source and size_bytes), "
                            "then the file's bytes in chunks",
                        )
                    await asyncio.to_thread(pending.write, message.chunk)
                else:
                    raise ImportRefused("part", "the message holds neither header nor chunk")
            if pending is None:
                raise ImportRefused(
                    "header", "the stream carried no header; send the header, then the file's bytes"
                )
            return await asyncio.to_thread(pending.finish)
        finally:
            if pending is not None:
                pending.discard()


def add_to_server(service: ModelAdminService, server: grpc.aio.Server) -> None:
    """Serve `service` as kiln.v1.ModelAdminService on `server`, unparseable requests
    answered with INVALID_ARGUMENT (`kiln_server.wire.add_lenient_service`)."""
    add_lenient_service(server, admin_pb.DESCRIPTOR.services_by_name["ModelAdminService"], service)
