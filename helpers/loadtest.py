"""A bounded, realistic load on an OpenAI-compatible server: N simulated users chatting at once.

What a teacher runs before a class (32 students on one server: how long until their first
token?), and what the GPU benchmark runs at 1, 8, 32 and 128 concurrent streams::

    from helpers import get_server
    from helpers.loadtest import run_load, sweep, plot_sweep, sweep_table

    server = get_server()
    result = run_load(server, users=8, turns=2, max_tokens=64)
    print(result.table())              # requests, errors by kind, TTFT p50/p95, tokens/s
    results = sweep(server, users=(1, 4, 16, 32), max_tokens=64)
    print(sweep_table(results))
    plot_sweep(results)                # TTFT p50/p95 and total tokens/s against N

Each simulated user holds one conversation: a short system prompt and a question, then
``turns - 1`` follow-ups, each sent with the whole conversation so far (the previous answer
included, as a chat client does). Every request is streamed at temperature 0 with
``stream_options={"include_usage": True}``; the token count is the server's own (the usage
chunk, whose ``choices`` list is empty), never a count of chunks.

Per request it measures: time to first token (request sent to first content piece),
completion tokens (from usage), decode speed after the first token ((tokens - 1) / (last
piece - first piece)), total time, and, for a failure, its kind: ``HTTP <status>``,
``connection`` (refused or cut), ``timeout`` (no byte for ``request_timeout`` seconds),
``error event`` (an ``{"error": ...}`` event mid-stream). A failure is counted and named, never
raised: the run always returns its ``LoadResult``.

Bounded: at most ``users * turns`` requests, and a hard ``duration_limit``. At the limit every
request still running is cancelled and its HTTP stream closed, so vLLM sees the client go and
aborts it (its running-request count drops to 0: ``helpers.logs.metrics.wait_for_running``).

The request goes through ``openai.AsyncOpenAI`` (``endpoint.async_client()``: base URL, key, no
retries, its status errors), but the streamed body is read by ``helpers.stream.sse`` and
``json.loads`` rather than the SDK's chunk objects: building those costs about 200 µs a chunk
(measured on the 2-core CI machine: about 5,000 chunks/s for the SDK's objects against about
30,000 for the same bytes read here), so at 100+ streams the SDK's own parsing, not the server,
would set the pace. ``reader="sdk"`` uses the SDK's objects instead, to see that for yourself.
``LoadResult.client_lag_p95_s`` says how late the client's event loop ran (a ticker every
10 ms): when it is large, the client, not the server, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

from .endpoint import Endpoint, as_endpoint
from .errors import (IncompleteEventError, LoadTestError, StreamErrorEvent, StreamHTTPError,
                     StreamInterruptedError)
from .stream.chat import DONE, Content, Finish, Usage, error_in, pieces_from_chunk
from .stream.sse import SSEDecoder
from .stream.stats import StreamStats

SYSTEM_PROMPT = ("You are a patient teaching assistant in a course on serving language models. "
                 "Answer clearly and briefly.")

# What students in this course ask, each with the follow-up they send after the answer.
CONVERSATIONS: tuple[tuple[str, ...], ...] = (
    ("What does vLLM's continuous batching do?", "Can you give a concrete example with two requests?"),
    ("Why does a server stream tokens instead of sending the whole answer at once?",
     "What does that change for time to first token?"),
    ("What is the KV cache in a transformer?", "Why does it limit how many requests run at once?"),
    ("What does --tensor-parallel-size 2 do?", "When would two GPUs be slower than one?"),
    ("Why would I serve a model in float16 instead of bfloat16?", "Which GPUs lack bfloat16?"),
    ("What is the difference between time to first token and tokens per second?",
     "Which one does a chat user notice more?"),
    ("How does an OpenAI-compatible API help when I switch servers?", "What does the model name in a request mean?"),
    ("What does max_model_len limit?", "What happens when a prompt is longer than that?"),
    ("Explain what an API key protects on a class server.", "Where should the key be kept?"),
    ("What is PagedAttention?", "How is it like virtual memory in an operating system?"),
    ("Why does decoding speed depend on memory bandwidth?", "Estimate it for a 7B model in float16."),
    ("What does temperature 0 mean for sampling?", "Is the output then always the same?"),
)
MORE = "Thanks. Summarise that in two sentences."   # a follow-up beyond a conversation's own

MAX_USERS = 4096
MAX_TURNS = 100
CLOSE_GRACE_S = 10.0       # after the limit, time for cancelled streams to close
LAG_TICK_S = 0.01


# --------------------------------------------------------------------------- numbers
def percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least ``p`` % of the values at
    or below it (``sorted(values)[ceil(p / 100 * n) - 1]``; ``p = 0`` gives the minimum).

    No interpolation: the answer is always one of the values measured. None when there are none.
    """
    data = sorted(values)
    if not data:
        return None
    if not 0 <= p <= 100:
        raise LoadTestError(f"a percentile lies between 0 and 100, got {p}")
    rank = max(1, math.ceil(p / 100 * len(data)))
    return data[rank - 1]


