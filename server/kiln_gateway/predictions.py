"""Predictions: the store that keeps them and the lifecycle that runs each one on Kiln.

A prediction is created `starting`, becomes `processing` when Kiln admits it into a batch
(the `started` event), gains one output per `image` event and ends `succeeded` on
`completed`, `failed` when Kiln reports an error, or `canceled`. Every change is recorded
three ways: the prediction object (GET), an append-only journal of server-sent events
(`logs`, `output`, `error`, `done`) for streaming, and webhook notifications.

Each denoising step adds a tqdm-style log line (` 50%|█████     | 4/8 [...]`), which is what
the official client's `Prediction.progress` parses.

After `retention_seconds` a finished prediction's files are deleted and its input, output
and logs are removed (`data_removed: true`), as Replicate does for API predictions. At most
`max_predictions` records are kept; the oldest finished ones are forgotten first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from pydantic import BaseModel

from kiln_client.aio import AsyncKilnClient
from kiln_client.errors import KilnError
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.errors import ApiError, input_invalid
from kiln_gateway.files import FileStore, data_uri
from kiln_gateway.schema import replicate_field, violations_to_fields
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.timefmt import iso8601
from kiln_gateway.webhooks import PredictionWebhook, WebhookSender

__all__ = [
    "TERMINAL",
    "PredictionRecord",
    "PredictionResponse",
    "PredictionRunner",
    "PredictionStore",
    "PredictionUrls",
    "Status",
]

log = logging.getLogger("kiln_gateway.predictions")

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})
ACCEPT_TIMEOUT_SECONDS = 10.0
"""How long creation waits for Kiln to accept (or reject) the request before answering."""
_BAR_WIDTH = 10


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


@dataclass
class PredictionRecord:
    """One prediction's full state; mutated only by its lifecycle and by the store."""

    id: str
    seq: int
    model: str
    version: str
    kiln_model: str
    input: dict[str, Any]
    request: pb.GenerateRequest
    base_url: str
    data_uri: bool
    file_token: str
    created_at: float = field(default_factory=time.time)
    status: Status = "starting"
    started_at: float | None = None
    completed_at: float | None = None
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    log_lines: list[str] = field(default_factory=list)
    metrics: dict[str, float | int] = field(default_factory=dict)
    data_removed: bool = False
    journal: list[tuple[str, str]] = field(default_factory=list)
    """Server-sent events so far, in order: (event, data)."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task[None] | None = None
    webhook: PredictionWebhook | None = None
    cancel_requested: bool = False

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


class PredictionStore:
    """Every known prediction, in creation order, with cursor pagination (newest first)."""

    def __init__(self, max_predictions: int) -> None:
        self._records: dict[str, PredictionRecord] = {}
        self._max = max_predictions
        self._next_seq = 1
        self._runs: Counter[str] = Counter()

    def next_seq(self) -> int:
        """A creation sequence number, larger than every earlier one."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def add(self, record: PredictionRecord) -> None:
        """Keep a record; forget the oldest finished ones beyond the limit."""
        self._records[record.id] = record
        self._runs[record.kiln_model] += 1
        if len(self._records) > self._max:
            for old in [r for r in self._records.values() if r.done][
                : len(self._records) - self._max
            ]:
                del self._records[old.id]

    def discard(self, record: PredictionRecord) -> None:
        """Forget a record that was never accepted (it does not count as a run)."""
        if self._records.pop(record.id, None) is not None:
            self._runs[record.kiln_model] -= 1

    def get(self, prediction_id: str) -> PredictionRecord | None:
        """The record with this id, or None."""
        return self._records.get(prediction_id)

    def run_count(self, kiln_model: str) -> int:
        """Predictions created for a Kiln model through this gateway."""
        return self._runs[kiln_model]

    def records(self) -> list[PredictionRecord]:
        """Every record, oldest first."""
        return list(self._records.values())

    def page(
        self, *, before: int | None, after: int | None, size: int
    ) -> tuple[list[PredictionRecord], int | None, int | None]:
        """One page, newest first: (records, `before` cursor of next, `after` cursor of previous).

        `before=S` pages to records older than sequence S; `after=S` to the ones just newer.
        """
        ordered = self.records()
        if after is not None:
            items = [r for r in ordered if r.seq > after][:size][::-1]
        else:
            newest_first = ordered[::-1]
            items = [r for r in newest_first if before is None or r.seq < before][:size]
        if not items:
            return [], None, None
        oldest, newest = items[-1].seq, items[0].seq
        has_older = any(r.seq < oldest for r in ordered)
        has_newer = any(r.seq > newest for r in ordered)
        return items, (oldest if has_older else None), (newest if has_newer else None)


