"""Measure what the origin's ``requests`` loop loses, on real bytes from the server.

The origin reads the stream as ``for chunk in response:`` (pieces of at most 128 bytes) and
decodes each piece on its own with ``errors='ignore'``. A character whose UTF-8 bytes are cut
by a piece boundary is dropped without a word. Where the boundaries fall depends on the path
between server and client: a direct connection to vLLM 0.32 sends each event as its own HTTP
chunk, so the pieces restart at every event, but a proxy, compression or a slow network
re-chunks the body anywhere. So we record the real body once and cut it at every possible
offset, then compare the origin's decoding with ``helpers.stream.sse`` on exactly the same pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import requests

from ..endpoint import as_endpoint
from ..stream.chat import Content, pieces_from_chunk
from ..stream.sse import iter_events

ORIGIN_PIECE = 128          # requests' Response.__iter__ reads iter_content(128)


def record_body(server: Any, messages: list[dict] | str, **params: Any) -> bytes:
    """The raw bytes of one real streamed chat answer (``stream: true``)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    api = as_endpoint(server)
    with requests.post(api.base_url + "/chat/completions", headers=api.headers(), stream=True, timeout=120,
                       json={"model": api.model, "messages": messages, "stream": True, **params}) as reply:
        reply.raise_for_status()
        return b"".join(reply.iter_content(chunk_size=None))


def cut(body: bytes, size: int = ORIGIN_PIECE, offset: int = 0) -> list[bytes]:
    """``body`` in pieces of ``size`` bytes, the first one ``offset`` bytes long (if > 0)."""
    pieces = [body[:offset]] if offset else []
    pieces += [body[i:i + size] for i in range(offset, len(body), size)]
    return [p for p in pieces if p]


def _content(payloads: Sequence[dict]) -> str:
    return "".join(p.text for payload in payloads for p in pieces_from_chunk(payload)
                   if isinstance(p, Content) and p.index == 0)


def origin_text(pieces: Sequence[bytes]) -> str:
    """The answer as the origin's decoding leaves it: each piece decoded alone, errors ignored.

    (Generous to the origin: its ``.strip()`` on each piece, which also eats spaces at piece
    edges, is left out, and the ``data:`` lines are then parsed properly.)
    """
    decoded = "".join(piece.decode("utf-8", errors="ignore") for piece in pieces)
    payloads = [json.loads(line[len("data:"):]) for line in decoded.split("\n")
                if line.startswith("data:") and line[len("data:"):].strip() != "[DONE]"]
    return _content(payloads)


def exact_text(pieces: Sequence[bytes]) -> str:
    """The answer as ``helpers.stream.sse`` reads the same pieces."""
    return _content([json.loads(e.data) for e in iter_events(pieces) if e.data != "[DONE]"])


@dataclass(frozen=True)
class LossReport:
    answer: str                 # the exact answer
    lost: tuple[int, ...]       # characters the origin's decoding lost, for each offset
    exact_ok: bool              # helpers.stream.sse gave the exact answer at every offset
    worst: str                  # the origin's text at the worst offset

    @property
    def offsets(self) -> int:
        return len(self.lost)

    @property
    def lossy_offsets(self) -> int:
        return sum(1 for n in self.lost if n)

    def __str__(self) -> str:
        multibyte = sum(1 for ch in self.answer if len(ch.encode()) > 1)
        return (f"answer: {len(self.answer)} characters, {multibyte} of them multi-byte\n"
                f"origin's decoding: loses characters at {self.lossy_offsets} of {self.offsets} offsets "
                f"(at most {max(self.lost)}, on average {sum(self.lost) / self.offsets:.1f} per answer)\n"
                f"helpers.stream.sse: exact at {'every' if self.exact_ok else 'NOT every'} offset")


def measure_loss(body: bytes, size: int = ORIGIN_PIECE) -> LossReport:
    """Cut ``body`` into ``size``-byte pieces at every offset and count what each decoding loses."""
    answer = exact_text([body])
    lost, exact_ok, worst, worst_lost = [], True, answer, -1
    for offset in range(size):
        pieces = cut(body, size, offset)
        damaged = origin_text(pieces)
        lost.append(len(answer) - len(damaged))
        if lost[-1] > worst_lost:
            worst, worst_lost = damaged, lost[-1]
        exact_ok = exact_ok and exact_text(pieces) == answer
    return LossReport(answer, tuple(lost), exact_ok, worst)
