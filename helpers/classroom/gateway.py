"""The authenticating gateway: the only thing a class server shows to the network.

vLLM's ``--api-key`` guards only paths under ``/v1``, ``/v2``, ``/inference`` (and, in newer
releases, ``/cohere``): without a key ``POST /invocations`` generates text, and ``/tokenize``,
``/detokenize``, ``/metrics``, ``/load``, ``/docs``, ``/openapi.json`` (and ``/pause``,
``/resume`` where they exist) answer anyone. So vLLM listens on 127.0.0.1 with an *internal* key
(``VLLM_API_KEY`` in its environment), and this gateway, bound to the network address, passes
exactly these and answers everything else itself, without touching vLLM:

* ``GET /health``: no key; ``{"status": "ok"}`` (or 503 ``unavailable``), nothing else;
* ``GET /v1/models``, ``GET /version`` and ``GET /metrics``: a student's key (the load numbers
  notebook 04 reads to show a stopped stream ending at the server; vLLM itself serves
  ``/metrics`` and ``/version`` to anyone);
* ``POST /v1/chat/completions`` and ``POST /v1/completions``: a student's key, and the body
  checked and capped (``policy``);
* ``POST /tokenize`` and ``POST /detokenize`` (notebook 02 shows the prompt the chat template
  builds): a student's key, and only their plain fields (``policy``);
* any other path: 404, any other method: 405, as OpenAI-style JSON errors.

Toward vLLM the student's key is replaced by the internal key, and only ``Content-Type`` goes
along (no other header of the student's). Answers stream back byte for byte as they arrive,
with ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no``; nothing compresses them.

* **Keys** come from the keys file (``keys``: student -> sha256 of their key), re-read when it
  changes (looked at once a second, and at once when an unknown key arrives, so that a key made
  a moment ago works on its first request; one ``stat`` each). A revoked key's next request gets 401, and
  its open streams end within about a second with an ``{"error": ...}`` event that says so
  (a request still waiting for its answer gets the 401 itself). A keys file that turns
  unreadable refuses every new request (503) until it is fixed: never fail open.
* **Fairness**: at most ``per_key_concurrency`` generation requests open per key,
  ``per_key_requests`` of any route per key (so one key's ``/metrics`` loops cannot fill the
  class's places), ``per_key_rate`` requests a second per key after a burst of ``per_key_burst``
  (short requests back to back would keep vLLM's API server busy), and ``global_concurrency`` in
  all (429 beyond, at once, with the reason), counted before a body is read; bodies are limited
  in size, time and nesting, and policed (``policy``). Before any of that, a peer address holds
  at most ``per_peer_connections`` connections, and a request's head must arrive within
  ``header_timeout`` (``connections``); no WebSockets.
* **Cancelling** is passed on: a student who closes the connection (the notebook's Stop
  button) closes the gateway's connection to vLLM, and vLLM aborts the request. vLLM's answer
  is read by a task of its own into a queue, so a revocation or a disconnect also interrupts a
  wait on a silent vLLM (a queued request), and cleanup runs in the request's own ``finally``
  (Starlette's ``StreamingResponse`` + ``BackgroundTask(r.aclose)`` notices neither while vLLM is
  silent, and skips the background task on a disconnect under ASGI spec 2.4).

Run it::

    TUTORIAL_GATEWAY_KEYS=~/.cache/vllm-tutorial/classroom/keys.json \\
    TUTORIAL_GATEWAY_INTERNAL_KEY_FILE=/path/to/internal.key \\
    python -m helpers.classroom.gateway --host 0.0.0.0 --port 8080 --upstream http://127.0.0.1:8000

(``TUTORIAL_GATEWAY_INTERNAL_KEY`` works too). Keys never go on the command line, where every
user of the machine reads them with ``ps``. It prints ``gateway ready: ...`` once it accepts
connections and ends cleanly on SIGTERM or SIGINT (open streams get an error event first).
From Python, ``helpers.classroom.start_gateway(server, host=...)`` starts it under the
project's guard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..endpoint import shown_at
from . import keys as keyfile
from .connections import guarded_h11
from .policy import GENERATION_ROUTES, TOKEN_ROUTES, Limits, Refused, encode, parse_body, police

INTERNAL_KEY_VARIABLE = "TUTORIAL_GATEWAY_INTERNAL_KEY"
INTERNAL_KEY_FILE_VARIABLE = "TUTORIAL_GATEWAY_INTERNAL_KEY_FILE"
KEYS_VARIABLE = keyfile.KEYS_VARIABLE
READY_LINE = "gateway ready:"

# The only routes that reach vLLM, and the one method each accepts.
FORWARDED = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST",
             "/tokenize": "POST", "/detokenize": "POST", "/metrics": "GET", "/version": "GET"}
SERVED = ("GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, "
          "POST /tokenize, POST /detokenize, GET /metrics, GET /version")
SSE = "text/event-stream"
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def error_body(message: str, type: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def sse_error(message: str, type: str, code: str) -> bytes:
    return b"data: " + json.dumps(error_body(message, type, code), ensure_ascii=False).encode() + b"\n\n"


def _refusal(err: Refused, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.payload(), status_code=err.status, headers={**err.headers, **(headers or {})} or None)


# --------------------------------------------------------------------------- keys
class KeyWatcher:
    """The keys file, re-read when its mtime (or inode, size, mode) changes, looked at no more
    often than ``interval`` seconds. ``table`` is None while the file cannot be used."""

    def __init__(self, path: Path, interval: float):
        self.path = path
        self.interval = interval
        self.table: keyfile.KeyTable | None = keyfile.read_table(path)    # the first read must work
        self.error: str | None = None
        self._signature = self._sign()
        self._looked = time.monotonic()

    def _sign(self) -> tuple | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_ino, info.st_size, info.st_mode)

    def check(self, at_once: bool = False) -> bool:
        """Re-read the file if it changed since last time (at most once per interval, unless
        ``at_once``); True when the table was reloaded (or became unusable)."""
        now = time.monotonic()
        if not at_once and now - self._looked < self.interval:
            return False
        self._looked = now
        signature = self._sign()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self.table, self.error = keyfile.read_table(self.path), None
        except keyfile.KeysError as err:
            self.table, self.error = None, str(err)
        return True


# --------------------------------------------------------------------------- one request
@dataclass(eq=False)
class Flow:
    """One request on its way through: the pump task feeds ``queue`` with ``("head", response)``,
    ``("chunk", bytes)`` ..., then ``("end",)`` or ``("error", exc)``; ``cancel`` puts
    ``("cancel", Refused | None)`` and stops the pump (which closes the connection to vLLM)."""

    student: str
    key_hash: str
    route: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pump: asyncio.Task | None = None
    cancelled: bool = False

    def cancel(self, reason: Refused | None) -> None:
        """End this request: ``reason`` is told to the student (None: nobody is listening)."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.pump is not None:
            self.pump.cancel()
        self.queue.put_nowait(("cancel", reason))


