"""Resolving a requested LoRA name to a file of the configured LoRA folders.

A request names a LoRA by its file name only (`style` or `style.safetensors`). The
resolver never builds a path from anything else: a name with a path separator, `..`, a NUL
or a leading dot is refused before any file system call, and a candidate whose real path
(symlinks followed) leaves its folder is refused too, so no file outside the folders is
ever opened.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln_server.lora.errors import LoraNotFound

LORA_SUFFIX = ".safetensors"
_MAX_NAME_LENGTH = 255


def _shown(name: str) -> str:
    """The name as it may appear in an error: printable and cut short."""
    text = name.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class LoraFolders:
    """The folders LoRA names are looked up in, searched in order."""

    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders: Sequence[Path | str]) -> LoraFolders:
        """Folders from configuration values (strings or paths)."""
        return cls(tuple(Path(folder) for folder in folders))

    def file_name(self, name: str) -> str:
        """The file name `name` stands for, or `LoraNotFound` when it is not a plain name.

        `name` may omit the `.safetensors` suffix. Only the name is checked here; nothing
        on disk is touched.
        """
        if not name or len(name) > _MAX_NAME_LENGTH:
            raise LoraNotFound(_shown(name) or "''", "a LoRA name must be 1 to 255 characters")
        separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
        if any(sep in name for sep in separators) or "\x00" in name:
            raise LoraNotFound(
                _shown(name), "a LoRA is named by its file name only, without a path separator"
            )
        if ".." in name or name.startswith("."):
            raise LoraNotFound(_shown(name), "a LoRA name may not contain '..' or start with '.'")
        return name if name.endswith(LORA_SUFFIX) else name + LORA_SUFFIX

    def resolve(self, name: str) -> Path:
        """The path of LoRA `name`: a regular file directly inside one of the folders.

        Raises `LoraNotFound` (message naming `loras`, the name and why) when the name is
        not a plain file name, or no folder holds such a file.
        """
        file_name = self.file_name(name)
        for folder in self.folders:
            try:
                root = folder.resolve(strict=True)
            except OSError:
                continue
            candidate = root / file_name
            try:
                real = candidate.resolve(strict=True)
            except OSError:
                continue
            if real.parent != root:
                raise LoraNotFound(_shown(name), "the file links outside the LoRA folders")
            if real.is_file():
                return real
        raise LoraNotFound(_shown(name), "no such LoRA file in the configured LoRA folders")

    def names(self) -> list[str]:
        """The LoRA names the folders hold (file names without the suffix), sorted."""
        found: set[str] = set()
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.endswith(LORA_SUFFIX) and not entry.name.startswith("."):
                    try:
                        self.resolve(entry.name)
                    except LoraNotFound:
                        continue
                    found.add(entry.name[: -len(LORA_SUFFIX)])
        return sorted(found)
