"""Tests for helpers/process_guard.py with real processes: no vLLM process may outlive its owner.

Every test builds a real process tree (guard -> child -> grandchild) in its own process group
and checks, through /proc, that the whole group is gone afterwards. Each group is killed with
SIGKILL afterwards (by the ``guards`` fixture's teardown, or in a ``finally`` block), so a
failure leaves nothing running.
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

from helpers import process_guard
from helpers.process_guard import end_group, group_members
from support import alive, kill_group, wait_for

GUARD = str(Path(process_guard.__file__).resolve())
GRACE = 2


# --- helpers ----------------------------------------------------------------------------------

def read_pid(path: Path, timeout: float = 15) -> int:
    assert wait_for(path.exists, timeout), f"{path} never appeared"
    return int(path.read_text())


def kill_pid(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def grandchild_code(ready: Path, ignore_term: bool = False) -> str:
    """A process that (maybe) ignores SIGTERM, says it is ready, and sleeps."""
    return textwrap.dedent(f"""
        import os, signal, time
        if {ignore_term!r}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready) + '.tmp'!r}, 'w').write(str(os.getpid()))
        os.replace({str(ready) + '.tmp'!r}, {str(ready)!r})
        time.sleep(600)
    """)


def child_code(tmp: Path, ignore_term: bool = False, exit_code: int | None = None) -> str:
    """The stand-in for vLLM's API server: it starts a grandchild (the EngineCore), waits until
    that one is ready, writes its own pid, then sleeps (or exits with ``exit_code``)."""
    gc_ready = tmp / "grandchild.pid"
    me = tmp / "child.pid"
    end = "time.sleep(600)" if exit_code is None else f"sys.exit({exit_code})"
    return textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', {grandchild_code(gc_ready, ignore_term)!r}])
        while not os.path.exists({str(gc_ready)!r}):
            time.sleep(0.02)
        open({str(me) + '.tmp'!r}, 'w').write(str(os.getpid()))
        os.replace({str(me) + '.tmp'!r}, {str(me)!r})
        {end}
    """)


