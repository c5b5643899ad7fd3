"""Replicate's files API: input files uploaded once and passed to predictions by URL.

The official client uploads every open file or Path in a prediction's input with
`POST /v1/files` (multipart/form-data: the file in the field `content`, optional JSON
`metadata`) and puts the answer's `urls.get` in the input in its place. The gateway resolves
such URLs from its own disk, without an HTTP request (see `kiln_gateway.inputs`).

- POST /v1/files: 201 with the file object; 413 past `max_input_bytes`; 422 unless the
  bytes are a PNG, JPEG or WebP image (for `image` and `mask`) or a LoRA file, a
  .safetensors or a .tar holding one (for `replicate_weights`, `lora_weights`,
  `extra_lora`; see `kiln_gateway.loras`).
- GET /v1/files: the caller's files, newest first. GET /v1/files/{id}: one file object.
- GET /v1/files/{id}/download: the content.  DELETE /v1/files/{id}: 204.

Files belong to the token that uploaded them: another token gets 404 for them, in these
endpoints and as a prediction input. Each expires `upload_expiry_seconds` after its upload
and is then deleted. They are kept on disk under `<files_dir>/uploads/<id>/` (a `content`
file and a `file.json` record), so with a configured `--files-dir` they survive a restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from kiln_client.image_formats import IMAGE_FORMATS
from kiln_gateway.auth import caller_owner, require_token
from kiln_gateway.errors import ApiError, InvalidField, ProblemDetail, input_invalid, shorten
from kiln_gateway.forms import BodyTooLarge, FormError, parse_form, read_body
from kiln_gateway.images import IMAGE_TYPES_TEXT, sniff_image_type
from kiln_gateway.lora_files import lora_kind
from kiln_gateway.state import GatewayState, gateway_state, public_base_url
from kiln_gateway.timefmt import iso8601

__all__ = ["FileObject", "FilePage", "UploadStore", "UploadedFile", "router"]

FORM_OVERHEAD_BYTES = 64 * 1024
"""Room for multipart headers and the metadata field beside the file itself."""
_ID = re.compile(r"^[a-z2-7]{26}$")
_RECORD = "file.json"
_CONTENT = "content"
_MAX_NAME = 255


def _new_file_id() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode().lower().rstrip("=")[:26]


class FileObject(BaseModel):
    """A file as Replicate's API describes it (what the official client's `File` reads)."""

    id: str
    name: str
    content_type: str
    size: int
    etag: str
    checksums: dict[str, str]
    metadata: dict[str, Any]
    created_at: str
    expires_at: str | None
    urls: dict[str, str]


class FilePage(BaseModel):
    """The caller's files, newest first (there is never a next page)."""

    previous: str | None = None
    next: str | None = None
    results: list[FileObject]


@dataclass(frozen=True)
class UploadedFile:
    """One stored upload's record (`file.json`); `owner` is `kiln_gateway.auth.owner_of`."""

    id: str
    owner: str
    name: str
    content_type: str
    size: int
    sha256: str
    md5: str
    created_at: float
    expires_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def render(self, base_url: str) -> FileObject:
        """The file object, its URLs under `base_url`."""
        url = f"{base_url}/v1/files/{self.id}"
        return FileObject(
            id=self.id,
            name=self.name,
            content_type=self.content_type,
            size=self.size,
            etag=self.md5,
            checksums={"sha256": self.sha256, "md5": self.md5},
            metadata=self.metadata,
            created_at=iso8601(self.created_at),
            expires_at=iso8601(self.expires_at),
            urls={"get": url, "download": f"{url}/download"},
        )


def _clean_name(name: str | None) -> str:
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable())
    return base[:_MAX_NAME] or "file"


