"""The walkthrough as a learner sees it: every notebook run in JupyterLab, in headless Chromium.

For each notebook in ``notebooks/`` (a copy, in a scratch folder): open it, Run All Cells, wait
until every cell's execution has its reply (bounded: ``TESTS_BROWSER_TIMEOUT``, 1500 s), and
check what the page shows:

* every code cell ran (a number in its prompt), and no cell shows an error, except cells tagged
  ``raises-exception``, which show exactly one, naming the error saved in the notebook;
* no "Error displaying widget"; every image in an output is loaded (the plots of 04 and 08 are
  there as images; 05, plots only, is left to nbval: ``NOT_IN_THE_PAGE``);
* every live stream view (``helpers.stream.widget``; found by its structure, not by cell
  number, so the notebooks' text may change) was seen growing while its cell ran, and ends with
  a statistics line, its answer left in the cell as plain output.

A full screenshot of each notebook's end state goes to ``$TESTS_ARTIFACTS/browser`` (default
``.ci/artifacts/browser``). A separate scratch notebook checks the Stop button: clicked in the
page while the cell streams 1,500 tokens, the cell ends within seconds and the server runs no
request. Notebooks 02-04 and the Stop check use the run's shared server (``conftest.py``); 01
and 05 start their own, as their lessons do. In a whole run these tests come last
(``tests/browser/conftest.py``).

Needs Debian's ``chromium`` (``.ci/run`` installs it) and ``playwright`` (requirements); skipped,
with the reason, where either is missing. Playwright drives that Chromium directly
(``executable_path``): it never downloads a browser.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from browser_lab import (PROBE, READY, RUN_ALL, SHUT_DOWN, JupyterLab, busy, chromium_executable,
                         launch_chromium, ran, running, save_full_screenshot)
from support import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
OWN_SERVER = re.compile(r"^0[015678]_")             # as in conftest.py: these need no shared server
# Those that start their own servers (or none) first: until one needs it the run's shared server
# is not started, so a run of this file alone has one vLLM server at a time.
STREAM_CALLS = ("show_stream", "StreamView", "show_streams", "StreamGrid")


def _in_the_page(path: Path) -> bool:
    """A notebook whose output lives in the page: it calls the live stream view, or it shows
    images (plots). The others print text, which nbval already compares cell by cell."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    return (any(k in c.source for c in code for k in STREAM_CALLS)
            or any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])))


# Notebook 05 shows plots only, as 04 and 08 do, and nbval runs every cell of it; its four preset
# servers run again in the page would lengthen the suite's longest group by about 230 s (2026-12-06).
NOT_IN_THE_PAGE = {"05_quiet_logs_and_metrics.ipynb"}
NOTEBOOKS = sorted((p.name for p in (ROOT / "notebooks").glob("*.ipynb")
                    if _in_the_page(p) and p.name not in NOT_IN_THE_PAGE),
                   key=lambda name: (not OWN_SERVER.match(name), name))
RUN_TIMEOUT = float(os.environ.get("TESTS_BROWSER_TIMEOUT", "1500"))   # one notebook, Run All
POLL = 0.25
STATS = re.compile(r"(finished: \S+|stopped by you) · .*\d+ tokens \(\w+\) in [\d.]+ s")

pytestmark = [pytest.mark.browser, pytest.mark.vllm]


def _missing() -> str | None:
    if chromium_executable() is None:
        return ("no Chromium: `apt-get install chromium` (.ci/run does, as root) or point "
                "TESTS_CHROMIUM at one")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (requirements/common.txt pins it)"
    return None


if _missing():
    if os.environ.get("TESTS_REQUIRE_BROWSER") == "1":   # .ci/run: it installed the browser
        pytest.fail(f"browser tests required (TESTS_REQUIRE_BROWSER=1), but: {_missing()}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_missing()}", allow_module_level=True)

from playwright import sync_api  # noqa: E402