def _progress_line(step: int, total: int, elapsed: float) -> str:
    total = max(total, 1)
    fraction = min(step / total, 1.0)
    filled = int(fraction * _BAR_WIDTH)
    bar = "█" * filled + " " * (_BAR_WIDTH - filled)
    rate = step / elapsed if elapsed > 0 else 0.0
    remaining = (total - step) / rate if rate > 0 else 0.0
    return (
        f"{int(fraction * 100):3d}%|{bar}| {step}/{total} "
        f"[{_clock(elapsed)}<{_clock(remaining)}, {rate:.2f}it/s]"
    )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def _http_error(error: KilnError, upstream: str) -> ApiError:
    """The HTTP answer for a request Kiln refused before accepting it."""
    code = error.code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return input_invalid(violations_to_fields(error.field_violations))
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, "Model not found", error.message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = max(1, round(error.retry_after or 1))
        return ApiError(
            429,
            "Too many requests",
            f"the Kiln queue is full; retry in {retry} s",
            headers={"Retry-After": str(retry)},
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ApiError(
            503,
            "Kiln server unavailable",
            f"the Kiln server at {upstream} is unavailable: {error.message}",
            headers={"Retry-After": "5"},
        )
    return ApiError(502, "Kiln server error", f"{code.name}: {error.message}")


def _failure_message(error: KilnError) -> str:
    if error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field_violations:
        return "; ".join(f"{replicate_field(name)}: {why}" for name, why in error.field_violations)
    return f"{error.code.name}: {error.message}" if error.message else error.code.name


class PredictionRunner:
    """Runs predictions on Kiln and applies each event to the record."""

    def __init__(
        self,
        client: AsyncKilnClient,
        settings: GatewaySettings,
        store: PredictionStore,
        files: FileStore,
        webhooks: WebhookSender,
    ) -> None:
        self._client = client
        self._settings = settings
        self._store = store
        self._files = files
        self._webhooks = webhooks

    async def start(
        self,
        record: PredictionRecord,
        *,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        webhook_completed: str | None = None,
        notes: list[str] | None = None,
    ) -> None:
        """Send the prediction to Kiln and return once Kiln accepted it (or after 10 s).

        The record joins the store; webhooks start with the `start` event.

        Raises:
            ApiError: Kiln refused the request before accepting it (422 naming the fields,
                404, 429 with Retry-After, 503); the record is then discarded.
        """
        for note in notes or ():
            self._log(record, note)
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._store.add(record)
        record.task = asyncio.create_task(self._run(record, accepted), name=f"kiln-{record.id}")
        try:
            await asyncio.wait_for(asyncio.shield(accepted), ACCEPT_TIMEOUT_SECONDS)
        except TimeoutError:
            # Kiln is slow to answer: answer now; a later refusal fails the prediction.
            if not accepted.done():
                accepted.set_result(None)
        except KilnError as error:
            self._store.discard(record)
            raise _http_error(error, self._settings.upstream) from None
        if webhook or webhook_completed:
            record.webhook = PredictionWebhook(
                self._webhooks,
                record.id,
                record.body,
                url=webhook,
                events=webhook_events,
                completed_url=webhook_completed,
            )
            record.webhook.notify("start")
            if record.done:
                record.webhook.notify("completed")
        log.info(
            "prediction created",
            extra={"request_id": record.id, "model": record.kiln_model, "status": record.status},
        )

    async def cancel(self, record: PredictionRecord) -> None:
        """Cancel a running prediction (stopping the Kiln request); no-op once finished."""
        if record.done or record.task is None:
            return
        record.cancel_requested = True
        record.task.cancel()
        await asyncio.wait({record.task}, timeout=10)

    async def _run(self, record: PredictionRecord, accepted: asyncio.Future[None]) -> None:
        try:
            await self._generate(record, accepted)
        finally:
            # The input photos are megabytes and Kiln has them; the record outlives the run.
            record.request.ClearField("image")
            record.request.ClearField("mask")

    async def _generate(self, record: PredictionRecord, accepted: asyncio.Future[None]) -> None:
        events = self._client.generate_events(
            record.request, timeout=self._settings.upstream_timeout_seconds
        )
        completed = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if not accepted.done():
                        accepted.set_result(None)
                        log.info(
                            "prediction runs as Kiln request %s",
                            event.request_id,
                            extra={"request_id": record.id, "model": record.kiln_model},
                        )
                    completed = await self._apply(record, event) or completed
            if not completed:
                self._finish(record, "failed", "the Kiln server ended the stream early")
        except asyncio.CancelledError:
            if not accepted.done():
                why = "canceled" if record.cancel_requested else "the gateway is shutting down"
                accepted.set_exception(KilnError(grpc.StatusCode.CANCELLED, why))
                return
            reason = None if record.cancel_requested else "the gateway shut down"
            self._finish(record, "canceled" if reason is None else "failed", reason)
        except KilnError as error:
            if not accepted.done():
                accepted.set_exception(error)
                return
            self._finish(record, "failed", _failure_message(error))
        except Exception:
            log.exception("prediction failed inside the gateway", extra={"request_id": record.id})
            if not accepted.done():
                accepted.set_exception(
                    KilnError(grpc.StatusCode.INTERNAL, "the gateway failed; see its logs")
                )
                return
            self._finish(record, "failed", "internal error in the gateway; see its logs")

    async def _apply(self, record: PredictionRecord, event: pb.GenerateResponse) -> bool:
        kind = event.WhichOneof("event")
        if kind == "queued" and event.queued.position > 0:
            ahead = event.queued.position
            self._log(record, f"Waiting for a batch slot: {ahead} request(s) ahead in the queue")
        elif kind == "started":
            started = event.started
            record.status = "processing"
            record.started_at = time.time()
            self._log(record, f"Using seed: {started.seed}")
            conditioning = (
                f", {started.mode.replace('_', ' ')} at strength {started.strength:g}"
                if started.mode and started.mode != "text_to_image"
                else ""
            )
            self._log(
                record,
                f"Kiln model {started.model}: {started.width}x{started.height}, "
                f"{started.num_outputs} output(s), {started.num_inference_steps} steps, "
                f"scheduler {started.scheduler}, guidance {started.guidance_scale:g}"
                f"{conditioning}",
            )
        elif kind == "progress":
            elapsed = time.time() - (record.started_at or record.created_at)
            line = _progress_line(event.progress.step, event.progress.total_steps, elapsed)
            self._log(record, line)
        elif kind == "image":
            await self._add_output(record, event.image)
        elif kind == "completed":
            done = event.completed
            record.metrics = {
                "predict_time": round(done.inference_seconds, 6),
                "total_time": round(time.time() - record.created_at, 6),
                "queue_time": round(done.queue_seconds, 6),
                "engine_seconds": round(done.engine_seconds, 6),
                "image_count": int(done.num_images or len(record.outputs)),
            }
            self._finish(record, "succeeded", None)
            return True
        return False

    def _inline(self, record: PredictionRecord) -> bool:
        """True when outputs go out as data URIs (see `settings.OUTPUT_MODES`)."""
        mode = self._settings.output_mode
        if record.data_uri or mode == "data-uri":
            return True
        return mode == "auto" and not record.base_url.startswith("https:")

    async def _add_output(self, record: PredictionRecord, image: pb.ImageEvent) -> None:
        if self._inline(record):
            item = data_uri(image.data, image.mime_type)
        else:
            item = await self._files.save(
                record.file_token, image.index, image.data, image.mime_type
            )
        record.outputs.append(item)
        record.journal.append(("output", record.url(item)))
        self._changed(record, "output")

    def _log(self, record: PredictionRecord, line: str) -> None:
        record.log_lines.append(line)
        record.journal.append(("logs", line))
        self._changed(record, "logs")

    @staticmethod
    def _changed(record: PredictionRecord, event: str) -> None:
        if record.webhook is not None:
            record.webhook.notify(event)
        record.touch()

    def _finish(self, record: PredictionRecord, status: Status, error: str | None) -> None:
        if record.done:
            return
        record.status = status
        record.error = error
        record.completed_at = time.time()
        if status == "failed":
            self._log(record, f"Prediction failed: {error}")
            record.journal.append(("error", json.dumps({"detail": error})))
        elif status == "canceled":
            self._log(record, "Prediction canceled")
        reason = {
            "succeeded": {},
            "failed": {"reason": "error"},
            "canceled": {"reason": "canceled"},
        }
        record.journal.append(("done", json.dumps(reason.get(status, {}))))
        log.info(
            "prediction %s",
            status,
            extra={"request_id": record.id, "model": record.kiln_model, "status": status},
        )
        self._changed(record, "completed")

    async def purge(self, now: float | None = None) -> int:
        """Remove the data of predictions finished more than `retention_seconds` ago.

        Returns how many predictions lost their data.
        """
        now = time.time() if now is None else now
        cutoff = now - self._settings.retention_seconds
        expired = [
            r
            for r in self._store.records()
            if r.done and not r.data_removed and (r.completed_at or now) <= cutoff
        ]
        for record in expired:
            await self._files.delete(record.file_token)
            record.data_removed = True
            record.input = {}
            record.outputs = []
            record.log_lines = []
            record.journal = [("done", json.dumps({"reason": "data_removed"}))]
            record.touch()
        return len(expired)

    async def shutdown(self) -> None:
        """Stop every running prediction and flush webhooks briefly (gateway exit)."""
        running = [r for r in self._store.records() if r.task is not None and not r.task.done()]
        for record in running:
            assert record.task is not None
            record.task.cancel()
        if running:
            await asyncio.wait({r.task for r in running if r.task is not None}, timeout=5)
        for record in self._store.records():
            if record.webhook is not None:
                await record.webhook.wait_delivered(timeout=1)
                record.webhook.close()
