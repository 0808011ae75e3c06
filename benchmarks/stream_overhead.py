"""What do the stream helpers and the live widget cost? Run by hand; prints tables.

    .venv/bin/python benchmarks/stream_overhead.py [--rounds 8] [--tokens 128]

1. Client overhead, on one real vLLM server in the same run: each helper stream against its
   raw baseline, alternated (A B A B ...) so that drift of the machine hits both alike.
   * raw ``openai``: ``client.chat.completions.create(stream=True)`` and a loop over
     ``chunk.choices`` (guarded);  helpers: ``openai_chat`` on the same client.
   * raw ``requests``: ``iter_lines()`` and ``json.loads`` of each ``data:`` line;
     helpers: ``requests_chat`` (``helpers.sse``).
   Goals: tokens/s ratio >= 0.98 and added time to first token <= 2 ms (medians).
   Every request asks for the same number of tokens (``ignore_eos``) at temperature 0.
2. The widget's cost per token at a synthetic 2,000 tokens/s, measured inside a real Jupyter
   kernel (so every redraw is really serialised and sent on IOPub): ``StreamView.pump`` against
   a plain loop over the same stream: it must keep up, and its own cost is measured flat out.
3. Parsing cost per event on a recorded real stream (no server noise): ``helpers.sse`` plus
   typed pieces against splitting lines and ``json.loads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from helpers import get_server  # noqa: E402
from helpers.stream.chat import Content, openai_chat, requests_chat  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."


def raw_openai(client, model, tokens):
    started = time.perf_counter()
    first = None
    count = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            stream=True, max_tokens=tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            count += 1
    return first - started, time.perf_counter() - started, count


def raw_requests(url, model, tokens):
    started = time.perf_counter()
    first = None
    count = 0
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    with requests.post(url + "/chat/completions", json=body, stream=True, timeout=120) as reply:
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                first = first or time.perf_counter()
                count += 1
    return first - started, time.perf_counter() - started, count


def helper_stream(stream):
    first = None
    count = 0
    for piece in stream:
        if isinstance(piece, Content):
            first = first or time.perf_counter()
            count += 1
    return first - stream.stats.started, time.perf_counter() - stream.stats.started, count


def rate(ttft, total, count):
    return (count - 1) / (total - ttft)


def client_overhead(server, rounds, tokens):
    client = server.client()
    pairs = {
        "openai": (lambda: raw_openai(client, server.name, tokens),
                   lambda: helper_stream(openai_chat(client, PROMPT, model=server.name, max_tokens=tokens,
                                                     temperature=0, extra_body={"ignore_eos": True}))),
        "requests": (lambda: raw_requests(server.base_url, server.name, tokens),
                     lambda: helper_stream(requests_chat(server, PROMPT, max_tokens=tokens, temperature=0,
                                                         ignore_eos=True))),
    }
    rows = []
    for name, (raw, helper) in pairs.items():
        raw(), helper()                                        # warm both paths
        results = {"raw": [], "helpers": []}
        for _ in range(rounds):
            results["raw"].append(raw())
            results["helpers"].append(helper())
        raw_rate = statistics.median(rate(*r) for r in results["raw"])
        helper_rate = statistics.median(rate(*r) for r in results["helpers"])
        raw_ttft = statistics.median(r[0] for r in results["raw"])
        helper_ttft = statistics.median(r[0] for r in results["helpers"])
        rows.append((name, raw_rate, helper_rate, helper_rate / raw_rate, raw_ttft, helper_ttft,
                     (helper_ttft - raw_ttft) * 1000))
    print(f"\n1. Client overhead: {rounds} alternated rounds of {tokens} tokens each, medians")
    print(f"{'client':10}{'raw tok/s':>11}{'helpers':>10}{'ratio':>8}{'raw TTFT ms':>13}{'helpers':>9}"
          f"{'added ms':>10}")
    for name, rr, hr, ratio, rt, ht, added in rows:
        print(f"{name:10}{rr:>11.1f}{hr:>10.1f}{ratio:>8.3f}{rt * 1000:>13.1f}{ht * 1000:>9.1f}{added:>10.2f}")
    print("goals: ratio >= 0.98, added time to first token <= 2 ms")
    return rows


WIDGET_CODE = r"""
import sys, time, json
sys.path.insert(0, %(root)r)
from helpers.stream.chat import ChatStream
from helpers.stream.widget import StreamView
from IPython.display import display

