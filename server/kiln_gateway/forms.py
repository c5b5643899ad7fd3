"""Reading a size-limited request body and splitting a multipart/form-data body into fields.

POST /v1/files receives the file as multipart/form-data (RFC 7578), as the official client
sends it. The body is read with a hard limit (an oversized upload is refused as soon as it
passes the limit, without being held in full) and split on the boundary with `bytes.find`;
each part's headers are parsed by the standard library's email parser.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
from dataclasses import dataclass

from fastapi import Request

__all__ = ["BodyTooLarge", "FormError", "FormPart", "parse_form", "read_body"]


class BodyTooLarge(Exception):
    """The request body is longer than the limit given to `read_body`."""


class FormError(ValueError):
    """The body is not valid multipart/form-data; the message says why."""


@dataclass(frozen=True)
class FormPart:
    """One form field: its bytes, and the filename and content type its part declared."""

    data: bytes
    filename: str | None
    content_type: str

    @property
    def text(self) -> str:
        """The field's value as UTF-8 text (undecodable bytes replaced)."""
        return self.data.decode("utf-8", errors="replace")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it once it passes `limit` bytes.

    Raises:
        BodyTooLarge: the declared Content-Length or the bytes received pass `limit`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


def _headers(raw: bytes) -> email.message.Message:
    return email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(raw + b"\r\n\r\n")


def parse_form(body: bytes, content_type: str) -> dict[str, FormPart]:
    """The fields of a multipart/form-data body by name (the first part of each name wins).

    Raises:
        FormError: not multipart/form-data, no boundary, or a malformed body.
    """
    header = _headers(f"Content-Type: {content_type}".encode("latin-1", errors="replace"))
    if header.get_content_type() != "multipart/form-data":
        raise FormError(
            f"expected Content-Type multipart/form-data; got {content_type[:60] or '(none)'}"
        )
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise FormError("the multipart/form-data Content-Type has no boundary")
    delimiter = b"--" + boundary.encode("latin-1", errors="replace")
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise FormError("the body does not contain the multipart boundary")
        position = start + 2 + len(delimiter)
    fields: dict[str, FormPart] = {}
    while not body.startswith(b"--", position):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise FormError("the multipart body ends inside a boundary line")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise FormError("a multipart part is not terminated by the boundary")
        if body.startswith(b"\r\n", start):  # a part without headers
            raw_headers, content_start = b"", start + 2
        else:
            header_end = body.find(b"\r\n\r\n", start, end + 2)
            if header_end < 0:
                raise FormError("a multipart part has no blank line after its headers")
            raw_headers, content_start = body[start:header_end], header_end + 4
        part = _headers(raw_headers)
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            fields[name] = FormPart(
                data=body[content_start:end],
                filename=part.get_filename(),
                content_type=part.get_content_type() if part.get("content-type") else "",
            )
        position = end + 2 + len(delimiter)
    return fields
