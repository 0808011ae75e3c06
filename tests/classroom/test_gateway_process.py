"""``python -m helpers.classroom.gateway`` as a process: keys only in its environment, a ready
line, SIGTERM ends open streams with an error event and exits 0, and it stops when the server
it follows ends. Against the fake vLLM of classroom_support (no model)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import httpx
import pytest

from classroom_support import INTERNAL_KEY, bearer, make_keys
from helpers.classroom.gateway import INTERNAL_KEY_FILE_VARIABLE, INTERNAL_KEY_VARIABLE, KEYS_VARIABLE, READY_LINE
from helpers.classroom.service import GatewayError, start_gateway
from support import kill_group, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """The gateway command in its own process group, its output collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.output: list[str] = []
        base = {k: v for k, v in os.environ.items() if not k.startswith("TUTORIAL_GATEWAY")}
        self.proc = subprocess.Popen([sys.executable, "-m", "helpers.classroom.gateway", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**base, "PYTHONPATH": os.pathsep.join(sys.path), **env},
                                     start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.output)

    def ready(self, timeout: float = 60) -> bool:
        return bool(wait_for(lambda: READY_LINE in self.text() or self.proc.poll() is not None, timeout)) \
            and READY_LINE in self.text()

    def close(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc.pid)
        self.proc.wait(10)


def test_keys_stay_off_the_command_line_and_sigterm_ends_streams_with_an_error_event(fake, tmp_path):
    path, made = make_keys(tmp_path, "ana")
    secret = tmp_path / "internal.key"
    secret.write_text(INTERNAL_KEY + "\n")
    port = free_port()
    gw = Gateway(["--host", "127.0.0.1", "--port", str(port), "--upstream", fake.url, "--max-tokens", "32"],
                 {KEYS_VARIABLE: str(path), INTERNAL_KEY_FILE_VARIABLE: str(secret)})
    try:
        assert gw.ready(), gw.text()
        assert f"http://127.0.0.1:{port} -> {fake.url} (1 student key(s); max_tokens 32" in gw.text()
        with open(f"/proc/{gw.proc.pid}/cmdline", "rb") as f:
            argv = f.read().decode()
        assert INTERNAL_KEY not in argv and made["ana"] not in argv and str(path) not in argv
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            # 60,000 levels of `[` (under the 64 KiB default) with a valid key: was a 500 and a
            # RecursionError traceback in the gateway's log
            deep = client.post(url + "/v1/chat/completions", headers=bearer(made["ana"]), content=b"[" * 60_000)
            assert deep.status_code == 400 and "nests deeper" in deep.text, deep.text
            with client.stream("POST", url + "/v1/chat/completions", headers=bearer(made["ana"]),
                               json={"messages": [], "stream": True, "hold": True}) as reply:
                chunks = reply.iter_raw()
                assert next(chunks).startswith(b"data: ")
                assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {INTERNAL_KEY}"
                gw.proc.send_signal(signal.SIGTERM)
                rest = b"".join(chunks)
            event = json.loads(rest.decode().strip().removeprefix("data: "))
            assert event["error"]["code"] == "shutting_down"
        assert gw.proc.wait(10) == 0
        assert wait_for(lambda: "gateway stopped" in gw.text(), 5), gw.text()
        assert "Traceback" not in gw.text()
        assert wait_for(lambda: fake.open == 0, 10)
    finally:
        gw.close()


@pytest.mark.parametrize("setting, message", [
    ("no keys", f"set {KEYS_VARIABLE}"),
    ("no internal key", f"no internal key: set {INTERNAL_KEY_VARIABLE}"),
    ("loose keys file", "chmod 600"),
    ("port taken", "cannot listen on 127.0.0.1"),
])
def test_a_gateway_that_cannot_start_says_why(fake, tmp_path, setting, message):
    path, _ = make_keys(tmp_path, "ana")
    env = {KEYS_VARIABLE: str(path), INTERNAL_KEY_VARIABLE: INTERNAL_KEY}
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1] if setting == "port taken" else free_port()
    if setting == "no keys":
        del env[KEYS_VARIABLE]
    elif setting == "no internal key":
        del env[INTERNAL_KEY_VARIABLE]
    elif setting == "loose keys file":
        os.chmod(path, 0o644)
    gw = Gateway(["--host", "127.0.0.1", "--port", str(port), "--upstream", fake.url], env)
    try:
        assert gw.proc.wait(60) != 0
        assert wait_for(lambda: message in gw.text(), 5), gw.text()
        assert READY_LINE not in gw.text()
    finally:
        gw.close()
        taken.close()


