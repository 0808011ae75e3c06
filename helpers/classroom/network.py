"""A network of its own for a class's back end: out of reach of other users of this machine.

A router and vLLM replicas on 127.0.0.1 are out of other machines' reach, but every user logged
in to this one can connect to them: vllm-router checks no client key (``/add_worker`` included),
and vLLM's ``--api-key`` guards ``/v1`` only. A Linux network namespace has a loopback of its
own. Made by an ordinary user inside a user namespace of their own (``unshare --user
--map-root-user --net``), it can be entered by that user only (``nsenter``, which needs the
namespace's ``/proc/PID/ns`` files: other users get "Permission denied"; root can, as root can
do anything here). Typed in a terminal::

    unshare --user --map-root-user --net sleep infinity &  NS=$!     # holds the namespace open
    inside() { nsenter --target $NS --user --net --preserve-credentials "$@"; }
    inside ip link set lo up                                            # its loopback starts down
    inside vllm serve MODEL --host 127.0.0.1 --port 8001 &
    inside vllm-router --worker-urls http://127.0.0.1:8001 --port 8000 &
    curl http://127.0.0.1:8000/health         # refused: this machine's loopback is another one
    inside curl http://127.0.0.1:8000/health  # answered

``PrivateNetwork.start()`` does those first three lines and waits until the namespace exists and
its loopback is up (a ``nsenter`` sent too early fails, or, as root, runs in this machine's
network without a word). ``network.command(argv)``
is ``argv`` run inside. The class gateway is the one piece with a foot on each side: it binds its
port on the machine's network first, then enters the namespace (``enter``), so the router it
connects to is the one inside (``start_gateway(url, network=...)``).

Linux only; some machines do not let an ordinary user make a user namespace (a sysctl, or a
container's seccomp profile): ``start()`` then names the settings to check.

This file also runs by its path, inside a new namespace: as the process that holds it
(``--hold``), or to bring its loopback up and become a command (``--run -- CMD``; ``isolated``,
for the class server's vLLM). Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

READY = "private network ready"
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NOT_ALLOWED_HINT = ("this machine does not let an ordinary user make a user namespace. Check "
                    "`sysctl user.max_user_namespaces` (more than 0), `kernel.unprivileged_userns_clone` (1, on "
                    "older Debian kernels), Ubuntu's AppArmor rule since 23.10 "
                    "(`kernel.apparmor_restrict_unprivileged_userns`; narrower than turning it off: an AppArmor "
                    "profile with `userns,` for the programs that need it), or a container's seccomp profile; "
                    "or serve the class from a machine nobody else logs in to")
REFUSALS = ("Operation not permitted", "Permission denied", "Invalid argument", "No space left on device")
ISOLATE = ["unshare", "--user", "--map-root-user", "--net", "--", sys.executable, os.path.abspath(__file__)]


def _explained(why: str) -> str:
    """What ``unshare`` said, with the settings to check when it is the kernel refusing."""
    return f"{why}: {NOT_ALLOWED_HINT}" if any(refusal in why for refusal in REFUSALS) else why


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, names one process. (As
    ``guard.proc_info`` reads it; repeated here so that this file needs nothing of the package
    when it runs by its path, as the tests run it for another user.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _namespace(pid: int | str, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


try:
    from ..errors import TutorialError as _Base
except ImportError:                                      # run by its path, as the holder
    _Base = RuntimeError


class PrivateNetworkError(_Base):
    """No private network: the reason, and what to check."""


class PrivateNetwork:
    """A network namespace with its loopback up, held open by a small process of this user."""

    def __init__(self, holder: subprocess.Popen, owner_fd: int | None):
        self.holder, self.pid, self._owner_fd = holder, holder.pid, owner_fd
        self.started = _start_time(holder.pid)

    @classmethod
    def start(cls, *, owner: bool = True, timeout: float = 60.0) -> "PrivateNetwork":
        """Make the namespace and wait until it holds. ``owner``: the holder ends when this
        process does (a pipe the kernel closes); processes inside run on until they are stopped."""
        if not sys.platform.startswith("linux"):
            raise PrivateNetworkError("a private network needs Linux (network namespaces)")
        missing = [tool for tool in ("unshare", "nsenter") if not shutil.which(tool)]
        if missing:
            raise PrivateNetworkError(f"a private network needs {' and '.join(missing)} (util-linux) on the PATH")
        argv = [*ISOLATE, "--hold"]
        pass_fds: tuple[int, ...] = ()
        write_end = None
        if owner:
            read_end, write_end = os.pipe()
            argv += ["--owner-fd", str(read_end)]
            pass_fds = (read_end,)
        try:
            holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True)
        except BaseException:
            if write_end is not None:
                os.close(write_end)
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)
        network = cls(holder, write_end)
        try:
            said = network._wait_ready(timeout)
        except BaseException:                               # an interrupt: leave nothing behind
            network.stop()
            raise
        if said is not True:
            network._end()                                  # then all it wrote to stderr is there
            why = holder.stderr.read().decode(errors="replace").strip()
            network.stop()
            raise PrivateNetworkError(f"could not make a private network: {_explained(why) if why else said}")
        return network

    def _wait_ready(self, timeout: float):
        """True once the holder says it is ready, else why not."""
        deadline = time.monotonic() + timeout
        said = b""
        while READY.encode() not in said:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.holder.stdout], [], [], left)[0]:
                return f"the namespace was not ready within {timeout:.0f} s"
            chunk = os.read(self.holder.stdout.fileno(), 256)
            if not chunk:
                return "its holder ended without saying it was ready"
            said += chunk
        return True

    @property
    def alive(self) -> bool:
        return self.holder.poll() is None

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace, by this user (the ``inside`` of the module's example)."""
        if not self.alive:
            raise PrivateNetworkError("the private network's holder has ended; start a new one")
        return ["nsenter", f"--target={self.pid}", "--user", "--net", "--preserve-credentials", "--", *argv]

    def _end(self) -> None:
        if self.holder.poll() is None:
            self.holder.terminate()
            try:
                self.holder.wait(5)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()

    def stop(self) -> None:
        """End the holder. Processes still inside keep the namespace (and run) until they end."""
        self._end()
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream:
                stream.close()
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def __enter__(self) -> "PrivateNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PrivateNetwork(holder pid {self.pid}, {'running' if self.alive else 'ended'})"


