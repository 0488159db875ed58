"""One task per endpoint of the model server, and :func:`send_volume` (a volume's digest, uploading
it unless the server has it). A job task (report, ask, detect, retrieve, explain, explain_score,
view) passes the job's ``queued``/``status``/``token`` events to ``on_event`` as they arrive and
returns its ``done`` event; an ``error`` event raises ServerError. A job whose result is a volume
(an evidence map, the model's view) downloads it too (:func:`result_volume`). Adding an endpoint:
its router in server/endpoints/, its task here.

All are generator tasks (see :mod:`.transport`), so the Slicer module runs them from its timer and
``med3dvlm.connect`` runs them blocking, with the same code.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

from ..errors import Med3DVLMError
from ..volume import Volume
from ..volume_cache import Identity, KnownVolumes, identity
from ..wire import (
    VOLUME_HEADER, FINAL_EVENTS, digest_steps, header_text, inflate_steps, parse_header, volume_from_bytes, voxel_bytes,
    wire_chunks, wire_header,
)
from .transport import ConnectionLost, Server, ServerError, exchange

JSON = [("Content-Type", "application/json")]
EventCallback = Callable[[dict], None]
READS = 3  # a volume that changes while it is sent is read again, at most this many times in all


class VolumeChanged(Med3DVLMError):
    """The volume changed while it was being sent (a Slicer node edited meanwhile)."""


class VolumeSource(Protocol):
    """Where :func:`send_volume` gets a volume. The voxels may be read in place (a Slicer node's
    buffer), a chunk at a time over many steps: ``check`` runs before each chunk."""

    def identity(self) -> Identity | None:
        """What the source holds now, known without reading it (KnownVolumes remembers its digest);
        None when it cannot be told (hashed each time)."""

    def read(self) -> Volume:
        """The volume as the source holds it now."""

    def check(self) -> None:
        """Raise VolumeChanged when the source no longer holds what ``read`` returned."""


class Loaded:
    """A file, Volume or (array, affine) pair that nothing changes while it is sent; ``read(volume)``
    makes it a Volume (reads a file) when first needed."""

    def __init__(self, volume, read: Callable[[object], Volume]) -> None:
        self._given, self._read, self._volume = volume, read, None
        self._identity = identity(volume)

    def identity(self) -> Identity | None:
        return self._identity

    def read(self) -> Volume:
        if self._volume is None:
            self._volume = self._read(self._given)
        return self._volume

    def check(self) -> None:
        pass


# ----- volumes ---------------------------------------------------------------------------------------
def send_volume(server: Server, source: VolumeSource, known: KnownVolumes, compress: bool | None = None):
    """Task: the digest the server knows the volume by, uploading it unless the server has it.

    A volume in ``known`` is not read or hashed again unless the server has dropped it. Voxels are
    deflated for a remote server (a little CPU for a lot less network) and sent as they are to a
    local one. Hashing, deflating and sending go a chunk at a time, so a UI stays responsive; a
    volume that changes meanwhile is read and hashed again, never sent stale."""
    for _ in range(READS):
        try:
            digest, hashed = yield from digest_of(source, known)
            if (yield from has_volume(server, digest)):
                return digest
            volume = source.read()
            if source.identity() != hashed:  # changed while the server was asked
                continue
            yield from upload_volume(server, digest, volume, source.check, compress)
            return digest
        except VolumeChanged:
            pass
    raise VolumeChanged("The volume kept changing while it was being sent to the model server; "
                        "ask again once it has stopped changing.")


def digest_of(source: VolumeSource, known: KnownVolumes):
    """Task: the digest of what the source holds now, remembered in ``known`` or hashed a chunk at
    a time (and remembered); returns (digest, the source's identity it belongs to)."""
    hashed = source.identity()
    digest = known.get(hashed)
    if digest is None:
        digest = yield from digest_steps(source.read(), source.check)
        known.put(hashed, digest)
    return digest, hashed


def has_volume(server: Server, digest: str):
    """Task: GET /volumes/{digest}: whether the server has the volume."""
    response = yield from exchange(server, "GET", f"/volumes/{digest}")
    if response.status not in (200, 404):
        raise response.error()
    return response.status == 200


def upload_volume(server: Server, digest: str, volume: Volume, check: Callable[[], None] = lambda: None,
                  compress: bool | None = None):
    """Task: PUT /volumes/{digest}. Each chunk is copied as it is sent, right after ``check``, so the
    server never gets bytes of two versions of the volume."""
    header = wire_header(volume)
    headers = [(VOLUME_HEADER, header_text(header)), ("Content-Type", "application/octet-stream")]
    if not server.is_local if compress is None else compress:
        deflater, pieces = zlib.compressobj(1), []
        for chunk in wire_chunks(volume, check):
            pieces.append(deflater.compress(chunk))
            yield None
        pieces.append(deflater.flush())
        headers.append(("Content-Encoding", "deflate"))
        body, length = (check() or piece for piece in pieces), sum(map(len, pieces))
    else:
        body, length = (bytes(chunk) for chunk in wire_chunks(volume, check)), voxel_bytes(header)
    response = yield from exchange(server, "PUT", f"/volumes/{digest}", headers=headers, body=body, length=length)
    if response.status != 201:
        raise response.error()


def volume_from_path(server: Server, path: str):
    """Task: POST /volumes/from-path: the digest of a file the server reads from its allowed folder."""
    return (yield from _post_json(server, "/volumes/from-path", {"path": path}))["digest"]


# ----- jobs --------------------------------------------------------------------------------------------
def framing(region=None, window=None) -> dict:
    """The request fields of a region (two opposite corners in RAS mm: only that box of the volume
    is shown to the model) and a CT window (centre, width), those given."""
    fields = {"region": None if region is None else [list(corner) for corner in region],
              "window": None if window is None else list(window)}
    return {name: value for name, value in fields.items() if value is not None}


def report(server: Server, digest: str, on_event: EventCallback, *, instruction: str | None = None,
           generation: dict | None = None, region=None, window=None):
    """Task: POST /report: a report of the volume (or of ``region``, in ``window``), its tokens streamed."""
    body = {"volume": digest, "generation": generation or {}, **framing(region, window)}
    if instruction is not None:
        body["instruction"] = instruction
    return (yield from _job(server, "/report", body, on_event))


def ask(server: Server, digest: str, question: str, on_event: EventCallback, *,
        history: Sequence[tuple[str, str]] = (), choices: Sequence[str] | None = None, generation: dict | None = None,
        region=None, window=None):
    """Task: POST /ask: an answer about the volume (or ``region``, in ``window``) given earlier
    (question, answer) turns, streamed."""
    return (yield from _job(server, "/ask", {"volume": digest, "question": question,
                                              "history": [list(turn) for turn in history],
                                              "choices": list(choices) if choices else None,
                                              "generation": generation or {}, **framing(region, window)}, on_event))


def detect(server: Server, digests: Sequence[str], on_event: EventCallback, *, sequences: Sequence[str] | None = None,
           region=None):
    """Task: POST /detect: MRI abnormality scores for a volume or a study (each volume's sequence, in
    order), or for ``region`` of it."""
    return (yield from _job(server, "/detect", {"volumes": list(digests),
                                                 "sequences": list(sequences) if sequences else None,
                                                 **framing(region)}, on_event))


def retrieve(server: Server, digest: str, texts: Sequence[str], on_event: EventCallback):
    """Task: POST /retrieve: the texts ranked for the volume."""
    return (yield from _job(server, "/retrieve", {"volume": digest, "texts": list(texts)}, on_event))


def explain(server: Server, digest: str, on_event: EventCallback, *, question: str | None = None,
            answer: str | None = None, history: Sequence[tuple[str, str]] = (), choices: Sequence[str] | None = None,
            region=None, window=None, method: str = "smoothgrad", samples: int = 8):
    """Task: POST /explain, then the map's download: the ``done`` event, in which ``evidence["map"]``
    is the evidence map as a Volume (no ``evidence`` when stopped). ``question`` None: the report;
    ``answer`` None: the model's own, generated first (its tokens streamed)."""
    final = yield from _job(server, "/explain", {
        "volume": digest, "question": question, "answer": answer, "history": [list(turn) for turn in history],
        "choices": list(choices) if choices else None, "method": method, "samples": samples,
        **framing(region, window)}, on_event)
    if "evidence" in final:
        final["evidence"]["map"] = yield from result_volume(server, final["evidence"]["map"])
    return final


def explain_score(server: Server, digests: Sequence[str], label: str, on_event: EventCallback, *,
                  sequences: Sequence[str] | None = None, region=None, method: str = "smoothgrad", samples: int = 8):
    """Task: POST /explain/score, then the maps' download: the ``done`` event, in which each
    ``evidence[sequence]["map"]`` is a Volume (no ``evidence`` when stopped)."""
    final = yield from _job(server, "/explain/score", {
        "volumes": list(digests), "sequences": list(sequences) if sequences else None, "label": label,
        "method": method, "samples": samples, **framing(region)}, on_event)
    for found in final.get("evidence", {}).values():
        found["map"] = yield from result_volume(server, found["map"])
    return final


def view(server: Server, digest: str, on_event: EventCallback, *, region=None, window=None):
    """Task: POST /view, then the input's download: the ``done`` event, in which ``view["volume"]`` is
    the model's input as a Volume placed over the scan."""
    final = yield from _job(server, "/view", {"volume": digest, **framing(region, window)}, on_event)
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
        data, expected = response.body, voxel_bytes(header)
        if response.headers.get("content-encoding") == "deflate":
            data = yield from inflate_steps(data, expected)
        if len(data) != expected:
            raise ValueError(f"The result holds {len(data)} voxel bytes, but its header describes {expected}.")
    except ValueError as error:  # its sentence says what was wrong with it
        raise ServerError(str(error)) from None
    volume = volume_from_bytes(header, data)
    if (yield from digest_steps(volume)) != digest:
        raise ServerError(f"The server's result {digest} arrived corrupted; ask for it again.")
    return volume


def cancel_job(server: Server, job_id: str):
    """Task: POST /jobs/{id}/cancel: ask the server to stop a job; True if it was still running or waiting."""
    response = yield from exchange(server, "POST", f"/jobs/{job_id}/cancel", headers=JSON, body=[b"{}"])
    return response.status == 200


def info(server: Server):
    """Task: GET /info: the server's model, device, precision, state (loading, ready, failed) and limits."""
    response = yield from exchange(server, "GET", "/info")
    if response.status != 200:
        raise response.error()
    return json.loads(response.body)


def _post_json(server: Server, path: str, body: dict):
    response = yield from exchange(server, "POST", path, headers=JSON, body=[json.dumps(body).encode()])
    if response.status != 200:
        raise response.error()
    return json.loads(response.body)


def _job(server: Server, path: str, body: dict, on_event: EventCallback):
    final: dict = {}

    def on_line(event: dict) -> None:
        if event.get("event") in FINAL_EVENTS:
            final.update(event)
        else:
            on_event(event)

    response = yield from exchange(server, "POST", path, headers=JSON, body=[json.dumps(body).encode()],
                                   on_line=on_line)
    if response.status != 200:
        raise response.error()
    if not final:
        raise ConnectionLost("The model server ended its answer early; it may have stopped.")
    if final["event"] == "error":
        raise ServerError(final["message"])
    return final