def test_it_stops_when_the_server_it_follows_ends(fake, tmp_path):
    path, _ = make_keys(tmp_path, "ana")
    server_guard = subprocess.Popen(["sleep", "120"])
    with open(f"/proc/{server_guard.pid}/stat") as f:
        started = f.read().rsplit(")", 1)[1].split()[19]
    gw = Gateway(["--host", "127.0.0.1", "--port", str(free_port()), "--upstream", fake.url,
                  "--follow-pid", str(server_guard.pid), "--follow-start", started],
                 {KEYS_VARIABLE: str(path), INTERNAL_KEY_VARIABLE: INTERNAL_KEY})
    try:
        assert gw.ready(), gw.text()
        assert gw.proc.poll() is None
        server_guard.kill()
        server_guard.wait(10)
        assert gw.proc.wait(10) == 0
        assert f"the server process {server_guard.pid} ended; stopping" in gw.text()
    finally:
        server_guard.kill()
        server_guard.wait(10)
        gw.close()


def test_it_refuses_to_follow_a_process_that_is_already_another(fake, tmp_path):
    path, _ = make_keys(tmp_path, "ana")
    gw = Gateway(["--host", "127.0.0.1", "--port", str(free_port()), "--upstream", fake.url,
                  "--follow-pid", str(os.getpid()), "--follow-start", "1"],      # this pid, another start time
                 {KEYS_VARIABLE: str(path), INTERNAL_KEY_VARIABLE: INTERNAL_KEY})
    try:
        assert gw.proc.wait(60) == 0
        assert "is gone; stopping" in gw.text()
    finally:
        gw.close()


def test_start_gateway_refuses_a_vllm_reachable_from_the_network(tmp_path):
    path, _ = make_keys(tmp_path, "ana")
    exposed = SimpleNamespace(config=SimpleNamespace(host="0.0.0.0", api_key="k"), record=None, alive=True)
    with pytest.raises(GatewayError, match="start it with host 127.0.0.1"):
        start_gateway(exposed, host="127.0.0.1", keys_path=path)


def test_start_gateway_takes_an_upstream_url_on_loopback_only(fake, tmp_path):
    """In front of a router (notebook 09) the upstream is a URL: served when on loopback, refused
    when students could reach it around the gateway; the gateway then runs until stopped."""
    path, made = make_keys(tmp_path, "ana")
    for exposed in ("http://0.0.0.0:8000", "http://10.0.0.5:8000", "https://127.0.0.1:8000", "127.0.0.1:8000",
                    "http://127.0.0.1:99999"):
        with pytest.raises(GatewayError, match="must be http://127.0.0.1:PORT"):
            start_gateway(exposed, host="127.0.0.1", keys_path=path, internal_key=INTERNAL_KEY)
    path.chmod(0o644)                                  # a keys file others can read: refused as before
    with pytest.raises(GatewayError, match="0644|others|private|mode"):
        start_gateway(fake.url, host="127.0.0.1", keys_path=path, internal_key=INTERNAL_KEY, progress=lambda m: None)
    path.chmod(0o600)
    notes: list[str] = []
    gw = start_gateway(fake.url, host="127.0.0.1", keys_path=path, internal_key=INTERNAL_KEY, progress=notes.append)
    try:
        reply = httpx.get(gw.url + "/v1/models", headers=bearer(made["ana"]), timeout=10)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "fake"
        assert gw.record.upstream == fake.url
        assert any("not of other users" in note for note in notes)
        for pid in gw.pids():                          # the internal key reaches it in its environment only
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert INTERNAL_KEY.encode() not in f.read()
    finally:
        gw.stop()
    assert not gw.alive


# --------------------------------------------------------------------------- a hostile peer
@contextlib.contextmanager
def _started(fake, tmp_path, *limits: str):
    """A gateway process with these limits; yields (gateway, port, keys, sockets), and at the end
    closes every socket the test put in ``sockets`` and the gateway."""
    path, made = make_keys(tmp_path, "ana", "ben")
    port = free_port()
    gw = Gateway(["--host", "127.0.0.1", "--port", str(port), "--upstream", fake.url, *limits],
                 {KEYS_VARIABLE: str(path), INTERNAL_KEY_VARIABLE: INTERNAL_KEY})
    sockets: list[socket.socket] = []
    try:
        assert gw.ready(), gw.text()
        yield gw, port, made, sockets
    finally:
        for sock in sockets:
            sock.close()
        gw.close()


