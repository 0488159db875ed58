"""The module's own model server: ``med3dvlm serve`` run by Slicer's Python (PythonSlicer) on a
free loopback port with a random token, started on first use, stopped with the module.

Nothing here blocks: :meth:`LocalServer.poll` says whether the server listens yet (it writes a
ready file once it does) and raises with the last line of its log when it exited instead. The
server's standard input is a pipe held by Slicer, so the server exits when Slicer does, even
after a crash (``--exit-with-stdin``). Stopping it does not wait either, except when the module closes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import med3dvlm
from med3dvlm.client.transport import Server
from med3dvlm.errors import Med3DVLMError
from med3dvlm.install_hint import HOST_ENV

from .settings import Settings

Command = Callable[[Settings, Path], list[str]]  # (settings, ready file) -> server command line


class ServerFailure(Med3DVLMError):
    """The model server died or the connection to it broke; Restart is the way on."""


class ServerStopped(ServerFailure):
    """The local server process exited; the message says why when its log does."""


def python_executable() -> str:
    """Slicer's own Python inside Slicer (PythonSlicer is on Slicer's PATH), else this Python."""
    try:
        import slicer  # noqa: F401  (only inside the Slicer application)

        inside_slicer = hasattr(slicer, "app")
    except ImportError:
        inside_slicer = False
    if inside_slicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        return str(Path(sys.executable).with_name(name))
    return sys.executable


def serve_command(settings: Settings, ready_file: Path) -> list[str]:
    command = [python_executable(), "-m", "med3dvlm.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--ready-file", str(ready_file), "--exit-with-stdin", "--log-level", "warning"]
    for name, value in settings.load_arguments().items():
        if value is not None:
            command += [f"--{name}", str(value)]
    return command


class LocalServer:
    def __init__(self, command: Command = serve_command) -> None:
        self.command = command
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self._token = ""
        self._server: Server | None = None
        self._stopping: list[tuple[subprocess.Popen, Path]] = []  # told to stop, not yet gone

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, settings: Settings) -> None:
        self.stop()
        self.folder = Path(tempfile.mkdtemp(prefix="med3dvlm-server-"))
        self._token = secrets.token_urlsafe(32)  # other users of this computer can reach loopback ports too
        core = str(Path(med3dvlm.__file__).resolve().parents[1])  # the embedded package, in a source checkout too
        env = {**os.environ, "MED3DVLM_TOKEN": self._token, HOST_ENV: "slicer",  # install hints for Slicer
               "PYTHONPATH": os.pathsep.join(filter(None, [core, os.environ.get("PYTHONPATH")]))}
        with open(self.folder / "server.log", "wb") as log:
            self.process = subprocess.Popen(self.command(settings, self.folder / "ready.json"), stdin=subprocess.PIPE,
                                            stdout=log, stderr=subprocess.STDOUT, env=env,
                                            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))

    def poll(self) -> Server | None:
        """The server once it listens; None while it starts; ServerStopped if it exited."""
        if self._server is not None and self.running:
            return self._server
        if self.process is None:
            raise ServerStopped("The model server is not running; press Restart to start it.")
        if self.process.poll() is not None:
            raise ServerStopped(self.exit_message())
        ready = self.folder / "ready.json"
        if not ready.exists():
            return None
        self._server = Server(json.loads(ready.read_text())["url"], self._token)
        return self._server

    def exit_message(self) -> str:
        """One sentence: the exit code and the server's own last error line, if it wrote one."""
        code = self.process.returncode if self.process is not None else None
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("med3dvlm: error:")), "")
        reason = f": {said.removeprefix('med3dvlm: error:').strip()}" if said else ""
        return f"The model server stopped (exit code {code}){reason}; press Restart to start it again."

    def log_text(self) -> str:
        log = self.folder / "server.log" if self.folder else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def stop(self, wait: float | None = None) -> None:
        """Tell the server to stop: it exits when its input closes (0.3-1.2 s, torch's teardown).
        Without ``wait`` Slicer does not wait for that (a settings change, Restart); the process is
        reaped later. With ``wait`` (module closing) it and earlier ones get that many seconds, then
        are killed."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.stdin.close()  # the server's own way out
            self._stopping.append((self.process, self.folder))
        self.process = self.folder = self._server = None
        for process, folder in list(self._stopping):
            if wait is not None and process.poll() is None:
                try:
                    process.wait(wait)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.poll() is not None:
                shutil.rmtree(folder, ignore_errors=True)
                self._stopping.remove((process, folder))
