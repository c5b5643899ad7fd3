"""A prediction's state, as the gateway keeps it and as Replicate's API shows it.

`PredictionRecord` is one prediction: what the database stores (`kiln_gateway.store`), plus,
while this gateway runs it, the live parts (the task talking to Kiln, waiters, webhooks).
`PredictionResponse` is the object GET, list, create, cancel and webhooks return.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.timefmt import iso8601

if TYPE_CHECKING:
    from kiln_gateway.webhooks import PredictionWebhook

__all__ = [
    "RUNNING",
    "TERMINAL",
    "WEBHOOK_EVENTS",
    "PredictionRecord",
    "PredictionResponse",
    "PredictionUrls",
    "Status",
    "WebhookConfig",
    "new_prediction_id",
]

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
RUNNING: tuple[str, str] = ("starting", "processing")
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
"""Webhook event names, in lifecycle order."""


class PredictionUrls(BaseModel):
    """Where to get, cancel and stream the prediction."""

    get: str
    cancel: str
    stream: str


class PredictionResponse(BaseModel):
    """The prediction object, field for field as Replicate returns it.

    `metrics` holds `predict_time` (seconds the model ran) and `total_time` as on Replicate,
    plus Kiln's `queue_time` (seconds waiting for a batch slot), `engine_seconds` (this
    prediction's share of engine time: GPU-seconds on a GPU host) and `image_count`.
    """

    id: str
    model: str
    version: str
    status: Status
    input: dict[str, Any]
    output: list[str] | None
    error: str | None
    logs: str
    metrics: dict[str, float | int]
    created_at: str
    started_at: str | None
    completed_at: str | None
    urls: PredictionUrls
    source: Literal["api"] = "api"
    data_removed: bool = False


class WebhookConfig(BaseModel):
    """Where a prediction's webhooks go and which events trigger them (stored with it)."""

    url: str | None = None
    events: list[str] = Field(default_factory=lambda: list(WEBHOOK_EVENTS))
    completed_url: str | None = None

    @classmethod
    def of(
        cls, url: str | None, events: Collection[str] | None, completed_url: str | None
    ) -> WebhookConfig | None:
        """The config for a create request's webhook fields, or None when there is none."""
        if not url and not completed_url:
            return None
        chosen = list(WEBHOOK_EVENTS if events is None else dict.fromkeys(events))
        return cls(url=url, events=chosen, completed_url=completed_url)


@dataclass
class PredictionRecord:
    """One prediction's full state; changed only by its runner and by the store."""

    id: str
    owner: str
    """Who created it: `kiln_gateway.auth.owner_of` of the token (or "anonymous")."""
    model: str
    version: str
    kiln_model: str
    input: dict[str, Any]
    request: pb.GenerateRequest | None
    """What is sent to Kiln; kept (images included) until the prediction ends, so a
    prediction interrupted by a gateway restart can be sent again."""
    base_url: str
    data_uri: bool
    """Outputs are data URIs (kept in the database) rather than files."""
    file_token: str
    seq: int = 0
    """Creation order (assigned by the database)."""
    created_at: float = field(default_factory=time.time)
    status: Status = "starting"
    started_at: float | None = None
    completed_at: float | None = None
    outputs: list[str] = field(default_factory=list)
    """File paths (`/files/...`) or data URIs."""
    output_bytes: int = 0
    error: str | None = None
    log_lines: list[str] = field(default_factory=list)
    metrics: dict[str, float | int] = field(default_factory=dict)
    data_removed: bool = False
    webhook: WebhookConfig | None = None
    cancel_requested: bool = False
    submissions: int = 1
    next_position: int = 0
    """Position of the next server-sent event in the prediction's journal."""
    # Live state, only while this gateway runs the prediction:
    unsaved: list[tuple[int, str, str]] = field(default_factory=list, repr=False)
    """Events not yet written to the database: (position, event, data)."""
    flushed_at: float = field(default=0.0, repr=False)
    """When the record was last written (monotonic clock), to space out progress writes."""
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    hooks: PredictionWebhook | None = field(default=None, repr=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def done(self) -> bool:
        """True once the prediction reached a terminal status."""
        return self.status in TERMINAL

    def url(self, path: str) -> str:
        """An absolute URL for a gateway path (data URIs pass through)."""
        return path if path.startswith("data:") else f"{self.base_url}{path}"

    def render(self, *, status: Status | None = None) -> PredictionResponse:
        """The prediction object; `status` overrides the reported status (Prefer: wait)."""
        urls = f"{self.base_url}/v1/predictions/{self.id}"
        return PredictionResponse(
            id=self.id,
            model=self.model,
            version=self.version,
            status=status or self.status,
            input=self.input,
            output=[self.url(item) for item in self.outputs] if self.outputs else None,
            error=self.error,
            logs="".join(f"{line}\n" for line in self.log_lines),
            metrics=self.metrics,
            created_at=iso8601(self.created_at),
            started_at=None if self.started_at is None else iso8601(self.started_at),
            completed_at=None if self.completed_at is None else iso8601(self.completed_at),
            urls=PredictionUrls(get=urls, cancel=f"{urls}/cancel", stream=f"{urls}/stream"),
            data_removed=self.data_removed,
        )

    def body(self) -> bytes:
        """The prediction object as JSON bytes (webhook bodies)."""
        return self.render().model_dump_json().encode()

    def change_marker(self) -> asyncio.Event:
        """The event the next `touch` sets."""
        return self._changed

    def touch(self) -> None:
        """Wake everyone waiting in `wait_change` (call after every change)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the next `touch`; True if one happened."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_done(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a terminal status; True if reached."""
        deadline = time.monotonic() + timeout
        while not self.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.wait_change(remaining):
                return self.done
        return True


def new_prediction_id() -> str:
    """A 26-character lowercase id, shaped like Replicate's."""
    return base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("=")[:26]
