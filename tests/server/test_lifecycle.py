"""The server manager against real vLLM (the CPU build here): refusals first, then a shared
class server started twice at once, then the ways a start can die.

Every test checks that no process of the server's group is left afterwards. (What the API
server's death mid-way leaves, and the guard ending it, is checked by notebook 01 with a
strictly compared cell.)
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
from pathlib import Path

import pytest

from helpers.errors import ApiKeyError, ModelNotFoundError, PortInUseError, ServerStartError
from helpers.server import guard, hardware, registry
from helpers.server import lifecycle
from helpers.server.config import ServerConfig, from_settings
from helpers.server.guard import ProcessGroup
from helpers.server.lifecycle import VLLMServer, get_server, port_in_use
from helpers.settings import load_settings
from support import wait_for

KEY = "tutorial-test-key-7f3a"


@pytest.fixture(scope="module")
def config() -> ServerConfig:
    return from_settings(log=lambda _m: None)


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


@pytest.fixture
def own_registry(monkeypatch, tmp_path):
    """A registry of this test's own. The run's registry is shared by the pytest workers: a server
    another worker starts meanwhile would read as one this test left (seen in CI: a refused start
    "left" a record that was another worker's notebook server)."""
    monkeypatch.setenv("TUTORIAL_STATE_DIR", str(tmp_path / "servers"))


def records_now() -> set[int]:
    return {r.guard_pid for r in registry.load_all()}


def kill_new_servers(before: set[int]) -> None:
    for record in registry.load_all():
        if record.guard_pid not in before:
            record.group().kill()
            registry.remove(record)


# --- refused before anything starts -------------------------------------------------------------

def test_missing_model_path_fails_in_milliseconds_before_anything_starts(tmp_path, own_registry):
    missing = tmp_path / "model" / "Qwen2-7B-Instruct"
    before = records_now()
    started = time.monotonic()
    with pytest.raises(ModelNotFoundError, match=re.escape(str(missing))):
        get_server(load_settings(environ={}, model=str(missing)), progress=lambda _m: None)
    assert time.monotonic() - started < 0.5           # no torch probe, no process, no lock wait
    assert records_now() == before


def test_reusing_a_running_server_does_no_work_until_its_handle_starts_a_new_one(tmp_path, own_registry, monkeypatch):
    # A server for these settings runs (a real guard, recorded as a server of the embedded model):
    # get_server() finds it from the settings' plan alone. The model is not converted (a fresh
    # cache folder stays empty), the log preset's file is not written, from_settings never runs.
    from helpers.server import embedded_model

    monkeypatch.setenv("TUTORIAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lifecycle, "from_settings", lambda *a, **k: pytest.fail("prepared a server to reuse one"))
    monkeypatch.setattr(VLLMServer, "wait_ready", lambda self, timeout=None, progress=None: self)
    with open(tmp_path / "guard.log", "ab") as log:
        proc, _ = guard.spawn([sys.executable, "-c", "import time; time.sleep(600)"], marker="running",
                              env=dict(os.environ), log_file=log, owner=False)
    try:
        record = registry.ServerRecord(
            guard_pid=proc.pid, guard_started=guard.proc_info(proc.pid).start_time, server_id="running",
            host="127.0.0.1", port=8199, model=str(embedded_model.model_dir()),
            served_model_name=embedded_model.SERVED_NAME, log_path=str(tmp_path / "vllm.log"), owner_pid=None,
            started_at=time.time(), command="", uid=os.getuid())
        registry.save(record)
        messages = []
        settings = load_settings(environ={}, model="embedded", log_preset="quiet")
        server = get_server(settings, progress=messages.append)
        assert server.record == record and not server.owned
        assert any(m.startswith("Reusing smollm2-135m-instruct at http://127.0.0.1:8199") for m in messages)
        assert not (tmp_path / "cache").exists()
        assert sorted(p.name for p in (tmp_path / "servers").iterdir()) == ["server-8199.json", "start.lock"]
    finally:
        ProcessGroup(proc.pid).kill()
        proc.wait(timeout=10)

    # That server ends; started again from this handle, it does the work first, on the same port.
    class Launching(Exception):
        pass

    prepared = []
    monkeypatch.setattr(lifecycle, "from_settings", lambda s, log=None: prepared.append(s) or
                        ServerConfig(model="prepared", served_model_name=embedded_model.SERVED_NAME))
    monkeypatch.setattr(VLLMServer, "_preflight", lambda self: (_ for _ in ()).throw(Launching(self.config)))
    assert not server.alive
    with pytest.raises(Launching) as launching:
        server.start(progress=lambda _m: None)
    assert prepared == [settings]
    assert (launching.value.args[0].model, launching.value.args[0].port) == ("prepared", 8199)


def test_the_start_lock_is_free_while_a_new_servers_model_is_prepared(tmp_path, own_registry, monkeypatch):
    # Converting or downloading can take minutes: meanwhile another kernel may take the lock
    # (flock conflicts between two open files of one process too, so this checks it here).
    import fcntl

    class Prepared(Exception):
        pass

    def preparing(*_args, **_kwargs):
        fd = os.open(tmp_path / "servers" / registry.LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # BlockingIOError if get_server held it
        finally:
            os.close(fd)
        raise Prepared

    monkeypatch.setattr(lifecycle, "from_settings", preparing)
    monkeypatch.setenv("TUTORIAL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(Prepared):
        get_server(load_settings(environ={}, model="embedded"), progress=lambda _m: None)


def test_busy_port_is_refused_at_once(listener, own_registry):
    before = records_now()
    started = time.monotonic()
    with pytest.raises(PortInUseError, match=f"port {listener} "):
        get_server(load_settings(port=listener), progress=lambda _m: None)
    assert time.monotonic() - started < 2.0
    assert records_now() == before


def test_a_network_address_is_refused_before_anything_starts(own_registry):
    # vLLM's own key guards only /v1, /v2 and /inference: no vLLM server faces the network (a
    # class server is vLLM on loopback behind the gateway).
    from helpers.errors import UnsafeHostError

    before = records_now()
    started = time.monotonic()
    with pytest.raises(UnsafeHostError, match="gateway"):
        get_server(load_settings(host="0.0.0.0"), progress=lambda _m: None)
    assert time.monotonic() - started < 0.5 and records_now() == before


def test_a_class_server_without_student_keys_is_refused(tmp_path, own_registry):
    env = {**os.environ, "TUTORIAL_HOST": "0.0.0.0", "TUTORIAL_CACHE_DIR": str(tmp_path / "cache")}
    before = records_now()
    done = subprocess.run([sys.executable, "-m", "helpers", "start"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused" in done.stderr and "keys create" in done.stderr
    assert records_now() == before                  # nothing started


# --- real vLLM ------------------------------------------------------------------------------------

@pytest.mark.vllm
def test_port_taken_after_the_check_is_named_from_vllms_log(config, listener, monkeypatch):
    # The port can be taken between our check and vLLM's bind; then vLLM itself fails, and the
    # error must still say why, as soon as the process exits (vLLM's import takes ~10 s here).
    monkeypatch.setattr(lifecycle, "port_in_use", lambda *args: False)
    server = VLLMServer(replace(config, port=listener))
    started = time.monotonic()
    with pytest.raises(ServerStartError) as failure:
        server.start(progress=lambda _msg: None)
    elapsed = time.monotonic() - started
    assert failure.value.cause == "port in use"
    assert "Address already in use" in str(failure.value)
    assert elapsed < 90, f"took {elapsed:.0f} s: the failure was not noticed when the process exited"
    assert server.record.group().members() == []


def cli(action: str, env: dict, **kw) -> subprocess.Popen:
    """``python -m helpers ACTION`` (what ./tutorial.sh serve|status|stop run)."""
    return subprocess.Popen([sys.executable, "-m", "helpers", action], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


@pytest.mark.vllm
def test_a_class_server_started_twice_at_once_is_one_server_with_its_key_off_every_command_line(
        gpu_memory_returns, monkeypatch, tmp_path):
    # Two `./tutorial.sh serve` (or two notebooks' get_server()) at the same moment: one server.
    # A registry of its own: `stop` ends every server it lists, and the run's shared server (the
    # same settings) must neither be the one reused nor be stopped here.
    monkeypatch.setenv("TUTORIAL_STATE_DIR", str(tmp_path / "servers"))
    env = {**os.environ, "TUTORIAL_API_KEY": KEY,
           "VLLM_TUTORIAL_LOG_PRESET": "default"}     # an old-style name: must not reach vLLM
    if hardware.gpus():
        # The run's shared server holds most of the card: 0.92 of it, plus CUDA graphs and its CUDA
        # context outside that share (74.7 of 79.2 GiB on an H100, run 6). So this second server
        # asks for a small share and captures no CUDA graphs: with 0.05 (4 GiB) its graphs and
        # context, which vLLM 0.26.0 counts outside the share, ran the card out of memory (run 6)
        env["TUTORIAL_EXTRA_ARGS"] = "--gpu-memory-utilization 0.03 --enforce-eager"
    before = records_now()
    try:
        first, second = cli("start", env), cli("start", env)
        outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
        assert first.returncode == 0 and second.returncode == 0, "\n---\n".join(o[-4000:] for o in outputs)
        assert all("detached server ready" in out for out in outputs), outputs
        assert sum("Reusing" in out for out in outputs) == 1, outputs   # the second waited, then reused
        records = [r for r in registry.live() if r.guard_pid not in before]
        assert len(records) == 1 and records[0].owner_pid is None
        record = records[0]
        server = VLLMServer.attach(record, replace(from_settings(log=lambda _m: None), api_key=KEY))
        group = record.group()
        assert len(group.members()) >= 4                      # guard, API server, engine core, worker

        # The key is in no command line (`ps` shows those to every user), and our settings did
        # not reach vLLM's environment (it warns about every VLLM_* variable it does not know).
        for pid in group.members():
            assert KEY not in " ".join(guard.command_of(pid))
        log = server.log_text()
        assert "Unknown vLLM environment variable" not in log, log
        assert [m["id"] for m in server.models()] == [server.name]
        keyless = VLLMServer.attach(record)
        with pytest.raises(ApiKeyError, match="TUTORIAL_API_KEY"):
            keyless.models()
        reply = server.client().chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=5)
        assert reply.usage.completion_tokens >= 1      # (random weights on a GPU may stop at once)

        # A notebook's get_server() in another process reuses it; other flags are said, not hidden.
        probe = "from helpers import get_server; print('GROUP', get_server().pgid)"
        quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                               env={**env, "TUTORIAL_LOG_PRESET": "quiet"})
        assert f"GROUP {record.guard_pid}" in quiet.stdout, quiet.stdout + quiet.stderr
        assert "runs with other flags" in quiet.stdout and "--disable-uvicorn-access-log" in quiet.stdout

        status = cli("status", env).communicate(timeout=60)[0]
        assert record.url in status
        stopped = cli("stop", env).communicate(timeout=120)[0]
        assert "none left" in stopped, stopped
        assert group.members() == []
        assert not port_in_use(record.port)
        assert "no tutorial server is running" in cli("status", env).communicate(timeout=60)[0]
    finally:
        kill_new_servers(before)


@pytest.mark.vllm
def test_a_kernel_killed_while_the_engine_starts_leaves_nothing_after_5_s(gpu_memory_returns, own_registry):
    from jupyter_client.manager import KernelManager

    before = records_now()
    kernel = KernelManager()
    kernel.start_kernel()
    client = kernel.client()
    client.start_channels()
    group = None
    try:
        client.wait_for_ready(timeout=60)
        client.execute("from helpers import VLLMServer, from_settings\n"
                       "server = VLLMServer(from_settings()).start()")
        new = wait_for(lambda: [r for r in registry.load_all() if r.guard_pid not in before], 60)
        assert new, "the kernel recorded no server"
        group = new[0].group()
        names = lambda: [name for _, name in VLLMServer.attach(new[0]).processes()]  # noqa: E731
        assert wait_for(lambda: any("EngineCore" in n for n in names()), 300), names()   # a loaded machine starts slowly
        # The engine core is starting: the API server ignores SIGTERM until it is up.
        os.kill(kernel.provisioner.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert group.wait_empty(5.0), f"left after 5 s: {group.members()}"
        print(f"group ended {time.monotonic() - killed_at:.1f} s after the kernel's SIGKILL")
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
        kill_new_servers(before)


@pytest.mark.vllm
def test_a_start_whose_engine_dies_while_the_api_server_lives_fails_within_10_s(config, gpu_memory_returns,
                                                                                monkeypatch):
    # Seen with tensor parallelism on two GPUs: a worker died with a CUDA error, the API server
    # and engine core stayed alive, and the wait went on to the timeout. On the CPU vLLM exits by
    # itself, so here the API server is frozen (SIGSTOP) to hold it alive the same way, and a
    # worker is killed: the fatal lines in the log must end the start, with the cause named.
    # On one GPU vLLM 0.26.0 runs the worker inside the engine core (its `uni` executor): there is
    # no VLLM::Worker process, so there the engine core is the one that dies (GPU run 6 waited
    # 300 s for a worker that never came).
    # The wait runs from the start, as get_server's does: it must have seen the process that dies
    # (a killed engine core writes no line of its own to the log).
    import threading

    from helpers.server.diagnosis import StartWatch

    shown: set[int] = set()              # the pids the start watch has been shown, by the wait itself
    watched = StartWatch.failed

    def failed(self, log_text, workers, engines=()):
        shown.update(workers, engines)
        return watched(self, log_text, workers, engines)

    monkeypatch.setattr(StartWatch, "failed", failed)
    target = "VLLM::EngineCore" if hardware.gpus() and config.tensor_parallel_size == 1 else "VLLM::Worker"
    messages: list[str] = []
    server = VLLMServer(config)
    server.launch(messages.append)
    group = server.record.group()
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            server.wait_ready(progress=messages.append)
            outcome.append(None)
        except BaseException as err:      # noqa: BLE001 (handed to the test's thread)
            outcome.append(err)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    try:
        # one the wait has been shown (not a time to sleep: a slow machine polls slower)
        workers = lambda: [pid for pid, name in server.processes() if target in name and pid in shown]  # noqa: E731
        assert wait_for(workers, 300), server.processes()   # a loaded machine starts slowly
        api = next(pid for pid, name in server.processes() if "vllm.entrypoints" in name)   # either launch form
        os.kill(api, signal.SIGSTOP)
        os.kill(workers()[0], signal.SIGKILL)
        killed_at = time.monotonic()
        waiting.join(timeout=60)
        took = time.monotonic() - killed_at
        assert outcome, f"the failed start was not noticed within {took:.0f} s"
        assert took < 10, f"the failed start was noticed after {took:.0f} s"
        failure = outcome[0]
        assert isinstance(failure, ServerStartError), repr(failure)
        assert failure.cause in ("a worker died", "engine core failed"), str(failure)
        assert "and it was stopped" in str(failure)
        assert group.members() == []
    finally:
        group.kill()
        waiting.join(timeout=30)
