"""The wire contract (med3dvlm.wire): how a volume travels between the Slicer module or
``med3dvlm.connect`` and the model server, and that it is all the two sides share."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from med3dvlm.volume import Volume
from med3dvlm.wire import CHUNK, volume_digest, volume_from_bytes, wire_chunks, wire_header

ROOT = Path(__file__).resolve().parents[1]
BASE = np.random.default_rng(0).integers(-1000, 1000, (128, 128, 40))


@pytest.mark.parametrize("array", [
    BASE.astype(np.int16), np.asfortranarray(BASE.astype(np.int16)),  # as they are: read in place
    BASE.astype(np.int64), np.asfortranarray(BASE.astype(np.float16)), BASE.astype(">i2"), BASE > 0,  # converted
    np.asfortranarray(BASE.astype(np.int32))[:, ::2, :],  # not contiguous
], ids=["int16", "int16-fortran", "int64", "float16-fortran", "big-endian", "bool", "strided"])
def test_any_volume_travels_a_chunk_at_a_time_and_arrives_as_it_was(array):
    volume = Volume.from_numpy(array, modality="CT")
    checks = []
    chunks = list(wire_chunks(volume, check=lambda: checks.append(1)))
    arrived = volume_from_bytes(wire_header(volume), b"".join(chunks))
    np.testing.assert_array_equal(arrived.array, array)
    assert len(chunks) > 1 and len(checks) == len(chunks)  # checked before each chunk is read
    assert max(len(chunk) for chunk in chunks) <= CHUNK  # no step converts more than a chunk
    in_place = array.dtype in (np.int16, np.float32) and (array.flags.c_contiguous or array.flags.f_contiguous)
    assert all(np.shares_memory(np.frombuffer(chunk, np.uint8), array) for chunk in chunks) == in_place


def test_the_digest_names_the_content_not_its_representation():
    as_int16 = Volume.from_numpy(BASE.astype(np.int16), modality="CT")
    assert volume_digest(Volume.from_numpy(BASE.astype(np.int32), modality="CT")) == \
        volume_digest(Volume.from_numpy(BASE.astype(np.int64), modality="CT"))  # int64 travels as int32
    assert volume_digest(as_int16) == volume_digest(Volume.from_numpy(BASE.astype(">i2"), modality="CT"))
    assert volume_digest(as_int16) != volume_digest(Volume.from_numpy(BASE.astype(np.int16), modality="MR"))
    shifted = BASE.astype(np.int16)
    shifted[0, 0, 0] += 1
    assert volume_digest(as_int16) != volume_digest(Volume.from_numpy(shifted, modality="CT"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT / "core").with_suffix("").parts[:-1]) if "core" in path.parts else ""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            names.add(".".join([*base, node.module or ""]).rstrip("."))
    return names


def test_client_and_server_share_only_the_wire_module():
    sides = {"client": list((ROOT / "core/med3dvlm/client").rglob("*.py")) + list((ROOT / "SlicerMed3DVLM").rglob("*.py")),
             "server": list((ROOT / "core/med3dvlm/server").rglob("*.py"))}
    for side, other in (("client", "server"), ("server", "client")):
        for path in sides[side]:
            crossing = {name for name in imported_modules(path) if name.startswith(f"med3dvlm.{other}")}
            assert not crossing, f"{path.relative_to(ROOT)} imports {crossing}"
