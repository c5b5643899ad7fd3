"""The gateway's FastAPI application: `create_app(settings)` builds it.

Starting the app opens the prediction database (`settings.database_url`), one
`AsyncKilnClient` channel to `settings.upstream` (inside the server's event loop), the
output file store, the uploaded-files store, the input resolver, the LoRA importer (with
an `AsyncKilnAdminClient` on the same upstream) and the webhook dispatcher; then it
takes over the predictions a stopped gateway left running (sending them to Kiln again),
deletes output folders no prediction owns, and starts the background
tasks: lease renewal (every second) and retention (expiry, storage caps, record limit).
Stopping it stops the running predictions and releases them for the next start (or
another replica), then closes everything. Every request first passes
`kiln_gateway.guard.RequestGuard` (host, token, body size). The OpenAPI description is
served at /openapi.json (interactive docs at /docs), Prometheus metrics at /metrics
(kiln_gateway.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from kiln_client.admin import AsyncKilnAdminClient
from kiln_client.aio import AsyncKilnClient
from kiln_client.connection import ConnectionSettings
from kiln_gateway import api, files, models, streaming, uploads
from kiln_gateway.database import Database, DatabaseError
from kiln_gateway.errors import ApiError, ProblemDetail, install_error_handlers
from kiln_gateway.fetch import AddressCheck, Resolver, UrlFetcher, address_problem
from kiln_gateway.files import FileStore
from kiln_gateway.guard import RequestGuard
from kiln_gateway.inputs import InputResolver
from kiln_gateway.loras import ADMIN_TIMEOUT_SECONDS, LoraImporter
from kiln_gateway.metrics import GatewayMetrics
from kiln_gateway.models import ModelCatalog
from kiln_gateway.predictions import PredictionRunner
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.state import GatewayState
from kiln_gateway.store import PredictionStore
from kiln_gateway.uploads import UploadStore
from kiln_gateway.webhooks import WebhookDispatcher, WebhookSender, new_secret

__all__ = ["UPSTREAM_FLAGS", "create_app", "new_instance_id", "upstream_connection"]

log = logging.getLogger("kiln_gateway")

ClientFactory = Callable[[str], AsyncKilnClient]
AdminFactory = Callable[[str], AsyncKilnAdminClient]
_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
}


UPSTREAM_FLAGS = {
    "target": "--upstream",
    "token": "KILN_API_TOKEN",
    "tls_ca": "--upstream-tls-ca",
    "tls_cert": "--upstream-tls-cert",
    "tls_key": "--upstream-tls-key",
    "allow_plaintext_token": "--upstream-allow-plaintext-token",
}
"""The `kiln gateway` flag behind each connection argument, for its error messages."""


def upstream_connection(settings: GatewaySettings) -> ConnectionSettings:
    """How the gateway reaches `settings.upstream`: its TLS files, and the bearer token from
    `KILN_API_TOKEN` (retries and round_robin as every Kiln client has them).

    Raises:
        ConnectionSettingsError: an unreadable file, a certificate without its key, or a
            token that would go to a non-loopback upstream in plain text.
    """
    return ConnectionSettings.resolve(
        settings.upstream,
        tls_ca=settings.upstream_tls_ca,
        tls_cert=settings.upstream_tls_cert,
        tls_key=settings.upstream_tls_key,
        tls_server_name=settings.upstream_tls_server_name,
        allow_plaintext_token=settings.upstream_allow_plaintext_token,
    )


def new_instance_id() -> str:
    """A replica id for this gateway process: host, process id and a random part."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


def _purge_interval(settings: GatewaySettings) -> float:
    shortest = min(settings.retention_seconds, settings.upload_expiry_seconds)
    return min(60.0, max(0.05, shortest / 4))


async def _purge_forever(state: GatewayState) -> None:
    interval = _purge_interval(state.settings)
    while True:
        await asyncio.sleep(interval)
        try:
            await state.runner.purge()
            await state.uploads.purge()
        except Exception:  # keep enforcing retention whatever one pass hit
            log.exception("retention pass failed")


