"""Bearer-token authentication as Replicate does it: `Authorization: Bearer <token>`.

Tokens come from `KILN_API_TOKENS`, comma-separated entries in the syntax of
`kiln_server.tokens` (shared with `kiln serve`); every accepted token may use the API, and
the `admin` scope (`TOKEN:admin`) also sees every prediction. When none are configured the
gateway only listens on loopback (see `kiln gateway`) and every request is allowed.
Replicate's older `Authorization: Token <token>` scheme is accepted too.

The token is checked by `kiln_gateway.guard` before a request's body is read; the
dependencies here say who the request acts for. `caller_owner` is a one-way hash of the
token (tokens are never stored), or "anonymous" when authentication is off: predictions
and uploaded files belong to it, and another token gets 404 for them. An admin token sees,
lists and cancels every prediction (its uploaded files stay its own).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln_gateway.errors import ApiError
from kiln_gateway.settings import GatewaySettings
from kiln_gateway.state import GatewayState, gateway_state
from kiln_server.tokens import ADMIN, bearer_token, matching_token

__all__ = [
    "ANONYMOUS",
    "Caller",
    "caller",
    "caller_owner",
    "owner_of",
    "presented_token",
    "require_token",
    "token_accepted",
    "unauthenticated",
]

ANONYMOUS = "anonymous"
"""The owner of every request while authentication is off."""

_bearer = HTTPBearer(auto_error=False, description="A token listed in KILN_API_TOKENS")


@dataclass(frozen=True)
class Caller:
    """Who a request acts for."""

    owner: str
    """`owner_of(token)`, or ANONYMOUS when authentication is off."""
    admin: bool
    """The token has the admin scope (or authentication is off): it sees everything."""

    @property
    def sees(self) -> str | None:
        """The owner whose predictions this caller sees; None for all of them."""
        return None if self.admin else self.owner


def presented_token(authorization: str) -> str | None:
    """The token of an `Authorization` header value (`Bearer` or `Token` scheme), or None."""
    return bearer_token(authorization, ("bearer", "token"))


def token_accepted(settings: GatewaySettings, authorization: str) -> bool:
    """True when auth is off or the header carries a configured token."""
    if not settings.tokens:
        return True
    presented = presented_token(authorization)
    return presented is not None and matching_token(presented, settings.api_tokens) is not None


def unauthenticated() -> ApiError:
    """The 401 for a missing or wrong token, as Replicate words it."""
    return ApiError(
        401,
        "Unauthenticated",
        "You did not pass a valid authentication token",
        headers={"WWW-Authenticate": 'Bearer realm="kiln"'},
    )


async def require_token(
    request: Request,
    state: Annotated[GatewayState, Depends(gateway_state)],
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Dependency: pass when auth is off or the request carries a configured token; else 401."""
    if not token_accepted(state.settings, request.headers.get("authorization", "")):
        raise unauthenticated()


def owner_of(token: str) -> str:
    """The owner id of a bearer token: 32 hex digits of a one-way hash, stable across runs."""
    return hashlib.sha256(f"kiln-gateway-owner:{token}".encode()).hexdigest()[:32]


async def caller(
    request: Request,
    state: Annotated[GatewayState, Depends(gateway_state)],
    _authorized: Annotated[None, Depends(require_token)],
) -> Caller:
    """Dependency: who the request acts for (after `require_token` let it in)."""
    settings = state.settings
    presented = presented_token(request.headers.get("authorization", ""))
    if not settings.tokens or presented is None:
        return Caller(ANONYMOUS, admin=True)
    token = matching_token(presented, settings.api_tokens)
    return Caller(owner_of(presented), admin=token is not None and token.allows(ADMIN))


async def caller_owner(who: Annotated[Caller, Depends(caller)]) -> str:
    """Dependency: the owner id the request acts for (uploaded files belong to it)."""
    return who.owner
