"""Server settings: where it listens, who may call it, and what it accepts."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..wire import is_loopback

MiB = 1 << 20
TOKEN_ENV = "MED3DVLM_TOKEN"


@dataclass(frozen=True)
class ServerConfig:
    token: str | None = None               # bearer token; None only on a loopback bind
    max_volume_bytes: int = 2048 * MiB     # voxel bytes of one volume, after decompression
    max_request_bytes: int = 1 * MiB       # any other request body (questions, settings)
    max_stored_bytes: int = 8192 * MiB     # uploaded volumes kept, least recently used dropped first
    max_result_bytes: int = 2048 * MiB     # evidence maps and model views awaiting download, likewise
    max_waiting: int = 32                  # jobs in line behind the running one
    allowed_folder: Path | None = None     # the one server-side folder clients may name files in


def human_size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / MiB:.1f} MiB"


def resolve_token(host: str, token_file: str | None = None) -> tuple[str | None, bool]:
    """The bearer token from ``token_file`` or $MED3DVLM_TOKEN; on a non-loopback bind without
    either, a new random one. Returns (token, generated): a generated token is printed once."""
    if token_file:
        token = Path(token_file).expanduser().read_text().strip()
        if len(token) < 16:
            raise ValueError(f"The token in {token_file} is shorter than 16 characters; use a long random one "
                             "(python -c 'import secrets; print(secrets.token_urlsafe(32))').")
        return token, False
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(32), True
    return token, False
