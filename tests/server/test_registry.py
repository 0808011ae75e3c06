"""Tests for helpers/server/registry.py: records on disk, the guard liveness check, the orphan
reaper that touches only a dead server's own processes, and the start lock."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from helpers.server import guard, registry
from helpers.server.guard import MARKER_VARIABLE, ProcessGroup, proc_info
from helpers.server.registry import GATEWAY, GatewayRecord, ServerRecord
from support import alive, kill_group, proc_state, wait_for


def record(**kw) -> ServerRecord:
    base = dict(guard_pid=4242, guard_started=1, server_id="abc", host="127.0.0.1", port=8123,
                model="/models/Qwen2-7B-Instruct", served_model_name="Qwen2-7B-Instruct",
                log_path="/tmp/vllm-8123.log", owner_pid=1234, started_at=time.time() - 5,
                command="VLLM_API_KEY=$TUTORIAL_API_KEY python -m vllm.entrypoints.openai.api_server",
                uid=os.getuid())
    base.update(kw)
    return ServerRecord(**base)


def record_of(proc: subprocess.Popen, marker: str, **kw) -> ServerRecord:
    """A record naming ``proc`` as the guard, as the server manager writes it."""
    return record(guard_pid=proc.pid, guard_started=proc_info(proc.pid).start_time, server_id=marker, **kw)


# --- records on disk --------------------------------------------------------------------------

def test_save_load_remove_round_trip(tmp_path):
    rec = record()
    path = registry.save(rec, root=tmp_path)
    assert path == tmp_path / "server-8123.json"
    assert registry.load_all(root=tmp_path) == [rec]
    assert json.loads(path.read_text())["guard_pid"] == 4242
    assert [p.name for p in tmp_path.iterdir()] == ["server-8123.json"]  # no temporary file left
    registry.remove(rec, root=tmp_path)
    assert not path.exists()
    assert registry.load_all(root=tmp_path) == []


def test_record_never_holds_an_api_key(tmp_path):
    # Records may be shared (a class's state folder), so the key stays in each user's settings.
    path = registry.save(record(), root=tmp_path)
    assert "api_key" not in json.loads(path.read_text())
    assert "api_key" not in {f.name for f in dataclasses.fields(ServerRecord)}


def test_the_records_user_is_the_files_owner_whatever_it_claims(tmp_path):
    registry.save(record(uid=0 if os.getuid() else 12345), root=tmp_path)
    assert [r.uid for r in registry.load_all(root=tmp_path)] == [os.getuid()]


def test_save_overwrites_the_record_of_the_same_port(tmp_path):
    registry.save(record(guard_pid=1), root=tmp_path)
    registry.save(record(guard_pid=2), root=tmp_path)
    assert [r.guard_pid for r in registry.load_all(root=tmp_path)] == [2]


def test_remove_only_deletes_when_the_guard_pid_matches(tmp_path):
    mine = record(guard_pid=100)
    registry.save(mine, root=tmp_path)
    # another server, recorded later on the same port, must not be forgotten by an old handle
    registry.remove(record(guard_pid=200), root=tmp_path)
    assert registry.load_all(root=tmp_path) == [mine]
    registry.remove(mine, root=tmp_path)
    assert registry.load_all(root=tmp_path) == []


def test_remove_of_a_missing_record_is_quiet(tmp_path):
    messages = []
    registry.remove(record(), root=tmp_path, log=messages.append)
    assert messages == []


def test_unreadable_records_are_named_and_moved_aside(tmp_path):
    good = record(port=8001)
    registry.save(good, root=tmp_path)
    (tmp_path / "server-8002.json").write_text("{ cut short")
    (tmp_path / "server-8003.json").write_text(json.dumps({"guard_pid": 1, "port": 8003}))
    (tmp_path / "server-8004.json").write_text("[1, 2]")
    (tmp_path / "notes.json").write_text("not a record, not touched")
    messages = []
    assert registry.load_all(root=tmp_path, log=messages.append) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.json", "server-8001.json", "server-8002.json.unreadable",
        "server-8003.json.unreadable", "server-8004.json.unreadable"]
    assert len(messages) == 3 and all("moved to" in m for m in messages)
    assert registry.load_all(root=tmp_path, log=messages.append) == [good] and len(messages) == 3


@pytest.mark.skipif(os.getuid() == 0, reason="root reads every file")
def test_a_record_that_cannot_be_read_is_named_not_a_crash(tmp_path):
    path = registry.save(record(), root=tmp_path)
    path.chmod(0)
    messages = []
    assert registry.load_all(root=tmp_path, log=messages.append) == []
    assert "permission denied" in messages[0]


def test_root_folder_is_created(tmp_path):
    root = tmp_path / "a" / "b"
    registry.save(record(), root=root)
    assert (root / "server-8123.json").is_file()


def test_url_and_describe():
    assert record(host="0.0.0.0").url == "http://127.0.0.1:8123"
    assert record(host="127.0.0.1", port=9000).url == "http://127.0.0.1:9000"
    text = record(owner_pid=None).describe()
    assert "detached" in text and "http://127.0.0.1:8123" in text and "4242" in text
    assert "owned by pid 1234" in record().describe()


# --- guard_alive ------------------------------------------------------------------------------

@pytest.fixture
def live_guard(tmp_path):
    """A real detached guard (started by guard.spawn) running a sleeping child."""
    with open(tmp_path / "guard.log", "ab") as log:
        proc, _ = guard.spawn([sys.executable, "-c", "import time; time.sleep(600)"], marker="live",
                              env=dict(os.environ), log_file=log, owner=False)
    try:
        assert wait_for(lambda: len(ProcessGroup(proc.pid).members()) == 2, 15)
        yield proc
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=10)


def test_guard_alive_true_for_a_real_guard(live_guard):
    assert registry.guard_alive(record_of(live_guard, "live"))


def test_guard_alive_false_when_the_pid_was_reused(live_guard):
    # Same pid, another start time: the recorded guard is gone and its pid went to someone else.
    rec = record_of(live_guard, "live")
    assert not registry.guard_alive(dataclasses.replace(rec, guard_started=rec.guard_started - 1))


def test_guard_alive_false_for_a_dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    assert not registry.guard_alive(record(guard_pid=proc.pid))


def test_guard_alive_false_for_a_live_process_that_is_not_a_guard():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not registry.guard_alive(record_of(proc, "x"))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_guard_alive_false_for_a_zombie_guard(tmp_path):
    fake = tmp_path / "guard.py"
    fake.write_text("pass\n")
    proc = subprocess.Popen([sys.executable, str(fake)])
    try:
        rec = record(guard_pid=proc.pid, guard_started=proc_info(proc.pid).start_time)
        assert wait_for(lambda: proc_state(proc.pid) == b"Z", 10)  # exited, not reaped yet
        assert not registry.guard_alive(rec)
    finally:
        proc.wait(timeout=10)


# --- prune: the orphan reaper -----------------------------------------------------------------

def orphaned_group(tmp_path: Path, marker: str | None) -> tuple[subprocess.Popen, int]:
    """A dead guard's group: its leader has exited and one process (``marker`` in its
    environment, or none) lives on in the group."""
    ready = tmp_path / "leftover.pid"
    leftover_code = textwrap.dedent(f"""
        import os, time
        open({str(ready) + '.tmp'!r}, 'w').write(str(os.getpid()))
        os.replace({str(ready) + '.tmp'!r}, {str(ready)!r})
        time.sleep(600)
    """)
    leader_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', {leftover_code!r}])
        while not os.path.exists({str(ready)!r}):
            time.sleep(0.02)
    """)  # the leader (standing for a guard killed hard) exits; its group lives on
    env = {k: v for k, v in os.environ.items() if k != MARKER_VARIABLE}
    if marker:
        env[MARKER_VARIABLE] = marker
    leader = subprocess.Popen([sys.executable, "-c", leader_code], start_new_session=True,
                              stdin=subprocess.DEVNULL, env=env)
    assert leader.wait(timeout=15) == 0
    return leader, int(ready.read_text())


