"""Tests for helpers/loadtest.py: N simulated users against a server, bounded, every failure named.

* The numbers on hand-made requests: nearest-rank percentiles (the textbook example), counts of
  completed / failed / cancelled requests, errors by kind, total, per-user and per-stream
  tokens/s, the summary, JSON and tables, the plot.
* What each failure is called (``HTTP <status>``, ``timeout``, ``connection``, ``error event``),
  from the SDK's and the helpers' own exceptions.
* Against small local servers on 127.0.0.1 (no vLLM): nothing listening (every request a
  ``connection`` error, the run returns), a server that never answers (``timeout``), and one that
  streams forever: the hard time limit cancels the requests and the server sees each connection
  close; a run started inside a running event loop (a notebook cell) runs in its own thread, and
  interrupting a real Jupyter kernel mid-load cancels it and closes every stream.
* **Real vLLM** (the suite's shared server): 1 and 4 users, counts and tokens consistent with
  the server's usage, the follow-up carrying the answer (its prompt is longer), ``ignore_eos``
  giving exactly ``max_tokens``; the time limit makes the server abort what was running (its
  running-request count back to 0); a wrong model name gives a 404 for every request and the
  run still returns.

Every wait is bounded; no test asserts a speed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import openai
import pytest

from helpers.endpoint import Endpoint
from helpers.errors import (IncompleteEventError, StreamErrorEvent, StreamHTTPError, StreamInterruptedError,
                            TutorialError)
from helpers.loadtest import (LoadResult, LoadTestError, RequestResult, error_kind, percentile, plot_sweep,
                              run_load, run_load_async, sweep_table)
from support import wait_for


# --------------------------------------------------------------------------- percentiles
@pytest.mark.parametrize("p, expected", [(0, 15), (5, 15), (30, 20), (40, 20), (50, 35), (75, 40), (100, 50)])
def test_nearest_rank_percentile_of_the_textbook_example(p, expected):
    # The nearest-rank example on Wikipedia's "Percentile" page: 15, 20, 35, 40, 50.
    assert percentile([50, 15, 40, 20, 35], p) == expected


def test_a_percentile_is_always_a_value_measured():
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 10.0]
    assert percentile(values, 95) == 10.0          # ceil(9.5) = 10th value, no interpolation
    assert percentile(values, 90) == 0.9
    assert percentile(values, 50) == 0.5
    assert percentile([7.0], 95) == 7.0


def test_no_values_give_no_percentile_and_a_bad_p_is_refused():
    assert percentile([], 50) is None
    with pytest.raises(LoadTestError):
        percentile([1, 2], 101)


# --------------------------------------------------------------------------- aggregation
def req(user, turn, *, sent=0.0, total=1.0, ttft=0.1, tokens=10, decode=None, error=None, cancelled=False):
    return RequestResult(user=user, turn=turn, sent_at=sent, total_s=total, ttft_s=ttft,
                         completion_tokens=tokens, prompt_tokens=20, pieces=tokens or 0,
                         decode_tokens_per_s=decode, finish_reason=None if error or cancelled else "length",
                         error=error, message=error and f"{error} happened", cancelled=cancelled)


def made_up(**kwargs) -> LoadResult:
    requests = (
        req(0, 0, sent=0.0, total=2.0, ttft=0.5, tokens=20, decode=12.0),
        req(0, 1, sent=2.0, total=3.0, ttft=1.0, tokens=40, decode=15.0),
        req(1, 0, sent=0.0, total=1.0, ttft=0.2, tokens=10, decode=10.0),
        req(1, 1, sent=1.0, total=0.5, ttft=None, tokens=None, error="HTTP 500"),
        req(2, 0, sent=0.0, total=0.1, ttft=None, tokens=None, error="HTTP 500"),
        req(2, 1, sent=0.1, total=0.2, ttft=None, tokens=None, error="connection"),
        req(3, 0, sent=0.0, total=5.0, ttft=4.0, tokens=None, cancelled=True),
    )
    values = dict(url="http://127.0.0.1:1", model="m", users=4, turns=2, max_tokens=64, duration_limit_s=5.0,
                  ignore_eos=True, started_at="2026-11-28T00:00:00+00:00", wall_s=5.0, hit_time_limit=True,
                  requests=requests, client_lag_p95_s=0.002, client_lag_max_s=0.01)
    values.update(kwargs)
    return LoadResult(**values)


def test_counts_and_errors_by_kind():
    result = made_up()
    assert (result.planned, result.sent, len(result.completed), result.failed, result.cancelled) == (8, 7, 3, 3, 1)
    assert result.errors == {"HTTP 500": 2, "connection": 1}
    assert list(result.errors) == ["HTTP 500", "connection"]        # most frequent first


def test_tokens_per_s_total_per_user_and_per_stream():
    result = made_up()
    assert result.completion_tokens == 70                    # completed requests only
    assert result.tokens_from_usage
    assert result.tokens_per_s == pytest.approx(70 / 5.0)
    # user 0: 60 tokens over 2 + 3 s waiting; user 1: 10 over 1 s (its failed request not
    # counted); users 2 and 3 completed nothing.
    assert result.per_user() == {0: pytest.approx(12.0), 1: pytest.approx(10.0), 2: None, 3: None}
    assert result.per_user_tokens_per_s == pytest.approx(11.0)
    assert result.decode_tokens_per_s_p50 == 12.0             # median of 10, 12, 15


def test_ttft_percentiles_are_over_completed_requests():
    result = made_up()
    assert result.ttft_p50 == 0.5                             # of 0.2, 0.5, 1.0 (the cancelled 4.0 left out)
    assert result.ttft_p95 == 1.0
    assert result.ttft(0) == 0.2


def test_tokens_counted_from_pieces_are_said_to_be():
    piece_counted = RequestResult(user=0, turn=0, sent_at=0, total_s=1, ttft_s=0.1, completion_tokens=None, pieces=7)
    result = made_up(requests=(piece_counted,), users=1, turns=1, wall_s=1.0)
    assert result.completion_tokens == 7
    assert not result.tokens_from_usage
    assert "some counted as pieces" in result.table()


def test_nothing_completed_gives_no_figures_not_a_crash():
    result = made_up(requests=(req(0, 0, tokens=None, ttft=None, error="HTTP 404"),), users=1, turns=1)
    assert result.tokens_per_s is None and result.ttft_p50 is None and result.per_user_tokens_per_s is None
    assert "HTTP 404: 1" in result.table()
    assert "HTTP 404: 1" in sweep_table([result])


def test_summary_json_and_tables():
    result = made_up()
    data = json.loads(json.dumps(result.as_dict()))
    assert data["completed"] == 3 and data["failed"] == 3 and data["cancelled"] == 1
    assert data["errors"] == {"HTTP 500": 2, "connection": 1}
    assert data["ttft_p95_s"] == 1.0 and data["tokens_per_s"] == pytest.approx(14.0)
    assert data["percentiles"].startswith("nearest rank")
    assert len(data["requests"]) == 7 and data["requests"][3]["error"] == "HTTP 500"
    assert "requests" not in result.as_dict(requests=False)
    table = result.table()
    assert "7 sent of 8, 3 completed, 3 failed" in table
    assert "hit at 5 s, 1 cancelled" in table
    assert "p50 0.50 s, p95 1.00 s" in table
    rows = sweep_table([result, made_up(users=8)]).splitlines()
    assert rows[0].split()[:3] == ["users", "done", "failed"]
    assert rows[1].split()[:6] == ["4", "3", "3", "1", "0.500", "1.000"]
    assert rows[2].split()[0] == "8"
    assert "4 users: 3/7 requests completed" in str(result)


def test_plot_sweep_draws_both_panels():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot_sweep([made_up(users=1), made_up(users=8), made_up(users=32)], title="test")
    try:
        titles = [ax.get_title() for ax in figure.axes]
        assert "time to first token" in titles and "throughput" in titles
        ttft_axis = figure.axes[titles.index("time to first token")]
        assert [line.get_label() for line in ttft_axis.get_lines()] == ["p50", "p95"]
        assert list(ttft_axis.get_lines()[1].get_ydata()) == [1.0, 1.0, 1.0]
    finally:
        plt.close(figure)
    with pytest.raises(LoadTestError):
        plot_sweep([])


# --------------------------------------------------------------------------- error kinds
def _response(status):
    return SimpleNamespace(status_code=status, headers={}, request=SimpleNamespace(method="POST", url="http://x"))


def test_error_kinds_are_named():
    request = SimpleNamespace(method="POST", url="http://x")
    not_found = openai.NotFoundError("no such model", response=_response(404), body=None)
    assert error_kind(not_found) == "HTTP 404"
    assert error_kind(StreamHTTPError(503, "busy")) == "HTTP 503"
    assert error_kind(openai.APITimeoutError(request=request)) == "timeout"
    assert error_kind(openai.APIConnectionError(request=request)) == "connection"
    assert error_kind(StreamInterruptedError("cut")) == "connection"
    assert error_kind(IncompleteEventError("cut mid-event")) == "connection"
    assert error_kind(ConnectionRefusedError()) == "connection"
    assert error_kind(StreamErrorEvent("engine died", type="InternalServerError", code=500)) == "error event"
    assert error_kind(json.JSONDecodeError("bad", "x", 0)) == "bad response"
    assert error_kind(KeyError("x")) == "KeyError"
    try:                                 # the kind is found down the chain of causes
        try:
            raise TimeoutError("read")
        except TimeoutError as inner:
            raise openai.APIConnectionError(request=request) from inner
    except openai.APIConnectionError as outer:
        assert error_kind(outer) == "timeout"


def test_a_load_that_cannot_run_is_refused_up_front():
    endpoint = Endpoint("http://127.0.0.1:1", "m")
    for bad in (dict(users=0), dict(users=2, turns=0), dict(users=2, max_tokens=0), dict(users=2, duration_limit=0),
                dict(users=2, reader="fast"), dict(users=2, prompts=[]), dict(users=2, think_time=-1)):
        with pytest.raises(LoadTestError) as caught:
            run_load(endpoint, **bad)
        assert isinstance(caught.value, TutorialError) and isinstance(caught.value, ValueError)


# --------------------------------------------------------------------------- local servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyServer:
    """127.0.0.1 only. ``mode``: "silent" (reads the request, never answers) or "forever"
    (a chat stream that sends a piece every 50 ms until the client goes). Records each
    connection's close as the server saw it."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.closed_by_client = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < length:
                body += conn.recv(65536)
            if self.mode == "silent":
                self._stop.wait(10)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            try:
                while not self._stop.is_set():
                    chunk = {"choices": [{"index": 0, "delta": {"content": "la "}}]}
                    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                    time.sleep(0.05)
            except OSError:            # the client closed the connection
                self.closed_by_client += 1

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.sock.close()
        assert not any(t.is_alive() for t in self._threads)


