"""A student's laptop, played inside the student's network namespace by test_netns.py:

    ip netns exec <student-ns> python tests/classroom/student_probe.py ACTION < config.json

It does what it is told (``sweep``, ``reach``, ``stream``, ``flood``), asserts nothing, and
prints one JSON object of what it saw as its last line of output; the test judges it.
Every network call has a timeout, so the probe always ends.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket
import sys
import time

TIMEOUT = 30.0


def raw_request(host: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> dict:
    """One HTTP/1.1 request written by hand (so paths like ``/v1/../invocations`` go out as they
    are, without a client library normalising them); the status and the first bytes back."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines.append("Content-Type: application/json")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    reply = b""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, rest = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    return {"status": int(status_line.split()[1]) if status_line.startswith("HTTP/") else None,
            "body": rest[:300].decode(errors="replace")}


def sweep(config: dict) -> dict:
    host, port = config["gateway_host"], config["gateway_port"]
    generic = json.dumps({"model": config["model"], "prompt": "hi", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 1}).encode()
    plain = {"/tokenize": {"model": config["model"], "messages": [{"role": "user", "content": "hi"}]},
             "/detokenize": {"model": config["model"], "tokens": [1, 2]}}     # only their own fields
    results = []
    for method, path in config["requests"]:
        body = json.dumps(plain[path]).encode() if path in plain else generic
        for who, key in config["keys"].items():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            answer = raw_request(host, port, method, path, headers, b"" if method in ("GET", "HEAD") else body)
            results.append({"method": method, "path": path, "key": who, **answer})
    return {"results": results}


def reach(config: dict) -> dict:
    found = {}
    for name, (host, port) in config["targets"].items():
        try:
            with socket.create_connection((host, port), timeout=3):
                found[name] = "connected"
        except ConnectionRefusedError:
            found[name] = "refused"
        except socket.timeout:
            found[name] = "timeout"
        except OSError as err:
            found[name] = errno.errorcode.get(err.errno, str(err))
    return {"reach": found}


def _chat_body(config: dict, max_tokens: int, content: str = "Count from one to one hundred.") -> dict:
    return {"model": config["model"], "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}


def stream(config: dict) -> dict:
    import httpx

    url, key = config["gateway_url"], config["keys"]["valid"]
    headers = {"Authorization": f"Bearer {key}"}
    out: dict = {}
    with httpx.Client(timeout=httpx.Timeout(TIMEOUT), trust_env=False) as client:
        models = client.get(url + "/v1/models", headers=headers)
        out["models_status"] = models.status_code
        out["model_ids"] = [m["id"] for m in models.json().get("data", [])] if models.status_code == 200 else []
        started = time.monotonic()
        pieces = []
        # usage in the last event: the tokens the server made, whatever text they decode to (a
        # special token decodes to nothing and makes no event of its own)
        body = {**_chat_body(config, config["max_tokens"]), "stream_options": {"include_usage": True}}
        with client.stream("POST", url + "/v1/chat/completions", headers=headers, json=body) as reply:
            out["status"] = reply.status_code
            out["headers"] = {k: reply.headers.get(k) for k in ("content-type", "cache-control", "x-accel-buffering")}
            for piece in reply.iter_raw():
                pieces.append((time.monotonic() - started, piece))
    text = b"".join(p for _, p in pieces)
    first_content = next(i for i, (_, p) in enumerate(pieces) if b'"content"' in p)
    out.update(pieces=len(pieces), first_content_piece=first_content,
               done_in_first_content_piece=b"[DONE]" in pieces[first_content][1],
               first_content_s=pieces[first_content][0], done_s=pieces[-1][0],
               ends_with_done=text.rstrip().endswith(b"data: [DONE]"),
               events=text.count(b"\n\ndata: ") + 1,
               completion_tokens=[int(n) for n in re.findall(rb'"completion_tokens":\s*(\d+)', text)])
    return out


async def _flood(config: dict) -> dict:
    import httpx

    url = config["gateway_url"] + "/v1/chat/completions"
    valid, other = config["keys"]["valid"], config["keys"]["other"]
    limits = httpx.Limits(max_connections=config["parallel"] + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT * 4), limits=limits, trust_env=False) as client:
        # the other student's long answer, started first and read all along
        other_state = {"bytes_before": 0, "bytes_after": 0, "done": False}
        flood_answered = asyncio.Event()
        first_byte = asyncio.Event()

        async def other_student():
            async with client.stream("POST", url, headers={"Authorization": f"Bearer {other}"},
                                     json=_chat_body(config, config["other_tokens"])) as reply:
                other_state["status"] = reply.status_code
                async for piece in reply.aiter_raw():
                    first_byte.set()
                    other_state["bytes_after" if flood_answered.is_set() else "bytes_before"] += len(piece)
                    if b"[DONE]" in piece:
                        other_state["done"] = True
                    if flood_answered.is_set() and other_state["bytes_after"] > 0:
                        return                      # still streaming after the flood: seen, stop here
            first_byte.set()

        other_task = asyncio.create_task(other_student())
        await asyncio.wait_for(first_byte.wait(), TIMEOUT * 2)
        statuses: list[int] = []
        codes: list[str] = []
        counts = {"answered": 0, "done_early": 0}

        async def one():
            async with client.stream("POST", url, headers={"Authorization": f"Bearer {valid}"},
                                     json=_chat_body(config, config["flood_tokens"], "Say hi.")) as reply:
                statuses.append(reply.status_code)
                counts["answered"] += 1
                if counts["answered"] == config["parallel"]:
                    flood_answered.set()
                if reply.status_code != 200:
                    codes.append(json.loads(await reply.aread())["error"]["code"])
                    return
                async for piece in reply.aiter_raw():       # an admitted answer: read until the flood
                    if b"[DONE]" in piece:                  # is answered, then close it (vLLM aborts)
                        if not flood_answered.is_set():
                            counts["done_early"] += 1
                        return
                    if flood_answered.is_set():
                        return

        flood = [asyncio.create_task(one()) for _ in range(config["parallel"])]
        await asyncio.wait_for(flood_answered.wait(), TIMEOUT * 2)
        other_done_before = other_state["done"]
        await asyncio.wait_for(asyncio.gather(*flood), TIMEOUT * 4)
        await asyncio.wait_for(other_task, TIMEOUT * 2)
    return {"statuses": statuses, "codes": codes, "other": other_state, "admitted_done_early": counts["done_early"],
            "other_done_when_flood_answered": other_done_before}


def flood(config: dict) -> dict:
    return asyncio.run(_flood(config))


if __name__ == "__main__":
    action = sys.argv[1]
    config = json.load(sys.stdin)
    result = {"sweep": sweep, "reach": reach, "stream": stream, "flood": flood}[action](config)
    print(json.dumps(result))
