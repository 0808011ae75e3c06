"""A small local HTTP server for the stream faults vLLM will not produce on demand.

``FaultServer`` listens on 127.0.0.1 (port 0: a free port), answers every request with a scripted
``Reply`` and writes its body as raw bytes, exactly in the pieces given: one HTTP chunk per piece
(``framing="chunked"``, what vLLM's uvicorn sends), or a body that ends when the server closes
the connection (``"close"``), or a ``Content-Length`` body (``"length"``). Between pieces it may
pause, and at the end it may finish properly, cut the connection (after a whole piece, or in the
middle of an announced HTTP chunk), or hold the connection open until the client goes.

It records what it received (``requests``) and notices a client that leaves early
(``client_gone``, ``client_gone_at``). Every wait is bounded, and leaving the ``with`` block
shuts the server and every connection down and checks that no thread of it is left running.

tests/ is not a package: the test files import this module as ``sse_fault_server`` (pytest's
default "prepend" import mode puts this folder on sys.path).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

DATA = Path(__file__).resolve().parent.parent / "data"

HOLD_LIMIT = 10.0       # the longest a "hold" reply waits for the client to go
JOIN_TIMEOUT = 5.0      # the longest stop() waits for a thread of the server to end


def split_at(data: bytes, offsets: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given byte offsets (empty pieces are dropped)."""
    bounds = [0, *sorted(offsets), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def split_every(data: bytes, size: int) -> list[bytes]:
    """``data`` in pieces of ``size`` bytes (the last one shorter)."""
    return [data[i:i + size] for i in range(0, len(data), size)]


@dataclass
class Reply:
    """One scripted answer.

    ``parts`` are written one by one, each as its own HTTP chunk when ``framing`` is "chunked".
    ``header_delay`` seconds pass before anything is sent (a server that accepts and stalls),
    ``pause`` seconds before every part after the first. ``end`` is one of

    * ``"complete"``: the body ends properly (the final ``0`` chunk, or the close, or all of the
      announced length);
    * ``"cut"``: the socket is closed right after the last part (chunked: no final ``0`` chunk;
      length: fewer bytes than announced; close: the same as complete, the client cannot tell);
    * ``"cut_mid_chunk"``: (chunked only) the last part's chunk header announces twice its
      length, only the part is sent, and the socket is closed;
    * ``"hold"``: after the last part the connection stays open, sending nothing, until the
      client closes it (or ``HOLD_LIMIT`` seconds pass).
    """

    parts: list[bytes]
    status: int = 200
    content_type: str = "text/event-stream; charset=utf-8"
    framing: str = "chunked"
    pause: float = 0.0
    end: str = "complete"
    header_delay: float = 0.0

    def __post_init__(self) -> None:
        assert self.framing in ("chunked", "close", "length"), self.framing
        assert self.end in ("complete", "cut", "cut_mid_chunk", "hold"), self.end
        assert self.end != "cut_mid_chunk" or self.framing == "chunked"


def json_reply(status: int, payload, **options) -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Reply(parts=[body], status=status, content_type="application/json", framing="length",
                 **options)


def text_reply(status: int, text: str, **options) -> Reply:
    return Reply(parts=[text.encode()], status=status, content_type="text/plain; charset=utf-8",
                 framing="length", **options)


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: dict | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False          # stop() joins the handler threads itself, with a timeout


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    fault: "FaultServer"

    def setup(self) -> None:
        super().setup()
        self.fault = self.server.fault          # type: ignore[attr-defined]
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.settimeout(HOLD_LIMIT)
        self.fault._track(self.connection)

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    # ------------------------------------------------------------------ the answer
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.fault.requests.append(Received(self.command, self.path, dict(self.headers), body))
        reply = self.fault._next_reply()
        self.close_connection = True
        try:
            self._write(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.fault._gone()

    def _write(self, reply: Reply) -> None:
        if reply.header_delay and self._client_left_within(reply.header_delay):
            self.fault._gone()
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Connection", "close")
        if reply.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        elif reply.framing == "length":
            self.send_header("Content-Length", str(sum(map(len, reply.parts))))
        self.end_headers()
        last = len(reply.parts) - 1
        for i, part in enumerate(reply.parts):
            if i and reply.pause and self._client_left_within(reply.pause):
                self.fault._gone()
                return
            if reply.framing != "chunked":
                self.wfile.write(part)
            elif i == last and reply.end == "cut_mid_chunk":
                self.wfile.write(b"%x\r\n" % (2 * len(part)) + part)
            else:
                self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
        if reply.end == "hold":
            if self._client_left_within(HOLD_LIMIT):
                self.fault._gone()
            return
        if reply.end in ("cut", "cut_mid_chunk"):
            self._cut()
            return
        if reply.framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _client_left_within(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as the client has closed the connection (it sends
        nothing after its request, so anything readable is the end of the connection)."""
        deadline = time.monotonic() + seconds
        while not self.fault._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable:
                try:
                    if self.connection.recv(1024) == b"":
                        return True
                except OSError:
                    return True
        return False

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FaultServer:
    """``with FaultServer(reply, ...) as server:`` serves the replies in order (the last one
    again for any further request) at ``server.base_url`` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, *replies: Reply):
        assert replies, "give at least one Reply"
        self.replies = list(replies)
        self.requests: list[Received] = []
        self.client_gone = threading.Event()      # a client closed its connection mid-answer
        self.client_gone_at: float | None = None   # time.monotonic() at that moment
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._served = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life
    def start(self) -> "FaultServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fault = self                  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut everything down; raise if a thread of the server is still running after
        ``JOIN_TIMEOUT`` seconds."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        left = []
        for thread in [self._thread, *threads]:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                left.append(thread.name)
        self._server = None
        assert not left, f"fault server threads still running: {left}"

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ used by the handler
    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            self._threads.append(threading.current_thread())

    def _next_reply(self) -> Reply:
        with self._lock:
            reply = self.replies[min(self._served, len(self.replies) - 1)]
            self._served += 1
        return reply

    def _gone(self) -> None:
        if not self.client_gone.is_set():
            self.client_gone_at = time.monotonic()
            self.client_gone.set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
