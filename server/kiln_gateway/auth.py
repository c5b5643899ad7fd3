"""Bearer-token authentication as Replicate does it: `Authorization: Bearer <token>`.

Tokens come from `KILN_API_TOKENS`. When none are configured the gateway only listens on
loopback (see `kiln gateway`) and every request is allowed. Replicate's older
`Authorization: Token <token>` scheme is accepted too.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln_gateway.errors import ApiError
from kiln_gateway.state import GatewayState, gateway_state

__all__ = ["require_token"]

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
