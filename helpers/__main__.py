"""``python -m helpers start|status|stop|troubleshooting`` (``./tutorial.sh serve|status|stop``).

``start`` launches a detached server for the current settings (or says that one already runs):
it runs until ``stop``, outside any kernel, and every notebook's ``get_server()`` with the same
model and name reuses it (a class on one machine, or a long session). ``status`` lists the
running servers; ``stop`` ends them all, whoever started them. ``troubleshooting`` prints
``docs/troubleshooting.md``, generated from the start-up diagnosis rules.
"""

from __future__ import annotations

import argparse
import sys

from .server import registry as server_registry
from .server.lifecycle import VLLMServer, get_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers")
    parser.add_argument("action", choices=["start", "status", "stop", "troubleshooting"])
    args = parser.parse_args(argv)
    if args.action == "troubleshooting":
        from .server.diagnosis import troubleshooting_markdown
        print(troubleshooting_markdown(), end="")
    elif args.action == "start":
        server = get_server(detached=True)
        print(f"detached server ready: {server.base_url} (stop it with: ./tutorial.sh stop)")
    elif args.action == "status":
        records = server_registry.live()
        for record in records:
            print(record.describe())
        if not records:
            print("no tutorial server is running")
    else:
        for record in server_registry.live():
            print(VLLMServer.attach(record).stop(force=True), "-", record.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