STOP_NOTEBOOK = "stop_check.ipynb"
STOP_CELLS = [
    "from helpers import get_server\n"
    "from helpers.stream.chat import requests_chat\n"
    "from helpers.stream.widget import show_stream\n"
    "server = get_server()\n"
    "stream = show_stream(requests_chat(server, 'Write a very long essay about the history of tea.',\n"
    "                                   max_tokens=1500, ignore_eos=True, temperature=0), title='press Stop')",
    "print('AFTER', stream.cancelled, stream.stats.tokens)",
]
REPORT: list[str] = []


def norm(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def artifacts(pytestconfig):
    base = os.environ.get("TESTS_ARTIFACTS")
    folder = (Path(base) if base else ROOT / ".ci" / "artifacts") / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n[browser] screenshots: {folder}")
        for line in REPORT:
            print(f"[browser] {line}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    for name in NOTEBOOKS:                     # copies: the page never writes the repository's files
        shutil.copy(ROOT / "notebooks" / name, root / name)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in STOP_CELLS], metadata={
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}})
    nbformat.write(nb, root / STOP_NOTEBOOK)
    server = JupyterLab(root, pythonpath=ROOT)
    yield server
    killed = server.stop()
    if killed:
        REPORT.append(f"JupyterLab left processes that had to be killed: {killed}")


@pytest.fixture(scope="module")
def browser():
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.console_errors = []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()


# --------------------------------------------------------------------------- driving
def open_and_run_all(page, lab: JupyterLab, name: str) -> None:
    page.goto(lab.page_url(name))
    page.wait_for_function(READY, timeout=180_000, polling=500)
    page.evaluate(RUN_ALL)


def probe(page, mark_stop: bool = False) -> dict | None:
    return page.evaluate(PROBE, mark_stop)


def watch(page, timeout: float) -> tuple[dict, dict]:
    """Poll the page until Run All is over; return the last snapshot and, for every stream view
    seen (keyed by cell id and its place in the cell), its samples in order."""
    started = time.monotonic()
    samples: dict[tuple[str, int], list[dict]] = {}
    quiet_polls, snapshot = 0, None
    while time.monotonic() - started < timeout:
        snapshot = probe(page)
        if snapshot is not None:
            for cell in snapshot["cells"]:
                for i, view in enumerate(cell["views"]):
                    samples.setdefault((cell["id"], i), []).append(view)
        if busy(snapshot):
            quiet_polls = 0
        else:
            quiet_polls += 1
            if quiet_polls >= 2:
                return snapshot, samples
        time.sleep(POLL)
    waiting = [c["index"] for c in (snapshot or {"cells": []})["cells"] if not ran(c)]
    raise AssertionError(f"Run All did not finish within {timeout:.0f} s ({snapshot and snapshot['run']}); "
                         f"cells without a result yet: {waiting}")


def cell_ended(snapshot: dict) -> bool:
    """The first cell is over, as the page knows it: its reply came, its prompt has a number."""
    return snapshot["run"]["replied"] >= 1 and ran(snapshot["cells"][0])


def shut_down_kernel(page) -> None:
    page.evaluate(SHUT_DOWN)


def kernels_servers() -> list[str]:
    """Servers running that this pytest process does not own (the shared one it does): after a
    notebook's kernel shut down, there should be none."""
    from helpers.server import registry

    return [r.describe() for r in registry.live(log=lambda _m: None) if r.owner_pid != os.getpid()]


# --------------------------------------------------------------------------- checks
def check_cells(snapshot: dict, saved: nbformat.NotebookNode) -> list[str]:
    saved_cells = {c.get("id"): c for c in saved.cells if c.cell_type == "code"}
    problems = []
    for cell in snapshot["cells"]:
        where = f"cell {cell['index']} ({cell['id']})"
        source = saved_cells.get(cell["id"], {}).get("source", "x")
        if source.strip() and not ran(cell):
            problems.append(f"{where} did not run: prompt {cell['prompt']!r}")
        if "raises-exception" in cell["tags"]:
            expected = [o["ename"] for o in saved_cells.get(cell["id"], {}).get("outputs", [])
                        if o.get("output_type") == "error"]
            shown = [e["ename"] for e in cell["errors"]]
            if len(shown) != 1 or (expected and shown != expected):
                problems.append(f"{where} is tagged raises-exception: expected one error "
                                f"{expected or ''}, the page shows {shown}")
            elif expected[0] not in cell["errors"][0]["text"]:
                problems.append(f"{where}: the traceback shown does not name {expected[0]}")
        elif cell["errors"]:
            problems.append(f"{where} shows an error ({cell['errors'][0]['ename']}):\n"
                            f"{cell['errors'][0]['text'][-1500:]}")
        if cell["widgetErrors"]:
            problems.append(f"{where} shows 'Error displaying widget'")
        broken = [img for img in cell["images"] if not img["loaded"]]
        if broken:
            problems.append(f"{where} has {len(broken)} image(s) that did not load")
    return problems


