"""`urls.stream`: a prediction's events as server-sent events, in Replicate's format.

Events: `output` (one per output, data = the file URL or data URI), `logs` (one per log
line, including a progress line per denoising step), `error` (data = `{"detail": ...}`)
and finally `done` (data = `{}` on success, `{"reason": "canceled"}` or
`{"reason": "error"}`). Every event has an `id` (its position in the prediction's
journal); a client that reconnects with `Last-Event-ID` resumes after that event. A
stream opened late replays the events so far first. Comment lines keep idle
connections alive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse

from kiln_gateway.auth import require_token
from kiln_gateway.errors import ApiError, ProblemDetail
from kiln_gateway.predictions import PredictionRecord
from kiln_gateway.state import GatewayState, gateway_state

__all__ = ["format_event", "router", "sse_events"]

KEEPALIVE_SECONDS = 10.0


def format_event(event_id: int, event: str, data: str) -> str:
    """One server-sent event; multi-line data becomes several `data:` lines."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\nid: {event_id}\n{lines}\n"


async def sse_events(record: PredictionRecord, after: int = -1) -> AsyncIterator[str]:
    """The prediction's events after journal position `after`, live until `done`."""
    position = after + 1
    yield "retry: 1000\n\n"
    while True:
        journal = record.journal
        while position < len(journal):
            event, data = journal[position]
            yield format_event(position, event, data)
            if event == "done":
                return
            position += 1
        if record.done and position >= len(record.journal):
            return  # data removed after retention: the journal was replaced
        if not await record.wait_change(KEEPALIVE_SECONDS):
            yield ": keep-alive\n\n"


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
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-sent events of one prediction: output, logs, error, done."""
    record = state.store.get(prediction_id)
    if record is None:
        raise ApiError(404, "Not found", f"no prediction with id {prediction_id!r}")
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
    return StreamingResponse(
        sse_events(record, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
