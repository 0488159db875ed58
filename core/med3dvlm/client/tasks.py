"""The two tasks every client runs: make sure the server has a volume, and run a job.

Both are generator tasks (see :mod:`.transport`), so the Slicer module runs them from its timer
and ``med3dvlm.connect`` runs them blocking, with the same code.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

from ..volume import Volume
from ..server.protocol import VOLUME_HEADER, digest_steps, header_text, raw_chunks, wire_form
from .transport import ConnectionLost, Server, ServerError, exchange

JSON = [("Content-Type", "application/json")]


def ensure_volume(server: Server, get_volume: Callable[[], Volume], digest: str | None = None,
                  compress: bool | None = None):
    """Task: the volume's digest, uploading the volume unless the server has it already.

    ``get_volume`` is called only when needed: to compute an unknown digest, or to upload.
    Voxels are deflated for a remote server (a little CPU for a lot less network) and sent as they
    are to a local one; hashing and deflating go a chunk at a time, so a UI stays responsive."""
    volume = None
    if digest is None:
        volume = get_volume()
        digest = yield from digest_steps(volume)
    response = yield from exchange(server, "GET", f"/volumes/{digest}")
    if response.status == 200:
        return digest
    if response.status != 404:
        raise response.error()
    header, array = wire_form(volume if volume is not None else get_volume())
    headers = [(VOLUME_HEADER, header_text(header)), ("Content-Type", "application/octet-stream")]
    if not server.is_local if compress is None else compress:
        deflater, pieces = zlib.compressobj(1), []
        for chunk in raw_chunks(array):
            pieces.append(deflater.compress(chunk))
            yield None
        pieces.append(deflater.flush())
        headers.append(("Content-Encoding", "deflate"))
    else:
        pieces = list(raw_chunks(array))
    response = yield from exchange(server, "PUT", f"/volumes/{digest}", headers=headers, body=pieces)
    if response.status != 201:
        raise response.error()
    return digest


def job(server: Server, path: str, payload: dict, on_event: Callable[[dict], None]):
    """Task: POST a job, pass each ``queued``/``status``/``token`` event to ``on_event`` as it
    arrives, and return the ``done`` event; an ``error`` event raises ServerError."""
    final: dict = {}

    def on_line(event: dict) -> None:
        if event.get("event") in ("done", "error"):
            final.update(event)
        else:
            on_event(event)

    response = yield from exchange(server, "POST", path, headers=JSON, body=[json.dumps(payload).encode()],
                                   on_line=on_line)
    if response.status != 200:
        raise response.error()
    if not final:
        raise ConnectionLost("The model server ended its answer early; it may have stopped.")
    if final["event"] == "error":
        raise ServerError(final["message"])
    return final


def cancel_job(server: Server, job_id: str):
    """Task: ask the server to stop a job; True if it was still running or waiting."""
    response = yield from exchange(server, "POST", f"/jobs/{job_id}/cancel", headers=JSON, body=[b"{}"])
    return response.status == 200


def get_json(server: Server, path: str):
    """Task: GET a JSON document."""
    response = yield from exchange(server, "GET", path)
    if response.status != 200:
        raise response.error()
    return json.loads(response.body)