def check_stream_views(snapshot: dict, samples: dict) -> tuple[list[str], list[str]]:
    """Every view grew while its cell ran and ended with its statistics, its answer left as plain
    output in the cell. Returns problems, and one line per view for the report.

    Nothing here depends on how fast the model streams or on when the page was polled:
    * how the view grew is its own record (its text's length at every live redraw, then at the
      end; ``StreamView._record``), written into the page when it ends;
    * what the page showed while the view was live is every state a MutationObserver saw
      (``browser_lab.RUN_ALL``), not a sample.
    The view redraws at its first piece of text and then at most every 0.1 s of the stream's own
    clock, so a stream of more than one piece has at least one live redraw shorter than its end,
    however fast it is. That the page showed a live state is required where the view redrew
    live at least three times (its stream lasted 0.2 s or more after the first piece): a faster
    stream can end before the page has rendered its first piece, which is no fault."""
    problems, lines = [], []
    cells = {c["id"]: c for c in snapshot["cells"]}
    for (cell_id, i), seen in samples.items():
        cell = cells.get(cell_id)
        final = seen[-1]
        where = f"stream view {i} of cell {cell['index'] if cell else '?'} ({final['title'] or 'untitled'})"
        record = final.get("record")
        page_live = final.get("seenLive") or []
        answer = norm(final["body"])
        if record is None:
            problems.append(f"{where}: the view wrote no record of its redraws (it did not end?): "
                            f"{final['status']!r}")
            continue
        live, length = record["live"], record["final"]
        lines.append(f"{where}: {len(live)} live redraw(s) at {live[:3]}{'...' if len(live) > 3 else ''} "
                     f"chars, {length} at the end; the page showed {len(page_live)} live state(s); "
                     f"ended: {final['status']!r}")
        if answer and not live:
            problems.append(f"{where}: the view never redrew before the end (only the final text)")
        if any(b <= a for a, b in zip(live, live[1:])):
            problems.append(f"{where}: its live redraws did not grow: {live}")
        if live and live[-1] > length:
            problems.append(f"{where}: the final text ({length}) is shorter than the last live one {live}")
        if len(live) >= 3 and not page_live:
            problems.append(f"{where}: the view redrew {len(live)} times while live, but the page never "
                            f"showed its text while its Stop button was enabled")
        if not STATS.search(final["status"]):
            problems.append(f"{where}: no statistics line at the end: {final['status']!r}")
        if not answer:
            problems.append(f"{where}: no answer at the end")
        elif cell is None or answer not in norm(cell["plain"]):
            problems.append(f"{where}: the answer is not left as plain output in the cell")
    return problems, lines


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(name, lab, page, artifacts, request):
    if not OWN_SERVER.match(name):
        request.getfixturevalue("shared_server")
    else:
        from helpers.server import hardware, registry

        ours = [r for r in registry.live(log=lambda _m: None) if r.owner_pid == os.getpid()]
        if ours and hardware.gpus() and not name.startswith("00_"):
            pytest.skip("on a GPU the run's shared server (already started) holds the card that this "
                        "notebook's own servers need; run it alone: pytest tests/browser -k " + name[:2])
    saved = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    streams = any(k in c.source for c in saved.cells if c.cell_type == "code" for k in STREAM_CALLS)
    saved_images = sum("image/png" in o.get("data", {}) for c in saved.cells if c.cell_type == "code"
                       for o in c.get("outputs", []))
    started = time.monotonic()
    open_and_run_all(page, lab, name)
    try:
        snapshot, samples = watch(page, RUN_TIMEOUT)
    finally:
        shot = artifacts / f"{Path(name).stem}.png"
        try:
            save_full_screenshot(page, shot)
        finally:
            shut_down_kernel(page)
    took = time.monotonic() - started

    problems = check_cells(snapshot, saved)
    view_problems, lines = check_stream_views(snapshot, samples)
    problems += view_problems
    if streams and not samples:
        problems.append("the notebook calls the live stream view, but none was seen in the page")
    images = sum(img["loaded"] for c in snapshot["cells"] for img in c["images"])
    if saved_images and images < saved_images:
        problems.append(f"{images} plot image(s) shown; the saved notebook has {saved_images}")
    # the kernel is gone, and with it any server it started; the shared one stays
    left = wait_for(lambda: not kernels_servers(), 60, interval=0.5) or kernels_servers()
    if left is not True:
        problems.append(f"servers left after the kernel shut down: {left}")
    REPORT.append(f"{name}: {took:.0f} s, {len(snapshot['cells'])} code cells, {len(samples)} stream "
                  f"view(s), {images} image(s); screenshot {shot.name}")
    REPORT.extend(f"  {line}" for line in lines)
    assert not problems, f"{name} in JupyterLab:\n" + "\n".join(problems)


