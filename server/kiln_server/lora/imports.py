"""The LoRA cache: LoRA files imported through the admin API, named by their content hash.

`ModelAdminService.ImportLora` streams a file in; `LoraCache.begin` checks its declared
size, `PendingImport.write` takes the bytes (into a hidden temporary file in the cache
folder, hashed on the way) and `PendingImport.finish` checks that exactly the declared bytes
came, that they are a LoRA this server applies (the safetensors layout, then `describe`
from the header: no LoHa/LoKr/DoRA, rank at most the maximum) and
renames the file to `sha256-<first 16 hex digits>.safetensors`. The same bytes imported
twice are one file (`already_present`), so concurrent imports of one file are safe: each
writes its own temporary file and the second to finish keeps the first one's.

The folder is one more LoRA folder of every model that serves LoRAs (`with_lora_cache`), so
requests name an imported LoRA as `sha256-...` and ListModels lists it. An index file
(`.kiln-imports.json`, written atomically) keeps each file's description, when it was last
used (imported or looked up) and the sources (URLs) it came from, for `lookup`. The files
together stay within `max_bytes`: before a new file is added, the least recently used
others are deleted; temporary files of imports in progress are never deleted. One server
owns a cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal

from safetensors import SafetensorError, safe_open

from kiln_server.atomic_files import write_atomic
from kiln_server.lora.folders import LORA_SUFFIX
from kiln_server.lora.listing import LoraListing, describe
from kiln_server.models.registry import ModelRegistry

logger = logging.getLogger(__name__)

NAME_PREFIX = "sha256-"
NAME_HEX_DIGITS = 16
INDEX_FILE = ".kiln-imports.json"
TEMP_PREFIX = ".import-"
MAX_CHUNK_BYTES = 1024 * 1024
"""The most bytes one ImportLora chunk may carry (the contract's 1 MiB)."""
MAX_SOURCE_CHARS = 4096
SOURCES_PER_FILE = 16
"""Sources remembered per file; older ones are forgotten (the file is then fetched again
from them, and found to be present)."""


def lora_name(sha256_hex: str) -> str:
    """The request name of a LoRA whose SHA-256 is `sha256_hex`: `sha256-` and 16 digits."""
    return NAME_PREFIX + sha256_hex[:NAME_HEX_DIGITS]


def with_lora_cache(registry: ModelRegistry, folder: Path) -> ModelRegistry:
    """`registry` with `folder` (created when missing) as the last LoRA folder of every
    model that has LoRA folders, i.e. every model that serves LoRAs.

    Raises:
        OSError: the folder cannot be created; the message names `--lora-cache-dir`.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create the LoRA cache folder {folder} ({error.strerror or error}): "
            "choose a writable --lora-cache-dir"
        ) from error
    models = {
        name: spec
        if not spec.lora_dirs or folder in spec.lora_dirs
        else replace(spec, lora_dirs=(*spec.lora_dirs, folder))
        for name, spec in registry.models.items()
    }
    return replace(registry, models=models)


@dataclass(frozen=True)
class ImportedLora:
    """A LoRA of the cache: its request name, full SHA-256 (hex), size, rank and format."""

    name: str
    sha256: str
    size_bytes: int
    rank: int
    format: str


@dataclass(frozen=True)
class ImportResult:
    """The stored LoRA, and whether the same bytes were in the cache already."""

    lora: ImportedLora
    already_present: bool


class ImportRefused(Exception):
    """An import the cache does not take. `field` names the ImportLora part at fault
    (`header`, `header.size_bytes`, `header.source`, `chunk`, `content`); `kind` is
    `invalid` (INVALID_ARGUMENT) or `too_large` (RESOURCE_EXHAUSTED: past the cache size)."""

    def __init__(
        self, field: str, message: str, kind: Literal["invalid", "too_large"] = "invalid"
    ) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.kind = kind


@dataclass
class _Entry:
    """One cached file as the index keeps it."""

    lora: ImportedLora
    last_used: float
    sources: list[str] = field(default_factory=list)


class LoraCache:
    """The cache folder of imported LoRAs, its index and its size limit (thread-safe)."""

    def __init__(self, folder: Path, *, max_bytes: int, max_rank: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, _Entry] = self._read_index()
        self._sources: dict[str, str] = {
            source: name for name, entry in self._entries.items() for source in entry.sources
        }
        with self._lock:
            self._make_room(0)  # the size may have been lowered since the last run
            self._write_index()

    # --- asking -------------------------------------------------------------------------

    def lookup(self, source: str) -> ImportedLora | None:
        """The LoRA imported from `source` (marked used now), or None when none was (or it
        has been removed since)."""
        with self._lock:
            name = self._sources.get(source)
            entry = self._entries.get(name) if name is not None else None
            if name is None:
                return None
            if entry is None or not self._path(entry.lora.name).is_file():
                self._forget(name)
                self._sources.pop(source, None)
                found = None
            else:
                entry.last_used = time.time()
                found = entry.lora
            try:
                self._write_index()
            except OSError as error:  # the answer stands; only the index lags behind
                logger.warning("cannot update the LoRA cache index: %s", error)
            return found

    def total_bytes(self) -> int:
        """Bytes of the cached files."""
        with self._lock:
            return sum(entry.lora.size_bytes for entry in self._entries.values())

    def names(self) -> list[str]:
        """The request names of the cached files, least recently used first."""
        with self._lock:
            ordered = sorted(self._entries.values(), key=lambda entry: entry.last_used)
            return [entry.lora.name for entry in ordered]

    # --- importing ----------------------------------------------------------------------

    def begin(self, source: str, size_bytes: int) -> PendingImport:
        """Start importing a file of `size_bytes` from `source` (a URL, or "").

        Raises:
            ImportRefused: an empty file or a source too long (invalid), or a file larger
                than the whole cache (too_large).
        """
        if len(source) > MAX_SOURCE_CHARS:
            raise ImportRefused(
                "header.source", f"is {len(source)} characters; at most {MAX_SOURCE_CHARS}"
            )
        if size_bytes <= 0:
            raise ImportRefused(
                "header.size_bytes", "must be the file's size in bytes, more than 0"
            )
        if size_bytes > self.max_bytes:
            raise ImportRefused(
                "header.size_bytes",
                f"the file is {size_bytes} bytes but the server's LoRA cache holds at most "
                f"{self.max_bytes} bytes (--lora-cache-size)",
                "too_large",
            )
        handle, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.folder)
        return PendingImport(self, source, size_bytes, os.fdopen(handle, "wb"), Path(temp))

    def _store(self, pending: PendingImport, sha256: str, listing: LoraListing) -> ImportResult:
        """Move a checked temporary file into place (or drop it for a file already here)."""
        name = lora_name(sha256)
        with self._lock:
            entry = self._entries.get(name)
            present = entry is not None and self._path(name).is_file()
            if entry is None or not present:
                self._make_room(pending.size_bytes)
                os.replace(pending.temp, self._path(name))
                lora = ImportedLora(name, sha256, pending.size_bytes, listing.rank, listing.format)
                entry = _Entry(lora, time.time())
                self._entries[name] = entry
            else:
                pending.temp.unlink(missing_ok=True)
                entry.last_used = time.time()
            if pending.source:
                self._remember(pending.source, entry)
            self._write_index()
            logger.info(
                "LoRA imported" if not present else "LoRA import already present",
                extra={"lora": name, "bytes": pending.size_bytes},
            )
            return ImportResult(entry.lora, present)

    # --- with the lock held -------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}{LORA_SUFFIX}"

    def _remember(self, source: str, entry: _Entry) -> None:
        previous = self._sources.get(source)
        if previous is not None and previous in self._entries:
            with contextlib.suppress(ValueError):
                self._entries[previous].sources.remove(source)
        if source in entry.sources:
            entry.sources.remove(source)
        entry.sources.append(source)
        for forgotten in entry.sources[:-SOURCES_PER_FILE]:
            self._sources.pop(forgotten, None)
        del entry.sources[:-SOURCES_PER_FILE]
        self._sources[source] = entry.lora.name

    def _forget(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            for source in entry.sources:
                if self._sources.get(source) == name:
                    del self._sources[source]

    def _make_room(self, incoming: int) -> None:
        """Delete the least recently used files until `incoming` more bytes fit."""
        used = sum(entry.lora.size_bytes for entry in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda entry: entry.last_used):
            if used + incoming <= self.max_bytes:
                break
            self._path(entry.lora.name).unlink(missing_ok=True)
            self._forget(entry.lora.name)
            used -= entry.lora.size_bytes
            logger.info(
                "LoRA removed from the cache (least recently used)",
                extra={"lora": entry.lora.name, "bytes": entry.lora.size_bytes},
            )

    def _write_index(self) -> None:
        data = {
            "version": 1,
            "files": {
                name: {**asdict(entry.lora), "last_used": entry.last_used, "sources": entry.sources}
                for name, entry in self._entries.items()
            },
        }
        write_atomic(self.folder / INDEX_FILE, json.dumps(data, indent=1))

    def _read_index(self) -> dict[str, _Entry]:
        """The index, reconciled with the folder: entries whose file is gone are dropped,
        cached files the index lacks are hashed and described again, and temporary files
        an interrupted import left are deleted."""
        for leftover in self.folder.glob(f"{TEMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
        entries: dict[str, _Entry] = {}
        try:
            raw = json.loads((self.folder / INDEX_FILE).read_text())
            files = raw.get("files", {}) if isinstance(raw, dict) else {}
            for name, item in files.items():
                lora = ImportedLora(
                    name=str(item["name"]),
                    sha256=str(item["sha256"]),
                    size_bytes=int(item["size_bytes"]),
                    rank=int(item["rank"]),
                    format=str(item["format"]),
                )
                sources = [str(source) for source in item.get("sources", [])]
                entries[name] = _Entry(lora, float(item["last_used"]), sources)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning(
                "the LoRA cache index %s is unreadable (%s); rebuilding it from the files",
                self.folder / INDEX_FILE,
                error,
            )
            entries = {}
        entries = {name: e for name, e in entries.items() if self._path(name).is_file()}
        for path in sorted(self.folder.glob(f"{NAME_PREFIX}*{LORA_SUFFIX}")):
            name = path.name.removesuffix(LORA_SUFFIX)
            if name in entries:
                continue
            found = self._describe_existing(path)
            if found is not None:
                entries[name] = _Entry(found, path.stat().st_mtime)
        return entries

    def _describe_existing(self, path: Path) -> ImportedLora | None:
        """A cached file the index does not know, if its name matches its bytes and it is
        a LoRA this server applies; otherwise it is left alone and not counted."""
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(MAX_CHUNK_BYTES):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        name = path.name.removesuffix(LORA_SUFFIX)
        listing = describe(path, name, self.max_rank)
        if lora_name(sha256) != name or not isinstance(listing, LoraListing):
            logger.warning("%s in the LoRA cache is not an imported LoRA; ignoring it", path)
            return None
        return ImportedLora(name, sha256, path.stat().st_size, listing.rank, listing.format)


class PendingImport:
    """One import in progress: its bytes so far in a temporary file of the cache folder.

    Call `write` with each chunk, then `finish`; `discard` (safe to call at any time, and
    again) removes the temporary file of an import that did not finish.
    """

    def __init__(
        self, cache: LoraCache, source: str, size_bytes: int, out: BinaryIO, temp: Path
    ) -> None:
        self.cache = cache
        self.source = source
        self.size_bytes = size_bytes
        self.temp = temp
        self.received = 0
        self._out = out
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        """Append one chunk.

        Raises:
            ImportRefused: the chunk is empty or over 1 MiB, or the stream now carries more
                bytes than the header declared.
        """
        if not chunk:
            raise ImportRefused("chunk", "is empty; send the file's bytes in chunks of 1 to 1 MiB")
        if len(chunk) > MAX_CHUNK_BYTES:
            raise ImportRefused(
                "chunk",
                f"carries {len(chunk)} bytes; at most {MAX_CHUNK_BYTES} (1 MiB) per message",
            )
        self.received += len(chunk)
        if self.received > self.size_bytes:
            raise ImportRefused(
                "header.size_bytes",
                f"the header declared {self.size_bytes} bytes but the stream carries more; "
                "declare the file's exact size",
            )
        self._digest.update(chunk)
        self._out.write(chunk)

    def finish(self) -> ImportResult:
        """Check the whole file and store it in the cache (see the module docstring).

        Raises:
            ImportRefused: fewer bytes than declared, or not a LoRA this server applies
                (`content`, naming why).
        """
        self._out.close()
        if self.received != self.size_bytes:
            raise ImportRefused(
                "header.size_bytes",
                f"the header declared {self.size_bytes} bytes but the stream carried "
                f"{self.received}; declare the file's exact size and send all of it",
            )
        sha256 = self._digest.hexdigest()
        name = lora_name(sha256)
        problem = _layout_problem(self.temp)
        listing = describe(self.temp, name, self.cache.max_rank) if problem is None else problem
        if isinstance(listing, str):
            raise ImportRefused("content", f"not a LoRA this server applies: {listing}")
        return self.cache._store(self, sha256, listing)

    def discard(self) -> None:
        """Remove the temporary file (nothing happens once the import is stored)."""
        self._out.close()
        self.temp.unlink(missing_ok=True)


def _layout_problem(path: Path) -> str | None:
    """Why the file is not a complete safetensors file (header and data agree), or None."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            handle.keys()
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        return f"not a readable .safetensors file ({str(error)[:200]})"
    return None
