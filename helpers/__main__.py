"""``python -m helpers start|status|stop|troubleshooting`` (``./tutorial.sh serve|status|stop``).

``start`` launches a detached server for the current settings (or says that one already runs):
it runs until ``stop``, outside any kernel, and every notebook's ``get_server()`` with the same
model and name reuses it. With ``host`` set to a network address (a class, ``TUTORIAL_HOST=0.0.0.0``)
it starts a **class server**: vLLM stays on 127.0.0.1 with an internal key, and the gateway
(``helpers.classroom``) listens on that address, passing only what a class needs and only with a
student's key; without student keys (``./tutorial.sh keys create ...``) it refuses to start.
``status`` lists the running servers and gateways; ``stop`` ends them all, whoever started them.
``troubleshooting`` prints ``docs/troubleshooting.md``, generated from the start-up diagnosis.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import replace
from pathlib import Path

from .errors import TutorialError
from .server import registry as server_registry
from .server.lifecycle import LOOPBACK, VLLMServer, get_server
from .settings import load_settings


def internal_key(folder: Path) -> str:
    """vLLM's key behind the gateway: made once, kept private, reused by the next ``serve``."""
    path = folder / "internal.key"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def start_class_server(settings) -> int:
    from .classroom import keys as keyfile
    from .classroom.service import start_gateway

    keys_path = keyfile.default_keys_path()
    try:
        active = keyfile.read_table(keys_path).active
    except TutorialError as err:
        active, why = {}, str(err)
    else:
        why = "it holds no active key"
    if not active:
        print(f"refused: a server on {settings.host} is reachable from other machines, so every request needs a "
              f"student's key, and there is none ({keys_path}: {why}). Make them first:\n"
              f"  ./tutorial.sh keys create --url http://<this machine's address>:{settings.port or 8080} --count 30",
              file=sys.stderr)
        return 2
    key = internal_key(keyfile.default_dir())
    server = get_server(replace(settings, host="127.0.0.1", port=None, api_key=key), detached=True)
    gateway = start_gateway(server, host=settings.host, port=settings.port or 8080, keys_path=keys_path,
                            internal_key=key, detached=True)
    print(f"class server ready: students reach http://<this machine's address>:{gateway.record.port} "
          f"({len(active)} key(s) in {keys_path}); each student runs the line made for them:\n"
          f"  TUTORIAL_SERVER_URL=http://<address>:{gateway.record.port} TUTORIAL_API_KEY=<their key> "
          f"TUTORIAL_SERVED_MODEL_NAME={server.name} TUTORIAL_FLAVOR=client ./tutorial.sh lab\n"
          f"stop it with: ./tutorial.sh stop")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers")
    parser.add_argument("action", choices=["start", "status", "stop", "troubleshooting"])
    args = parser.parse_args(argv)
    if args.action == "troubleshooting":
        from .server.diagnosis import troubleshooting_markdown
        print(troubleshooting_markdown(), end="")
    elif args.action == "start":
        settings = load_settings()
        if settings.host not in LOOPBACK:
            return start_class_server(settings)
        server = get_server(settings, detached=True)
        print(f"detached server ready: {server.base_url} (stop it with: ./tutorial.sh stop)")
    elif args.action == "status":
        from .classroom.service import gateways

        records = server_registry.live()           # a look: ends nothing
        for record in records:
            print(record.describe())
        for record in server_registry.stale():
            print(f"stale record: {record.describe()} (its guard is gone; ./tutorial.sh stop cleans it up)")
        for gateway in gateways():
            print(f"gateway {gateway.url} -> {gateway.record.upstream}")
        if not records:
            print("no tutorial server is running")
    else:
        server_registry.prune()                   # stopping is the explicit clean-up
        for record in server_registry.live():
            print(VLLMServer.attach(record).stop(force=True), "-", record.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
