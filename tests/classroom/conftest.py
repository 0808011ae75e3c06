"""Fixtures the classroom tests share (their helpers are in ``classroom_support``)."""

from __future__ import annotations

import pytest

from classroom_support import FakeVLLM, ThreadServer


@pytest.fixture
def fake():
    """A fake vLLM in a thread on loopback that records what reaches it (its ``url`` is set)."""
    upstream = FakeVLLM()
    with ThreadServer(upstream.app()) as server:
        upstream.url = server.url
        yield upstream
