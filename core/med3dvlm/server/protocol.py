"""What the model server and its clients agree on: how a volume travels and how a job answers.

A volume travels once. Its header (shape, dtype, memory order, affine, modality, sequence: no
names, no patient data) goes as JSON in the ``X-Med3DVLM-Volume`` request header, its voxels as
the raw bytes of the array in memory order, deflated for a remote server. Both sides name the
volume by the same content digest, so a client that sent a volume once sends only its digest
afterwards. Jobs answer with newline-delimited JSON events (``application/x-ndjson``):
``queued`` (place in line), ``status`` (loading, encoding, generating), ``token``, then one
``done`` (the result) or ``error`` (one sentence). This module imports numpy only: the Slicer
side uses it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

from ..volume import MODALITIES, MR_SEQUENCES, Volume

VOLUME_HEADER = "X-Med3DVLM-Volume"
EVENTS_MEDIA_TYPE = "application/x-ndjson"
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
CHUNK = 1 << 20  # bytes hashed or deflated per step: ~1 ms, so a UI can interleave its own work
DIGEST_LENGTH = 32  # hex characters (BLAKE2b, 16 bytes)


def wire_form(volume: Volume) -> tuple[dict[str, Any], np.ndarray]:
    """The volume's header and its voxels as a contiguous little-endian array (no copy when the
    array already is contiguous, as arrays from nibabel and from Slicer nodes are)."""
    array = volume.array
    if array.dtype.name not in DTYPES:  # bool, float16, int64...: the nearest type the server accepts
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    fortran = not array.flags.c_contiguous
    header = {"shape": [int(d) for d in array.shape], "dtype": array.dtype.name, "fortran_order": fortran,
              "affine": np.asarray(volume.affine, dtype=np.float64).tolist(), "modality": volume.modality,
              "sequence": volume.sequence}
    return header, array


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
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"The volume header is not valid JSON with shape, dtype, fortran_order, affine, "
                         f"modality and sequence ({error}).") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"The volume header's shape {shape} is not that of a 3D volume.")
    if parsed["dtype"] not in DTYPES:
        raise ValueError(f"Voxel type {parsed['dtype']!r} is not accepted; send one of {', '.join(DTYPES)}.")
    if affine.shape != (4, 4):
        raise ValueError("The volume header's affine is not a 4 x 4 matrix.")
    if parsed["modality"] not in MODALITIES or parsed["sequence"] not in (None, *MR_SEQUENCES):
        raise ValueError("The volume header's modality or sequence is unknown.")
    return parsed


def voxel_bytes(header: dict[str, Any]) -> int:
    return int(np.prod(header["shape"], dtype=np.int64)) * np.dtype(header["dtype"]).itemsize


def volume_from_bytes(header: dict[str, Any], data: bytes | bytearray) -> Volume:
    array = np.frombuffer(data, dtype=np.dtype(header["dtype"]).newbyteorder("<"))
    array = array.reshape(header["shape"], order="F" if header["fortran_order"] else "C")
    return Volume(array, np.asarray(header["affine"]), modality=header["modality"], sequence=header["sequence"])


def raw_chunks(array: np.ndarray) -> Iterator[memoryview]:
    """The array's bytes in memory order, CHUNK at a time, without copying."""
    flat = memoryview(array.reshape(-1, order="A")).cast("B")
    for start in range(0, len(flat), CHUNK):
        yield flat[start:start + CHUNK]


def digest_steps(volume: Volume):
    """Generator form of :func:`volume_digest`: yields None after each chunk (so that a UI timer can
    spread the work over its ticks) and returns the digest."""
    header, array = wire_form(volume)
    hasher = hashlib.blake2b(digest_size=DIGEST_LENGTH // 2, person=b"med3dvlm-vol1")
    hasher.update(header_text(header).encode())
    for chunk in raw_chunks(array):
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