def test_stop_button_in_jupyterlab(lab, page, artifacts, shared_server):
    """Click Stop in the page while a cell streams 1,500 tokens: the cell ends within seconds,
    the page says "stopped by you", and vLLM runs no request."""
    from helpers.logs.metrics import running_requests

    assert wait_for(lambda: running_requests(shared_server.url) == 0, 30), "the shared server is busy"
    open_and_run_all(page, lab, STOP_NOTEBOOK)
    try:
        lengths: list[int] = []

        def streaming() -> bool:      # the page has shown the text grow (its own record), still live
            cell = probe(page, mark_stop=True)["cells"][0]
            if running(cell) and cell["views"] and not cell["views"][0]["disabled"]:
                lengths[:] = cell["views"][0]["seenLive"]
            return len(lengths) >= 2

        assert wait_for(streaming, 120, interval=POLL), f"no growing text in the view: {lengths}"
        assert running_requests(shared_server.url) == 1
        save_full_screenshot(page, artifacts / "stop_before.png")
        clicked = time.monotonic()
        page.click('[data-stop-probe="1"]', timeout=10_000)
        shown = wait_for(lambda: "stopped by you" in probe(page)["cells"][0]["views"][0]["status"], 30,
                         interval=0.1) and time.monotonic() - clicked
        ended = wait_for(lambda: cell_ended(probe(page)), 30, interval=0.1) and time.monotonic() - clicked
        aborted = wait_for(lambda: running_requests(shared_server.url) == 0, 30,
                           interval=0.1) and time.monotonic() - clicked
        assert wait_for(lambda: not busy(probe(page)), 30, interval=POLL)
        save_full_screenshot(page, artifacts / "stop_after.png")
        final = probe(page)
    finally:
        shut_down_kernel(page)
    REPORT.append(f"Stop clicked while streaming (text at {lengths[-1]} chars): 'stopped by you' after "
                  f"{shown or -1:.1f} s, cell ended after {ended or -1:.1f} s, server running no request "
                  f"after {aborted or -1:.1f} s")
    assert shown and shown < 10, "the page did not say 'stopped by you' within 10 s of the click"
    assert ended and ended < 10, "the cell was still running 10 s after the click"
    assert aborted and aborted < 10, "vLLM still ran the request 10 s after the click"
    first, second = final["cells"]
    assert not first["errors"] and not second["errors"], first["errors"] + second["errors"]
    assert "[stopped by you" in first["plain"] and norm(first["views"][0]["body"]) in norm(first["plain"])
    tokens = int(second["plain"].split()[2])
    assert second["plain"].split()[:2] == ["AFTER", "True"] and 0 < tokens < 1500, second["plain"]
