"""The predictions endpoints of Replicate's HTTP API, and the webhook signing secret.

- POST /v1/models/{owner}/{name}/predictions and POST /v1/predictions (`version` = a version
  id, `owner/name` or `owner/name:version`) create a prediction: 201 with the prediction
  object and a `Location` header. `image` / `mask` inputs are resolved to bytes first
  (`kiln_gateway.inputs`); a long data URI in the input is reported shortened. Without
  `Prefer: wait` they answer as soon as Kiln has accepted the request; with `Prefer: wait`
  (60 s) or `Prefer: wait=N` they hold the request until the prediction finishes or N
  seconds pass. As on Replicate (and as the official client expects), a held request that
  runs out of time reports `starting`, so the client falls back to polling.
- GET /v1/predictions pages through the caller's predictions, newest first
  (`next`/`previous` cursor URLs; Kiln also accepts `page_size`, 1-100, default 100).
- GET /v1/predictions/{id}; POST /v1/predictions/{id}/cancel (stops the Kiln request
  within one denoising step; canceling a finished prediction changes nothing).
- GET /v1/webhooks/default/secret: the `whsec_...` key webhooks are signed with.

A token sees only the predictions it created (another's answer 404); an admin token
(`TOKEN:admin` in KILN_API_TOKENS) sees and cancels all. Input fields the model does not
have are dropped (noted in the logs), and long data URIs are stored shortened, so the
stored and echoed input stays small. Webhook URLs must reach a public address (422 naming
`webhook` or `webhook_completed` otherwise).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kiln_client.proto.kiln.v1 import generation_service_pb2 as pb
from kiln_gateway.auth import Caller, caller, require_token
from kiln_gateway.errors import ApiError, InvalidField, ProblemDetail, input_invalid, shorten
from kiln_gateway.files import FileStore
from kiln_gateway.inputs import Caller as InputCaller
from kiln_gateway.inputs import abbreviate_input
from kiln_gateway.models import ResolvedModel
from kiln_gateway.records import (
    PredictionRecord,
    PredictionResponse,
    Status,
    WebhookConfig,
    new_prediction_id,
)
from kiln_gateway.schema import InputInvalid, parse_input
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.state import GatewayState, gateway_state, own_base_urls, public_base_url

__all__ = [
    "CreatePrediction",
    "CreatePredictionWithVersion",
    "PredictionPage",
    "WebhookSecret",
    "parse_prefer_wait",
    "router",
]

WebhookEvent = Literal["start", "output", "logs", "completed"]
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*([^,;\s]*))?\s*(?:$|[,;])", re.IGNORECASE)


class CreatePrediction(BaseModel):
    """Body of POST /v1/models/{owner}/{name}/predictions."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any] = Field(description="The model's input; see the version's schema")
    webhook: str | None = Field(None, description="URL to POST the prediction to on events")
    webhook_completed: str | None = Field(
        None, description="URL to POST the finished prediction to (older Replicate field)"
    )
    webhook_events_filter: list[WebhookEvent] | None = Field(
        None, description="Events that trigger the webhook (default: all four)"
    )
    stream: bool | None = Field(None, description="Accepted; every prediction can be streamed")


class CreatePredictionWithVersion(CreatePrediction):
    """Body of POST /v1/predictions."""

    version: str = Field(description="A version id, owner/name, or owner/name:version_id")


class PredictionPage(BaseModel):
    """One page of predictions, newest first; `next` / `previous` are URLs or null."""

    previous: str | None
    next: str | None
    results: list[PredictionResponse]


class WebhookSecret(BaseModel):
    """The webhook signing secret, `whsec_<base64 key>`."""

    key: str


