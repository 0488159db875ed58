"""The chat inside Slicer, emulated: tokens per second reaching the panel versus the server's own
rate, and the longest main-thread stall (targets: >= 90 % of the server's rate, stall < 50 ms).

Slicer runs Python through PythonQt, which keeps the GIL on the main thread while Qt's event
loop idles; PySide6 (our tests) releases it. Here the main thread does what Slicer's does: it
holds the GIL inside a C call (libc ``usleep`` through ``ctypes.PyDLL``, which keeps the GIL)
between ticks, and every 15 ms runs the module's real code for one tick (``processEvents``: the
QTimer that drives the server link, the logic writing text nodes, the chat panel). A Python
thread in this process would run only inside those ticks; the model runs in the server process.

    python benchmarks/bench_pythonqt.py                 # the bundled demo model behind med3dvlm serve
    python benchmarks/bench_pythonqt.py --standin       # stand-in model, 20 ms a token, 128 tokens

Prints one Markdown row for benchmarks/README.md (section "Slicer main thread, PythonQt emulated"):
model | machine | tokens | server rate | panel rate | ratio | longest tick | longest request start.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 0.015
QUESTIONS = ("Is there a lesion in the liver?", "Are the kidneys normal?", "Which phase is this?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standin", action="store_true", help="stand-in model: 20 ms a token, 128 tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT / "SlicerMed3DVLM"), str(ROOT / "tests")]
    from med3dvlm.data.phantoms import make_ct_phantom
    from qtpy.QtWidgets import QApplication
    from slicer import vtkMRMLScene

    from SlicerMed3DVLMLib.chat_panel import ChatPanel
    from SlicerMed3DVLMLib.controller import ChatController
    from SlicerMed3DVLMLib.local_server import serve_command
    from SlicerMed3DVLMLib.logic import Med3DVLMLogic
    from SlicerMed3DVLMLib.volume_node import node_from_volume

    if args.standin:
        from server_process import standin_command

        command = standin_command(token_delay=0.02, report_words=args.max_new_tokens)
    else:
        command = serve_command
    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call, as in PythonQt's idle loop

    app = QApplication.instance() or QApplication([])
    scene = vtkMRMLScene()
    node_from_volume(scene, make_ct_phantom(0).volume, "CT phantom")
    logic = Med3DVLMLogic(scene, server_command=command)
    logic.update_settings(model="demo", device="cpu", max_new_tokens=args.max_new_tokens)
    panel = ChatPanel()
    panel.resize(560, 780)
    panel.show()
    controller = ChatController(panel, logic)

    arrivals: list[float] = []  # when each streamed piece reached the panel
    show = panel.append_stream
    panel.append_stream = lambda piece: (arrivals.append(time.perf_counter()), show(piece))
    ticks: list[float] = []  # ms of the module's own work per tick: what Slicer's UI waits for

    def run(action) -> tuple[float, list[float]]:
        """(ms the call itself held the main thread, the arrival times of this request's pieces)"""
        arrivals.clear()
        start = time.perf_counter()
        action()
        held = (time.perf_counter() - start) * 1000
        while logic.busy:
            libc.usleep(int(TICK_S * 1e6))  # idle: the GIL held in C
            tick = time.perf_counter()
            app.processEvents()  # one timer tick of the module's own code
            ticks.append((time.perf_counter() - tick) * 1000)
        return held, list(arrivals)

    run(controller.generate_report)  # warm-up: starts the server and loads the model
    ticks.clear()
    runs = [run(controller.generate_report)] + [run(lambda q=q: controller.ask(q)) for q in QUESTIONS]
    errors = [t.text for t in panel.turns if t.role == "error"]

    # The server's own rate: the same requests from a plain blocking client in a free process.
    from med3dvlm.client.remote import RemotePipeline

    server = logic.local_server.poll()
    client, volume = RemotePipeline(server.url, server.token), make_ct_phantom(0).volume
    generation = {"max_new_tokens": args.max_new_tokens}
    direct = [_arrivals(lambda on_token: client.report(volume, on_token=on_token, **generation))]
    direct += [_arrivals(lambda on_token, q=q: client.ask(volume, q, on_token=on_token, **generation))
               for q in QUESTIONS]
    logic.shutdown()

    server_rate, panel_rate = _rate(direct), _rate([a for _, a in runs])
    model = "stand-in (20 ms a token)" if args.standin else "demo, CPU"
    print(f"| {model} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | "
          f"{sum(len(a) for _, a in runs)} pieces in {len(runs)} requests | {server_rate:.0f} /s | "
          f"{panel_rate:.0f} /s | **{panel_rate / server_rate:.0%}** | **{max(ticks):.1f} ms** "
          f"(median {np.median(ticks):.2f}) | {max(h for h, _ in runs):.1f} ms |")
    if errors:
        print("errors shown in the panel:", errors)
    return 1 if errors else 0


def _arrivals(request) -> list[float]:
    times: list[float] = []
    request(lambda piece: times.append(time.perf_counter()))
    return times


def _rate(requests: list[list[float]]) -> float:
    """Pieces per second from each request's first piece to its last, over all requests."""
    spans = [(len(times) - 1, times[-1] - times[0]) for times in requests if len(times) > 1]
    return sum(n for n, _ in spans) / sum(t for _, t in spans)


if __name__ == "__main__":
    sys.exit(main())
