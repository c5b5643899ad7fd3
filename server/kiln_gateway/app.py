"""The gateway's FastAPI application: `create_app(settings)` builds it.

Starting the app opens one `AsyncKilnClient` channel to `settings.upstream` (inside the
server's event loop), the output file store, the uploaded-files store, the input resolver,
the webhook sender and a background task that enforces the retention and upload expiry
times; stopping it cancels running predictions and closes them all. The OpenAPI
description is served at /openapi.json (interactive docs at /docs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln_client.aio import AsyncKilnClient
from kiln_gateway import api, files, models, streaming, uploads
from kiln_gateway.errors import ApiError, install_error_handlers
from kiln_gateway.fetch import UrlFetcher
from kiln_gateway.files import FileStore
from kiln_gateway.inputs import InputResolver
from kiln_gateway.models import ModelCatalog
from kiln_gateway.predictions import PredictionRunner, PredictionStore
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.state import GatewayState
from kiln_gateway.uploads import UploadStore
from kiln_gateway.webhooks import WebhookSender, new_secret

__all__ = ["create_app"]

log = logging.getLogger("kiln_gateway")

ClientFactory = Callable[[str], AsyncKilnClient]


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


def _open_state(settings: GatewaySettings, client_factory: ClientFactory) -> GatewayState:
    kiln = client_factory(settings.upstream)
    secret = settings.webhook_secret
    if secret is None:
        secret = new_secret()
        log.warning(
            "no webhook secret configured: signing webhooks with a new secret for this run "
            "only (set KILN_WEBHOOK_SECRET to keep it across restarts)"
        )
    store = PredictionStore(settings.max_predictions)
    file_store = FileStore(settings.files_dir)
    upload_store = UploadStore(
        file_store.root / "uploads", expiry_seconds=settings.upload_expiry_seconds
    )
    fetcher = UrlFetcher(
        timeout_seconds=settings.fetch_timeout_seconds,
        max_redirects=settings.fetch_max_redirects,
        allow_private=settings.allow_private_urls,
    )
    sender = WebhookSender(settings, secret)
    return GatewayState(
        settings=settings,
        kiln=kiln,
        catalog=ModelCatalog(kiln, settings),
        store=store,
        files=file_store,
        webhooks=sender,
        runner=PredictionRunner(kiln, settings, store, file_store, sender),
        uploads=upload_store,
        inputs=InputResolver(upload_store, file_store, fetcher),
    )


def create_app(
    settings: GatewaySettings, *, client_factory: ClientFactory | None = None
) -> FastAPI:
    """The ASGI app serving Replicate's API for the Kiln server at `settings.upstream`.

    `client_factory(target)` makes the Kiln client (default: `AsyncKilnClient(target)`);
    it is called once, when the app starts.
    """
    factory = client_factory or (lambda target: AsyncKilnClient(target))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _open_state(settings, factory)
        app.state.gateway = state
        purger = asyncio.create_task(_purge_forever(state), name="retention")
        if settings.allow_private_urls:
            log.warning(
                "allow_private_urls is on: image inputs may be fetched from loopback, "
                "private and link-local addresses (trusted callers only)"
            )
        log.info(
            "gateway ready for Kiln at %s (auth %s, %d alias(es))",
            settings.upstream,
            "on" if settings.auth_enabled else "OFF",
            len(settings.aliases),
        )
        try:
            yield
        finally:
            purger.cancel()
            await state.runner.shutdown()
            await state.webhooks.aclose()
            await state.kiln.close()
            state.files.close()

    app = FastAPI(
        title="Kiln gateway",
        summary="Replicate-compatible predictions API in front of Kiln's gRPC service",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(models.router)
    app.include_router(api.router)
    app.include_router(streaming.router)
    app.include_router(files.router)
    app.include_router(uploads.router)
    return app


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
    error = ApiError(exc.status_code, title, str(exc.detail), headers=dict(exc.headers or {}))
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body: dict[str, Any] = ApiError(
        500, "Internal server error", "the gateway failed; its logs have the details"
    ).body()
    return JSONResponse(body, status_code=500)
