"""Who may call `kiln serve`: bearer tokens with scopes, per-token in-flight limits, TLS.

Every call but grpc.health.v1 and server reflection carries `authorization: Bearer TOKEN`
metadata once tokens are configured (`kiln_server.tokens` has the entry syntax). A missing,
malformed or unknown token is UNAUTHENTICATED; a token without the scope the method needs is
PERMISSION_DENIED: Generate and ListModels need `generate`, every other method (the admin
RPCs) `admin`. A token may have `max_inflight_per_token` Generate calls in flight; one more
is RESOURCE_EXHAUSTED with google.rpc.RetryInfo, as a full queue is. Statuses name what is
missing and never echo a token; logs identify a token only by its fingerprint.

TLS material is read and checked once at start (`read_tls`); with a client CA the handshake
requires a client certificate signed by it (mutual TLS).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_server.config_file import SettingsError
from kiln_server.service import abort_with, queue_full_status
from kiln_server.settings import ServerSettings
from kiln_server.tokens import ADMIN, GENERATE, ApiToken, bearer_token, matching_token
from kiln_server.wire import HANDLER_MAKERS

__all__ = [
    "INFLIGHT_RETRY_SECONDS",
    "OPEN_METHOD_PREFIXES",
    "AuthInterceptor",
    "InflightLimits",
    "NoAdminInterceptor",
    "Refusal",
    "TlsFiles",
    "authorize",
    "read_tls",
    "required_scope",
]

logger = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
GENERATE_METHOD = f"/{_SERVICE}/Generate"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods anyone may call: health (probes, load balancers) and reflection (grpcurl)."""
_METHOD_SCOPES = {GENERATE_METHOD: GENERATE, f"/{_SERVICE}/ListModels": GENERATE}
INFLIGHT_RETRY_SECONDS = 1.0
"""RetryInfo delay for a token over its in-flight limit: about when a short job ends."""


def required_scope(method: str) -> str:
    """The scope a full method name (`/package.Service/Method`) needs; `admin` by default."""
    return _METHOD_SCOPES.get(method, ADMIN)


@dataclass(frozen=True)
class Refusal:
    """Why a call is not let in: its status code and a message that shows no token."""

    code: grpc.StatusCode
    message: str


def authorize(
    method: str, metadata: Iterable[tuple[str, str | bytes]], tokens: Sequence[ApiToken]
) -> ApiToken | Refusal:
    """The token that lets a call to `method` in, or why the call is refused."""
    values = [value for key, value in metadata if key == "authorization"]
    if not values:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing `authorization` metadata: send `authorization: Bearer <token>` with a "
            "token the server accepts (KILN_API_TOKENS)",
        )
    presented = bearer_token(values[0]) if len(values) == 1 and isinstance(values[0], str) else None
    if presented is None:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed `authorization` metadata: send exactly one `authorization: Bearer <token>`",
        )
    token = matching_token(presented, tokens)
    if token is None:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not one this server accepts"
        )
    scope = required_scope(method)
    if not token.allows(scope):
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} needs a token with the `{scope}` scope; this token has "
            f"{', '.join(f'`{s}`' for s in sorted(token.scopes))}",
        )
    return token


