"""``python -m helpers start|status|stop|troubleshooting`` (``./tutorial.sh serve|status|stop``).

``start`` launches a detached server for the current settings (or says that one already runs):
it runs until ``stop``, outside any kernel, and every notebook's ``get_server()`` with the same
model and name reuses it. With ``host`` set to a network address (a class, ``TUTORIAL_HOST=0.0.0.0``)
it starts a **class server** (``helpers.classroom.start_class_server``): vLLM listens on a Unix
socket in a folder only this user may enter, with an internal key, and the gateway listens on
that address, passing only what a class needs and only with a student's key; without student
keys (``./tutorial.sh keys create ...``) it refuses to start.
``status`` lists the running servers and gateways; ``stop`` ends them all, whoever started them.
``troubleshooting`` prints ``docs/troubleshooting.md``, generated from the start-up diagnosis.
"""

from __future__ import annotations

import argparse
import sys

from .errors import NoStudentKeysError
from .server import registry as server_registry
from .server.lifecycle import LOOPBACK, VLLMServer, get_server
from .settings import load_settings


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
            from .classroom.service import start_class_server
            try:
                started = start_class_server(settings)
            except NoStudentKeysError as err:
                print(err, file=sys.stderr)
                return 2
            port = started.gateway.record.port
            print(f"class server ready: students reach http://<this machine's address>:{port} "
                  f"({started.students} key(s) in {started.keys_path}); each student runs the line made for them:\n"
                  f"  TUTORIAL_SERVER_URL=http://<address>:{port} TUTORIAL_API_KEY=<their key> "
                  f"TUTORIAL_SERVED_MODEL_NAME={started.server.name} TUTORIAL_FLAVOR=client ./tutorial.sh lab\n"
                  f"stop it with: ./tutorial.sh stop")
            return 0
        server = get_server(settings, detached=True)
        print(f"detached server ready: {server.base_url} (stop it with: ./tutorial.sh stop)")
    elif args.action == "status":
        records = server_registry.live()           # a look: ends nothing, removes no record
        for record in records:
            print(record.describe())
        for record in server_registry.live(kind=server_registry.GATEWAY):
            print(record.describe())
        for kind in (server_registry.SERVER, server_registry.GATEWAY):
            for record in server_registry.stale(kind=kind):
                print(f"stale record: {record.describe()} (its guard is gone; ./tutorial.sh stop cleans it up)")
        if not records:
            print("no tutorial server is running")
    else:
        from .classroom.service import gateways, prune_gateways

        for gateway in gateways():                # students' open streams get an error event first
            gateway.stop()
            print(f"stopped gateway {gateway.url}")
        server_registry.prune()                   # stopping is the explicit clean-up
        for record in server_registry.live():
            print(VLLMServer.attach(record).stop(force=True), "-", record.describe())
        prune_gateways()
    return 0


if __name__ == "__main__":
    sys.exit(main())
