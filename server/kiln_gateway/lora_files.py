"""LoRA files as the gateway receives them: a .safetensors file, or a tar holding one.

`lora_kind` tells the formats apart by their bytes (for fetched bodies and uploads);
`safetensors_of` takes the .safetensors out of a tar (optionally gzipped) without writing
anything to disk, and refuses a tar with no .safetensors or several, or any link, device or
member whose path is absolute or climbs out with `..`. Whether the file is a LoRA the Kiln
server applies is the server's to check when it is imported.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import PurePosixPath

from kiln_gateway.errors import shorten

__all__ = ["GZIP", "SAFETENSORS", "TAR", "LoraRejected", "lora_kind", "safetensors_of"]

SAFETENSORS = "application/vnd.safetensors"
TAR = "application/x-tar"
GZIP = "application/gzip"
_TAR_MAGIC_OFFSET = 257
# The safetensors format caps its JSON header at 100 MB.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class LoraRejected(ValueError):
    """A LoRA input cannot be used; the message says why."""


def lora_kind(data: bytes) -> str | None:
    """What the bytes are: a safetensors file, a tar or a gzip stream (by type), or None."""
    if data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return TAR
    if data[:2] == b"\x1f\x8b":
        return GZIP
    if len(data) >= 10:
        (length,) = struct.unpack("<Q", data[:8])
        if 2 <= length <= min(len(data) - 8, _MAX_SAFETENSORS_HEADER) and data[8:9] == b"{":
            return SAFETENSORS
    return None


def safetensors_of(data: bytes, where: str, max_bytes: int) -> bytes:
    """The .safetensors file `data` is, or the only one the tar `data` holds.

    Raises:
        LoraRejected: neither a .safetensors nor a (gzipped) tar, an unreadable tar, or a
            tar with no or several .safetensors files, a link, a special file, a member path
            that is absolute or climbs with `..`, or a member over `max_bytes`.
    """
    kind = lora_kind(data)
    if kind == SAFETENSORS:
        return data
    if kind is None:
        raise LoraRejected(f"{where} is neither a .safetensors LoRA nor a .tar holding one")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            member = _only_safetensors(archive.getmembers(), where)
            if member.size > max_bytes:
                raise LoraRejected(
                    f"{where}: {shorten(member.name, 80)} is {member.size} bytes; the limit is "
                    f"{max_bytes} bytes"
                )
            extracted = archive.extractfile(member)
            if extracted is None:  # only for members that are not regular files
                raise LoraRejected(f"{where}: {shorten(member.name, 80)} cannot be read")
            return extracted.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise LoraRejected(f"{where} is not a readable tar ({shorten(str(error), 120)})") from None


def _only_safetensors(members: list[tarfile.TarInfo], where: str) -> tarfile.TarInfo:
    found: list[tarfile.TarInfo] = []
    for member in members:
        name = shorten(member.name, 80)
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise LoraRejected(
                f"{where}: member {name!r} has a path outside the archive; refusing the tar"
            )
        if member.issym() or member.islnk():
            raise LoraRejected(f"{where}: member {name!r} is a link; refusing the tar")
        if not (member.isfile() or member.isdir()):
            raise LoraRejected(f"{where}: member {name!r} is not a regular file or folder")
        if member.isfile() and member.name.endswith(".safetensors"):
            found.append(member)
    if not found:
        raise LoraRejected(f"{where} is a tar without a .safetensors file")
    if len(found) > 1:
        names = ", ".join(shorten(member.name, 40) for member in found[:5])
        raise LoraRejected(
            f"{where} is a tar with {len(found)} .safetensors files ({names}); give a tar "
            "holding exactly one, or the URL of the .safetensors itself"
        )
    return found[0]
