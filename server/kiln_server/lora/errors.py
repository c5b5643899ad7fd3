"""Errors of the LoRA library; each message names the file (or `loras`) and the reason."""

from __future__ import annotations


class LoraError(Exception):
    """A LoRA could not be used; `name` is the requested name or file, `reason` says why.

    The message is `loras: <name>: <reason>`, so a gRPC layer can pass it on as the
    violation of the `loras` field unchanged.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"loras: {name}: {reason}")
        self.name = name
        self.reason = reason


class LoraNotFound(LoraError):
    """The name is not a LoRA file of the configured folders (or is not a plain name)."""


class LoraRefused(LoraError):
    """The file exists but holds something Kiln does not apply (LoHa, LoKr, DoRA, a rank
    above the maximum, modules the model lacks, or no LoRA weights at all)."""


class StackFull(LoraError):
    """Every adapter slot holds an adapter the running batch uses; nothing can be evicted."""