class UploadStore:
    """Uploaded files under one folder, each private to its owner until it expires."""

    def __init__(self, root: Path, *, expiry_seconds: float) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._expiry = expiry_seconds

    async def add(
        self,
        owner: str,
        data: bytes,
        *,
        name: str | None,
        content_type: str,
        metadata: dict[str, Any] | None = None,
    ) -> UploadedFile:
        """Store `data` for `owner`; the record says when it expires."""
        now = time.time()
        record = UploadedFile(
            id=_new_file_id(),
            owner=owner,
            name=_clean_name(name),
            content_type=content_type,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
            created_at=now,
            expires_at=now + self._expiry,
            metadata=dict(metadata or {}),
        )
        await asyncio.to_thread(self._write, record, data)
        return record

    def _write(self, record: UploadedFile, data: bytes) -> None:
        # Written in a hidden folder and renamed into place, so a file is either complete
        # or absent, even across a crash.
        partial = self.root / f".partial-{record.id}"
        partial.mkdir()
        (partial / _CONTENT).write_bytes(data)
        (partial / _RECORD).write_text(json.dumps(asdict(record)))
        partial.replace(self.root / record.id)

    def _load(self, file_id: str) -> UploadedFile | None:
        if not _ID.match(file_id):
            return None
        try:
            raw = json.loads((self.root / file_id / _RECORD).read_text())
            return UploadedFile(**raw)
        except (OSError, ValueError, TypeError):
            return None

    def _visible(self, file_id: str, owner: str, now: float) -> UploadedFile | None:
        record = self._load(file_id)
        if record is None or record.owner != owner or record.expires_at <= now:
            return None
        return record

    async def get(self, file_id: str, owner: str) -> UploadedFile | None:
        """The owner's file, or None when unknown, another owner's, or expired."""
        return await asyncio.to_thread(self._visible, file_id, owner, time.time())

    async def content_path(self, file_id: str, owner: str) -> tuple[UploadedFile, Path] | None:
        """The owner's file and the path of its content, or None (as `get`)."""
        record = await self.get(file_id, owner)
        return None if record is None else (record, self.root / record.id / _CONTENT)

    async def read(self, file_id: str, owner: str) -> tuple[UploadedFile, bytes] | None:
        """The owner's file and its bytes, or None (as `get`)."""
        found = await self.content_path(file_id, owner)
        if found is None:
            return None
        record, path = found
        try:
            return record, await asyncio.to_thread(path.read_bytes)
        except OSError:  # deleted since the lookup
            return None

    async def list_for(self, owner: str) -> list[UploadedFile]:
        """The owner's unexpired files, newest first."""

        def scan() -> list[UploadedFile]:
            now = time.time()
            found = [self._visible(path.name, owner, now) for path in self.root.iterdir()]
            return sorted(
                (record for record in found if record is not None),
                key=lambda record: record.created_at,
                reverse=True,
            )

        return await asyncio.to_thread(scan)

    async def delete(self, file_id: str, owner: str) -> bool:
        """Delete the owner's file; False when there was none to delete."""
        if await self.get(file_id, owner) is None:
            return False
        await asyncio.to_thread(shutil.rmtree, self.root / file_id, True)
        return True

    async def purge(self, now: float | None = None) -> int:
        """Delete every expired file (and leftovers of interrupted uploads); return the count."""

        def sweep(now: float) -> int:
            removed = 0
            for path in list(self.root.iterdir()):
                if path.name.startswith(".partial-"):
                    if path.stat().st_mtime < now - 3600:
                        shutil.rmtree(path, ignore_errors=True)
                    continue
                record = self._load(path.name)
                if record is None or record.expires_at <= now:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            return removed

        return await asyncio.to_thread(sweep, time.time() if now is None else now)


router = APIRouter(prefix="/v1", tags=["files"], dependencies=[Depends(require_token)])
StateDep = Annotated[GatewayState, Depends(gateway_state)]
OwnerDep = Annotated[str, Depends(caller_owner)]
_errors: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDetail} for status in (401, 404)
}


