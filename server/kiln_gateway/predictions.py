"""Predictions' lifecycle: running each one on Kiln, durably, and cleaning up after it.

A prediction is created `starting`, becomes `processing` when Kiln admits it into a batch
(the `started` event), gains one output per `image` event and ends `succeeded` on
`completed`, `failed` when Kiln reports an error, or `canceled`. Every change is written to
the database (`kiln_gateway.store`) before anyone is told: the prediction object (GET), an
append-only journal of server-sent events (`logs`, `output`, `error`, `done`) for
streaming, and webhook messages in the outbox.

Each denoising step adds a tqdm-style log line (` 50%|█████     | 4/8 [...]`), which is what
the official client's `Prediction.progress` parses.

Nothing accepted is lost when a gateway stops. The replica running a prediction holds a
lease on it and renews it every second; a prediction whose lease ran out (its gateway was
killed, or shut down mid-run) is claimed by another replica or by the next start and sent
to Kiln again, its partial outputs discarded, up to `max_submissions` times in all; after
that, or when Kiln refuses it, it ends `failed` with the reason. A cancel sent to any
replica reaches the one running the prediction within a second.

After `retention_seconds` a finished prediction's files are deleted and its input, output
and logs are removed (`data_removed: true`), as Replicate does for API predictions. The
same happens to the oldest finished predictions when the output files pass
`max_files_bytes` or the data-URI outputs kept in the database pass `max_inline_bytes`.
Beyond `max_predictions` records, the oldest finished ones are deleted with their files.
Output folders without a prediction that still has its data are deleted at start and on
every retention pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from kiln_client.aio import AsyncKilnClient
from kiln_client.errors import KilnError
from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.errors import ApiError, input_invalid, shorten
from kiln_gateway.files import FileStore, data_uri
from kiln_gateway.metrics import GatewayMetrics
from kiln_gateway.records import (
    TERMINAL,
    PredictionRecord,
    PredictionResponse,
    PredictionUrls,
    Status,
    new_prediction_id,
)
from kiln_gateway.schema import replicate_field, violations_to_fields
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.store import PredictionStore
from kiln_gateway.webhooks import Message, PredictionWebhook, WebhookDispatcher

__all__ = [
    "TERMINAL",
    "PredictionRecord",
    "PredictionResponse",
    "PredictionRunner",
    "PredictionUrls",
    "Status",
    "new_prediction_id",
]

log = logging.getLogger("kiln_gateway.predictions")

ACCEPT_TIMEOUT_SECONDS = 10.0
"""How long creation waits for Kiln to accept (or reject) the request before answering."""
PROGRESS_FLUSH_SECONDS = 0.2
"""Progress lines are written at most this often per prediction (other changes at once)."""
REMOTE_POLL_SECONDS = 0.5
"""How often a waiter re-reads a prediction another replica runs."""
CANCEL_WAIT_SECONDS = 10.0
_BAR_WIDTH = 10


class _LeaseLost(Exception):
    """Another replica holds the prediction now; this one must stop touching it."""


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


_INPUT_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


def _http_error(error: KilnError, upstream: str) -> ApiError:
    """The HTTP answer for a request Kiln refused before accepting it."""
    code = error.code
    message = shorten(error.message, 300)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return input_invalid(violations_to_fields(error.field_violations))
    if code in _INPUT_CODES and error.field_violations:
        # A LoRA no folder holds (NOT_FOUND) or one the backend cannot apply
        # (FAILED_PRECONDITION): the input names it, so it is the input's problem.
        return input_invalid(violations_to_fields(error.field_violations))
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, "Model not found", message)
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
            f"the Kiln server at {upstream} is unavailable: {message}",
            headers={"Retry-After": "5"},
        )
    return ApiError(502, "Kiln server error", f"{code.name}: {message}")


def _failure_message(error: KilnError) -> str:
    input_codes = (grpc.StatusCode.INVALID_ARGUMENT, *_INPUT_CODES)
    if error.code in input_codes and error.field_violations:
        return "; ".join(
            f"{replicate_field(name)}: {shorten(why, 200)}" for name, why in error.field_violations
        )
    if error.message:
        return f"{error.code.name}: {shorten(error.message, 300)}"
    return error.code.name


class PredictionRunner:
    """Runs predictions on Kiln, writes each change to the store, and keeps the leases."""

    def __init__(
        self,
        client: AsyncKilnClient,
        settings: GatewaySettings,
        store: PredictionStore,
        files: FileStore,
        dispatcher: WebhookDispatcher,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._client = client
        self._metrics = metrics or GatewayMetrics()
        self._settings = settings
        self._store = store
        self._files = files
        self._dispatcher = dispatcher
        self._live: dict[str, PredictionRecord] = {}
        self._lost: set[str] = set()
        self._stopping = False
        self._caps_task: asyncio.Task[None] | None = None

    # --- looking predictions up -----------------------------------------------------------

    def live(self, prediction_id: str) -> PredictionRecord | None:
        """The record of a prediction this gateway is running right now, or None."""
        return self._live.get(prediction_id)

    async def find(self, prediction_id: str, owner: str | None) -> PredictionRecord | None:
        """A prediction by id if `owner` made it (None: anyone's), freshest copy first."""
        live = self._live.get(prediction_id)
        if live is not None:
            return live if owner is None or live.owner == owner else None
        return await self._store.get(prediction_id, owner)

    def waiter(self, prediction_id: str) -> Callable[[float], Awaitable[None]]:
        """A wait for the prediction's next change after now: `await waiter(timeout)`.

        Take it before reading the prediction, so a change made during the read still ends
        the wait. For a prediction another replica runs, the wait is a short poll interval.
        """
        live = self._live.get(prediction_id)
        if live is None:
            return lambda timeout: asyncio.sleep(min(timeout, REMOTE_POLL_SECONDS))
        changed = live.change_marker()

        async def wait(timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

        return wait

    # --- starting and adopting ------------------------------------------------------------

    async def start(self, record: PredictionRecord, *, notes: list[str] | None = None) -> None:
        """Store the prediction, send it to Kiln and return once Kiln accepted it (or 10 s).

        Webhooks start with the `start` event.

        Raises:
            ApiError: Kiln refused the request before accepting it (422 naming the fields,
                404, 429 with Retry-After, 503); the prediction is then forgotten.
        """
        for note in notes or ():
            self._log(record, note)
        await self._store.create(record, self._take(record))
        self._live[record.id] = record
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        record.task = asyncio.create_task(self._run(record, accepted), name=f"kiln-{record.id}")
        try:
            await asyncio.wait_for(asyncio.shield(accepted), ACCEPT_TIMEOUT_SECONDS)
        except TimeoutError:
            # Kiln is slow to answer: answer now; a later refusal fails the prediction.
            if not accepted.done():
                accepted.set_result(None)
        except KilnError as error:
            self._live.pop(record.id, None)
            self._metrics.prediction_ended("rejected")
            await self._store.discard(record.id)
            raise _http_error(error, self._settings.upstream) from None
        if record.webhook is not None:
            record.hooks = self._hooks(record)
            messages = record.hooks.notify("start")
            if record.done:
                messages += record.hooks.notify("completed")
            await self._enqueue(record, messages)
        log.info(
            "prediction created",
            extra={"request_id": record.id, "model": record.kiln_model, "status": record.status},
        )

    async def adopt(self, record: PredictionRecord) -> None:
        """Take over a prediction whose gateway stopped: send it to Kiln again, or end it."""
        self._live[record.id] = record
        if record.webhook is not None:
            record.hooks = self._hooks(record)
        try:
            if record.cancel_requested:
                await self._finish(record, "canceled", None)
            elif record.request is None or record.submissions > self._settings.max_submissions:
                await self._finish(
                    record,
                    "failed",
                    f"the gateway running this prediction stopped {record.submissions - 1} "
                    "time(s); it was not sent to Kiln again",
                )
            else:
                await self._files.delete(record.file_token)
                record.outputs, record.output_bytes = [], 0
                self._log(
                    record,
                    "Re-submitted to Kiln: the gateway that ran this prediction stopped "
                    f"(submission {record.submissions} of at most "
                    f"{self._settings.max_submissions})",
                )
                await self._flush(record, "logs")
                accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                accepted.set_result(None)
                record.task = asyncio.create_task(
                    self._run(record, accepted), name=f"kiln-{record.id}"
                )
                log.warning(
                    "prediction re-submitted after its gateway stopped",
                    extra={"request_id": record.id, "model": record.kiln_model},
                )
                return
        except _LeaseLost:
            pass
        self._live.pop(record.id, None)

    def _hooks(self, record: PredictionRecord) -> PredictionWebhook:
        assert record.webhook is not None

        def send_later(messages: list[Message]) -> None:
            if record.id in self._lost:
                return
            # Queued now, so it lands before the prediction's next change (`completed`).
            written = self._store.enqueue(record.id, messages)
            written.add_done_callback(self._after_enqueue)

        return PredictionWebhook(record.webhook, record.body, send_later)

    def _after_enqueue(self, written: asyncio.Future[None]) -> None:
        if written.cancelled():
            return
        if written.exception() is not None:
            log.error("storing a webhook message failed", exc_info=written.exception())
        else:
            self._dispatcher.kick()

    async def _enqueue(self, record: PredictionRecord, messages: list[Message]) -> None:
        if messages:
            await self._store.enqueue(record.id, messages)
            self._dispatcher.kick()

    # --- cancel ---------------------------------------------------------------------------

    async def cancel(self, record: PredictionRecord) -> PredictionRecord:
        """Cancel a prediction (stopping the Kiln request); its state afterwards.

        A prediction another replica runs is canceled through the database; this waits up
        to 10 s to see it end. Canceling a finished prediction changes nothing.
        """
        if record.done:
            return record
        live = self._live.get(record.id)
        if live is not None:
            if not live.done and live.task is not None:
                live.cancel_requested = True
                live.task.cancel()
                await asyncio.wait({live.task}, timeout=CANCEL_WAIT_SECONDS)
            return live
        await self._store.request_cancel(record.id)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        current = record
        while not current.done and time.monotonic() < deadline:
            await asyncio.sleep(REMOTE_POLL_SECONDS / 2)
            current = await self._store.get(record.id, None) or current
        return current

    # --- running --------------------------------------------------------------------------

    async def _run(self, record: PredictionRecord, accepted: asyncio.Future[None]) -> None:
        try:
            await self._generate(record, accepted)
        except _LeaseLost:
            log.warning(
                "another gateway took this prediction over; stopped running it here",
                extra={"request_id": record.id},
            )
        except Exception:
            # Its lease is no longer renewed: the prediction is taken over (sent to Kiln
            # again) once the lease runs out.
            log.exception("prediction bookkeeping failed", extra={"request_id": record.id})
        finally:
            # The input photos are megabytes and Kiln has them; the record outlives the run.
            record.request = None
            if record.hooks is not None and (record.done or record.id in self._lost):
                record.hooks.close()
            self._live.pop(record.id, None)
            self._lost.discard(record.id)
            record.touch()

    async def _generate(self, record: PredictionRecord, accepted: asyncio.Future[None]) -> None:
        assert record.request is not None
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
                await self._finish(record, "failed", "the Kiln server ended the stream early")
        except asyncio.CancelledError:
            if not accepted.done():
                why = "canceled" if record.cancel_requested else "the gateway is shutting down"
                accepted.set_exception(KilnError(grpc.StatusCode.CANCELLED, why))
                return
            if record.id in self._lost:
                return
            if record.cancel_requested:
                await self._finish(record, "canceled", None)
                return
            # The gateway is stopping: the lease is released and the prediction is sent to
            # Kiln again by the next gateway to start (or by another replica).
            await self._save_quietly(record)
        except KilnError as error:
            self._metrics.upstream_error(error.code)
            if not accepted.done():
                accepted.set_exception(error)
                return
            await self._finish(record, "failed", _failure_message(error))
        except _LeaseLost:
            raise
        except Exception:
            log.exception("prediction failed inside the gateway", extra={"request_id": record.id})
            if not accepted.done():
                accepted.set_exception(
                    KilnError(grpc.StatusCode.INTERNAL, "the gateway failed; see its logs")
                )
                return
            await self._finish(record, "failed", "internal error in the gateway; see its logs")

    async def _apply(self, record: PredictionRecord, event: pb.GenerateResponse) -> bool:
        kind = event.WhichOneof("event")
        if kind == "queued" and event.queued.position > 0:
            ahead = event.queued.position
            self._log(record, f"Waiting for a batch slot: {ahead} request(s) ahead in the queue")
            await self._flush(record, "logs")
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
            await self._flush(record, "logs")
        elif kind == "progress":
            elapsed = time.time() - (record.started_at or record.created_at)
            line = _progress_line(event.progress.step, event.progress.total_steps, elapsed)
            self._log(record, line)
            await self._flush(record, "logs", urgent=False)
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
            await self._finish(record, "succeeded", None)
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
            size = len(item)
        else:
            item = await self._files.save(
                record.file_token, image.index, image.data, image.mime_type
            )
            size = len(image.data)
        record.outputs.append(item)
        record.output_bytes += size
        self._journal(record, "output", str(len(record.outputs) - 1))
        await self._flush(record, "output")

    def _log(self, record: PredictionRecord, line: str) -> None:
        record.log_lines.append(line)
        self._journal(record, "logs", line)

    @staticmethod
    def _journal(record: PredictionRecord, event: str, data: str) -> None:
        record.unsaved.append((record.next_position, event, data))
        record.next_position += 1

    @staticmethod
    def _take(record: PredictionRecord) -> list[tuple[int, str, str]]:
        events, record.unsaved = record.unsaved, []
        return events

    async def _flush(self, record: PredictionRecord, event: str, *, urgent: bool = True) -> None:
        """Write the record's changes (and its webhook messages), then wake its waiters.

        Progress lines (`urgent=False`) are written at most every PROGRESS_FLUSH_SECONDS;
        the next write carries the ones held back.
        """
        now = time.monotonic()
        if not urgent and now - record.flushed_at < PROGRESS_FLUSH_SECONDS:
            return
        messages = record.hooks.notify(event) if record.hooks is not None else []
        events = self._take(record)
        if not await self._store.save(record, events, messages):
            self._lost.add(record.id)
            raise _LeaseLost
        record.flushed_at = now
        if messages:
            self._dispatcher.kick()
        record.touch()

    async def _save_quietly(self, record: PredictionRecord) -> None:
        with contextlib.suppress(Exception):
            await self._store.save(record, self._take(record), [])

    async def _finish(self, record: PredictionRecord, status: Status, error: str | None) -> None:
        if record.done:
            return
        record.status = status
        record.error = error
        record.completed_at = time.time()
        self._metrics.prediction_ended(status)
        if status == "failed":
            self._log(record, f"Prediction failed: {error}")
            self._journal(record, "error", json.dumps({"detail": error}))
        elif status == "canceled":
            self._log(record, "Prediction canceled")
        reason = {"failed": {"reason": "error"}, "canceled": {"reason": "canceled"}}
        self._journal(record, "done", json.dumps(reason.get(status, {})))
        await self._flush(record, "completed")
        log.info(
            "prediction %s",
            status,
            extra={"request_id": record.id, "model": record.kiln_model, "status": status},
        )
        if record.output_bytes:
            self._enforce_caps_soon()

    # --- leases ---------------------------------------------------------------------------

    async def maintain(self) -> None:
        """Renew this replica's leases, act on cancels sent to other replicas, and adopt
        predictions whose gateway stopped (one pass)."""
        running = [r for r in self._live.values() if not r.done and r.task is not None]
        held = await self._store.renew([record.id for record in running])
        for record in running:
            if record.done or record.task is None:
                continue
            if record.id not in held:
                self._lost.add(record.id)
                record.task.cancel()
            elif held[record.id] and not record.cancel_requested:
                record.cancel_requested = True
                record.task.cancel()
        if not self._stopping:
            for orphan in await self._store.claim_orphans():
                if orphan.id not in self._live:  # else its lease lapsed while it ran here
                    await self.adopt(orphan)

    async def maintain_forever(self) -> None:
        """`maintain` every second (or a third of the lease, when shorter) until cancelled."""
        interval = min(1.0, self._settings.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.maintain()
            except Exception:  # keep the leases going whatever one pass hit
                log.exception("lease renewal failed")

    async def recover(self, *, everything: bool) -> int:
        """Adopt every prediction left running by a gateway that stopped (at start).

        `everything`: also those whose lease has not run out (SQLite: no other gateway can
        hold them). Returns how many were adopted.
        """
        if everything:
            await self._store.reset_delivery_leases()
        orphans = await self._store.claim_orphans(everything=everything)
        for orphan in orphans:
            await self.adopt(orphan)
        return len(orphans)

    # --- retention, caps, orphans ---------------------------------------------------------

    async def _delete_files(self, tokens: list[str]) -> None:
        for token in tokens:
            await self._files.delete(token)

    async def purge(self, now: float | None = None) -> int:
        """One retention pass: expire old data, trim records, enforce the caps, sweep files.

        Returns how many predictions lost their data to retention.
        """
        now = time.time() if now is None else now
        cutoff = now - self._settings.retention_seconds
        removed = 0
        while True:
            tokens = await self._store.remove_expired(cutoff)
            await self._delete_files(tokens)
            removed += len(tokens)
            if len(tokens) < 500:
                break
        await self._delete_files(await self._store.trim(self._settings.max_predictions))
        await self.enforce_caps()
        await self.sweep_files()
        return removed

    async def enforce_caps(self) -> None:
        """Remove the oldest finished outputs while files or data URIs pass their caps."""
        settings = self._settings
        await self._delete_files(
            await self._store.evict(inline=False, cap=settings.max_files_bytes)
        )
        await self._store.evict(inline=True, cap=settings.max_inline_bytes)

    def _enforce_caps_soon(self) -> None:
        if self._caps_task is None or self._caps_task.done():
            self._caps_task = asyncio.create_task(self.enforce_caps(), name="storage-caps")
            self._caps_task.add_done_callback(_log_failure)

    async def sweep_files(self) -> int:
        """Delete output folders of predictions that no longer exist or have no data."""
        tokens = self._files.tokens()
        keep = await self._store.tokens_with_data(tokens)
        stale = [token for token in tokens if token not in keep]
        await self._delete_files(stale)
        return len(stale)

    # --- stopping -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop running predictions and release them, so the next gateway re-submits them."""
        self._stopping = True
        running = [r for r in self._live.values() if r.task is not None and not r.task.done()]
        for record in running:
            assert record.task is not None
            record.task.cancel()
        if running:
            await asyncio.wait({r.task for r in running if r.task is not None}, timeout=5)
        for record in list(self._live.values()):
            if record.hooks is not None:
                record.hooks.close()
        if self._caps_task is not None:
            self._caps_task.cancel()
        with contextlib.suppress(Exception):
            await self._store.release()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background store write failed", exc_info=task.exception())
