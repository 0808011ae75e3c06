"""Tests for helpers/server/guard.py with real processes: a server's group, and only it, ends.

Every test builds a real process tree (guard -> child -> grandchild, standing for vLLM's API
server and its engine core) in its own process group and checks, through /proc, that the whole
group is gone afterwards. Each group is SIGKILLed at teardown, so a failure leaves nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers.server import guard
from helpers.server.guard import FAST_GRACE, GRACE, MARKER_VARIABLE, ProcessGroup, proc_info
from support import alive, kill_group, wait_for


# --- process trees ----------------------------------------------------------------------------

def read_pid(path: Path, timeout: float = 15) -> int:
    assert wait_for(path.exists, timeout), f"{path} never appeared"
    return int(path.read_text())


def announce(path: Path) -> str:
    """Code that writes this process's pid to ``path`` atomically."""
    return (f"open({str(path) + '.tmp'!r}, 'w').write(str(os.getpid())); "
            f"os.replace({str(path) + '.tmp'!r}, {str(path)!r})")


def grandchild_code(ready: Path, ignore_term: bool = False) -> str:
    """A process that (maybe) ignores SIGTERM, says it is ready, and sleeps."""
    return textwrap.dedent(f"""
        import os, signal, time
        if {ignore_term!r}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        {announce(ready)}
        time.sleep(600)
    """)


