"""Checks every request passes before the gateway reads its body: host, token and size.

`RequestGuard` is an ASGI middleware in front of the whole app:
- Host: links in responses (prediction, file and webhook URLs, `Location`) are built from
  `--public-url`; without one, from the request's Host header, which must then name this
  gateway: loopback, its bind address or one of `--allowed-hosts` (`*` allows any). Any
  other Host is a 400, so a forged header cannot plant foreign links (and a web page
  rebinding its DNS name to 127.0.0.1 cannot use a loopback gateway). /metrics, which
  builds no links and shows counts only, is exempt, so a scraper may use any address.
- Token: every `/v1` request needs a configured bearer token (when tokens are configured);
  a missing or wrong one is answered 401 at once, without reading the body.
- Size: a body longer than `request_limit` is answered 413 without being read whole: at
  once when Content-Length says so, else as soon as the bytes received pass the limit
  (chunked uploads included).
Answers sent before the body was read close the connection.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln_gateway.auth import token_accepted, unauthenticated
from kiln_gateway.errors import ApiError, shorten
from kiln_gateway.settings import LOOPBACK_HOSTS, GatewaySettings

__all__ = ["RequestGuard", "allowed_host_names", "host_name"]

_UNSPECIFIED = {"", "0.0.0.0", "::", "[::]"}


def host_name(header: str) -> str:
    """The host part of a Host header, lowercased, without port, brackets or final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit():
        value = name
    return value.rstrip(".")


def allowed_host_names(settings: GatewaySettings) -> frozenset[str] | None:
    """The Host names the gateway answers to; None when any is fine (public URL or `*`)."""
    if settings.public_url or "*" in settings.allowed_hosts:
        return None
    names = {*LOOPBACK_HOSTS, *(host_name(entry) for entry in settings.allowed_hosts)}
    if settings.host not in _UNSPECIFIED:
        names.add(host_name(settings.host))
    return frozenset(names)


class RequestGuard:
    """ASGI middleware: Host, token and body-size checks before the app reads the body."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings
        self.limit = settings.request_limit
        self.hosts = allowed_host_names(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self._problem(scope, headers)
        if problem is not None:
            headers_out = {**problem.headers, "Connection": "close"}
            response = JSONResponse(problem.body(), problem.status, headers=headers_out)
            await response(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _problem(self, scope: Scope, headers: Headers) -> ApiError | None:
        path: str = scope.get("path", "")
        # Scrapers address a replica by its pod or node address; /metrics builds no links.
        if self.hosts is not None and path != "/metrics":
            host = headers.get("host", "")
            if host_name(host) not in self.hosts:
                return ApiError(
                    400,
                    "Host not allowed",
                    f"this gateway does not answer to Host {shorten(host, 80)!r}: its operator "
                    "can set --public-url (the URL clients use) or add the name to "
                    "--allowed-hosts",
                )
        if (path == "/v1" or path.startswith("/v1/")) and not token_accepted(
            self.settings, headers.get("authorization", "")
        ):
            return unauthenticated()
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return ApiError(400, "Invalid Content-Length", "Content-Length must be a number")
            if int(declared) > self.limit:
                return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            "Request body too large",
            f"request bodies are limited to {self.limit} bytes (--max-request-bytes); send "
            "large images as files uploaded with POST /v1/files or as URLs",
        )

    def _counting(self, receive: Receive) -> Receive:
        received = 0
        limit = self.limit

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    error = self._too_large()
                    raise HTTPException(413, error.detail, headers={"Connection": "close"})
            return message

        return counted