async def _open_state(
    settings: GatewaySettings,
    client_factory: ClientFactory,
    admin_factory: AdminFactory,
    resolver: Resolver | None,
    address_check: AddressCheck,
    metrics: GatewayMetrics,
) -> GatewayState:
    secret = settings.webhook_secret
    if secret is None:
        secret = new_secret()
        log.warning(
            "no webhook secret configured: signing webhooks with a new secret for this run "
            "only (set KILN_WEBHOOK_SECRET to keep it across restarts)"
        )
    database = await Database.open(settings.database_url)
    kiln = client_factory(settings.upstream)
    root = settings.files_root
    store = PredictionStore(database, new_instance_id(), settings.lease_seconds)
    file_store = FileStore(root / "outputs")
    upload_store = UploadStore(root / "uploads", expiry_seconds=settings.upload_expiry_seconds)
    fetcher = UrlFetcher(
        timeout_seconds=settings.fetch_timeout_seconds,
        max_redirects=settings.fetch_max_redirects,
        allow_private=settings.allow_private_urls,
        resolver=resolver,
        address_check=address_check,
    )
    sender = WebhookSender(settings, secret, resolver=resolver, address_check=address_check)
    dispatcher = WebhookDispatcher(store, sender, settings, metrics)
    return GatewayState(
        settings=settings,
        kiln=kiln,
        catalog=ModelCatalog(kiln, settings),
        database=database,
        store=store,
        files=file_store,
        webhooks=sender,
        dispatcher=dispatcher,
        runner=PredictionRunner(kiln, settings, store, file_store, dispatcher, metrics),
        uploads=upload_store,
        inputs=InputResolver(upload_store, file_store, fetcher),
        loras=LoraImporter(
            admin_factory(settings.upstream),
            upload_store,
            fetcher,
            settings.max_lora_bytes,
            settings.upstream,
        ),
    )


def create_app(
    settings: GatewaySettings,
    *,
    client_factory: ClientFactory | None = None,
    admin_factory: AdminFactory | None = None,
    resolver: Resolver | None = None,
    address_check: AddressCheck = address_problem,
) -> FastAPI:
    """The ASGI app serving Replicate's API for the Kiln server at `settings.upstream`.

    `client_factory(target)` makes the Kiln client (default: an `AsyncKilnClient` over
    `upstream_connection(settings)`); it is called once, when the app starts, as is
    `admin_factory(target)`, the client of the Kiln server's admin RPCs (LoRA imports;
    default: an `AsyncKilnAdminClient` over the same connection). `resolver`
    and `address_check` replace the system resolver and the public-address rule for every
    outbound URL (input fetches and webhooks), e.g. to keep a test from reaching any
    network.
    """
    factory = client_factory or (lambda target: AsyncKilnClient(upstream_connection(settings)))
    admins = admin_factory or (
        lambda target: AsyncKilnAdminClient(
            upstream_connection(settings), timeout=ADMIN_TIMEOUT_SECONDS
        )
    )
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await _open_state(settings, factory, admins, resolver, address_check, metrics)
        app.state.gateway = state
        background: list[asyncio.Task[None]] = []
        try:
            adopted = await state.runner.recover(everything=state.database.dialect == "sqlite")
            swept = await state.runner.sweep_files()
            if adopted or swept:
                log.warning(
                    "recovered from a stopped gateway: %d running prediction(s) taken over, "
                    "%d output folder(s) without a prediction deleted",
                    adopted,
                    swept,
                )
            state.dispatcher.start()
            background = [
                asyncio.create_task(_purge_forever(state), name="retention"),
                asyncio.create_task(state.runner.maintain_forever(), name="leases"),
            ]
            if settings.allow_private_urls:
                log.warning(
                    "allow_private_urls is on: image inputs may be fetched from loopback, "
                    "private and link-local addresses (trusted callers only)"
                )
            log.info(
                "gateway ready for Kiln at %s (auth %s, %d alias(es), predictions in %s)",
                settings.upstream,
                "on" if settings.auth_enabled else "OFF",
                len(settings.aliases),
                state.database.url,
            )
            yield
        finally:
            for task in background:
                task.cancel()
            await state.runner.shutdown()
            await state.dispatcher.aclose()
            with contextlib.suppress(Exception):
                await state.store.release()
            await state.kiln.close()
            await state.loras.close()
            await state.database.close()

    app = FastAPI(
        # Answers any route may give: the guard's (bad Host, body too large) and validation.
        responses={
            400: {"model": ProblemDetail, "description": "Bad request (e.g. Host not allowed)"},
            413: {"model": ProblemDetail, "description": "Request body too large"},
            422: {"model": ProblemDetail, "description": "Validation failed"},
        },
        title="Kiln gateway",
        summary="Replicate-compatible predictions API in front of Kiln's gRPC service",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(DatabaseError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(models.router)
    app.include_router(api.router)
    app.include_router(streaming.router)
    app.include_router(files.router)
    app.include_router(uploads.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition of the kiln_gateway_* metrics (no token needed)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = _TITLES.get(exc.status_code, "HTTP error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    error = ApiError(exc.status_code, title, str(exc.detail), headers=headers)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette's 405 names only the
    first route's, though several routes may share a path, e.g. GET and POST /v1/files)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    log.error("database error on %s %s: %s", request.method, request.url.path, exc)
    error = ApiError(
        503,
        "Database unavailable",
        "the gateway cannot reach its prediction database; retry shortly",
        headers={"Retry-After": "5"},
    )
    return JSONResponse(error.body(), status_code=503, headers=error.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body: dict[str, Any] = ApiError(
        500, "Internal server error", "the gateway failed; its logs have the details"
    ).body()
    return JSONResponse(body, status_code=500)
