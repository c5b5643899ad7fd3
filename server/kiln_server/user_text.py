"""User input quoted back in error texts and logs, cut short.

An error that echoes a field whole lets one request make every error text (and gRPC
status, with its metadata limit) as long as it likes; a short prefix names the value well
enough.
"""

from __future__ import annotations

ECHO_LIMIT = 64


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def quoted(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` shortened and quoted as repr() quotes it, for error messages."""
    return repr(shorten(text, limit))