def test_nothing_listening_is_a_connection_error_for_every_request_and_the_run_returns():
    result = run_load(Endpoint(f"http://127.0.0.1:{free_port()}", "m"), 3, turns=2, max_tokens=8,
                      duration_limit=30)
    assert result.sent == 6 and result.errors == {"connection": 6} and not result.completed
    assert not result.hit_time_limit


def test_a_server_that_never_answers_is_a_timeout():
    server = TinyServer("silent")
    try:
        result = run_load(Endpoint(server.url, "m"), 2, turns=1, max_tokens=8, request_timeout=0.5,
                          duration_limit=30)
    finally:
        server.close()
    assert result.errors == {"timeout": 2}
    assert all(r.total_s < 10 for r in result.requests)


def test_the_time_limit_cancels_and_closes_every_stream():
    server = TinyServer("forever")
    try:
        started = time.monotonic()
        result = run_load(Endpoint(server.url, "m"), 3, turns=2, max_tokens=8, duration_limit=1.0)
        took = time.monotonic() - started
        assert wait_for(lambda: server.closed_by_client == 3, timeout=10)
    finally:
        server.close()
    assert took < 10
    assert result.hit_time_limit and result.sent == 3 and result.cancelled == 3 and not result.errors
    assert all(r.pieces > 0 and r.ttft_s is not None for r in result.requests)   # they were streaming
    assert "hit at 1 s, 3 cancelled" in result.table()


