"""By hand, in a real browser: press the live view's Stop button while its cell is busy.

What ``test_stream_widget.py`` shows at the kernel's level (a click sent on a subshell), this
shows end to end: JupyterLab in headless Chromium runs a cell that streams 1,500 tokens from
real vLLM, the script clicks **Stop** in the page while the cell is still running ``[*]``,
and checks that the page says "stopped by you", the cell ends, and the server runs no request.

Not part of ``pytest`` (it needs a browser that the set-up does not install)::

    apt-get install chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python tests/browser_stop_check.py [--screenshots DIR]

It starts its own JupyterLab (127.0.0.1, a free port, a random token) on a scratch notebook
and its own registry folder; shutting JupyterLab down ends the kernel, and with it the server
the kernel started (``helpers.process_guard``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import server_registry  # noqa: E402
from helpers.server import free_port  # noqa: E402
from helpers.logs.metrics import running_requests  # noqa: E402
from support import wait_for  # noqa: E402  (tests/ is this script's folder, so on sys.path)

CELL = f"""import sys; sys.path.insert(0, {str(ROOT)!r})
from helpers import get_server
from helpers.stream.chat import requests_chat
from helpers.stream.widget import show_stream
server = get_server()
stream = show_stream(requests_chat(server, "Write a very long essay about the history of tea.", max_tokens=1500,
                                   ignore_eos=True, temperature=0), title="press Stop")"""


def running_now() -> int:
    live = server_registry.live()
    if not live:
        return 0
    try:
        return running_requests(f"http://{live[0].host}:{live[0].port}")
    except requests.RequestException:
        return 0


def wait(predicate, timeout: float, what: str):
    value = wait_for(predicate, timeout, interval=0.25)
    if not value:
        raise AssertionError(f"{what}: not within {timeout:.0f} s")
    return value


def check(lab: str, token: str, shots: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    page = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        driver.get(f"{lab}/lab/tree/stop_check.ipynb?token={token}")
        wait(lambda: "Idle" in page(), 120, "the kernel to start")
        cell = wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Cell .cm-content"), 30, "the cell")[0]
        cell.click()
        cell.send_keys(Keys.SHIFT, Keys.ENTER)
        print("running the cell (it starts a server if none is running: about a minute on 2 cores)")
        wait(lambda: running_now() == 1, 300, "the stream to start")
        stop = wait(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button.jupyter-button")
                             if b.text.strip() == "Stop"], 30, "the Stop button")[0]
        time.sleep(2)                                           # let some text arrive
        driver.save_screenshot(str(shots / "before_stop.png"))
        assert "[*]" in page(), "the cell should still be running"
        clicked = time.monotonic()
        stop.click()
        wait(lambda: "stopped by you" in page(), 30, "'stopped by you' in the page")
        shown = time.monotonic() - clicked
        wait(lambda: running_now() == 0, 10, "the server to abort the request")
        aborted = time.monotonic() - clicked
        wait(lambda: "[*]" not in page(), 30, "the cell to end")
        driver.save_screenshot(str(shots / "after_stop.png"))
        print(f"Stop clicked while the cell ran: 'stopped by you' after {shown:.1f} s, "
              f"the server running no request after {aborted:.1f} s; screenshots in {shots}")
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--screenshots", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="vllm-tutorial-browser-"))
    state = scratch / "state"
    os.environ["TUTORIAL_STATE_DIR"] = str(state)      # this check's own servers only
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)], metadata={
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}})
    nbformat.write(nb, scratch / "stop_check.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    command = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", f"--port={port}",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={token}", f"--notebook-dir={scratch}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    lab = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _answers(f"{url}/api/status?token={token}"), 60, "JupyterLab to start")
        args.screenshots.mkdir(parents=True, exist_ok=True)
        check(url, token, args.screenshots)
    finally:
        lab.terminate()
        lab.wait(30)
        deadline = time.monotonic() + 30                     # the kernel's server ends with it
        while server_registry.live() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [r.describe() for r in server_registry.live()]
        print("servers left:", "; ".join(left) or "none")
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if left else 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
