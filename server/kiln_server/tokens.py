"""Accepted API tokens, shared by `kiln serve` and `kiln gateway`: entries, scopes, matching.

One entry syntax everywhere (`KILN_API_TOKENS`, comma-separated; a token file, one entry
per line; a config file's `api_tokens` list):

- `TOKEN` has the scope `generate`;
- `TOKEN:SCOPE[+SCOPE...]` has exactly the scopes listed, from `generate` and `admin`
  (e.g. `TOKEN:admin`, `TOKEN:generate+admin`). Scopes follow the token's last `:`, so a
  token that itself holds a `:` is written with its scopes (`a:b:generate`).

A token is visible ASCII without spaces or commas. An entry repeated for one token adds its
scopes to the token's. What each scope allows is the service's to say: on the gRPC server
Generate and ListModels need `generate` and every other method (the admin RPCs) needs
`admin`; on the gateway any accepted token may create predictions and see its own, and
`admin` also sees and cancels everyone's (so `TOKEN:admin` keeps its old meaning there).

Tokens are secrets: no error message here shows an entry, and a token is identified in logs
only by `ApiToken.fingerprint`, a prefix of a one-way hash. Nothing heavy is imported here, so
the gateway stays light.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kiln_server.config_file import SettingsError

__all__ = [
    "ADMIN",
    "GENERATE",
    "SCOPES",
    "ApiToken",
    "bearer_token",
    "is_loopback",
    "matching_token",
    "merge_tokens",
    "parse_token_entries",
    "read_token_file",
]

GENERATE = "generate"
"""Scope to generate (and list models, which a generating client needs)."""
ADMIN = "admin"
"""Scope for administration: the server's admin RPCs; every prediction on the gateway."""
SCOPES = (GENERATE, ADMIN)
"""Every scope an entry may list."""

ENTRY_SYNTAX = (
    f"write TOKEN or TOKEN:{ADMIN}, or TOKEN:SCOPE+SCOPE with the scopes {GENERATE} and "
    f"{ADMIN} (scopes follow the token's last ':'; a token is visible ASCII without spaces "
    "or commas)"
)


@dataclass(frozen=True)
class ApiToken:
    """One accepted bearer token and the scopes it grants."""

    secret: str = field(repr=False)
    scopes: frozenset[str] = frozenset({GENERATE})

    def allows(self, scope: str) -> bool:
        """True when this token has `scope`."""
        return scope in self.scopes

    @cached_property
    def fingerprint(self) -> str:
        """12 hex digits of a one-way hash of the token: safe to log, stable across runs."""
        return hashlib.sha256(f"kiln-token:{self.secret}".encode()).hexdigest()[:12]

    @cached_property
    def _digest(self) -> bytes:
        return hashlib.sha256(self.secret.encode()).digest()


def _parse_entry(entry: str, where: str) -> ApiToken:
    token, colon, scope_text = entry.rpartition(":")
    if not colon:
        token, scope_text = entry, GENERATE
    scopes = scope_text.split("+")
    valid = (
        token
        and all(scope in SCOPES for scope in scopes)
        and all("!" <= char <= "~" and char != "," for char in token)
    )
    if not valid:
        # The entry is a secret (or part of one): never shown, only its position.
        raise SettingsError(f"{where}: {ENTRY_SYNTAX}")
    return ApiToken(token, frozenset(scopes))


def merge_tokens(tokens: Iterable[ApiToken]) -> tuple[ApiToken, ...]:
    """One ApiToken per secret, with the union of the scopes its entries gave, first-seen order."""
    merged: dict[str, frozenset[str]] = {}
    for token in tokens:
        merged[token.secret] = merged.get(token.secret, frozenset()) | token.scopes
    return tuple(ApiToken(secret, scopes) for secret, scopes in merged.items())


def parse_token_entries(entries: str | Sequence[str], source: str) -> tuple[ApiToken, ...]:
    """Tokens from comma-separated text or a list of entries; blank entries are skipped.

    Raises:
        SettingsError: naming `source` and the entry's position (never the entry itself).
    """
    items = entries.split(",") if isinstance(entries, str) else list(entries)
    texts = [str(item).strip() for item in items if str(item).strip()]
    return merge_tokens(
        _parse_entry(text, f"{source} entry {position}")
        for position, text in enumerate(texts, start=1)
    )


def read_token_file(path: Path) -> tuple[ApiToken, ...]:
    """Tokens from a file: one entry per line; blank lines and `#` comments are skipped.

    A comment is a line starting with `#`, or the rest of a line after whitespace and `#`.

    Raises:
        SettingsError: the file is missing or unreadable, or a line is not an entry (named by
            its line number, never its text).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise SettingsError(
            f"API token file {path} does not exist: create it (one token per line) or "
            "point --api-tokens-file at it"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SettingsError(
            f"cannot read API token file {path} ({reason}): make it a readable text file"
        ) from error
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split(" #")[0].split("\t#")[0].strip()
        if entry and not entry.startswith("#"):
            tokens.append(_parse_entry(entry, f"API token file {path} line {number}"))
    return merge_tokens(tokens)


def bearer_token(authorization: str, schemes: Sequence[str] = ("bearer",)) -> str | None:
    """The token of an `authorization` value `SCHEME TOKEN` (scheme any case), or None."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() in schemes and value.strip():
        return value.strip()
    return None


def matching_token(presented: str, tokens: Iterable[ApiToken]) -> ApiToken | None:
    """The accepted token equal to `presented`, or None, in constant time.

    Hashes are compared, and with every token, so the time taken reveals neither which token
    matched nor any token's length.
    """
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for token in tokens:
        if hmac.compare_digest(digest, token._digest):
            found = token
    return found


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): where serving without
    tokens is allowed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
