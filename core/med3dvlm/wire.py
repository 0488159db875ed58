"""What the model server and its clients agree on: how a volume travels and how a job answers.
Both sides import this module and nothing else of each other.

A volume travels once. Its header (shape, dtype, memory order, affine, modality, sequence: no
names, no patient data) goes as JSON in the ``X-Med3DVLM-Volume`` request header, its voxels as
the raw bytes of the array in memory order, deflated for a remote server. Both sides name the
volume by the same content digest, so a client that sent a volume once sends only its digest
afterwards (the same digest keys the pipeline's token cache). Jobs answer with newline-delimited
JSON events (``application/x-ndjson``): ``queued`` (``id``, place in line), ``status`` (loading,
encoding, generating), ``token`` (``text``, ``n`` tokens so far), then one ``done`` (the result)
or ``error`` (one sentence). This module imports numpy only: the Slicer side uses it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np

from .volume import MODALITIES, MR_SEQUENCES, Volume

VOLUME_HEADER = "X-Med3DVLM-Volume"
EVENTS_MEDIA_TYPE = "application/x-ndjson"
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
CHUNK = 1 << 20  # bytes hashed or deflated per step: ~1 ms, so a UI can interleave its own work
DIGEST_LENGTH = 32  # hex characters (BLAKE2b, 16 bytes)
FINAL_EVENTS = ("done", "error")  # a job's last event
MAX_SIDE = 2**31 - 1  # VTK image extents are int: no Slicer volume is longer along any axis


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The type voxels travel as: their own (little-endian), or the nearest one the server accepts
    (bool, float16, int64...)."""
    if dtype.name not in DTYPES:
        dtype = np.dtype(np.float32 if dtype.kind == "f" else np.int32)
    return dtype.newbyteorder("<")


def wire_header(volume: Volume) -> dict[str, Any]:
    """The volume's header; its voxels travel in the memory order of its array (Fortran order for
    nibabel's arrays and Slicer's, which are read without copying)."""
    array = volume.array
    return {"shape": [int(d) for d in array.shape], "dtype": wire_dtype(array.dtype).name,
            "fortran_order": bool(array.flags.f_contiguous and not array.flags.c_contiguous),
            "affine": np.asarray(volume.affine, dtype=np.float64).tolist(), "modality": volume.modality,
            "sequence": volume.sequence}


