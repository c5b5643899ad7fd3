"""Webhook delivery as Replicate does it: filtered events, throttling, retries, signatures.

Each delivery POSTs the prediction object as JSON, signed per Standard Webhooks:
- `webhook-id`: a unique message id (the same on every retry of that message);
- `webhook-timestamp`: Unix seconds of the attempt;
- `webhook-signature`: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, keyed with
  the base64 part of the `whsec_...` secret that GET /v1/webhooks/default/secret returns.

Events (`webhook_events_filter`; all four by default): `start` once the prediction is
accepted, `output` on each new output, `logs` on new log lines, `completed` at the end.
`output` and `logs` are sent at most once every 500 ms, carrying the latest state
(`PredictionWebhook` decides what is sent when).

Messages go through the database's outbox (`kiln_gateway.store`): written with the change
they report, then delivered by the `WebhookDispatcher` of any replica, so messages pending
when a gateway stops are delivered after it (or another replica) starts. A prediction's
messages are delivered one at a time, in order, so `completed` always comes last. A failed
attempt (network error, refused address or non-2xx answer; redirects are not followed) is
retried up to `webhook_max_attempts` times, waiting `webhook_retry_seconds` and doubling
each time. A replica that stops mid-delivery leaves the message to be sent again, with the
same `webhook-id`, so receivers can drop the duplicate.

Webhook URLs must reach public addresses, checked when the prediction is created (a 422
naming the field) and again, after DNS resolution, on every attempt; the request goes to
the address that was checked. `webhook_allowed_hosts` names exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable

import httpx

from kiln_gateway.errors import shorten
from kiln_gateway.fetch import (
    AddressCheck,
    AddressGuard,
    FetchError,
    Resolver,
    address_problem,
    parse_outbound_url,
    pinned,
)
from kiln_gateway.metrics import GatewayMetrics
from kiln_gateway.records import WEBHOOK_EVENTS, WebhookConfig
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.store import Delivery, PredictionStore

__all__ = [
    "EVENTS",
    "Message",
    "PredictionWebhook",
    "WebhookDispatcher",
    "WebhookSender",
    "new_message_id",
    "new_secret",
    "sign",
]

log = logging.getLogger("kiln_gateway.webhooks")

EVENTS = WEBHOOK_EVENTS
THROTTLE_SECONDS = 0.5
POLL_SECONDS = 1.0
"""How often the dispatcher looks for messages other replicas (or retries) made due."""
MAX_IN_FLIGHT = 32

Message = tuple[str, str, bytes]
"""(message id, url, body) of one webhook message."""


def new_secret() -> str:
    """A fresh signing secret in Replicate's format, `whsec_<base64 of 32 random bytes>`."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def new_message_id() -> str:
    """A fresh `webhook-id`."""
    return "msg_" + secrets.token_hex(12)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one delivery attempt."""
    key = base64.b64decode(secret.partition("_")[2])
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSender:
    """Checks webhook URLs and makes signed delivery attempts to checked addresses."""

    def __init__(
        self,
        settings: GatewaySettings,
        secret: str,
        *,
        resolver: Resolver | None = None,
        address_check: AddressCheck = address_problem,
    ) -> None:
        self.secret = secret
        self._timeout = settings.webhook_timeout_seconds
        self._guard = AddressGuard(
            resolver=resolver,
            address_check=address_check,
            allowed=settings.webhook_allowed_hosts,
            remedy="an operator can allow hosts with --webhook-allowed-hosts",
        )

    async def check(self, url: str) -> str | None:
        """Why webhooks cannot be sent to `url` (not http(s), not public...), or None."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._guard.addresses(parse_outbound_url(url))
        except FetchError as error:
            return str(error)
        except TimeoutError:
            return f"resolving the host took longer than {self._timeout:g} s"
        return None

    async def deliver(self, url: str, body: bytes, message_id: str) -> str | None:
        """One signed POST of `body` to `url`; None on a 2xx answer, else what went wrong."""
        try:
            target = parse_outbound_url(url)
            async with asyncio.timeout(self._timeout):
                addresses = await self._guard.addresses(target)
        except FetchError as error:
            return str(error)
        except TimeoutError:
            return f"resolving the host took longer than {self._timeout:g} s"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "kiln-gateway",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, message_id, timestamp, body),
        }
        problem = "no address"
        for address in addresses:
            aimed, host, extensions = pinned(target, address)
            # A fresh client per attempt: a pooled connection opened for one host name must
            # never carry a message for another that shares its address.
            async with httpx.AsyncClient(
                trust_env=False, follow_redirects=False, timeout=self._timeout
            ) as client:
                try:
                    response = await client.post(
                        aimed, content=body, headers={**headers, **host}, extensions=extensions
                    )
                except httpx.ConnectError as error:
                    problem = f"cannot connect: {shorten(str(error) or type(error).__name__)}"
                    continue  # try the host's next address
                except httpx.HTTPError as error:
                    return f"{type(error).__name__}: {shorten(str(error))}"
            if 200 <= response.status_code < 300:
                return None
            return f"HTTP {response.status_code}"
        return problem


