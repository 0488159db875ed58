"""Render the Med3DVLM chat panel offscreen after a report and two questions; save a PNG.

    python scripts/screenshot_panel.py                 # the bundled demo model
    python scripts/screenshot_panel.py --model FOLDER  # another model folder
    python scripts/screenshot_panel.py --standin       # the tests' stand-in model (no weights needed)
    python scripts/screenshot_panel.py --scores        # MRI abnormality scores of the MR sample instead

The panel, logic and scene are the module's own (real MRML, real Qt), outside the Slicer application;
the model answers from the module's own local model server, as in Slicer.
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
    parser.add_argument("--out", help="the PNG (default: docs/panel.png, with --scores docs/panel_scores.png)")
    args = parser.parse_args()
    out = args.out or str(ROOT / "docs" / ("panel_scores.png" if args.scores else "panel.png"))

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
    if args.scores:
        read_volume_node(scene, str(sample_path("mr_phantom_t2.nii.gz")), "MR T2 sample (phantom)")
    else:
        read_volume_node(scene, str(sample_path("ct_phantom.nii.gz")), "CT sample (phantom)")
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
    failures = [t.text for t in panel.turns if t.role == "error"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    panel.grab().save(out)
    logic.shutdown()
    print(f"saved {out}" + (f"; errors shown: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