def wire_chunks(volume: Volume, check: Callable[[], None] = lambda: None) -> Iterator[memoryview]:
    """The voxels' bytes as they travel (:func:`wire_header`'s type and order), about CHUNK at a time.
    A contiguous array of a type the server accepts is read in place; any other is converted a slab
    at a time, so that no step costs more than one chunk. ``check()`` runs before each chunk is
    read: it raises when the voxels may have changed under the reader (a Slicer node edited)."""
    array, header = volume.array, wire_header(volume)
    dtype, order = np.dtype(header["dtype"]).newbyteorder("<"), "F" if header["fortran_order"] else "C"
    if array.dtype == dtype and array.flags[f"{order}_CONTIGUOUS"]:
        flat = memoryview(array.reshape(-1, order=order)).cast("B")
        for start in range(0, len(flat), CHUNK):
            check()
            yield flat[start:start + CHUNK]
        return
    axis = array.ndim - 1 if order == "F" else 0  # the slowest axis in that order
    count = array.shape[axis]
    step = max(1, CHUNK * count // max(1, array.size * dtype.itemsize))  # slices per chunk
    for start in range(0, count, step):
        check()
        part = array[(slice(None),) * axis + (slice(start, start + step),)]
        yield memoryview(np.asarray(part, dtype=dtype, order=order).reshape(-1, order=order)).cast("B")


def header_text(header: dict[str, Any]) -> str:
    """Canonical JSON of a header: the digest covers exactly these bytes."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"))


def parse_header(text: str | None) -> dict[str, Any]:
    """A volume header from its JSON; ValueError with a sentence when it is not one."""
    if not text:
        raise ValueError(f"The upload has no {VOLUME_HEADER} header describing the volume.")
    try:
        header = json.loads(text)
        shape = [int(d) for d in header["shape"]]
        affine = np.asarray(header["affine"], dtype=np.float64)
        parsed = {"shape": shape, "dtype": str(header["dtype"]), "fortran_order": bool(header["fortran_order"]),
                  "affine": affine.tolist(), "modality": str(header["modality"]), "sequence": header["sequence"]}
    except (ValueError, KeyError, TypeError, OverflowError) as error:  # Overflow: infinite or huge numbers
        raise ValueError(f"The volume header is not valid JSON with shape, dtype, fortran_order, affine, "
                         f"modality and sequence ({error}).") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"The volume header's shape {shape} is not that of a 3D volume.")
    if max(shape) > MAX_SIDE:
        raise ValueError(f"The volume header's shape {shape} has a side of more than {MAX_SIDE} voxels; "
                         "no scanner makes such a volume.")
    if parsed["dtype"] not in DTYPES:
        raise ValueError(f"Voxel type {parsed['dtype']!r} is not accepted; send one of {', '.join(DTYPES)}.")
    if affine.shape != (4, 4):
        raise ValueError("The volume header's affine is not a 4 x 4 matrix.")
    if parsed["modality"] not in MODALITIES or parsed["sequence"] not in (None, *MR_SEQUENCES):
        raise ValueError("The volume header's modality or sequence is unknown.")
    return parsed


def voxel_bytes(header: dict[str, Any]) -> int:
    """Python integers: a numpy product of a sent shape would wrap around (2**64 voxels -> 0)."""
    return math.prod(header["shape"]) * np.dtype(header["dtype"]).itemsize


def volume_from_bytes(header: dict[str, Any], data: bytes | bytearray) -> Volume:
    array = np.frombuffer(data, dtype=np.dtype(header["dtype"]).newbyteorder("<"))
    array = array.reshape(header["shape"], order="F" if header["fortran_order"] else "C")
    return Volume(array, np.asarray(header["affine"]), modality=header["modality"], sequence=header["sequence"])


def digest_steps(volume: Volume, check: Callable[[], None] = lambda: None):
    """Generator form of :func:`volume_digest`: yields None after each chunk (so that a UI timer can
    spread the work over its ticks) and returns the digest; ``check`` as for :func:`wire_chunks`."""
    hasher = hashlib.blake2b(digest_size=DIGEST_LENGTH // 2, person=b"med3dvlm-vol1")
    hasher.update(header_text(wire_header(volume)).encode())
    for chunk in wire_chunks(volume, check):
        hasher.update(chunk)
        yield None
    return hasher.hexdigest()


def volume_digest(volume: Volume) -> str:
    return run_steps(digest_steps(volume))


def run_steps(steps: Generator[None, None, Any]) -> Any:
    """The value of a generator of steps (``digest_steps``, ``inflate_steps``), run to its end at once."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def inflate_steps(data: bytes, expected: int):
    """Generator: deflated voxels inflated a CHUNK of output per step (yields None), returned whole;
    ValueError with a sentence unless they are exactly ``expected`` bytes. Inflating stops soon
    after ``expected``, so a small body cannot expand into much more memory than it announced."""
    inflater, parts, size, pending = zlib.decompressobj(), [], 0, data
    try:
        while not inflater.eof and size <= expected:
            part = inflater.decompress(pending, CHUNK)
            pending = inflater.unconsumed_tail
            if not part and not pending:
                break  # the data ended before the deflate stream did
            parts.append(part)
            size += len(part)
            yield None
    except zlib.error:
        raise ValueError("The voxels are not valid deflate data; they were corrupted on the way.") from None
    if not inflater.eof or inflater.unused_data or size != expected:
        raise ValueError(f"The deflated voxels hold more or fewer than the {expected} bytes their header describes.")
    return b"".join(parts)


def is_digest(text: str) -> bool:
    return len(text) == DIGEST_LENGTH and all(c in "0123456789abcdef" for c in text)


def event_line(event: str, **fields: Any) -> bytes:
    return (json.dumps({"event": event, **fields}) + "\n").encode()
