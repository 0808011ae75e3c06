"""The class server seen from a student's laptop on another network stack.

The test makes a network namespace for the student and a veth pair to it, with addresses from
198.18.0.0/15 (the benchmarking range: never a real network): the teacher's end stays in this
namespace, where the run's vLLM server (``shared_server``) listens on 127.0.0.1, and the gateway
is bound to the teacher's veth address only. Everything a student does runs inside the student
namespace (``ip netns exec``, ``student_probe.py``), so it reaches the teacher only as a
laptop would: through the veth link, to the teacher's address. No real interface is touched;
the namespace and the veth pair are removed in ``finally``.

Checked from the student's side:

* every route the installed vLLM exposes (read from the server's own ``Route: ...`` start-up
  lines, plus the app the installed vLLM builds) and some odd spellings of them: without a
  key, with a revoked key and with a valid one, only the four gateway routes answer anything
  but 404/405, and vLLM's access log shows that none of the others reached it;
* vLLM's port cannot even be connected to (neither on the teacher's address nor on loopback);
* with a valid key ``/v1/models`` and a streamed chat work, and the first SSE bytes arrive
  before the answer ends;
* 100 parallel streams on one key: at most the per-key limit admitted (the rest 429), while
  another student's stream keeps streaming.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from classroom_support import concrete, make_keys, routes_from_installed_vllm, routes_from_log
from helpers.classroom.gateway import FORWARDED
from helpers.classroom.policy import Limits
from helpers.classroom.service import start_gateway

pytestmark = pytest.mark.netns

PROBE = Path(__file__).with_name("student_probe.py")
TEST_RANGE = ipaddress.ip_network("198.18.0.0/15")
PER_KEY = 4
ODD_PATHS = ["/v1/models/", "//v1/models", "/V1/MODELS", "/v1/../invocations", "/v1/%2e%2e/invocations",
             "/v1/chat/completions/", "/v1/chat/completions/../../tokenize", "/health/../metrics",
             "/invocations?x=1", "/v1/chat/completions/render", "/v1/chat/completions/batch", "/v1",
             "/v1/models/../../load", "/%76%31/models/../../version"]


@dataclass(frozen=True)
class StudentNet:
    namespace: str
    teacher: str            # the teacher's veth address (this namespace)
    student: str            # the student's, inside the namespace


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 198.18.0.0/15 that no interface here uses (another run may hold one)."""
    used = _ip("-o", "-4", "addr", "show").stdout
    subnets = list(TEST_RANGE.subnets(new_prefix=30))
    start = os.getpid() % len(subnets)
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(str(host) + "/" in used for host in net):
            return net
    pytest.skip("no free /30 in 198.18.0.0/15")


@pytest.fixture(scope="module")
def student_net():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to make network namespaces")
    tag = f"{os.getpid() % 100000}"
    namespace, teacher_if, student_if = f"tut-student-{tag}", f"tutT{tag}", f"tutS{tag}"
    net = _free_subnet()
    teacher, student = (str(h) for h in list(net.hosts())[:2])
    made_ns = made_link = False
    try:
        done = _ip("netns", "add", namespace)
        if done.returncode != 0:
            pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
        made_ns = True
        done = _ip("link", "add", teacher_if, "type", "veth", "peer", "name", student_if)
        if done.returncode != 0:
            pytest.skip(f"cannot make a veth pair here: {done.stderr.strip()}")
        made_link = True
        for args in (("link", "set", student_if, "netns", namespace),
                     ("addr", "add", f"{teacher}/30", "dev", teacher_if),
                     ("link", "set", teacher_if, "up"),
                     ("-n", namespace, "addr", "add", f"{student}/30", "dev", student_if),
                     ("-n", namespace, "link", "set", student_if, "up"),
                     ("-n", namespace, "link", "set", "lo", "up")):
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
        yield StudentNet(namespace, teacher, student)
    finally:
        if made_ns:
            for pid in _ip("netns", "pids", namespace).stdout.split():     # probes left by a failure
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=10)
        if made_link:
            _ip("link", "del", teacher_if)           # removes its peer too
        if made_ns:
            _ip("netns", "del", namespace)
        assert namespace not in _ip("netns", "list").stdout


