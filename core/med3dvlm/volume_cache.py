"""What is remembered about volumes, by content digest (:func:`med3dvlm.wire.volume_digest`, the
name the model server gives a volume): which volumes were met before, so that a follow-up does not
read and hash one again (:class:`KnownVolumes`), and the image tokens of the latest (:class:`Recent`,
the pipeline's token cache). No torch here: clients and the Slicer module use it too.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np

from .readers import file_version
from .volume import Volume
from .wire import volume_digest


class Recent:
    """The ``size`` most recently used entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, value: Any) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class Identity(NamedTuple):
    """How a volume is recognised without reading it: ``key``, and the objects it stands for (held
    by weak reference, so that a new object at a reused address is not taken for an old one)."""

    key: Hashable
    referents: tuple = ()


def _frozen(array: np.ndarray) -> bool:
    """Voxels that cannot change: the array and every array it views are read-only (the model
    server's uploads, views of immutable bytes); a writable array may change in place."""
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return False
        array = array.base
    return True


def identity(volume) -> Identity | None:
    """A file by (path, size, modification time), a Volume with frozen voxels by the objects
    themselves; None for anything else (hashed each time: its voxels may change in place)."""
    if isinstance(volume, (str, os.PathLike)):
        file = file_version(volume)
        return None if file is None else Identity(("file", *file))
    if isinstance(volume, Volume) and _frozen(volume.array):
        return Identity(("volume", id(volume), id(volume.array), volume.modality, volume.sequence,
                         volume.affine.tobytes()), (volume, volume.array))
    return None


class KnownVolumes:
    """Digests of volumes met before, by :class:`Identity` (thread-safe: the model server records
    its uploads from request threads while its job thread looks them up)."""

    def __init__(self, size: int = 1024) -> None:
        self._digests = Recent(size)
        self._lock = threading.Lock()

    def get(self, known: Identity | None) -> str | None:
        if known is None:
            return None
        with self._lock:
            entry = self._digests.get(known.key)
        if entry is None or any(ref() is not obj for ref, obj in zip(entry[1], known.referents)):
            return None
        return entry[0]

    def put(self, known: Identity | None, digest: str) -> None:
        if known is not None:
            with self._lock:
                self._digests.put(known.key, (digest, tuple(weakref.ref(obj) for obj in known.referents)))

    def digest(self, volume, read: Callable[[Any], Volume]) -> tuple[str, Volume | None]:
        """The volume's digest, remembered or computed; and the volume if it had to be read for it
        (``read(volume)``: a file path, an array pair... as a Volume)."""
        known = identity(volume)
        digest = self.get(known)
        if digest is not None:
            return digest, None
        loaded = read(volume)
        digest = volume_digest(loaded)
        self.put(known, digest)
        return digest, loaded


known_volumes = KnownVolumes()  # this process's: facts about files and frozen volumes hold for every reader
