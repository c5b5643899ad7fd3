"""The gateway's prediction store: nothing accepted is lost across restarts, crashes and
replicas, and outputs share their prediction's lifecycle.

Every test runs against SQLite and against a real PostgreSQL server (tests/conftest.py's
`database_url`), with a stand-in Kiln server that speaks real gRPC (tests/gateway_support.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import (
    ADMIN_TOKEN,
    OUTPUT,
    TOKEN,
    fake_kiln,
    in_process,
    settings_for,
    start_process,
    wait_until,
    webhook_receiver,
)

from kiln_gateway.database import Database
from kiln_gateway.files import FileStore, data_uri
from kiln_gateway.records import PredictionRecord, new_prediction_id
from kiln_gateway.store import PredictionStore
from kiln_gateway.webhooks import new_message_id

CREATE = "/v1/models/acme/fake/predictions"


def create(http: httpx.Client, prompt: str, **fields: Any) -> dict[str, Any]:
    reply = http.post(CREATE, json={"input": {"prompt": prompt}, **fields})
    assert reply.status_code == 201, reply.text
    body: dict[str, Any] = reply.json()
    return body


def finished(http: httpx.Client, prediction_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = http.get(f"/v1/predictions/{prediction_id}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    result: dict[str, Any] = wait_until(done, what=f"prediction {prediction_id} to finish")
    return result


def test_a_killed_gateway_loses_nothing(database_url: str, tmp_path: Path) -> None:
    files = tmp_path / "files"
    flags = ("--output-mode", "url", "--lease-seconds", "2")
    hooks = {"webhook_events_filter": ["completed"]}
    with fake_kiln() as upstream, webhook_receiver(accepting=False) as receiver:
        first = start_process(upstream, database_url, files, *flags)
        try:
            with httpx.Client(
                base_url=first.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as http:
                reply = http.post(
                    CREATE,
                    json={"input": {"prompt": "quick"}, "webhook": receiver.url, **hooks},
                    headers={"Prefer": "wait"},
                )
                done = reply.json()
                held = create(http, "hold-once", webhook=receiver.url, **hooks)
            wait_until(lambda: upstream.kiln.count("hold-once") == 1, what="Kiln to get it")
            # The receiver refused the finished prediction's webhook: it is still pending.
            wait_until(lambda: receiver.deliveries, what="a webhook attempt")
        finally:
            first.kill()
        orphan = files / "outputs" / ("x" * 24)  # a folder no prediction owns
        orphan.mkdir(parents=True)
        (orphan / "out-0.png").write_bytes(OUTPUT)
        receiver.accepting.set()

        second = start_process(upstream, database_url, files, *flags)
        try:
            with httpx.Client(
                base_url=second.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as http:
                again = http.get(f"/v1/predictions/{done['id']}").json()
                image = httpx.get(done["output"][0].replace(first.url, second.url))
                resumed = finished(http, held["id"])
                listed = [p["id"] for p in http.get("/v1/predictions").json()["results"]]
            wait_until(
                lambda: {body["id"] for body in receiver.accepted()} >= {done["id"], held["id"]},
                what="both completed webhooks",
            )
        finally:
            second.terminate()

    assert reply.status_code == 201 and done["status"] == "succeeded"
    assert again == done  # the record, byte for byte
    assert image.status_code == 200 and image.content == OUTPUT
    assert resumed["status"] == "succeeded" and len(resumed["output"]) == 1
    assert "Re-submitted to Kiln: the gateway that ran this prediction stopped" in resumed["logs"]
    assert upstream.kiln.count("hold-once") == 2  # sent again after the crash
    assert listed == [held["id"], done["id"]]
    assert not orphan.exists()
    assert {body["status"] for body in receiver.accepted()} == {"succeeded"}


def test_a_stopped_gateway_hands_its_running_prediction_to_the_next(
    database_url: str, tmp_path: Path
) -> None:
    with fake_kiln() as upstream:
        settings = settings_for(upstream, database_url, tmp_path / "files")
        with in_process(settings) as first, first.client() as http:
            held = create(http, "hold-once")
            wait_until(lambda: upstream.kiln.count("hold-once") == 1, what="Kiln to get it")
        with in_process(settings) as second, second.client() as http:
            resumed = finished(http, held["id"])

    assert resumed["status"] == "succeeded" and resumed["output"]
    assert resumed["logs"].count("Using seed: 7") == 2  # the first run's logs are kept
    assert "submission 2 of at most 3" in resumed["logs"]


def _orphan(kind: str, **changes: Any) -> PredictionRecord:
    from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

    record = PredictionRecord(
        id=new_prediction_id(),
        owner="someone",
        model="acme/fake",
        version="v",
        kiln_model="fake",
        input={"prompt": kind},
        request=pb.GenerateRequest(prompt=kind, model="fake"),
        base_url="http://127.0.0.1:1",
        data_uri=True,
        file_token=FileStore.new_token(),
        status="processing",
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


async def _leave_behind(database_url: str, records: list[PredictionRecord], hook: str) -> None:
    """Write what a gateway that died would have left: running predictions, a pending webhook."""
    database = await Database.open(database_url)
    store = PredictionStore(database, "a-gateway-that-died", lease_seconds=0.001)
    for record in records:
        await store.create(record, [(0, "logs", "Using seed: 1")])
    await store.enqueue(records[0].id, [(new_message_id(), hook, records[0].body())])
    await database.close()


def test_what_a_crashed_gateway_left_is_finished_on_start(
    database_url: str, tmp_path: Path
) -> None:
    tried_too_often = _orphan("quick", submissions=3)
    canceled = _orphan("hold", cancel_requested=True)
    resubmitted = _orphan("quick")
    with fake_kiln() as upstream, webhook_receiver() as receiver:
        asyncio.run(
            _leave_behind(database_url, [tried_too_often, canceled, resubmitted], receiver.url)
        )
        settings = settings_for(upstream, database_url, tmp_path / "files")
        with in_process(settings) as gateway, gateway.client(ADMIN_TOKEN) as http:
            states = {r.id: finished(http, r.id) for r in (tried_too_often, canceled, resubmitted)}
            wait_until(receiver.accepted, what="the pending webhook")

    failed = states[tried_too_often.id]
    assert failed["status"] == "failed"
    assert failed["error"] == (
        "the gateway running this prediction stopped 3 time(s); it was not sent to Kiln again"
    )
    assert states[canceled.id]["status"] == "canceled"
    assert states[resubmitted.id]["status"] == "succeeded"
    assert upstream.kiln.count("quick") == 1 and upstream.kiln.count("hold") == 0
    assert [body["id"] for body in receiver.accepted()] == [tried_too_often.id]


def test_replicas_share_predictions_and_cancels(postgres_server: Any, tmp_path: Path) -> None:
    database = postgres_server.new_database()
    with fake_kiln() as upstream:
        settings = settings_for(upstream, database, tmp_path / "files", lease_seconds=3)
        with (
            in_process(settings) as one,
            in_process(settings) as two,
            one.client() as on_one,
            two.client() as on_two,
        ):
            running = create(on_one, "hold")
            wait_until(lambda: upstream.kiln.count("hold") == 1, what="Kiln to get it")
            seen = on_two.get(f"/v1/predictions/{running['id']}").json()
            listed = [p["id"] for p in on_two.get("/v1/predictions").json()["results"]]
            canceled = on_two.post(f"/v1/predictions/{running['id']}/cancel").json()
            handed = create(on_one, "hold-once")
            wait_until(lambda: upstream.kiln.count("hold-once") == 1, what="Kiln to get it")
            one.stop()  # a graceful stop releases its lease at once
            resumed = finished(on_two, handed["id"])
            with on_two.stream("GET", f"/v1/predictions/{handed['id']}/stream") as stream:
                events = [line for line in stream.iter_lines() if line.startswith("event:")]

    assert seen["id"] == running["id"] and seen["status"] in ("starting", "processing")
    assert listed == [running["id"]]
    assert canceled["status"] == "canceled"  # canceled on the other replica, within 10 s
    assert resumed["status"] == "succeeded"
    assert upstream.kiln.count("hold-once") == 2
    assert events[-1] == "event: done" and "event: output" in events


def test_storage_caps_evict_the_oldest_outputs_with_their_files(tmp_path: Path) -> None:
    cap = len(OUTPUT) * 2  # room for two predictions' outputs
    with fake_kiln() as upstream:
        settings = settings_for(
            upstream,
            f"sqlite:///{tmp_path / 'predictions.db'}",
            tmp_path / "files",
            output_mode="url",
            max_files_bytes=cap,
            max_inline_bytes=len(data_uri(OUTPUT, "image/png")) + 10,  # room for one
        )
        with in_process(settings) as gateway, gateway.client() as http:
            bodies = [
                http.post(CREATE, json={"input": {"prompt": "quick"}}, headers={"Prefer": "wait"})
                .raise_for_status()
                .json()
                for _ in range(3)
            ]
            made = [body["id"] for body in bodies]
            oldest = wait_until(
                lambda: http.get(f"/v1/predictions/{made[0]}").json()["data_removed"],
                what="the oldest outputs to be evicted",
            )
            kept = [http.get(f"/v1/predictions/{p}").json() for p in made[1:]]
            files = [httpx.get(body["output"][0]).status_code for body in bodies]
            as_data_uri = {"input": {"prompt": "quick", "output_as_data_uri": True}}
            inline = [
                http.post(CREATE, json=as_data_uri, headers={"Prefer": "wait"}).json()["id"]
                for _ in range(2)
            ]
            evicted_inline = wait_until(
                lambda: http.get(f"/v1/predictions/{inline[0]}").json()["data_removed"],
                what="the oldest data URIs to be evicted",
            )
            newest_inline = http.get(f"/v1/predictions/{inline[1]}").json()

    assert oldest is True and evicted_inline is True
    assert [body["data_removed"] for body in kept] == [False, False]
    assert files == [404, 200, 200]  # the evicted prediction's file is gone with it
    assert newest_inline["output"][0].startswith("data:image/png;base64,")


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite:///"])
def test_unusable_database_urls_are_refused(url: str) -> None:
    from kiln_gateway.database import DatabaseError

    with pytest.raises(DatabaseError, match="sqlite:///"):
        asyncio.run(Database.open(url))


def test_one_sqlite_database_serves_one_gateway(tmp_path: Path) -> None:
    from kiln_gateway.database import DatabaseError

    async def open_twice() -> None:
        url = f"sqlite:///{tmp_path / 'predictions.db'}"
        first = await Database.open(url)
        try:
            await Database.open(url)
        finally:
            await first.close()

    with pytest.raises(DatabaseError, match=r"in use by another gateway.*postgresql://"):
        asyncio.run(open_twice())


def test_the_schema_version_is_recorded_and_a_newer_one_refused(database_url: str) -> None:
    from kiln_gateway.database import DatabaseError

    async def bump() -> int:
        database = await Database.open(database_url)
        row = await database.run(lambda s: s.one("SELECT MAX(version) AS v FROM schema_version"))
        await database.run(lambda s: s.execute("INSERT INTO schema_version VALUES (99)"))
        await database.close()
        assert row is not None
        return int(row["v"])

    assert asyncio.run(bump()) == 1
    with pytest.raises(DatabaseError, match="schema version 99, newer than this gateway's 1"):
        asyncio.run(Database.open(database_url))
