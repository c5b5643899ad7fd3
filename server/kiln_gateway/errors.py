"""Errors in Replicate's shape: RFC 7807 problem details (`title`, `detail`, `status`).

Every failure the gateway reports goes through `ApiError`, so clients see one shape; the
official client turns it into `replicate.exceptions.ReplicateError` with the same fields.
Input validation failures add `invalid_fields` (one entry per field, as Replicate does).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

__all__ = [
    "ApiError",
    "InvalidField",
    "ProblemDetail",
    "input_invalid",
    "install_error_handlers",
    "shorten",
]


class InvalidField(BaseModel):
    """One invalid input field: JSON-schema style `type`, dotted `field`, and `description`."""

    type: str
    field: str
    description: str


class ProblemDetail(BaseModel):
    """The error body of every non-2xx answer."""

    title: str
    detail: str
    status: int
    invalid_fields: list[InvalidField] | None = None


class ApiError(Exception):
    """An HTTP error answered as a problem detail; `headers` are added to the response."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        invalid_fields: list[InvalidField] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.invalid_fields = invalid_fields
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body; `invalid_fields` only when there are some."""
        problem = ProblemDetail(
            title=self.title,
            detail=self.detail,
            status=self.status,
            invalid_fields=self.invalid_fields,
        )
        return problem.model_dump(exclude_none=True)


def shorten(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters, so user input echoed in an error stays short."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def input_invalid(invalid: list[InvalidField]) -> ApiError:
    """HTTP 422 "Input validation failed" listing each field as Replicate does."""
    detail = "".join(f"- {item.field}: {item.description}\n" for item in invalid)
    return ApiError(422, "Input validation failed", detail, invalid_fields=invalid)


def _location(loc: Any) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or "body"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    invalid = [
        InvalidField(
            type=str(error.get("type", "invalid")),
            field="body"
            if error.get("type") == "json_invalid"
            else shorten(_location(error["loc"])),
            description=shorten(str(error.get("msg", "invalid value")), 300),
        )
        for error in exc.errors()[:20]
    ]
    return await _api_error(request, input_invalid(invalid))


def install_error_handlers(app: Any) -> None:
    """Answer ApiError and FastAPI's request validation errors as problem details."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
