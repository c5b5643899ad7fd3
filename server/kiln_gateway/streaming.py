"""`urls.stream`: a prediction's events as server-sent events, in Replicate's format.

Events: `output` (one per output, data = the file URL or data URI), `logs` (one per log
line, including a progress line per denoising step), `error` (data = `{"detail": ...}`)
and finally `done` (data = `{}` on success, `{"reason": "canceled"}`, `{"reason":
"error"}` or, once retention removed the data, `{"reason": "data_removed"}`). Every event
has an `id` (its position in the prediction's journal); a client that reconnects with
`Last-Event-ID` resumes after that event. A stream opened late replays the events so far
first. The journal is read from the database, so any replica can stream any prediction
(one run elsewhere is polled twice a second). Comment lines keep idle connections alive.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse

from kiln_gateway.auth import Caller, caller, require_token
from kiln_gateway.errors import ApiError, ProblemDetail, shorten
from kiln_gateway.records import PredictionRecord
from kiln_gateway.state import GatewayState, gateway_state

__all__ = ["format_event", "router", "sse_events"]

KEEPALIVE_SECONDS = 10.0


def format_event(event_id: int, event: str, data: str) -> str:
    """One server-sent event; multi-line data becomes several `data:` lines."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\nid: {event_id}\n{lines}\n"


async def sse_events(
    state: GatewayState, record: PredictionRecord, after: int = -1
) -> AsyncIterator[str]:
    """The prediction's events after journal position `after`, live until `done`."""
    yield "retry: 1000\n\n"
    position = after
    quiet_since = time.monotonic()
    outputs = record.outputs
    while True:
        wait = state.runner.waiter(record.id)
        events = await state.store.events_after(record.id, position)
        for event_position, event, data in events:
            if event == "output":
                index = int(data)
                if index >= len(outputs):  # written after the copy we hold: read it again
                    fresh = await state.runner.find(record.id, None)
                    outputs = fresh.outputs if fresh is not None else outputs
                data = record.url(outputs[index]) if index < len(outputs) else ""
            yield format_event(event_position, event, data)
            position = event_position
            if event == "done":
                return
        if events:
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
            if await state.runner.find(record.id, None) is None:
                return  # deleted (record limit) while streaming: nothing more will come
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        await wait(KEEPALIVE_SECONDS)


router = APIRouter(prefix="/v1", tags=["predictions"], dependencies=[Depends(require_token)])


@router.get(
    "/predictions/{prediction_id}/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        401: {"model": ProblemDetail},
        404: {"model": ProblemDetail},
    },
)
async def stream_prediction(
    prediction_id: str,
    state: Annotated[GatewayState, Depends(gateway_state)],
    who: Annotated[Caller, Depends(caller)],
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events of one prediction: output, logs, error, done."""
    record = await state.runner.find(prediction_id, who.sees)
    if record is None:
        raise ApiError(
            404, "Not found", f"no prediction with id {shorten(prediction_id, 40)!r} for this token"
        )
    digits = last_event_id is not None and last_event_id.isdigit() and len(last_event_id) < 12
    after = int(last_event_id) if digits and last_event_id is not None else -1
    return StreamingResponse(
        sse_events(state, record, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
