"""The asyncio Kiln client (`grpc.aio`): the same calls as `KilnClient`, awaited.

Create it inside a running event loop. Example:

    async with AsyncKilnClient("127.0.0.1:50051") as kiln:
        await kiln.wait_until_ready(timeout=60)
        async for event in kiln.generate_events(build_request("a teapot")):
            ...
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2_grpc

from kiln_client.channels import DEFAULT_TARGET, AsyncChannelClient
from kiln_client.client import ReadinessProbe
from kiln_client.client import resolve_request as _resolve_request
from kiln_client.connection import ConnectionOptions, ConnectionSettings, StreamAttempts
from kiln_client.errors import from_rpc_error
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.results import GenerationResult, ResultCollector

__all__ = ["AsyncKilnClient"]


EventCallback = Callable[[pb.GenerateResponse], Awaitable[object] | object]


class AsyncKilnClient(AsyncChannelClient):
    """An asyncio client for `kiln.v1.GenerationService` over one `grpc.aio` channel.

    Arguments mean what they do for `KilnClient` (addresses, token, TLS, retries), or pass
    `target` as a `ConnectionSettings` already resolved (then leave the other connection
    keywords out). Use it as an async context manager, or `await close()`. Cancelling a
    task that is awaiting any of its calls cancels the RPC on the server. All failures
    raise `KilnError` (see `kiln_client.errors`); bad connection arguments raise
    `ConnectionSettingsError`.
    """

    def __init__(
        self,
        target: str | ConnectionSettings = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        **connection: Unpack[ConnectionOptions],
    ) -> None:
        super().__init__(target, timeout=timeout, **connection)
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate_events(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Stream the events of one generation in the order the server sends them.

        Use with `async for`. Cancelling the consuming task, or closing the generator
        (`aclose()`, e.g. via `contextlib.aclosing` after a `break`), cancels the RPC.
        Broken streams are submitted again as `KilnClient.generate_events` describes.

        Raises:
            KilnError: when the RPC fails, raised from the iteration.
        """
        attempts = StreamAttempts.start(
            request, self.connection.retry, self._deadline(timeout), self.target
        )
        while True:
            call = self._stub.Generate(
                attempts.request, timeout=attempts.timeout(), metadata=self._metadata
            )
            try:
                async for response in call:
                    if attempts.passes(response):
                        yield response
                return
            except grpc.RpcError as err:
                pause = attempts.retry_after(err)
                if pause is None:
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()  # no-op when the stream already ended
            await asyncio.sleep(pause)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        request: pb.GenerateRequest | None = None,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """Run one generation to completion and return its images and timings.

        Same arguments as `KilnClient.generate`; `on_event` may be a plain function or a
        coroutine function (it is awaited). `image` and `mask` files are read (and PIL
        images encoded) in a worker thread, so the event loop keeps running meanwhile.

        Raises:
            KilnError: the RPC failed, or the stream ended without a completed event.
            TypeError / ValueError: bad arguments (see `build_request`).
        """
        message = await asyncio.to_thread(_resolve_request, prompt, request, fields)
        collector = ResultCollector()
        events = self.generate_events(message, timeout=timeout)
        try:
            async for event in events:
                if on_event is not None:
                    outcome = on_event(event)
                    if inspect.isawaitable(outcome):
                        await outcome
                collector.add(event)
                # A resubmitted request has a new id: report the one that completed.
                collector.request_id = event.request_id or collector.request_id
        finally:
            await events.aclose()
        return collector.result()

    async def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        """Every served model with its defaults and limits, and the server's default model.

        Raises:
            KilnError: when the RPC fails.
        """
        try:
            response: pb.ListModelsResponse = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return response

    async def wait_until_ready(self, timeout: float) -> None:
        """Wait until the server's health check reports SERVING, for at most `timeout` s.

        Same rules as `KilnClient.wait_until_ready`.

        Raises:
            DeadlineExceeded: not SERVING within `timeout` seconds.
            KilnError: the server does not implement grpc.health.v1 or fails otherwise.
        """
        probe = ReadinessProbe(self.target, timeout)
        while True:
            try:
                reply = await self._health.Check(
                    probe.request(), timeout=probe.remaining(), wait_for_ready=True
                )
            except grpc.RpcError as err:
                if probe.failed(err):
                    continue
            else:
                if probe.answered(reply):
                    return
            await asyncio.sleep(probe.next_pause())