def chunks(n, per_second):
    gap, next_at = 1.0 / per_second if per_second else 0.0, time.perf_counter()
    for i in range(n):
        next_at += gap
        while gap and time.perf_counter() < next_at:
            pass
        yield {"choices": [{"index": 0, "delta": {"content": "tok%%d " %% i}}]}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}

def plain(n, rate):
    stream = ChatStream(chunks(n, rate), lambda: None, "synthetic")
    t = time.perf_counter()
    for _ in stream: pass
    return time.perf_counter() - t, 0

def widget(n, rate):
    view = StreamView("benchmark"); display(view.widget)
    stream = ChatStream(chunks(n, rate), lambda: None, "synthetic")
    t = time.perf_counter()
    view.pump(stream)
    return time.perf_counter() - t, view.updates

results = {}
for name, fn in (("plain loop", plain), ("StreamView", widget)):
    runs = [fn(%(tokens)d, %(rate)d) for _ in range(3)]  # the source spins to keep its rate
    flat_out = [fn(%(tokens)d, 0) for _ in range(3)]     # no pause: the consumer's own cost
    results[name] = (min(r[0] for r in runs), runs[-1][1], min(r[0] for r in flat_out))
print("RESULT " + json.dumps(results), flush=True)
"""


def widget_cost(tokens=6000, per_second=2000):
    import queue

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        kc.execute(WIDGET_CODE % {"root": str(ROOT), "tokens": tokens, "rate": per_second})
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and "RESULT" not in text:
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "stream":
                text += msg["content"]["text"]
            elif msg["msg_type"] == "error":
                raise RuntimeError("\n".join(msg["content"]["traceback"]))
        results = json.loads(text.split("RESULT", 1)[1].strip().splitlines()[0])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    base_wall, _, base_flat = results["plain loop"]
    wall, updates, flat = results["StreamView"]
    ideal = tokens / per_second
    print(f"\n2. Widget cost: {tokens} tokens at a synthetic {per_second} tokens/s in a real kernel "
          f"(ideal {ideal:.2f} s; best of 3)")
    print(f"{'consumer':12}{'wall s':>9}{'tokens/s':>10}{'redraws':>9}{'us/token flat out':>19}")
    print(f"{'plain loop':12}{base_wall:>9.3f}{tokens / base_wall:>10.0f}{0:>9}{base_flat / tokens * 1e6:>19.1f}")
    print(f"{'StreamView':12}{wall:>9.3f}{tokens / wall:>10.0f}{updates:>9}{flat / tokens * 1e6:>19.1f}")
    print(f"the widget adds {(flat - base_flat) / tokens * 1e6:.1f} us per token (flat out, no pause between tokens)")
    return results


def parser_cost(path=ROOT / "tests" / "data" / "sse_vllm_chat_zh_usage.sse", repeat=200):
    """Client CPU per chunk on a recorded real stream, free of server noise."""
    from helpers.stream.chat import pieces_from_chunk
    from helpers.stream.sse import SSEDecoder

    body = path.read_bytes()
    events = body.count(b"\n\n")
    chunks = [body[i:i + 128] for i in range(0, len(body), 128)]

    def raw():
        for line in b"".join(chunks).split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                json.loads(line[6:])

    def helpers_sse():
        decoder = SSEDecoder()
        for chunk in chunks:
            for event in decoder.feed(chunk):
                if event.data != "[DONE]":
                    pieces_from_chunk(json.loads(event.data))
        decoder.close()

    timings = {}
    for name, fn in (("split + json.loads", raw), ("helpers.sse + pieces", helpers_sse)):
        best = min(_timed(fn, repeat) for _ in range(5))
        timings[name] = best / events * 1e6
    print(f"\n3. Parsing cost per event, recorded real stream ({events} events in 128-byte pieces), best of 5")
    for name, us in timings.items():
        print(f"{name:24}{us:>8.1f} us/event")
    return timings


def _timed(fn, repeat):
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-widget", action="store_true", help="no Jupyter kernel here: skip table 2")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    server = get_server(progress=lambda line: None)
    print(f"server: vLLM {server.version()}, model {server.name!r} at {server.url}")
    client_overhead(server, args.rounds, args.tokens)
    if not args.skip_widget:
        widget_cost()
    parser_cost()
    if server.owned:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
