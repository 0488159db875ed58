"""Start a real model server process on a free loopback port and wait until it listens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin:
            self.process.stdin.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(folder: Path, *args: str, standin: bool = True, token: str | None = None,
                 timeout: float = 60) -> ServerProcess:
    """``standin``: tests/standin_server.py with ``args``; else ``med3dvlm serve --port 0 args``."""
    folder.mkdir(parents=True, exist_ok=True)
    ready, log = folder / "ready.json", folder / "server.log"
    ready.unlink(missing_ok=True)
    if standin:
        command = [sys.executable, str(TESTS / "standin_server.py"), "--ready-file", str(ready), *args]
    else:
        command = [sys.executable, "-m", "med3dvlm.cli", "serve", "--port", "0", "--ready-file", str(ready), *args]
    env = {**os.environ, "MED3DVLM_TOKEN": token or ""}
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return ServerProcess(json.loads(ready.read_text())["url"], process, log)


def standin_command(**standin):
    """A ``server_command`` for the Slicer logic: the stand-in server with ``standin`` options
    (token_delay, report_words, scores {(organ, kind): p}, die_after, load_delay); the model
    setting must be 'demo' or an existing folder, as with the real server."""
    def command(settings, ready_file: Path) -> list[str]:
        args = [sys.executable, str(TESTS / "standin_server.py"), "--ready-file", str(ready_file),
                "--model", settings.model]
        for name, value in standin.items():
            if name == "scores":
                value = json.dumps({f"{organ}|{kind}": p for (organ, kind), p in value.items()})
            args += [f"--{name.replace('_', '-')}", str(value)]
        return args
    return command