def _median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RequestResult:
    """One request of one simulated user. Times in seconds; ``sent_at`` from the run's start."""

    user: int
    turn: int
    sent_at: float
    total_s: float
    ttft_s: float | None = None               # request sent -> first content piece
    completion_tokens: int | None = None      # from usage (None: no usage chunk came)
    prompt_tokens: int | None = None
    pieces: int = 0                           # content pieces received
    decode_tokens_per_s: float | None = None  # (tokens - 1) / (last piece - first piece)
    finish_reason: str | None = None
    error: str | None = None                  # the kind: "HTTP 404", "connection", "timeout", ...
    message: str | None = None                # the error's own words
    cancelled: bool = False                   # ended by the run's time limit (not an error)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.cancelled

    @property
    def status(self) -> str:
        return "cancelled" if self.cancelled else ("ok" if self.error is None else "error")

    @property
    def tokens(self) -> int:
        """Completion tokens: the server's count where it sent one, else the pieces received."""
        return self.completion_tokens if self.completion_tokens is not None else self.pieces


@dataclass(frozen=True)
class LoadResult:
    """What one load measured. Summary figures are over **completed** requests (not failed,
    not cancelled); percentiles are nearest-rank (``percentile``).

    * ``tokens_per_s``: completion tokens of every completed request / ``wall_s``, the time
      from the first request sent to the last one ended: the server's delivered throughput.
    * ``per_user_tokens_per_s``: for each user, their completion tokens / the time they spent
      waiting on answers (the sum of their requests' total times; think time not counted),
      averaged over users: the speed one student sees, the wait for the first token included.
    * ``decode_tokens_per_s_p50``: the median over requests of the decode speed after the first
      token: how fast one stream's text grows while it is generated.
    """

    url: str
    model: str
    users: int
    turns: int
    max_tokens: int
    duration_limit_s: float
    ignore_eos: bool
    started_at: str                          # ISO 8601, UTC
    wall_s: float
    hit_time_limit: bool
    requests: tuple[RequestResult, ...]
    client_lag_p95_s: float | None = None
    client_lag_max_s: float | None = None
    reader: str = "sse"

    # ---------------------------------------------------------------- counts
    @property
    def planned(self) -> int:
        return self.users * self.turns

    @property
    def sent(self) -> int:
        return len(self.requests)

    @property
    def completed(self) -> tuple[RequestResult, ...]:
        return tuple(r for r in self.requests if r.ok)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if r.error is not None)

    @property
    def cancelled(self) -> int:
        return sum(1 for r in self.requests if r.cancelled)

    @property
    def errors(self) -> dict[str, int]:
        """Failed requests by kind, most frequent first."""
        return dict(Counter(r.error for r in self.requests if r.error is not None).most_common())

    # ---------------------------------------------------------------- figures
    @property
    def completion_tokens(self) -> int:
        return sum(r.tokens for r in self.completed)

    @property
    def tokens_from_usage(self) -> bool:
        """True when every completed request's count came from the server's usage chunk."""
        return all(r.completion_tokens is not None for r in self.completed)

    @property
    def tokens_per_s(self) -> float | None:
        return self.completion_tokens / self.wall_s if self.completed and self.wall_s > 0 else None

    def per_user(self) -> dict[int, float | None]:
        """Each user's completion tokens / time spent waiting on answers (None: nothing completed)."""
        result: dict[int, float | None] = {}
        for user in range(self.users):
            mine = [r for r in self.completed if r.user == user]
            busy = sum(r.total_s for r in mine)
            result[user] = sum(r.tokens for r in mine) / busy if mine and busy > 0 else None
        return result

    @property
    def per_user_tokens_per_s(self) -> float | None:
        speeds = [s for s in self.per_user().values() if s is not None]
        return sum(speeds) / len(speeds) if speeds else None

    def ttft(self, p: float) -> float | None:
        """Time to first token at percentile ``p`` (nearest rank) over completed requests."""
        return percentile((r.ttft_s for r in self.completed if r.ttft_s is not None), p)

    @property
    def ttft_p50(self) -> float | None:
        return self.ttft(50)

    @property
    def ttft_p95(self) -> float | None:
        return self.ttft(95)

    @property
    def decode_tokens_per_s_p50(self) -> float | None:
        return _median(r.decode_tokens_per_s for r in self.completed if r.decode_tokens_per_s is not None)

    # ---------------------------------------------------------------- views
    def summary(self) -> dict[str, Any]:
        """The figures, flat (what ``sweep_table`` and a JSON file hold)."""
        return {
            "users": self.users, "turns": self.turns, "max_tokens": self.max_tokens,
            "ignore_eos": self.ignore_eos, "planned": self.planned, "sent": self.sent,
            "completed": len(self.completed), "failed": self.failed, "cancelled": self.cancelled,
            "errors": self.errors, "hit_time_limit": self.hit_time_limit,
            "duration_limit_s": self.duration_limit_s, "wall_s": self.wall_s,
            "completion_tokens": self.completion_tokens, "tokens_from_usage": self.tokens_from_usage,
            "tokens_per_s": self.tokens_per_s, "per_user_tokens_per_s": self.per_user_tokens_per_s,
            "decode_tokens_per_s_p50": self.decode_tokens_per_s_p50,
            "ttft_p50_s": self.ttft_p50, "ttft_p95_s": self.ttft_p95,
            "client_lag_p95_s": self.client_lag_p95_s, "client_lag_max_s": self.client_lag_max_s,
            "percentiles": "nearest rank over completed requests",
        }

    def as_dict(self, requests: bool = True) -> dict[str, Any]:
        """Everything, JSON-ready; ``requests=False`` leaves out the per-request list."""
        data = {"url": self.url, "model": self.model, "started_at": self.started_at, "reader": self.reader,
                **self.summary()}
        if requests:
            data["requests"] = [asdict(r) for r in self.requests]
        return data

    def table(self) -> str:
        """A few lines a notebook prints."""
        def s(x):
            return "-" if x is None else f"{x:.2f} s"

        def r(x):
            return "-" if x is None else f"{x:,.1f}"

        limit = (f"hit at {self.duration_limit_s:g} s, {self.cancelled} cancelled" if self.hit_time_limit
                 else f"{self.duration_limit_s:g} s, not reached")
        errors = ", ".join(f"{kind}: {n}" for kind, n in self.errors.items()) or "none"
        lines = [
            f"{self.users} user(s) x {self.turns} turn(s), max {self.max_tokens} tokens"
            f"{' (ignore_eos)' if self.ignore_eos else ''}, model {self.model!r} at {self.url}",
            f"requests:     {self.sent} sent of {self.planned}, {len(self.completed)} completed, "
            f"{self.failed} failed; time limit {limit}",
            f"errors:       {errors}",
            f"first token:  p50 {s(self.ttft_p50)}, p95 {s(self.ttft_p95)} "
            f"(nearest rank over {len(self.completed)} completed)",
            f"tokens/s:     {r(self.tokens_per_s)} total, {r(self.per_user_tokens_per_s)} per user (mean), "
            f"{r(self.decode_tokens_per_s_p50)} per stream while decoding (median)",
            f"tokens:       {self.completion_tokens:,} "
            f"({'from usage' if self.tokens_from_usage else 'some counted as pieces'}) in {self.wall_s:.1f} s",
        ]
        if self.client_lag_p95_s is not None and self.client_lag_p95_s > 0.05:
            lines.append(f"note:         the client's event loop ran {self.client_lag_p95_s * 1000:.0f} ms late "
                         f"(p95): the client may have limited these figures")
        return "\n".join(lines)

    def __str__(self) -> str:
        errors = f", errors {self.errors}" if self.errors else ""
        tps = "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.1f}"
        p50 = "-" if self.ttft_p50 is None else f"{self.ttft_p50:.2f}"
        return (f"{self.users} users: {len(self.completed)}/{self.sent} requests completed, "
                f"TTFT p50 {p50} s, {tps} tokens/s{errors}")


