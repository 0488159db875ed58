"""The tasks clients run: make sure the server has a volume, run a job, and the jobs whose result
is a volume (an evidence map, the model's view) with its download.

All are generator tasks (see :mod:`.transport`), so the Slicer module runs them from its timer
and ``med3dvlm.connect`` runs them blocking, with the same code.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence

from ..volume import Volume
from ..server.protocol import (
    VOLUME_HEADER, digest_steps, header_text, inflate_steps, parse_header, raw_chunks, volume_from_bytes, voxel_bytes,
    wire_form,
)
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


def framing(region=None, window=None) -> dict:
    """The request fields of a region (two opposite RAS corners, mm) and a CT window (centre, width),
    those given."""
    fields = {"region": None if region is None else [list(corner) for corner in region],
              "window": None if window is None else list(window)}
    return {name: value for name, value in fields.items() if value is not None}


def explain(server: Server, digest: str, on_event: Callable[[dict], None], *, question: str | None = None,
            answer: str | None = None, history: Sequence[tuple[str, str]] = (), choices: Sequence[str] | None = None,
            region=None, window=None, method: str = "smoothgrad", samples: int = 8):
    """Task: POST /explain, then the map's download: the ``done`` event, its ``evidence["map"]`` the
    map as a Volume (absent when stopped)."""
    final = yield from job(server, "/explain", {
        "volume": digest, "question": question, "answer": answer, "history": [list(turn) for turn in history],
        "choices": list(choices) if choices else None, "method": method, "samples": samples,
        **framing(region, window)}, on_event)
    if "evidence" in final:
        final["evidence"]["map"] = yield from result_volume(server, final["evidence"]["map"])
    return final


def explain_score(server: Server, digests: Sequence[str], label: str, on_event: Callable[[dict], None], *,
                  sequences: Sequence[str] | None = None, region=None, method: str = "smoothgrad", samples: int = 8):
    """Task: POST /explain/score, then the maps' download: the ``done`` event, each
    ``evidence[sequence]["map"]`` a Volume."""
    final = yield from job(server, "/explain/score", {
        "volumes": list(digests), "sequences": list(sequences) if sequences else None, "label": label,
        "method": method, "samples": samples, **framing(region)}, on_event)
    for found in final.get("evidence", {}).values():
        found["map"] = yield from result_volume(server, found["map"])
    return final


def view(server: Server, digest: str, on_event: Callable[[dict], None], *, region=None, window=None):
    """Task: POST /view, then the input's download: the ``done`` event, its ``view["volume"]`` the
    model's input as a Volume placed over the scan."""
    final = yield from job(server, "/view", {"volume": digest, **framing(region, window)}, on_event)
    final["view"]["volume"] = yield from result_volume(server, final["view"]["volume"])
    return final


def result_volume(server: Server, digest: str):
    """Task: GET /results/{digest}: a volume the server made, deflated from a remote server, inflated
    and hashed a chunk at a time (a UI stays responsive) and checked against its digest."""
    response = yield from exchange(server, "GET", f"/results/{digest}",
                                   headers=[] if server.is_local else [("Accept-Encoding", "deflate")])
    if response.status != 200:
        raise response.error()
    try:
        header = parse_header(response.headers.get(VOLUME_HEADER.lower()))
        data = response.body
        if response.headers.get("content-encoding") == "deflate":
            data = yield from inflate_steps(data, voxel_bytes(header))
        if len(data) != voxel_bytes(header):
            raise ValueError(f"The result holds {len(data)} voxel bytes, but its header describes {voxel_bytes(header)}.")
    except ValueError as error:  # its sentence says what was wrong with it
        raise ServerError(str(error)) from None
    volume = volume_from_bytes(header, data)
    if (yield from digest_steps(volume)) != digest:
        raise ServerError(f"The server's result {digest} arrived corrupted; ask for it again.")
    return volume
