"""Longest main-thread stall while answers stream into the chat panel and the scene (target < 50 ms).

A 5 ms QTimer on the main thread stamps each tick; a stall is the gap between two ticks beyond
the 5 ms period. Everything the module does on the main thread is inside the measurement:
converting the volume node, creating text nodes, draining the worker's queue, updating text
nodes and the chat view. The model runs on the worker thread as in Slicer.

    python benchmarks/bench_main_thread_stall.py                  # the bundled demo model
    python benchmarks/bench_main_thread_stall.py --model FOLDER
    python benchmarks/bench_main_thread_stall.py --standin        # stand-in: Python busy loop per token

Prints one Markdown table row per run (for benchmarks/README.md, section "Main-thread stall"):
model | machine | requests | longest stall while streaming | longest request start |
512x512x300 node -> Volume | load average; then per request, and the time spent in queue drains.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERIOD_MS = 5
QUESTIONS = ("Is there a lesion in the liver?", "Are the kidneys normal?", "Describe the spleen.")


def time_drains(worker_class) -> list[float]:
    """Time every Worker.drain (ms): the module's own main-thread work per update (queue, text
    nodes, chat view), as opposed to waiting for the GIL or the CPU."""
    durations: list[float] = []
    drain = worker_class.drain

    def timed(self) -> int:
        start = time.perf_counter()
        try:
            return drain(self)
        finally:
            durations.append((time.perf_counter() - start) * 1000)

    worker_class.drain = timed
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--standin", action="store_true", help="tests/slicer_standin.py, spinning 20 ms a token")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT / "SlicerMed3DVLM"), str(ROOT / "tests")]
    from med3dvlm.data.phantoms import make_ct_phantom
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication
    from slicer import vtkMRMLScene

    from SlicerMed3DVLMLib.chat_panel import ChatPanel
    from SlicerMed3DVLMLib.controller import ChatController
    from SlicerMed3DVLMLib.logic import Med3DVLMLogic, default_loader
    from SlicerMed3DVLMLib.volume_node import node_from_volume, volume_from_node
    from SlicerMed3DVLMLib.worker import Worker
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData

    app = QApplication.instance() or QApplication([])
    drains = time_drains(Worker)
    scene = vtkMRMLScene()
    node_from_volume(scene, make_ct_phantom(0).volume, "CT phantom")
    if args.standin:
        from slicer_standin import standin_loader

        loader = standin_loader(token_delay=0.02, report_words=args.max_new_tokens, spin=True)
    else:
        loader = default_loader
    logic = Med3DVLMLogic(scene, loader=loader)
    logic.update_settings(model=args.model, max_new_tokens=args.max_new_tokens)
    panel = ChatPanel()
    panel.resize(560, 780)
    panel.show()
    controller = ChatController(panel, logic)

    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(PERIOD_MS)

    def run(action) -> tuple[float, float]:
        """(time the call itself held the main thread, longest tick gap while streaming) in ms."""
        for _ in range(5):  # settle
            app.processEvents()
            time.sleep(0.002)
        start = time.perf_counter()
        action()
        held = time.perf_counter() - start
        ticks.clear()
        loop = QEventLoop()  # Qt's own event loop, as in Slicer, until the request is finished
        check = QTimer()
        check.timeout.connect(lambda: None if logic.busy else loop.quit())
        check.start(10)
        loop.exec()
        check.stop()
        gaps = np.diff(ticks) if len(ticks) > 1 else np.zeros(1)
        return held * 1000, float(gaps.max()) * 1000 - PERIOD_MS

    # The first request loads the model on the worker thread; it is measured like the others.
    results = [("report", *run(controller.generate_report))]
    for question in QUESTIONS:
        results.append(("question", *run(lambda: controller.ask(question))))
    tokens = sum(len(t.text.split()) for t in panel.turns if t.role == "model")
    errors = [t.text for t in panel.turns if t.role == "error"]
    logic.shutdown()

    # What a request costs the main thread up front for a large CT: copying the voxels out of the node.
    big = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 512x512x300")
    image = vtkImageData()
    image.SetDimensions(512, 512, 300)
    image.GetPointData().SetScalars(numpy_to_vtk(np.zeros(512 * 512 * 300, np.int16), deep=True))
    big.SetAndObserveImageData(image)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        volume_from_node(big)
        times.append((time.perf_counter() - started) * 1000)
    convert_ms = float(np.median(times))

    model = "stand-in (20 ms Python spin per token)" if args.standin else args.model
    stall = max(r[2] for r in results)
    start_stall = max(r[1] for r in results)
    print(f"| {model} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
          f"{len(results)} requests, ~{tokens} words | {stall:.1f} ms | {start_stall:.1f} ms | "
          f"{convert_ms:.0f} ms | {os.getloadavg()[0]:.1f} |")
    for kind, held, gap in results:
        print(f"  {kind:8s} start held {held:6.1f} ms, longest stall while streaming {gap:6.1f} ms")
    print(f"  {len(drains)} queue drains: median {np.median(drains):.2f} ms, max {max(drains):.2f} ms")
    if errors:
        print("errors shown in the panel:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
