"""Tests for helpers/server_metrics.py: parsing real /metrics texts of vLLM 0.32.0, and series.

``data/vllm_metrics_0.32.0.txt`` was scraped from the embedded model's server after one
32-token request; ``..._disable_log_stats.txt`` from one started with ``--disable-log-stats``
after the same request (it exports no ``vllm:`` numbers at all).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from helpers.logs.metrics import (Metrics, Sample, Sampler, histogram_mean, parse, running_requests,
                                    scrape, timeseries)

DATA = Path(__file__).resolve().parent.parent / "data"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def real() -> Metrics:
    return parse((DATA / "vllm_metrics_0.32.0.txt").read_text())


def test_real_metrics_parse_with_the_counts_of_the_one_request(real):
    assert real.value("vllm:generation_tokens_total") == 32
    assert real.value("vllm:prompt_tokens_total") == 34
    assert real.value("vllm:num_requests_running") == 0
    assert real.value("vllm:request_success_total", finished_reason="length") == 1
    assert real.value("vllm:request_success_total", finished_reason="stop") == 0
    assert real.value("vllm:generation_tokens_total", model_name=MODEL, engine="0") == 32
    assert real.value("vllm:generation_tokens_total", model_name="other") == 0


def test_real_metrics_histograms_have_buckets_sum_and_count(real):
    buckets = real.select("vllm:time_to_first_token_seconds_bucket")
    assert buckets and all("le" in s.labels for s in buckets)
    assert real.value("vllm:time_to_first_token_seconds_bucket", le="+Inf") == 1
    mean = histogram_mean(real, "vllm:time_to_first_token_seconds")
    assert mean == pytest.approx(real.value("vllm:time_to_first_token_seconds_sum"))
    assert histogram_mean(real, "vllm:no_such_histogram") is None


def test_disable_log_stats_exports_no_vllm_numbers():
    m = parse((DATA / "vllm_metrics_0.32.0_disable_log_stats.txt").read_text())
    assert m.names()  # the process's own metrics are still there
    assert not [n for n in m.names() if n.startswith("vllm:")]
    assert m.value("vllm:generation_tokens_total") == 0


def test_label_escapes_are_undone():
    m = parse('x{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb"} 1\n')
    assert m.samples[0].labels == {"path": "C:\\dir", "quote": 'say "hi"', "nl": "a\nb"}


def test_comments_blank_lines_timestamps_and_special_values():
    m = parse("# HELP x a counter\n# TYPE x counter\n\nx_total 1.5 1700000000000\ny +Inf\nz NaN\n")
    assert [s.name for s in m.samples] == ["x_total", "y", "z"]      # a counter's samples end in _total
    assert m.value("x_total") == 1.5
    assert m.value("y") == float("inf")


def test_a_line_that_is_not_a_sample_is_named():
    with pytest.raises(ValueError, match="not a Prometheus sample line: 'this is not metrics'"):
        parse("x 1\nthis is not metrics\n")


def _metrics(at: float, gen: float, prompt: float, running: float, ttft_sum: float, ttft_n: float) -> Metrics:
    return Metrics((Sample("vllm:generation_tokens_total", {}, gen),
                    Sample("vllm:prompt_tokens_total", {}, prompt),
                    Sample("vllm:num_requests_running", {}, running),
                    Sample("vllm:time_to_first_token_seconds_sum", {}, ttft_sum),
                    Sample("vllm:time_to_first_token_seconds_count", {}, ttft_n)), at=at)


def test_timeseries_turns_counters_into_rates_per_interval():
    s = timeseries([_metrics(10.0, 0, 0, 0, 0, 0), _metrics(10.5, 10, 40, 2, 0.4, 2),
                    _metrics(11.5, 30, 40, 1, 0.4, 2)])
    assert s["t"] == [0.5, 1.5]
    assert s["generation_tps"] == [20.0, 20.0]
    assert s["prompt_tps"] == [80.0, 0.0]
    assert s["running"] == [2, 1]
    assert s["ttft"] == [pytest.approx(0.2), None]  # no first token in the second interval


class _Handler(BaseHTTPRequestHandler):
    body = (DATA / "vllm_metrics_0.32.0.txt").read_bytes()
    authorizations: list = []

    def do_GET(self):
        self.authorizations.append(self.headers.get("Authorization"))
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_vllm():
    """A local HTTP server that answers /metrics with the real vLLM text."""
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_scrape_running_requests_and_sampler_over_http(fake_vllm):
    assert scrape(fake_vllm + "/").value("vllm:generation_tokens_total") == 32
    assert running_requests(fake_vllm) == 0
    with Sampler(fake_vllm, every=0.05) as sampler:
        threading.Event().wait(0.3)
    assert len(sampler.samples) >= 3 and sampler.errors == 0
    assert all(b.at >= a.at for a, b in zip(sampler.samples, sampler.samples[1:]))


def test_sampler_skips_failed_scrapes():
    sampler = Sampler("http://127.0.0.1:9", every=0.01, timeout=0.5).start()
    threading.Event().wait(0.05)
    assert sampler.stop() == [] and sampler.errors >= 2


def test_scrape_of_an_endpoint_sends_its_key(fake_vllm):
    # A class gateway answers /metrics only with a student's key.
    from helpers.endpoint import Endpoint

    _Handler.authorizations.clear()
    assert running_requests(Endpoint(fake_vllm, "m", "sk-student")) == 0
    assert scrape(fake_vllm).value("vllm:generation_tokens_total") == 32
    assert _Handler.authorizations == ["Bearer sk-student", None]
