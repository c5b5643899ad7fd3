"""Turning a prediction's `image` and `mask` inputs into the bytes Kiln receives.

An input may be:
- a data URI, `data:image/png;base64,...` (what the official client sends with
  `file_encoding_strategy="base64"`): decoded here;
- a URL of this gateway's files API, `<gateway>/v1/files/<id>` (what the official client
  puts in place of an open file) or `.../download`: read from disk, and only when the
  caller's token uploaded it; or an output URL of an earlier prediction,
  `<gateway>/files/<token>/out-0.png`: read from disk too;
- any other http(s) URL: fetched by `kiln_gateway.fetch.UrlFetcher` (public addresses
  only, size and time limits, redirects checked).

Whatever the source, the bytes must be a PNG, JPEG or WebP image of at most the size limit
(the gateway's `max_input_bytes`, or the Kiln model's `max_image_bytes` when smaller). Each
refusal names the input and the reason, and becomes a 422 "Input validation failed".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx

from kiln_gateway.errors import InvalidField, shorten
from kiln_gateway.fetch import FetchError, UrlFetcher
from kiln_gateway.files import FileStore
from kiln_gateway.images import IMAGE_TYPES, IMAGE_TYPES_TEXT, sniff_image_type
from kiln_gateway.schema import InputInvalid
from kiln_gateway.uploads import UploadStore

__all__ = [
    "Caller",
    "InputRejected",
    "InputResolver",
    "abbreviate_input",
    "own_path",
    "parse_data_uri",
]

_DATA_URI = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),", re.IGNORECASE)
_ABBREVIATE_OVER = 1024
_WHITESPACE = re.compile(rb"\s+")


class InputRejected(ValueError):
    """An image input cannot be used; the message says why."""


@dataclass(frozen=True)
class Caller:
    """Who asks, and where they reached the gateway (to recognise its own URLs)."""

    owner: str
    """The owner id of the caller's token (`kiln_gateway.auth.owner_of`)."""
    base_urls: tuple[str, ...]
    """Base URLs of this gateway as the caller sees it (public URL, request URL)."""


def _check_image(data: bytes, where: str) -> bytes:
    if sniff_image_type(data) is None:
        raise InputRejected(f"{where} is not a {IMAGE_TYPES_TEXT} image")
    return data


