"""Read the numbers a vLLM server exports at ``/metrics`` (Prometheus text format).

The periodic "Avg prompt throughput ..." log line is a summary of these same counters; reading
them directly gives the numbers without any log noise::

    from helpers.server_metrics import scrape
    m = scrape(server.url)
    m.value("vllm:num_requests_running")           # summed over every label set
    m.value("vllm:request_success_total", finished_reason="abort")
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import requests

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


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
    """Parse Prometheus' text exposition format (comments and type lines are skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        name, raw_labels, raw_value = match.groups()
        labels = {}
        for key, value in _LABEL.findall(raw_labels or ""):
            labels[key] = re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group()], value)
        samples.append(Sample(name, labels, float(raw_value)))
    return Metrics(tuple(samples))


def scrape(url: str, timeout: float = 5.0) -> Metrics:
    """``GET {url}/metrics`` and parse it (``url`` is the server's root, e.g. ``server.url``)."""
    reply = requests.get(url.rstrip("/") + "/metrics", timeout=timeout)
    reply.raise_for_status()
    return parse(reply.text)


def running_requests(url: str) -> int:
    """How many requests the engine is generating for right now."""
    return int(scrape(url).value("vllm:num_requests_running"))