def _revoked(student: str) -> Refused:
    return Refused(401, f"this API key (student {student!r}) was revoked by the teacher; ask them for a "
                        f"new one", type="authentication_error", code="revoked_api_key")


SHUTTING_DOWN = Refused(503, "the class server is shutting down; try again when your teacher restarts it",
                        type="server_error", code="shutting_down")


# --------------------------------------------------------------------------- the gateway
class Gateway:
    def __init__(self, upstream_url: str, internal_key: str, keys_path: Path | str,
                 limits: Limits | None = None, log: Callable[[str], None] | None = None,
                 upstream_uds: str | None = None):
        parts = urlsplit(upstream_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the upstream must be an http(s) URL, got {upstream_url!r}")
        self.upstream = upstream_url.rstrip("/")
        if self.upstream.endswith("/v1"):
            self.upstream = self.upstream[:-3]
        self._internal_key = internal_key
        self.upstream_uds = upstream_uds           # vLLM's Unix socket, where it listens on one
        self.limits = limits or Limits()
        self.keys = KeyWatcher(Path(keys_path), self.limits.keys_check_interval)
        self.log = log or (lambda line: print(line, flush=True))
        self.client: httpx.AsyncClient | None = None
        self.flows: dict[str, set[Flow]] = defaultdict(set)
        self.open_total = 0
        self.open_generation: dict[str, int] = defaultdict(int)
        self.open_requests: dict[str, int] = defaultdict(int)      # every route, per key
        self.buckets: dict[str, tuple[float, float]] = {}          # per key: (requests left, when counted)
        self.closing = False
        self._watch_task: asyncio.Task | None = None
        self._health: tuple[float, bool] = (-1e9, False)
        self._health_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:      # never shows the internal key
        return f"<Gateway -> {self.upstream}, {self.open_total} open>"

    # ------------------------------------------------------------ life
    async def start(self) -> None:
        size = self.limits.upstream_connections
        pool = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self.client = httpx.AsyncClient(
            base_url=self.upstream,
            timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=10.0),   # streams: no read timeout
            transport=httpx.AsyncHTTPTransport(uds=self.upstream_uds, limits=pool),
            trust_env=False)                      # no proxy variables between us and the loopback
        self._health_lock = asyncio.Lock()
        self._watch_task = asyncio.create_task(self._watch_keys())

    async def close(self) -> None:
        self.end_all(SHUTTING_DOWN)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.client is not None:
            await self.client.aclose()

    def end_all(self, reason: Refused | None) -> None:
        """End every open request (shutting down)."""
        self.closing = True
        for flows in list(self.flows.values()):
            for flow in list(flows):
                flow.cancel(reason)

    async def _watch_keys(self) -> None:
        while True:
            await asyncio.sleep(self.limits.keys_check_interval)
            try:
                self.reload_keys()
            except Exception as err:          # never let the watcher die: revocation depends on it
                self.log(f"keys: error while checking {self.keys.path}: {err!r}")

    def reload_keys(self, at_once: bool = False) -> None:
        """Look at the keys file (at most once per interval, unless ``at_once``); end the streams of
        keys no longer valid."""
        if not self.keys.check(at_once):
            return
        table = self.keys.table
        if table is None:
            self.log(f"keys: {self.keys.error} -- refusing new requests until it is fixed")
            return
        ended = []
        for key_hash, flows in list(self.flows.items()):
            if key_hash not in table.active and flows:
                for flow in list(flows):
                    flow.cancel(_revoked(flow.student))
                ended.append(f"{len(flows)} of {next(iter(flows)).student}")
        self.log(f"keys: reloaded {self.keys.path}: {len(table.active)} active, {len(table.revoked)} revoked"
                 + (f"; ended open request(s): {', '.join(ended)}" if ended else ""))

    # ------------------------------------------------------------ checks
    def authenticate(self, request: Request) -> tuple[str, str]:
        """(student, sha256 of their key), or ``Refused`` (401; 503 while the keys file is unusable)."""
        header = request.headers.get("authorization")
        if not header:
            self._usable_table()
            raise Refused(401, "no API key: send the header 'Authorization: Bearer <your key>' (set "
                               "TUTORIAL_API_KEY to the key your teacher gave you)",
                          type="authentication_error", code="missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._usable_table()
            raise Refused(401, "the Authorization header must be 'Bearer <your key>'",
                          type="authentication_error", code="invalid_api_key")
        key_hash = keyfile.hash_key(token)
        table = self._usable_table()
        if key_hash not in table.active and key_hash not in table.revoked:
            # A key made a moment ago works at once: look at the file now (one stat; re-read only
            # if it changed) rather than at the next interval.
            table = self._usable_table(at_once=True)
        student = table.active.get(key_hash)
        if student is not None:
            return student, key_hash
        if key_hash in table.revoked:
            raise _revoked(table.revoked[key_hash])
        raise Refused(401, "this API key is not valid here (mistyped, or not one of this class's keys)",
                      type="authentication_error", code="invalid_api_key")

    def _usable_table(self, at_once: bool = False) -> keyfile.KeyTable:
        self.reload_keys(at_once)
        if self.keys.table is None:
            raise Refused(503, "the class server cannot read its keys file, so it refuses every request "
                               "until the teacher fixes it", type="server_error", code="keys_unavailable")
        return self.keys.table

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = Refused(413, f"the request body is larger than this class server accepts "
                                 f"({limit} bytes)", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive within {self.limits.body_timeout:.0f} s",
                          code="body_timeout") from None
        return b"".join(chunks)

    def admit(self, key_hash: str, generation: bool) -> None:
        if self.closing:
            raise SHUTTING_DOWN
        if self.open_total >= self.limits.global_concurrency:
            raise Refused(429, f"the class server is busy: {self.open_total} requests are open, the most it "
                               f"takes at once for the whole class; try again in a moment",
                          type="rate_limit_error", code="server_busy")
        if generation and self.open_generation[key_hash] >= self.limits.per_key_concurrency:
            raise Refused(429, f"too many requests at once on this key: {self.limits.per_key_concurrency} are "
                               f"still open (the most one key may have); wait for one to finish",
                          type="rate_limit_error", code="too_many_concurrent_requests")
        # every route counts here, /metrics and /v1/models too: one key cannot fill the class's places
        if self.open_requests[key_hash] >= self.limits.per_key_requests:
            raise Refused(429, f"too many requests at once on this key: {self.limits.per_key_requests} of any "
                               f"kind are still open (the most one key may have); wait for one to finish",
                          type="rate_limit_error", code="too_many_concurrent_requests")
        self.spend(key_hash)
        self.open_total += 1
        self.open_requests[key_hash] += 1
        if generation:
            self.open_generation[key_hash] += 1

    def spend(self, key_hash: str) -> None:
        """One request from the key's bucket, which refills at ``per_key_rate`` a second up to
        ``per_key_burst``: open requests are capped above, but short ones (a /tokenize of a long
        text, /v1/models) sent back to back would still keep vLLM's API server busy for everyone."""
        rate, burst = self.limits.per_key_rate, self.limits.per_key_burst
        now = time.monotonic()
        left, counted = self.buckets.get(key_hash, (burst, now))
        left = min(burst, left + (now - counted) * rate)
        if left < 1:
            retry = max(1, math.ceil((1 - left) / rate))       # whole seconds, as Retry-After takes them
            raise Refused(429, f"too many requests on this key: at most {rate:g} a second after a burst of "
                               f"{burst}; try again in {retry} s", type="rate_limit_error", code="rate_limited",
                          headers={"Retry-After": str(retry)})
        self.buckets[key_hash] = (left - 1, now)

    def release(self, key_hash: str, generation: bool) -> None:
        self.open_total -= 1
        self.open_requests[key_hash] -= 1
        if not self.open_requests[key_hash]:
            del self.open_requests[key_hash]
        if generation:
            self.open_generation[key_hash] -= 1
            if not self.open_generation[key_hash]:
                del self.open_generation[key_hash]

    # ------------------------------------------------------------ /health
    async def health(self, request: Request) -> JSONResponse:
        """Whether vLLM answers its /health: the status, nothing else; asked at most once a second."""
        async with self._health_lock:
            asked, healthy = self._health
            if time.monotonic() - asked >= self.limits.health_cache_seconds:
                try:
                    reply = await self.client.get("/health", timeout=5.0)
                    healthy = reply.status_code == 200
                except httpx.HTTPError:
                    healthy = False
                self._health = (time.monotonic(), healthy)
        if healthy and not self.closing:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    # ------------------------------------------------------------ the forwarded routes
    async def forward(self, scope, receive, send) -> None:
        """An ASGI app for the forwarded routes (the router sends only exact paths here)."""
        route, method = scope["path"], scope["method"]
        started = time.monotonic()
        if method != FORWARDED[route]:
            err = Refused(405, f"{route} takes {FORWARDED[route]} only", code="method_not_allowed")
            await _refusal(err, {"Allow": FORWARDED[route]})(scope, receive, send)
            return
        request = Request(scope, receive)
        policed = route in GENERATION_ROUTES or route in TOKEN_ROUTES      # a body read and checked; per-key cap
        student, key_hash, changed, payload = "-", "-", [], None
        admitted = False
        try:
            student, key_hash = self.authenticate(request)
            # Counted before the body is read: a slow upload holds one of its key's places, so
            # one key cannot hold many connections uploading slowly.
            self.admit(key_hash, policed)
            admitted = True
            if policed:
                body, changed = police(parse_body(await self.read_body(request)), route, self.limits)
                payload = encode(body)
        except BaseException as err:
            if admitted:                                   # whatever ended it, its place is free again
                self.release(key_hash, policed)
            if isinstance(err, Refused):
                self._log(student, method, route, err.status, started, err.code)
                await _refusal(err)(scope, receive, send)
                return
            if isinstance(err, ClientDisconnect):
                return
            raise
        flow = Flow(student, key_hash, route)
        self.flows[key_hash].add(flow)
        try:
            status, note = await self._relay(flow, method, payload, changed, receive, send)
        finally:
            self.flows[key_hash].discard(flow)
            if not self.flows[key_hash]:
                del self.flows[key_hash]
            self.release(key_hash, policed)
        self._log(student, method, route, status, started, note)

    async def _pump(self, flow: Flow, request: httpx.Request) -> None:
        response = None
        try:
            response = await self.client.send(request, stream=True)
            flow.queue.put_nowait(("head", response))
            async for chunk in response.aiter_raw():
                flow.queue.put_nowait(("chunk", chunk))
            flow.queue.put_nowait(("end",))
        except httpx.HTTPError as err:
            flow.queue.put_nowait(("error", err))
        finally:
            if response is not None:
                await response.aclose()      # unread: the connection closes, vLLM aborts the request

    @staticmethod
    async def _watch_client(receive, flow: Flow) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                flow.cancel(None)
                return

    async def _relay(self, flow: Flow, method: str, payload: bytes | None, changed: list[str],
                     receive, send) -> tuple[int | str, str]:
        # X-Session-ID: one value per student key (a prefix of its hash, never the key or the name),
        # so that a router in front of several replicas (vllm-router's consistent_hash, notebook 09)
        # sends a student's requests, and so their conversation's cached prefix, to one replica.
        # The student's own headers are not passed on: nobody picks a replica, or sets it for another.
        headers = {"Authorization": f"Bearer {self._internal_key}", "Accept-Encoding": "identity",
                   "X-Session-ID": flow.key_hash[:16]}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        request = self.client.build_request(method, flow.route, content=payload, headers=headers)
        flow.pump = asyncio.create_task(self._pump(flow, request))
        watcher = asyncio.create_task(self._watch_client(receive, flow))
        try:
            item = await flow.queue.get()
            if item[0] == "cancel":
                if item[1] is None:
                    return "-", "client went away before the answer"
                await send_json(send, item[1].status, item[1].payload())
                return item[1].status, item[1].code
            if item[0] == "error":
                err = Refused(502, f"the model server behind this gateway cannot be reached "
                                   f"({type(item[1]).__name__}); tell your teacher",
                              type="server_error", code="upstream_unavailable")
                await send_json(send, 502, err.payload())
                return 502, f"upstream {type(item[1]).__name__}: {item[1]}"
            response: httpx.Response = item[1]
            if response.status_code == 401:          # vLLM refused *our* key: not the student's fault
                err = Refused(502, "the model server refused the gateway's own key (the gateway's internal "
                                   "key must be vLLM's VLLM_API_KEY); tell your teacher",
                              type="server_error", code="upstream_auth")
                await send_json(send, 502, err.payload())
                return 502, "vLLM refused the internal key"
            content_type = response.headers.get("content-type", "application/json")
            out = [(b"content-type", content_type.encode("latin-1"))]
            streaming = content_type.startswith(SSE)
            if streaming:
                out += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            if changed:
                out.append((b"x-tutorial-gateway-adjusted", "; ".join(changed).encode("ascii", "replace")))
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            note = await self._pass_body(flow, streaming, send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return response.status_code, note
        finally:
            flow.cancel(None)
            watcher.cancel()
            await asyncio.gather(flow.pump, watcher, return_exceptions=True)

    @staticmethod
    async def _pass_body(flow: Flow, streaming: bool, send) -> str:
        """Send the answer on as it comes. For an event stream, bytes go out up to the end of the
        last whole event (the rest follows with the next chunk), so an error event of the
        gateway's own can always be added after them."""
        pending = b""
        while True:
            item = await flow.queue.get()
            kind = item[0]
            if kind == "chunk":
                data = pending + item[1]
                if streaming:
                    cut = max(data.rfind(end) + len(end) if data.rfind(end) >= 0 else 0 for end in _EVENT_ENDS)
                    data, pending = data[:cut], data[cut:]
                else:
                    pending = b""
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                continue
            if kind == "end":
                if pending:
                    await send({"type": "http.response.body", "body": pending, "more_body": True})
                return "stream" if streaming else ""
            if kind == "cancel":
                reason: Refused | None = item[1]
                if reason is None:
                    return "client went away"
                if streaming:
                    await send({"type": "http.response.body", "more_body": True,
                                "body": sse_error(reason.message, reason.type, reason.code)})
                return f"ended: {reason.code}"
            if kind == "error":
                if streaming:
                    await send({"type": "http.response.body", "more_body": True, "body": sse_error(
                        f"the model server's answer was cut ({type(item[1]).__name__}); tell your teacher",
                        "server_error", "upstream_cut")})
                return f"upstream cut: {item[1]!r}"

    def _log(self, student: str, method: str, route: str, status, started: float, note: str = "") -> None:
        self.log(f"{time.strftime('%H:%M:%S')} {student} {method} {route} {status} "
                 f"{time.monotonic() - started:.1f}s{(' ' + note) if note else ''}")


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- the app
class _AsgiEndpoint:
    """Makes Starlette hand the route's raw ASGI call over (a plain method would be wrapped as a
    request -> response function), with every method: ``forward`` answers 405 itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def make_app(upstream_url: str, internal_key: str, keys_path: Path | str, limits: Limits | None = None,
             log: Callable[[str], None] | None = None, upstream_uds: str | None = None) -> Starlette:
    """The gateway as an ASGI app (``app.state.gateway`` is the ``Gateway``). Raises
    ``keys.KeysError`` at once when the keys file is missing, unreadable or not private."""
    gateway = Gateway(upstream_url, internal_key, keys_path, limits, log, upstream_uds)

    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return JSONResponse(error_body(f"{request.url.path} takes {exc.headers.get('Allow', 'GET')} only",
                                           "invalid_request_error", "method_not_allowed"),
                                status_code=405, headers=exc.headers)
        return JSONResponse(error_body(f"no such route on this class server: {request.method} "
                                       f"{request.url.path}; it serves {SERVED}",
                                       "invalid_request_error", "not_found"), status_code=exc.status_code)

    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        gateway.log(f"error in the gateway: {exc!r}")
        return JSONResponse(error_body("the gateway failed on this request; tell your teacher",
                                       "server_error", "gateway_error"), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    routes = [Route("/health", gateway.health, methods=["GET"])]
    routes += [Route(path, _AsgiEndpoint(gateway.forward)) for path in FORWARDED]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, Exception: crashed})
    app.router.redirect_slashes = False       # /v1/models/ is not /v1/models: 404, not a redirect
    app.state.gateway = gateway
    return app


# --------------------------------------------------------------------------- the process
class _Server(uvicorn.Server):
    """uvicorn, with open streams ended (an error event each) as soon as SIGTERM or SIGINT
    arrives, so the graceful shutdown does not wait for answers to finish; then exit code 0."""

    gateway: Gateway | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.gateway is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.gateway.end_all, SHUTTING_DOWN)
        super().handle_exit(sig, frame)
        # uvicorn (0.55, pinned) would raise it again at the end: exit 0 instead. A private attribute:
        # test_gateway_process.py checks the exit code after SIGTERM, so a uvicorn that renames it fails there.
        self._captured_signals.clear()


def internal_key_from_environment(environ=os.environ) -> str:
    named_file = environ.get(INTERNAL_KEY_FILE_VARIABLE)
    if named_file:
        try:
            key = Path(named_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as err:
            raise SystemExit(f"error: {INTERNAL_KEY_FILE_VARIABLE} names {named_file}, which cannot be read: {err}")
    else:
        key = environ.get(INTERNAL_KEY_VARIABLE, "").strip()
    if not key:
        raise SystemExit(f"error: no internal key: set {INTERNAL_KEY_VARIABLE} (or {INTERNAL_KEY_FILE_VARIABLE}, "
                         f"a file holding it) to the key vLLM was started with (its VLLM_API_KEY)")
    return key


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {err.strerror or err}")
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _follow(pid: int, started: int | None, server: _Server, loop: asyncio.AbstractEventLoop) -> None:
    """End the gateway when process ``pid`` (the vLLM server's guard) ends."""
    from ..server.guard import runs

    def gone(why: str) -> None:
        print(f"gateway: {why}; stopping", flush=True)
        server.handle_exit(signal.SIGTERM, None)

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        gone(f"the server process {pid} it serves is gone")
        return
    if not runs(pid, started):
        os.close(fd)
        gone(f"the server process {pid} it serves is gone")
        return
    def ended() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        gone(f"the server process {pid} ended")

    loop.add_reader(fd, ended)


async def _serve(app: Starlette, sock: socket.socket, url: str, args) -> None:
    gateway: Gateway = app.state.gateway
    limits = gateway.limits
    # h11 with a bound on each peer's connections and on the time to a whole request head
    # (connections.py): uvicorn alone let 600 half-sent request lines shut out the class. Its
    # limit_concurrency (a 503 for everyone beyond it) stays as the last resort, well above what
    # one peer may hold.
    keep_alive = 15
    protocol = guarded_h11(limits.header_timeout, limits.per_peer_connections, gateway.log, keep_alive)
    config = uvicorn.Config(app, http=protocol, ws="none", log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive,
                            limit_concurrency=max(1024, 4 * limits.global_concurrency, 4 * limits.per_peer_connections))
    server = _Server(config)
    server.gateway, server.loop = gateway, asyncio.get_running_loop()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        table = gateway.keys.table
        print(f"{READY_LINE} {url} -> {shown_at(gateway.upstream, gateway.upstream_uds)} ({len(table.active)} student key(s); "
              f"max_tokens {gateway.limits.max_tokens}, {gateway.limits.per_key_concurrency} generating and "
              f"{gateway.limits.per_key_requests} requests open per key, {gateway.limits.per_key_rate:g} a second, "
              f"{gateway.limits.global_concurrency} in all)", flush=True)
        if args.follow_pid:
            _follow(args.follow_pid, args.follow_start, server, server.loop)
    await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.classroom.gateway",
        description=f"Serve a loopback vLLM to the network with per-student keys. Environment: "
                    f"{KEYS_VARIABLE} (the keys file), {INTERNAL_KEY_VARIABLE} or {INTERNAL_KEY_FILE_VARIABLE} "
                    f"(vLLM's own key).")
    parser.add_argument("--host", required=True, help="the address students reach (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="vLLM's URL on this machine, e.g. http://127.0.0.1:8000")
    parser.add_argument("--upstream-uds", default=None,
                        help="vLLM's Unix socket (vLLM's --uds), reached with --upstream's URL as the Host")
    parser.add_argument("--network", default=None, metavar="PID:START",
                        help="after binding --host:--port, enter the private network held by this process "
                             "(helpers.classroom.network): the upstream is the one inside")
    parser.add_argument("--follow-pid", type=int, default=None, help="stop when this process (vLLM's guard) ends")
    parser.add_argument("--follow-start", type=int, default=None, help="its start time (/proc/PID/stat field 22)")
    for f in fields(Limits):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"(default {f.default})")
    args = parser.parse_args(argv)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    keys_path = os.environ.get(KEYS_VARIABLE)
    if not keys_path:
        print(f"error: set {KEYS_VARIABLE} to the keys file (python -m helpers.classroom.keys create ...)",
              file=sys.stderr)
        return 2
    internal_key = internal_key_from_environment()
    try:
        app = make_app(args.upstream, internal_key, Path(keys_path).expanduser(), limits, upstream_uds=args.upstream_uds)
    except (keyfile.KeysError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.upstream_uds and urlsplit(args.upstream).hostname not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the upstream {args.upstream} is not on loopback; vLLM itself should listen on "
              f"127.0.0.1 so that nothing reaches it around the gateway", flush=True)
    sock = _bind(args.host, args.port)
    if args.network:
        from . import network

        pid, _, started = args.network.partition(":")
        try:
            network.enter(int(pid), int(started) if started else None)
        except (ValueError, network.PrivateNetworkError) as err:
            print(f"error: --network {args.network}: {err}", file=sys.stderr)
            return 2
    from ..endpoint import http_url

    asyncio.run(_serve(app, sock, http_url(args.host, sock.getsockname()[1]), args))
    print("gateway stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
