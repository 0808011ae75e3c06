"""The server manager against real vLLM (CPU build): failure paths first, then whole lifecycles.

Every test checks that no process of the server's group is left afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from helpers import server as server_module
from helpers import server_registry
from helpers.errors import (ApiKeyError, ModelNotFoundError, PortInUseError, ServerDiedError,
                            ServerStartError)
from helpers.process_guard import group_members
from helpers.server import VLLMServer, port_in_use
from helpers.server_config import ServerConfig, from_settings
from support import wait_for


@pytest.fixture(scope="module")
def config() -> ServerConfig:
    return from_settings()


@pytest.fixture
def listener():
    """A socket listening on a free loopback port, as another program would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def gpu_memory_used_mib() -> int | None:
    """Memory in use on all GPUs (nvidia-smi), or None on a machine without one."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return sum(int(v) for v in out.split() if v.isdigit())


@pytest.fixture
def gpu_memory_returns():
    """On a GPU machine: after the test, GPU memory is back to where it was (within 512 MiB).
    This is what orphaned engine processes break (vllm#55510). On the CPU there is none to check."""
    before = gpu_memory_used_mib()
    yield
    if before is not None:
        assert wait_for(lambda: gpu_memory_used_mib() <= before + 512, 30), \
            f"GPU memory in use: {gpu_memory_used_mib()} MiB after, {before} MiB before"


def no_new_records(before):
    return {r.guard_pid for r in server_registry.load_all()} <= {r.guard_pid for r in before}


def test_missing_model_path_fails_before_anything_starts(tmp_path):
    missing = tmp_path / "model" / "Qwen2-7B-Instruct"
    before = server_registry.load_all()
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        VLLMServer(ServerConfig(model=str(missing))).start()
    assert time.monotonic() - started < 1.0
    assert no_new_records(before)


def test_busy_port_is_refused_at_once(config, listener):
    before = server_registry.load_all()
    started = time.monotonic()
    with pytest.raises(PortInUseError, match=f"port {listener} "):
        VLLMServer(config.with_port(listener)).start()
    assert time.monotonic() - started < 2.0
    assert no_new_records(before)


def test_port_taken_after_the_check_is_named_from_vllms_log(config, listener, monkeypatch):
    # The port can be taken between our check and vLLM's bind; then vLLM itself fails, and the
    # error must still say why, as soon as the process exits (vLLM's import takes ~10 s here).
    monkeypatch.setattr(server_module, "port_in_use", lambda *args: False)
    server = VLLMServer(config.with_port(listener))
    started = time.monotonic()
    with pytest.raises(ServerStartError) as failure:
        server.start(progress=lambda _msg: None)
    elapsed = time.monotonic() - started
    assert failure.value.cause == "port in use"
    assert "Address already in use" in str(failure.value)
    assert elapsed < 90, f"took {elapsed:.0f} s: the failure was not noticed when the process exited"
    assert group_members(server.pgid) == []


def test_out_of_memory_is_named_with_the_log_tail(config):
    # Ask the CPU backend for a 500 GiB KV cache on a 24 GiB machine.
    server = VLLMServer(replace(config, env={**config.env, "VLLM_CPU_KVCACHE_SPACE": "500"}))
    started = time.monotonic()
    with pytest.raises(ServerStartError) as failure:
        server.start(progress=lambda _msg: None)
    assert failure.value.cause == "out of memory"
    assert "VLLM_CPU_KVCACHE_SPACE" in str(failure.value)          # the advice
    assert failure.value.log_tail and failure.value.log_path      # and the evidence
    assert time.monotonic() - started < 150
    assert wait_for(lambda: group_members(server.pgid) == [], 15)


def test_start_serve_and_stop_leaves_no_process(config, gpu_memory_returns):
    messages: list[str] = []
    server = VLLMServer(replace(config, api_key="tutorial-test-key")).start(progress=messages.append)
    try:
        assert any("ready" in m for m in messages)
        names = [name for _, name in server.processes()]
        assert any("EngineCore" in n for n in names), names
        assert server.health()                       # liveness needs no key
        assert [m["id"] for m in server.models()] == [config.name]
        keyless = VLLMServer(replace(server.config, api_key=None))
        with pytest.raises(ApiKeyError, match="VLLM_TUTORIAL_API_KEY"):
            keyless.models()
        # Another process with the same settings (a second notebook's kernel) reuses this
        # server through get_server(): same process group, no second record, no second server.
        env = {**os.environ, "VLLM_TUTORIAL_API_KEY": "tutorial-test-key"}
        other = subprocess.run(
            [sys.executable, "-c", "from helpers import get_server; print('GROUP', get_server().pgid)"],
            capture_output=True, text=True, env=env, timeout=120)
        assert f"GROUP {server.pgid}" in other.stdout, other.stdout + other.stderr
        assert "Reusing" in other.stdout and "other flags" not in other.stdout
        # Settings that differ in flags only (another log preset) still reuse it, and say so.
        quiet = subprocess.run(
            [sys.executable, "-c", "from helpers import get_server; print('GROUP', get_server().pgid)"],
            capture_output=True, text=True, env={**env, "VLLM_TUTORIAL_LOG_PRESET": "quiet"}, timeout=120)
        assert f"GROUP {server.pgid}" in quiet.stdout, quiet.stdout + quiet.stderr
        assert "runs with other flags" in quiet.stdout and "--disable-uvicorn-access-log" in quiet.stdout
        assert [r.guard_pid for r in server_registry.load_all()].count(server.pgid) == 1
        assert len(server_registry.live()) == 1
        reply = server.client().chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5)
        assert reply.choices[0].message.content
        pgid, port = server.pgid, server.port
    finally:
        report = server.stop()
    assert len(report.pids) >= 4          # guard, API server, engine core, worker
    assert group_members(pgid) == []
    assert not port_in_use(port)
    assert all(r.guard_pid != pgid for r in server_registry.load_all())


