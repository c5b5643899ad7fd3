"""LoRA inputs given as URLs, turned into names of LoRAs in the Kiln server's LoRA cache.

`replicate_weights`, `lora_weights` and `extra_lora` (see `kiln_gateway.schema`) may be the
URL of a LoRA: an http(s) URL, or a file of this gateway's files API
(`<gateway>/v1/files/<id>`, only for the token that uploaded it). The file is a
.safetensors LoRA, or a .tar (optionally gzipped) holding exactly one .safetensors file
beside any other regular files (Replicate's trainers ship `lora.safetensors` with
`embeddings.pti`, which Kiln does not apply).

For each URL the gateway first asks the Kiln server (`ModelAdminService.GetImportedLora`)
whether it already imported it; only when not does it fetch the file (with
`kiln_gateway.fetch.UrlFetcher`: public addresses only, the fetch time limit, at most
`max_lora_bytes`), take the .safetensors out of a tar, and send it with `ImportLora`, the
URL as its source. The server names it by its content hash; that name goes into the
request. So one URL is fetched once while the server's cache keeps the file, and the same
URL asked for by predictions at the same time is fetched once too.

Tars are opened by `kiln_gateway.lora_files`. Every problem with the input (a URL that
cannot be fetched, not a LoRA, a LoRA the server refuses) is a 422 naming the input. The
admin RPCs need the `admin` scope: without it the answer is 502 saying that the gateway's
upstream token needs `generate+admin`; an unreachable server is 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
import httpx

from kiln_client.admin import AsyncKilnAdminClient
from kiln_client.errors import KilnError
from kiln_gateway.errors import ApiError, InvalidField, shorten
from kiln_gateway.fetch import BodyRule, FetchError, UrlFetcher
from kiln_gateway.inputs import Caller, own_path
from kiln_gateway.lora_files import GZIP, SAFETENSORS, TAR, LoraRejected, lora_kind, safetensors_of
from kiln_gateway.schema import InputInvalid, LoraUrl
from kiln_gateway.uploads import UploadStore

__all__ = ["ADMIN_TIMEOUT_SECONDS", "LORA_BODY", "UPLOAD_SOURCE_PREFIX", "LoraImporter"]

log = logging.getLogger("kiln_gateway.loras")

ADMIN_TIMEOUT_SECONDS = 120.0
"""Deadline of one admin call (an import streams up to `max_lora_bytes` to the server)."""
UPLOAD_SOURCE_PREFIX = "kiln-gateway-upload:sha256:"
"""How an uploaded file is named as a source to the Kiln server: by its content's hash, so
every URL of the same upload is one source."""
_ADMIN_SCOPE_HELP = (
    "the gateway's upstream token (KILN_API_TOKEN) needs the `generate+admin` scope on the "
    "Kiln server to import LoRAs from URLs; give it that scope, or name a LoRA the model "
    "lists instead of a URL"
)


LORA_BODY = BodyRule(
    accept=f"{SAFETENSORS}, {TAR}, {GZIP}, application/octet-stream, */*",
    content_types=None,  # hosts serve LoRAs as octet-stream, binary/octet-stream, x-tar...
    sniff=lora_kind,
    expected="a .safetensors LoRA or a .tar holding one",
)
"""Fetched LoRA files: any Content-Type; the bytes must be safetensors, a tar or gzip."""


class LoraImporter:
    """Turns LoRA URLs into the names the Kiln server's LoRA cache gives them."""

    def __init__(
        self,
        admin: AsyncKilnAdminClient,
        uploads: UploadStore,
        fetcher: UrlFetcher,
        max_bytes: int,
        upstream: str,
    ) -> None:
        self._admin = admin
        self._uploads = uploads
        self._fetcher = fetcher
        self._max_bytes = max_bytes
        self._upstream = upstream
        self._in_flight: dict[str, asyncio.Future[str]] = {}

    async def name_for(self, lora: LoraUrl, caller: Caller) -> str:
        """The Kiln LoRA name of `lora.url`, importing it first when the server lacks it.

        Raises:
            LoraRejected: the URL cannot be used (the reason, for the input's 422).
            ApiError: the Kiln server cannot be asked (503), or refuses the gateway (502).
        """
        where = shorten(lora.url, 120)
        try:
            url = httpx.URL(lora.url)
        except (httpx.InvalidURL, TypeError, ValueError):
            url = None
        if url is None or url.scheme not in ("http", "https"):
            raise LoraRejected(
                f"{where} is not an http(s) URL; give the URL of a .safetensors LoRA (or of "
                "a .tar holding one), a file URL from POST /v1/files, or a LoRA name"
            )
        own = own_path(url, caller.base_urls)
        if own is not None:
            return await self._uploaded(own, caller, where)
        return await self._shared(lora.url, lambda: self._remote(lora.url, where))

    async def resolve_all(self, loras: list[LoraUrl], caller: Caller) -> dict[str, str]:
        """Every LoRA URL's name, by input name, resolved concurrently.

        Raises:
            InputInvalid: one entry per input that could not be used, named `input.<name>`.
            ApiError: as `name_for`.
        """
        results = await asyncio.gather(
            *(self.name_for(lora, caller) for lora in loras), return_exceptions=True
        )
        problems: list[InvalidField] = []
        names: dict[str, str] = {}
        for lora, result in zip(loras, results, strict=True):
            if isinstance(result, LoraRejected):
                problems.append(
                    InvalidField(
                        type="invalid_lora", field=f"input.{lora.field}", description=str(result)
                    )
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                names[lora.field] = result
        if problems:
            raise InputInvalid(problems)
        return names

    async def close(self) -> None:
        """Close the admin client's channel."""
        await self._admin.close()

    async def _shared(self, key: str, work: Callable[[], Awaitable[str]]) -> str:
        """`work()`'s result, run once for callers asking for the same `key` at once."""
        running = self._in_flight.get(key)
        if running is None:
            running = asyncio.ensure_future(work())
            self._in_flight[key] = running
            running.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await asyncio.shield(running)

    async def _remote(self, url: str, where: str) -> str:
        known = await self._ask(url)
        if known is not None:
            return known
        try:
            fetched = await self._fetcher.fetch(url, self._max_bytes, LORA_BODY)
        except FetchError as error:
            raise LoraRejected(str(error)) from None
        data = await asyncio.to_thread(safetensors_of, fetched.data, where, self._max_bytes)
        return await self._import(data, url, where)

    async def _uploaded(self, path: str, caller: Caller, where: str) -> str:
        parts = path.strip("/").split("/")
        if not (
            parts[:2] == ["v1", "files"] and len(parts) >= 3 and parts[3:] in ([], ["download"])
        ):
            raise LoraRejected(
                f"{where} is a URL of this gateway but not of an uploaded file; use the "
                "urls.get of a file from POST /v1/files"
            )
        record = await self._uploads.get(parts[2], caller.owner)
        if record is None:
            raise LoraRejected(
                f"file {shorten(parts[2], 40)} was not uploaded with this token or has "
                "expired; upload it again with POST /v1/files"
            )
        source = UPLOAD_SOURCE_PREFIX + record.sha256
        known = await self._ask(source)
        if known is not None:
            return known
        found = await self._uploads.read(record.id, caller.owner)
        if found is None:
            raise LoraRejected(f"file {record.id} expired while it was being read; upload it again")
        label = f"uploaded file {record.id} ({shorten(record.name, 60)})"
        data = await asyncio.to_thread(safetensors_of, found[1], label, self._max_bytes)
        return await self._import(data, source, label)

    async def _ask(self, source: str) -> str | None:
        try:
            found = await self._admin.get_imported_lora(source)
        except KilnError as error:
            raise self._upstream_error(error) from None
        return found.name if found is not None else None

    async def _import(self, data: bytes, source: str, where: str) -> str:
        try:
            imported = await self._admin.import_lora(data, source=source)
        except KilnError as error:
            if error.code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ):
                reasons = "; ".join(why for _, why in error.field_violations) or error.message
                raise LoraRejected(
                    f"the Kiln server refused {where}: {shorten(reasons, 300)}"
                ) from None
            raise self._upstream_error(error) from None
        log.info(
            "LoRA imported into the Kiln server" if not imported.already_present else
            "LoRA already in the Kiln server's cache",
            extra={"lora": imported.lora.name, "source": shorten(source, 200)},
        )  # fmt: skip
        return imported.lora.name

    def _upstream_error(self, error: KilnError) -> ApiError:
        code = error.code
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return ApiError(502, "Kiln server refused the LoRA import", _ADMIN_SCOPE_HELP)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ApiError(
                503,
                "Kiln server unavailable",
                f"the Kiln server at {self._upstream} is unavailable: "
                f"{shorten(error.message, 300)}",
                headers={"Retry-After": "5"},
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return ApiError(
                502,
                "Kiln server error",
                f"the Kiln server at {self._upstream} does not import LoRAs (an older "
                "version); name a LoRA the model lists instead of a URL",
            )
        return ApiError(502, "Kiln server error", f"{code.name}: {shorten(error.message, 300)}")
