"""MRI abnormality scores kept as one vtkMRMLTableNode per volume: sortable, plottable in Slicer's
Tables module, and saved with the scene (as TSV with a schema, so the column types survive).

The table references its volume with the role ``Med3DVLM.scores``, from the table to the volume as
the text nodes do, so that writing scores never marks the volume as modified. A new detection
refills the volume's existing table instead of adding another, so views showing it update in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from vtkmodules.vtkCommonCore import vtkBitArray, vtkDoubleArray, vtkStringArray

from .text_nodes import CREATED, MODEL, modifying
from .transcript import now

SCORES_ROLE = "Med3DVLM.scores"
SEQUENCES = "Med3DVLM.sequences"  # the MRI sequences the detector used, comma-separated
COLUMNS = (  # name, array type, description shown as the column's tooltip in Slicer
    ("organ", vtkStringArray, "Organ the abnormality is scored in"),
    ("abnormality", vtkStringArray, "Kind of abnormality"),
    ("probability", vtkDoubleArray, "Model probability that the abnormality is present (0 to 1)"),
    ("threshold", vtkDoubleArray, "The detector's operating point for this label and sequence; "
                                  "empty (NaN): not called on these sequences"),
    ("above threshold", vtkBitArray, "1 when the probability reaches the threshold"),
)


class ScoreRow(NamedTuple):
    organ: str
    abnormality: str
    probability: float
    threshold: float   # NaN: the detector does not call this label on these sequences
    above: bool

    @property
    def called(self) -> bool:
        return not math.isnan(self.threshold)


@dataclass
class StoredScores:
    rows: list[ScoreRow]  # highest probability first
    sequences: list[str]
    model: str


def find_table(scene, volume):
    """The score table of ``volume``, or None."""
    tables = scene.GetNodesByClass("vtkMRMLTableNode")
    for index in range(tables.GetNumberOfItems()):
        table = tables.GetItemAsObject(index)
        if table.GetNodeReferenceID(SCORES_ROLE) == volume.GetID():
            return table
    return None


def write_scores(scene, volume, result, model_name: str):
    """Store a ``DetectionResult`` in the volume's table (created on first use); returns the table."""
    table = find_table(scene, volume)
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode")
        table.SetName(scene.GenerateUniqueName(f"{volume.GetName()} abnormality scores"))
        table.SetNodeReferenceID(SCORES_ROLE, volume.GetID())
    scores = sorted(result.scores, key=lambda s: -s.probability)
    values = {"organ": [s.organ for s in scores], "abnormality": [s.kind for s in scores],
              "probability": [s.probability for s in scores],
              "threshold": [math.nan if s.threshold is None else s.threshold for s in scores],
              "above threshold": [int(s.positive) for s in scores]}
    with modifying(table):  # one Modified event: views redraw once, not once per column
        table.RemoveAllColumns()
        for name, array_type, description in COLUMNS:
            column = array_type()
            column.SetName(name)
            column.SetNumberOfValues(len(scores))
            for row, value in enumerate(values[name]):
                column.SetValue(row, value)
            table.GetTable().AddColumn(column)
            table.SetColumnDescription(name, description)
        table.SetAttribute(SEQUENCES, ", ".join(result.sequences))
        table.SetAttribute(MODEL, model_name)
        table.SetAttribute(CREATED, now())
        table.Modified()
    return table


def read_scores(table) -> StoredScores:
    """The rows of a score table as stored (also after the scene was saved and reloaded); no rows
    when the user removed one of its columns in the Tables module."""
    columns = [table.GetTable().GetColumnByName(name) for name, _, _ in COLUMNS]
    if None in columns:
        return StoredScores([], [], table.GetAttribute(MODEL) or "")
    rows = [ScoreRow(str(columns[0].GetValue(i)), str(columns[1].GetValue(i)), float(columns[2].GetValue(i)),
                     float(columns[3].GetValue(i)), bool(columns[4].GetValue(i)))
            for i in range(table.GetNumberOfRows())]
    sequences = [s for s in (table.GetAttribute(SEQUENCES) or "").split(", ") if s]
    return StoredScores(rows, sequences, table.GetAttribute(MODEL) or "")