def test_prune_kills_the_leftovers_of_a_dead_server_and_drops_its_record(tmp_path):
    leader, leftover = orphaned_group(tmp_path, marker="dead-server")
    try:
        dead = record(guard_pid=leader.pid, server_id="dead-server", port=8555)
        registry.save(dead, root=tmp_path)
        messages = []
        assert registry.prune(root=tmp_path, log=messages.append) == [dead]
        assert wait_for(lambda: not alive(leftover), 5)
        assert registry.load_all(root=tmp_path) == []
        assert any(str(leftover) in m and "orphaned" in m for m in messages)
    finally:
        kill_group(leader.pid)


def test_a_look_ends_nothing_only_prune_does(tmp_path):
    # `./tutorial.sh status` (live(), stale()) only looks: the dead server's leftover survives it,
    # and is ended by the explicit clean-up (prune: run by a start or by ./tutorial.sh stop).
    leader, leftover = orphaned_group(tmp_path, marker="dead-server")
    try:
        dead = record(guard_pid=leader.pid, server_id="dead-server", port=8557)
        registry.save(dead, root=tmp_path)
        assert registry.live(root=tmp_path) == [] and registry.stale(root=tmp_path) == [dead]
        time.sleep(0.3)
        assert alive(leftover) and registry.load_all(root=tmp_path) == [dead]
        assert registry.prune(root=tmp_path, log=lambda _m: None) == [dead]
        assert wait_for(lambda: not alive(leftover), 5)
    finally:
        kill_group(leader.pid)