def test_inside_a_running_event_loop_the_load_runs_in_its_own_thread():
    async def cell():            # what a notebook cell is: code run while an event loop runs
        asyncio.get_running_loop()
        return run_load(Endpoint(f"http://127.0.0.1:{free_port()}", "m"), 2, turns=1, duration_limit=30)

    result = asyncio.run(cell())
    assert result.errors == {"connection": 2}

    async def awaited():
        return await run_load_async(Endpoint(f"http://127.0.0.1:{free_port()}", "m"), 2, turns=1)

    assert asyncio.run(awaited()).errors == {"connection": 2}


KERNEL_CELL = r"""
import sys, time
sys.path.insert(0, "tests")
from test_loadtest import TinyServer
from helpers.endpoint import Endpoint
from helpers.loadtest import run_load
server = TinyServer("forever")
try:
    run_load(Endpoint(server.url, "m"), 3, turns=1, duration_limit=60, progress=print, progress_every=0.2)
finally:
    deadline = time.monotonic() + 10
    while server.closed_by_client < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("CLOSED", server.closed_by_client, flush=True)
    server.close()
"""


def test_interrupting_a_jupyter_kernel_cancels_the_load_and_closes_its_streams():
    import queue
    from pathlib import Path

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(Path(__file__).resolve().parent.parent))
    out, errors = [], []
    try:
        kc.execute(KERNEL_CELL)
        deadline = time.monotonic() + 60
        interrupted = False
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
                if not interrupted and "3 streaming" in "".join(out):      # the cell is busy streaming
                    km.interrupt_kernel()
                    interrupted = True
            elif msg["msg_type"] == "error":
                errors.append(msg["content"]["ename"])
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" and interrupted:
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert interrupted, "".join(out)
    assert errors == ["KeyboardInterrupt"]
    assert "CLOSED 3" in "".join(out)


