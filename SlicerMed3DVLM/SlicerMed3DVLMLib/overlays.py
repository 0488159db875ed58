"""Nodes laid over a scan: a volume the model server made (an evidence map, the model's input), the
box of the scan the model was shown as a Markups ROI, and the slice views showing them.

The server places what it makes in world (RAS) coordinates, as the scan was when it was sent. An
overlay goes under the scan's parent transform with the transform taken out of its matrix, so that
it lies exactly over the scan now and still does when that transform is edited later.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from med3dvlm.volume import Volume

from .text_nodes import set_provenance
from .volume_node import _matrix_to_numpy, node_from_volume

OVERLAY = "Med3DVLM.overlay"  # on an overlay node: what it is ("evidence", "model view", "model input box")


def _to_world(scan) -> np.ndarray:
    parent = scan.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)  # linear: the scan could not have been sent otherwise
    return _matrix_to_numpy(matrix)


def _local_matrix(scan) -> np.ndarray:
    matrix = vtkMatrix4x4()
    scan.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def _vtk_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def place_volume(scene, scan, volume: Volume, name: str, what: str):
    """A new volume node holding ``volume`` (world affine), under the scan's parent transform."""
    local = np.linalg.inv(_to_world(scan)) @ volume.affine
    # An overlay is no scan to ask about: no modality or sequence attributes.
    node = node_from_volume(scene, dataclasses.replace(volume, affine=local, modality="unknown", sequence=None),
                            scene.GenerateUniqueName(name))
    node.SetAttribute(OVERLAY, what)
    node.SetAndObserveTransformNodeID(scan.GetTransformNodeID())
    return node


def box_roi(scene, scan, box_voxels, name: str):
    """A Markups ROI covering the voxels ``box_voxels`` ([start, stop) along i, j, k) of the scan,
    edges included, turned with the scan's axes so that it lies exactly over them."""
    local = _local_matrix(scan)
    start, stop = np.array(box_voxels, dtype=float).T
    spacing = np.linalg.norm(local[:3, :3], axis=0)
    axes = local[:3, :3] / spacing
    if np.linalg.det(axes) < 0:  # an ROI turns, it does not mirror: the box is the same either way
        axes[:, 2] *= -1
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    object_to_node[:3, 3] = (local @ np.append((start + stop) / 2 - 0.5, 1.0))[:3]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(object_to_node))
    roi.SetSize(*((stop - start) * spacing))
    roi.SetAttribute(OVERLAY, "model input box")
    roi.SetAndObserveTransformNodeID(scan.GetTransformNodeID())
    return roi


def add_model_view(scene, scan, view: dict, provenance: dict | None):
    """The model's input over ``scan`` (grey, over its [0, 1] range) and the box of the scan it shows
    as a Markups ROI; ``view`` is the done event's (``volume``, ``box_voxels``)."""
    node = place_volume(scene, scan, view["volume"], f"{scan.GetName()} model input", "model view")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    roi = box_roi(scene, scan, view["box_voxels"], f"{scan.GetName()} model input box")
    set_provenance(node, provenance)
    return node, roi


def show_over(scene, scan, overlay, opacity: float) -> None:
    """``overlay`` in the foreground of every slice view, at ``opacity``, over ``scan`` beneath it."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(scan.GetID())
        composite.SetForegroundVolumeID(overlay.GetID())
        composite.SetForegroundOpacity(opacity)
