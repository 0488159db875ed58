"""Evidence maps as volume nodes over their scan.

A map is named after the answer it explains, coloured with one colour table (weak support yellow,
the strongest red), shown only where it supports the answer most (threshold and window at its top
percentiles), and referenced from the text node (or score table) that holds the answer, so that
saving the scene keeps it and Show evidence shows it again instead of computing it anew. The
reference goes from the answer's node to the map, as text nodes reference their volume: nothing
marks the scan as modified.
"""

from __future__ import annotations

import numpy as np

from med3dvlm.volume import Volume

from .overlays import OVERLAY, place_volume
from .text_nodes import set_provenance

EVIDENCE_ROLE = "Med3DVLM.evidence"  # a text node or score table -> the evidence maps of its answers
ANSWER = "Med3DVLM.answer"  # on a map: the answer it explains (the answer turn's time, or the score's label)
COLOURS = "Med3DVLM evidence"
# Of the voxels that support the answer: shown from the first percentile, brightest from the second.
TOP_PERCENTILES = (90.0, 99.5)
OPACITY = 0.5  # of a map over its scan in the slice views


def find_evidence(record, key: str):
    """The map of the answer ``key`` that ``record`` references, or None (never made, or deleted)."""
    for index in range(record.GetNumberOfNodeReferences(EVIDENCE_ROLE)):
        node = record.GetNthNodeReference(EVIDENCE_ROLE, index)
        if node is not None and node.GetAttribute(ANSWER) == key:
            return node
    return None


def add_evidence(scene, scan, record, key: str, answer: str, evidence: Volume, provenance: dict | None):
    """A map node over ``scan`` for the answer ``key`` of ``record``, referenced from it."""
    node = place_volume(scene, scan, evidence, f"{scan.GetName()} evidence: {_short(answer)}", "evidence")
    node.SetAttribute(ANSWER, key)
    set_provenance(node, provenance)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_colours(scene).GetID())
    values = np.asarray(evidence.array)
    support = values[values > 0]
    if support.size:
        low, high = np.percentile(support, TOP_PERCENTILES)
        high = max(high, np.nextafter(low, np.inf))
    else:  # nothing in the scan supports the answer: nothing to show
        low = high = float(values.max()) + 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(low), float(high))
    display.SetThreshold(float(low), float(max(values.max(), high)))
    display.ApplyThresholdOn()  # below the threshold the map is transparent: the scan shows through
    record.AddNodeReferenceID(EVIDENCE_ROLE, node.GetID())
    return node


def _colours(scene):
    tables = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for index in range(tables.GetNumberOfItems()):
        table = tables.GetItemAsObject(index)
        if table.GetAttribute(OVERLAY) == "evidence colours":
            return table
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOURS)
    table.SetTypeToUser()  # saved with the scene as a file, as any table a user makes
    table.SetNumberOfColors(256)
    for index in range(256):  # Slicer's Warm1: yellow to red
        table.SetColor(index, f"{index}", 1.0, 1.0 - index / 255, 0.0, 1.0)
    table.SetAttribute(OVERLAY, "evidence colours")
    return table


def _short(answer: str, length: int = 48) -> str:
    text = " ".join(answer.split())
    return text if len(text) <= length else text[:length - 1].rstrip() + "…"
