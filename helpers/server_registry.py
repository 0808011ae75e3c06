"""Running servers, recorded on disk, so that any kernel (or the test session) finds them.

One JSON file per server under ``settings.state_dir()``. A record names the guard process
(the leader of the server's process group), the port, the model, the log and the owner: a
kernel's pid, or ``None`` for a server started detached on purpose. ``prune()`` drops records
whose guard is gone and ends any process still left in their group: the orphan reaper.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .process_guard import group_members
from .server_config import http_url
from .settings import state_dir

GUARD_MARK = "process_guard"


@dataclass(frozen=True)
class ServerRecord:
    guard_pid: int              # also the process-group id of every server process
    host: str
    port: int
    model: str
    served_model_name: str
    log_path: str
    owner_pid: int | None       # None: detached (started on purpose outside any kernel)
    started_at: float
    command: str                # the equivalent shell command (an API key in it is hidden)

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def describe(self) -> str:
        owner = "detached" if self.owner_pid is None else f"owned by pid {self.owner_pid}"
        age = time.time() - self.started_at
        return f"{self.served_model_name} at {self.url} ({owner}, group {self.guard_pid}, up {age:.0f} s)"


def _dir(root: Path | None = None) -> Path:
    path = root or state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_path(port: int, root: Path | None = None) -> Path:
    return _dir(root) / f"server-{port}.json"


def save(record: ServerRecord, root: Path | None = None) -> Path:
    path = record_path(record.port, root)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)
    return path


def remove(record: ServerRecord, root: Path | None = None) -> None:
    path = record_path(record.port, root)
    try:
        if json.loads(path.read_text()).get("guard_pid") == record.guard_pid:
            path.unlink()
    except (OSError, ValueError):
        pass


def load_all(root: Path | None = None) -> list[ServerRecord]:
    records = []
    for path in sorted(_dir(root).glob("server-*.json")):
        try:
            records.append(ServerRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: written by another version or cut short
    return records


def guard_alive(record: ServerRecord) -> bool:
    """True while the recorded guard runs (checked by its command line, not just its pid,
    which the system may have given to an unrelated process since)."""
    try:
        with open(f"/proc/{record.guard_pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{record.guard_pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return GUARD_MARK.encode() in cmdline and state not in (b"Z", b"X")


def prune(root: Path | None = None, log=print) -> list[ServerRecord]:
    """Forget records whose guard is gone, ending what is left of their process groups."""
    gone = []
    for record in load_all(root):
        if guard_alive(record):
            continue
        leftovers = group_members(record.guard_pid)
        if leftovers:
            log(f"Ending {len(leftovers)} orphaned process(es) of {record.describe()}: {leftovers}")
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        remove(record, root)
        gone.append(record)
    return gone


def live(root: Path | None = None) -> list[ServerRecord]:
    prune(root)
    return [r for r in load_all(root) if guard_alive(r)]