def child_code(tmp: Path, ignore_term: bool = False, exit_code: int | None = None,
               child_ignores_term: bool = False) -> str:
    """The stand-in for vLLM's API server: it starts a grandchild (the engine core), waits until
    that one is ready, writes its own pid, then sleeps (or exits with ``exit_code``)."""
    gc_ready = tmp / "grandchild.pid"
    end = "time.sleep(600)" if exit_code is None else f"sys.exit({exit_code})"
    return textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        if {child_ignores_term!r}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, '-c', {grandchild_code(gc_ready, ignore_term)!r}])
        while not os.path.exists({str(gc_ready)!r}):
            time.sleep(0.02)
        {announce(tmp / "child.pid")}
        {end}
    """)


@pytest.fixture
def spawned(tmp_path):
    """``guard_proc, owner_fd, group = spawned(child)``: started by ``guard.spawn``, as the
    server manager starts vLLM. Everything is SIGKILLed at teardown."""
    started: list[tuple[subprocess.Popen, int | None]] = []

    def start(child: str, owner: bool = True):
        with open(tmp_path / "guard.log", "ab") as log:
            proc, owner_fd = guard.spawn([sys.executable, "-c", child], marker="test-marker",
                                         env=dict(os.environ), log_file=log, owner=owner)
        started.append((proc, owner_fd))
        return proc, owner_fd, ProcessGroup(proc.pid, proc_info(proc.pid).start_time, "test-marker",
                                            uid=os.getuid())

    yield start
    for proc, owner_fd in started:
        if owner_fd is not None:
            try:
                os.close(owner_fd)
            except OSError:
                pass
        kill_group(proc.pid)
        proc.wait(timeout=10)


def tree_ready(tmp: Path, group: ProcessGroup) -> tuple[int, int]:
    child = read_pid(tmp / "child.pid")
    grandchild = read_pid(tmp / "grandchild.pid")
    assert {group.pgid, child, grandchild} <= set(group.members()), group.members()
    return child, grandchild


def guard_log(tmp: Path) -> str:
    return (tmp / "guard.log").read_text(errors="replace")


# --- the guard as a program -------------------------------------------------------------------

def test_every_process_of_the_group_carries_the_marker(tmp_path, spawned):
    proc, _fd, group = spawned(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, group)
    for pid in (proc.pid, child, grandchild):
        assert guard.carries_marker(pid, "test-marker") is True
        assert guard.carries_marker(pid, "another-marker") is False
    assert guard.carries_marker(os.getpid(), "test-marker") is False


def test_owner_closing_its_pipe_ends_the_group_at_once(tmp_path, spawned):
    proc, owner_fd, group = spawned(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, group)
    assert proc.poll() is None  # the owner still holds the pipe: nothing ends

    os.close(owner_fd)
    assert group.wait_empty(5), group.members()
    assert not alive(child) and not alive(grandchild)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM  # the child ended by SIGTERM
    assert "owner process exited" in guard_log(tmp_path)


def test_owner_gone_kills_what_ignores_sigterm_after_the_fast_grace(tmp_path, spawned):
    # vLLM's API server ignores SIGTERM while its engine starts: the owner's death must still
    # end everything within a few seconds (issue: a kernel killed during start-up took 17-20 s).
    proc, owner_fd, group = spawned(child_code(tmp_path, ignore_term=True, child_ignores_term=True))
    child, grandchild = tree_ready(tmp_path, group)
    start = time.monotonic()
    os.close(owner_fd)
    assert group.wait_empty(FAST_GRACE + 3), group.members()
    took = time.monotonic() - start
    assert FAST_GRACE - 0.5 <= took < FAST_GRACE + 2, f"ended after {took:.1f} s"
    assert not alive(child) and not alive(grandchild)
    proc.wait(timeout=10)
    assert "needed SIGKILL" in guard_log(tmp_path)


def test_sigterm_to_the_guard_ends_the_group(tmp_path, spawned):
    proc, _fd, group = spawned(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, group)
    os.kill(proc.pid, signal.SIGTERM)
    assert group.wait_empty(2 * GRACE + 3), group.members()
    assert not alive(child) and not alive(grandchild)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert "received SIGTERM" in guard_log(tmp_path)


def test_sigterm_ends_a_group_that_ignores_it_within_twice_the_grace(tmp_path, spawned):
    proc, _fd, group = spawned(child_code(tmp_path, ignore_term=True, child_ignores_term=True))
    tree_ready(tmp_path, group)
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert group.wait_empty(2 * GRACE + 3), group.members()
    took = time.monotonic() - start
    assert 2 * GRACE - 0.5 <= took < 2 * GRACE + 2, f"ended after {took:.1f} s"
    proc.wait(timeout=10)
    assert "(2 needed SIGKILL)" in guard_log(tmp_path)


def test_detached_guard_ends_the_group_on_sigterm(tmp_path, spawned):
    proc, owner_fd, group = spawned(child_code(tmp_path), owner=False)
    assert owner_fd is None
    tree_ready(tmp_path, group)
    os.kill(proc.pid, signal.SIGTERM)
    assert group.wait_empty(2 * GRACE + 3), group.members()
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert "(detached)" in guard_log(tmp_path)


def test_owner_killed_with_sigkill_ends_the_group(tmp_path):
    """The real case: the kernel that started the guard dies hard."""
    guard_pid_file = tmp_path / "guard.pid"
    owner_code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(guard.__file__).parent)!r})
        import guard
        log = open({str(tmp_path / 'guard.log')!r}, 'ab')
        proc, fd = guard.spawn([sys.executable, '-c', {child_code(tmp_path)!r}], marker='m1',
                               env=dict(os.environ), log_file=log)
        {announce(guard_pid_file).replace("os.getpid()", "proc.pid")}
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdin=subprocess.DEVNULL)
    guard_pid = None
    try:
        guard_pid = read_pid(guard_pid_file)
        group = ProcessGroup(guard_pid, proc_info(guard_pid).start_time, "m1", uid=os.getuid())
        child, grandchild = tree_ready(tmp_path, group)
        owner.kill()  # SIGKILL: no handler, no atexit, no cleanup code runs in the owner
        owner.wait(timeout=10)
        assert group.wait_empty(FAST_GRACE + 2), group.members()
        assert not alive(guard_pid) and not alive(child) and not alive(grandchild)
        assert wait_for(lambda: "process group ended" in guard_log(tmp_path), 5)
        assert "owner process exited" in guard_log(tmp_path)
    finally:
        owner.kill()
        owner.wait(timeout=10)
        kill_group(guard_pid)


def test_child_exiting_by_itself_sweeps_the_group_and_keeps_its_code(tmp_path, spawned):
    proc, _fd, group = spawned(child_code(tmp_path, exit_code=3))
    grandchild = read_pid(tmp_path / "grandchild.pid")
    assert proc.wait(timeout=2 * GRACE + 10) == 3
    assert group.wait_empty(5), group.members()
    assert not alive(grandchild)
    assert "server exited with code 3" in guard_log(tmp_path)


def test_guard_without_a_command_refuses():
    result = subprocess.run([sys.executable, guard.__file__, "--"], capture_output=True,
                            text=True, timeout=30, start_new_session=True)
    assert result.returncode == 2
    assert "no command given" in result.stderr


# --- ProcessGroup, called directly --------------------------------------------------------------

def start_tree(tmp: Path, ignore_term: bool = False, marker: str | None = "tree") -> tuple[subprocess.Popen, int]:
    """A leader in a new session (like the guard) with one grandchild, both ready; both carry
    ``marker`` in their environment (none when it is None)."""
    gc_ready = tmp / "grandchild.pid"
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', {grandchild_code(gc_ready, ignore_term)!r}])
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != MARKER_VARIABLE}
    if marker is not None:
        env[MARKER_VARIABLE] = marker
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                              stdin=subprocess.DEVNULL, env=env)
    try:
        grandchild = read_pid(gc_ready)
    except BaseException:
        kill_group(leader.pid)
        leader.wait(timeout=10)
        raise
    return leader, grandchild


@pytest.fixture
def tree(tmp_path):
    trees = []

    def make(**kw):
        trees.append(start_tree(tmp_path, **kw)[0])
        return trees[-1], read_pid(tmp_path / "grandchild.pid")

    yield make
    for leader in trees:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_proc_info_reads_state_group_and_start_time(tree):
    leader, grandchild = tree()
    info = proc_info(grandchild)
    assert info.pgid == leader.pid and info.running
    assert info.start_time >= proc_info(leader.pid).start_time
    assert proc_info(2 ** 22 + 7) is None


def test_members_lists_the_group_and_leaves_out_zombies(tree):
    leader, grandchild = tree()
    group = ProcessGroup(leader.pid)
    assert sorted(group.members()) == sorted([leader.pid, grandchild])
    assert group.members(exclude=leader.pid) == [grandchild]
    assert os.getpid() not in group.members()
    os.kill(leader.pid, signal.SIGKILL)
    # not reaped yet: the leader is a zombie and no longer counts
    assert wait_for(lambda: group.members() == [grandchild], 5)


def test_a_reused_group_id_is_never_signalled(tree):
    # A dead server's record names group id X; X is now an unrelated process's group (a Jupyter
    # kernel leads its own): the leader's start time differs and nobody carries the marker.
    leader, grandchild = tree(marker=None)
    group = ProcessGroup(leader.pid, proc_info(leader.pid).start_time - 1, "dead-servers-marker", uid=os.getuid())
    assert not group.leader_alive()
    assert group.members() == []
    assert sorted(group.strangers()) == sorted([leader.pid, grandchild])
    assert group.stop(grace=0.2) == [] and group.kill() == []
    assert alive(leader.pid) and alive(grandchild)


def test_once_the_leader_is_gone_members_are_proven_by_marker_or_by_record(tmp_path):
    # The guard died; its group lives on. One process carries the marker, one is listed in the
    # record (vLLM's engine overwrites its environment with its process title), one is neither.
    names = ("marked", "listed", "neither")
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        tmp = {str(tmp_path)!r}
        for name in {names!r}:
            env = {{k: v for k, v in os.environ.items() if k != {MARKER_VARIABLE!r}}}
            if name == "marked":
                env[{MARKER_VARIABLE!r}] = "m"
            ready = os.path.join(tmp, name + ".pid")
            sleeper = ("import os, time; open(%r, 'w').write(str(os.getpid())); os.replace(%r, %r); "
                       "time.sleep(600)" % (ready + ".tmp", ready + ".tmp", ready))
            subprocess.Popen([sys.executable, "-c", sleeper], env=env)
        while not all(os.path.exists(os.path.join(tmp, n + ".pid")) for n in {names!r}):
            time.sleep(0.02)
    """)
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        started = proc_info(leader.pid).start_time
        assert leader.wait(timeout=15) == 0
        pids = {name: read_pid(tmp_path / f"{name}.pid") for name in names}
        listed = (pids["listed"], proc_info(pids["listed"]).start_time)
        group = ProcessGroup(leader.pid, started, "m", frozenset({listed}), os.getuid())
        assert sorted(group.members()) == sorted([pids["marked"], pids["listed"]])
        assert group.strangers() == [pids["neither"]]
        group.kill()
        assert not alive(pids["marked"]) and not alive(pids["listed"]) and alive(pids["neither"])
    finally:
        kill_group(leader.pid)


