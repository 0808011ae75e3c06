"""Running servers and gateways, recorded on disk, so that any kernel (or the test session)
finds them: one registry for both.

One JSON file per process under ``paths.state_dir()``: ``server-<port>.json`` for a vLLM server
(``ServerRecord``), ``gateway-<port>.json`` for a class gateway (``GatewayRecord``). Each is
written atomically and names its guard (the leader of its process group) by its pid *and* its
start time, the marker its processes carry in their environment (``guard.MARKER_VARIABLE``), the
port, the log and the owner: a kernel's pid, or ``None`` for one started detached on purpose. A
server's record also lists its processes' pids and start times once it is ready.

* ``live()`` lists the records whose guard still runs. It is a look: it ends nothing and removes
  nothing. ``prune()`` is the explicit clean-up: it forgets the others and ends what is left of
  their processes, only those proven to be theirs (``guard.ProcessGroup``: listed in the record
  or carrying the marker, of the user who wrote the record). A process that merely reuses a dead
  server's group id is never touched, nor is anything of another user.
* A record that cannot be read is moved aside (``*.json.unreadable``) and named; one that
  cannot be removed (another user's, in a shared folder) is named and left. Looking never
  crashes.
* ``claim()`` is a lock around "is a server for these settings running? if not, start one", so
  that two notebooks opened at the same moment start one server, not two.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..endpoint import http_url, server_url, shown_at
from ..paths import state_dir
from .guard import ProcessGroup, command_of, runs

GUARD_MARK = "guard.py"
LOCK_FILE = "start.lock"
SERVER, GATEWAY = "server", "gateway"       # the kinds of record, and their files' prefixes


@dataclass(frozen=True)
class ServerRecord:
    guard_pid: int              # also the process-group id of every server process
    guard_started: int          # the guard's start time (clock ticks after boot): pid reuse shows
    server_id: str              # the marker in every server process's environment
    host: str
    port: int
    model: str
    served_model_name: str
    log_path: str
    owner_pid: int | None       # None: detached (started on purpose outside any kernel)
    started_at: float
    command: str                # the equivalent shell command (an API key in it is hidden)
    members: tuple = ()         # (pid, start time) of its processes when it became ready
    uid: int = -1               # the user who wrote the record: read from the file's owner
    uds: str | None = None      # the Unix socket it listens on instead of host:port (a class server)

    @property
    def url(self) -> str:
        return server_url(self.host, self.port, self.uds)

    @property
    def where(self) -> str:
        return shown_at(self.url, self.uds)

    def group(self) -> ProcessGroup:
        """The server's processes: the guard's group while the guard runs, then only those
        proven to be the server's (see ``guard``)."""
        return ProcessGroup(self.guard_pid, self.guard_started, self.server_id,
                            frozenset(tuple(m) for m in self.members), self.uid if self.uid >= 0 else None)

    def describe(self) -> str:
        return f"{self.served_model_name} at {self.where} ({_about(self)})"


@dataclass(frozen=True)
class GatewayRecord:
    """A class gateway (``helpers.classroom.service``) in front of a server."""

    guard_pid: int
    guard_started: int
    host: str
    port: int
    upstream: str               # where it forwards to, in words (a URL or a Unix socket)
    keys_path: str
    log_path: str
    owner_pid: int | None
    started_at: float
    server_id: str = ""         # the marker in its processes' environment ("" in older records:
                                #   prune() can then prove no leftover its own, and ends none)
    uid: int = -1               # the user who wrote the record: read from the file's owner

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def group(self) -> ProcessGroup:
        return ProcessGroup(self.guard_pid, self.guard_started, self.server_id or None, frozenset(),
                            self.uid if self.uid >= 0 else None)

    def describe(self) -> str:
        return f"gateway at {self.url} -> {self.upstream} ({_about(self)})"


Record = ServerRecord | GatewayRecord
_KINDS = {SERVER: ServerRecord, GATEWAY: GatewayRecord}


def _kind(record: Record) -> str:
    return GATEWAY if isinstance(record, GatewayRecord) else SERVER


def _about(record: Record) -> str:
    owner = "detached" if record.owner_pid is None else f"owned by pid {record.owner_pid}"
    return f"{owner}, group {record.guard_pid}, up {time.time() - record.started_at:.0f} s"


