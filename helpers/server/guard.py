"""A vLLM server's processes as one group: started, recognised, and ended here, and only here.

vLLM's API server starts ``VLLM::EngineCore`` and ``VLLM::Worker`` processes. When the API
server is killed hard (SIGKILL, or the Jupyter kernel that started it dies), those children
survive, keep their memory (and on a GPU the whole card), and are re-parented to init
(vllm-project/vllm#55510; seen here with vLLM 0.32.0 on the CPU too). So the server manager
does not start vLLM directly. It starts this file as a small guard, the leader of a new
session and process group, and the guard starts vLLM inside that group. The guard ends the
whole group when any of these happens:

* the owner goes away: the owner keeps the write end of a pipe whose read end the guard
  blocks on; the kernel closes it when the owner dies, however it dies (SIGKILL included),
  so the guard reads end-of-file at once. Nobody waits for a tidy log then: every process
  gets SIGTERM at once and SIGKILL ``FAST_GRACE`` seconds later;
* the guard receives SIGTERM, SIGINT or SIGHUP (``VLLMServer.stop()`` sends SIGTERM): vLLM's
  API server gets SIGTERM first and ``GRACE`` seconds to shut its engine down in order, then
  the rest of the group SIGTERM, then SIGKILL. (An API server still starting its engine
  ignores SIGTERM, so the whole stop takes at most about ``2 * GRACE`` seconds either way);
* vLLM exits by itself (a failed start): the leftovers of the group are swept.

Without ``--owner-fd`` the guard runs detached until it is told to stop (a server started on
purpose for a class, or for the test session).

**Which processes are the server's.** A process group id is only a number, and numbers are
reused: a record of a server that died with its guard may name a group id that now belongs to
somebody's Jupyter kernel (a kernel leads its own group). While the guard runs (its pid *and*
its start time match the record), no other process can have its group id, so every process of
the group is the server's. Once the guard is gone, ``ProcessGroup`` counts as a member only a
process proven to be the server's: one that carries the server's marker in its environment
(``TUTORIAL_SERVER_ID=<random id>``, inherited from the guard; vLLM's engine and worker
processes overwrite their environment when they set their process title, so it is not always
readable), or one whose pid and start time the record lists (taken when the server became
ready). It must also belong to the user who wrote the record. Nothing else is ever signalled,
and a process whose environment cannot be read (another user's) is never taken for ours.

**Reading /proc.** A process's command line, environment and owner are read with psutil (a
pinned dependency wherever a server runs). Its start time and process group are read from
``/proc/<pid>/stat`` here, in ``proc_info``, because psutil offers neither as identity needs
them: it has no process-group id, and its ``create_time()`` is seconds since the epoch, built on
the boot time, and "may be affected by changes such as manual adjustments or time
synchronization" (its docstring, psutil 7.2.2), so a clock step would make a process look like
another. The clock ticks after boot that the records keep never change.

The server manager runs this file by its path (``python guard.py [--owner-fd N] -- COMMAND
...``), without importing the helpers; the guard's own work needs the standard library only
(psutil is imported only where a command line, an owner or a marker is read).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

MARKER_VARIABLE = "TUTORIAL_SERVER_ID"
GRACE = 2.0          # seconds the API server gets to end its engine; then the same for the rest
FAST_GRACE = 3.0     # seconds between SIGTERM and SIGKILL when the owner is gone
KILL_WAIT = 20.0     # seconds to wait for SIGKILLed processes to disappear (5 s was too short on a loaded 2-core machine)


# --------------------------------------------------------------------------- /proc, read once
@dataclass(frozen=True)
class ProcInfo:
    pid: int
    state: str          # R, S, D, Z ...
    pgid: int
    start_time: int     # clock ticks after boot: with the pid, names one process for good

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def proc_info(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` (the one place it is parsed), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the fields after the command name, which is in parentheses and may hold anything
    fields = stat[stat.rfind(b")") + 2:].split()
    return ProcInfo(pid, fields[0].decode(), int(fields[2]), int(fields[19]))


def all_processes() -> Iterator[ProcInfo]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_info(int(entry))
            if info is not None:
                yield info


def _psutil():
    import psutil   # where a record is checked; the guard's own sweep of its group never needs it

    return psutil


def command_of(pid: int) -> list[str]:
    """The command line of ``pid`` as a list (empty when it cannot be read)."""
    psutil = _psutil()
    try:
        # without the empty words a process that set its title pads its command line with
        return [part for part in psutil.Process(pid).cmdline() if part]
    except (psutil.Error, OSError, ValueError):     # gone, a zombie, not ours to read
        return []


def parent_of(pid: int) -> int | None:
    """The parent of ``pid`` (None when it is gone)."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).ppid()
    except (psutil.Error, OSError, ValueError):
        return None


