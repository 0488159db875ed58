"""What a user marks for a question about part of a scan, read from MRML on the main thread: the box
of a Markups ROI node as two opposite corners in RAS mm, and the window/level a volume is shown
with in the slice views. Whether the box suits the model (empty, outside the volume, too small for
the model's input) is the model server's to say: it knows the model's input size."""

from __future__ import annotations

from med3dvlm.errors import Med3DVLMError, RegionError

Corners = tuple[tuple[float, float, float], tuple[float, float, float]]


def region_of(node) -> Corners:
    """The world (RAS) box of a Markups ROI: of its corners, under any parent transform and rotation
    (the model is shown an axis-aligned box of the scan's world space)."""
    name = node.GetName()
    if not node.IsA("vtkMRMLMarkupsROINode"):
        raise RegionError(f"'{name}' is not a Markups ROI; choose an ROI as the region, or none for the whole volume.")
    if min(node.GetSize()) <= 0:  # never placed, or placed without dragging it open
        raise RegionError(f"The region '{name}' is empty (it has not been placed, or has no size); place it over "
                          "the scan in a slice view and drag its handles open.")
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return (bounds[0], bounds[2], bounds[4]), (bounds[1], bounds[3], bounds[5])


def display_window(volume_node) -> tuple[float, float]:
    """(centre, width) of the window/level the slice views show ``volume_node`` with."""
    display = volume_node.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        raise Med3DVLMError(f"'{volume_node.GetName()}' is not shown in the slice views yet, so it has no "
                            "window/level to use; show it, or untick the slice view's window/level.")
    return float(display.GetLevel()), float(display.GetWindow())
