"""``VLLMServer``: one object owns a vLLM OpenAI-compatible server's whole life.

    from helpers import get_server
    server = get_server()          # reuse the running server for these settings, or start one
    server.client()                # an openai.OpenAI pointed at it (max_retries=0)
    server.tail(20)                # the log lives in a file, not in whichever cell runs
    server.stop()                  # the whole process tree: API server, engine core, workers

Start-up fails fast: a process that exits while starting raises ``ServerStartError`` naming
the cause found in its log within seconds, not at the timeout. A server started from a kernel
ends with that kernel, however the kernel ends (see ``process_guard``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import requests

from . import server_registry as registry
from .errors import (ApiKeyError, TutorialError, NotOwnerError, PortInUseError,
                     ServerDiedError, ServerStartError, StartupTimeoutError)
from .model_source import check_model_folder, looks_like_path
from .process_guard import GRACE_SECONDS, group_members
from .server_config import ServerConfig, from_settings, http_url
from .settings import Settings, load_settings, state_dir
from .startup_diagnosis import diagnose, phases_reached

GUARD_SCRIPT = Path(__file__).with_name("process_guard.py")
POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
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
        self._guard: subprocess.Popen | None = None
        self._owner_fd: int | None = None
        self._log_path: Path | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def attach(cls, record: registry.ServerRecord, config: ServerConfig | None = None) -> "VLLMServer":
        """A handle on a server some other process started (it will not stop it)."""
        if record.guard_pid in _OWNED:
            return _OWNED[record.guard_pid]
        config = config or ServerConfig(model=record.model, served_model_name=record.served_model_name,
                                        host=record.host, port=record.port)
        server = cls(config.with_port(record.port))
        server.record, server.owned, server._log_path = record, False, Path(record.log_path)
        return server

    # ---------------------------------------------------------------- facts
    @property
    def port(self) -> int | None:
        return self.config.port

    @property
    def url(self) -> str:
        return http_url(self.config.host, self.port)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

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
        if self.pgid is None:
            return []
        result = []
        for pid in sorted(group_members(self.pgid)):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in raw if a]
            if args and Path(args[0]).name.startswith("python"):
                args = args[1:]
            label = " ".join(args)
            if "process_guard" in label:
                label = "process_guard.py (owns the group)"
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
        return f"<VLLMServer {self.name!r} {self.url if self.port else '(no port yet)'} {state}, {whose}>"

    # ---------------------------------------------------------------- start
    def _preflight(self) -> None:
        if looks_like_path(self.config.model):
            check_model_folder(Path(self.config.model).expanduser())
        if self.config.port is None:
            self.config = self.config.with_port(free_port(self.config.host))
        elif port_in_use(self.config.port, self.config.host):
            users = [r for r in registry.live() if r.port == self.config.port]
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

    def start(self, timeout: float | None = None, progress=print) -> "VLLMServer":
        """Start the server and wait until it answers; raises with the cause if it cannot."""
        if self.alive:
            raise RuntimeError(f"{self!r} is already running")
        port_was_free = self.config.port is None
        self._preflight()
        self._log_path = self._new_log()
        # The log is a file: no colour codes, even when the kernel's environment asks for them.
        env = {**os.environ, "VLLM_LOGGING_COLOR": "0", **self.config.env}
        guard = [sys.executable, str(GUARD_SCRIPT), "--grace", str(GRACE_SECONDS)]
        pass_fds: tuple[int, ...] = ()
        if not self.detached:
            read_end, self._owner_fd = os.pipe()
            guard += ["--owner-fd", str(read_end)]
            pass_fds = (read_end,)
        with open(self._log_path, "ab") as log:
            self._guard = subprocess.Popen(
                [*guard, "--", *self.config.argv()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds, start_new_session=True)
        if pass_fds:
            os.close(pass_fds[0])
        self.owned = True
        self.record = registry.ServerRecord(
            guard_pid=self._guard.pid, host=self.config.host, port=self.config.port,
            model=self.config.model, served_model_name=self.config.name, log_path=str(self._log_path),
            owner_pid=None if self.detached else os.getpid(), started_at=time.time(),
            command=self.config.command_line())
        registry.save(self.record)
        _OWNED[self._guard.pid] = self
        progress(f"Starting vLLM on {self.url} (process group {self._guard.pid}); log: {self._log_path}")
        try:
            return self.wait_ready(timeout=timeout, progress=progress)
        except ServerStartError as err:
            if err.cause == "port in use" and port_was_free:
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
        watching learner (and nbval) always sees progress. Raises ``ServerStartError`` as soon
        as the process exits, ``StartupTimeoutError`` (after stopping it) at the timeout.
        """
        timeout = timeout or self.config.startup_timeout
        if self.alive and self._answers():
            return self
        started = time.monotonic()
        seen: list[str] = []
        last_print = started
        while True:
            elapsed = time.monotonic() - started
            if not self.alive:
                self._fail_start()
            for phase in phases_reached(self.log_text())[len(seen):]:
                seen.append(phase)
                progress(f"  {elapsed:5.0f} s  {phase}")
                last_print = time.monotonic()
            if self._answers():
                progress(f"  {elapsed:5.0f} s  ready: {self.base_url} serves {self.name!r}")
                return self
            if elapsed > timeout:
                tail = self.tail(30)
                if self.owned:
                    self.stop()
                raise StartupTimeoutError(
                    f"the server was not ready after {timeout:.0f} s (last phase: "
                    f"{seen[-1] if seen else 'none'}); it was stopped", log_tail=tail,
                    log_path=str(self._log_path))
            if time.monotonic() - last_print >= HEARTBEAT_SECONDS:
                progress(f"  {elapsed:5.0f} s  still starting ({seen[-1] if seen else 'importing vLLM'})")
                last_print = time.monotonic()
            time.sleep(POLL_SECONDS)

    def _answers(self) -> bool:
        try:
            if requests.get(self.url + "/health", timeout=2).status_code != 200:
                return False
            return self.name in [m["id"] for m in self.models()]
        except requests.RequestException:
            return False

    def _fail_start(self) -> None:
        code = self._guard.wait() if self._guard is not None else None
        text = self.log_text()
        diagnosis = diagnose(text, code)
        self._forget()
        cause = diagnosis.cause if diagnosis else "unknown"
        message = (f"vLLM exited during start-up (exit code {code}): {diagnosis}" if diagnosis else
                   f"vLLM exited during start-up (exit code {code}); no known cause in the log")
        raise ServerStartError(message, cause=cause, log_tail=self.tail(25),
                               log_path=str(self._log_path), exit_code=code)

    # ---------------------------------------------------------------- talk to it
    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def _get(self, path: str, auth: bool = False) -> requests.Response:
        try:
            return requests.get(self.url + path, headers=self._headers() if auth else {}, timeout=10)
        except requests.ConnectionError:
            if not self.alive:
                raise ServerDiedError(f"the server at {self.url} is gone; last log lines:\n{self.tail(15)}") from None
            raise

    def health(self) -> bool:
        """True when /health answers 200 (liveness; no API key needed)."""
        return self._get("/health").status_code == 200

    def version(self) -> str:
        return self._get("/version").json()["version"]

    def models(self) -> list[dict]:
        """The /v1/models list (needs the API key when the server has one)."""
        reply = self._get("/v1/models", auth=True)
        if reply.status_code == 401:
            raise ApiKeyError(
                f"{self.url}/v1/models answered 401: the server was started with an API key and "
                f"this request {'sent a different one' if self.config.api_key else 'sent none'}. "
                f"Set VLLM_TUTORIAL_API_KEY (or api_key in tutorial.toml) to the server's key.")
        reply.raise_for_status()
        return reply.json()["data"]

    def client(self, **kwargs):
        """An ``openai.OpenAI`` for this server: no hidden retries, a finite timeout."""
        return self._openai_client("OpenAI", kwargs)

    def async_client(self, **kwargs):
        """An ``openai.AsyncOpenAI`` for this server, set up like ``client()``."""
        return self._openai_client("AsyncOpenAI", kwargs)

    def _openai_client(self, kind: str, kwargs: dict):
        import openai
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        return getattr(openai, kind)(base_url=self.base_url, api_key=self.config.api_key or "EMPTY", **kwargs)

    def log_text(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def tail(self, lines: int = 20, grep: str | None = None) -> str:
        text = self.log_text().splitlines()
        if grep:
            text = [line for line in text if grep.lower() in line.lower()]
        return "\n".join(text[-lines:])

    # ---------------------------------------------------------------- stop
    def stop(self, force: bool = False, grace: float = GRACE_SECONDS) -> StopReport:
        """End every process of the server: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if not self.owned and not force:
            raise NotOwnerError(
                f"{self!r} was started by another process ({self.record.describe() if self.record else '?'}); "
                f"it keeps serving the notebooks that use it. Use stop(force=True) to end it anyway.")
        started = time.monotonic()
        pgid = self.pgid
        pids = tuple(group_members(pgid)) if pgid else ()
        killed: list[int] = []
        if pgid and pids:
            try:
                os.kill(pgid, signal.SIGTERM)  # the guard: it ends the group in order
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 2 * grace + 10
            while time.monotonic() < deadline and group_members(pgid):
                if self._guard is not None:
                    self._guard.poll()  # reap it, or it stays a zombie member
                time.sleep(0.1)
            killed = group_members(pgid)
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if group_members(pgid):
                raise TutorialError(f"processes {group_members(pgid)} of group {pgid} survived SIGKILL")
        if self._guard is not None:
            self._guard.wait()
        self._forget()
        return StopReport(pids, tuple(killed), time.monotonic() - started)

    def restart(self, timeout: float | None = None, progress=print) -> "VLLMServer":
        """Stop, then start again on the same port."""
        self.stop()
        return self.start(timeout=timeout, progress=progress)

    def _forget(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        if self.record is not None:
            registry.remove(self.record)
            _OWNED.pop(self.record.guard_pid, None)
        if self._guard is not None and self._guard.poll() is not None:
            self._guard = None

    def __enter__(self) -> "VLLMServer":
        if not self.alive:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.owned and self.alive:
            self.stop()


def get_server(settings: Settings | None = None, *, progress=print, timeout: float | None = None) -> VLLMServer:
    """The server for these settings: the running one if there is one, else a new one.

    A running server (started by another notebook's kernel, by the test session, or detached
    for a class) is found through the registry and reused, so servers never pile up. A new one
    belongs to this kernel and ends with it.
    """
    settings = settings or load_settings()
    config = from_settings(settings, log=progress)
    for record in registry.live():
        same = record.served_model_name == config.name and record.model == config.model
        if same and (settings.port is None or record.port == settings.port):
            server = VLLMServer.attach(record, config)
            if server is not _OWNED.get(record.guard_pid):
                progress(f"Reusing {record.describe()}")
                asked = config.with_port(record.port).command_line()
                if record.command and record.command != asked:
                    # Same model and name, other flags (a class server, another log preset):
                    # reused all the same, so that servers never pile up, but said.
                    progress(f"  note: it runs with other flags than these settings ask for\n"
                             f"    running: {record.command}\n    asked:   {asked}")
            return server.wait_ready(timeout=timeout, progress=progress)
    return VLLMServer(config).start(timeout=timeout, progress=progress)
