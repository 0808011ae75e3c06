"""The browser tests run last in a session (after the notebooks under nbval).

They use the run's shared server (``conftest.py`` at the root starts it on first need), and once
it runs it stays up until the session ends. Collected first (``tests/browser`` sorts before
``tests/server``), they would start it before the server tests, which are cheaper to read when
they run on a quiet machine; last, they show the walkthrough in a browser once everything under it
(the helpers, then each notebook under nbval) has passed.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    ours = {id(item) for item in items if HERE in Path(str(item.path)).resolve().parents}
    if ours:
        items[:] = [i for i in items if id(i) not in ours] + [i for i in items if id(i) in ours]
