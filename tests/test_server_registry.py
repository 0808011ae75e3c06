"""Tests for helpers/server_registry.py: records on disk, the guard liveness check, the orphan reaper."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import process_guard, server_registry
from helpers.process_guard import group_members
from helpers.server_registry import ServerRecord
from support import alive, kill_group, proc_state, wait_for

GUARD = str(Path(process_guard.__file__).resolve())


def record(**kw) -> ServerRecord:
    base = dict(guard_pid=4242, host="127.0.0.1", port=8123, model="/models/Qwen2-7B-Instruct",
                served_model_name="Qwen2-7B-Instruct", log_path="/tmp/vllm-8123.log",
                owner_pid=1234, started_at=time.time() - 5,
                command="python -m vllm.entrypoints.openai.api_server --api-key $VLLM_TUTORIAL_API_KEY")
    base.update(kw)
    return ServerRecord(**base)


def quiet(*_a, **_k):
    pass


# --- records on disk --------------------------------------------------------------------------

def test_save_load_remove_round_trip(tmp_path):
    rec = record()
    path = server_registry.save(rec, root=tmp_path)
    assert path == tmp_path / "server-8123.json"
    assert server_registry.load_all(root=tmp_path) == [rec]
    assert json.loads(path.read_text())["guard_pid"] == 4242
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed
    server_registry.remove(rec, root=tmp_path)
    assert not path.exists()
    assert server_registry.load_all(root=tmp_path) == []


def test_record_never_holds_an_api_key(tmp_path):
    # Records may be shared (a class's state folder), so the key stays in each user's settings.
    path = server_registry.save(record(), root=tmp_path)
    assert "api_key" not in json.loads(path.read_text())
    assert "api_key" not in {f.name for f in dataclasses.fields(server_registry.ServerRecord)}


def test_save_overwrites_the_record_of_the_same_port(tmp_path):
    server_registry.save(record(guard_pid=1), root=tmp_path)
    server_registry.save(record(guard_pid=2), root=tmp_path)
    assert [r.guard_pid for r in server_registry.load_all(root=tmp_path)] == [2]


def test_several_records_are_listed(tmp_path):
    recs = [record(port=p, guard_pid=p) for p in (8001, 8002, 8003)]
    for r in recs:
        server_registry.save(r, root=tmp_path)
    assert sorted(r.port for r in server_registry.load_all(root=tmp_path)) == [8001, 8002, 8003]


def test_remove_only_deletes_when_the_guard_pid_matches(tmp_path):
    mine = record(guard_pid=100)
    server_registry.save(mine, root=tmp_path)
    # another server, recorded later on the same port, must not be forgotten by an old handle
    server_registry.remove(record(guard_pid=200), root=tmp_path)
    assert server_registry.load_all(root=tmp_path) == [mine]
    server_registry.remove(mine, root=tmp_path)
    assert server_registry.load_all(root=tmp_path) == []


def test_remove_of_a_missing_record_is_quiet(tmp_path):
    server_registry.remove(record(), root=tmp_path)


def test_load_all_drops_unreadable_files(tmp_path):
    good = record(port=8001)
    server_registry.save(good, root=tmp_path)
    (tmp_path / "server-8002.json").write_text("{ cut short")
    (tmp_path / "server-8003.json").write_text(json.dumps({"guard_pid": 1, "port": 8003}))
    (tmp_path / "server-8004.json").write_text(json.dumps({**json.loads(
        (tmp_path / "server-8001.json").read_text()), "port": 8004, "new_field": 1}))
    (tmp_path / "notes.json").write_text("not a record, not touched")
    assert server_registry.load_all(root=tmp_path) == [good]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "server-8001.json"]


def test_root_folder_is_created(tmp_path):
    root = tmp_path / "a" / "b"
    server_registry.save(record(), root=root)
    assert (root / "server-8123.json").is_file()


def test_url_and_describe():
    assert record(host="0.0.0.0").url == "http://127.0.0.1:8123"
    assert record(host="127.0.0.1", port=9000).url == "http://127.0.0.1:9000"
    text = record(owner_pid=None).describe()
    assert "detached" in text and "http://127.0.0.1:8123" in text and "4242" in text
    assert "owned by pid 1234" in record().describe()


# --- guard_alive ------------------------------------------------------------------------------

def test_guard_alive_false_for_a_dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    assert not server_registry.guard_alive(record(guard_pid=proc.pid))


def test_guard_alive_false_for_a_live_process_that_is_not_a_guard():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert alive(proc.pid)
        assert not server_registry.guard_alive(record(guard_pid=proc.pid))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_guard_alive_false_for_a_zombie_guard():
    proc = subprocess.Popen([sys.executable, "-c", "pass  # process_guard"])
    try:
        assert wait_for(lambda: proc_state(proc.pid) == b"Z", 10)  # exited, not reaped yet
        assert not server_registry.guard_alive(record(guard_pid=proc.pid))
    finally:
        proc.wait(timeout=10)


@pytest.fixture
def live_guard(tmp_path):
    """A real detached guard running a sleeping child."""
    guard = subprocess.Popen(
        [sys.executable, GUARD, "--grace", "1", "--", sys.executable, "-c",
         "import time; time.sleep(600)"],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(group_members(guard.pid)) == 2, 15)
        yield guard
    finally:
        kill_group(guard.pid)
        guard.wait(timeout=10)


def test_guard_alive_true_for_a_real_guard(live_guard):
    assert server_registry.guard_alive(record(guard_pid=live_guard.pid))


def test_prune_keeps_a_live_guard(tmp_path, live_guard):
    rec = record(guard_pid=live_guard.pid)
    server_registry.save(rec, root=tmp_path)
    assert server_registry.prune(root=tmp_path, log=quiet) == []
    assert server_registry.live(root=tmp_path) == [rec]
    assert len(group_members(live_guard.pid)) == 2  # nothing was killed


# --- prune: the orphan reaper -----------------------------------------------------------------

def test_prune_kills_the_leftovers_of_a_dead_guard_and_drops_its_record(tmp_path):
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
    leader = subprocess.Popen([sys.executable, "-c", leader_code], start_new_session=True,
                              stdin=subprocess.DEVNULL)
    try:
        assert leader.wait(timeout=15) == 0
        leftover = int(ready.read_text())
        assert group_members(leader.pid) == [leftover]
        dead = record(guard_pid=leader.pid, port=8555)
        alive_elsewhere = record(guard_pid=leader.pid, port=8556)
        server_registry.save(dead, root=tmp_path)
        server_registry.save(alive_elsewhere, root=tmp_path)
        messages = []

        gone = server_registry.prune(root=tmp_path, log=messages.append)

        assert sorted(r.port for r in gone) == [8555, 8556]
        assert wait_for(lambda: not alive(leftover), 5)
        assert group_members(leader.pid) == []
        assert server_registry.load_all(root=tmp_path) == []
        assert any(str(leftover) in m and "orphaned" in m for m in messages)
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_prune_drops_a_record_whose_group_is_already_empty(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(timeout=10)
    rec = record(guard_pid=proc.pid)
    server_registry.save(rec, root=tmp_path)
    messages = []
    assert server_registry.prune(root=tmp_path, log=messages.append) == [rec]
    assert messages == []  # nothing to end
    assert server_registry.load_all(root=tmp_path) == []
