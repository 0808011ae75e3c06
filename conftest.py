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
from pathlib import Path

import pytest

# Before anything imports helpers (they read these when called, kernels when they start).
os.environ.setdefault("TUTORIAL_STATE_DIR", tempfile.mkdtemp(prefix="vllm-tutorial-tests-"))
os.environ["PYTHONUNBUFFERED"] = "1"
# Under pytest-xdist (./tutorial.sh test runs two workers) each worker is a run of its own: its
# own registry (a worker's clean-up at its end must not end the other's servers), its own
# shared server. The workers inherit the state folder chosen above; each takes a subfolder.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER and not os.environ.get("TESTS_WORKER_STATE"):
    os.environ["TESTS_WORKER_STATE"] = "1"
    os.environ["TUTORIAL_STATE_DIR"] = os.path.join(os.environ["TUTORIAL_STATE_DIR"], WORKER)
    os.makedirs(os.environ["TUTORIAL_STATE_DIR"], exist_ok=True)
    # vLLM's CPU engine binds its compute to cores ("auto": all but one, so core 0 of two):
    # the two workers' servers would share core 0 and leave core 1 to the API servers. One core
    # each instead; servers inherit the variable (VLLM_CPU_OMP_THREADS_BIND, vLLM 0.32's CPU build).
    if (os.cpu_count() or 1) >= 2 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(int(WORKER.removeprefix("gw")) % os.cpu_count())

# What a notebook needs. Servers of its own: lessons 01, 05, 06, 08, 09, and 07 where two GPUs are,
# and the solutions of 01 (on a GPU the shared server is stopped before them). No server at all:
# lesson 00 and the solutions of 00, 06 and 07. Every other notebook uses the run's shared server.
OWN_SERVER = re.compile(r"^0[156789]_\w+(?<!_solutions)\.ipynb$|^01_\w+_solutions\.ipynb$")
NO_SERVER = re.compile(r"^00_|^0[679]_\w+_solutions\.ipynb$")

_shared: dict = {}
ROOT = Path(__file__).resolve().parent


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


# Under pytest-xdist (--dist loadgroup, which ./tutorial.sh test passes), what runs on one
# worker, in order: each file (a notebook's cells share one kernel; a test file's module
# fixtures are made once), except that a lesson that holds several servers goes with its
# browser run, so that the two never run side by side (notebook 05 holds two CPU servers of its
# own at a time, ~3 GB each, besides the worker's shared one), and lessons 05 and 09 (two
# replicas) go in one group, so that their four servers never run at once. The grouping is by node id, in a
# scheduler of our own: xdist 3.8's `xdist_group` marks group nothing under pytest 9.2 (its
# worker appends the group to `item._nodeid`, which pytest 9 no longer reports; seen here).
HEAVY = {"05": "lesson-05", "08": "lesson-08", "09": "lesson-05"}     # lesson -> its group
# The groups that take longest (measured: tests/README.md), started first.
LONGEST_FIRST = ["lesson-05", "lesson-08", "tests/browser/test_lab.py", "tests/classroom/test_netns.py",
                 "tests/server/test_lifecycle.py", "notebooks/01_launch_server.ipynb"]
BROWSER_PARAM = re.compile(r"test_lab\.py::test_notebook_runs_in_jupyterlab\[(\d\d)_")


def xdist_group(nodeid: str) -> str:
    browser = BROWSER_PARAM.search(nodeid)
    if browser and browser.group(1) in HEAVY:
        return HEAVY[browser.group(1)]
    file = nodeid.split("::", 1)[0]
    lesson = re.match(r"notebooks/(\d\d)_", file)
    if lesson and lesson.group(1) in HEAVY:
        return HEAVY[lesson.group(1)]
    return file


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return ByGroup(config, log)


class LongestFirst:
    """On an xdist worker, the longest groups first in the collection (the order in which the
    scheduler hands groups out), so that no worker is left with a long one at the end. Last of
    the collection hooks: after the markers (and `-m`) and tests/browser/conftest.py's order."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        def rank(item) -> int:
            group = xdist_group(item.nodeid)
            return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)
        items.sort(key=rank)                  # stable: a notebook's cells keep their order


def pytest_configure(config):
    if WORKER:
        config.pluginmanager.register(LongestFirst(), "tutorial-longest-first")


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
    # notebook 09's last section needs a user namespace; where the machine forbids one, its cells
    # print why instead, so they are skipped with that reason (the cleanup cell still runs)
    if "needs-user-namespaces" in getattr(getattr(item, "cell", None), "metadata", {}).get("tags", ()):
        from helpers.classroom.network import user_namespaces_refused

        refused = user_namespaces_refused()
        if refused:
            pytest.skip(f"this machine forbids user namespaces: {refused}")
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
