"""The kernel's interrupt (■) stops a live stream, for front ends whose widget clicks cannot reach a
busy kernel (no comms on subshells: Notebook 7, VS Code, older JupyterLab).

In a real Jupyter kernel, a cell streams a long answer from real vLLM through ``show_stream``;
the test interrupts the kernel (SIGINT, as the ■ button does) while text is arriving, then
checks that the request ends at the server (running count back to 0), the cell ends without a
traceback (``StreamView.pump`` catches the KeyboardInterrupt), and the partial answer is kept:
the cell's plain output holds the text received so far, the same the live view last showed, and
says it was stopped.
"""

from __future__ import annotations

import html
import queue
import re
import time
from pathlib import Path

import pytest

from helpers.logs.metrics import running_requests, wait_for_running
from support import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
MAX_TOKENS = 2000

CELL = """import sys; sys.path.insert(0, {root!r})
from helpers.stream.chat import requests_chat
from helpers.stream.widget import show_stream
stream = show_stream(requests_chat({url!r}, 'Write a very long essay about the history of forests.', model={name!r},
                                   max_tokens={max_tokens}, ignore_eos=True, temperature=0),
                     title='interrupt me', markdown={markdown})
"""


class CellWatcher:
    """Everything the kernel publishes for one cell: the live view's redraws (comm updates),
    its plain outputs, errors, and whether the cell is over (status idle)."""

    def __init__(self, kc, msg_id: str):
        self.kc, self.msg_id = kc, msg_id
        self.bodies: list[str] = []         # the live view's text, redraw by redraw
        self.statuses: list[str] = []       # its status line
        self.plain: list[str] = []          # ordinary output: printed text and Markdown shown
        self.errors: list[dict] = []
        self.stderr: list[str] = []
        self.idle = False

    def read(self, until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                return True
            try:
                msg = self.kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            self._take(msg)
        return until()

    def _take(self, msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_msg":                        # a widget's state, sent while the cell runs
            state = content.get("data", {}).get("state", {})
            if "outputs" in state:                    # the Markdown body (an Output widget)
                texts = [o.get("data", {}).get("text/plain", "") for o in state["outputs"]]
                self.bodies.append("".join(texts))
            value = state.get("value")
            if isinstance(value, str):
                if value.startswith("<pre"):            # the plain-text body (an HTML widget)
                    self.bodies.append(html.unescape(re.sub(r"<[^>]+>", "", value)))
                elif not value.startswith("<b>"):       # not the title: the status line
                    self.statuses.append(html.unescape(value))
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return
        if kind == "stream":
            (self.stderr if content["name"] == "stderr" else self.plain).append(content["text"])
        elif kind in ("display_data", "execute_result"):
            data = content["data"]
            if "application/vnd.jupyter.widget-view+json" not in data:
                self.plain.append(data.get("text/markdown") or data.get("text/plain", ""))
        elif kind == "error":
            self.errors.append(content)
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle = True


@pytest.mark.parametrize("markdown", [True, False], ids=["markdown", "plain"])
def test_kernel_interrupt_stops_the_stream_and_keeps_the_answer(shared_server, markdown):
    from jupyter_client.manager import start_new_kernel

    assert wait_for(lambda: running_requests(shared_server.url) == 0, 30), "the shared server is busy"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        msg_id = kc.execute(CELL.format(root=str(ROOT), url=shared_server.base_url, name=shared_server.name,
                                        max_tokens=MAX_TOKENS, markdown=markdown))
        cell = CellWatcher(kc, msg_id)
        # streaming: the server runs the request and the view has been redrawn with growing text
        grown = lambda: len({b for b in cell.bodies if b.strip()}) >= 5  # noqa: E731
        assert cell.read(grown, timeout=120), f"no growing text; redraws: {cell.bodies[-3:]}"
        assert running_requests(shared_server.url) == 1
        assert not cell.idle

        km.interrupt_kernel()                                   # what the ■ button sends
        interrupted = time.monotonic()
        assert cell.read(lambda: cell.idle, timeout=30), "the cell still ran 30 s after the interrupt"
        ended = time.monotonic() - interrupted
        settled = wait_for_running(shared_server.url, 0, timeout=10)   # raises when it does not
        reply = kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=10)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    assert ended < 10, f"the cell went on for {ended:.1f} s after the interrupt"
    # no traceback wall: the interrupt is caught, the cell ends as a normal one
    assert not cell.errors, cell.errors[0]["ename"] + "\n" + "\n".join(cell.errors[0]["traceback"])
    assert "KeyboardInterrupt" not in "".join(cell.stderr) and "Traceback" not in "".join(cell.stderr)
    assert reply["content"]["status"] == "ok", reply["content"]
    # the partial answer is kept: the last text the view showed, left as plain output, marked stopped
    answer = cell.bodies[-1]
    assert answer.strip(), "the view ended empty"
    shown = "".join(cell.plain)
    assert answer.strip() in shown, f"the plain output lacks the text received: {shown[:300]!r}"
    assert "[stopped by you ·" in shown and "tokens" in shown, shown[-300:]
    tokens = int(re.search(r"(\d+) tokens", shown.split("[stopped by you", 1)[1])[1])
    assert 0 < tokens < MAX_TOKENS
    print(f"interrupted after {len(cell.bodies)} redraws: cell over {ended:.2f} s after the interrupt, server "
          f"running no request {settled:.2f} s later; kept {tokens} tokens: {answer[:60]!r}...; {shown[-90:]!r}")
    assert cell.statuses and cell.statuses[-1].startswith("stopped by you")