def probe(net: StudentNet, action: str, config: dict, timeout: float = 300) -> dict:
    """Run student_probe.py inside the student's namespace; its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(["ip", "netns", "exec", net.namespace, sys.executable, str(PROBE), action],
                          input=json.dumps(config), capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"probe {action} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def classroom(student_net, shared_server, tmp_path_factory):
    path, made = make_keys(tmp_path_factory.mktemp("netns"), "ana", "bo", revoked=("cy",))
    gateway = start_gateway(shared_server, host=student_net.teacher, keys_path=path,
                            # one namespace, one address, plays every student (like a class behind one NAT):
                            # the per-address bound is raised as a teacher would (test_gateway_process
                            # checks that bound); the flood below tests the per-key one
                            limits=Limits(per_key_concurrency=PER_KEY, per_peer_connections=256), progress=print)
    try:
        yield shared_server, gateway, made
    finally:
        gateway.stop()
        assert not gateway.pids()


def vllm_routes(server) -> list[tuple[str, tuple[str, ...]]]:
    """What the running vLLM says it serves, with what the installed vLLM's app builds."""
    found: dict[str, set[str]] = {}
    for path, methods in routes_from_log(server.log_text()) + routes_from_installed_vllm():
        found.setdefault(path, set()).update(methods)
    return sorted((path, tuple(sorted(m))) for path, m in found.items())


