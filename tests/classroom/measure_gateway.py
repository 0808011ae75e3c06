"""By hand (not collected by pytest): the class set-up end to end with a *keyed* vLLM, and what
the gateway costs a student.

    PYTHONPATH=. python tests/classroom/measure_gateway.py [--rounds 20] [--long 3]

1. starts vLLM on 127.0.0.1 with an internal key (``VLLM_API_KEY``, as ``api_key`` in the
   settings) in a private state folder, makes two students' keys, and starts the gateway with
   ``start_gateway(server, host="127.0.0.1")`` (the internal key taken from the server);
2. checks the design on the real thing: vLLM itself refuses the students' keys and no key, yet
   answers ``POST /invocations`` without any key (the hole), which the gateway answers 404; the
   gateway's student key works; no key (internal or student) is in any process's command line;
3. measures, alternating direct and through the gateway on kept-alive connections, the time to
   the response headers and to the first content event of a streamed chat (``max_tokens`` 8),
   and the tokens/s of ``--long`` answers of 128 tokens; prints medians;
4. stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TUTORIAL_STATE_DIR"] = tempfile.mkdtemp(prefix="vllm-tutorial-measure-")

import httpx  # noqa: E402

from helpers.classroom import keys as keyfile  # noqa: E402
from helpers.classroom.policy import Limits  # noqa: E402
from helpers.classroom.service import start_gateway  # noqa: E402
from helpers.server.config import from_settings  # noqa: E402
from helpers.server.lifecycle import VLLMServer  # noqa: E402
from helpers.settings import load_settings  # noqa: E402


def stream_once(client: httpx.Client, url: str, key: str, model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Count from one to fifty."}],
            "stream": True, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    started = time.perf_counter()
    first_content = None
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}) as reply:
        headers_at = time.perf_counter() - started
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    tokens += 1
                    if first_content is None:
                        first_content = time.perf_counter() - started
    total = time.perf_counter() - started
    return {"headers": headers_at, "first": first_content, "total": total,
            "rate": (tokens - 1) / (total - first_content) if tokens > 1 else None}


def cmdlines() -> str:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(found)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--long", type=int, default=3)
    args = parser.parse_args()
    internal = keyfile.new_key()
    folder = Path(tempfile.mkdtemp(prefix="classroom-measure-"))
    made = keyfile.create_keys(folder / "keys.json", ["ana", "bo"])
    server = VLLMServer(from_settings(load_settings(api_key=internal))).start()
    gateway = None
    try:
        # one key asks again and again: no rate limit in the way of what is measured
        gateway = start_gateway(server, host="127.0.0.1", keys_path=folder / "keys.json",
                                limits=Limits(per_key_rate=1000.0, per_key_burst=1000))
        direct, through = server.url, gateway.url
        with httpx.Client(timeout=60, trust_env=False) as c:
            checks = {
                "vLLM /v1/models, no key": c.get(direct + "/v1/models").status_code,
                "vLLM /v1/models, a student's key": c.get(direct + "/v1/models",
                                                          headers={"Authorization": f"Bearer {made['ana']}"}).status_code,
                "vLLM /invocations, no key": c.post(direct + "/invocations", json={
                    "model": server.name, "prompt": "Hi", "max_tokens": 2}).status_code,
                "vLLM /tokenize, no key": c.post(direct + "/tokenize", json={"prompt": "Hi"}).status_code,
                "gateway /invocations, a student's key": c.post(through + "/invocations", json={
                    "prompt": "Hi", "max_tokens": 2}, headers={"Authorization": f"Bearer {made['ana']}"}).status_code,
                "gateway /v1/models, a student's key": c.get(through + "/v1/models", headers={
                    "Authorization": f"Bearer {made['ana']}"}).status_code,
            }
        for what, status in checks.items():
            print(f"  {what:<40} {status}")
        argv = cmdlines()
        leaked = [name for name, key in [("internal", internal), *made.items()] if key in argv]
        print(f"  keys in any process's command line: {leaked or 'none'}")

        results = {"direct": [], "gateway": []}
        with httpx.Client(timeout=120, trust_env=False) as to_vllm, httpx.Client(timeout=120, trust_env=False) as to_gw:
            for c, url, key in ((to_vllm, direct, internal), (to_gw, through, made["bo"])):
                stream_once(c, url, key, server.name, 4)                          # warm: connections, cache
            for i in range(args.rounds):
                order = [("direct", to_vllm, direct, internal), ("gateway", to_gw, through, made["bo"])]
                for name, c, url, key in (order if i % 2 == 0 else order[::-1]):
                    results[name].append(stream_once(c, url, key, server.name, 8))
            rates = {"direct": [], "gateway": []}
            for i in range(args.long):
                order = [("direct", to_vllm, direct, internal), ("gateway", to_gw, through, made["bo"])]
                for name, c, url, key in (order if i % 2 == 0 else order[::-1]):
                    rates[name].append(stream_once(c, url, key, server.name, 128)["rate"])
        print(f"\n{args.rounds} alternated streamed chats of 8 tokens, medians (ms):")
        print(f"  {'':<10} {'headers':>9} {'1st token':>10} {'total':>8}")
        for name, rows in results.items():
            print(f"  {name:<10} {1000 * statistics.median(r['headers'] for r in rows):9.1f} "
                  f"{1000 * statistics.median(r['first'] for r in rows):10.1f} "
                  f"{1000 * statistics.median(r['total'] for r in rows):8.1f}")
        extra = [g["first"] - d["first"] for d, g in zip(results["direct"], results["gateway"])]
        print(f"  gateway - direct, time to first token, per pair: median {1000 * statistics.median(extra):.1f} ms, "
              f"min {1000 * min(extra):.1f}, max {1000 * max(extra):.1f}")
        print(f"\n{args.long} alternated answers of 128 tokens, tokens/s: direct "
              f"{[round(r, 1) for r in rates['direct']]}, gateway {[round(r, 1) for r in rates['gateway']]}")
    finally:
        if gateway is not None:
            gateway.stop()
        print(f"\nvLLM: {server.stop()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