def parse_data_uri(text: str, max_bytes: int) -> bytes:
    """The bytes of a `data:` URI holding a PNG, JPEG or WebP image of at most `max_bytes`.

    The declared type may be one of those, `application/octet-stream` or empty (the bytes
    decide); the payload is base64 (or percent-encoded without `;base64`).

    Raises:
        InputRejected: malformed, not an image type, bad base64, or too large.
    """
    match = _DATA_URI.match(text)
    if match is None:
        raise InputRejected(
            "the value is not a valid data URI; write data:image/png;base64,<base64>"
        )
    declared = match["type"].strip().lower()
    if declared not in (*IMAGE_TYPES, "application/octet-stream", ""):
        raise InputRejected(
            f"the data URI has type {shorten(declared, 60)}; expected {', '.join(IMAGE_TYPES)}"
        )
    is_base64 = "base64" in [p.strip().lower() for p in match["params"].split(";")]
    payload = text[match.end() :]
    if is_base64:
        encoded = _WHITESPACE.sub(b"", payload.encode("ascii", errors="replace"))
        if len(encoded) // 4 * 3 > max_bytes + 2:  # refuse before decoding anything big
            raise InputRejected(f"the data URI is larger than the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InputRejected("the data URI's base64 payload is invalid") from None
    else:
        if len(payload) // 3 > max_bytes:  # every %XX is 3 characters
            raise InputRejected(f"the data URI is larger than the limit of {max_bytes} bytes")
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise InputRejected(f"the data URI holds {len(data)} bytes; the limit is {max_bytes}")
    return _check_image(data, "the data URI")


def abbreviate_input(values: dict[str, object]) -> dict[str, object]:
    """The input as predictions report it: long data URIs shortened to their header.

    A prediction keeps its input for the retention time and returns it on every GET and
    list, so megabytes of base64 per prediction are not kept.
    """
    shown: dict[str, object] = {}
    for name, value in values.items():
        if isinstance(value, str) and len(value) > _ABBREVIATE_OVER and _DATA_URI.match(value):
            head, _, payload = value.partition(",")
            value = f"{head},<{len(payload)} characters omitted>"
        shown[name] = value
    return shown


def own_path(url: httpx.URL, bases: tuple[str, ...]) -> str | None:
    """The path of `url` below one of the gateway's base URLs, or None if it is elsewhere."""
    for text in bases:
        base = httpx.URL(text)
        prefix = base.path.rstrip("/")
        same_origin = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
        if same_origin and url.path.startswith(f"{prefix}/"):
            return url.path[len(prefix) :]
    return None


class InputResolver:
    """Resolves image inputs from data URIs, the gateway's own files, and the web."""

    def __init__(self, uploads: UploadStore, outputs: FileStore, fetcher: UrlFetcher) -> None:
        self._uploads = uploads
        self._outputs = outputs
        self._fetcher = fetcher

    async def resolve(self, value: str, caller: Caller, max_bytes: int) -> bytes:
        """The image bytes `value` refers to.

        Raises:
            InputRejected: the reason, to be reported against the input's name.
        """
        if value[:5].lower() == "data:":
            return parse_data_uri(value, max_bytes)
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError, ValueError):
            url = None
        if url is None or url.scheme not in ("http", "https"):
            raise InputRejected(
                f"{shorten(value)} is neither a data: URI nor an http(s) URL; pass an open "
                "file, a data URI, a file URL from POST /v1/files or an http(s) URL"
            )
        own = own_path(url, caller.base_urls)
        if own is not None:
            return await self._own_file(own, caller, max_bytes)
        try:
            fetched = await self._fetcher.fetch(value, max_bytes)
        except FetchError as error:
            raise InputRejected(str(error)) from None
        return fetched.data

    async def _own_file(self, path: str, caller: Caller, max_bytes: int) -> bytes:
        parts = path.strip("/").split("/")
        is_upload = parts[:2] == ["v1", "files"] and parts[3:] in ([], ["download"])
        if is_upload and len(parts) >= 3:
            found = await self._uploads.read(parts[2], caller.owner)
            if found is None:
                raise InputRejected(
                    f"file {shorten(parts[2], 40)} was not uploaded with this token or has "
                    "expired; upload it again with POST /v1/files"
                )
            record, data = found
            where = f"uploaded file {record.id} ({shorten(record.name, 60)})"
        elif len(parts) == 3 and parts[0] == "files":
            output = self._outputs.path_of(parts[1], parts[2])
            data = b""
            if output is not None:
                try:
                    data = await asyncio.to_thread(output.read_bytes)
                except OSError:
                    output = None
            if output is None:
                raise InputRejected(f"output file {shorten(path, 80)} does not exist or expired")
            where = f"output file {shorten(path, 80)}"
        else:
            raise InputRejected(
                f"{shorten(path, 80)} is a URL of this gateway but not of a file; use the "
                "urls.get of a file from POST /v1/files"
            )
        if len(data) > max_bytes:
            raise InputRejected(f"{where} is {len(data)} bytes; the limit is {max_bytes} bytes")
        return _check_image(data, where)

    async def resolve_all(
        self, values: dict[str, str], caller: Caller, max_bytes: int
    ) -> dict[str, bytes]:
        """Every input resolved concurrently, by name.

        Raises:
            InputInvalid: one entry per input that could not be used, named `input.<name>`.
        """
        names = list(values)
        results = await asyncio.gather(
            *(self.resolve(values[name], caller, max_bytes) for name in names),
            return_exceptions=True,
        )
        problems: list[InvalidField] = []
        resolved: dict[str, bytes] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, InputRejected):
                problems.append(
                    InvalidField(
                        type="invalid_image", field=f"input.{name}", description=str(result)
                    )
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                resolved[name] = result
        if problems:
            raise InputInvalid(problems)
        return resolved
