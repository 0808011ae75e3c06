"""Start the gateway for a running vLLM server, under the project's guard, and find it again.

    from helpers import get_server
    from helpers.classroom import start_gateway
    server = get_server()        # vLLM on 127.0.0.1, started with api_key=<internal key>
    gateway = start_gateway(server, host="0.0.0.0", port=8080)
    gateway.url                  # what students use (with their own keys)
    gateway.stop()

The gateway runs as ``python -m helpers.classroom.gateway`` in a process group of its own led by
``helpers/server/guard.py``, like the server, and

* ends with its **owner** (the kernel or script that started it), however that ends, unless it
  is ``detached`` (a class server started on purpose: then it runs until stopped);
* ends with its **server**: it watches the server's guard process (a pidfd) and stops as soon as
  that ends, so ``./tutorial.sh stop`` (or ``server.stop()``) never leaves a gateway answering
  502 in front of nothing.

Its keys file and vLLM's internal key reach it through its environment only (never its command
line). Running gateways are recorded in the servers' registry (``helpers.server.registry``,
``gateway-<port>.json``): ``gateways()`` lists them, ``prune_gateways()`` cleans up after dead ones.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

import requests

from ..endpoint import Endpoint
from ..errors import GatewayError
from ..paths import REPO_ROOT, server_environment, short_path, state_dir
from ..server import guard, registry
from ..server.registry import GatewayRecord
from ..server.lifecycle import LOOPBACK, free_port, port_in_use
from . import keys as keyfile
from .gateway import INTERNAL_KEY_VARIABLE, KEYS_VARIABLE, READY_LINE
from .policy import Limits

class GatewayProcess:
    """A running gateway: its URL, its log, and ``stop()``."""

    def __init__(self, record: GatewayRecord, popen: subprocess.Popen | None = None, owner_fd: int | None = None):
        self.record = record
        self._popen = popen
        self._owner_fd = owner_fd

    @property
    def url(self) -> str:
        return self.record.url

    @property
    def log_path(self) -> Path:
        return Path(self.record.log_path)

    def endpoint(self, api_key: str, model: str) -> Endpoint:
        """What a student's code talks to: this gateway's URL with their key."""
        return Endpoint(self.url, model, api_key)

    @property
    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return registry.guard_alive(self.record)

    def pids(self) -> list[int]:
        return self._group().members()

    def _group(self) -> guard.ProcessGroup:
        return self.record.group()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM: open streams get an error event, the gateway exits; whatever is left of its
        group is ended after ``timeout``."""
        group = self._group()
        if self.alive:
            guard.send([self.record.guard_pid], signal.SIGTERM)
            group.wait_empty(timeout, poll=self._reap)
        group.stop(guard.GRACE, poll=self._reap)
        if self._popen is not None:        # killed just now: reap it, or `alive` still reads True
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=guard.GRACE)
        self._reap()
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        registry.remove(self.record)

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()

    def __repr__(self) -> str:
        return f"<GatewayProcess {self.url} -> {self.record.upstream} {'running' if self.alive else 'stopped'}>"


def prune_gateways() -> int:
    """Forget the records of gateways that are gone, ending what is left of their groups
    (``./tutorial.sh stop``: the explicit clean-up); how many."""
    return len(registry.prune(kind=registry.GATEWAY))


def gateways() -> list[GatewayProcess]:
    """The gateways recorded as running. A look: a dead gateway's record is only skipped (a stop,
    or the next gateway on its port, replaces it)."""
    return [GatewayProcess(record) for record in registry.live(kind=registry.GATEWAY)]