def start_guard(tmp: Path, child: str, owner_fd: int | None):
    """Start the guard the way the server manager does."""
    argv = [sys.executable, GUARD, "--grace", str(GRACE)]
    if owner_fd is not None:
        argv += ["--owner-fd", str(owner_fd)]
    argv += ["--", sys.executable, "-c", child]
    err = open(tmp / "guard.err", "wb")
    try:
        return subprocess.Popen(argv, pass_fds=(owner_fd,) if owner_fd is not None else (),
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    finally:
        err.close()


def guard_log(tmp: Path) -> str:
    return (tmp / "guard.err").read_text(errors="replace")


def tree_ready(tmp: Path, guard_pid: int) -> tuple[int, int]:
    child = read_pid(tmp / "child.pid")
    grandchild = read_pid(tmp / "grandchild.pid")
    members = set(group_members(guard_pid))
    assert {guard_pid, child, grandchild} <= members, members
    return child, grandchild


def group_gone(pgid: int, timeout: float = 10) -> bool:
    return wait_for(lambda: not group_members(pgid), timeout)


@pytest.fixture
def guards():
    """The guards a test starts; at teardown each one's whole group is SIGKILLed and reaped."""
    started: list[subprocess.Popen] = []
    yield started
    for guard in started:
        kill_group(guard.pid)
        guard.wait(timeout=10)


@pytest.fixture
def owned_guard(tmp_path, guards):
    """``guard, close_owner = owned_guard(child)`` starts a guard the way the server manager
    does: the guard holds the only read end of a pipe whose write end stands for its owner, and
    ``close_owner()`` closes that end, as the owner's death would. The ends still open are
    closed at teardown, before ``guards`` kills the group."""
    open_fds: set[int] = set()

    def close(fd: int) -> None:
        if fd in open_fds:
            open_fds.discard(fd)
            os.close(fd)

    def start(child: str):
        r, w = os.pipe()
        open_fds.update((r, w))
        guards.append(start_guard(tmp_path, child, owner_fd=r))
        close(r)
        return guards[-1], lambda: close(w)

    yield start
    for fd in list(open_fds):
        close(fd)


@pytest.fixture
def detached_guard(tmp_path, guards):
    """``guard = detached_guard(child)`` starts a guard without an owner pipe."""
    def start(child: str) -> subprocess.Popen:
        guards.append(start_guard(tmp_path, child, owner_fd=None))
        return guards[-1]

    return start


# --- the guard as a program -------------------------------------------------------------------

def test_owner_closing_its_pipe_ends_the_group(tmp_path, owned_guard):
    guard, close_owner = owned_guard(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, guard.pid)
    assert guard.poll() is None  # the owner still holds the pipe: nothing ends

    close_owner()
    assert group_gone(guard.pid), group_members(guard.pid)
    assert not alive(child) and not alive(grandchild)
    assert guard.wait(timeout=10) == 128 + signal.SIGTERM  # the child ended by SIGTERM
    assert "owner process exited" in guard_log(tmp_path)


def test_sigterm_to_the_guard_ends_the_group(tmp_path, owned_guard):
    guard, _close_owner = owned_guard(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, guard.pid)

    os.kill(guard.pid, signal.SIGTERM)
    assert group_gone(guard.pid), group_members(guard.pid)
    assert not alive(child) and not alive(grandchild)
    assert guard.wait(timeout=10) == 128 + signal.SIGTERM
    assert "received SIGTERM" in guard_log(tmp_path)


def test_detached_guard_ends_the_group_on_sigterm(tmp_path, detached_guard):
    guard = detached_guard(child_code(tmp_path))
    child, grandchild = tree_ready(tmp_path, guard.pid)
    os.kill(guard.pid, signal.SIGTERM)
    assert group_gone(guard.pid), group_members(guard.pid)
    assert guard.wait(timeout=10) == 128 + signal.SIGTERM
    assert "(detached)" in guard_log(tmp_path)


def test_grandchild_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path, owned_guard):
    guard, close_owner = owned_guard(child_code(tmp_path, ignore_term=True))
    child, grandchild = tree_ready(tmp_path, guard.pid)

    start = time.monotonic()
    close_owner()
    assert group_gone(guard.pid, timeout=GRACE + 10), group_members(guard.pid)
    took = time.monotonic() - start
    assert took >= GRACE - 0.5, f"group ended after {took:.1f} s, before the grace period"
    assert not alive(grandchild)
    guard.wait(timeout=10)
    log = guard_log(tmp_path)
    assert f"still running after {GRACE} s: [{grandchild}]; sending SIGKILL" in log
    assert "(1 needed SIGKILL)" in log


def test_owner_killed_with_sigkill_ends_the_group(tmp_path):
    """The real case: the kernel that started the guard dies hard."""
    guard_pid_file = tmp_path / "guard.pid"
    owner_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        r, w = os.pipe()
        err = open({str(tmp_path / 'guard.err')!r}, 'wb')
        guard = subprocess.Popen(
            [sys.executable, {GUARD!r}, '--grace', '{GRACE}', '--owner-fd', str(r), '--',
             sys.executable, '-c', {child_code(tmp_path)!r}],
            pass_fds=(r,), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err)
        os.close(r)
        open({str(guard_pid_file) + '.tmp'!r}, 'w').write(str(guard.pid))
        os.replace({str(guard_pid_file) + '.tmp'!r}, {str(guard_pid_file)!r})
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdin=subprocess.DEVNULL)
    guard_pid = None
    try:
        guard_pid = read_pid(guard_pid_file)
        child, grandchild = tree_ready(tmp_path, guard_pid)
        assert owner.poll() is None

        owner.kill()  # SIGKILL: no handler, no atexit, no cleanup code runs in the owner
        owner.wait(timeout=10)
        assert group_gone(guard_pid), group_members(guard_pid)
        assert not alive(guard_pid) and not alive(child) and not alive(grandchild)
        assert wait_for(lambda: "process group ended" in guard_log(tmp_path), 5)
        assert "owner process exited" in guard_log(tmp_path)
    finally:
        kill_pid(owner.pid)
        owner.wait(timeout=10)
        kill_group(guard_pid)


