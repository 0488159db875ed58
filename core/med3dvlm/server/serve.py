"""The ``med3dvlm serve`` process: bind, announce, load the model, serve until told to stop.

The socket is bound before uvicorn starts so that ``--port 0`` picks a free port and the address
can be announced (stdout, and ``--ready-file`` for a parent process such as the Slicer module).
With ``--exit-with-stdin`` the server stops when its standard input closes, which happens when
the parent process exits for any reason, crash included.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from ..wire import is_loopback
from .config import ServerConfig


def serve(load, config: ServerConfig, *, host: str, port: int, model_label: str, ready_file: str | None = None,
          exit_with_stdin: bool = False, log_level: str = "info") -> None:
    import uvicorn

    from .app import create_app

    if config.token is None and not is_loopback(host):
        raise ValueError("A server reachable from other machines needs a token.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}"

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(load, config, model_label), log_level=log_level,
                                           access_log=False, timeout_graceful_shutdown=5))
    if exit_with_stdin:
        threading.Thread(target=_stop_at_eof, args=(server,), daemon=True).start()
    print(f"med3dvlm: serving {model_label} at {url}", flush=True)
    if ready_file:
        _announce(Path(ready_file), {"url": url, "pid": os.getpid()})
    server.run(sockets=[sock])


def _announce(path: Path, info: dict) -> None:
    """Written whole, then renamed: a reader never sees half a file."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(info))
    partial.replace(path)


def _stop_at_eof(server) -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    server.should_exit = True
