"""HTTP/1.1 over a non-blocking socket, as generator tasks; h11 does the HTTP.

A task is a generator that yields a :class:`Wait` when it needs the network, or None after a
bounded piece of computation, and returns its result. :func:`run` drives a task to the end,
blocking in ``select``: for scripts and the CLI. :func:`advance` does what it can within a time
budget and returns: for a GUI timer on the main thread (the Slicer module), which then never
waits for the network and needs no Python thread (inside Slicer, PythonQt keeps the GIL on the
main thread, so threads barely run). One request per connection: loopback connects in
microseconds, and a stream that is cut is then unambiguous.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

from .. import __version__
from ..errors import Med3DVLMError
from ..wire import is_loopback

PIECE = 1 << 20  # body bytes handed to h11 at a time
CONNECT_TIMEOUT = 10.0


class ServerError(Med3DVLMError):
    """The server refused or failed a request; the message is its one-sentence reason."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLost(ServerError):
    """The server could not be reached, or the connection ended before the answer did."""


@dataclass(frozen=True)
class Server:
    """Where a model server is and how to prove who we are: ``Server("http://127.0.0.1:8000", token)``.
    A path after the host (``https://gpu.lab.org/med3dvlm``) is kept: reverse proxies mount it so."""

    url: str
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # a private CA for https (else the system's trust store)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Med3DVLMError(f"{self.url!r} is not a server address; use http://HOST:PORT or https://HOST.")

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (443 if self.tls else 80)

    @property
    def prefix(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def is_local(self) -> bool:
        return is_loopback(self.host)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def detail(self) -> str:
        """The server's one-sentence reason (FastAPI's ``{"detail": ...}``), else the status."""
        try:
            detail = json.loads(self.body)["detail"]
            if isinstance(detail, str):
                return detail
        except (ValueError, KeyError, TypeError):
            pass
        return f"The server answered HTTP {self.status}."

    def error(self) -> ServerError:
        return ServerError(self.detail(), self.status)


class Wait:
    """A task waits until ``sock`` is readable (or writable)."""

    def __init__(self, sock: socket.socket, write: bool = False) -> None:
        self.sock, self.write = sock, write

    def ready(self, timeout: float) -> bool:
        if not self.write and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True  # decrypted bytes wait inside the TLS layer, invisible to select
        readable, writable, _ = select.select([] if self.write else [self.sock], [self.sock] if self.write else [],
                                              [], timeout)
        return bool(readable or writable)


class Pause:
    """A task has nothing to do until later (it polls something other than a socket)."""

    def ready(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False


def run(task, poll: float = 0.05):
    """Drive ``task`` to its end, blocking in ``select`` (``poll`` seconds at most at a time)."""
    while True:
        try:
            wait = task.send(None)
        except StopIteration as stop:
            return stop.value
        if wait is not None:
            wait.ready(poll)


def advance(task, budget: float = 0.008) -> tuple[bool, object]:
    """Run ``task`` until it waits for the network or ``budget`` seconds are spent; returns
    ``(finished, value)``. Exceptions of the task propagate."""
    deadline = time.perf_counter() + budget
    while True:
        try:
            wait = task.send(None)
        except StopIteration as stop:
            return True, stop.value
        if (wait is not None and not wait.ready(0)) or time.perf_counter() > deadline:
            return False, None


def exchange(server: Server, method: str, target: str, *, headers: Sequence[tuple[str, str]] = (),
             body: Iterable[bytes | memoryview] = (), length: int | None = None,
             on_line: Callable[[dict], None] | None = None):
    """Task: one request, its response. ``body`` may be produced while it is sent (a generator, with
    its ``length`` given); an exception it raises abandons the request, and the server sees the
    connection close before the body's end. With ``on_line``, a 200 response's body is read as JSON
    lines and each is passed on as it arrives (the body is then not kept)."""
    sock = yield from _connect(server)
    try:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", f"{server.host}:{server.port}"), ("User-Agent", f"med3dvlm/{__version__}"), *headers]
        if server.token:
            head.append(("Authorization", f"Bearer {server.token}"))
        if method in ("POST", "PUT"):
            head.append(("Content-Length", str(length if length is not None else sum(len(p) for p in body))))
        try:
            yield from _send(sock, conn.send(h11.Request(method=method, target=server.prefix + target, headers=head)))
            for piece in body:
                view = memoryview(piece).cast("B")
                for start in range(0, len(view), PIECE):
                    yield from _send(sock, conn.send(h11.Data(data=view[start:start + PIECE])))
                    yield None  # a bounded step: a GUI timer may end its tick here
            conn.send(h11.EndOfMessage())
        except OSError:
            pass  # the server may have answered already (413) and closed: read what it said
        return (yield from _receive(sock, conn, on_line))
    finally:
        sock.close()


def _connect(server: Server):
    try:
        family, kind, proto, _, address = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ConnectionLost(f"The model server's host {server.host} is unknown ({error}).") from None
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    code = sock.connect_ex(address)
    if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, getattr(errno, "WSAEWOULDBLOCK", -1)):
        while not Wait(sock, write=True).ready(0):
            if time.monotonic() - started > CONNECT_TIMEOUT:
                sock.close()
                raise ConnectionLost(f"The model server at {server.url} does not answer.")
            yield Wait(sock, write=True)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        sock.close()
        raise ConnectionLost(f"No model server answers at {server.url} ({os.strerror(code)}).")
    if not server.tls:
        return sock
    context = ssl.create_default_context(cafile=server.ca_file)
    tls = context.wrap_socket(sock, server_hostname=server.host, do_handshake_on_connect=False)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            yield Wait(tls)
        except ssl.SSLWantWriteError:
            yield Wait(tls, write=True)
        except (ssl.SSLError, OSError) as error:
            tls.close()
            raise ConnectionLost(f"The secure connection to {server.url} failed ({error}).") from None


def _send(sock, data: bytes):
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError):
            yield Wait(sock, write=True)
        except ssl.SSLWantReadError:
            yield Wait(sock)


def _receive(sock, conn: h11.Connection, on_line):
    response, body, partial = None, bytearray(), b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            raise ConnectionLost("The model server closed the connection before its answer was complete; "
                                 "it may have stopped.") from None
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(sock.recv(1 << 16))
            except (BlockingIOError, ssl.SSLWantReadError):
                yield Wait(sock)
            except ssl.SSLWantWriteError:
                yield Wait(sock, write=True)
            except OSError as error:
                raise ConnectionLost(f"The connection to the model server broke ({error}).") from None
            else:
                yield None  # a bounded step: a GUI timer may end its tick here
        elif isinstance(event, h11.Response):
            response = Response(event.status_code, {k.decode().lower(): v.decode() for k, v in event.headers})
        elif isinstance(event, h11.Data):
            if on_line is not None and response.status == 200:
                lines = (partial + bytes(event.data)).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    if line.strip():
                        on_line(json.loads(line))
            else:
                body += event.data
        elif isinstance(event, h11.EndOfMessage):
            response.body = bytes(body)
            return response
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionLost("The model server closed the connection without answering.")
