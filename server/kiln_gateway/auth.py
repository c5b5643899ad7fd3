"""Bearer-token authentication as Replicate does it: `Authorization: Bearer <token>`.

Tokens come from `KILN_API_TOKENS`. When none are configured the gateway only listens on
loopback (see `kiln gateway`) and every request is allowed. Replicate's older
`Authorization: Token <token>` scheme is accepted too.

`caller_owner` names who a request acts for, so uploaded files stay private to the token
that uploaded them: a one-way hash of the token (tokens are never stored), or "anonymous"
when authentication is off.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln_gateway.errors import ApiError
from kiln_gateway.state import GatewayState, gateway_state

__all__ = ["ANONYMOUS", "caller_owner", "owner_of", "require_token"]

ANONYMOUS = "anonymous"
"""The owner of every request while authentication is off."""

_bearer = HTTPBearer(auto_error=False, description="A token listed in KILN_API_TOKENS")


def _presented_token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return None


def _unauthenticated() -> ApiError:
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
    tokens = state.settings.tokens
    if not tokens:
        return
    presented = _presented_token(request)
    if presented is None:
        raise _unauthenticated()
    matched = False
    for token in tokens:  # compare with every token so timing does not reveal which matched
        matched |= hmac.compare_digest(presented.encode(), token.encode())
    if not matched:
        raise _unauthenticated()


def owner_of(token: str) -> str:
    """The owner id of a bearer token: 32 hex digits of a one-way hash, stable across runs."""
    return hashlib.sha256(f"kiln-gateway-owner:{token}".encode()).hexdigest()[:32]


async def caller_owner(
    request: Request,
    state: Annotated[GatewayState, Depends(gateway_state)],
    _authorized: Annotated[None, Depends(require_token)],
) -> str:
    """Dependency: the owner id the request acts for (after `require_token` let it in)."""
    presented = _presented_token(request)
    if not state.settings.tokens or presented is None:
        return ANONYMOUS
    return owner_of(presented)