def parse_prefer_wait(prefer: str | None, maximum: float) -> float | None:
    """Seconds to hold a create request for a `Prefer` header (None: do not wait).

    `wait` means `maximum`; `wait=N` means N, at least 1 and at most `maximum`.

    Raises:
        ApiError: 400 when N is not a whole number.
    """
    if not prefer:
        return None
    match = _PREFER_WAIT.search(prefer)
    if match is None:
        return None
    value = match.group(1)
    if value is None or value == "":
        return maximum
    if not value.isdigit():
        raise ApiError(
            400,
            "Invalid Prefer header",
            f"Prefer: wait=N needs N in whole seconds between 1 and {maximum:g}; got "
            f"{shorten(value, 40)!r}",
        )
    return float(min(max(int(value), 1), maximum))


async def _check_webhook_url(state: GatewayState, name: str, url: str | None) -> None:
    if url is None:
        return
    if not re.match(r"^https?://[^\s/]+", url):
        problem: str | None = "Does not match format 'uri' (use an http:// or https:// URL)"
    else:
        problem = await state.webhooks.check(url)
    if problem is not None:
        raise input_invalid([InvalidField(type="format", field=name, description=problem)])


router = APIRouter(prefix="/v1", tags=["predictions"], dependencies=[Depends(require_token)])
StateDep = Annotated[GatewayState, Depends(gateway_state)]
CallerDep = Annotated[Caller, Depends(caller)]
PreferHeader = Annotated[
    str | None,
    Header(description="`wait` or `wait=N`: hold the request until done (at most N s)"),
]
_create_errors: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDetail} for status in (400, 401, 404, 422, 429, 503)
}


def _input_limit(settings: GatewaySettings, info: pb.ModelInfo) -> int:
    """Largest `image` / `mask` in bytes: the gateway's limit, or the model's when smaller."""
    if info.max_image_bytes:
        return min(settings.max_input_bytes, info.max_image_bytes)
    return settings.max_input_bytes


async def _create(
    request: Request,
    response: Response,
    state: GatewayState,
    resolved: ResolvedModel,
    body: CreatePrediction,
    prefer: str | None,
    who: Caller,
) -> PredictionResponse:
    wait = parse_prefer_wait(prefer, state.settings.max_wait_seconds)
    await _check_webhook_url(state, "webhook", body.webhook)
    await _check_webhook_url(state, "webhook_completed", body.webhook_completed)
    try:
        parsed = parse_input(body.input, resolved.info)
        asking = InputCaller(who.owner, own_base_urls(request, state))
        if parsed.images:
            limit = _input_limit(state.settings, resolved.info)
            parsed.attach(await state.inputs.resolve_all(parsed.images, asking, limit))
        if parsed.lora_urls:
            parsed.attach_loras(await state.loras.resolve_all(parsed.lora_urls, asking))
    except InputInvalid as error:
        raise input_invalid(error.fields) from None
    record = PredictionRecord(
        id=new_prediction_id(),
        owner=who.owner,
        model=resolved.ref,
        version=resolved.version,
        kiln_model=resolved.info.name,
        input=abbreviate_input(parsed.known),
        request=parsed.request,
        base_url=public_base_url(request, state),
        data_uri=parsed.data_uri,
        file_token=FileStore.new_token(),
        webhook=WebhookConfig.of(body.webhook, body.webhook_events_filter, body.webhook_completed),
    )
    await state.runner.start(record, notes=parsed.notes)
    status: Status | None = None
    if wait is not None and not await record.wait_done(wait):
        status = "starting"  # what Replicate reports when the wait runs out (see module doc)
    response.status_code = 201
    response.headers["Location"] = f"{record.base_url}/v1/predictions/{record.id}"
    return record.render(status=status)


@router.post(
    "/models/{owner}/{name}/predictions",
    response_model=PredictionResponse,
    status_code=201,
    responses=_create_errors,
)
async def create_model_prediction(
    owner: str,
    name: str,
    body: CreatePrediction,
    request: Request,
    response: Response,
    state: StateDep,
    who: CallerDep,
    prefer: PreferHeader = None,
) -> PredictionResponse:
    """Run model `owner/name` (an alias, or the Kiln model called `name`)."""
    resolved = await state.catalog.resolve(owner, name)
    return await _create(request, response, state, resolved, body, prefer, who)