# --------------------------------------------------------------------------- real vLLM
@pytest.mark.parametrize("users", [1, 4])
def test_users_against_real_vllm_counts_and_tokens_agree_with_usage(shared_server, users):
    lines = []
    result = run_load(shared_server, users, turns=2, max_tokens=8, duration_limit=240, progress=lines.append)
    assert result.sent == result.planned == users * 2, result.table()
    assert len(result.completed) == result.sent and not result.errors and not result.hit_time_limit
    assert result.tokens_from_usage
    for r in result.requests:
        assert 0 < r.ttft_s <= r.total_s
        assert 1 <= r.completion_tokens <= 8
        assert 1 <= r.pieces <= r.completion_tokens          # about one piece per token, never more
        assert r.finish_reason in ("length", "stop")
    assert result.completion_tokens == sum(r.completion_tokens for r in result.requests)
    assert result.tokens_per_s > 0 and result.ttft_p50 > 0 and result.ttft_p95 >= result.ttft_p50
    for user in range(users):                                 # the follow-up carries the answer
        first, second = sorted((r for r in result.requests if r.user == user), key=lambda r: r.turn)
        assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens
        assert second.sent_at >= first.sent_at + first.total_s - 0.01
    assert lines and "requests completed" in lines[-1]


def test_ignore_eos_gives_exactly_max_tokens_on_vllm(shared_server):
    result = run_load(shared_server, 2, turns=1, max_tokens=12, ignore_eos=True, duration_limit=240)
    assert [r.completion_tokens for r in result.requests] == [12, 12], result.table()
    assert {r.finish_reason for r in result.requests} == {"length"}


def test_the_time_limit_makes_vllm_abort_what_was_running(shared_server):
    from helpers.logs.metrics import running_requests, wait_for_running

    seen_running = []
    box = {}

    def load():
        # 1,900 tokens take a minute on two CPU cores and seconds on a GPU: the limit comes first.
        box["result"] = run_load(shared_server, 2, turns=1, max_tokens=1900, ignore_eos=True, duration_limit=2)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        seen_running.append(wait_for(lambda: running_requests(shared_server.url) >= 1, timeout=20, interval=0.2))
    finally:
        thread.join(60)
    assert not thread.is_alive()
    result = box["result"]
    assert seen_running == [True]
    assert result.hit_time_limit and result.cancelled == 2 and not result.errors, result.table()
    assert wait_for_running(shared_server.url, 0, timeout=30) >= 0      # the server aborted both


def test_a_wrong_model_name_is_a_404_for_every_request_and_the_run_returns(shared_server):
    result = run_load(shared_server, 3, turns=2, max_tokens=8, model="no-such-model", duration_limit=60)
    assert result.sent == 6 and result.errors == {"HTTP 404": 6} and not result.completed
    assert "no-such-model" in result.requests[0].message
    assert "HTTP 404: 6" in result.table()


def test_each_simulated_user_can_send_a_key_of_their_own():
    # A class gateway limits each student's streams: a class load test gives each user a key.
    from helpers.endpoint import Endpoint
    from stream.sse_fault_server import DATA, FaultServer, Reply

    chat = (DATA / "sse_vllm_chat_zh_usage.sse").read_bytes()
    with FaultServer(Reply(parts=[chat])) as server:
        result = run_load(Endpoint(server.base_url.removesuffix("/v1"), "m"), 3, turns=1, max_tokens=8,
                          api_keys=["sk-ana", "sk-bo"], duration_limit=30)
    assert len(result.completed) == 3 and not result.errors, result.table()
    keys = sorted({k.lower(): v for k, v in r.headers.items()}["authorization"] for r in server.requests)
    assert keys == ["Bearer sk-ana", "Bearer sk-ana", "Bearer sk-bo"]
