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
from helpers.server.registry import ServerRecord
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
