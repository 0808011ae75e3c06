"""A small watchdog that owns the vLLM process group, so that no vLLM process outlives its owner.

vLLM's API server starts ``VLLM::EngineCore`` and ``VLLM::Worker`` processes. When the API
server is killed hard (SIGKILL, or the Jupyter kernel that started it dies), those children
survive, keep their memory (and on a GPU the whole card), and are re-parented to init
(vllm-project/vllm#55510; seen here with vLLM 0.32.0 on the CPU too). So the server manager
does not start vLLM directly. It starts this guard, as the leader of a new session and process
group, and the guard starts vLLM inside that group. The guard ends the whole group, SIGTERM
first and SIGKILL after a grace period, when any of these happens:

* the owner goes away: the owner keeps the write end of a pipe whose read end the guard
  blocks on; the kernel closes it when the owner dies, however it dies (SIGKILL included),
  so the guard reads end-of-file at once, with no polling;
* the guard receives SIGTERM, SIGINT or SIGHUP (``VLLMServer.stop()`` sends SIGTERM);
* vLLM exits by itself (a failed start): the leftovers of the group are swept.

Without ``--owner-fd`` the guard runs detached until it is told to stop (a server started on
purpose for a class, or for the test session).

Usage: ``python -m helpers.process_guard [--owner-fd N] [--grace S] -- COMMAND ...``
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10.0


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    """Live processes whose process group is ``pgid`` (zombies left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == exclude:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the command name, which is in parentheses and may hold spaces
        fields = stat[stat.rfind(b")") + 2:].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in (b"Z", b"X"):
            members.append(pid)
    return members


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_group(pgid: int, grace: float, exclude: int | None = None, first: int | None = None,
              log=None) -> list[int]:
    """SIGTERM the group (``first`` before the rest), wait up to ``grace`` s, then SIGKILL.

    Returns the pids that had to be killed hard.
    """
    if first is not None:
        _signal_all([first], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and first in group_members(pgid, exclude):
            time.sleep(0.1)
    _signal_all(group_members(pgid, exclude), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and group_members(pgid, exclude):
        time.sleep(0.1)
    stubborn = group_members(pgid, exclude)
    if stubborn and log:
        log(f"still running after {grace:.0f} s: {stubborn}; sending SIGKILL")
    _signal_all(stubborn, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_members(pgid, exclude):
        time.sleep(0.05)
    return stubborn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.process_guard")
    parser.add_argument("--owner-fd", type=int, default=None)
    parser.add_argument("--grace", type=float, default=GRACE_SECONDS)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if os.getpgid(0) != os.getpid():
        os.setsid()  # normally done by the launcher (start_new_session=True)
    me = os.getpid()

    def log(message: str) -> None:
        print(f"[process_guard {me}] {message}", file=sys.stderr, flush=True)

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
        signal.signal(sig, signal.SIG_IGN)  # killpg from here or outside must not stop the sweep
    log(f"{reason[0]}; ending process group {me}")
    first = child.pid if child.poll() is None else None
    killed = end_group(me, args.grace, exclude=me, first=first, log=log)
    child.wait()
    log("process group ended" + (f" ({len(killed)} needed SIGKILL)" if killed else ""))
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