def test_every_vllm_route_is_refused_without_a_valid_key_and_only_the_forwarded_reach_vllm(student_net, classroom):
    server, gateway, made = classroom
    routes = vllm_routes(server)
    from_log = routes_from_log(server.log_text())
    print(f"\nvLLM routes tried ({len(routes)}; {len(from_log)} from the server's log):")
    for path, methods in routes:
        print(f"  {','.join(methods):<16} {path}")
    assert len(from_log) >= 10 and {p for p, _ in from_log} >= set(FORWARDED), "no Route: lines in vLLM's log"
    requests = [(method, concrete(path)) for path, methods in routes for method in methods]
    requests += [(method, path) for path in FORWARDED for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS")]
    requests += [(method, path) for path in ODD_PATHS for method in ("GET", "POST")]
    requests = sorted(set(requests))
    log_before = len(server.log_text())
    results = probe(student_net, "sweep", {
        "gateway_host": student_net.teacher, "gateway_port": gateway.record.port, "model": server.name,
        "requests": requests, "keys": {"none": None, "revoked": made["cy"], "valid": made["ana"]}})["results"]
    assert len(results) == 3 * len(requests)
    wrong = []
    for r in results:
        forwarded = FORWARDED.get(r["path"]) == r["method"]
        if r["path"] == "/health" and r["method"] in ("GET", "HEAD"):
            expected = {200}
        elif forwarded:
            expected = {200} if r["key"] == "valid" else {401}
        else:
            expected = {404, 405}
        if r["status"] not in expected:
            wrong.append(r)
        if forwarded and r["key"] == "revoked":
            assert '"revoked_api_key"' in r["body"]
        if r["path"] == "/health" and r["status"] == 200:
            assert json.loads(r["body"]) == {"status": "ok"}
    assert not wrong, "answered where it must refuse:\n" + "\n".join(map(str, wrong))
    # vLLM's access log: the forwarded routes (and the gateway's /health) reached it, nothing else
    new_log = server.log_text()[log_before:]
    reached = set(re.findall(r'"([A-Z]+) (\S+) HTTP/1\.1"', new_log))
    if ("POST", "/v1/chat/completions") in reached:                  # access lines are logged
        forwarded = {(method, path) for path, method in FORWARDED.items()}    # each sent with a valid key
        assert forwarded <= reached <= forwarded | {("GET", "/health")}, reached
    else:
        print("note: vLLM's log has no access lines (log preset); reach checked by status codes only")


def test_vllm_itself_cannot_be_reached_from_the_student_side(student_net, classroom):
    server, gateway, _ = classroom
    reach = probe(student_net, "reach", {"targets": {
        "vllm on the teacher's address": [student_net.teacher, server.port],
        "vllm on loopback": ["127.0.0.1", server.port],
        "gateway": [student_net.teacher, gateway.record.port]}})["reach"]
    assert reach == {"vllm on the teacher's address": "refused", "vllm on loopback": "refused",
                     "gateway": "connected"}, reach


def test_a_valid_key_lists_models_and_streams_as_the_answer_is_made(student_net, classroom):
    server, gateway, made = classroom
    seen = probe(student_net, "stream", {"gateway_url": f"http://{student_net.teacher}:{gateway.record.port}",
                                         "model": server.name, "max_tokens": 32, "keys": {"valid": made["ana"]}})
    print(f"\nstream from the student's namespace: {seen}")
    assert seen["models_status"] == 200 and seen["model_ids"] == [server.name]
    assert seen["status"] == 200
    assert seen["headers"]["content-type"].startswith("text/event-stream")
    assert seen["headers"]["cache-control"] == "no-cache" and seen["headers"]["x-accel-buffering"] == "no"
    # every token the server made came (its own count in the usage event), in several events
    # (not by counting events: a token that decodes to nothing, such as a special one, makes none;
    # CI once got 27 events for 32 tokens)
    assert seen["ends_with_done"] and seen["completion_tokens"] == [32] and seen["events"] >= 3
    assert not seen["done_in_first_content_piece"]          # the first words came before the end
    assert seen["pieces"] > 2 and seen["done_s"] > seen["first_content_s"]


def test_a_hundred_parallel_streams_on_one_key_get_at_most_the_limit_while_another_key_streams(
        student_net, classroom):
    server, gateway, made = classroom
    seen = probe(student_net, "flood", {
        "gateway_url": f"http://{student_net.teacher}:{gateway.record.port}", "model": server.name,
        "parallel": 100, "flood_tokens": 400, "other_tokens": 400,
        "keys": {"valid": made["ana"], "other": made["bo"]}})
    statuses, codes = seen["statuses"], seen["codes"]
    admitted = statuses.count(200)
    print(f"\nflood: {admitted} admitted, {statuses.count(429)} refused (429); other student: {seen['other']}")
    assert len(statuses) == 100
    assert set(statuses) <= {200, 429}
    # an admitted answer that ended before the last refusal frees its slot for a later request
    assert 1 <= admitted <= PER_KEY + seen["admitted_done_early"]
    assert codes == ["too_many_concurrent_requests"] * statuses.count(429)
    other = seen["other"]
    assert other["status"] == 200 and other["bytes_before"] > 0
    assert other["bytes_after"] > 0 and not seen["other_done_when_flood_answered"]


def test_a_client_only_set_up_runs_notebooks_02_to_04_against_the_class_server(student_net, shared_server,
                                                                                tmp_path_factory):
    """A student's laptop: the light set-up (no vLLM, no torch) made by the README's command,
    then notebooks 02-04 under nbval, strict, from the student's namespace through the gateway."""
    import time

    from helpers.paths import REPO_ROOT

    work = tmp_path_factory.mktemp("student")
    venv = work / "client-venv"
    started = time.monotonic()
    setup = subprocess.run([str(REPO_ROOT / "tutorial.sh"), "setup"], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "TUTORIAL_FLAVOR": "client", "TUTORIAL_VENV": str(venv)})
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    print(f"client set-up: {time.monotonic() - started:.0f} s, {size / 2**20:.0f} MiB")
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print([m for m in ('vllm', 'torch', 'transformers') if u.find_spec(m)])"],
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "[]", check.stdout + check.stderr

    path, made = make_keys(work, "ana")
    gateway = start_gateway(shared_server, host=student_net.teacher, keys_path=path, progress=print)
    try:
        notebooks = [str(REPO_ROOT / "notebooks" / f"{n}.ipynb")
                     for n in ("02_list_models", "03_stream_requests", "04_stream_openai")]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TUTORIAL_", "VLLM_TUTORIAL_"))}
        env.update(TUTORIAL_SERVER_URL=gateway.url, TUTORIAL_API_KEY=made["ana"], TUTORIAL_STATE_DIR=str(work / "state"),
                   PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        run = subprocess.run(["ip", "netns", "exec", student_net.namespace, str(venv / "bin" / "python"), "-m", "pytest",
                              "-p", "no:cacheprovider", "-q", *notebooks], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        print(run.stdout[-1500:])
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert re.search(r"\b\d+ passed\b", run.stdout) and "failed" not in run.stdout.splitlines()[-1]
    finally:
        gateway.stop()