def enter(pid: int, started: int | None) -> None:
    """Move this process into the namespace that process ``pid`` (started at ``started``) holds.

    Sockets made before stay where they were made: the gateway binds its port on the machine's
    network first, then calls this, and what it connects to afterwards is inside. Only a
    single-threaded process can enter a user namespace; only the user who made it may."""
    import errno

    gone = PrivateNetworkError(f"the private network's holder (pid {pid}) is gone")
    if _start_time(pid) is None or (started is not None and _start_time(pid) != started):
        raise gone
    opened: list[tuple[int, int]] = []
    try:
        for kind, flag in (("user", CLONE_NEWUSER), ("net", CLONE_NEWNET)):     # the user namespace first
            if _namespace(pid, kind) != _namespace("self", kind):                 # else already there
                try:
                    opened.append((os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY), flag))
                except OSError as err:
                    raise PrivateNetworkError(f"cannot open the private network of pid {pid}: {err.strerror}") from None
        if started is not None and _start_time(pid) != started:     # the files opened are that process's
            raise gone
        libc = ctypes.CDLL(None, use_errno=True)
        for fd, flag in opened:
            if libc.setns(fd, flag) != 0:
                code = ctypes.get_errno()
                hint = (" (a process with threads cannot enter a user namespace)"
                        if flag == CLONE_NEWUSER and code == errno.EINVAL else "")
                raise PrivateNetworkError(f"cannot enter the private network of pid {pid}: {os.strerror(code)}{hint}")
    finally:
        for fd, _ in opened:
            os.close(fd)


def user_namespaces_refused() -> str:
    """Why this machine will not run a command in a namespace of its own; "" where it will. Tried
    once for each ``unshare`` found on the PATH."""
    return _refused(shutil.which("unshare") if sys.platform.startswith("linux") else None)


@functools.lru_cache(maxsize=None)
def _refused(unshare: str | None) -> str:
    if not unshare:
        return "no unshare (util-linux, Linux)"
    try:
        probe = subprocess.run([*ISOLATE, "--run", "--", "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if probe.returncode != 0:
        return _explained(probe.stderr.strip() or f"exit code {probe.returncode}")
    return ""


def isolated(argv: list[str]) -> tuple[list[str] | None, str]:
    """``argv`` to run alone in a new network namespace with only its loopback (the class server's
    vLLM, on a Unix socket: its engine's torch.distributed and gloo ports then listen in there,
    not on this machine's loopback), or ``None`` and the reason where this machine refuses."""
    why = user_namespaces_refused()
    return (None, why) if why else ([*ISOLATE, "--run", "--", *argv], "")


# --------------------------------------------------------------------------- the holder
def _loopback_up() -> None:
    import fcntl
    import socket

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _hold(owner_fd: int | None) -> int:
    _loopback_up()
    print(READY, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    if owner_fd is None:
        while True:
            signal.pause()
    while os.read(owner_fd, 1):                     # end-of-file: the owner is gone
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="network.py", description="in a new network namespace (unshare --net): "
                                     "bring its loopback up, then hold it open (--hold) or run a command (--run)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--hold", action="store_true")
    what.add_argument("--run", action="store_true")
    parser.add_argument("--owner-fd", type=int, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.hold:
        return _hold(args.owner_fd)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("--run needs a command")
    _loopback_up()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
