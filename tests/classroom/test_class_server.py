"""A whole class server as ``./tutorial.sh serve`` starts it (``start_class_server``), against real
vLLM: vLLM on a Unix socket in a private folder, in a network namespace of its own, the gateway in
front. Another user of the same machine cannot reach vLLM at all (on 127.0.0.1 they could: its key
guards only /v1, /v2 and /inference, and /invocations generates text without one)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from classroom_support import make_keys
from helpers.classroom import keys as keyfile
from helpers.classroom.network import user_namespaces_refused
from helpers.classroom.service import start_class_server
from helpers.settings import load_settings

NOBODY = 65534

# A second, unprivileged user's attempt to connect to the socket.
PROBE = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(sys.argv[1])
except OSError as err:
    print("refused:", type(err).__name__, err.errno)
    sys.exit(0)
print("connected")        # from here POST /invocations would generate text, keyless
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
def test_the_class_servers_vllm_is_reachable_only_through_the_gateway(tmp_path, monkeypatch):
    keys_path, made = make_keys(tmp_path, "ana")
    monkeypatch.setenv("TUTORIAL_GATEWAY_KEYS", str(keys_path))
    # A state folder any user may enter (as ~/.local/state often is), so that the only barrier
    # left is the socket's own private folder: the test's usual one is private already.
    shared = Path(tempfile.mkdtemp(prefix="vllm-tutorial-shared-"))
    shared.chmod(0o755)
    monkeypatch.setenv("TUTORIAL_STATE_DIR", str(shared))
    monkeypatch.setattr(keyfile, "default_dir", lambda: tmp_path / "classroom")   # the internal key's folder
    try:
        _check_a_class_server(shared, made)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _check_a_class_server(shared: Path, made: dict) -> None:
    import psutil

    # 127.0.0.2: an address other than 127.0.0.1, as a class network's would be, still on loopback
    started = start_class_server(load_settings(host="127.0.0.2", port=free_port()), detached=False)
    server, gateway = started.server, started.gateway
    refused = None
    try:
        uds = Path(server.config.uds)
        assert uds.parent.parent == shared / "sockets"
        assert stat.S_IMODE(uds.parent.stat().st_mode) == 0o700 and uds.is_socket()
        assert server.record.uds == str(uds) and f"unix:{uds}" in server.record.describe()
        # its HTTP server listens on no TCP port
        members = [pid for pid in server.record.group().members() if psutil.pid_exists(pid)]
        api = [pid for pid in members if "vllm.entrypoints" in " ".join(psutil.Process(pid).cmdline())]
        assert api                                          # the API server (and the guard that runs it)
        assert [inode for pid in api for inode in listening_sockets(pid)] == []
        # and all of vLLM runs in a network namespace of its own: its engine's torch.distributed
        # and gloo ports (vLLM 0.32.0 on the CPU) listen in there, none on this machine's loopback
        # (where the machine forbids user namespaces, vLLM starts without one and says so)
        if not user_namespaces_refused():
            here = os.readlink("/proc/self/ns/net")
            vllm = [pid for pid in members if pid != server.record.guard_pid]
            assert vllm and all(os.readlink(f"/proc/{pid}/ns/net") != here for pid in vllm)
            assert [c for c in psutil.net_connections(kind="inet") if c.pid in vllm] == []
            inside = [inode for pid in vllm for inode in listening_sockets(pid)]
            assert inside, "the engine's ports were expected, listening inside its namespace"

        # a student, through the gateway
        reply = requests.post(gateway.url + "/v1/chat/completions", timeout=300,
                              headers={"Authorization": f"Bearer {made['ana']}"},
                              json={"model": server.name, "messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        # the teacher's helpers talk to it over the socket
        assert server.health() and [m["id"] for m in server.models()] == [server.name]

        # Another user of this machine (root can become one: CI runs as root). The socket itself
        # is opened to everyone here, so that its folder is the only barrier being tested; and a
        # control socket in a folder they may enter, under the same sockets/, answers them.
        if os.geteuid() == 0:
            os.chmod(uds, 0o777)
            control_folder = uds.parent.parent / "open"
            control_folder.mkdir(mode=0o755)
            with socket.socket(socket.AF_UNIX) as control:
                control.bind(str(control_folder / "s.sock"))
                os.chmod(control_folder / "s.sock", 0o777)
                control.listen()
                assert as_nobody(control_folder / "s.sock") == "connected"
            refused = as_nobody(uds)
    finally:
        gateway.stop()
        server.stop()
    assert not uds.exists() and not uds.parent.exists()            # the socket and its folder went with it
    if refused is None:
        pytest.skip("checked as another user only where the test runs as root (CI does)")
    assert refused == "refused: PermissionError 13"


def listening_sockets(pid: int) -> list[str]:
    """The TCP sockets ``pid`` holds that listen, read from its own network namespace's tables
    (psutil matches against the caller's, where a process in another namespace shows none)."""
    held = set()
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in descriptors:
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:                                     # closed meanwhile
            pass
    inodes = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in held:      # 0A: LISTEN
                inodes.append(fields[9])
    return inodes


def as_nobody(path: Path) -> str:
    # the system's Python: this one may live in a folder that user cannot enter (/root here)
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    assert python, "no system python3 that another user can run"
    done = subprocess.run([python, "-c", PROBE, str(path)], capture_output=True, text=True,
                          timeout=60, user=NOBODY, group=NOBODY, extra_groups=[])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
