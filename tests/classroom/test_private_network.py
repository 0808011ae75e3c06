"""The router and replicas of notebook 09 in a private network (``helpers.classroom.network``):
the gateway serves students from this machine's network, the upstream inside is out of reach of
everyone outside, other users of the machine included. A stand-in upstream (the fake vLLM of
classroom_support, run inside the namespace) is enough here: notebook 09 does it with real vLLM
replicas and the real router."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from classroom_support import INTERNAL_KEY, bearer, make_keys
from helpers.classroom.network import PrivateNetwork, PrivateNetworkError, enter, isolated, user_namespaces_refused
from helpers.classroom.service import GatewayError, start_gateway
from support import wait_for
from test_class_server import NOBODY

TESTS = Path(__file__).resolve().parent
WHY_NOT = user_namespaces_refused()
needs_namespaces = pytest.mark.skipif(bool(WHY_NOT), reason=f"this machine forbids user namespaces: {WHY_NOT}")
UPSTREAM = """
import sys, uvicorn
from classroom_support import FakeVLLM
uvicorn.run(FakeVLLM().app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused_here(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def inside_answers(network: PrivateNetwork, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close()"
    return subprocess.run(network.command([sys.executable, "-c", probe]), capture_output=True).returncode == 0


@needs_namespaces
def test_a_router_in_a_private_network_is_served_through_the_gateway_and_out_of_everyone_elses_reach(tmp_path):
    path, made = make_keys(tmp_path, "ana")
    port = free_port()                                 # free here too, so "refused here" means something
    network = PrivateNetwork.start()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    upstream = subprocess.Popen(network.command([sys.executable, "-c", UPSTREAM, str(port)]), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gateway = None
    try:
        assert wait_for(lambda: inside_answers(network, port), 120), "the stand-in did not start inside"
        assert refused_here(port)                      # this machine's loopback is another one
        notes: list[str] = []
        gateway = start_gateway(f"http://127.0.0.1:{port}", host="127.0.0.1", keys_path=path,
                                internal_key=INTERNAL_KEY, network=network, progress=notes.append)
        reply = httpx.get(gateway.url + "/v1/models", headers=bearer(made["ana"]), timeout=10)
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "fake"
        assert httpx.get(gateway.url + "/v1/models", timeout=10).status_code == 401
        assert not any("not of other users" in note for note in notes)
        assert f"private network {network.pid}" in gateway.record.upstream
        # the gateway's own process is in the namespace, its listening socket outside it
        gateway_pid = next(pid for pid in gateway.pids() if pid != gateway.record.guard_pid)
        assert os.readlink(f"/proc/{gateway_pid}/ns/net") == os.readlink(f"/proc/{network.pid}/ns/net")
        assert os.readlink(f"/proc/{gateway_pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.terminate()
        upstream.wait(15)
        network.stop()
    assert not network.alive and not gateway.alive
    with pytest.raises(PrivateNetworkError, match="ended"):
        network.command(["true"])
    with pytest.raises(GatewayError, match="has ended"):
        start_gateway(f"http://127.0.0.1:{port}", host="127.0.0.1", keys_path=path, internal_key=INTERNAL_KEY,
                      network=network)
    with pytest.raises(PrivateNetworkError, match="is gone"):
        enter(network.pid, network.started)


@needs_namespaces
def test_network_goes_with_a_url_only(tmp_path):
    path, _ = make_keys(tmp_path, "ana")
    with PrivateNetwork.start() as network:
        with pytest.raises(GatewayError, match="goes with a router's URL"):
            start_gateway(object(), host="127.0.0.1", keys_path=path, network=network)


@needs_namespaces
def test_the_holder_ends_with_its_owner():
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from helpers.classroom.network import "
                              "PrivateNetwork; n = PrivateNetwork.start(); print(n.pid, flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    holder = int(owner.stdout.readline())
    assert os.path.exists(f"/proc/{holder}")
    owner.kill()
    owner.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{holder}") or open(f"/proc/{holder}/stat").read().split()[2] == "Z", 10)


def test_a_machine_that_forbids_user_namespaces_gets_the_reason(tmp_path, monkeypatch):
    """What `unshare` says where the kernel refuses (Ubuntu 24.04's AppArmor rule, a sysctl, a
    container's seccomp profile), from a stand-in `unshare` on the PATH. It closes its output a
    moment before it exits (on the GPU machine the real order raced: the error was lost)."""
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: write failed /proc/self/uid_map: Operation not permitted' >&2\n"
                    "exec >&-\nsleep 0.3\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PrivateNetworkError, match="uid_map: Operation not permitted.*max_user_namespaces"):
        PrivateNetwork.start()


@needs_namespaces
def test_isolated_runs_a_command_alone_with_its_loopback_up_or_says_why_not(tmp_path, monkeypatch):
    """The class server's vLLM (on a Unix socket) runs this way: its engine's ports listen inside."""
    probe = ("import os, socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
             "print(os.readlink('/proc/self/ns/net'))")
    argv, why = isolated([sys.executable, "-c", probe])
    assert argv and not why
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() != os.readlink("/proc/self/ns/net")
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    argv, why = isolated(["true"])
    assert argv is None and "Operation not permitted" in why and "apparmor_restrict_unprivileged_userns" in why


# As an ordinary user, what a teacher's account does (the test above runs as whoever runs the
# tests; as root some steps cannot fail: root may enter any namespace). Loaded by its path with
# the system's Python, as the other user may not enter this checkout's virtual environment.
TEACHER = 4242
AS_TEACHER = """
import importlib.util, json, subprocess, sys
spec = importlib.util.spec_from_file_location("network", sys.argv[1])
net = importlib.util.module_from_spec(spec)
spec.loader.exec_module(net)
try:
    network = net.PrivateNetwork.start()
except net.PrivateNetworkError as err:        # this user may not (Ubuntu's AppArmor rule, a sysctl)
    print(json.dumps({"refused": str(err)}), flush=True)
    sys.exit(0)
listen = ("import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen();"
          "print('up', flush=True)\\nwhile True: s.accept()")
listener = subprocess.Popen(network.command([sys.executable, "-c", listen, sys.argv[2]]), stdout=subprocess.PIPE, text=True)
assert listener.stdout.readline().strip() == "up"
connect = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10).close()"
inside = subprocess.run(network.command([sys.executable, "-c", connect, sys.argv[2]]), capture_output=True, text=True)
gateway_way = \"\"\"
import importlib.util, socket, sys
spec = importlib.util.spec_from_file_location("network", sys.argv[1])
net = importlib.util.module_from_spec(spec)
spec.loader.exec_module(net)
outside = socket.socket(); outside.bind(("127.0.0.1", 0)); outside.listen()
net.enter(int(sys.argv[2]), int(sys.argv[3]))
socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=10).close()
print("entered after binding outside")
\"\"\"
entered = subprocess.run([sys.executable, "-c", gateway_way, sys.argv[1], str(network.pid), str(network.started),
                          sys.argv[2]], capture_output=True, text=True)
print(json.dumps({"holder": network.pid, "inside": inside.returncode, "inside_err": inside.stderr,
                  "entered": entered.stdout.strip() + entered.stderr.strip()}), flush=True)
sys.stdin.readline()
listener.kill()
network.stop()
"""


@needs_namespaces
def test_an_ordinary_user_makes_enters_and_keeps_out_another(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("acting as two ordinary users needs root (CI runs as root)")
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    assert python, "no system python3 that another user can run"
    folder = Path(tempfile.mkdtemp(prefix="private-network-"))
    try:
        folder.chmod(0o755)
        module = folder / "network.py"
        shutil.copy(Path(__file__).resolve().parents[2] / "helpers/classroom/network.py", module)
        module.chmod(0o644)
        port = free_port()
        teacher = subprocess.Popen([python, "-c", AS_TEACHER, str(module), str(port)], cwd="/", text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   user=TEACHER, group=TEACHER, extra_groups=[])
        try:
            line = teacher.stdout.readline()
            assert line, teacher.stderr.read()
            seen = json.loads(line)
            if "refused" in seen:
                pytest.skip(f"an ordinary user may not make a user namespace here: {seen['refused']}")
            assert seen["inside"] == 0, seen                 # the teacher's own nsenter gets in
            assert seen["entered"] == "entered after binding outside", seen
            assert refused_here(port)                        # still listening inside, not on this loopback
            for argv in (["nsenter", f"--target={seen['holder']}", "--user", "--net", "--preserve-credentials",
                          "--", "true"],
                         [python, "-c", f"import os; os.open('/proc/{seen['holder']}/ns/net', os.O_RDONLY)"]):
                tried = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                                       user=NOBODY, group=NOBODY, extra_groups=[])
                assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried
        finally:
            teacher.communicate("\n", timeout=60)
        assert teacher.returncode == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
