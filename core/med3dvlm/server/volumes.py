"""Volumes kept by content digest: uploads, so that follow-up requests send only the digest, and the
volumes jobs make (evidence maps, model views), until their clients download them."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..validation import validate_volume
from ..volume import Volume
from ..volume_cache import identity, known_volumes
from ..wire import inflate_steps, run_steps, volume_digest, volume_from_bytes, voxel_bytes


class UploadError(ValueError):
    """An upload that does not decode to the volume its header and digest describe (HTTP 400)."""


def decode_upload(digest: str, header: dict, body: bytes, encoding: str) -> Volume:
    """The volume of an upload, checked against its header and digest and validated as a model
    input (UploadError, VolumeError). Decompression stops soon after the size the header announces,
    so a small compressed body cannot expand into much more memory than the volume itself."""
    expected = voxel_bytes(header)
    if encoding == "deflate":
        try:
            data = run_steps(inflate_steps(body, expected))
        except ValueError as error:
            raise UploadError(str(error)) from None
    else:
        data = body
    if len(data) != expected:
        raise UploadError(f"The upload holds {len(data)} voxel bytes, but its header describes {expected}.")
    volume = volume_from_bytes(header, data)
    if volume_digest(volume) != digest:
        raise UploadError("The volume's content does not match its digest; the upload was corrupted.")
    volume.source = f"volume {digest[:8]}"  # names it in messages without any patient data
    validate_volume(volume)  # VolumeError: 2D, constant, NaN... refused at once, not at the first question
    known_volumes.put(identity(volume), digest)  # its voxels are frozen: the pipeline need not hash them again
    return volume


class VolumeStore:
    """Least recently used volumes beyond ``max_bytes`` are dropped (their clients upload again, or
    ask again for a result)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._volumes: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self.uploads = 0  # volumes stored, for operators and tests: a follow-up question adds none

    def put(self, digest: str, volume: Volume) -> None:
        with self._lock:
            self.uploads += 1
            self._volumes[digest] = volume
            self._volumes.move_to_end(digest)
            while len(self._volumes) > 1 and sum(v.array.nbytes for v in self._volumes.values()) > self.max_bytes:
                self._volumes.popitem(last=False)

    def get(self, digest: str) -> Volume | None:
        with self._lock:
            volume = self._volumes.get(digest)
            if volume is not None:
                self._volumes.move_to_end(digest)
            return volume

    def __len__(self) -> int:
        return len(self._volumes)

