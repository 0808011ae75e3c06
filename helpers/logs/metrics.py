"""Read the numbers a vLLM server exports at ``/metrics`` (Prometheus text format).

The periodic "Avg prompt throughput ..." log line is a summary of these same counters; reading
them directly gives the numbers without any log noise::

    from helpers.logs.metrics import scrape
    m = scrape(server)                             # a server, an Endpoint (sends its key), or a URL
    m.value("vllm:num_requests_running")           # summed over every label set
    m.value("vllm:request_success_total", finished_reason="abort")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..endpoint import as_endpoint

@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


@dataclass(frozen=True)
class Metrics:
    """One scrape: every sample, and the time it was taken (``time.monotonic()``)."""

    samples: tuple[Sample, ...]
    at: float = field(default_factory=time.monotonic)

    def select(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of ``name`` whose labels match (0.0 when there are none)."""
        return sum(s.value for s in self.select(name, **labels))

    def names(self) -> list[str]:
        return sorted({s.name for s in self.samples})


def parse(text: str) -> Metrics:
    """Prometheus' text exposition format, read by prometheus_client's own parser (the library
    vLLM exports its metrics with). A line it cannot read is named."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    list(text_string_to_metric_families(line + "\n"))
                except ValueError:
                    raise ValueError(f"not a Prometheus sample line: {line.strip()!r}") from None
        raise
    return Metrics(tuple(Sample(s.name, dict(s.labels), float(s.value)) for f in families for s in f.samples))


def scrape(target: Any, timeout: float = 5.0) -> Metrics:
    """``GET /metrics`` and parse it. ``target`` is a server or an ``Endpoint`` (its key is sent:
    a class gateway asks for one), or the server's root URL as a string (no key)."""
    if isinstance(target, str):
        reply = requests.get(target.rstrip("/") + "/metrics", timeout=timeout)
    else:
        reply = as_endpoint(target).get("/metrics", timeout=timeout)
    reply.raise_for_status()
    return parse(reply.text)


def running_requests(target: Any) -> int:
    """How many requests the engine is generating for right now."""
    return int(scrape(target).value("vllm:num_requests_running"))


# --------------------------------------------------------------------------- over time

def histogram_mean(metrics: Metrics, name: str, **labels: str) -> float | None:
    """Mean of a Prometheus histogram ``name`` (``_sum / _count``); None before any observation.

    ``histogram_mean(m, "vllm:time_to_first_token_seconds")`` is the mean time to first token
    of every request since the server started.
    """
    n = metrics.value(name + "_count", **labels)
    return metrics.value(name + "_sum", **labels) / n if n else None


class Sampler:
    """Scrape ``/metrics`` every ``every`` seconds in a background thread, while a load runs::

        with Sampler(server, every=0.5) as sampler:
            run_the_load()
        series = timeseries(sampler.samples)

    A failed scrape is skipped (counted in ``errors``): sampling must never break the load.
    """

    def __init__(self, target: Any, every: float = 0.5, timeout: float = 5.0):
        import threading

        self.target, self.every, self.timeout = target, every, timeout
        self.samples: list[Metrics] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.samples.append(scrape(self.target, timeout=self.timeout))
            except (requests.RequestException, httpx.HTTPError, ValueError):
                self.errors += 1
            if self._stop.wait(self.every):
                return

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> list[Metrics]:
        """Stop after one last scrape, so the series ends with the load's final counts."""
        self._stop.set()
        self._thread.join()
        try:
            self.samples.append(scrape(self.target, timeout=self.timeout))
        except (requests.RequestException, httpx.HTTPError, ValueError):
            self.errors += 1
        return self.samples

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def timeseries(samples: list[Metrics]) -> dict[str, list]:
    """What the periodic log line summarised, per interval between consecutive scrapes.

    Keys: ``t`` (seconds since the first scrape, at each interval's end), ``prompt_tps`` and
    ``generation_tps`` (tokens/s over the interval), ``running`` and ``waiting`` (requests at
    the interval's end), ``ttft`` (mean time to first token of the requests whose first token
    came in the interval, None when none did), ``kv_cache`` (usage, 0 to 1).
    """
    keys = ("t", "prompt_tps", "generation_tps", "running", "waiting", "ttft", "kv_cache")
    series: dict[str, list] = {k: [] for k in keys}
    ttft = "vllm:time_to_first_token_seconds"
    for before, after in zip(samples, samples[1:]):
        span = after.at - before.at
        if span <= 0:
            continue
        series["t"].append(after.at - samples[0].at)
        for key, name in (("prompt_tps", "vllm:prompt_tokens_total"),
                          ("generation_tps", "vllm:generation_tokens_total")):
            series[key].append((after.value(name) - before.value(name)) / span)
        series["running"].append(after.value("vllm:num_requests_running"))
        series["waiting"].append(after.value("vllm:num_requests_waiting"))
        firsts = after.value(ttft + "_count") - before.value(ttft + "_count")
        series["ttft"].append((after.value(ttft + "_sum") - before.value(ttft + "_sum")) / firsts
                              if firsts else None)
        series["kv_cache"].append(after.value("vllm:kv_cache_usage_perc"))
    return series


def wait_for_running(target: Any, count: int = 0, timeout: float = 10.0, poll: float = 0.1) -> float:
    """Wait until the engine runs ``count`` requests; return the seconds it took.

    After a client cancels, vLLM notices the closed connection and aborts the request: this is
    how a notebook (or a test) sees the cancellation reach the server.
    """
    started = time.monotonic()
    while True:
        running = running_requests(target)
        if running == count:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{getattr(target, 'url', target)} still runs {running} request(s) after {timeout:.0f} s (waited for {count})")
        time.sleep(poll)
