"""Process and waiting utilities shared by the tests that start real processes.

tests/ is not a package: pytest's default import mode ("prepend") puts this folder on sys.path
when it imports a test file from it, so the test files import this module as ``support``.
"""

from __future__ import annotations

import os
import signal
import time


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy or
    ``timeout`` seconds have passed, and return its last value (falsy when time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def proc_state(pid: int) -> bytes | None:
    """The state letter of ``pid`` in /proc/<pid>/stat (b"R", b"S", b"Z", ...); None when there
    is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running (not a zombie): what ``helpers.process_guard.group_members`` counts."""
    return proc_state(pid) not in (None, b"Z", b"X")


def kill_group(pgid: int | None) -> None:
    """SIGKILL the whole process group ``pgid``, if there is one (None: nothing to do)."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
