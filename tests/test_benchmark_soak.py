"""The soak's accounting: how benchmarks/soak.py classifies the end of each request.

The soak itself takes minutes (it starts, kills and restarts real servers); what it
promises is that no request goes uncounted, so these tests pin the classification on
scripted streams: a stream that stops without `completed` or a status is LOST, as is a
normal request that only its client's long deadline ended, and a report with a lost
request says so.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("soak")
    finally:
        sys.path.remove(str(BENCHMARKS))


class ScriptedCall:
    """A Generate call that yields `events`, then raises `error` (if any)."""

    def __init__(self, events: list[pb.GenerateResponse], error: grpc.StatusCode | None) -> None:
        self.events = events
        self.error = error
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def _iterate(self) -> AsyncIterator[pb.GenerateResponse]:
        for event in self.events:
            yield event
        if self.error is not None:
            metadata = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(self.error, metadata, metadata, "scripted")

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._iterate()


class ScriptedStub:
    def __init__(self, call: ScriptedCall) -> None:
        self.call = call
        self.requests: list[tuple[pb.GenerateRequest, float]] = []

    def Generate(self, message: pb.GenerateRequest, timeout: float) -> ScriptedCall:
        self.requests.append((message, timeout))
        return self.call


def args(**overrides: Any) -> argparse.Namespace:
    values = {"cancel_fraction": 0.0, "deadline_fraction": 0.0, "min_steps": 4, "max_steps": 4}
    return argparse.Namespace(**{**values, **overrides})


def full_stream(images: int) -> list[pb.GenerateResponse]:
    return [
        pb.GenerateResponse(queued=pb.QueuedEvent()),
        pb.GenerateResponse(started=pb.StartedEvent()),
        pb.GenerateResponse(progress=pb.ProgressEvent(step=1, total_steps=1)),
        *(pb.GenerateResponse(image=pb.ImageEvent(index=i)) for i in range(images)),
        pb.GenerateResponse(completed=pb.CompletedEvent(num_images=images)),
    ]


def run(soak: ModuleType, call: ScriptedCall, **overrides: Any) -> tuple[Any, float]:
    """The outcome of one planned request over `call`, and the deadline it was sent with."""
    stub = ScriptedStub(call)
    outcome = asyncio.run(soak.grpc_request(stub, random.Random(0), args(**overrides)))
    ((_, timeout),) = stub.requests
    return outcome, timeout


def test_a_complete_stream_is_completed(soak: ModuleType) -> None:
    message, *_ = soak.plan_request(random.Random(0), args())  # what run() will send
    outcome, _ = run(soak, ScriptedCall(full_stream(message.num_outputs), None))
    assert outcome.kind == "completed" and outcome.seconds >= 0


def test_a_stream_ending_without_completed_is_lost(soak: ModuleType) -> None:
    outcome, _ = run(soak, ScriptedCall(full_stream(1)[:3], None))
    assert outcome.kind == "lost"
    assert outcome.status == "stream ended OK after 3 events without completed"


def test_a_status_is_a_failure_by_that_status(soak: ModuleType) -> None:
    outcome, _ = run(soak, ScriptedCall(full_stream(1)[:2], grpc.StatusCode.UNAVAILABLE))
    assert (outcome.kind, outcome.status) == ("failed", "UNAVAILABLE")


def test_only_a_short_deadline_may_run_out(soak: ModuleType) -> None:
    expired = grpc.StatusCode.DEADLINE_EXCEEDED
    outcome, timeout = run(soak, ScriptedCall([], expired), deadline_fraction=1.0)
    assert outcome.kind == "deadline" and timeout <= 2.0
    # A normal request that only its client's long deadline ended was hung: lost.
    outcome, timeout = run(soak, ScriptedCall([], expired))
    assert outcome.kind == "lost" and timeout == soak.LONG_DEADLINE


def test_a_planned_cancel_cancels_the_call(soak: ModuleType) -> None:
    progress = [pb.GenerateResponse(progress=pb.ProgressEvent(step=i)) for i in range(1, 11)]
    call = ScriptedCall(full_stream(1)[:2] + progress, None)
    outcome, _ = run(soak, call, cancel_fraction=1.0)
    assert outcome.kind == "cancelled" and call.cancelled


def test_the_report_counts_every_kind_of_end(soak: ModuleType) -> None:
    outcomes = [
        soak.Outcome("grpc", "completed", seconds=1.0),
        soak.Outcome("grpc", "cancelled"),
        soak.Outcome("grpc", "failed", "UNAVAILABLE"),
        soak.Outcome("grpc", "failed", "UNAVAILABLE"),
        soak.Outcome("http", "lost", "accepted, then unknown (404)"),
    ]
    cells = [
        [cell.strip() for cell in soak.Report.row(client, mine).strip("|").split("|")]
        for client, mine in (("grpc", outcomes[:4]), ("http", outcomes[4:]))
    ]
    assert cells == [
        ["gRPC", "4", "1", "1", "0", "UNAVAILABLE 2", "0"],
        ["plain HTTP", "1", "0", "0", "0", "0", "1"],
    ]