def test_a_signalled_process_is_waited_for_until_it_ends_even_once_its_marker_is_gone(tmp_path):
    # A process being killed loses its environment, so the marker that made it a member, a
    # moment before it ends: on a loaded 2-core machine kill() returned while one still ran.
    # Here a member replaces itself (same pid, same start time) with a copy whose environment
    # lacks the marker, and keeps running: waiting must go on until that process ends.
    script = tmp_path / "shed.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        if os.environ.get({MARKER_VARIABLE!r}) == "m":
            {announce(tmp_path / "marked.pid")}
            while not os.path.exists({str(tmp_path / "go")!r}):
                time.sleep(0.02)
            env = {{k: v for k, v in os.environ.items() if k != {MARKER_VARIABLE!r}}}
            os.execve(sys.executable, [sys.executable, {str(script)!r}], env)
        {announce(tmp_path / "shed.pid")}
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True,
                            env={**os.environ, MARKER_VARIABLE: "m"})
    try:
        read_pid(tmp_path / "marked.pid")
        info = proc_info(proc.pid)
        # a record whose guard is gone (another start time): only the marker proves membership
        group = ProcessGroup(proc.pid, info.start_time - 1, "m", uid=os.getuid())
        assert group.members() == [proc.pid]
        (tmp_path / "go").touch()
        read_pid(tmp_path / "shed.pid")
        assert group.members() == [] and alive(proc.pid)
        assert group.wait_empty(0.5) is True                       # by membership alone: "empty"
        assert group.wait_empty(0.5, signalled=[info]) is False    # the signalled process still runs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert group.wait_empty(5, signalled=[info]) is True
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=10)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process as another user")
def test_another_users_process_in_the_group_is_not_a_member(tmp_path):
    # Even carrying the marker: only the user who wrote the record owns the server.
    other_pid = tmp_path / "other.pid"
    leader_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        other = subprocess.Popen(['sleep', '600'], user='nobody')
        {announce(other_pid).replace("os.getpid()", "other.pid")}
        time.sleep(600)
    """)
    leader = subprocess.Popen([sys.executable, "-c", leader_code], start_new_session=True,
                              env={**os.environ, MARKER_VARIABLE: "shared"})
    other = None
    try:
        other = read_pid(other_pid)
        assert proc_info(other).pgid == leader.pid and guard.owner_uid(other) != os.getuid()
        group = ProcessGroup(leader.pid, proc_info(leader.pid).start_time, "shared", uid=os.getuid())
        assert group.members() == [leader.pid]
        assert group.strangers() == [other]
        group.kill()
        assert alive(other)
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_stop_terminates_a_whole_tree(tree):
    leader, grandchild = tree()
    group = ProcessGroup(leader.pid, proc_info(leader.pid).start_time, "tree", uid=os.getuid())
    assert group.stop(grace=5) == []  # SIGTERM was enough
    assert group.members() == []
    assert not alive(grandchild)
    assert leader.wait(timeout=5) == -signal.SIGTERM


def test_stop_sigkills_what_ignores_sigterm(tree):
    leader, grandchild = tree(ignore_term=True)
    messages = []
    start = time.monotonic()
    killed = ProcessGroup(leader.pid).stop(grace=0.5, log=messages.append)
    assert killed == [grandchild]
    assert time.monotonic() - start >= 0.45
    assert not alive(grandchild)
    assert messages and str(grandchild) in messages[0] and "SIGKILL" in messages[0]


def test_stop_leaves_the_excluded_pid_alone(tree):
    leader, grandchild = tree()
    ProcessGroup(leader.pid).stop(grace=5, exclude=leader.pid)
    assert not alive(grandchild)
    assert alive(leader.pid) and leader.poll() is None


def test_stop_ends_first_before_the_rest(tmp_path):
    """``first`` (vLLM's API server) gets SIGTERM, and time to shut down, before the others."""
    leader_t, gc_t, gc_ready = tmp_path / "leader.t", tmp_path / "gc.t", tmp_path / "gc.pid"
    gc_code = textwrap.dedent(f"""
        import os, signal, time
        def on_term(*_):
            open({str(gc_t)!r}, 'w').write(repr(time.time()))
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        {announce(gc_ready)}
        time.sleep(600)
    """)
    leader_code = textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        def on_term(*_):
            open({str(leader_t)!r}, 'w').write(repr(time.time()))
            time.sleep(0.5)  # a slow, orderly shutdown
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        subprocess.Popen([sys.executable, '-c', {gc_code!r}])
        time.sleep(600)
    """)
    leader = subprocess.Popen([sys.executable, "-c", leader_code], start_new_session=True,
                              stdin=subprocess.DEVNULL)
    try:
        read_pid(gc_ready)
        ProcessGroup(leader.pid).stop(grace=5, first=leader.pid, poll=leader.poll)
        assert ProcessGroup(leader.pid).members() == []
        leader_at, gc_at = float(leader_t.read_text()), float(gc_t.read_text())
        assert gc_at - leader_at >= 0.4, "the rest of the group was signalled before `first` ended"
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_stop_of_an_empty_group_returns_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(timeout=10)
    start = time.monotonic()
    assert ProcessGroup(proc.pid).stop(grace=5) == []
    assert time.monotonic() - start < 1
