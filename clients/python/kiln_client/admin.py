"""Typed clients for Kiln's admin RPCs (`kiln.v1.ModelAdminService`), sync and asyncio.

The admin RPCs need a token with the `admin` scope; a `generate`-only token gets
`PermissionDenied`. Connection arguments (addresses, token, TLS, retries) are the same as
`KilnClient`'s (`kiln_client.connection`), and failures raise `KilnError` subclasses.

Example:

    with KilnAdminClient("127.0.0.1:50051", token=ADMIN_TOKEN) as admin:
        lora = admin.get_imported_lora("https://example.com/style.safetensors")
        if lora is None:
            lora = admin.import_lora("style.safetensors", source="https://...").lora
        # generate with loras=[(lora.name, 0.8)]
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Unpack

import grpc

from kiln_client.channels import DEFAULT_TARGET, AsyncChannelClient, SyncChannelClient
from kiln_client.connection import ConnectionOptions, ConnectionSettings
from kiln_client.errors import ModelNotFound, from_rpc_error
from kiln_client.proto.kiln.v1 import model_admin_service_pb2 as admin_pb
from kiln_client.proto.kiln.v1 import model_admin_service_pb2_grpc as admin_grpc

__all__ = ["IMPORT_CHUNK_BYTES", "AsyncKilnAdminClient", "KilnAdminClient", "LoraFile"]

IMPORT_CHUNK_BYTES = 1024 * 1024
"""Bytes per ImportLora chunk message (the contract's most)."""


@dataclass(frozen=True)
class LoraFile:
    """The file an import sends: bytes in memory, or a path read chunk by chunk.

    `of(content)` takes bytes / bytearray / memoryview, or a path (`str` or path-like).
    """

    size: int
    data: bytes | None = None
    path: Path | None = None

    @classmethod
    def of(cls, content: bytes | bytearray | memoryview | str | os.PathLike[str]) -> LoraFile:
        """The file `content` stands for.

        Raises:
            OSError: a path that cannot be read (missing, a folder, no permission).
        """
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            return cls(len(data), data=data)
        path = Path(content)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file: give the LoRA .safetensors file")
        return cls(path.stat().st_size, path=path)

    def header(self, source: str) -> admin_pb.ImportLoraRequest:
        """The stream's first message."""
        return admin_pb.ImportLoraRequest(
            header=admin_pb.ImportLoraHeader(source=source, size_bytes=self.size)
        )

    def open(self) -> BinaryIO | None:
        """The file opened for reading (None for bytes in memory)."""
        return self.path.open("rb") if self.path is not None else None

    def chunks(self, handle: BinaryIO | None) -> Iterator[bytes]:
        """The content in chunks of at most `IMPORT_CHUNK_BYTES`."""
        if handle is None:
            assert self.data is not None
            view = memoryview(self.data)
            for start in range(0, len(view), IMPORT_CHUNK_BYTES):
                yield bytes(view[start : start + IMPORT_CHUNK_BYTES])
            return
        while chunk := handle.read(IMPORT_CHUNK_BYTES):
            yield chunk

    def requests(self, source: str) -> Iterator[admin_pb.ImportLoraRequest]:
        """The whole ImportLora stream: the header, then the chunks."""
        yield self.header(source)
        handle = self.open()
        try:
            for chunk in self.chunks(handle):
                yield admin_pb.ImportLoraRequest(chunk=chunk)
        finally:
            if handle is not None:
                handle.close()


LoraContent = bytes | bytearray | memoryview | str | os.PathLike[str]
"""What `import_lora` takes: the file's bytes, or its path."""


class KilnAdminClient(SyncChannelClient):
    """A synchronous client for `kiln.v1.ModelAdminService` over one gRPC channel.

    `target`, `timeout` and the connection keywords mean what they do for `KilnClient`;
    the token must have the `admin` scope. Use it as a context manager, or call `close()`.
    Every call raises a `KilnError` subclass when its RPC fails (`ModelNotFound`,
    `PermissionDenied`, `InvalidArgument` naming why, ...).
    """

    def __init__(
        self,
        target: str | ConnectionSettings = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(target, timeout=timeout, **connection)
        self._stub = admin_grpc.ModelAdminServiceStub(self._channel)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def list_model_states(self, timeout: float | None = None) -> admin_pb.ListModelStatesResponse:
        """Every configured model's state and the memory budget."""
        reply: admin_pb.ListModelStatesResponse = self._call(
            self._stub.ListModelStates, admin_pb.ListModelStatesRequest(), timeout
        )
        return reply

    def load_model(self, model: str, timeout: float | None = None) -> admin_pb.LoadModelResponse:
        """Make configured model `model` resident; returns once it is."""
        reply: admin_pb.LoadModelResponse = self._call(
            self._stub.LoadModel, admin_pb.LoadModelRequest(model=model), timeout
        )
        return reply

    def unload_model(
        self, model: str, timeout: float | None = None
    ) -> admin_pb.UnloadModelResponse:
        """Free resident model `model`'s memory (refused while it has requests)."""
        reply: admin_pb.UnloadModelResponse = self._call(
            self._stub.UnloadModel, admin_pb.UnloadModelRequest(model=model), timeout
        )
        return reply

    def get_imported_lora(
        self, source: str, timeout: float | None = None
    ) -> admin_pb.ImportedLora | None:
        """The LoRA the server imported from `source` (a URL), or None when it has none."""
        try:
            reply: admin_pb.GetImportedLoraResponse = self._call(
                self._stub.GetImportedLora, admin_pb.GetImportedLoraRequest(source=source), timeout
            )
        except ModelNotFound:  # NOT_FOUND here: nothing was imported from `source`
            return None
        return reply.lora

    def import_lora(
        self, content: LoraContent, *, source: str = "", timeout: float | None = None
    ) -> admin_pb.ImportLoraResponse:
        """Send one LoRA .safetensors file (its bytes, or a path read in 1 MiB chunks) to
        the server's LoRA cache; `source` (a URL) is remembered for `get_imported_lora`.
        The answer's `lora.name` is what requests name it by.

        Raises:
            OSError: a path that cannot be read.
            KilnError: the server refused it (`InvalidArgument` naming why,
                `ResourceExhausted` past the cache size) or the RPC failed.
        """
        lora = LoraFile.of(content)
        reply: admin_pb.ImportLoraResponse = self._call(
            self._stub.ImportLora, lora.requests(source), timeout
        )
        return reply


class AsyncKilnAdminClient(AsyncChannelClient):
    """The asyncio (`grpc.aio`) form of `KilnAdminClient`: the same calls, awaited.

    Create it inside a running event loop; use it as an async context manager, or `await
    close()`. Files given by path are read in a worker thread.
    """

    def __init__(
        self,
        target: str | ConnectionSettings = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(target, timeout=timeout, **connection)
        self._stub = admin_grpc.ModelAdminServiceStub(self._channel)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def list_model_states(
        self, timeout: float | None = None
    ) -> admin_pb.ListModelStatesResponse:
        """As `KilnAdminClient.list_model_states`."""
        reply: admin_pb.ListModelStatesResponse = await self._call(
            self._stub.ListModelStates, admin_pb.ListModelStatesRequest(), timeout
        )
        return reply

    async def load_model(
        self, model: str, timeout: float | None = None
    ) -> admin_pb.LoadModelResponse:
        """As `KilnAdminClient.load_model`."""
        reply: admin_pb.LoadModelResponse = await self._call(
            self._stub.LoadModel, admin_pb.LoadModelRequest(model=model), timeout
        )
        return reply

    async def unload_model(
        self, model: str, timeout: float | None = None
    ) -> admin_pb.UnloadModelResponse:
        """As `KilnAdminClient.unload_model`."""
        reply: admin_pb.UnloadModelResponse = await self._call(
            self._stub.UnloadModel, admin_pb.UnloadModelRequest(model=model), timeout
        )
        return reply

    async def get_imported_lora(
        self, source: str, timeout: float | None = None
    ) -> admin_pb.ImportedLora | None:
        """As `KilnAdminClient.get_imported_lora`."""
        try:
            reply: admin_pb.GetImportedLoraResponse = await self._call(
                self._stub.GetImportedLora, admin_pb.GetImportedLoraRequest(source=source), timeout
            )
        except ModelNotFound:  # NOT_FOUND here: nothing was imported from `source`
            return None
        return reply.lora

    async def import_lora(
        self, content: LoraContent, *, source: str = "", timeout: float | None = None
    ) -> admin_pb.ImportLoraResponse:
        """As `KilnAdminClient.import_lora`."""
        lora = await asyncio.to_thread(LoraFile.of, content)
        reply: admin_pb.ImportLoraResponse = await self._call(
            self._stub.ImportLora, _async_requests(lora, source), timeout
        )
        return reply


async def _async_requests(lora: LoraFile, source: str) -> AsyncIterator[admin_pb.ImportLoraRequest]:
    """`LoraFile.requests`, with a file's reads in a worker thread."""
    yield lora.header(source)
    handle = await asyncio.to_thread(lora.open)
    try:
        chunks = lora.chunks(handle)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield admin_pb.ImportLoraRequest(chunk=chunk)
    finally:
        if handle is not None:
            handle.close()