def test_prune_never_touches_a_process_that_only_reuses_the_group_id(tmp_path):
    # The record outlived its server; the group id now belongs to an unrelated process (a
    # Jupyter kernel leads its own group): it carries no marker, and stays alive.
    leader, stranger = orphaned_group(tmp_path, marker=None)
    try:
        stale = record(guard_pid=leader.pid, server_id="long-gone-server", port=8556)
        registry.save(stale, root=tmp_path)
        messages = []
        assert registry.prune(root=tmp_path, log=messages.append) == [stale]
        time.sleep(0.3)
        assert alive(stranger)
        assert registry.load_all(root=tmp_path) == []
        assert any(str(stranger) in m and "left alone" in m for m in messages)
    finally:
        kill_group(leader.pid)


def test_prune_of_a_real_kernel_group_leaves_the_kernel_alive(tmp_path):
    """The case seen with a real kernel: a record whose guard pid is now a live kernel's pid."""
    from jupyter_client.manager import KernelManager

    kernel = KernelManager()
    kernel.start_kernel()
    try:
        pid = kernel.provisioner.process.pid
        assert proc_info(pid).pgid == pid          # a kernel leads its own process group
        registry.save(record(guard_pid=pid, guard_started=0, server_id="old", port=8557), root=tmp_path)
        registry.prune(root=tmp_path, log=lambda _m: None)
        time.sleep(0.3)
        assert alive(pid) and kernel.is_alive()
    finally:
        kernel.shutdown_kernel(now=True)


def test_prune_keeps_a_live_guard(tmp_path, live_guard):
    rec = record_of(live_guard, "live")
    registry.save(rec, root=tmp_path)
    assert registry.prune(root=tmp_path, log=lambda _m: None) == []
    assert registry.live(root=tmp_path) == [rec]
    assert len(ProcessGroup(live_guard.pid).members()) == 2  # nothing was killed


