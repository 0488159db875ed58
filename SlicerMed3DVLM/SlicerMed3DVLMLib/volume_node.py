"""vtkMRMLScalarVolumeNode -> med3dvlm ``Volume``, run on the main thread.

Slicer's voxel arrays are ordered [k, j, i] (VTK's x index varies fastest); ``Volume`` is
[i, j, k] with an affine from (i, j, k) to RAS, which is exactly the node's IJK-to-RAS matrix
(times its parent transform, when the volume is under a linear one). The voxels are not copied
(150 MB of a CT would hold the main thread for 30-60 ms): a ``Volume`` views Slicer's own buffer,
and :class:`NodeVolume` tells whether the node still holds what was read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from med3dvlm.client.tasks import VolumeChanged
from med3dvlm.errors import VolumeError
from med3dvlm.modality import guess_modality
from med3dvlm.validation import check_shape
from med3dvlm.volume import MR_SEQUENCES, Volume
from med3dvlm.volume_cache import Identity

# (SOP instance UID, DICOM tag "gggg,eeee") -> value; slicer.dicomDatabase.instanceValue in Slicer.
DicomLookup = Callable[[str, str], str]

MODALITY_ATTRIBUTE = "Med3DVLM.modality"  # set by a user to override the guess
SEQUENCE_ATTRIBUTE = "Med3DVLM.sequence"


def _matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    """The node's voxel-to-world (RAS) matrix, including a linear parent transform."""
    name = node.GetName()
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    affine = _matrix_to_numpy(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise VolumeError(f"Volume '{name}' is under a non-linear transform; harden or remove the "
                              "transform in the Transforms module first.")
        to_world = vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine = _matrix_to_numpy(to_world) @ affine
    return affine


def _scalars(node):
    image = node.GetImageData()
    return image.GetPointData().GetScalars() if image is not None else None


def volume_state(node) -> tuple:
    """Changes whenever what ``volume_from_node`` would return may change (voxels, geometry,
    attributes, parent transform): a key under which a conversion's result can be remembered.
    The voxel buffer's address and size are part of it: a buffer reallocated without a Modified
    event must never be read through an old view."""
    image, parent, scalars = node.GetImageData(), node.GetParentTransformNode(), _scalars(node)
    buffer = vtk_to_numpy(scalars) if scalars is not None else None
    return (node.GetID(), node.GetMTime(), image.GetMTime() if image is not None else 0,
            (buffer.ctypes.data, buffer.nbytes) if buffer is not None else None,
            parent.GetID() if parent is not None else None, parent.GetMTime() if parent is not None else 0)


def voxels(node) -> np.ndarray:
    """The voxels indexed [i, j, k]: a read-only view of Slicer's buffer (Fortran order)."""
    name = node.GetName()
    image = node.GetImageData()
    scalars = _scalars(node)
    if scalars is None:
        raise VolumeError(f"Volume '{name}' has no voxels loaded; load the image again.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise VolumeError(f"Volume '{name}' has {components} values per voxel (a color or vector image); "
                          "a grayscale CT or MRI volume is needed.")
    dims = image.GetDimensions()
    check_shape(f"Volume '{name}'", dims)
    ijk = vtk_to_numpy(scalars).reshape(dims[::-1]).transpose(2, 1, 0)
    ijk.flags.writeable = False  # a Volume must not write into the scene behind Slicer's back
    return ijk


def _split_camel_case(text: str) -> str:
    """'MRBrainTumor1' -> 'MR Brain Tumor1': Slicer's sample names glue the modality to the rest."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
    return re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", text)


def node_metadata(node, dicom_lookup: DicomLookup | None = None) -> dict[str, str]:
    """What is known about the image: its name, and DICOM header fields when it came from DICOM."""
    meta = {"description": _split_camel_case(node.GetName() or "")}
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids and dicom_lookup is not None:
        for tag, key in (("0008,0060", "Modality"), ("0008,103E", "SeriesDescription"), ("0018,1030", "ProtocolName")):
            meta[key] = dicom_lookup(uids[0], tag) or ""
    return {key: value for key, value in meta.items() if value}


def modality_and_sequence(node, meta: dict[str, str]) -> tuple[str, str | None]:
    """The user's attributes if set, else a guess from the metadata (DICOM header, node name)."""
    modality, sequence = guess_modality(meta)
    chosen = (node.GetAttribute(MODALITY_ATTRIBUTE) or "").strip().upper().replace("MRI", "MR")
    if chosen in ("CT", "MR") and chosen != modality:
        modality, sequence = chosen, None
    chosen_sequence = (node.GetAttribute(SEQUENCE_ATTRIBUTE) or "").strip().upper()
    if modality == "MR" and chosen_sequence in MR_SEQUENCES:
        sequence = chosen_sequence
    return modality, sequence


def volume_from_node(node, dicom_lookup: DicomLookup | None = None) -> Volume:
    """The selected volume as a ``Volume``; a clear ``VolumeError`` if it cannot be used."""
    if node is None:
        raise VolumeError("No volume is selected; load a CT or MRI volume and choose it in the volume selector.")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VolumeError(f"'{node.GetName()}' is not an image volume (it is a {node.GetClassName()}); "
                          "choose a CT or MRI volume.")
    meta = node_metadata(node, dicom_lookup)
    modality, sequence = modality_and_sequence(node, meta)
    return Volume(voxels(node), ijk_to_ras(node), modality=modality, sequence=sequence,
                  metadata={**meta, "node_id": node.GetID()}, source=node.GetName())


class NodeVolume:
    """A volume node as the source of a volume to send (``med3dvlm.client.tasks.VolumeSource``):
    read in place, known by its state, and checked before each chunk is hashed or sent, since
    Slicer may change the node between two timer ticks."""

    def __init__(self, node, dicom_lookup: DicomLookup | None = None) -> None:
        self.node, self.dicom_lookup = node, dicom_lookup
        self._state: tuple | None = None
        self._volume: Volume | None = None
        self.read()  # a VolumeError now for no, 2D or colour volumes

    def identity(self) -> Identity:
        return Identity(volume_state(self.node))

    def read(self) -> Volume:
        if self._volume is None or volume_state(self.node) != self._state:
            self._volume = volume_from_node(self.node, self.dicom_lookup)
            self._state = volume_state(self.node)
        return self._volume

    def check(self) -> None:
        if volume_state(self.node) != self._state:
            raise VolumeChanged(f"Volume '{self.node.GetName()}' changed while it was being sent to the model server.")


def read_volume_node(scene, path: str, name: str | None = None):
    """Load a NIfTI/NRRD file into a new scalar volume node with MRML's own reader (what Slicer's
    "Add data" does), for scripts and tests outside the Slicer application."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or Path(path).name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise VolumeError(f"{path} could not be read as a volume (NIfTI, NRRD, ...).")
    return node


def node_from_volume(scene, volume: Volume, name: str | None = None):
    """A new scalar volume node holding ``volume`` (the reverse of :func:`volume_from_node`)."""
    image = vtkImageData()
    image.SetDimensions(*volume.shape)
    kji = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0))
    image.GetPointData().SetScalars(numpy_to_vtk(kji.reshape(-1), deep=True))
    matrix = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(volume.affine[row, column]))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(matrix)
    if volume.modality != "unknown":
        node.SetAttribute(MODALITY_ATTRIBUTE, volume.modality)
    if volume.sequence:
        node.SetAttribute(SEQUENCE_ATTRIBUTE, volume.sequence)
    return node
