"""Predictions, their event journals and their webhook messages, kept in the database.

Three tables (see `kiln_gateway.database` for the schema):
- `predictions`: one row per prediction, written when it is created (before the 201) and
  on every change. While a prediction runs, its row names the gateway replica that runs it
  (`lease_owner`) and until when (`lease_expires`): the replica renews the lease every
  second; when it stops doing so, any replica (or the next start) claims the prediction and
  sends it to Kiln again.
- `prediction_events`: each prediction's server-sent events in order (`logs`, `output`,
  `error`, `done`); the prediction's `logs` are its `logs` events.
- `webhook_deliveries`: the outbox. A webhook message is written in the same transaction
  as the change it reports, and delivered by `kiln_gateway.webhooks.WebhookDispatcher`
  from there, so pending messages survive a restart.

Outputs and records share one lifecycle: the calls that remove a prediction's data
(retention, the storage caps, the record limit) return the file tokens whose folders the
caller then deletes.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.database import Database, Row, Session
from kiln_gateway.records import PredictionRecord, WebhookConfig

__all__ = ["Delivery", "Page", "PredictionStore"]

_VIEW = (
    "seq, id, owner, model, version, kiln_model, input, base_url, inline_outputs, file_token, "
    "created_at, status, started_at, completed_at, outputs, output_bytes, error, metrics, "
    "data_removed, webhook, cancel_requested, submissions"
)
"""Every column but the request (which holds the input images)."""
_RUNNING_SQL = "status IN ('starting', 'processing')"
_DONE_SQL = "status IN ('succeeded', 'failed', 'canceled')"
_CHUNK = 500
_DATA_REMOVED = json.dumps({"reason": "data_removed"})


@dataclass(frozen=True)
class Delivery:
    """One webhook message claimed for delivery."""

    id: int
    prediction_id: str
    message_id: str
    url: str
    body: bytes
    attempts: int
    """Attempts made before this one."""


@dataclass(frozen=True)
class Page:
    """One page of predictions, newest first, and the cursors around it."""

    records: list[PredictionRecord]
    older: int | None
    """`seq` to page on to older records (`before`), or None at the end."""
    newer: int | None
    """`seq` to page back to newer records (`after`), or None at the start."""


def _record(row: Row, logs: list[str], request: bytes | None = None) -> PredictionRecord:
    message: pb.GenerateRequest | None = None
    if request is not None:
        message = pb.GenerateRequest()
        message.ParseFromString(bytes(request))
    webhook = row["webhook"]
    return PredictionRecord(
        id=row["id"],
        owner=row["owner"],
        model=row["model"],
        version=row["version"],
        kiln_model=row["kiln_model"],
        input=json.loads(row["input"]),
        request=message,
        base_url=row["base_url"],
        data_uri=bool(row["inline_outputs"]),
        file_token=row["file_token"],
        seq=int(row["seq"]),
        created_at=float(row["created_at"]),
        status=row["status"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        outputs=json.loads(row["outputs"]),
        output_bytes=int(row["output_bytes"]),
        error=row["error"],
        log_lines=logs,
        metrics=json.loads(row["metrics"]),
        data_removed=bool(row["data_removed"]),
        webhook=None if webhook is None else WebhookConfig.model_validate_json(webhook),
        cancel_requested=bool(row["cancel_requested"]),
        submissions=int(row["submissions"]),
    )


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _logs_of(session: Session, ids: list[str]) -> dict[str, list[str]]:
    logs: dict[str, list[str]] = {prediction_id: [] for prediction_id in ids}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.execute(
            f"SELECT prediction_id, data FROM prediction_events WHERE event = 'logs' "
            f"AND prediction_id IN ({_marks(len(chunk))}) ORDER BY prediction_id, position",
            chunk,
        )
        for row in rows:
            logs[row["prediction_id"]].append(row["data"])
    return logs


def _next_position(session: Session, prediction_id: str) -> int:
    row = session.one(
        "SELECT MAX(position) AS last FROM prediction_events WHERE prediction_id = ?",
        (prediction_id,),
    )
    return 0 if row is None or row["last"] is None else int(row["last"]) + 1


def _remove_data(session: Session, ids: list[str]) -> list[str]:
    """Mark finished predictions `data_removed` and empty them; the ids that changed."""
    removed = []
    for prediction_id in ids:
        changed = session.count(
            "UPDATE predictions SET data_removed = 1, input = '{}', outputs = '[]', "
            f"output_bytes = 0, request = NULL WHERE id = ? AND data_removed = 0 AND {_DONE_SQL}",
            (prediction_id,),
        )
        if not changed:
            continue
        position = _next_position(session, prediction_id)
        session.execute("DELETE FROM prediction_events WHERE prediction_id = ?", (prediction_id,))
        session.execute(
            "INSERT INTO prediction_events (prediction_id, position, event, data) "
            "VALUES (?, ?, 'done', ?)",
            (prediction_id, position, _DATA_REMOVED),
        )
        removed.append(prediction_id)
    return removed


class PredictionStore:
    """The predictions of every replica sharing the database; leases held as `instance`."""

    def __init__(self, db: Database, instance: str, lease_seconds: float) -> None:
        self.db = db
        self.instance = instance
        """This gateway process's replica id (a fresh random id per start)."""
        self.lease_seconds = lease_seconds

    # --- one prediction ---------------------------------------------------------------------

    async def create(self, record: PredictionRecord, events: list[tuple[int, str, str]]) -> None:
        """Insert a new prediction (leased to this replica) with its first events; sets `seq`."""
        request = None if record.request is None else record.request.SerializeToString()
        webhook = None if record.webhook is None else record.webhook.model_dump_json()
        values = (
            record.id, record.owner, record.model, record.version, record.kiln_model,
            json.dumps(record.input), request, record.base_url, int(record.data_uri),
            record.file_token, record.created_at, record.status, record.started_at,
            record.completed_at, json.dumps(record.outputs), record.output_bytes, record.error,
            json.dumps(record.metrics), int(record.data_removed), webhook,
            int(record.cancel_requested), record.submissions, self.instance,
            time.time() + self.lease_seconds,
        )  # fmt: skip

        def insert(session: Session) -> int:
            row = session.one(
                "INSERT INTO predictions (id, owner, model, version, kiln_model, input, request, "
                "base_url, inline_outputs, file_token, created_at, status, started_at, "
                "completed_at, outputs, output_bytes, error, metrics, data_removed, webhook, "
                "cancel_requested, submissions, lease_owner, lease_expires) "
                f"VALUES ({_marks(len(values))}) RETURNING seq",
                values,
            )
            _insert_events(session, record.id, events)
            assert row is not None
            return int(row["seq"])

        record.seq = await self.db.run(insert)

    async def discard(self, prediction_id: str) -> None:
        """Forget a prediction Kiln refused before accepting it (it never existed)."""

        def delete(session: Session) -> None:
            session.execute(
                "DELETE FROM prediction_events WHERE prediction_id = ?", (prediction_id,)
            )
            session.execute(
                "DELETE FROM webhook_deliveries WHERE prediction_id = ?", (prediction_id,)
            )
            session.execute("DELETE FROM predictions WHERE id = ?", (prediction_id,))

        await self.db.run(delete)

    async def save(
        self,
        record: PredictionRecord,
        events: list[tuple[int, str, str]],
        messages: list[tuple[str, str, bytes]],
    ) -> bool:
        """Write the record's changes, new events and webhook messages in one transaction.

        `messages` are (message id, url, body). A finished record drops its stored request.
        Returns False (writing nothing) when this replica no longer holds the lease.
        """
        values = (
            record.status, record.started_at, record.completed_at, json.dumps(record.outputs),
            record.output_bytes, record.error, json.dumps(record.metrics), record.id,
            self.instance,
        )  # fmt: skip
        clear = ", request = NULL" if record.done else ""

        def write(session: Session) -> bool:
            changed = session.count(
                "UPDATE predictions SET status = ?, started_at = ?, completed_at = ?, "
                f"outputs = ?, output_bytes = ?, error = ?, metrics = ?{clear} "
                "WHERE id = ? AND lease_owner = ?",
                values,
            )
            if not changed:
                return False
            _insert_events(session, record.id, events)
            _insert_messages(session, record.id, messages)
            return True

        return await self.db.run(write)

    def enqueue(
        self, prediction_id: str, messages: list[tuple[str, str, bytes]]
    ) -> asyncio.Future[None]:
        """Add webhook messages to the outbox on their own (throttled updates).

        The write is queued at once, so it lands before any change submitted later.
        """
        return self.db.submit(lambda session: _insert_messages(session, prediction_id, messages))

    async def get(self, prediction_id: str, owner: str | None) -> PredictionRecord | None:
        """The prediction with this id, if it exists and `owner` made it (None: anyone's)."""

        def load(session: Session) -> PredictionRecord | None:
            row = session.one(f"SELECT {_VIEW} FROM predictions WHERE id = ?", (prediction_id,))
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            return _record(row, _logs_of(session, [prediction_id])[prediction_id])

        return await self.db.run(load)

    async def events_after(self, prediction_id: str, position: int) -> list[tuple[int, str, str]]:
        """The prediction's events after `position`, in order: (position, event, data)."""
        rows = await self.db.run(
            lambda session: session.execute(
                "SELECT position, event, data FROM prediction_events WHERE prediction_id = ? "
                "AND position > ? ORDER BY position LIMIT 1000",
                (prediction_id, position),
            )
        )
        return [(int(row["position"]), row["event"], row["data"]) for row in rows]

    async def request_cancel(self, prediction_id: str) -> None:
        """Ask whichever replica runs the prediction to cancel it (seen on its next renewal)."""
        await self.db.run(
            lambda session: session.execute(
                f"UPDATE predictions SET cancel_requested = 1 WHERE id = ? AND {_RUNNING_SQL}",
                (prediction_id,),
            )
        )

    # --- listing --------------------------------------------------------------------------

    async def page(
        self, owner: str | None, *, before: int | None, after: int | None, size: int
    ) -> Page:
        """One page of `owner`'s predictions (None: everyone's), newest first.

        `before=S` pages to predictions older than sequence S; `after=S` to the ones just
        newer.
        """
        mine = "owner = ?" if owner is not None else "1 = 1"
        who: tuple[Any, ...] = (owner,) if owner is not None else ()

        def load(session: Session) -> Page:
            if after is not None:
                rows = session.execute(
                    f"SELECT {_VIEW} FROM predictions WHERE {mine} AND seq > ? "
                    "ORDER BY seq ASC LIMIT ?",
                    (*who, after, size + 1),
                )
                more_newer = len(rows) > size
                rows = rows[:size][::-1]
            else:
                bound = "AND seq < ?" if before is not None else ""
                rows = session.execute(
                    f"SELECT {_VIEW} FROM predictions WHERE {mine} {bound} "
                    "ORDER BY seq DESC LIMIT ?",
                    (*who, *(() if before is None else (before,)), size + 1),
                )
                more_older = len(rows) > size
                rows = rows[:size]
            if not rows:
                return Page([], None, None)
            newest, oldest = int(rows[0]["seq"]), int(rows[-1]["seq"])

            def exists(condition: str, seq: int) -> bool:
                found = session.one(
                    f"SELECT seq FROM predictions WHERE {mine} AND {condition} LIMIT 1",
                    (*who, seq),
                )
                return found is not None

            if after is not None:
                more_older = exists("seq < ?", oldest)
            else:
                more_newer = exists("seq > ?", newest)
            logs = _logs_of(session, [row["id"] for row in rows])
            records = [_record(row, logs[row["id"]]) for row in rows]
            return Page(records, oldest if more_older else None, newest if more_newer else None)

        return await self.db.run(load)

    async def run_count(self, kiln_model: str) -> int:
        """Predictions kept for a Kiln model."""
        row = await self.db.run(
            lambda session: session.one(
                "SELECT COUNT(*) AS n FROM predictions WHERE kiln_model = ?", (kiln_model,)
            )
        )
        return 0 if row is None else int(row["n"])

    # --- leases ---------------------------------------------------------------------------

    async def renew(self, ids: list[str]) -> dict[str, bool]:
        """Extend this replica's leases on the predictions it runs (`ids`).

        Returns {id: cancel requested} for each of them it still holds; an id missing from
        the answer was taken over by another replica. A prediction this replica holds but
        no longer runs is not renewed, so its lease runs out and it is taken over.
        """

        def renew(session: Session) -> dict[str, bool]:
            held: dict[str, bool] = {}
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                rows = session.execute(
                    "UPDATE predictions SET lease_expires = ? WHERE lease_owner = ? "
                    f"AND {_RUNNING_SQL} AND id IN ({_marks(len(chunk))}) "
                    "RETURNING id, cancel_requested",
                    (time.time() + self.lease_seconds, self.instance, *chunk),
                )
                held |= {row["id"]: bool(row["cancel_requested"]) for row in rows}
            return held

        return await self.db.run(renew) if ids else {}

    async def claim_orphans(self, *, everything: bool = False) -> list[PredictionRecord]:
        """Take over running predictions whose replica stopped renewing them.

        `everything` also takes those whose lease has not run out yet: right for SQLite at
        start, where no other gateway can be running. Each claimed record has its request
        and counts one more submission.
        """
        now = time.time()
        cutoff = 1e300 if everything else now

        def claim(session: Session) -> list[PredictionRecord]:
            rows = session.execute(
                "UPDATE predictions SET lease_owner = ?, lease_expires = ?, "
                f"submissions = submissions + 1 WHERE {_RUNNING_SQL} AND lease_expires < ? "
                f"RETURNING {_VIEW}, request",
                (self.instance, now + self.lease_seconds, cutoff),
            )
            logs = _logs_of(session, [row["id"] for row in rows])
            records = []
            for row in rows:
                record = _record(row, logs[row["id"]], row["request"])
                record.next_position = _next_position(session, record.id)
                records.append(record)
            return records

        return await self.db.run(claim)

    async def reset_delivery_leases(self) -> None:
        """Make every pending webhook message deliverable now (SQLite, at start: no other
        gateway can be delivering it)."""
        await self.db.run(
            lambda session: session.execute(
                "UPDATE webhook_deliveries SET lease_expires = 0 WHERE state = 'pending'"
            )
        )

    async def release(self) -> None:
        """Give up this replica's leases now (at shutdown), so another can take over."""

        def release(session: Session) -> None:
            session.execute(
                "UPDATE predictions SET lease_expires = 0 "
                f"WHERE lease_owner = ? AND {_RUNNING_SQL}",
                (self.instance,),
            )
            session.execute(
                "UPDATE webhook_deliveries SET lease_expires = 0 "
                "WHERE lease_owner = ? AND state = 'pending'",
                (self.instance,),
            )

        await self.db.run(release)

    # --- retention, caps and the record limit ---------------------------------------------

    async def remove_expired(self, cutoff: float) -> list[str]:
        """Remove the data of predictions finished at or before `cutoff`; their file tokens."""

        def remove(session: Session) -> list[str]:
            rows = session.execute(
                f"SELECT id, file_token FROM predictions WHERE data_removed = 0 AND {_DONE_SQL} "
                "AND completed_at <= ? ORDER BY completed_at LIMIT ?",
                (cutoff, _CHUNK),
            )
            tokens = {row["id"]: row["file_token"] for row in rows}
            return [tokens[i] for i in _remove_data(session, list(tokens))]

        return await self.db.run(remove)

    async def evict(self, *, inline: bool, cap: int) -> list[str]:
        """Remove the oldest finished outputs of one kind until their total fits `cap`.

        `inline` picks data-URI outputs (kept in the database), else output files. Returns
        the file tokens of the predictions whose data was removed.
        """
        kind = int(inline)

        def evict(session: Session) -> list[str]:
            row = session.one(
                "SELECT COALESCE(SUM(output_bytes), 0) AS total FROM predictions "
                "WHERE data_removed = 0 AND inline_outputs = ?",
                (kind,),
            )
            excess = (0 if row is None else int(row["total"])) - cap
            tokens: list[str] = []
            while excess > 0:
                rows = session.execute(
                    "SELECT id, file_token, output_bytes FROM predictions WHERE "
                    f"data_removed = 0 AND inline_outputs = ? AND {_DONE_SQL} "
                    "AND output_bytes > 0 ORDER BY completed_at, seq LIMIT ?",
                    (kind, _CHUNK),
                )
                if not rows:
                    break  # only running predictions hold the rest
                batch = []
                for candidate in rows:
                    batch.append(candidate)
                    excess -= int(candidate["output_bytes"])
                    if excess <= 0:
                        break
                _remove_data(session, [candidate["id"] for candidate in batch])
                tokens += [candidate["file_token"] for candidate in batch]
            return tokens

        return await self.db.run(evict)

    async def trim(self, max_records: int) -> list[str]:
        """Delete the oldest finished predictions beyond `max_records`; their file tokens."""

        def trim(session: Session) -> list[str]:
            row = session.one("SELECT COUNT(*) AS n FROM predictions")
            excess = (0 if row is None else int(row["n"])) - max_records
            if excess <= 0:
                return []
            rows = session.execute(
                f"SELECT id, file_token FROM predictions WHERE {_DONE_SQL} ORDER BY seq LIMIT ?",
                (min(excess, _CHUNK),),
            )
            for found in rows:
                for table, column in (
                    ("prediction_events", "prediction_id"),
                    ("webhook_deliveries", "prediction_id"),
                    ("predictions", "id"),
                ):
                    session.execute(f"DELETE FROM {table} WHERE {column} = ?", (found["id"],))
            return [found["file_token"] for found in rows]

        return await self.db.run(trim)

    async def tokens_with_data(self, tokens: list[str]) -> set[str]:
        """Which of these file tokens belong to a prediction that still has its data."""

        def find(session: Session) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(tokens), _CHUNK):
                chunk = tokens[start : start + _CHUNK]
                rows = session.execute(
                    "SELECT file_token FROM predictions WHERE data_removed = 0 AND "
                    f"file_token IN ({_marks(len(chunk))})",
                    chunk,
                )
                found.update(row["file_token"] for row in rows)
            return found

        return await self.db.run(find)

    # --- the webhook outbox ---------------------------------------------------------------

    async def claim_deliveries(self, limit: int, lease_seconds: float) -> list[Delivery]:
        """Claim up to `limit` due messages, only the oldest pending one of each prediction.

        Taking one message per prediction at a time keeps each prediction's webhooks in
        order: the next is due only once the one before was delivered or given up.
        """
        now = time.time()

        def claim(session: Session) -> list[Delivery]:
            rows = session.execute(
                "UPDATE webhook_deliveries SET lease_owner = ?, lease_expires = ? WHERE id IN ("
                "SELECT d.id FROM webhook_deliveries d WHERE d.state = 'pending' "
                "AND d.next_attempt_at <= ? AND d.lease_expires < ? AND d.id = ("
                "SELECT MIN(e.id) FROM webhook_deliveries e WHERE e.state = 'pending' "
                "AND e.prediction_id = d.prediction_id) ORDER BY d.id LIMIT ?"
                ") AND lease_expires < ? "
                "RETURNING id, prediction_id, message_id, url, body, attempts",
                (self.instance, now + lease_seconds, now, now, limit, now),
            )
            return [
                Delivery(
                    id=int(row["id"]),
                    prediction_id=row["prediction_id"],
                    message_id=row["message_id"],
                    url=row["url"],
                    body=bytes(row["body"]),
                    attempts=int(row["attempts"]),
                )
                for row in sorted(rows, key=lambda row: int(row["id"]))
            ]

        return await self.db.run(claim)

    async def delivered(self, delivery_id: int) -> None:
        """A message reached its receiver: it leaves the outbox."""
        await self.db.run(
            lambda session: session.execute(
                "DELETE FROM webhook_deliveries WHERE id = ?", (delivery_id,)
            )
        )

    async def delivery_failed(
        self, delivery_id: int, attempts: int, retry_at: float | None, problem: str
    ) -> None:
        """An attempt failed: retry at `retry_at`, or give the message up (None)."""
        state = "pending" if retry_at is not None else "failed"
        await self.db.run(
            lambda session: session.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt_at = ?, "
                "lease_expires = 0, last_error = ? WHERE id = ?",
                (state, attempts, retry_at or 0.0, problem[:500], delivery_id),
            )
        )

    async def pending_webhooks(self) -> int:
        """Messages not yet delivered nor given up (all replicas)."""
        row = await self.db.run(
            lambda session: session.one(
                "SELECT COUNT(*) AS n FROM webhook_deliveries WHERE state = 'pending'"
            )
        )
        return 0 if row is None else int(row["n"])


def _insert_events(
    session: Session, prediction_id: str, events: list[tuple[int, str, str]]
) -> None:
    session.many(
        "INSERT INTO prediction_events (prediction_id, position, event, data) VALUES (?, ?, ?, ?)",
        [(prediction_id, position, event, data) for position, event, data in events],
    )


def _insert_messages(
    session: Session, prediction_id: str, messages: list[tuple[str, str, bytes]]
) -> None:
    session.many(
        "INSERT INTO webhook_deliveries (prediction_id, message_id, url, body, state, attempts, "
        "next_attempt_at, lease_owner, lease_expires) VALUES (?, ?, ?, ?, 'pending', 0, 0, "
        "NULL, 0)",
        [(prediction_id, message_id, url, body) for message_id, url, body in messages],
    )