class PredictionWebhook:
    """Which webhook messages one prediction sends, and when.

    `notify(event)` is called by the prediction's lifecycle and returns the messages to
    store with that change; `snapshot()` must return the prediction's current JSON body.
    `output` and `logs` changes coming faster than every 500 ms are coalesced: the latest
    state is handed to `send_later` when the interval has passed.
    """

    def __init__(
        self,
        config: WebhookConfig,
        snapshot: Callable[[], bytes],
        send_later: Callable[[list[Message]], None],
    ) -> None:
        self._config = config
        self._events = frozenset(config.events)
        self._snapshot = snapshot
        self._send_later = send_later
        self._last_throttled = -1e9
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False

    def _message(self, url: str) -> Message:
        return (new_message_id(), url, self._snapshot())

    def notify(self, event: str) -> list[Message]:
        """Record that `event` happened; the messages to send now (possibly none)."""
        url = self._config.url
        if self._finished:
            return []
        if event == "completed":
            self.close()
            body = self._snapshot()
            messages = []
            if url and "completed" in self._events:
                messages.append((new_message_id(), url, body))
            if self._config.completed_url:
                messages.append((new_message_id(), self._config.completed_url, body))
            return messages
        if not url or event not in self._events:
            return []
        if event == "start":
            return [self._message(url)]
        if self._timer is not None:
            return []  # a throttled message is pending and will carry this change
        loop = asyncio.get_running_loop()
        wait = self._last_throttled + THROTTLE_SECONDS - loop.time()
        if wait <= 0:
            self._last_throttled = loop.time()
            return [self._message(url)]
        self._timer = loop.call_later(wait, self._due)
        return []

    def _due(self) -> None:
        self._timer = None
        url = self._config.url
        if self._finished or not url:
            return
        self._last_throttled = asyncio.get_running_loop().time()
        self._send_later([self._message(url)])

    def close(self) -> None:
        """Send nothing more (the prediction ended, or this gateway lets go of it)."""
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class WebhookDispatcher:
    """Delivers the outbox's messages: one at a time per prediction, many predictions at once."""

    def __init__(
        self,
        store: PredictionStore,
        sender: WebhookSender,
        settings: GatewaySettings,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or GatewayMetrics()
        self._sender = sender
        self._attempts = settings.webhook_max_attempts
        self._first_delay = settings.webhook_retry_seconds
        self._lease = settings.webhook_timeout_seconds * 2 + settings.lease_seconds
        self._kicked = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start delivering (in the running event loop)."""
        self._loop_task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def kick(self) -> None:
        """Look at the outbox now (new messages were stored)."""
        self._kicked.set()

    async def _run(self) -> None:
        while True:
            self._kicked.clear()
            free = MAX_IN_FLIGHT - len(self._in_flight)
            claimed: list[Delivery] = []
            if free > 0:
                try:
                    claimed = await self._store.claim_deliveries(free, self._lease)
                except Exception:  # keep delivering whatever one pass hit
                    log.exception("reading the webhook outbox failed")
            for delivery in claimed:
                task = asyncio.create_task(self._attempt(delivery), name="webhook")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if not claimed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kicked.wait(), POLL_SECONDS)

    async def _attempt(self, delivery: Delivery) -> None:
        try:
            problem = await self._sender.deliver(delivery.url, delivery.body, delivery.message_id)
            if problem is None:
                self._metrics.webhook_attempt("delivered")
                await self._store.delivered(delivery.id)
                return
            attempts = delivery.attempts + 1
            extra = {"request_id": delivery.prediction_id}
            if attempts >= self._attempts:
                self._metrics.webhook_attempt("gave_up")
                log.error(
                    "webhook delivery gave up after %d attempts: %s", attempts, problem, extra=extra
                )
                await self._store.delivery_failed(delivery.id, attempts, None, problem)
                return
            self._metrics.webhook_attempt("retrying")
            log.warning(
                "webhook delivery attempt %d/%d failed: %s",
                attempts,
                self._attempts,
                problem,
                extra=extra,
            )
            delay = self._first_delay * 2 ** (attempts - 1)
            await self._store.delivery_failed(delivery.id, attempts, time.time() + delay, problem)
            asyncio.get_running_loop().call_later(delay, self.kick)
        except Exception:  # a database error: the lease runs out and the message is retried
            log.exception("webhook delivery bookkeeping failed")
        finally:
            self.kick()

    async def wait_idle(self, timeout: float) -> None:
        """Wait up to `timeout` s for the deliveries in flight (used at shutdown)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)

    async def aclose(self) -> None:
        """Stop delivering; attempts still in flight are abandoned (and retried later)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=5)
