"""What ListModels reports about a model's LoRA files, read from their headers only.

A .safetensors file starts with an 8-byte little-endian header length and a JSON header
naming every tensor with its shape; the rank and source format of a LoRA are visible there,
so listing reads no tensor data. Results are cached per file by (size, mtime), so a
listing after the first costs one `stat` per file. Files Kiln would not apply (LoHa, LoKr,
DoRA, no LoRA weights, a rank above the maximum, unreadable) are left out, with one
warning per file version naming the file and why.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln_server.lora.errors import LoraNotFound
from kiln_server.lora.folders import LORA_SUFFIX, LoraFolders
from kiln_server.lora.reading import KOHYA_PREFIXES, refused_kind

logger = logging.getLogger(__name__)

# The safetensors format caps its header at 100 MB; LoRA headers are far smaller.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Key endings of a LoRA's down (A) weight, whose first dimension is the rank: PEFT
# (`lora_A.weight`), diffusers (`lora.down.weight`, `lora_linear_layer.down.weight`) and
# kohya (`lora_down.weight`).
_DOWN_SUFFIXES = ("lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight")
_KOHYA_DOWN = "lora_down.weight"


@dataclass(frozen=True)
class LoraListing:
    """One LoRA a model can apply: its request name, highest rank and source format."""

    name: str
    rank: int
    format: str


class HeaderError(ValueError):
    """The file is not a readable .safetensors file."""


def read_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the file's safetensors header (no tensor data is read)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise HeaderError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= MAX_HEADER_BYTES:
            raise HeaderError(f"its header length {length} is not a safetensors header's")
        raw = handle.read(length)
    if len(raw) != length:
        raise HeaderError("its header is cut short")
    try:
        header = json.loads(raw)
    except ValueError:
        raise HeaderError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise HeaderError("its header is not a JSON object")
    shapes: dict[str, list[int]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise HeaderError(f"tensor {key[:120]!r} has no shape in the header")
        shapes[key] = shape
    return shapes


def describe(path: Path, name: str, max_rank: int) -> LoraListing | str:
    """The listing of the LoRA file at `path`, or why it is left out."""
    try:
        shapes = read_header(path)
    except (OSError, HeaderError) as error:
        return f"not a readable .safetensors file ({error})"
    keys = list(shapes)
    if not keys:
        return "the file holds no tensors"
    kind = refused_kind(keys)
    if kind is not None:
        return f"it is a {kind} file; only plain LoRA files are applied"
    ranks = [
        shape[0]
        for key, shape in shapes.items()
        if shape and (key.endswith(_DOWN_SUFFIXES) or key.endswith(_KOHYA_DOWN))
    ]
    if not ranks:
        return "the file holds no LoRA weights"
    rank = max(ranks)
    if rank > max_rank:
        return f"its rank {rank} is above the maximum LoRA rank {max_rank}"
    kohya = all(key.startswith(KOHYA_PREFIXES) for key in keys)
    return LoraListing(name=name, rank=rank, format="kohya" if kohya else "diffusers")


class LoraCatalog:
    """The LoRAs of sets of folders, described from headers and cached per file version."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self._cache: dict[Path, tuple[tuple[int, int], LoraListing | str]] = {}
        self._lock = threading.Lock()

    def _entry(self, path: Path, name: str) -> LoraListing | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        version = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == version:
            result = cached[1]
        else:
            result = describe(path, name, self.max_rank)
            with self._lock:
                self._cache[path] = (version, result)
            if isinstance(result, str):
                logger.warning("LoRA file %s is not listed: %s", path, result)
        return result if isinstance(result, LoraListing) else None

    def list(self, folders: Sequence[Path]) -> list[LoraListing]:
        """Every LoRA of `folders` Kiln applies, by name; the first folder holding a name
        wins, as in `LoraFolders.resolve`."""
        resolver = LoraFolders.of(folders)
        found: dict[str, LoraListing] = {}
        for folder in resolver.folders:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if not entry.name.endswith(LORA_SUFFIX) or entry.name.startswith("."):
                    continue
                name = entry.name[: -len(LORA_SUFFIX)]
                if name in found:
                    continue
                try:
                    path = resolver.resolve(entry.name)
                except LoraNotFound:
                    continue
                if path.parent != entry.parent.resolve():
                    continue  # an earlier folder holds the name; it was listed from there
                listing = self._entry(path, name)
                if listing is not None:
                    found[name] = listing
        return [found[name] for name in sorted(found)]