def test_api_server_killed_midway_leaves_no_orphans(config, gpu_memory_returns):
    with VLLMServer(config).start(progress=lambda _msg: None) as server:
        api = [pid for pid, name in server.processes() if "api_server" in name]
        engine = [pid for pid, name in server.processes() if "EngineCore" in name]
        assert api and engine
        os.kill(api[0], signal.SIGKILL)
        # vLLM alone leaves EngineCore and its worker running after this (vllm#55510);
        # the guard sees the API server exit and ends the rest of the group.
        assert wait_for(lambda: group_members(server.pgid) == [], 30), server.processes()
        with pytest.raises(ServerDiedError):
            server.health()
    assert not server.alive


def test_kernel_killed_with_sigkill_takes_its_server_along(config, gpu_memory_returns):
    from jupyter_client.manager import KernelManager

    kernel = KernelManager()
    kernel.start_kernel()
    client = kernel.client()
    client.start_channels()
    pgid = port = None
    try:
        client.wait_for_ready(timeout=60)
        out: list[str] = []

        def collect(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = client.execute_interactive(
            "from helpers import VLLMServer, from_settings\n"
            "server = VLLMServer(from_settings()).start()\n"
            "print('GROUP', server.pgid, 'PORT', server.port)",
            timeout=600, output_hook=collect)
        assert reply["content"]["status"] == "ok", "".join(out)
        found = re.search(r"GROUP (\d+) PORT (\d+)", "".join(out))
        pgid, port = int(found[1]), int(found[2])
        assert len(group_members(pgid)) >= 4
        os.kill(kernel.provisioner.process.pid, signal.SIGKILL)
        assert wait_for(lambda: group_members(pgid) == [], 30), group_members(pgid)
        assert wait_for(lambda: not port_in_use(port), 10)
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
        if pgid:
            for pid in group_members(pgid):
                os.kill(pid, signal.SIGKILL)


def test_detached_server_from_the_command_line_outlives_its_launcher_until_stopped():
    # ./tutorial.sh serve|status|stop: a class server that no kernel owns.
    run = lambda action: subprocess.run([sys.executable, "-m", "helpers", action],  # noqa: E731
                                        capture_output=True, text=True, timeout=600)
    started = run("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "detached server ready" in started.stdout
    try:
        records = server_registry.live()            # the launcher has exited; the server runs on
        assert len(records) == 1 and records[0].owner_pid is None
        pgid = records[0].guard_pid
        assert len(group_members(pgid)) >= 4
        assert records[0].url in run("status").stdout
        stopped = run("stop")
        assert "none left" in stopped.stdout, stopped.stdout + stopped.stderr
        assert group_members(pgid) == []
        assert "no tutorial server is running" in run("status").stdout
    finally:
        for record in server_registry.load_all():
            for pid in group_members(record.guard_pid):
                os.kill(pid, signal.SIGKILL)