class InflightLimits:
    """Generate calls in flight per token, each token capped at `limit` (0: no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, token: ApiToken) -> bool:
        """Count one more call of `token`; False (nothing counted) when it is at the limit."""
        count = self._counts.get(token.fingerprint, 0)
        if self.limit and count >= self.limit:
            return False
        self._counts[token.fingerprint] = count + 1
        return True

    def release(self, token: ApiToken) -> None:
        """One call of `token` ended."""
        count = self._counts.pop(token.fingerprint) - 1
        if count:
            self._counts[token.fingerprint] = count

    def in_flight(self, token: ApiToken) -> int:
        """Calls of `token` in flight now."""
        return self._counts.get(token.fingerprint, 0)


def _refusing(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends the call with `refusal`, request unparsed."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.message)

    make = HANDLER_MAKERS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets in calls with an accepted token of the needed scope, within its in-flight limit.

    `on_over_limit(request)` runs for each Generate call refused for the limit (metrics).
    """

    def __init__(
        self,
        tokens: Sequence[ApiToken],
        max_inflight_per_token: int,
        on_over_limit: Callable[[Any], None] = lambda _request: None,
    ) -> None:
        self.tokens = tuple(tokens)
        self.limits = InflightLimits(max_inflight_per_token)
        self.on_over_limit = on_over_limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, or one that refuses the call with a precise status."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        verdict = authorize(method, handler_call_details.invocation_metadata or (), self.tokens)
        if isinstance(verdict, Refusal):
            logger.info("refused %s: %s (%s)", method, verdict.code.name, verdict.message)
            return _refusing(handler, verdict)
        if method == GENERATE_METHOD and self.limits.limit:
            return self._limited(handler, verdict)
        return handler

    def _limited(self, handler: grpc.RpcMethodHandler, token: ApiToken) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_stream
        limits = self.limits

        async def limited(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not limits.acquire(token):
                logger.warning(
                    "token %s has %d Generate calls in flight, its limit; request refused",
                    token.fingerprint,
                    limits.in_flight(token),
                    extra={"in_flight": limits.in_flight(token)},
                )
                self.on_over_limit(request)
                await abort_with(
                    context,
                    queue_full_status(
                        f"this token already has {limits.limit} Generate calls in flight, the "
                        "most the server allows one token (max_inflight_per_token)",
                        INFLIGHT_RETRY_SECONDS,
                    ),
                )
            try:
                # aclosing: the inner call ends (and drops its job) as soon as this one does.
                async with contextlib.aclosing(behaviour(request, context)) as stream:
                    async for message in stream:
                        yield message
            finally:
                limits.release(token)

        return grpc.unary_stream_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class NoAdminInterceptor(grpc.aio.ServerInterceptor):
    """Refuses the admin RPCs on a server that listens beyond loopback without tokens
    (mutual TLS only): a client certificate admits a caller to generate, but who may load,
    unload and import is decided by an admin-scoped token."""

    REFUSAL = Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        "the admin RPCs need a token with the admin scope, and this server has no tokens: "
        "add an entry TOKEN:admin to KILN_API_TOKENS (or --api-tokens-file), or call it "
        "on a loopback-only server",
    )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, or a refusal for an admin method."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if required_scope(method) == ADMIN:
            return _refusing(handler, self.REFUSAL)
        return handler


@dataclass(frozen=True)
class TlsFiles:
    """The gRPC port's TLS material (PEM), read and checked at start."""

    cert: bytes
    key: bytes = field(repr=False)
    client_ca: bytes | None = None
    """Set: mutual TLS, every client presents a certificate signed by this CA."""

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials; with `client_ca` they require and verify client certificates."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        raise SettingsError(f"{flag} {path} does not exist: give the path of a PEM file") from error
    except OSError as error:
        raise SettingsError(
            f"cannot read {flag} {path} ({error.strerror}): make it readable by this user"
        ) from error


def read_tls(settings: ServerSettings) -> TlsFiles | None:
    """The TLS files the settings name, read and checked; None when TLS is off.

    Raises:
        SettingsError: a file is missing or unreadable, is not PEM, or the key does not
            belong to the certificate; the message names the file and flag.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    client_ca = (
        _read(settings.tls_client_ca, "--tls-client-ca")
        if settings.tls_client_ca is not None
        else None
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password makes an encrypted key fail here rather than prompt.
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=b"")
    except (ssl.SSLError, ValueError) as error:
        raise SettingsError(
            f"--tls-cert {settings.tls_cert} and --tls-key {settings.tls_key} are not a PEM "
            f"certificate and its unencrypted private key ({error}): give the matching pair"
        ) from error
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise SettingsError(
                f"--tls-client-ca {settings.tls_client_ca} holds no PEM CA certificate "
                f"({error}): give the CA that signs the client certificates"
            ) from error
    return TlsFiles(cert, key, client_ca)
