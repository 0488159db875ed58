"""Bearer-token check for every endpoint but /health, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


async def require_token(request: Request) -> None:
    expected = request.app.state.config.token
    if expected is None:  # loopback server started without a token
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(401, "This server needs its access token: pass token=... to med3dvlm.connect, "
                                 "--token-file to the CLI, or set it in the Slicer module's server settings.",
                            headers={"WWW-Authenticate": "Bearer"})
