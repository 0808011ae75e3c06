"""``VLLMServer``: one object owns a vLLM OpenAI-compatible server's whole life.

    from helpers import get_server
    server = get_server()          # reuse the running server for these settings, or start one
    server.client()                # an openai.OpenAI pointed at it (max_retries=0)
    server.tail(20)                # the log lives in a file, not in whichever cell runs
    server.stop()                  # the whole process tree: API server, engine core, workers

Like vLLM's own test helper (``RemoteOpenAIServer``) it starts the real command, waits for
``/health`` and stops what it started; unlike it, it never waits on a dead start: a process
that exits, a fatal line in the log, or a worker gone ends the start within seconds with the
cause named (``diagnosis``). The processes live in one group under a guard (``guard``), so a
server started from a kernel ends with that kernel, however the kernel ends, and the running
servers are recorded (``registry``) so that notebooks share one instead of piling them up.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import requests

from ..endpoint import Endpoint, server_url
from ..errors import (NotOwnerError, PortInUseError, ServerDiedError, ServerStartError,
                      StartupTimeoutError, TutorialError, UnsafeHostError)
from ..paths import server_environment, short_path, state_dir
from ..settings import Settings, load_settings
from . import guard, registry
from .config import ServerConfig, from_settings, plan
from .diagnosis import Diagnosis, StartWatch, diagnose
from .model_source import check_model_folder, looks_like_path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
FATAL_SETTLE_SECONDS = 2.0    # after a fatal sign, time for vLLM to exit by itself (a fuller log)
LOGS_KEPT = 20

# Servers this process started, by guard pid: get_server() hands back the same object.
_OWNED: dict[int, "VLLMServer"] = {}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on host:port (SO_REUSEADDR, as uvicorn binds, so that
    connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class StopReport:
    pids: tuple[int, ...]
    killed_hard: tuple[int, ...]
    seconds: float

    def __str__(self) -> str:
        hard = f", {len(self.killed_hard)} needed SIGKILL" if self.killed_hard else ""
        return f"stopped {len(self.pids)} process(es) in {self.seconds:.1f} s{hard}; none left"


class VLLMServer:
    """A vLLM server process group: started here (owned) or found running (attached)."""

    def __init__(self, config: ServerConfig, *, detached: bool = False):
        self.config = config
        self.detached = detached
        self.record: registry.ServerRecord | None = None
        self.owned = True
        self._guard = None                 # the guard's Popen, for a server started here
        self._owner_fd: int | None = None
        self._log_path: Path | None = None
        self._settings: Settings | None = None   # attached by get_server: prepare these before a start

    @classmethod
    def attach(cls, record: registry.ServerRecord, config: ServerConfig | None = None,
               settings: Settings | None = None) -> "VLLMServer":
        """A handle on a server some other process started (it will not stop it). ``config``:
        what the caller asked for. ``get_server`` passes the settings' plan (no work done) and the
        settings: started again after this server ends, the handle first does that work
        (``from_settings``: convert or download the model, write the log preset's file)."""
        if record.guard_pid in _OWNED:
            return _OWNED[record.guard_pid]
        config = config or ServerConfig(model=record.model, served_model_name=record.served_model_name,
                                        host=record.host)
        server = cls(replace(config, port=record.port, uds=record.uds))
        server.record, server.owned, server._log_path = record, False, Path(record.log_path)
        server._settings = settings
        return server

    # ---------------------------------------------------------------- facts
    @property
    def port(self) -> int | None:
        return self.config.port

    @property
    def url(self) -> str:
        return server_url(self.config.host, self.port, self.config.uds)

    @property
    def where(self) -> str:
        """Where it listens, for people: a URL, or ``unix:/path`` for a socket."""
        return self.endpoint.where

    @property
    def endpoint(self) -> Endpoint:
        """URL, served name and key: what every request to this server needs."""
        return Endpoint(self.url, self.config.name, self.config.api_key, self.config.uds)

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def pgid(self) -> int | None:
        return self.record.guard_pid if self.record else None

    def processes(self) -> list[tuple[int, str]]:
        """(pid, short command) of every live process of this server, the guard included."""
        if self.record is None:
            return []
        result = []
        for pid in sorted(self.record.group().members()):
            args = guard.command_of(pid)
            if args and Path(args[0]).name.startswith("python"):
                args = args[1:]
            label = " ".join(map(short_path, args))     # the home folder as ~ (short_path leaves other words be)
            if guard.__file__ and Path(guard.__file__).name in label:
                label = "guard.py (owns the group)"
            elif "resource_tracker" in label:
                label = "multiprocessing resource_tracker"
            result.append((pid, label[:72]))
        return result

    @property
    def alive(self) -> bool:
        if self._guard is not None:
            return self._guard.poll() is None
        return self.record is not None and registry.guard_alive(self.record)

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        whose = "owned" if self.owned else "attached"
        return f"<VLLMServer {self.name!r} {self.where if self.port else '(no port yet)'} {state}, {whose}>"

    # ---------------------------------------------------------------- talk to it
    def _get(self, path: str):
        try:
            return replace(self.endpoint, api_key=None).get(path, timeout=10)
        except (requests.ConnectionError, httpx.TransportError):
            if not self.alive:
                raise ServerDiedError(f"the server at {self.where} is gone; last log lines:\n{self.tail(15)}") from None
            raise

    def health(self) -> bool:
        """True when /health answers 200 (liveness; no API key needed)."""
        return self._get("/health").status_code == 200

    def version(self) -> str:
        return self._get("/version").json()["version"]

    def models(self) -> list[dict]:
        """The /v1/models list (with the API key when the server has one)."""
        if not self.alive:
            raise ServerDiedError(f"the server at {self.where} is gone; last log lines:\n{self.tail(15)}")
        return self.endpoint.models()

    def client(self, **kwargs):
        """An ``openai.OpenAI`` for this server: no hidden retries, a finite timeout."""
        return self.endpoint.client(**kwargs)

    def async_client(self, **kwargs):
        """An ``openai.AsyncOpenAI`` for this server, set up like ``client()``."""
        return self.endpoint.async_client(**kwargs)

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def tail(self, lines: int = 20, grep: str | None = None) -> str:
        text = self.log_text().splitlines()
        if grep:
            text = [line for line in text if grep.lower() in line.lower()]
        return "\n".join(text[-lines:])

    # ---------------------------------------------------------------- start
    def _preflight(self) -> None:
        """The cheap checks, before anything starts: the address, the model folder, the port."""
        _refuse_network_host(self.config.host)
        if looks_like_path(self.config.model):
            check_model_folder(Path(self.config.model).expanduser())
        if self.config.uds and not Path(self.config.uds).parent.is_dir():
            self.config = replace(self.config, uds=private_socket())     # a restart after a stop removed it
        # a server on a Unix socket holds its recorded port (its registry entry) without listening on it
        live = registry.live()
        taken = {r.port for r in live}
        if self.config.port is None:
            port = free_port(self.config.host)
            for _ in range(20):
                if port not in taken:
                    break
                port = free_port(self.config.host)
            else:
                raise PortInUseError("no free port that no tutorial server holds was found in 20 tries")
            self.config = replace(self.config, port=port)
        elif self.config.port in taken or port_in_use(self.config.port, self.config.host):
            users = [r for r in live if r.port == self.config.port]
            who = f" by the tutorial's server {users[0].describe()}" if users else ""
            raise PortInUseError(
                f"port {self.config.port} on {self.config.host} is already in use{who}. "
                f"Leave the port unset to get a free one, or stop what is listening there.")

    def _new_log(self) -> Path:
        logs = state_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for old in sorted(logs.glob("vllm-*.log"))[:-LOGS_KEPT]:
            old.unlink(missing_ok=True)
        return logs / f"vllm-{time.strftime('%Y%m%d-%H%M%S')}-{self.config.port}.log"

    def launch(self, progress=print) -> "VLLMServer":
        """Check, start the process group and record it; do not wait (see ``wait_ready``)."""
        if self.alive:
            raise RuntimeError(f"{self!r} is already running")
        if self._settings is not None:
            # A handle on a reused server holds the settings' plan: a hub model perhaps not
            # downloaded, the log preset's file perhaps not written. Do that work now, on the
            # same port and socket path (_preflight gives a fresh folder if the old one is gone).
            prepared = from_settings(self._settings, log=progress)
            self.config = replace(prepared, port=self.config.port, uds=self.config.uds)
            self._settings = None
        self._preflight()
        self._log_path = self._new_log()
        server_id = secrets.token_hex(8)
        # The log is a file: no colour codes, even when the kernel's environment asks for them.
        env = {**server_environment(), "VLLM_LOGGING_COLOR": "0", **self.config.environment()}
        argv = self.config.argv()
        if self.config.uds:
            # On a Unix socket vLLM needs no network: run it in a namespace with a loopback of its
            # own, so its engine's torch.distributed and gloo ports are out of other users' reach too.
            from ..classroom.network import isolated

            alone, why = isolated(argv)
            if alone:
                argv = alone
            else:
                progress(f"note: vLLM's engine ports are not in a network of their own: {why}. On the CPU build "
                         f"they listen on this machine's loopback, where other users can reach them (no HTTP there, "
                         f"but they could disturb the engine); vLLM 0.26.0 on a GPU also opens a torch.distributed "
                         f"store on every address of the machine, with no key: let a firewall pass only the "
                         f"gateway's port")
        with open(self._log_path, "ab") as log:
            self._guard, self._owner_fd = guard.spawn(argv, marker=server_id, env=env,
                                                      log_file=log, owner=not self.detached)
        info = guard.proc_info(self._guard.pid)
        self.owned = True
        self.record = registry.ServerRecord(
            guard_pid=self._guard.pid, guard_started=info.start_time if info else -1, server_id=server_id,
            host=self.config.host, port=self.config.port, model=self.config.model,
            served_model_name=self.config.name, log_path=str(self._log_path),
            owner_pid=None if self.detached else os.getpid(), started_at=time.time(),
            command=self.config.command_line(), uds=self.config.uds)
        registry.save(self.record)
        _OWNED[self._guard.pid] = self
        progress(f"Starting vLLM on {self.where} (process group {self._guard.pid}); "
                 f"log: {short_path(self._log_path)}")
        return self

    def start(self, timeout: float | None = None, progress=print) -> "VLLMServer":
        """Start the server and wait until it answers; raises with the cause if it cannot."""
        port_was_free = self.config.port is None
        self.launch(progress)
        return self._await_start(timeout, progress, retry_port=port_was_free)

    def _await_start(self, timeout: float | None, progress, retry_port: bool) -> "VLLMServer":
        try:
            return self.wait_ready(timeout=timeout, progress=progress)
        except ServerStartError as err:
            if err.cause == "port in use" and retry_port:
                # Another program took the free port between our pick and vLLM's bind: pick again.
                progress("The port was taken while vLLM started; trying another free port")
                self.config = replace(self.config, port=None)
                return self.start(timeout=timeout, progress=progress)
            raise
        except KeyboardInterrupt:
            progress("Interrupted: stopping the server that was starting")
            self.stop()
            raise

    def wait_ready(self, timeout: float | None = None, progress=print) -> "VLLMServer":
        """Wait for /health (alive), then /v1/models (the served name is there).

        Prints each start-up phase as the log reaches it and a heartbeat every 15 s, so a
        watching learner (and nbval) always sees progress. Raises ``ServerStartError`` within
        seconds when the process exits, a fatal line appears in the log or a worker or engine
        core process is gone; ``StartupTimeoutError`` (after stopping it) at the timeout.
        """
        timeout = timeout or self.config.startup_timeout
        if self.alive and self._answers():
            return self
        started = last_print = time.monotonic()
        watch = StartWatch(settle=FATAL_SETTLE_SECONDS)
        while True:
            elapsed = time.monotonic() - started
            if not self.alive:
                self._fail_start()
            text = self.log_text()
            for phase in watch.new_phases(text):
                progress(f"  {elapsed:5.0f} s  {phase}")
                last_print = time.monotonic()
            if self._answers():
                progress(f"  {elapsed:5.0f} s  ready: {self.where if self.config.uds else self.base_url} "
                         f"serves {self.name!r}")
                if self.owned:   # its processes, for whoever must end them once the guard is gone
                    self.record = replace(self.record, members=tuple(sorted(self.record.group().snapshot())))
                    registry.save(self.record)
                return self
            failed = None
            if self.owned:
                processes = self.processes()
                failed = watch.failed(text, _titled(processes, "VLLM::Worker"), _titled(processes, "VLLM::EngineCore"))
            if failed:
                self._fail_start(failed)      # vLLM did not exit by itself: it would hang here
            if elapsed > timeout:
                tail = self.tail(30)
                if self.owned:
                    self.stop()
                raise StartupTimeoutError(
                    f"the server was not ready after {timeout:.0f} s (last phase: {watch.last or 'none'}); "
                    f"it was stopped", log_tail=tail, log_path=str(self._log_path))
            if time.monotonic() - last_print >= HEARTBEAT_SECONDS:
                progress(f"  {elapsed:5.0f} s  still starting ({watch.last or 'importing vLLM'})")
                last_print = time.monotonic()
            time.sleep(POLL_SECONDS)

    def _answers(self) -> bool:
        try:
            if replace(self.endpoint, api_key=None).get("/health", timeout=2).status_code != 200:
                return False
            return self.name in [m["id"] for m in self.endpoint.models()]
        except (requests.RequestException, httpx.HTTPError):
            return False

    def _fail_start(self, sign: Diagnosis | None = None) -> None:
        """Raise the reason a start failed: the process exited, or ``sign`` was seen while it
        hung on (then every process of it is killed at once: a failed start has nothing to shut
        down in order, and its log is already written)."""
        if sign is not None and self.owned and self.record is not None:
            self.record.group().kill()
            self._reap()
        code = self._guard.wait() if self._guard is not None else None
        text = self.log_text()
        # after our own kill the exit code says only that we killed it: read the log alone then
        diagnosis = diagnose(text, None if sign is not None else code) or sign
        self._forget()
        cause = diagnosis.cause if diagnosis else "unknown"
        if sign is not None:
            what = f"vLLM's start failed ({sign.cause}) and it was stopped"
        elif self.owned:
            what = f"vLLM exited during start-up (exit code {code})"
        else:
            what = f"the server another process was starting for these settings ({self.record.describe()}) failed"
        message = f"{what}: {diagnosis}" if diagnosis else f"{what}; no known cause in the log"
        raise ServerStartError(message, cause=cause, log_tail=self.tail(25),
                               log_path=str(self._log_path), exit_code=code)

    # ---------------------------------------------------------------- stop
    def stop(self, force: bool = False) -> StopReport:
        """End every process of the server: the guard stops them in order (SIGTERM, then
        SIGKILL after a grace period); whatever it leaves is ended here."""
        if not self.owned and not force:
            raise NotOwnerError(
                f"{self!r} was started by another process ({self.record.describe() if self.record else '?'}); "
                f"it keeps serving the notebooks that use it. Use stop(force=True) to end it anyway.")
        started = time.monotonic()
        group = self.record.group() if self.record else None
        pids = tuple(group.members()) if group else ()
        killed: list[int] = []
        if group and pids:
            if self.alive:
                guard.send([group.pgid], signal.SIGTERM)   # the guard ends the group in order
                group.wait_empty(2 * guard.GRACE + guard.KILL_WAIT + 1, poll=self._reap)
            killed = group.stop(guard.GRACE, poll=self._reap)    # what the guard left, if anything
            if group.members():
                raise TutorialError(f"processes {group.members()} of group {group.pgid} survived SIGKILL")
        if self._guard is not None:
            # An exiting guard leaves the group's member list before it can be reaped: wait for it,
            # so that ``alive`` is False when stop() returns (a restart() right after it found the
            # guard still running on a loaded machine).
            try:
                self._guard.wait(guard.KILL_WAIT)
            except subprocess.TimeoutExpired:
                raise TutorialError(f"the guard (pid {self._guard.pid}) of group {group.pgid if group else '?'} "
                                    f"did not exit within {guard.KILL_WAIT:.0f} s after its group ended") from None
        self._forget()
        return StopReport(pids, tuple(killed), time.monotonic() - started)

    def restart(self, timeout: float | None = None, progress=print) -> "VLLMServer":
        """Stop, then start again on the same port."""
        self.stop()
        return self.start(timeout=timeout, progress=progress)

    def _reap(self) -> None:
        if self._guard is not None:
            self._guard.poll()             # a finished guard stays a zombie member until reaped

    def _forget(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        if self.record is not None:
            registry.remove(self.record)
            _OWNED.pop(self.record.guard_pid, None)
        if self.config.uds and not self.alive:         # its socket and private folder go with it
            remove_private_socket(self.config.uds)
        if self._guard is not None and self._guard.poll() is not None:
            self._guard = None

    def __enter__(self) -> "VLLMServer":
        if not self.alive:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.owned and self.alive:
            self.stop()


def _refuse_network_host(host: str) -> None:
    if host not in LOOPBACK:
        raise UnsafeHostError(
            f"a vLLM server on {host} could be reached from other machines, and vLLM's own API key "
            f"guards only the routes under /v1, /v2 and /inference (0.32.0 adds /cohere; /invocations, "
            f"/tokenize, /metrics ... answer anyone). "
            f"Keep host 127.0.0.1; for a class, ./tutorial.sh serve with that host puts vLLM on loopback "
            f"behind a gateway that checks every student's key (notebook 08).")


def _titled(processes: list[tuple[int, str]], title: str) -> list[int]:
    """The pids whose label has ``title``, without their children: a process forked by the engine
    core (compile workers, or a moment before exec) carries its title too, and its end is no
    failure."""
    pids = {pid for pid, name in processes if title in name}
    return sorted(pid for pid in pids if guard.parent_of(pid) not in pids)


def _running(config: ServerConfig, settings: Settings, progress, private: bool = False) -> VLLMServer | None:
    """A running server that serves the same model under the same name (and port, if asked;
    on a private socket of this user's if ``private``). ``config`` is the settings' plan: finding
    one does no work. Starting is where dead servers' records are cleaned up (``registry.prune``)."""
    registry.prune(log=progress)
    for record in registry.live(log=progress):
        same = record.served_model_name == config.name and record.model == config.model \
            and (record.uds is not None) == private \
            and (record.uds is None or record.uid == os.getuid())      # a private socket: only our own
        if same and (settings.port is None or record.port == settings.port):
            server = VLLMServer.attach(record, config, settings)
            if server is not _OWNED.get(record.guard_pid):
                progress(f"Reusing {record.describe()}")
                asked = replace(config, port=record.port, uds=record.uds).command_line()
                if record.command and record.command != asked:
                    # Same model and name, other flags (a class server, another log preset):
                    # reused all the same, so that servers never pile up, but said.
                    progress(f"  note: it runs with other flags than these settings ask for\n"
                             f"    running: {record.command}\n    asked:   {asked}")
            return server
    return None


def private_socket() -> str:
    """A path for vLLM's ``--uds`` in a folder of its own that only this user may enter (mode
    700): other users of the machine cannot connect to it, so nothing of vLLM is theirs to reach,
    not even the routes its key leaves open. Under the state folder, or the temporary folder when
    that path would be too long for a socket (108 bytes on Linux)."""
    import stat
    import tempfile

    parent = state_dir() / "sockets"
    with contextlib.suppress(FileExistsError):
        parent.mkdir(mode=0o755, parents=True)
    info = parent.lstat()
    # sockets/ must be ours, a real folder, writable by nobody else: who may rename entries there
    # could swap our folder for theirs and stand between the gateway (with the key) and vLLM
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
        folder = Path(tempfile.mkdtemp(prefix="vllm-", dir=parent))
        if len(os.fsencode(folder / "vllm.sock")) <= 100:
            return str(folder / "vllm.sock")
        folder.rmdir()
    folder = Path(tempfile.mkdtemp(prefix="vllm-tutorial-"))      # mode 700, in the temporary folder
    path = folder / "vllm.sock"
    if len(os.fsencode(path)) > 100:
        folder.rmdir()
        raise ServerStartError(f"no folder for vLLM's socket gives a path short enough ({path})")
    return str(path)


def remove_private_socket(uds: str) -> None:
    """Remove a socket ``private_socket`` made, and its folder (only a folder it made)."""
    path = Path(uds)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
    if path.parent.name.startswith(("vllm-", "vllm-tutorial-")):
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def get_server(settings: Settings | None = None, *, progress=print, timeout: float | None = None,
               detached: bool = False, private: bool = False) -> VLLMServer:
    """The server for these settings: the running one if there is one, else a new one.

    A running server (started by another notebook's kernel, by the test session, or detached
    for a class) is found through the registry and reused, so servers never pile up; two
    calls at the same moment (two notebooks opened together) start one server, and the second
    waits for it. A new one belongs to this kernel and ends with it (``detached=True``: it runs
    until ``./tutorial.sh stop``). With ``server_url`` set, nothing starts: a ``RemoteServer``
    connects to that server (a class server) with the settings' key. ``private=True``: vLLM
    listens on a Unix socket only this user can reach (``private_socket``), as a class server's
    does behind its gateway; only such a server is reused then.
    """
    settings = settings or load_settings()
    if settings.server_url:
        from .remote import RemoteServer
        return RemoteServer.connect(settings, progress)
    # Resolving the settings does no work (plan): a server that already runs is reused without
    # converting, downloading or writing anything; that work happens only for a new server, and
    # outside the start lock (a download can take minutes; other kernels may only want to reuse).
    planned = plan(settings, log=lambda _message: None)
    _refuse_network_host(planned.host)      # before reuse too: a running server is on loopback
    config = None
    while True:
        with registry.claim(wait_message=lambda: progress("Another process is starting a server; waiting for it")):
            server = _running(planned, settings, progress, private)
            launched = server is None
            if launched and config is not None:     # prepared, and still none runs: start it now
                if private:
                    config = replace(config, uds=private_socket())
                try:
                    server = VLLMServer(config, detached=detached).launch(progress)
                except BaseException:
                    if config.uds:
                        remove_private_socket(config.uds)
                    raise
            if not launched or config is not None:
                break
        config = from_settings(settings, log=progress)   # the work, then look again under the lock
    if launched:
        return server._await_start(timeout, progress, retry_port=settings.port is None)
    return server.wait_ready(timeout=timeout, progress=progress)
