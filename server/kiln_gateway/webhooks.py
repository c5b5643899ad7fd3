"""Webhook delivery as Replicate does it: filtered events, throttling, retries, signatures.

Each delivery POSTs the prediction object as JSON, signed per Standard Webhooks:
- `webhook-id`: a unique message id (the same on every retry of that message);
- `webhook-timestamp`: Unix seconds of the attempt;
- `webhook-signature`: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with
  the base64 part of the `whsec_...` secret that GET /v1/webhooks/default/secret returns.

Events (`webhook_events_filter`; all four by default): `start` once the prediction is
accepted, `output` on each new output, `logs` on new log lines, `completed` at the end.
`output` and `logs` are sent at most once every 500 ms, carrying the latest state; a
prediction's deliveries are made one at a time, in order, so `completed` always comes
last. A failed delivery (network error or non-2xx answer) is retried up to
`webhook_max_attempts` times, waiting `webhook_retry_seconds` and doubling each time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Collection

import httpx

from kiln_gateway.settings import GatewaySettings

__all__ = [
    "EVENTS",
    "PredictionWebhook",
    "WebhookSender",
    "new_secret",
    "sign",
]

log = logging.getLogger("kiln_gateway.webhooks")

EVENTS = ("start", "output", "logs", "completed")
"""Webhook event names, in lifecycle order."""
THROTTLE_SECONDS = 0.5


def new_secret() -> str:
    """A fresh signing secret in Replicate's format, `whsec_<base64 of 32 random bytes>`."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery attempt."""
    key = base64.b64decode(secret.partition("_")[2])
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Signs and delivers webhook messages over one shared HTTP client, with retries."""

    def __init__(self, settings: GatewaySettings, secret: str) -> None:
        self.secret = secret
        self._attempts = settings.webhook_max_attempts
        self._first_delay = settings.webhook_retry_seconds
        self._client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": "kiln-gateway"},
        )

    async def deliver(self, url: str, body: bytes, *, prediction_id: str = "") -> bool:
        """POST `body` to `url` until a 2xx answer or the attempts run out; True on success."""
        message_id = "msg_" + secrets.token_hex(12)
        delay = self._first_delay
        for attempt in range(1, self._attempts + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, message_id, timestamp, body),
            }
            try:
                response = await self._client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
            log.warning(
                "webhook delivery attempt %d/%d failed: %s",
                attempt,
                self._attempts,
                problem,
                extra={"request_id": prediction_id},
            )
            if attempt < self._attempts:
                await asyncio.sleep(delay)
                delay *= 2
        log.error(
            "webhook delivery gave up after %d attempts",
            self._attempts,
            extra={"request_id": prediction_id},
        )
        return False

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


class PredictionWebhook:
    """The webhooks of one prediction: filtering, throttling and in-order delivery.

    `notify(event)` is called by the prediction's lifecycle; `snapshot()` must return the
    prediction's current JSON body. Deliveries run on a background task that ends after
    `completed` has been delivered (or `close()` is called).
    """

    def __init__(
        self,
        sender: WebhookSender,
        prediction_id: str,
        snapshot: Callable[[], bytes],
        *,
        url: str | None,
        events: Collection[str] | None,
        completed_url: str | None = None,
    ) -> None:
        self._sender = sender
        self._id = prediction_id
        self._snapshot = snapshot
        self._url = url
        self._events = frozenset(EVENTS if events is None else events)
        self._completed_url = completed_url
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._last_throttled = -1e9
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False
        self._task = asyncio.create_task(self._deliver_all(), name=f"webhooks-{prediction_id}")

    def notify(self, event: str) -> None:
        """Record that `event` happened; deliver now, later (throttled) or not (filtered)."""
        if self._finished:
            return
        if event == "completed":
            self._finished = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            body = self._snapshot()
            if self._url and "completed" in self._events:
                self._queue.put_nowait((self._url, body))
            if self._completed_url:
                self._queue.put_nowait((self._completed_url, body))
            self._queue.put_nowait(None)
            return
        if not self._url or event not in self._events:
            return
        if event == "start":
            self._queue.put_nowait((self._url, self._snapshot()))
            return
        if self._timer is not None:
            return  # a throttled delivery is pending and will carry this change
        loop = asyncio.get_running_loop()
        wait = self._last_throttled + THROTTLE_SECONDS - loop.time()
        if wait <= 0:
            self._send_throttled()
        else:
            self._timer = loop.call_later(wait, self._send_throttled)

    def _send_throttled(self) -> None:
        self._timer = None
        if self._finished or not self._url:
            return
        self._last_throttled = asyncio.get_running_loop().time()
        self._queue.put_nowait((self._url, self._snapshot()))

    async def _deliver_all(self) -> None:
        while (item := await self._queue.get()) is not None:
            url, body = item
            await self._sender.deliver(url, body, prediction_id=self._id)

    async def wait_delivered(self, timeout: float) -> None:
        """Wait up to `timeout` s for every queued delivery (used at shutdown)."""
        await asyncio.wait({self._task}, timeout=timeout)

    def close(self) -> None:
        """Stop delivering (pending messages are dropped)."""
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        self._task.cancel()