def test_prune_drops_a_record_whose_group_is_already_empty(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(timeout=10)
    rec = record(guard_pid=proc.pid)
    registry.save(rec, root=tmp_path)
    messages = []
    assert registry.prune(root=tmp_path, log=messages.append) == [rec]
    assert messages == []  # nothing to end
    assert registry.load_all(root=tmp_path) == []


# --- gateways: the same registry ----------------------------------------------------------------

def gateway_record(**kw) -> GatewayRecord:
    base = dict(guard_pid=4343, guard_started=1, host="198.18.0.1", port=8080, upstream="unix:/run/vllm.sock",
                keys_path="/keys.json", log_path="/tmp/gateway-8080.log", owner_pid=None,
                started_at=time.time() - 5, server_id="gw", uid=os.getuid())
    base.update(kw)
    return GatewayRecord(**base)


def test_gateways_and_servers_share_the_registry_and_keep_their_kinds(tmp_path):
    # one port for both: the files are kept apart by kind, each read back as its own record
    server, gateway = record(port=8080), gateway_record(port=8080)
    assert registry.save(server, root=tmp_path).name == "server-8080.json"
    assert registry.save(gateway, root=tmp_path).name == "gateway-8080.json"
    assert registry.load_all(root=tmp_path) == [server]
    assert registry.load_all(root=tmp_path, kind=GATEWAY) == [gateway]
    assert "gateway at http://198.18.0.1:8080 -> unix:/run/vllm.sock (detached" in gateway.describe()
    registry.remove(gateway, root=tmp_path)
    assert registry.load_all(root=tmp_path, kind=GATEWAY) == [] and registry.load_all(root=tmp_path) == [server]


def test_a_gateway_record_of_an_older_version_is_read_and_moved_aside_if_broken(tmp_path):
    # before the registry was one, a gateway's record had no marker: it is still read
    old = {k: v for k, v in dataclasses.asdict(gateway_record()).items() if k not in ("server_id", "uid")}
    (tmp_path / "gateway-8080.json").write_text(json.dumps(old))
    (tmp_path / "gateway-8081.json").write_text("{not json")
    messages = []
    [read] = registry.load_all(root=tmp_path, log=messages.append, kind=GATEWAY)
    assert read.server_id == "" and read.uid == os.getuid() and read.group().marker is None
    assert (tmp_path / "gateway-8081.json.unreadable").exists()
    assert messages == ["note: gateway-8081.json is not a gateway record this version can read "
                        "(JSONDecodeError); moved to gateway-8081.json.unreadable"]


def test_a_dead_gateways_leftovers_are_ended_by_prune_only_and_a_look_ends_nothing(tmp_path):
    leader, leftover = orphaned_group(tmp_path, marker="dead-gateway")
    try:
        dead = gateway_record(guard_pid=leader.pid, server_id="dead-gateway")
        registry.save(dead, root=tmp_path)
        assert registry.live(root=tmp_path, kind=GATEWAY) == []
        assert registry.stale(root=tmp_path, kind=GATEWAY) == [dead]
        time.sleep(0.3)
        assert alive(leftover)
        assert registry.prune(root=tmp_path, log=lambda _m: None) == []     # servers' kind: not this one
        assert alive(leftover)
        assert registry.prune(root=tmp_path, log=lambda _m: None, kind=GATEWAY) == [dead]
        assert wait_for(lambda: not alive(leftover), 5)
        assert registry.load_all(root=tmp_path, kind=GATEWAY) == []
    finally:
        kill_group(leader.pid)


def test_a_live_gateways_guard_is_alive_to_the_registry(tmp_path, live_guard):
    rec = gateway_record(guard_pid=live_guard.pid, guard_started=proc_info(live_guard.pid).start_time,
                         server_id="live")
    registry.save(rec, root=tmp_path)
    assert registry.live(root=tmp_path, kind=GATEWAY) == [rec]
    assert registry.prune(root=tmp_path, log=lambda _m: None, kind=GATEWAY) == []


# --- claim: one start at a time ---------------------------------------------------------------

def test_claim_makes_a_second_process_wait_and_says_so(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from helpers.server import registry
        from pathlib import Path
        with registry.claim(Path({str(tmp_path)!r}), wait_message=lambda: print('waiting', flush=True)):
            print('claimed', time.monotonic(), flush=True)
    """)
    with registry.claim(tmp_path):
        other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert other.poll() is None                 # blocked on the lock we hold
        released = time.monotonic()
    out, _ = other.communicate(timeout=30)
    assert out.startswith("waiting\nclaimed ")
    assert float(out.split()[-1]) >= released


def test_claim_is_free_again_after_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with registry.claim(tmp_path):
            raise RuntimeError("a start that failed")
    done = threading.Event()

    def take():
        with registry.claim(tmp_path):
            done.set()
    threading.Thread(target=take, daemon=True).start()
    assert done.wait(5)


# --- ./tutorial.sh status and stop --------------------------------------------------------------

def test_status_only_looks_and_stop_cleans_up_servers_and_gateways(tmp_path):
    # `./tutorial.sh status` is `python -m helpers status`: it names a dead server's and a dead
    # gateway's records as stale and ends nothing; `stop` is the clean-up that ends their leftovers.
    state = tmp_path / "state"
    (tmp_path / "s").mkdir()
    (tmp_path / "g").mkdir()
    server_leader, server_leftover = orphaned_group(tmp_path / "s", marker="dead-server")
    gateway_leader, gateway_leftover = orphaned_group(tmp_path / "g", marker="dead-gateway")
    try:
        registry.save(record(guard_pid=server_leader.pid, server_id="dead-server", port=8558), root=state)
        registry.save(gateway_record(guard_pid=gateway_leader.pid, server_id="dead-gateway"), root=state)
        env = {**os.environ, "TUTORIAL_STATE_DIR": str(state)}

        def cli(action: str) -> str:
            done = subprocess.run([sys.executable, "-m", "helpers", action], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            return done.stdout

        shown = cli("status")
        assert "stale record: Qwen2-7B-Instruct at http://127.0.0.1:8558" in shown
        assert "stale record: gateway at http://198.18.0.1:8080" in shown
        assert "no tutorial server is running" in shown
        time.sleep(0.3)
        assert alive(server_leftover) and alive(gateway_leftover)
        assert len(list(state.glob("*-*.json"))) == 2
        cli("stop")
        assert wait_for(lambda: not alive(server_leftover) and not alive(gateway_leftover), 10)
        assert list(state.glob("*-*.json")) == []
    finally:
        kill_group(server_leader.pid)
        kill_group(gateway_leader.pid)