def sweep_table(results: Sequence[LoadResult]) -> str:
    """One row per load: what a sweep (or the GPU benchmark) prints."""
    head = (f"{'users':>6}{'done':>7}{'failed':>7}{'cancel':>7}{'TTFT p50':>10}{'TTFT p95':>10}"
            f"{'total tok/s':>13}{'per user':>10}{'per stream':>12}  errors")
    lines = [head]

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for res in results:
        errors = ", ".join(f"{k}: {n}" for k, n in res.errors.items()) or "-"
        lines.append(f"{res.users:>6}{len(res.completed):>7}{res.failed:>7}{res.cancelled:>7}"
                     f"{f(res.ttft_p50, '.3f'):>10}{f(res.ttft_p95, '.3f'):>10}"
                     f"{f(res.tokens_per_s, ',.1f'):>13}{f(res.per_user_tokens_per_s, ',.1f'):>10}"
                     f"{f(res.decode_tokens_per_s_p50, ',.1f'):>12}  {errors}")
    lines.append("TTFT in seconds, nearest-rank percentiles over completed requests; per stream = "
                 "median decode tokens/s after the first token")
    return "\n".join(lines)


# --------------------------------------------------------------------------- errors
def error_kind(err: BaseException) -> str:
    """A failed request's kind: ``HTTP <status>``, ``timeout``, ``connection``, ``error event``,
    ``bad response``, or the exception's type for anything else."""
    import openai

    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, openai.APIStatusError):
            return f"HTTP {e.status_code}"
        if isinstance(e, StreamHTTPError):
            return f"HTTP {e.status}"
    for e in chain:
        if isinstance(e, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)) \
                or "Timeout" in type(e).__name__:
            return "timeout"
    for e in chain:
        if isinstance(e, StreamErrorEvent):
            return "error event"
    for e in chain:
        if isinstance(e, (openai.APIConnectionError, StreamInterruptedError, IncompleteEventError, ConnectionError,
                          OSError)) \
                or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "h11"):
            return "connection"
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        return "bad response"
    if isinstance(err, openai.APIError):   # an error the SDK read from the stream
        return "error event"
    return type(err).__name__