def _not_found(file_id: str) -> ApiError:
    return ApiError(
        404,
        "Not found",
        f"no file with id {shorten(file_id, 40)!r} for this token (files expire, and each "
        "is visible only to the token that uploaded it)",
    )


def _invalid(name: str, description: str) -> ApiError:
    return input_invalid([InvalidField(type="invalid_file", field=name, description=description)])


def _metadata(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}  # an empty form field is no metadata
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _invalid("metadata", "must be a JSON object")
    return value


@router.post(
    "/files",
    response_model=FileObject,
    status_code=201,
    responses={status: {"model": ProblemDetail} for status in (400, 401, 413, 422)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["content"],
                        "properties": {
                            "content": {"type": "string", "format": "binary"},
                            "metadata": {"type": "string", "description": "a JSON object"},
                        },
                    }
                }
            },
        }
    },
)
async def create_file(request: Request, state: StateDep, owner: OwnerDep) -> FileObject:
    """Upload a PNG, JPEG or WebP image to use as a prediction's `image` or `mask`, or a
    LoRA (.safetensors, or a .tar holding one) for its `replicate_weights`."""
    limit = state.settings.max_input_bytes
    too_large = ApiError(
        413, "File too large", f"uploads are limited to {limit} bytes (--max-input-bytes)"
    )
    try:
        body = await read_body(request, limit + FORM_OVERHEAD_BYTES)
        form = parse_form(body, request.headers.get("content-type", ""))
    except BodyTooLarge:
        raise too_large from None
    except FormError as error:
        raise ApiError(
            400,
            "Invalid upload",
            f"{error}; send the file as multipart/form-data in the field 'content'",
        ) from None
    part = form.get("content")
    if part is None:
        raise _invalid("content", "Missing required field: send the file in the field 'content'")
    if len(part.data) > limit:
        raise too_large
    kind = sniff_image_type(part.data) or lora_kind(part.data)
    if kind is None:
        raise _invalid(
            "content",
            f"must be a {IMAGE_TYPES_TEXT} image, or a LoRA: a .safetensors file or a .tar "
            "holding one",
        )
    metadata = _metadata(form["metadata"].text) if "metadata" in form else {}
    name = part.filename or (form["filename"].text if "filename" in form else None)
    record = await state.uploads.add(
        owner, part.data, name=name, content_type=kind, metadata=metadata
    )
    return record.render(public_base_url(request, state))


@router.get("/files", response_model=FilePage, responses=_errors)
async def list_files(request: Request, state: StateDep, owner: OwnerDep) -> FilePage:
    """The files this token uploaded that have not expired, newest first."""
    base = public_base_url(request, state)
    return FilePage(results=[record.render(base) for record in await state.uploads.list_for(owner)])


@router.get("/files/{file_id}", response_model=FileObject, responses=_errors)
async def get_file(file_id: str, request: Request, state: StateDep, owner: OwnerDep) -> FileObject:
    """One uploaded file's description."""
    record = await state.uploads.get(file_id, owner)
    if record is None:
        raise _not_found(file_id)
    return record.render(public_base_url(request, state))


@router.get(
    "/files/{file_id}/download",
    response_class=FileResponse,
    responses={
        200: {"content": {f.mime_type: {} for f in IMAGE_FORMATS}},
        **_errors,
    },
)
async def download_file(file_id: str, state: StateDep, owner: OwnerDep) -> FileResponse:
    """One uploaded file's content."""
    found = await state.uploads.content_path(file_id, owner)
    if found is None:
        raise _not_found(file_id)
    record, path = found
    return FileResponse(
        path,
        media_type=record.content_type,
        filename=record.name,
        content_disposition_type="attachment",
        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
    )


@router.delete("/files/{file_id}", status_code=204, responses=_errors)
async def delete_file(file_id: str, state: StateDep, owner: OwnerDep) -> Response:
    """Delete an uploaded file now (it can no longer be used as an input)."""
    if not await state.uploads.delete(file_id, owner):
        raise _not_found(file_id)
    return Response(status_code=204)