def owner_uid(pid: int) -> int | None:
    """The effective user of ``pid`` (None when it is gone)."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).uids().effective
    except (psutil.Error, OSError, ValueError):
        return None


def carries_marker(pid: int, marker: str) -> bool | None:
    """Whether ``pid``'s environment holds ``TUTORIAL_SERVER_ID=marker``; None when it cannot be
    read (another user's process, or gone)."""
    psutil = _psutil()
    try:
        return psutil.Process(pid).environ().get(MARKER_VARIABLE) == marker
    except (psutil.Error, OSError, ValueError):
        return None


def runs(pid: int, started: int | None = None) -> bool:
    """Process ``pid`` runs (a zombie has ended) and, given ``started``, is the one that started
    then: not another process that got its pid later."""
    info = proc_info(pid)
    return info is not None and info.running and (started is None or info.start_time == started)


def send(pids: list[int], sig: int) -> None:
    """Signal each pid; one that is already gone (or not ours to signal) is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# --------------------------------------------------------------------------- the group
@dataclass(frozen=True)
class ProcessGroup:
    """The processes of one server: group ``pgid``.

    With no identity given (``leader_started`` None) every process of the group counts: the
    guard uses that for its own group, the tests for their own process trees. With one, the
    group is a server's as recorded: while its leader (the guard) runs with that start time,
    every process of the group counts; after that only those proven by ``marker`` or listed in
    ``known`` (pid, start time), and all of them must belong to user ``uid``.
    """

    pgid: int
    leader_started: int | None = None
    marker: str | None = None
    known: frozenset[tuple[int, int]] = frozenset()
    uid: int | None = None

    def _in_group(self, exclude: int | None = None) -> list[ProcInfo]:
        return [p for p in all_processes() if p.pgid == self.pgid and p.running and p.pid != exclude]

    def leader_alive(self) -> bool:
        """The recorded leader (the guard) still runs: the same pid, started at the same time."""
        return runs(self.pgid, self.leader_started)

    def _proven(self, info: ProcInfo, leader_alive: bool) -> bool:
        if self.leader_started is None:
            return True
        if self.uid is not None and owner_uid(info.pid) != self.uid:
            return False
        if leader_alive:
            return True
        return ((info.pid, info.start_time) in self.known
                or (self.marker is not None and carries_marker(info.pid, self.marker) is True))

    def _member_info(self, exclude: int | None = None) -> list[ProcInfo]:
        leader_alive = self.leader_alive()
        return [p for p in self._in_group(exclude) if self._proven(p, leader_alive)]

    def members(self, exclude: int | None = None) -> list[int]:
        """Live processes of the group that are this server's (zombies left out)."""
        return [p.pid for p in self._member_info(exclude)]

    def strangers(self) -> list[int]:
        """Live processes that have this group id but are not proven to be the server's: they
        are never signalled (the id has been reused, or they are another user's)."""
        leader_alive = self.leader_alive()
        return [p.pid for p in self._in_group() if not self._proven(p, leader_alive)]

    def snapshot(self) -> frozenset[tuple[int, int]]:
        """(pid, start time) of every member now: what a record keeps as ``known``."""
        return frozenset((p.pid, p.start_time) for p in self._member_info())

    @property
    def alive(self) -> bool:
        return bool(self.members())

    def wait_empty(self, timeout: float, exclude: int | None = None, poll: Callable[[], object] | None = None,
                   interval: float = 0.05, signalled: Iterable[ProcInfo] = ()) -> bool:
        """Wait until no member is left and each process in ``signalled`` has ended; ``poll`` is
        called each round (to reap a child). A process being killed loses its environment, and
        with it the marker that proved it a member, a moment before it ends (seen on a loaded
        2-core machine): the processes just signalled are waited for by pid and start time."""
        deadline = time.monotonic() + timeout
        pending = list(signalled)
        while True:
            if poll is not None:
                poll()
            pending = [p for p in pending if runs(p.pid, p.start_time)]
            if not pending and not self.members(exclude):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def stop(self, grace: float = GRACE, *, first: int | None = None, exclude: int | None = None,
             poll: Callable[[], object] | None = None, log: Callable[[str], None] | None = None) -> list[int]:
        """End the group: SIGTERM ``first`` (vLLM's API server) and give it ``grace`` seconds,
        then SIGTERM the rest and give them ``grace`` seconds, then SIGKILL what is left.
        Returns the pids that needed SIGKILL. Only members are ever signalled."""
        if first is not None and first in self.members(exclude):
            send([first], signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and first in self.members(exclude):
                if poll is not None:
                    poll()
                time.sleep(0.05)
        terminated = self._member_info(exclude)
        send([p.pid for p in terminated], signal.SIGTERM)
        self.wait_empty(grace, exclude, poll, signalled=terminated)
        stubborn = self._member_info(exclude)
        if stubborn:
            if log:
                log(f"still running after SIGTERM: {[p.pid for p in stubborn]}; sending SIGKILL")
            send([p.pid for p in stubborn], signal.SIGKILL)
            self.wait_empty(KILL_WAIT, exclude, poll, signalled=stubborn)
        return [p.pid for p in stubborn]

    def kill(self, exclude: int | None = None) -> list[int]:
        """SIGKILL every member at once (an orphaned server: nobody is there to shut down in
        order). Returns the pids signalled."""
        killed = self._member_info(exclude)
        send([p.pid for p in killed], signal.SIGKILL)
        self.wait_empty(KILL_WAIT, exclude, signalled=killed)
        return [p.pid for p in killed]


def spawn(command: list[str], *, marker: str, env: dict[str, str], log_file, owner: bool = True,
          grace: float = GRACE) -> tuple[subprocess.Popen, int | None]:
    """Start ``command`` under a new guard, in a new session, with ``marker`` in its environment.

    Returns the guard's ``Popen`` and, when ``owner`` is true, the write end of the owner pipe:
    keep it open while the server should live; when this process dies the kernel closes it
    and the guard ends the group. Both the guard's and vLLM's output go to ``log_file``.
    """
    argv = [sys.executable, os.path.abspath(__file__), "--grace", str(grace)]
    pass_fds: tuple[int, ...] = ()
    write_end = None
    if owner:
        read_end, write_end = os.pipe()
        argv += ["--owner-fd", str(read_end)]
        pass_fds = (read_end,)
    try:
        guard = subprocess.Popen([*argv, "--", *command], stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, env={**env, MARKER_VARIABLE: marker},
                                 pass_fds=pass_fds, start_new_session=True)
    except BaseException:
        if write_end is not None:
            os.close(write_end)
        raise
    finally:
        for fd in pass_fds:
            os.close(fd)
    return guard, write_end


# --------------------------------------------------------------------------- the guard itself
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guard.py")
    parser.add_argument("--owner-fd", type=int, default=None)
    parser.add_argument("--grace", type=float, default=GRACE)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if os.getpgid(0) != os.getpid():
        os.setsid()  # normally done by the launcher (start_new_session=True)
    me = os.getpid()

    def log(message: str) -> None:
        print(f"[guard {me}] {message}", file=sys.stderr, flush=True)

    reason: list[str] = []
    wake = threading.Event()

    def on_signal(signum, _frame):
        reason.append(f"received {signal.Signals(signum).name}")
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    log(f"started pid {child.pid} in process group {me}"
        + (" (ends with its owner)" if args.owner_fd is not None else " (detached)"))

    if args.owner_fd is not None:
        def watch_owner():
            try:
                while os.read(args.owner_fd, 4096):
                    pass
            except OSError:
                pass
            reason.append("owner process exited")
            wake.set()
        threading.Thread(target=watch_owner, daemon=True).start()

    def watch_child():
        child.wait()
        reason.append(f"server exited with code {child.returncode}")
        wake.set()
    threading.Thread(target=watch_child, daemon=True).start()

    while not wake.wait(1.0):
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a signal to the group from here must not stop the sweep
    log(f"{reason[0]}; ending process group {me}")
    group = ProcessGroup(me)
    if reason[0] == "owner process exited":
        send(group.members(exclude=me), signal.SIGTERM)
        group.wait_empty(FAST_GRACE, exclude=me, poll=child.poll)
        killed = group.members(exclude=me)
        send(killed, signal.SIGKILL)
        group.wait_empty(KILL_WAIT, exclude=me, poll=child.poll)
    else:
        first = child.pid if child.poll() is None else None
        killed = group.stop(args.grace, first=first, exclude=me, poll=child.poll, log=log)
    child.wait()
    log("process group ended" + (f" ({len(killed)} needed SIGKILL)" if killed else ""))
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