def _closed_by_the_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""          # non-blocking: b"" once the server closed it
    except BlockingIOError:
        return False
    except OSError:                         # reset (the gateway aborts refused connections)
        return True


def _hostile_sockets(port: int, count: int, first_bytes: bytes) -> list[socket.socket]:
    """``count`` connections from 127.0.0.2 (another address than the student's 127.0.0.1, as
    another machine on the class network would be), each sending ``first_bytes`` and then nothing."""
    made = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        with contextlib.suppress(OSError):              # refused ones may already be reset
            sock.sendall(first_bytes)
        sock.setblocking(False)
        made.append(sock)
    return made


def test_six_hundred_half_sent_request_lines_do_not_shut_out_the_class(fake, tmp_path):
    # Seen before this guard: 600 sockets that each sent half a request line got every student a
    # 503 until they closed (uvicorn counted them against limit_concurrency and never timed them out).
    with _started(fake, tmp_path, "--header-timeout", "3", "--per-peer-connections", "32") as (gw, port, made, opened):
        hostile = _hostile_sockets(port, 600, b"POST /v1/chat/completions HT")
        opened += hostile
        # at most 32 of them are held; every other one was closed at once
        assert wait_for(lambda: sum(not _closed_by_the_server(s) for s in hostile) <= 32, 30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for name in ("ana", "ben"):
                reply = client.post("/v1/chat/completions", headers=bearer(made[name]),
                                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                assert reply.status_code == 200, reply.text
        # the 32 it held are closed once they miss the header timeout; nothing was logged as an error
        assert wait_for(lambda: all(_closed_by_the_server(s) for s in hostile), 30)
        assert "127.0.0.2 has 32 open, the most one address may hold" in gw.text()
        assert "Traceback" not in gw.text() and "Exceeded concurrency limit" not in gw.text()


def test_an_idle_connection_is_closed_but_a_long_stream_is_not(fake, tmp_path):
    with _started(fake, tmp_path, "--header-timeout", "2") as (gw, port, made, opened):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            # a stream that lasts longer than the header timeout (12 events 0.5 s apart) ends whole
            with client.stream("POST", "/v1/chat/completions", headers=bearer(made["ana"]),
                               json={"messages": [], "stream": True, "max_tokens": 12, "gap": 0.5}) as reply:
                body = b"".join(reply.iter_raw())
            assert body.count(b"data: ") == 13 and body.endswith(b"data: [DONE]\n\n")
        # a connection that never sends a request is closed after the timeout
        idle = _hostile_sockets(port, 1, b"")
        opened += idle
        assert wait_for(lambda: _closed_by_the_server(idle[0]), 30)


def test_a_slow_upload_holds_one_of_its_keys_places(fake, tmp_path):
    # The key's concurrency is counted before the body is read: five slow uploads on one key get
    # the fifth a 429 at once, and another key is served meanwhile.
    with _started(fake, tmp_path, "--per-key-concurrency", "4", "--body-timeout", "60") as (gw, port, made, opened):
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {made['ana']}\r\n"
                f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").encode()
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port))
            opened.append(sock)
            sock.sendall(head)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            def fifth_is_refused() -> bool:
                reply = client.post("/v1/chat/completions", headers=bearer(made["ana"]),
                                    json={"messages": [], "max_tokens": 4})
                return reply.status_code == 429 and "too_many_concurrent_requests" in reply.text
            assert wait_for(fifth_is_refused, 30)
            reply = client.post("/v1/chat/completions", headers=bearer(made["ben"]),
                                json={"messages": [], "max_tokens": 4})
            assert reply.status_code == 200, reply.text


def test_websocket_upgrades_do_not_use_up_an_addresss_connections(fake, tmp_path):
    # Found by a reader: uvicorn hands an upgraded socket to a WebSocket protocol object, so the
    # connection's end never reached the count and 64 upgrade requests locked an address out.
    with _started(fake, tmp_path, "--per-peer-connections", "8") as (gw, port, made, _):
        upgrade = (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        for _ in range(20):
            with socket.socket() as sock:
                sock.bind(("127.0.0.2", 0))
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))
                sock.sendall(upgrade)
                assert sock.recv(200).startswith(b"HTTP/1.1 ")        # answered as plain HTTP
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30) as client:
            def served() -> bool:
                try:
                    return client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200
                except httpx.TransportError:                            # refused: the count leaked
                    return False
            assert wait_for(served, 10), gw.text()
