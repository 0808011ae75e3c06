"""Session-wide test set-up for the unit tests (tests/) and the notebooks (notebooks/, via nbval).

* Servers started during the run are recorded in a private state folder, so the suite neither
  reuses nor disturbs a server a learner has running. Notebook kernels inherit it.
* One shared vLLM server, started the first time a notebook (or a test asking for the
  ``shared_server`` fixture) needs one, serves every notebook that does not launch its own.
  It belongs to the pytest process (so it ends with it, even if pytest is killed), and the
  notebooks' kernels find it through ``get_server()``, exactly as they find a running server
  in JupyterLab.
* At the end the shared server is stopped, and the run fails if any server process is left.
"""

from __future__ import annotations

import os
import re
import tempfile

import pytest

# Before anything imports helpers (they read these when called, kernels when they start).
os.environ.setdefault("VLLM_TUTORIAL_STATE_DIR", tempfile.mkdtemp(prefix="vllm-tutorial-tests-"))
os.environ["PYTHONUNBUFFERED"] = "1"

# Notebooks that need no shared server: 00 checks the machine, 01 and 05 launch their own.
OWN_SERVER = re.compile(r"^0[015]_")

_shared: dict = {}


def _start_shared_server():
    from helpers.server import VLLMServer
    from helpers.server_config import from_settings

    print("\n[conftest] starting the shared vLLM server for the notebooks ...", flush=True)
    _shared["server"] = VLLMServer(from_settings()).start()


@pytest.fixture(scope="session")
def shared_server():
    """The run's one shared vLLM server (the same the notebooks use), started on first need."""
    if "server" not in _shared:
        _start_shared_server()
    return _shared["server"]


def pytest_runtest_setup(item):
    path = getattr(item, "path", None)
    if path is None or path.suffix != ".ipynb":
        return
    if not OWN_SERVER.match(path.name):
        if "server" not in _shared:
            _start_shared_server()
    elif "server" in _shared:
        # 01 and 05 start servers of their own: on a GPU the shared one would hold the card's
        # memory and theirs would fail to start, so it is stopped (and restarted when needed).
        print(f"\n[conftest] stopping the shared server before {path.name}: {_shared.pop('server').stop()}",
              flush=True)


def pytest_sessionfinish(session, exitstatus):
    from helpers import server_registry
    from helpers.process_guard import group_members

    server = _shared.pop("server", None)
    if server is not None:
        print(f"\n[conftest] stopping the shared server: {server.stop()}", flush=True)
    left = [(r.describe(), group_members(r.guard_pid)) for r in server_registry.load_all()]
    left = [(d, pids) for d, pids in left if pids]
    if left:
        for describe, pids in left:
            print(f"[conftest] LEFT RUNNING: {describe}: pids {pids}")
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
