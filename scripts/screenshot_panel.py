"""Render the Med3DVLM chat panel offscreen after a report and two questions; save a PNG.

    python scripts/screenshot_panel.py                 # the bundled demo model
    python scripts/screenshot_panel.py --model FOLDER  # another model folder
    python scripts/screenshot_panel.py --standin       # the tests' stand-in model (no weights needed)
    python scripts/screenshot_panel.py --scores        # MRI abnormality scores of the MR sample instead
    python scripts/screenshot_panel.py --evidence      # and Show evidence on the last answer, beside
                                                       # an axial slice view with the map over the scan

The panel, logic and scene are the module's own (real MRML, real Qt), outside the Slicer application;
the model answers from the module's own local model server, as in Slicer. The slice view is drawn by
Slicer's own slice logic (MRML's layers and blending), without Slicer's render window.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What abnormalities are present?", "What abnormality is seen in the liver?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' or a model folder")
    parser.add_argument("--standin", action="store_true", help="serve tests/slicer_standin.py instead of a model")
    parser.add_argument("--scores", action="store_true",
                        help="detect abnormalities on the MR sample instead of a report and questions on the CT sample")
    parser.add_argument("--evidence", action="store_true",
                        help="then Show evidence on the last answer, beside an axial slice view showing the map")
    parser.add_argument("--out", help="the PNG (default: docs/panel.png, docs/panel_scores.png with --scores, "
                                      "docs/panel_evidence.png with --evidence)")
    args = parser.parse_args()
    name = "panel_scores.png" if args.scores else "panel_evidence.png" if args.evidence else "panel.png"
    out = args.out or str(ROOT / "docs" / name)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT / "SlicerMed3DVLM"), str(ROOT / "tests")]
    from med3dvlm.resources import sample_path
    from qtpy.QtWidgets import QApplication
    from slicer import vtkMRMLScene

    from SlicerMed3DVLMLib.chat_panel import ChatPanel
    from SlicerMed3DVLMLib.controller import ChatController
    from SlicerMed3DVLMLib.local_server import serve_command
    from SlicerMed3DVLMLib.logic import Med3DVLMLogic
    from SlicerMed3DVLMLib.volume_node import read_volume_node

    app = QApplication.instance() or QApplication([])
    scene = vtkMRMLScene()
    slice_view = SliceView(scene) if args.evidence else None  # before the volumes, as in Slicer
    if args.scores:
        scan = read_volume_node(scene, str(sample_path("mr_phantom_t2.nii.gz")), "MR T2 sample (phantom)")
    else:
        scan = read_volume_node(scene, str(sample_path("ct_phantom.nii.gz")), "CT sample (phantom)")
    scan.CreateDefaultDisplayNodes()
    if args.standin:
        from server_process import standin_command

        command = standin_command(token_delay=0.01)
    else:
        command = serve_command
    logic = Med3DVLMLogic(scene, server_command=command)
    logic.update_settings(model=args.model, max_new_tokens=160)
    panel = ChatPanel()
    panel.resize(560, 780)
    controller = ChatController(panel, logic)
    panel.show()

    def run(action) -> None:
        action()
        while logic.busy:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()

    if args.scores:
        run(controller.detect)
    else:
        run(controller.generate_report)
        for question in QUESTIONS:
            run(lambda: controller.ask(question))
    shown = panel
    if args.evidence:
        run(lambda: controller.show_evidence(panel.turns[-1].time))
        shown = slice_view.beside(panel, scan)
    failures = [t.text for t in panel.turns if t.role == "error"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    shown.grab().save(out)
    logic.shutdown()
    print(f"saved {out}" + (f"; errors shown: {failures}" if failures else ""))
    return 1 if failures else 0


class SliceView:
    """Slicer's Red (axial) slice view without its render window: the slice logic blends the layers
    of the Red composite node (background scan, foreground evidence at its opacity) as Slicer does."""

    def __init__(self, scene) -> None:
        import slicer

        self.application = slicer.vtkSlicerApplicationLogic()
        self.application.SetMRMLScene(scene)
        self.colours = slicer.vtkMRMLColorLogic()  # Slicer's default colour tables (Grey for the scan)
        self.colours.SetMRMLScene(scene)
        self.colours.AddDefaultColorNodes()
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.application)
        self.logic.SetMRMLScene(scene)
        self.logic.AddSliceNode("Red")

    def image(self, size: int, offset: float):
        import numpy as np
        from qtpy.QtGui import QImage, QPixmap
        from vtkmodules.util.numpy_support import vtk_to_numpy

        node = self.logic.GetSliceNode()
        node.SetOrientationToAxial()
        node.SetDimensions(size, size, 1)
        self.logic.FitSliceToAll()
        self.logic.SetSliceOffset(offset)
        producer = self.logic.GetImageDataConnection().GetProducer()
        producer.Update()
        data = producer.GetOutputDataObject(0)
        width, height, _ = data.GetDimensions()
        rgba = vtk_to_numpy(data.GetPointData().GetScalars()).reshape(height, width, 4)[::-1]  # VTK: rows up
        rgb = np.ascontiguousarray(rgba[..., :3])
        return QPixmap.fromImage(QImage(rgb.data, width, height, 3 * width, QImage.Format_RGB888).copy())

    def beside(self, panel, scan):
        """A widget: the slice view through the map's strongest support, then the panel."""
        import numpy as np
        from qtpy.QtWidgets import QHBoxLayout, QLabel, QWidget

        from SlicerMed3DVLMLib.volume_node import ijk_to_ras, volume_from_node

        overlay = scan.GetScene().GetNodeByID(self.logic.GetSliceCompositeNode().GetForegroundVolumeID())
        values = volume_from_node(overlay).array
        peak = np.unravel_index(int(np.argmax(values)), values.shape)
        offset = (ijk_to_ras(overlay) @ np.array([*peak, 1.0]))[2]  # S of the strongest support
        label = QLabel()
        label.setPixmap(self.image(panel.height(), float(offset)))
        widget = QWidget()
        row = QHBoxLayout(widget)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(label)
        row.addWidget(panel)
        widget.show()
        return widget


if __name__ == "__main__":
    sys.exit(main())