def start_gateway(server, *, host: str, port: int | None = None, keys_path: Path | str | None = None,
                  limits: Limits | None = None, internal_key: str | None = None, detached: bool | None = None,
                  network=None, timeout: float = 30.0, progress=print) -> GatewayProcess:
    """Start the gateway in front of ``server`` and wait until it accepts connections on
    ``host``:``port`` (a free port when None).

    * ``server``: a ready ``VLLMServer`` on loopback (the gateway ends when it ends), or the
      ``http://127.0.0.1:PORT`` URL of something that speaks vLLM's API there, such as a router in
      front of several replicas (notebook 09); the gateway then runs until it is stopped. Loopback
      keeps other machines out, not other users of this one: vllm-router checks no client key
      (its routes include ``/add_worker``; a note says so, unless ``network`` is given), and
      vLLM's key guards only ``/v1``, ``/v2`` and ``/inference`` (0.32.0: and ``/cohere``).
    * ``network``: with a URL, the ``PrivateNetwork`` (``helpers.classroom.network``) that the
      router and its replicas run in: the gateway binds ``host``:``port`` here, then enters it,
      and reaches the URL inside, where no other user of this machine can.
    * ``keys_path``: the keys file (``$TUTORIAL_GATEWAY_KEYS``, else the default in
      ``keys.default_dir()``); it must exist and be private (mode 0600).
    * ``internal_key``: vLLM's own key; by default the server's ``api_key``. A server without
      one is served all the same, with a note (any program on this machine can reach it).
    * ``detached``: by default like the server (a server this process owns and did not detach:
      the gateway ends with this process too); for a URL, not detached.
    """
    if isinstance(server, str):
        upstream = _Upstream.from_url(server)
        if network is None:
            progress(f"note: {server} is on loopback, out of other machines' reach but not of other users of this "
                     f"one: a router checks no key of its own (vllm-router's /add_worker included); run it and its "
                     f"replicas in a private network (helpers.classroom.network) and pass network=")
        elif not network.alive or network.started is None:
            raise GatewayError(f"{network!r} has ended; start the router in a new one")
        return _start(upstream, host=host, port=port, keys_path=keys_path, limits=limits,
                      internal_key=internal_key, detached=bool(detached), timeout=timeout, progress=progress,
                      network=network)
    if network is not None:
        raise GatewayError("network= goes with a router's URL; a VLLMServer of this package is reached on its "
                           "own socket (./tutorial.sh serve keeps it private)")
    if server.config.host not in LOOPBACK:
        raise GatewayError(
            f"vLLM listens on {server.config.host}, so students could reach it around the gateway (vLLM's "
            f"--api-key leaves /invocations, /tokenize, /metrics ... open); start it with host 127.0.0.1")
    if server.record is None or not server.alive:
        raise GatewayError(f"{server!r} is not running; start it first")
    if detached is None:
        detached = server.detached or not server.owned
    return _start(_Upstream.from_server(server), host=host, port=port, keys_path=keys_path, limits=limits,
                  internal_key=internal_key, detached=detached, timeout=timeout, progress=progress)


@dataclass(frozen=True)
class _Upstream:
    """What the gateway is put in front of: a ``VLLMServer`` of this package, or a URL on loopback
    (a router)."""

    url: str                                   # --upstream (with a socket: the Host it is asked as)
    where: str                                 # as said to the teacher
    name: str                                  # what it serves
    api_key: str | None = None                 # the server's own key, the default internal key
    uds: str | None = None                     # --upstream-uds
    follow: tuple[int, int] | None = None      # the server's guard: the gateway ends with it
    python: str = sys.executable               # the interpreter that runs the gateway

    @classmethod
    def from_url(cls, url: str) -> "_Upstream":
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:                     # a port out of range
            port = None
        if parts.scheme != "http" or parts.hostname not in LOOPBACK or not port:
            raise GatewayError(f"the upstream must be http://127.0.0.1:PORT (on this machine, so that nobody "
                               f"reaches it around the gateway), got {url!r}")
        return cls(url=url, where=url, name=url)

    @classmethod
    def from_server(cls, server) -> "_Upstream":
        return cls(url=server.url, where=server.where, name=server.name, api_key=server.config.api_key,
                   uds=server.config.uds, follow=(server.record.guard_pid, server.record.guard_started),
                   python=server.config.python or sys.executable)