@router.post(
    "/predictions",
    response_model=PredictionResponse,
    status_code=201,
    responses=_create_errors,
)
async def create_prediction(
    body: CreatePredictionWithVersion,
    request: Request,
    response: Response,
    state: StateDep,
    who: CallerDep,
    prefer: PreferHeader = None,
) -> PredictionResponse:
    """Run the model a `version` names (id, `owner/name` or `owner/name:id`)."""
    resolved = await state.catalog.resolve_version(body.version)
    return await _create(request, response, state, resolved, body, prefer, who)


def _encode_cursor(kind: str, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int | None, int | None]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, seq = text[0], int(text[1:])
    except (binascii.Error, ValueError, IndexError, UnicodeDecodeError):
        raise ApiError(400, "Invalid cursor", "use the next or previous URL as given") from None
    if kind == "b":
        return seq, None
    if kind == "a":
        return None, seq
    raise ApiError(400, "Invalid cursor", "use the next or previous URL as given")


@router.get(
    "/predictions",
    response_model=PredictionPage,
    responses={400: {"model": ProblemDetail}, 401: {"model": ProblemDetail}},
)
async def list_predictions(
    request: Request,
    state: StateDep,
    who: CallerDep,
    cursor: Annotated[str | None, Query(description="From a previous page's URLs")] = None,
    page_size: Annotated[int, Query(ge=1, le=100, description="Kiln: results per page")] = 100,
) -> PredictionPage:
    """The caller's predictions (an admin token's: everyone's), newest first, by page."""
    before, after = _decode_cursor(cursor) if cursor else (None, None)
    page = await state.store.page(who.sees, before=before, after=after, size=page_size)
    records, older, newer = page.records, page.older, page.newer
    base = f"{public_base_url(request, state)}/v1/predictions"
    size = "" if page_size == 100 else f"&page_size={page_size}"
    return PredictionPage(
        results=[record.render() for record in records],
        next=None if older is None else f"{base}?cursor={_encode_cursor('b', older)}{size}",
        previous=None if newer is None else f"{base}?cursor={_encode_cursor('a', newer)}{size}",
    )


async def _record(state: GatewayState, prediction_id: str, who: Caller) -> PredictionRecord:
    record = await state.runner.find(prediction_id, who.sees)
    if record is None:
        raise ApiError(
            404, "Not found", f"no prediction with id {shorten(prediction_id, 40)!r} for this token"
        )
    return record


@router.get(
    "/predictions/{prediction_id}",
    response_model=PredictionResponse,
    responses={401: {"model": ProblemDetail}, 404: {"model": ProblemDetail}},
)
async def get_prediction(prediction_id: str, state: StateDep, who: CallerDep) -> PredictionResponse:
    """One prediction's current state."""
    return (await _record(state, prediction_id, who)).render()


@router.post(
    "/predictions/{prediction_id}/cancel",
    response_model=PredictionResponse,
    responses={401: {"model": ProblemDetail}, 404: {"model": ProblemDetail}},
)
async def cancel_prediction(
    prediction_id: str, state: StateDep, who: CallerDep
) -> PredictionResponse:
    """Cancel a prediction; Kiln stops its work within one denoising step."""
    record = await _record(state, prediction_id, who)
    return (await state.runner.cancel(record)).render()


@router.get(
    "/webhooks/default/secret",
    response_model=WebhookSecret,
    tags=["webhooks"],
    responses={401: {"model": ProblemDetail}},
)
async def webhook_secret(state: StateDep) -> WebhookSecret:
    """The key that signs webhook deliveries (Standard Webhooks, `whsec_...`)."""
    return WebhookSecret(key=state.webhooks.secret)