def _message(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- one request
class _Collector:
    """The pieces of one streamed answer: text (choice 0), finish, usage, timing."""

    def __init__(self, stats: StreamStats):
        self.stats = stats
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.saw_done = False

    def take(self, piece) -> None:
        if isinstance(piece, Content):
            self.stats.on_content()
            if piece.index == 0:
                self.parts.append(piece.text)
        elif isinstance(piece, Finish):
            if piece.index == 0:
                self.finish_reason = piece.reason
        elif isinstance(piece, Usage):
            self.stats.on_usage(piece.prompt_tokens, piece.completion_tokens)

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def _stream_sse(client, request: dict, answer: _Collector) -> None:
    """The SDK sends the request; ``helpers.stream.sse`` reads the streamed body."""
    async with client.chat.completions.with_streaming_response.create(**request) as response:
        decoder = SSEDecoder()
        async for raw in response.iter_bytes():
            for event in decoder.feed(raw):
                if event.data == DONE:
                    answer.saw_done = True
                    return
                payload = json.loads(event.data)
                problem = error_in(payload)
                if problem is not None:
                    raise problem
                for piece in pieces_from_chunk(payload):
                    answer.take(piece)
        decoder.close()


async def _stream_sdk(client, request: dict, answer: _Collector) -> None:
    """The SDK's own chunk objects (slower: see the module's docstring)."""
    stream = await client.chat.completions.create(**request)
    try:
        async for chunk in stream:          # the SDK ends the loop at [DONE], and hides it:
            for piece in pieces_from_chunk(chunk):     # the finish reason says the answer is whole
                answer.take(piece)
    finally:
        await stream.close()


# --------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """One load as it runs: the target, the ``LoadSpec`` (its options read as attributes of the run),
    and what has been measured so far."""

    endpoint: Endpoint
    spec: "LoadSpec"
    records: list[RequestResult] = field(default_factory=list)
    streaming: int = 0
    lags: list[float] = field(default_factory=list)
    t0: float = 0.0

    def __getattr__(self, name: str):
        if name == "spec":                    # not set yet (dataclass init): no recursion
            raise AttributeError(name)
        return getattr(self.spec, name)

    def request(self, messages: list[dict]) -> dict:
        extra = dict(self.extra_body or {})
        if self.ignore_eos:
            extra["ignore_eos"] = True          # vLLM's own sampling parameter, not OpenAI's
        body = {"model": self.endpoint.model, "messages": messages, "stream": True,
                "max_tokens": self.max_tokens, "temperature": self.temperature,
                "stream_options": {"include_usage": True}}
        if extra:
            body["extra_body"] = extra
        return body

    async def one(self, client, user: int, turn: int, messages: list[dict]) -> _Collector | None:
        """One streamed request, recorded whatever happens; the answer, or None when it failed."""
        stats = StreamStats.begin()
        answer = _Collector(stats)
        sent_at = stats.started - self.t0
        error: BaseException | None = None
        cancelled = False
        self.streaming += 1
        try:
            if self.reader == "sdk":
                await _stream_sdk(client, self.request(messages), answer)
            else:
                await _stream_sse(client, self.request(messages), answer)
            if not answer.saw_done and answer.finish_reason is None:
                raise StreamInterruptedError("the stream ended without a finish reason or [DONE]")
        except asyncio.CancelledError:
            cancelled = True
            raise
        except Exception as err:   # counted and named, never raised: the load goes on
            error = err
        finally:
            self.streaming -= 1
            stats.end()
            self.records.append(RequestResult(
                user=user, turn=turn, sent_at=sent_at, total_s=stats.total_seconds,
                ttft_s=stats.time_to_first_token, completion_tokens=stats.completion_tokens,
                prompt_tokens=stats.prompt_tokens, pieces=stats.pieces,
                decode_tokens_per_s=stats.tokens_per_s, finish_reason=answer.finish_reason,
                error=error_kind(error) if error is not None else None,
                message=_message(error) if error is not None else None, cancelled=cancelled))
        return answer if error is None else None

    async def user(self, client, user: int) -> None:
        if self.ramp_up > 0:
            await asyncio.sleep(self.ramp_up * user / self.users)
        conversation = self.conversations[user % len(self.conversations)]
        history: list[dict] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for turn in range(self.turns):
            question = conversation[turn] if turn < len(conversation) else MORE
            messages = history + [{"role": "user", "content": question}]
            answer = await self.one(client, user, turn, messages)
            if answer is not None:     # a failed turn is left out of the conversation
                history = messages + [{"role": "assistant", "content": answer.text}]
            if self.think_time > 0 and turn < self.turns - 1:
                await asyncio.sleep(self.think_time)

    async def ticker(self) -> None:
        """How late the event loop wakes up: the client's own load."""
        expected = time.perf_counter() + LAG_TICK_S
        while True:
            await asyncio.sleep(LAG_TICK_S)
            now = time.perf_counter()
            self.lags.append(max(0.0, now - expected))
            expected = now + LAG_TICK_S

    async def reporter(self) -> None:
        while True:
            await asyncio.sleep(self.progress_every)
            self.report()

    def report(self, final: bool = False) -> None:
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.t0
        done = [r for r in self.records if r.ok]
        failed = sum(1 for r in self.records if r.error)
        tokens = sum(r.tokens for r in done)
        what = "done" if final else "so far"
        self.progress(f"  {elapsed:6.1f} s  {len(done)}/{self.users * self.turns} requests completed, "
                      f"{failed} failed, {self.streaming} streaming; {tokens / elapsed if elapsed else 0:,.0f} "
                      f"tokens/s {what}")

    async def run(self, stop: asyncio.Event | None = None) -> LoadResult:
        """Every user at once, until all are done, the time limit, or ``stop`` is set."""
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # One client per key: each simulated student with their own, as in a class (or one for all).
        clients = [replace(self.endpoint, api_key=key).async_client(timeout=self.request_timeout)
                   for key in self.api_keys] or [self.endpoint.async_client(timeout=self.request_timeout)]
        self.t0 = time.perf_counter()
        background = [asyncio.create_task(self.ticker())]
        if self.progress is not None:
            background.append(asyncio.create_task(self.reporter()))
        stopper = asyncio.create_task(stop.wait()) if stop is not None else None
        if stopper is not None:
            background.append(stopper)
        tasks = [asyncio.create_task(self.user(clients[u % len(clients)], u)) for u in range(self.users)]
        hit_limit = False
        try:
            deadline = self.t0 + self.duration_limit
            pending = set(tasks)
            while pending:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    hit_limit = True
                    break
                done, _ = await asyncio.wait(pending | ({stopper} if stopper else set()), timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                pending -= done
                if stopper is not None and stopper in done:
                    hit_limit = bool(pending)
                    break
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:   # each closes its stream on the way out: vLLM aborts the request
                await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for client in clients:
                await client.close()
        wall = (max((r.sent_at + r.total_s for r in self.records), default=0.0)
                - min((r.sent_at for r in self.records), default=0.0))
        for task in tasks:   # a bug in a user task would otherwise go unseen
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        self.report(final=True)
        records = tuple(sorted(self.records, key=lambda r: (r.sent_at, r.user, r.turn)))
        return LoadResult(
            url=self.endpoint.url, model=self.endpoint.model, users=self.users, turns=self.turns,
            max_tokens=self.max_tokens, duration_limit_s=self.duration_limit, ignore_eos=self.ignore_eos,
            started_at=started_at, wall_s=wall, hit_time_limit=hit_limit, requests=records,
            client_lag_p95_s=percentile(self.lags, 95), client_lag_max_s=max(self.lags, default=None),
            reader=self.reader)


def _conversations(prompts) -> tuple[tuple[str, ...], ...]:
    if prompts is None:
        return CONVERSATIONS
    if isinstance(prompts, str):
        prompts = [prompts]
    result = []
    for item in prompts:
        convo = (item,) if isinstance(item, str) else tuple(item)
        if not convo or not all(isinstance(q, str) and q.strip() for q in convo):
            raise LoadTestError(f"each prompt is a question or a list of questions, got {item!r}")
        result.append(convo)
    if not result:
        raise LoadTestError("prompts is empty")
    return tuple(result)


@dataclass(frozen=True)
class LoadSpec:
    """What one load asks for; checked when made (``LoadTestError`` names the bad value).

    ``users``: simulated users, all at once (``ramp_up`` seconds spreads their starts).
    ``turns``: requests per user, each after the previous answer (a follow-up carries it).
    ``max_tokens``: per answer. ``duration_limit``: the hard limit in seconds; requests still
    running then are cancelled (their streams closed: vLLM aborts them) and counted as
    cancelled, not failed. ``prompts``: questions, or lists of questions (question then
    follow-ups), one conversation per user in turn (default ``CONVERSATIONS``).
    ``ignore_eos``: vLLM's own request field (sent in ``extra_body``; OpenAI's API has no such
    field): every answer runs to ``max_tokens``, so loads are comparable. ``extra_body``: more
    fields for the request body (e.g. vLLM's ``allowed_token_ids``). ``think_time``: seconds a
    user waits between turns. ``request_timeout``: seconds without a byte before a request
    counts as a ``timeout`` error. ``progress``: a function taking one line (``print``), called
    every ``progress_every`` seconds and at the end. ``reader``: ``"sse"`` (default) or ``"sdk"``.
    ``model``, ``api_key``: for a target given as a URL. ``api_keys``: one key per simulated
    user, in turn (a class gateway limits each key's streams); otherwise every user sends the
    target's key.
    """

    users: int
    turns: int = 2
    max_tokens: int = 128
    duration_limit: float = 120.0
    prompts: Sequence[str | Sequence[str]] | None = None
    system_prompt: str | None = SYSTEM_PROMPT
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict | None = None
    think_time: float = 0.0
    ramp_up: float = 0.0
    request_timeout: float = 60.0
    reader: str = "sse"
    progress: Callable[[str], None] | None = None
    progress_every: float = 5.0
    model: str | None = None
    api_key: str | None = None
    api_keys: Sequence[str] = ()
    # derived from prompts when made: one conversation (question, follow-ups) per entry
    conversations: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        users, turns, max_tokens = self.users, self.turns, self.max_tokens
        if not isinstance(users, int) or not 1 <= users <= MAX_USERS:
            raise LoadTestError(f"users must be a whole number from 1 to {MAX_USERS}, got {users!r}")
        if not isinstance(turns, int) or not 1 <= turns <= MAX_TURNS:
            raise LoadTestError(f"turns must be a whole number from 1 to {MAX_TURNS}, got {turns!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise LoadTestError(f"max_tokens must be a positive whole number, got {max_tokens!r}")
        for name in ("duration_limit", "request_timeout", "progress_every"):
            if not getattr(self, name) > 0:
                raise LoadTestError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if self.think_time < 0 or self.ramp_up < 0:
            raise LoadTestError("think_time and ramp_up cannot be negative")
        if self.reader not in ("sse", "sdk"):
            raise LoadTestError(f"reader is 'sse' (the helpers' reader) or 'sdk' (the SDK's objects), "
                                f"got {self.reader!r}")
        object.__setattr__(self, "duration_limit", float(self.duration_limit))
        object.__setattr__(self, "api_keys", tuple(self.api_keys or ()))
        # checked now, not when the load is half run
        object.__setattr__(self, "conversations", _conversations(self.prompts))


def _spec(users: int | LoadSpec | None, options: dict) -> LoadSpec:
    if isinstance(users, LoadSpec):
        return replace(users, **options) if options else users
    if users is None:
        raise LoadTestError("say how many users (run_load(target, 4, ...)) or give a LoadSpec")
    return LoadSpec(users, **options)


def _prepare(target, spec: LoadSpec) -> _Run:
    return _Run(endpoint=as_endpoint(target, spec.model, spec.api_key), spec=spec)


async def run_load_async(target: Any, users: int | LoadSpec | None = None, **options: Any) -> LoadResult:
    """``await`` form of ``run_load`` (inside a running event loop)."""
    return await _prepare(target, _spec(users, options)).run()


def run_load(target: Any, users: int | LoadSpec | None = None, **options: Any) -> LoadResult:
    """Run ``users`` simulated users against ``target`` and return what they measured.

    ``target``: a ``helpers.endpoint.Endpoint``, a server (``get_server()``), or a base URL with
    ``model=``. ``users``: a number of users with ``LoadSpec``'s options as keywords
    (``run_load(server, 4, turns=1, max_tokens=64)``), or a ``LoadSpec``.

    Works in a plain script and in a notebook cell alike (where an event loop already runs,
    the load runs in its own thread; interrupting the kernel cancels it and closes its streams).
    """
    run = _prepare(target, _spec(users, options))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run.run())
    return _in_thread(run)


def _in_thread(run: _Run) -> LoadResult:
    """Run the load on a fresh event loop in another thread (a notebook's loop is busy)."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    def main() -> None:
        async def go():
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            return await run.run(box["stop"])
        try:
            box["result"] = asyncio.run(go())
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err
        finally:
            ready.set()

    thread = threading.Thread(target=main, name="loadtest", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:                 # the kernel was interrupted: cancel the load
        ready.wait(5)
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(CLOSE_GRACE_S + 5)
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def sweep(target: Any, users: Sequence[int] = (1, 4, 16, 32), *, progress: Callable[[str], None] | None = print,
          **kwargs: Any) -> list[LoadResult]:
    """``run_load`` once per number of users, one after another; the same keywords as ``run_load``."""
    results = []
    for n in users:
        if progress is not None:
            progress(f"{n} user(s) ...")
        results.append(run_load(target, n, progress=progress, **kwargs))
        if progress is not None:
            progress(f"  {results[-1]}")
    return results


def plot_sweep(results: Sequence[LoadResult], title: str | None = None):
    """Two panels against the number of users: time to first token (p50, p95) and tokens/s
    (total, and per stream while decoding). Returns the matplotlib ``Figure``."""
    import matplotlib.pyplot as plt

    if not results:
        raise LoadTestError("nothing to plot: no results")
    xs = [r.users for r in results]

    def ys(values):
        return [float("nan") if v is None else v for v in values]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(xs, ys(r.ttft_p50 for r in results), "o-", label="p50")
    left.plot(xs, ys(r.ttft_p95 for r in results), "s--", label="p95")
    left.set_title("time to first token")
    left.set_ylabel("seconds")
    right.plot(xs, ys(r.tokens_per_s for r in results), "o-", color="tab:green", label="total")
    right.set_title("throughput")
    right.set_ylabel("tokens/s, total")
    per_stream = right.twinx()
    per_stream.plot(xs, ys(r.decode_tokens_per_s_p50 for r in results), "^:", color="tab:purple",
                    label="per stream (median)")
    per_stream.set_ylabel("tokens/s, per stream")
    handles = right.get_legend_handles_labels()[0] + per_stream.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="upper left")
    left.legend()
    for ax in (left, right):
        ax.set_xlabel("concurrent users")
        if len(set(xs)) > 1 and max(xs) / max(1, min(xs)) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    per_stream.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
