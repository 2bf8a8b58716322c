"""Who is asking: a designer's API token, as ``Authorization: Bearer TOKEN`` or the gallery's cookie.

Tokens come from the settings (``GENSHOP_API_TOKENS`` / ``GENSHOP_API_TOKENS_FILE``);
every token is compared in constant time. No token, or an unknown one, is 401. The check
is ``async`` because it does no I/O: FastAPI runs sync dependencies on its thread pool,
a hop per request that costs more than the check.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

TOKEN_COOKIE = "genshop_token"

bearer = HTTPBearer(auto_error=False, description="a designer's API token")
cookie = APIKeyCookie(name=TOKEN_COOKIE, auto_error=False, description="the gallery page keeps the token here")


def designer_for_token(tokens: dict[str, str], token: str) -> str | None:
    """The designer whose token this is; every token is compared, so timing tells nothing."""
    found = None
    for designer, expected in tokens.items():
        if hmac.compare_digest(expected.encode(), token.encode()):
            found = designer
    return found


async def current_designer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                     token_cookie: str | None = Depends(cookie)) -> str:
    token = credentials.credentials if credentials else token_cookie
    designer = designer_for_token(request.app.state.tokens, token) if token else None
    if designer is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid API token is required (Authorization: Bearer "
                            "TOKEN)", headers={"WWW-Authenticate": "Bearer"})
    return designer
