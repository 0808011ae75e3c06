"""JupyterLab in headless Chromium, driven by Playwright: what ``test_lab.py`` needs.

* ``JupyterLab``: a private JupyterLab on 127.0.0.1 (a free port, a random token passed in the
  environment, its own settings, workspace, runtime and config folders, so nothing of the
  user's is read or written) serving a scratch folder that holds *copies* of the notebooks:
  running them in the page never touches the repository's files. Notebook settings make every
  cell live in the page (``windowingMode: none``) and turn autosave off. ``expose_app_in_browser``
  lets the test run JupyterLab's own commands (``notebook:run-all-cells``) and read which cell
  is which (ids, tags), while everything checked is read from what the page shows.
* ``chromium_executable``/``launch_chromium``: Debian's Chromium, started with the flags this
  closed network needs (no background connections) and a fresh profile (Playwright's own).
* ``PROBE``: one JavaScript function that reads the page: for each code cell its prompt
  (``[*]`` while queued or running), the errors it shows, its plain outputs, its images, and
  every live stream view in it, found by structure (see ``STREAM_VIEWS``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from support import wait_for

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

LAB_SETTINGS = {
    # every cell in the page (JupyterLab 4 otherwise may leave cells out of view unrendered)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # never write the scratch copies back while the test runs them
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # no news or update check over a network that has none
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def chromium_executable() -> str | None:
    """``$TESTS_CHROMIUM``, else Debian's ``chromium`` (``chromium-browser`` elsewhere)."""
    named = os.environ.get("TESTS_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=chromium_executable(), headless=True,
                                      args=CHROMIUM_ARGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """``jupyter lab`` on a scratch folder; ``stop()`` shuts its kernels down and leaves no
    process behind (kernels, and with them any server a kernel started, end too)."""

    def __init__(self, root: Path, *, pythonpath: Path):
        self.root = root
        self.port = free_port()
        self.token = os.urandom(16).hex()
        self.url = f"http://127.0.0.1:{self.port}"
        home = Path(tempfile.mkdtemp(prefix="jupyterlab-home-"))
        self._home = home
        for relative, value in LAB_SETTINGS.items():
            path = home / "settings" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = dict(os.environ, JUPYTER_TOKEN=self.token, JUPYTER_CONFIG_DIR=str(home / "config"),
                   JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
                   # kernels import the helpers of the tree under test
                   PYTHONPATH=os.pathsep.join([str(pythonpath)] + [p for p in
                                              os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}",
                   "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}",
                   "--ServerApp.port_retries=0", "--LabApp.expose_app_in_browser=True",
                   f"--LabApp.user_settings_dir={home / 'settings'}",
                   f"--LabApp.workspaces_dir={home / 'workspaces'}"]
        if os.geteuid() == 0:                     # CI runs as root; a learner does not
            command.append("--allow-root")
        self.log_path = home / "jupyterlab.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=root)
        if not wait_for(self._answers, 90, interval=0.3):
            self.stop()
            raise RuntimeError(f"JupyterLab did not answer on {self.url} in 90 s; log:\n{self.log_tail()}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({self.process.returncode}); log:\n{self.log_tail()}")
        try:
            return self.api("get", "status").ok
        except requests.RequestException:
            return False

    def api(self, method: str, path: str) -> requests.Response:
        return requests.request(method, f"{self.url}/api/{path}", timeout=10,
                                headers={"Authorization": f"token {self.token}"})

    def page_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def shutdown_kernels(self) -> None:
        try:
            for kernel in self.api("get", "kernels").json():
                self.api("delete", f"kernels/{kernel['id']}")
        except requests.RequestException:
            pass

    def stop(self) -> list[str]:
        """End JupyterLab and everything it started; return what had to be killed."""
        self.shutdown_kernels()
        try:
            family = [self.process.pid] + [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        killed = []
        for pid in family:                        # only what this JupyterLab started
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    killed.append(f"{pid} {' '.join(proc.cmdline())[:100]}")
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        shutil.rmtree(self._home, ignore_errors=True)
        return killed


# How a live stream view (helpers/stream/widget.py, ``StreamView``) looks in the page: an
# ipywidgets VBox whose last child is an HBox holding a Button (Stop) and an HTML (the status
# line), and whose child before it is the body: an Output (Markdown answers) or an HTML (plain
# text). The grid of ``show_streams`` is a VBox too, but its body is a GridBox (of such views).
# The view carries the CSS class ``tutorial-stream-view`` (helpers/stream/widget.py): where it is
# present only marked boxes are looked at; the structure is checked either way.
STREAM_VIEWS = r"""
function streamViews(root) {
  const found = [];
  const marked = root.querySelectorAll('.tutorial-stream-view');
  const boxes = marked.length ? marked : root.querySelectorAll('.widget-vbox');
  for (const box of boxes) {
    const kids = Array.from(box.children).filter(k => k.classList.contains('jupyter-widgets'));
    const bar = kids[kids.length - 1], body = kids[kids.length - 2];
    if (!bar || !body || !bar.classList.contains('widget-hbox')) continue;
    const button = bar.querySelector(':scope > button.widget-button');
    const status = bar.querySelector(':scope > .widget-html');
    if (!button || !status) continue;
    if (!body.classList.contains('widget-output') && !body.classList.contains('widget-html')) continue;
    const content = body.classList.contains('widget-html')
      ? (body.querySelector('.widget-html-content') || body) : body;
    found.push({box, body, content, status, button,
                title: kids.length > 2 ? kids[0].textContent.trim() : ''});
  }
  return found;
}
"""

# What a view says of itself (helpers/stream/widget.py, ``StreamView._record``): the text's
# length at each live redraw and at the end, written into its status line when it ends. And what
# the page itself showed while the view was live (its Stop button enabled): every state of its
# body, recorded by a MutationObserver that ``RUN_ALL`` installs, so nothing depends on a poll
# catching the page mid-stream.
VIEW_RECORD = r"""
function recordOf(v) {
  const span = v.status.querySelector('.tutorial-stream-record');
  if (!span) return null;
  const live = span.dataset.live ? span.dataset.live.split(',').map(Number) : [];
  return {live, final: Number(span.dataset.final)};
}
function seenLive(v) {
  const seen = window.__tutorialSeen;
  return (seen && v.box.dataset.probeId !== undefined && seen[v.box.dataset.probeId]) || [];
}
"""

PROBE = r"""(markStop) => {
""" + STREAM_VIEWS + VIEW_RECORD + r"""
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const text = n => (n ? n.textContent : '');
  // JupyterLab 4 renders an error output as text with the mime type of stderr: which rendered
  // output is an error is told by the output's model (the same order as the rendered ones).
  // A traceback written to stderr (a thread's failure), in the cell or in an Output widget in
  // it, counts too; other stderr (warnings, logs) does not.
  const TRACEBACK = 'Traceback (most recent call last)';
  const errorsShown = cell => {
    const found = [];
    const outputs = cell.model.outputs, shown = cell.outputArea ? cell.outputArea.widgets : [];
    for (let i = 0; i < outputs.length; i++) {
      const output = outputs.get(i).toJSON();
      const rendered = shown[i] ? text(shown[i].node) : '';
      if (output.output_type === 'error') found.push({ename: output.ename, text: rendered});
      else if (output.output_type === 'stream' && output.name === 'stderr' && rendered.includes(TRACEBACK))
        found.push({ename: 'stderr', text: rendered});
    }
    for (const nested of cell.node.querySelectorAll(
        '.jupyter-widgets .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
      if (text(nested).includes(TRACEBACK)) found.push({ename: 'in a widget', text: text(nested)});
    return found;
  };
  const run = window.__tutorialRun;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const node = cell.node;
    const outputs = Array.from(node.querySelectorAll(
      '.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output'));
    const views = streamViews(node).map((v, i) => {
      if (markStop && i === 0) v.button.setAttribute('data-stop-probe', '1');
      return {title: v.title, body: text(v.content), status: text(v.status).trim(),
              hidden: v.body.style.display === 'none', disabled: v.button.disabled,
              record: recordOf(v), seenLive: seenLive(v)};
    });
    cells.push({
      index, id: cell.model.id, tags: cell.model.getMetadata('tags') || [],
      source: cell.model.sharedModel.getSource(),
      prompt: text(node.querySelector('.jp-InputArea-prompt')).trim(),
      errors: errorsShown(cell),
      plain: outputs.filter(o => !o.querySelector('.jupyter-widgets')).map(text).join('\n'),
      widgetErrors: text(node).includes('Error displaying widget'),
      images: Array.from(node.querySelectorAll('.jp-OutputArea-output img')).map(
        img => ({loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth,
                 height: img.naturalHeight})),
      views,
    });
  });
  return {kernel: kernel ? kernel.status : 'none', cells,
          run: run ? {sent: run.sent, replied: run.replied, pending: run.pending.size} : null};
}
"""

READY = r"""() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session
                 && panel.sessionContext.session.kernel;
  return !!(kernel && kernel.status === 'idle' && panel.content && panel.content.widgets.length);
}"""

# Run All Cells, counting the execute requests the page sends and the replies it gets: the run
# is over when every request has its reply. (Neither the prompts nor the kernel's status tell
# that alone: when a cell tagged raises-exception fails, JupyterLab 4 takes the [*] off every
# cell still queued although the kernel goes on running them, and a widget message served on a
# kernel subshell reports the kernel idle while the main shell is still busy.)
RUN_ALL = r"""() => {
  const app = window.jupyterapp;
  const kernel = app.shell.currentWidget.sessionContext.session.kernel;
  const run = window.__tutorialRun = {sent: 0, replied: 0, pending: new Set()};
""" + STREAM_VIEWS + r"""
  // Every live state of every stream view, as the page renders it: the body's text length
  // whenever anything in the notebook changes while the view's Stop button is enabled.
  const seen = window.__tutorialSeen = {};
  let nextId = 0;
  const notebook = app.shell.currentWidget.content.node;
  new MutationObserver(() => {
    for (const v of streamViews(notebook)) {
      if (v.box.dataset.probeId === undefined) v.box.dataset.probeId = String(nextId++);
      const length = v.content.textContent.trim().length;
      if (v.button.disabled || !length || v.status.querySelector('.tutorial-stream-record')) continue;
      const states = seen[v.box.dataset.probeId] = seen[v.box.dataset.probeId] || [];
      if (states[states.length - 1] !== length) states.push(length);
    }
  }).observe(notebook, {childList: true, subtree: true, characterData: true, attributes: true,
                        attributeFilter: ['disabled']});
  kernel.anyMessage.connect((_, args) => {
    const msg = args.msg;
    if (args.direction === 'send' && msg.header.msg_type === 'execute_request') {
      run.sent++;
      run.pending.add(msg.header.msg_id);
    } else if (args.direction === 'recv' && msg.header.msg_type === 'execute_reply'
               && run.pending.delete(msg.parent_header.msg_id)) {
      run.replied++;
    }
  });
  app.shell.collapseLeft();
  app.shell.collapseRight();
  app.commands.execute('notebook:run-all-cells');   // not awaited: it settles at the first error
}"""

SHUT_DOWN = r"""async () => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (panel && panel.sessionContext) await panel.sessionContext.shutdown();
}"""

# The notebook's scrolling box: scrolled to the top (``top``), or the height the page needs to
# show the whole notebook at once (for one full screenshot).
NOTEBOOK_SCROLL = r"""(top) => {
  const panel = window.jupyterapp.shell.currentWidget;
  const scroller = panel.content.node.querySelector('.jp-WindowedPanel-outer') || panel.content.node;
  if (top) { scroller.scrollTop = 0; return 0; }
  const gap = window.innerHeight - scroller.getBoundingClientRect().bottom;
  return Math.ceil(scroller.getBoundingClientRect().top + scroller.scrollHeight + gap + 20);
}"""


def running(cell: dict) -> bool:
    return "*" in cell["prompt"]


def ran(cell: dict) -> bool:
    return any(ch.isdigit() for ch in cell["prompt"])


def busy(snapshot: dict | None) -> bool:
    """Run All still going: an execute request without its reply (or none sent yet)."""
    run = snapshot and snapshot["run"]
    return not run or run["sent"] == 0 or run["pending"] > 0


def save_full_screenshot(page, path: Path, max_height: int = 15000) -> int:
    """Grow the viewport to the notebook's height (JupyterLab scrolls inside a fixed-size
    page), screenshot it whole, and put the viewport back; return the height used."""
    size = page.viewport_size
    height = max(size["height"], min(max_height, page.evaluate(NOTEBOOK_SCROLL, False)))
    page.set_viewport_size({"width": size["width"], "height": height})
    try:
        time.sleep(0.5)                               # let JupyterLab lay the panel out again
        page.evaluate(NOTEBOOK_SCROLL, True)
        time.sleep(0.2)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(size)
    return height