def _dir(root: Path | None = None) -> Path:
    path = root or state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(port: int, root: Path | None = None, kind: str = SERVER) -> Path:
    return _dir(root) / f"{kind}-{port}.json"


def write_atomically(path: Path, fields: dict) -> Path:
    """Write a record so that a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fields, indent=1))
    tmp.replace(path)
    return path


def save(record: Record, root: Path | None = None) -> Path:
    return write_atomically(record_path(record.port, root, _kind(record)), asdict(record))


def remove(record: Record, root: Path | None = None, log: Callable[[str], None] = print) -> None:
    """Delete ``record``'s file if it still holds this record (the port may have a newer one)."""
    path = record_path(record.port, root, _kind(record))
    try:
        if json.loads(path.read_text()).get("guard_pid") == record.guard_pid:
            path.unlink()
    except FileNotFoundError:
        pass
    except PermissionError:
        log(f"note: cannot remove {path} (it belongs to another user); left as it is")
    except (OSError, ValueError):
        pass


def load_all(root: Path | None = None, log: Callable[[str], None] = print, kind: str = SERVER) -> list[Record]:
    """Every readable record of ``kind`` (``SERVER`` or ``GATEWAY``)."""
    records = []
    for path in sorted(_dir(root).glob(f"{kind}-*.json")):
        try:
            fields = json.loads(path.read_text())
            fields["uid"] = path.stat().st_uid    # who wrote it, whatever the file claims
            if kind == SERVER:
                fields["members"] = tuple(tuple(m) for m in fields.get("members", ()))
            records.append(_KINDS[kind](**fields))
        except FileNotFoundError:
            continue                                  # removed while we looked
        except PermissionError:
            log(f"note: cannot read {path} (permission denied); skipped")
        except (OSError, ValueError, TypeError) as err:
            aside = path.with_name(path.name + ".unreadable")
            try:
                path.replace(aside)
                where = f"moved to {aside.name}"
            except OSError:
                where = "left in place"
            log(f"note: {path.name} is not a {kind} record this version can read "
                f"({type(err).__name__}); {where}")
    return records


def guard_alive(record: Record) -> bool:
    """True while the recorded guard runs: the same pid, started at the same moment (so not a
    reused pid), running the guard, not a zombie."""
    if not runs(record.guard_pid, record.guard_started):
        return False
    return any(part.endswith(GUARD_MARK) for part in command_of(record.guard_pid))


def prune(root: Path | None = None, log: Callable[[str], None] = print, kind: str = SERVER) -> list[Record]:
    """Forget records of ``kind`` whose guard is gone, ending what is left of their processes
    (only those proven to be theirs) and naming any process that only shares the group id."""
    gone = []
    for record in load_all(root, log, kind):
        if guard_alive(record):
            continue
        group = record.group()
        leftovers = group.kill()
        if leftovers:
            log(f"Ended {len(leftovers)} orphaned process(es) of {record.describe()}: {leftovers}")
        strangers = group.strangers()
        if strangers:
            log(f"note: process(es) {strangers} now use group {record.guard_pid} of a dead {_kind(record)}'s "
                f"record, but are not proven to be its own; left alone")
        if getattr(record, "uds", None):
            from .lifecycle import remove_private_socket
            remove_private_socket(record.uds)
        remove(record, root, log)
        gone.append(record)
    return gone


def live(root: Path | None = None, log: Callable[[str], None] = print, kind: str = SERVER) -> list[Record]:
    """The records of ``kind`` whose guard runs. A look only: it ends nothing and removes no record
    (``prune`` does: for servers when one is started or stopped, for gateways at
    ``./tutorial.sh stop``). A record it cannot read is moved aside and named, as ``load_all`` does."""
    return [r for r in load_all(root, log, kind) if guard_alive(r)]


def stale(root: Path | None = None, log: Callable[[str], None] = print, kind: str = SERVER) -> list[Record]:
    """The records of ``kind`` whose guard is gone (what ``prune`` would clean up), untouched."""
    return [r for r in load_all(root, log, kind) if not guard_alive(r)]


@contextlib.contextmanager
def claim(root: Path | None = None, *, wait_message: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the registry's start lock: between looking for a running server and recording a new
    one, no other process of any user sharing this folder does the same. ``wait_message`` is
    called once if another process holds it (it is starting a server)."""
    path = _dir(root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)           # a shared folder: flock works read-only too
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_message is not None:
                wait_message()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                              # closing releases the lock
