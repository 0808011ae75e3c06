"""A real Prometheus (Debian's 2.42 in CI) scraping a real vLLM, and PromQL answers checked
against the server's own counters (notebook 05 teaches the same).

Needs the ``prometheus`` binary: ``.ci/run`` installs it and sets ``TESTS_REQUIRE_PROMETHEUS=1``,
so CI fails without it; elsewhere these tests skip, saying how to get it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from helpers.logs.metrics import scrape

pytestmark = pytest.mark.vllm

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    if os.environ.get("TESTS_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("TESTS_REQUIRE_PROMETHEUS=1 but no prometheus binary on PATH", pytrace=False)
    pytest.skip("no prometheus: `sudo apt-get install prometheus` or prometheus.io/download",
                allow_module_level=True)

SCRAPE_S = 1
WAIT_S = 120


@pytest.fixture
def prometheus(shared_server):
    folder = Path(tempfile.mkdtemp(prefix="prometheus-"))
    key = shared_server.endpoint.api_key or "EMPTY"
    (folder / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE_S}s\nscrape_configs:\n  - job_name: vllm\n"
        f"    authorization:\n      credentials: \"{key}\"\n"
        f"    static_configs:\n      - targets: [\"{shared_server.url.removeprefix('http://')}\"]\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address={address}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            assert proc.poll() is None, f"prometheus exited with code {proc.returncode}"
            try:
                if requests.get(f"http://{address}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() - started < WAIT_S, "prometheus not ready after 120 s"
            time.sleep(0.25)
        yield f"http://{address}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def promql(base: str, query: str) -> float | None:
    reply = requests.get(f"{base}/api/v1/query", params={"query": query}, timeout=10)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return sum(float(r["value"][1]) for r in result) if result else None


def wait_until(condition, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < WAIT_S, f"not within {WAIT_S} s: {what}"
        time.sleep(0.25)


def test_promql_answers_agree_with_the_servers_own_counters(shared_server, prometheus):
    base, proc = prometheus
    wait_until(lambda: promql(base, "vllm:generation_tokens_total") is not None, "a first scrape of vLLM")
    up = promql(base, 'up{job="vllm"}')
    assert up == 1.0, f"the vLLM target is not up: {up}"
    before = promql(base, "vllm:generation_tokens_total")
    requests_before = promql(base, 'sum(vllm:request_success_total)')
    ours = 0
    for prompt in ("Name a river.", "Name a colour.", "Name a city."):
        reply = requests.post(f"{shared_server.url}/v1/chat/completions", headers=shared_server.endpoint.headers(),
                              timeout=300, json={
            "model": shared_server.name, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        reply.raise_for_status()
        assert reply.json()["usage"]["completion_tokens"] == 24
        ours += 24
    wait_until(lambda: promql(base, "vllm:generation_tokens_total") >= before + ours,
               f"Prometheus seeing the {ours} tokens just generated")
    stored = promql(base, "vllm:generation_tokens_total")
    server_now = scrape(shared_server).value("vllm:generation_tokens_total")
    assert before + ours <= stored <= server_now
    assert promql(base, "sum(vllm:request_success_total)") >= requests_before + 3
    # the queries notebook 05 shows: each answered, with a value that makes sense
    assert promql(base, "sum(vllm:num_requests_running)") >= 0
    assert promql(base, "sum(rate(vllm:generation_tokens_total[1m]))") > 0
    p95 = promql(base, "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))")
    assert p95 is not None and math.isfinite(p95) and p95 > 0
    usage = promql(base, "max(vllm:kv_cache_usage_perc)")
    assert usage is not None and 0 <= usage <= 1
    assert proc.poll() is None
