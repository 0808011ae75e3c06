"""Session-wide test set-up for the unit tests (tests/) and the notebooks (notebooks/, via nbval).

* Servers started during the run are recorded in a private state folder, so the suite neither
  reuses nor disturbs a server a learner has running. Notebook kernels inherit it.
* One shared vLLM server, started the first time a notebook (or a test asking for the
  ``shared_server`` fixture) needs one, serves every notebook that does not launch its own.
  It belongs to the pytest process (so it ends with it, even if pytest is killed), and the
  notebooks' kernels find it through ``get_server()``, exactly as they find a running server
  in JupyterLab. On a GPU it is stopped before a notebook that starts servers of its own (they
  would not find the memory it holds); on the CPU the machine's memory holds both.
* Every test that starts vLLM, or uses the shared server, carries the ``vllm`` marker (the
  notebooks too, but for 00, which starts nothing): ``pytest -m "not vllm"`` is the quick run.
* At the end the shared server is stopped, and the run fails if any server process is left.
* A student's run against a class server (``TUTORIAL_SERVER_URL`` set: the client set-up, no
  vLLM) starts no server: the notebooks connect to that one.
"""

from __future__ import annotations

import os
import re
import tempfile

import pytest

# Before anything imports helpers (they read these when called, kernels when they start).
os.environ.setdefault("TUTORIAL_STATE_DIR", tempfile.mkdtemp(prefix="vllm-tutorial-tests-"))
os.environ["PYTHONUNBUFFERED"] = "1"

# What a notebook needs. Servers of its own: lessons 01, 05, 07, and 06 where two GPUs are, and
# the solutions of 01 (on a GPU the shared server is stopped before them). No server at all:
# lesson 00 and the solutions of 00 and 06. Every other notebook uses the run's shared server.
OWN_SERVER = re.compile(r"^0[1567]_\w+(?<!_solutions)\.ipynb$|^01_\w+_solutions\.ipynb$")
NO_SERVER = re.compile(r"^00_|^06_\w+_solutions\.ipynb$")

_shared: dict = {}


def _start_shared_server():
    from helpers.server.config import from_settings
    from helpers.server.lifecycle import VLLMServer

    print("\n[conftest] starting the shared vLLM server for the notebooks ...", flush=True)
    _shared["server"] = VLLMServer(from_settings()).start()


@pytest.fixture(scope="session")
def shared_server():
    """The run's one shared vLLM server (the same the notebooks use), started on first need."""
    if "server" not in _shared:
        _start_shared_server()
    return _shared["server"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = getattr(item, "path", None)
        if path is not None and path.suffix == ".ipynb" and not NO_SERVER.match(path.name):
            item.add_marker(pytest.mark.vllm)
        elif "shared_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


def _class_student() -> bool:
    """The run is a student's, connected to a class server elsewhere: nothing starts here."""
    from helpers.settings import load_settings

    return bool(load_settings().server_url)


def pytest_runtest_setup(item):
    path = getattr(item, "path", None)
    if path is None or path.suffix != ".ipynb" or _class_student():
        return
    if NO_SERVER.match(path.name):
        return
    if not OWN_SERVER.match(path.name):
        if "server" not in _shared:
            _start_shared_server()
    elif "server" in _shared:
        from helpers.server import hardware

        if hardware.gpus():
            print(f"\n[conftest] stopping the shared server before {path.name} (it holds the GPU's "
                  f"memory): {_shared.pop('server').stop()}", flush=True)


def pytest_sessionfinish(session, exitstatus):
    from helpers.server import registry

    server = _shared.pop("server", None)
    if server is not None:
        print(f"\n[conftest] stopping the shared server: {server.stop()}", flush=True)
    for record in registry.load_all():
        pids = record.group().kill()
        if pids:
            print(f"[conftest] LEFT RUNNING, now killed: {record.describe()}: pids {pids}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