def _start(upstream: _Upstream, *, host, port, keys_path, limits, internal_key, detached, timeout, progress,
           network=None) -> GatewayProcess:
    internal_key = internal_key or upstream.api_key
    if not internal_key:
        progress(f"note: vLLM at {upstream.where} takes requests without a key: any program on this machine can "
                 f"use it; for a class start it with api_key=<a random internal key>")
        internal_key = secrets.token_urlsafe(32)        # sent, and ignored, by a server without a key
    keys_path = Path(keys_path).expanduser() if keys_path else keyfile.default_keys_path()
    try:
        table = keyfile.read_table(keys_path)
    except keyfile.KeysError as err:
        raise GatewayError(str(err)) from None
    if port is None:
        port = free_port(host)
    elif port_in_use(port, host):
        raise GatewayError(f"port {port} on {host} is already in use")
    limits = limits or Limits()
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"gateway-{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"
    argv = [upstream.python, "-m", "helpers.classroom.gateway", "--host", host, "--port", str(port),
            "--upstream", upstream.url]
    if upstream.follow:                                 # a VLLMServer: end with it
        argv += ["--follow-pid", str(upstream.follow[0]), "--follow-start", str(upstream.follow[1])]
    if upstream.uds:
        argv += ["--upstream-uds", upstream.uds]
    if network is not None:
        argv += ["--network", f"{network.pid}:{network.started}"]
    for f in fields(Limits):
        argv += ["--" + f.name.replace("_", "-"), str(getattr(limits, f.name))]
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**server_environment(), "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1",
           KEYS_VARIABLE: str(keys_path), INTERNAL_KEY_VARIABLE: internal_key}
    marker = secrets.token_hex(8)
    with open(log_path, "ab") as log:
        popen, owner_fd = guard.spawn(argv, marker=marker, env=env, log_file=log, owner=not detached)
    info = guard.proc_info(popen.pid)
    where = upstream.where if network is None else f"{upstream.where} in private network {network.pid}"
    record = GatewayRecord(guard_pid=popen.pid, guard_started=info.start_time if info else -1, host=host, port=port,
                           upstream=where, keys_path=str(keys_path), log_path=str(log_path),
                           owner_pid=None if detached else os.getpid(), started_at=time.time(),
                           server_id=marker, uid=os.getuid())
    gateway = GatewayProcess(record, popen, owner_fd)
    progress(f"Starting the gateway on {gateway.url} -> {where} ({len(table.active)} student key(s)); "
             f"log: {short_path(log_path)}")
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if READY_LINE in text:
            break
        if popen.poll() is not None or time.monotonic() > deadline:
            why = "exited" if popen.poll() is not None else f"was not ready after {timeout:.0f} s"
            gateway.stop()
            raise GatewayError(f"the gateway {why}; its log ({log_path}):\n{gateway.tail(15)}")
        time.sleep(0.1)
    try:
        healthy = requests.get(gateway.url + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        healthy = False
    registry.save(record)
    progress(f"  gateway ready: {gateway.url} serves {upstream.name!r}" + ("" if healthy else
             " (its /health says vLLM is not answering yet)"))
    return gateway


# --------------------------------------------------------------------------- a whole class server
@dataclass(frozen=True)
class ClassServer:
    """vLLM on loopback with an internal key, and the gateway in front of it."""

    server: object                  # helpers.server.lifecycle.VLLMServer
    gateway: GatewayProcess
    keys_path: Path
    students: int                   # active keys when it started


def class_internal_key(folder: Path) -> str:
    """vLLM's key behind the gateway: made once, kept private (mode 600), reused by the next start."""
    path = folder / "internal.key"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def start_class_server(settings=None, *, detached: bool = True) -> ClassServer:
    """What ``./tutorial.sh serve`` does when ``host`` is a network address: vLLM on a Unix socket
    only this user can reach (``private=True``; it also runs in a network namespace of its own
    where the machine allows, ``network.isolated``), with the internal key (``get_server``: a running one with the same settings is reused), then
    the gateway on ``settings.host`` (port ``settings.port`` or 8080) with the students' keys file.
    Refused (``NoStudentKeysError``) while that file holds no active key: nobody could get in,
    and a server on the network without keys is what this package never starts."""
    from dataclasses import replace

    from ..errors import NoStudentKeysError, TutorialError
    from ..server.lifecycle import get_server
    from ..settings import load_settings

    settings = settings or load_settings()
    keys_path = keyfile.default_keys_path()
    try:
        active = keyfile.read_table(keys_path).active
    except TutorialError as err:
        active, why = {}, str(err)
    else:
        why = "it holds no active key"
    if not active:
        raise NoStudentKeysError(
            f"refused: a server on {settings.host} is reachable from other machines, so every request needs a "
            f"student's key, and there is none ({keys_path}: {why}). Make them first:\n"
            f"  ./tutorial.sh keys create --url http://<this machine's address>:{settings.port or 8080} --count 30")
    key = class_internal_key(keyfile.default_dir())
    # vLLM on a Unix socket in a private folder: other users of this machine cannot reach it
    # (on 127.0.0.1 they could: its key guards /v1, /v2 and /inference only;
    # /invocations answers without one)
    server = get_server(replace(settings, host="127.0.0.1", port=None, api_key=key), detached=detached,
                        private=True)
    gateway = start_gateway(server, host=settings.host, port=settings.port or 8080, keys_path=keys_path,
                            internal_key=key, detached=detached)
    return ClassServer(server, gateway, keys_path, len(active))
