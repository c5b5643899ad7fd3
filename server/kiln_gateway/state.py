"""The one owner of the gateway's mutable state, reachable from every request handler.

`GatewayState` is created when the app starts (inside the event loop, where the gRPC
channel must live) and stored on `app.state.gateway`; handlers get it through the
`gateway_state` dependency. Nothing else in the gateway keeps state at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from kiln_client.aio import AsyncKilnClient
    from kiln_gateway.database import Database
    from kiln_gateway.files import FileStore
    from kiln_gateway.inputs import InputResolver
    from kiln_gateway.loras import LoraImporter
    from kiln_gateway.models import ModelCatalog
    from kiln_gateway.predictions import PredictionRunner
    from kiln_gateway.settings import GatewaySettings
    from kiln_gateway.store import PredictionStore
    from kiln_gateway.uploads import UploadStore
    from kiln_gateway.webhooks import WebhookDispatcher, WebhookSender

__all__ = ["GatewayState", "gateway_state", "own_base_urls", "public_base_url"]


@dataclass
class GatewayState:
    """Everything a running gateway owns: upstream client, catalog, stores, senders."""

    settings: GatewaySettings
    kiln: AsyncKilnClient
    catalog: ModelCatalog
    database: Database
    store: PredictionStore
    files: FileStore
    webhooks: WebhookSender
    dispatcher: WebhookDispatcher
    runner: PredictionRunner
    uploads: UploadStore
    inputs: InputResolver
    loras: LoraImporter


def gateway_state(request: Request) -> GatewayState:
    """FastAPI dependency: the running gateway's state."""
    state: GatewayState = request.app.state.gateway
    return state


def public_base_url(request: Request, state: GatewayState) -> str:
    """Base URL for links in responses: `public_url` if configured, else the request's own.

    Without a public URL, `kiln_gateway.guard` has already refused Host headers that do not
    name this gateway, so the request's own URL is one of its allowed hosts.
    """
    if state.settings.public_url:
        return state.settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def own_base_urls(request: Request, state: GatewayState) -> tuple[str, ...]:
    """Every base URL that reaches this gateway for this request: public URL and request URL."""
    bases = (public_base_url(request, state), str(request.base_url).rstrip("/"))
    return tuple(dict.fromkeys(bases))
