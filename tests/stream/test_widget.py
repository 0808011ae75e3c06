"""The live view: batched redraws, the final answer left as plain output, and a Stop button
that cancels the request on the real server while the cell is still running.

The first tests drive ``StreamView`` with a synthetic stream of chunks at a fixed rate (what is
measured is the widget, not a server). The last ones use real vLLM: Stop drops the server's
running-request count to 0, and in a real Jupyter kernel a click sent the way JupyterLab 4.4+
sends it (on a kernel subshell) stops a cell that is busy streaming.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from helpers.stream.chat import ChatStream, requests_chat
from helpers.logs.metrics import running_requests, wait_for_running
from helpers.stream.widget import StreamGrid, StreamView
from support import wait_for

ROOT = Path(__file__).resolve().parent.parent


def synthetic_chunks(count: int, per_second: float):
    """OpenAI-style chat chunks at a steady rate, then a finish chunk."""
    gap = 1.0 / per_second
    next_at = time.perf_counter()
    for i in range(count):
        next_at += gap
        while time.perf_counter() < next_at:
            pass
        yield {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}


def synthetic_stream(count: int, per_second: float) -> tuple[ChatStream, list[bool]]:
    closed: list[bool] = []
    return ChatStream(synthetic_chunks(count, per_second), lambda: closed.append(True), "synthetic"), closed


class FakeClock:
    """The widget's clock, moved on only by the stream: a loaded machine cannot change it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


def test_redraws_are_batched_not_one_per_token(monkeypatch):
    from helpers.stream import widget

    clock = FakeClock()
    monkeypatch.setattr(widget, "time", clock)

    def one_second_at_2000_tokens_per_second():
        for i in range(2000):
            clock.now += 1 / 2000
            yield {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
        yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}

    stream = ChatStream(one_second_at_2000_tokens_per_second(), lambda: None, "synthetic")
    view = StreamView(interval=0.1)
    view.pump(stream)
    assert stream.stats.pieces == 2000
    assert 10 <= view.updates <= 12                              # one per 0.1 s, plus the last one
    assert view.body.outputs[0]["data"]["text/markdown"] == stream.text
    assert stream.text.endswith("t1999 ")


def test_plain_text_view_escapes_html():
    chunks = [{"choices": [{"index": 0, "delta": {"content": "<b>not bold</b> & more"}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    view = StreamView(markdown=False)
    view.pump(ChatStream(iter(chunks), lambda: None, "synthetic"))
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; more" in view.body.value
    assert "finished: stop" in view.status.value


def test_stop_from_another_thread_cancels_and_closes():
    stream, closed = synthetic_stream(100_000, per_second=1000)
    view = StreamView()
    threading.Timer(0.3, view.stop_button.click).start()        # what a click runs
    started = time.monotonic()
    view.pump(stream)
    assert time.monotonic() - started < 5
    assert stream.cancelled and closed
    assert 0 < stream.stats.pieces < 100_000
    assert view.stop_button.disabled
    assert "stopped by you" in view.status.value


def test_final_answer_is_left_as_plain_output(capsys):
    stream, _ = synthetic_stream(5, per_second=1000)
    view = StreamView(markdown=False)
    view.pump(stream)
    view.leave_plain_output()
    out = capsys.readouterr().out
    assert "t0 t1 t2 t3 t4" in out and "finished: length" in out
    assert view.body.layout.display == "none"


def test_grid_reads_streams_at_once_and_sums_tokens():
    grid = StreamGrid(["a", "b", "c"])
    started = time.perf_counter()
    streams = grid.run([lambda: synthetic_stream(200, per_second=400)[0] for _ in range(3)])
    wall = time.perf_counter() - started
    assert [s.stats.pieces for s in streams] == [200, 200, 200]
    assert wall < 1.2                                          # ~0.5 s each, run side by side
    assert "3 streams at once: 600 tokens" in grid.summary.value


# ---------------------------------------------------------------------- real vLLM
LONG = dict(max_tokens=2000, ignore_eos=True, temperature=0)


def test_stop_makes_the_server_abort_the_request(shared_server):
    view = StreamView()
    stream = requests_chat(shared_server, "Write a long essay about rivers.", **LONG)
    threading.Timer(1.0, view.stop_button.click).start()
    view.pump(stream)
    assert stream.cancelled and stream.stats.tokens < 2000
    assert wait_for_running(shared_server.url, 0, timeout=10) < 10
    assert running_requests(shared_server.url) == 0


def _iopub_until(kc, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
            if predicate("".join(seen)):
                return "".join(seen)
        if msg["msg_type"] == "error":
            raise AssertionError("the cell failed: " + "\n".join(msg["content"]["traceback"]))
    raise AssertionError(f"no expected output within {timeout} s; got {''.join(seen)!r}")


def test_stop_button_works_while_the_cell_is_busy_in_a_real_kernel(shared_server):
    """JupyterLab 4.4+ sends widget messages on a kernel subshell (ipykernel 7): a click reaches
    the button's handler while the main shell is still running the streaming cell."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
        reply = kc.control_channel.get_msg(timeout=10)
        assert reply["content"]["status"] == "ok", reply["content"]
        subshell = reply["content"]["subshell_id"]

        code = (
            "import sys; sys.path.insert(0, %r)\n"
            "from IPython.display import display\n"
            "from helpers.stream.chat import requests_chat\n"
            "from helpers.stream.widget import StreamView\n"
            "view = StreamView('test')\n"
            "display(view.widget)\n"
            "print('BUTTON', view.stop_button.model_id, flush=True)\n"
            "stream = view.pump(requests_chat(%r, 'Write a long essay about mountains.', model=%r,"
            " max_tokens=2000, ignore_eos=True, temperature=0))\n"
            "print('RESULT', stream.cancelled, stream.stats.tokens, flush=True)\n"
        ) % (str(ROOT), shared_server.base_url, shared_server.name)
        execute_id = kc.execute(code)
        text = _iopub_until(kc, lambda t: "BUTTON" in t, timeout=60)
        button = text.split("BUTTON", 1)[1].split()[0]
        assert wait_for(lambda: running_requests(shared_server.url) == 1, timeout=30)

        click = kc.session.msg("comm_msg", {"comm_id": button,
                                            "data": {"method": "custom", "content": {"event": "click"}}})
        click["header"]["subshell_id"] = subshell
        clicked = time.monotonic()
        kc.shell_channel.send(click)

        text = _iopub_until(kc, lambda t: "RESULT" in t, timeout=30)
        stopped_after = time.monotonic() - clicked
        cancelled, tokens = text.split("RESULT", 1)[1].split()[:2]
        assert cancelled == "True" and int(tokens) < 2000
        assert stopped_after < 5, f"the cell went on for {stopped_after:.1f} s after the click"
        while True:                                            # the cell itself ends normally
            msg = kc.get_shell_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == execute_id:
                assert msg["content"]["status"] == "ok"
                break
        wait_for_running(shared_server.url, 0, timeout=10)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
