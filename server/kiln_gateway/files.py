"""Output files: written to disk, served at unguessable URLs, deleted with their prediction's data.

Each prediction gets its own random folder token; its images are `out-<index>.<ext>`, so
an output URL looks like `<base>/files/<token>/out-0.png`. As with Replicate's delivery
URLs, knowing the URL is the permission: file URLs need no token, which lets them be used
directly in `<img src>` and read by the official client's `FileOutput`. When the
prediction's data is removed (retention time, storage cap, record limit) its files are
deleted and their URLs answer 404. Replicas sharing a database share this folder too (a
shared volume), or use data-URI outputs.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from kiln_client.image_formats import (
    IMAGE_FORMATS,
    format_for_extension,
    format_for_mime_type,
)
from kiln_gateway.errors import ApiError, ProblemDetail
from kiln_gateway.state import GatewayState, gateway_state
from kiln_server.atomic_files import write_atomic

__all__ = ["FileStore", "data_uri", "extension_for", "router"]

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_NAME = re.compile(r"^out-[0-9]{1,4}\.(png|jpg|webp)$")


def extension_for(mime_type: str) -> str:
    """File extension for an image MIME type, without its dot ("bin" when unknown)."""
    found = format_for_mime_type(mime_type)
    return found.extension.lstrip(".") if found is not None else "bin"


def data_uri(data: bytes, mime_type: str) -> str:
    """`data:<mime>;base64,<data>`, which the official client's FileOutput decodes."""
    return (
        f"data:{mime_type or 'application/octet-stream'};base64,{base64.b64encode(data).decode()}"
    )


class FileStore:
    """Prediction output files under one root folder (the gateway's files folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_token() -> str:
        """A fresh unguessable folder token for one prediction."""
        return secrets.token_urlsafe(18)

    async def save(self, token: str, index: int, data: bytes, mime_type: str) -> str:
        """Write one output and return its URL path (`/files/<token>/out-<index>.<ext>`)."""
        name = f"out-{index}.{extension_for(mime_type)}"
        folder = self.root / token
        # A reader sees the whole file or none (files are served while predictions run).
        await asyncio.to_thread(write_atomic, folder / name, data)
        return f"/files/{token}/{name}"

    def path_of(self, token: str, name: str) -> Path | None:
        """The file behind `/files/<token>/<name>`, or None when unknown, invalid or expired."""
        if not _TOKEN.match(token) or not _NAME.match(name):
            return None
        path = self.root / token / name
        return path if path.is_file() else None

    async def read(self, token: str, name: str) -> bytes | None:
        """The bytes of `/files/<token>/<name>`, or None when unknown, invalid or expired.

        Read whole, so expiry deleting the file mid-answer cannot cut a response short.
        """
        path = self.path_of(token, name)
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, token: str) -> None:
        """Delete every file of one prediction (idempotent)."""
        if _TOKEN.match(token):
            await asyncio.to_thread(shutil.rmtree, self.root / token, True)

    def tokens(self) -> list[str]:
        """The token of every output folder on disk."""
        return [
            path.name for path in self.root.iterdir() if path.is_dir() and _TOKEN.match(path.name)
        ]


router = APIRouter(tags=["files"])


@router.get(
    "/files/{token}/{name}",
    response_class=Response,
    responses={
        200: {"content": {f.mime_type: {} for f in IMAGE_FORMATS}},
        404: {"model": ProblemDetail},
    },
)
async def get_file(
    token: str, name: str, state: Annotated[GatewayState, Depends(gateway_state)]
) -> Response:
    """One output image; 404 once the retention time has passed."""
    data = await state.files.read(token, name)
    if data is None:
        raise ApiError(
            404,
            "File not found",
            "this output file does not exist or has expired (outputs are kept for "
            f"{state.settings.retention_seconds:g} s)",
        )
    return Response(
        data,
        media_type=_media_type(name),
        headers={"Cache-Control": f"private, max-age={int(state.settings.retention_seconds)}"},
    )


def _media_type(name: str) -> str:
    found = format_for_extension(Path(name).suffix)
    return found.mime_type if found is not None else "application/octet-stream"
