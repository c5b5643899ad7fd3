"""The synchronous Kiln client: one gRPC channel, typed calls, `KilnError` on failure.

Example:

    with KilnClient("127.0.0.1:50051") as kiln:
        kiln.wait_until_ready(timeout=60)
        result = kiln.generate("a teapot", seed=7, num_outputs=2)
        for image in result.images:
            image.save(f"teapot-{image.index}.png")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln_client.channels import DEFAULT_TARGET, SyncChannelClient
from kiln_client.connection import ConnectionOptions, ConnectionSettings, StreamAttempts
from kiln_client.errors import DeadlineExceeded, from_rpc_error
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_client.proto.kiln.v1 import generation_service_pb2_grpc as pb_grpc
from kiln_client.requests import build_request
from kiln_client.results import GenerationResult, ResultCollector

__all__ = [
    "DEFAULT_TARGET",
    "HEALTH_SERVICE_NAME",
    "KilnClient",
    "ReadinessProbe",
    "resolve_request",
]

HEALTH_SERVICE_NAME = "kiln.v1.GenerationService"
"""The health-check service name Kiln reports; "" (the whole server) is the fallback."""

_HEALTH_POLL_SECONDS = 0.1
_HEALTH_POLL_MAX_SECONDS = 1.0


def resolve_request(
    prompt: str | None, request: pb.GenerateRequest | None, fields: dict[str, Any]
) -> pb.GenerateRequest:
    """The request `generate` sends: `request` as given, or one built from prompt + fields.

    Raises:
        TypeError: both or neither of `prompt` and `request` given, or `request` given
            together with request fields.
        ValueError: from `build_request`, naming a bad argument.
    """
    if request is not None:
        if prompt is not None or fields:
            raise TypeError("pass either request=... or a prompt with fields, not both")
        return request
    if prompt is None:
        raise TypeError("generate() needs a prompt or request=...")
    return build_request(prompt, **fields)


class ReadinessProbe:
    """The rules of waiting for SERVING, shared by the sync and asyncio clients.

    Asks for the "kiln.v1.GenerationService" health entry and falls back to the
    server-wide entry ("") when the server does not register that name. Connection
    failures and NOT_SERVING are retried with a doubling pause until `timeout` runs out.
    """

    def __init__(self, target: str, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.service = HEALTH_SERVICE_NAME
        self.last = "no answer"
        self.pause = _HEALTH_POLL_SECONDS

    def request(self) -> health_pb2.HealthCheckRequest:
        """The next health check to send."""
        return health_pb2.HealthCheckRequest(service=self.service)

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded (with the last answer) when none are."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"server at {self.target} not ready within {self.timeout:g} s ({self.last})",
            )
        return remaining

    def answered(self, reply: health_pb2.HealthCheckResponse) -> bool:
        """True when the reply says SERVING; otherwise remembers the status."""
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return True
        self.last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return False

    def failed(self, err: grpc.RpcError) -> bool:
        """Handle a failed check: True to retry at once (the service-name fallback).

        Raises KilnError for failures that waiting cannot fix.
        """
        code = err.code()
        if code == grpc.StatusCode.NOT_FOUND and self.service:
            self.service = ""
            return True
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise from_rpc_error(err) from None
        self.last = f"{code.name}: {err.details()}"
        return False

    def next_pause(self) -> float:
        """Seconds to wait before the next check (doubling, never past the deadline)."""
        pause = max(0.0, min(self.pause, self.deadline - time.monotonic()))
        self.pause = min(self.pause * 2, _HEALTH_POLL_MAX_SECONDS)
        return pause


class KilnClient(SyncChannelClient):
    """A synchronous client for `kiln.v1.GenerationService` over one gRPC channel.

    `target` is `host:port`, a comma-separated list of them (IP addresses or localhost),
    or any gRPC target such as `dns:///kiln-headless:50051`; calls are spread over every
    address with round_robin. It may also be a `ConnectionSettings` already resolved (then
    leave the other connection keywords out). `timeout` is the default deadline in seconds
    for each call (None: no deadline); every method also takes its own `timeout`, which
    wins. `max_message_mb` raises gRPC's 4 MiB default message limit both ways so that
    large images fit.

    Security: `token` is the bearer token sent on Generate and ListModels (default: the
    `KILN_API_TOKEN` environment variable; "" sends none). `tls_ca` (a CA bundle) turns on
    TLS, as does `secure` (TLS with the system's root certificates); `tls_cert` and
    `tls_key` add a client certificate for mutual TLS. Each file is a path or its PEM
    bytes. `tls_server_name` is the name the server certificates carry when it is not the
    target's host (for a list of addresses the first one's host is checked by default).
    A token is never sent in plain text to a non-loopback address unless
    `allow_plaintext_token` (e.g. behind a TLS-terminating proxy on the same host).

    Retries (on by default; `retry=False` turns them off, a `RetryPolicy` tunes them): a
    call the server could not take (UNAVAILABLE) is retried by gRPC with backoff, and a
    Generate stream that broke mid-way because its server or proxy went away is submitted
    again with the same seed (see `StreamAttempts`): the images come back once each, but
    `on_event` sees the new attempt's queued/started/progress events (progress restarts).

    Use it as a context manager, or call `close()`. All failures raise `KilnError` (see
    `kiln_client.errors`); bad connection arguments raise `ConnectionSettingsError`.
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

    def generate_events(
        self, request: pb.GenerateRequest, *, timeout: float | None = None
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Stream the events of one generation in the order the server sends them.

        The RPC starts at the first `next()`. Closing the iterator (breaking out of a `for`
        loop, `close()`, garbage collection) cancels the RPC, and the server stops the work.
        With retries on, a stream that broke mid-way is submitted again (`StreamAttempts`):
        the new attempt's events follow, without the images already yielded; `timeout`
        bounds all attempts together.

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
                for event in call:
                    if attempts.passes(event):
                        yield event
                return
            except grpc.RpcError as err:
                pause = attempts.retry_after(err)
                if pause is None:
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()  # no-op when the stream already ended
            time.sleep(pause)

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: pb.GenerateRequest | None = None,
        timeout: float | None = None,
        on_event: Callable[[pb.GenerateResponse], object] | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """Run one generation to completion and return its images and timings.

        Give either `prompt` plus any `build_request` keyword (`seed=7, width=768, ...`) or a
        ready `request`. `on_event` is called with every event as it arrives (progress,
        previews); an exception it raises cancels the RPC and propagates.

        Image conditioning takes the `build_request` keywords `image`, `mask`, `strength`,
        `keep_unmasked` and `mask_crop_padding`; `image` and `mask` each take a path, bytes,
        a binary file object or a PIL image, and are checked (exists, readable, at most
        `MAX_IMAGE_BYTES`) before anything is sent. `result.mode` and `result.strength`
        report what the server ran.

        LoRAs: `loras=[("ink", 0.8), "paper"]` (a name alone is scale 1.0) or a mapping
        name -> scale, naming LoRAs `list_models()` reports for the model.

        Raises:
            KilnError: the RPC failed, or the stream ended without a completed event.
            TypeError / ValueError: bad arguments (see `build_request`), including
                `ImageInputError` for an `image` or `mask` that cannot be sent.
        """
        message = resolve_request(prompt, request, fields)
        collector = ResultCollector()
        events = self.generate_events(message, timeout=timeout)
        try:
            for event in events:
                if on_event is not None:
                    on_event(event)
                collector.add(event)
                # A resubmitted request has a new id: report the one that completed.
                collector.request_id = event.request_id or collector.request_id
        finally:
            events.close()
        return collector.result()

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        """Every served model with its defaults and limits, and the server's default model.

        Raises:
            KilnError: when the RPC fails.
        """
        try:
            response: pb.ListModelsResponse = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return response

    def wait_until_ready(self, timeout: float) -> None:
        """Block until the server's health check reports SERVING, for at most `timeout` s.

        Checks the "kiln.v1.GenerationService" health entry, falling back to the server-wide
        entry ("") when the server does not register the service name. Connection failures
        and NOT_SERVING are retried until the time is up.

        Raises:
            DeadlineExceeded: not SERVING within `timeout` seconds.
            KilnError: the server does not implement grpc.health.v1 or fails otherwise.
        """
        probe = ReadinessProbe(self.target, timeout)
        while True:
            try:
                reply = self._health.Check(
                    probe.request(), timeout=probe.remaining(), wait_for_ready=True
                )
            except grpc.RpcError as err:
                if probe.failed(err):
                    continue
            else:
                if probe.answered(reply):
                    return
            time.sleep(probe.next_pause())
