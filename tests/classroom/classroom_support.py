"""What the classroom tests share: ASGI apps run by uvicorn in a thread, a fake vLLM that
records what reaches it, keys files, and the routes the installed vLLM serves.

pytest imports the test files of tests/classroom/ with this folder on sys.path, so they import
this module as ``classroom_support`` (a name no other folder uses).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from helpers.classroom import keys as keyfile

INTERNAL_KEY = "internal-key-for-tests"


class ThreadServer:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.app = app
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


@dataclass
class FakeVLLM:
    """A stand-in for vLLM that records every request that reaches it.

    ``POST /v1/chat/completions`` and ``/v1/completions`` with ``"stream": true`` send
    ``max_tokens`` events (``"gap"`` seconds apart), then ``[DONE]``; with ``"hold": true`` they
    send one event and then nothing until the client goes (``cancelled`` counts those);
    ``"split": true`` sends each event in two writes cut inside a multi-byte character.
    Without ``stream`` they answer one JSON object (after ``hold`` too, if asked).
    """

    requests: list[dict] = field(default_factory=list)
    required_key: str | None = None       # like VLLM_API_KEY: /v1/* without it is 401
    cancelled: int = 0
    open: int = 0
    sent: list[bytes] = field(default_factory=list)
    hold_metrics: bool = False            # GET /metrics sends one line, then holds until the client goes

    def app(self) -> Starlette:
        async def health(request: Request):
            return JSONResponse({})

        async def models(request: Request):
            self._record(request, None)
            if self._refuses(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

        async def generate(request: Request):
            body = json.loads(await request.body())
            self._record(request, body)
            if self._refuses(request):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            if not body.get("stream"):
                if body.get("hold"):
                    await self._hold(request)
                return JSONResponse({"choices": [{"text": "answer"}], "usage": {"completion_tokens": 1}})
            return StreamingResponse(self._events(request, body), media_type="text/event-stream")

        async def metrics(request: Request):
            self._record(request, None)
            if self.hold_metrics:
                return StreamingResponse(self._held_lines(), media_type="text/plain")
            return PlainTextResponse('vllm:num_requests_running{engine="0"} 0.0\n')

        async def version(request: Request):
            self._record(request, None)
            return JSONResponse({"version": "fake"})

        async def tokens(request: Request):
            body = json.loads(await request.body())
            self._record(request, body)
            if request.url.path == "/tokenize":
                return JSONResponse({"count": 2, "max_model_len": 2048, "tokens": [1, 2]})
            return JSONResponse({"prompt": "ab"})

        routes = [Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
                  Route("/version", version),
                  Route("/v1/chat/completions", generate, methods=["POST"]),
                  Route("/v1/completions", generate, methods=["POST"]),
                  Route("/tokenize", tokens, methods=["POST"]), Route("/detokenize", tokens, methods=["POST"])]
        return Starlette(routes=routes)

    def _refuses(self, request: Request) -> bool:
        return self.required_key is not None and \
            request.headers.get("authorization") != f"Bearer {self.required_key}"

    def _record(self, request: Request, body) -> None:
        self.requests.append({"method": request.method, "path": request.url.path,
                              "headers": dict(request.headers), "body": body})

    async def _hold(self, request: Request) -> None:
        self.open += 1
        try:
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)
            self.cancelled += 1
        finally:
            self.open -= 1

    async def _held_lines(self):
        self.open += 1
        try:
            yield b'vllm:num_requests_running{engine="0"} 0.0\n'
            while True:
                await asyncio.sleep(0.05)          # cancelled when the client goes
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.open -= 1

    async def _events(self, request: Request, body: dict):
        self.open += 1
        try:
            for i in range(int(body.get("max_tokens", 4))):
                event = ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"字{i} "}}]},
                                               ensure_ascii=False) + "\n\n").encode()
                if body.get("split"):
                    cut = event.index("字".encode()) + 1          # inside the character
                    for part in (event[:cut], event[cut:]):
                        self.sent.append(part)
                        yield part
                        await asyncio.sleep(body.get("gap", 0.01))
                else:
                    self.sent.append(event)
                    yield event
                if body.get("hold"):
                    while True:
                        await asyncio.sleep(0.05)      # cancelled when the client goes
                await asyncio.sleep(body.get("gap", 0.01))
            self.sent.append(b"data: [DONE]\n\n")
            yield b"data: [DONE]\n\n"
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.open -= 1


def make_keys(folder: Path, *names: str, revoked: tuple[str, ...] = ()) -> tuple[Path, dict[str, str]]:
    """A keys file in ``folder`` with a key for each name (the ``revoked`` ones revoked after)."""
    path = folder / "keys.json"
    made = keyfile.create_keys(path, [*names, *revoked])
    for name in revoked:
        keyfile.revoke(path, name)
    return path, made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- vLLM's routes
ROUTE_LINE = re.compile(r"Route: (\S+), (Methods|Endpoint): (.+)$")


def routes_from_log(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(path, methods) from vLLM's start-up lines ``Route: /x, Methods: GET, HEAD`` (a mounted
    app, ``Route: /metrics, Endpoint: ...``, gets GET and POST)."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = ROUTE_LINE.search(line)
        if not match:
            continue
        path, kind, rest = match.groups()
        methods = {m.strip() for m in rest.split(",")} if kind == "Methods" else {"GET", "POST"}
        found.setdefault(path, set()).update(methods)
    return sorted((path, tuple(sorted(methods))) for path, methods in found.items())


_BUILD_APP = r"""
import json, warnings
warnings.simplefilter("ignore")
try:
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:                      # older vLLM (0.26 ...)
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "x"])
app = build_app(args, supported_tasks=("generate",))
print(json.dumps([[r.path, sorted(getattr(r, "methods", None) or ["GET", "POST"])] for r in app.routes
                  if getattr(r, "path", None)]))
"""


def routes_from_installed_vllm() -> list[tuple[str, tuple[str, ...]]]:
    """(path, methods) of the app the installed vLLM builds (no engine is started)."""
    done = subprocess.run([sys.executable, "-c", _BUILD_APP], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"could not build vLLM's app: {done.stderr[-2000:]}")
    found: dict[str, set[str]] = {}
    for path, methods in json.loads(done.stdout.strip().splitlines()[-1]):
        found.setdefault(path, set()).update(methods)
    return sorted((path, tuple(sorted(methods))) for path, methods in found.items())


def concrete(path: str) -> str:
    """A path with every ``{parameter}`` filled in."""
    return re.sub(r"\{[^}]+\}", "x", path)
