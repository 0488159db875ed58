"""The chat inside Slicer, emulated: text per second reaching the panel versus the server's own
rate, and the longest main-thread stall (targets: >= 90 % of the server's rate, stall < 50 ms).

Slicer runs Python through PythonQt, which keeps the GIL on the main thread while Qt's event
loop idles; PySide6 (our tests) releases it. Here the main thread does what Slicer's does: it
holds the GIL inside a C call (libc ``usleep`` through ``ctypes.PyDLL``, which keeps the GIL)
between ticks, and every 15 ms runs the module's real code for one tick (``processEvents``: the
QTimer that drives the server link, the logic writing text nodes, the chat panel). A Python
thread in this process would run only inside those ticks; the model runs in the server process.

    python benchmarks/bench_pythonqt.py                 # the bundled demo model behind med3dvlm serve
    python benchmarks/bench_pythonqt.py --standin       # stand-in model, 20 ms a token, 128 tokens
    python benchmarks/bench_pythonqt.py --full-size     # a 512 x 512 x 300 int16 CT node, from a cold start

Prints one Markdown row for benchmarks/README.md (section "Slicer main thread, PythonQt emulated"):
model | machine | text | server rate | panel rate | ratio | longest tick | longest request start. Rates
are in characters per second: the module shows the tokens that came during one tick as one piece.
With ``--full-size`` the first request starts the server, loads the model and sends 150 MB of
voxels, and every tick counts; the row is: model | machine | longest tick | longest click |
click to first token (cold) | follow-up click to first token.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 0.015
QUESTIONS = ("Is there a lesion in the liver?", "Are the kidneys normal?", "Which phase is this?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standin", action="store_true", help="stand-in model: 20 ms a token, 128 tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--full-size", action="store_true", help="a 512 x 512 x 300 int16 CT, timed from a cold start")
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

        command = standin_command(token_delay=0.02, report_words=args.max_new_tokens, max_volume_mb=512)
    else:
        command = serve_command
    libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during the call, as in PythonQt's idle loop

    app = QApplication.instance() or QApplication([])
    scene = vtkMRMLScene()
    shape = (512, 512, 300) if args.full_size else None
    node_from_volume(scene, make_ct_phantom(0, shape=shape).volume, "CT phantom")
    logic = Med3DVLMLogic(scene, server_command=command)
    logic.update_settings(model="demo", device="cpu", max_new_tokens=args.max_new_tokens)
    panel = ChatPanel()
    panel.resize(560, 780)
    panel.show()
    controller = ChatController(panel, logic)

    arrivals: list[tuple[float, int]] = []  # when each streamed piece reached the panel, and its characters
    show = panel.append_stream
    panel.append_stream = lambda piece: (arrivals.append((time.perf_counter(), len(piece))), show(piece))
    ticks: list[Held] = []  # the module's own work per tick: what Slicer's UI waits for

    def run(action) -> Run:
        arrivals.clear()
        start = time.perf_counter()
        with Held.timing() as click:
            action()
        while logic.busy:
            libc.usleep(int(TICK_S * 1e6))  # idle: the GIL held in C
            with Held.timing() as tick:
                app.processEvents()  # one timer tick of the module's own code
            ticks.append(tick)
        return Run(click, list(arrivals), (arrivals[0][0] - start) * 1000 if arrivals else float("nan"))

    if args.full_size:
        return _full_size(run, controller, logic, panel, ticks, args)
    run(controller.generate_report)  # warm-up: starts the server and loads the model
    ticks.clear()
    runs = [run(controller.generate_report)] + [run(lambda q=q: controller.ask(q)) for q in QUESTIONS]

    # The server's own rate: the same requests from a plain blocking client in a free process.
    from med3dvlm.client.remote import RemotePipeline

    server = logic.local_server.poll()
    client, volume = RemotePipeline(server.url, server.token), make_ct_phantom(0).volume
    generation = {"max_new_tokens": args.max_new_tokens}
    direct = [_arrivals(lambda on_token: client.report(volume, on_token=on_token, **generation))]
    direct += [_arrivals(lambda on_token, q=q: client.ask(volume, q, on_token=on_token, **generation))
               for q in QUESTIONS]
    logic.shutdown()

    server_rate, panel_rate = _rate(direct), _rate([r.arrivals for r in runs])
    wall = [t.wall for t in ticks]
    print(f"| {_model(args)} | {_machine()} | {sum(n for r in runs for _, n in r.arrivals)} characters in "
          f"{len(runs)} requests | {server_rate:.0f} /s | {panel_rate:.0f} /s | **{panel_rate / server_rate:.0%}** | **{max(wall):.1f} ms** "
          f"(median {np.median(wall):.2f}) | {max(r.click.wall for r in runs):.1f} ms |")
    return _report_errors(panel)


def _full_size(run, controller, logic, panel, ticks: list[Held], args) -> int:
    """Cold start on a full-size CT: the first report starts the server, loads the model and sends
    the voxels; then a report and questions about the same volume (sent once)."""
    first = run(controller.generate_report)
    later = [run(controller.generate_report)] + [run(lambda q=q: controller.ask(q)) for q in QUESTIONS]
    logic.shutdown()
    longest = max(ticks, key=lambda t: t.wall)
    follow_ups = [r.first_piece for r in later[1:]]
    print(f"| {_model(args)}, 512 x 512 x 300 int16 CT | {_machine()} "
          f"| **{longest}** (longest CPU {max(t.cpu for t in ticks):.1f}; {sum(t.wall > 50 for t in ticks)} "
          f"of {len(ticks)} over 50 ms) | **{first.click}** first, {max(r.click.wall for r in later):.1f} ms later "
          f"| {first.first_piece / 1000:.2f} s | {np.median(follow_ups):.0f} ms (median; max {max(follow_ups):.0f}) |")
    return _report_errors(panel)


class Held:
    """How long the main thread was held: wall ms, and the ms of it that it ran on a CPU (the rest
    is other processes' share of a busy machine)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    @classmethod
    @contextlib.contextmanager
    def timing(cls):
        held, wall, cpu = cls(), time.perf_counter(), time.thread_time()
        yield held
        held.wall, held.cpu = (time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000

    def __str__(self) -> str:
        return f"{self.wall:.1f} ms ({self.cpu:.1f} CPU)"


@dataclass
class Run:
    click: Held  # the call itself (the button's click handler)
    arrivals: list[tuple[float, int]]  # when each streamed piece reached the panel, and its characters
    first_piece: float  # ms from the click to the first piece


def _model(args) -> str:
    return "stand-in (20 ms a token)" if args.standin else "demo, CPU"


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"


def _report_errors(panel) -> int:
    errors = [t.text for t in panel.turns if t.role == "error"]
    if errors:
        print("errors shown in the panel:", errors)
    return 1 if errors else 0


def _arrivals(request) -> list[tuple[float, int]]:
    times: list[tuple[float, int]] = []
    request(lambda piece: times.append((time.perf_counter(), len(piece))))
    return times


def _rate(requests: list[list[tuple[float, int]]]) -> float:
    """Characters per second from each request's first piece to its last, over all requests."""
    spans = [(sum(n for _, n in pieces[1:]), pieces[-1][0] - pieces[0][0]) for pieces in requests if len(pieces) > 1]
    return sum(n for n, _ in spans) / sum(t for _, t in spans)


if __name__ == "__main__":
    sys.exit(main())