def test_child_exiting_by_itself_sweeps_the_group_and_keeps_its_code(tmp_path, owned_guard):
    guard, _close_owner = owned_guard(child_code(tmp_path, exit_code=3))
    grandchild = read_pid(tmp_path / "grandchild.pid")
    assert guard.wait(timeout=GRACE + 10) == 3
    assert group_gone(guard.pid, timeout=5), group_members(guard.pid)
    assert not alive(grandchild)
    assert "server exited with code 3" in guard_log(tmp_path)


def test_guard_without_a_command_refuses(tmp_path):
    result = subprocess.run([sys.executable, GUARD, "--grace", "1", "--"], capture_output=True,
                            text=True, timeout=30, start_new_session=True)
    assert result.returncode == 2
    assert "no command given" in result.stderr


# --- end_group and group_members, called directly ---------------------------------------------

def start_tree(tmp: Path, ignore_term: bool = False) -> tuple[subprocess.Popen, int]:
    """A leader in a new session (like the guard) with one grandchild, both ready."""
    gc_ready = tmp / "grandchild.pid"
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', {grandchild_code(gc_ready, ignore_term)!r}])
        time.sleep(600)
    """)
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                              stdin=subprocess.DEVNULL)
    try:
        grandchild = read_pid(gc_ready)
    except BaseException:
        kill_group(leader.pid)
        leader.wait(timeout=10)
        raise
    return leader, grandchild


def test_group_members_lists_the_group_and_leaves_out_zombies(tmp_path):
    leader, grandchild = start_tree(tmp_path)
    try:
        assert sorted(group_members(leader.pid)) == sorted([leader.pid, grandchild])
        assert group_members(leader.pid, exclude=leader.pid) == [grandchild]
        assert os.getpid() not in group_members(leader.pid)
        os.kill(leader.pid, signal.SIGKILL)
        # not reaped yet: the leader is a zombie and no longer counts
        assert wait_for(lambda: group_members(leader.pid) == [grandchild], 5)
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_end_group_terminates_a_whole_tree(tmp_path):
    leader, grandchild = start_tree(tmp_path)
    try:
        killed = end_group(leader.pid, grace=5)
        assert killed == []  # SIGTERM was enough
        assert group_members(leader.pid) == []
        assert not alive(grandchild)
        assert leader.wait(timeout=5) == -signal.SIGTERM
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_end_group_sigkills_what_ignores_sigterm(tmp_path):
    leader, grandchild = start_tree(tmp_path, ignore_term=True)
    messages = []
    try:
        start = time.monotonic()
        killed = end_group(leader.pid, grace=0.5, log=messages.append)
        took = time.monotonic() - start
        assert killed == [grandchild]
        assert took >= 0.45
        assert group_members(leader.pid) == []
        assert not alive(grandchild)
        assert messages and str(grandchild) in messages[0] and "SIGKILL" in messages[0]
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_end_group_leaves_the_excluded_pid_alone(tmp_path):
    leader, grandchild = start_tree(tmp_path)
    try:
        end_group(leader.pid, grace=5, exclude=leader.pid)
        assert not alive(grandchild)
        assert alive(leader.pid)
        assert leader.poll() is None
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_end_group_stops_first_before_the_rest(tmp_path):
    """``first`` (vLLM's API server) gets SIGTERM, and time to shut down, before the others."""
    leader_t, gc_t, gc_ready = tmp_path / "leader.t", tmp_path / "gc.t", tmp_path / "gc.pid"
    gc_code = textwrap.dedent(f"""
        import os, signal, time
        def on_term(*_):
            open({str(gc_t)!r}, 'w').write(repr(time.time()))
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open({str(gc_ready) + '.tmp'!r}, 'w').write(str(os.getpid()))
        os.replace({str(gc_ready) + '.tmp'!r}, {str(gc_ready)!r})
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
        end_group(leader.pid, grace=5, first=leader.pid)
        assert group_members(leader.pid) == []
        leader_at, gc_at = float(leader_t.read_text()), float(gc_t.read_text())
        assert gc_at - leader_at >= 0.4, "the rest of the group was signalled before `first` ended"
    finally:
        kill_group(leader.pid)
        leader.wait(timeout=10)


def test_end_group_of_an_empty_group_returns_at_once():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(timeout=10)
    start = time.monotonic()
    assert end_group(proc.pid, grace=5) == []
    assert time.monotonic() - start < 1
