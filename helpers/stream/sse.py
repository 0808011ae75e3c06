"""Server-Sent Events, read exactly: bytes in any chunking -> whole events.

What the origin's ``chunk.decode('utf-8', errors='ignore')`` gets wrong, and this gets right:

* **Lines are split on bytes, then decoded.** ``\\n`` and ``\\r`` never occur inside a multi-byte
  UTF-8 character, so a Chinese character or an emoji cut across two network chunks is joined
  again before it is decoded: nothing is dropped. (Splitting decoded text with ``str.splitlines``
  would also break at U+2028 inside JSON; splitting bytes does not.)
* **A line may arrive in pieces**, several events may arrive in one chunk, and ``\\r\\n``, ``\\n``
  and a lone ``\\r`` all end a line (``\\r`` at the end of one chunk and ``\\n`` at the start of
  the next are one line end).
* **Events end at a blank line.** ``data:`` lines of one event are joined with ``\\n``; lines
  starting with ``:`` are comments (keep-alives); ``event:``, ``id:`` and ``retry:`` are kept as
  the WHATWG spec says; unknown fields are ignored.

This module knows nothing of OpenAI or vLLM: ``helpers.stream.chat`` turns these events into answer
pieces. Used as::

    decoder = SSEDecoder()
    for chunk in response.iter_content(chunk_size=None):
        for event in decoder.feed(chunk):
            ...
    decoder.close()          # raises IncompleteEventError if the stream stopped mid-event
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import IncompleteEventError


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental SSE parser: ``feed(bytes)`` returns the events completed by those bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()      # bytes of the line being received
        self._skip_lf = False           # the last chunk ended in \r: a leading \n is its pair
        self._first_line = True         # a UTF-8 byte order mark may start the stream
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._fields_seen = False       # any field since the last dispatch (for close())

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        events: list[ServerSentEvent] = []
        start = 0
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                start = 1
        size = len(chunk)
        while start < size:
            lf = chunk.find(b"\n", start)
            cr = chunk.find(b"\r", start, lf if lf >= 0 else size)
            end = cr if cr >= 0 else lf
            if end < 0:                                   # no line end in the rest of the chunk
                self._buffer += chunk[start:]
                break
            if self._buffer:
                self._buffer += chunk[start:end]
                line = bytes(self._buffer)
                self._buffer.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            if end == cr:                                 # \r, maybe followed by \n
                if start < size:
                    if chunk[start:start + 1] == b"\n":
                        start += 1
                else:
                    self._skip_lf = True
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> None:
        """The stream has ended: raise if it ended in the middle of an event."""
        if self._buffer or self._fields_seen:
            raise IncompleteEventError(
                "the stream ended in the middle of an event (no blank line after "
                f"{(bytes(self._buffer) or b'its last field')[:80]!r}): the connection was cut")

    # ------------------------------------------------------------------ one line
    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if self._first_line:
            self._first_line = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        if not raw:
            return self._dispatch()
        if raw[:1] == b":":                               # a comment, e.g. a keep-alive
            return None
        line = raw.decode("utf-8", errors="replace")    # whole line: no character is cut
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._fields_seen = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self._fields_seen = False
        if not self._data:                                # spec: no data, no event
            self._event = ""
            return None
        event = ServerSentEvent(data="\n".join(self._data), event=self._event or "message",
                                id=self._last_id, retry=self._retry)
        self._data.clear()
        self._event = ""
        return event


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Every event of a byte stream; raises ``IncompleteEventError`` if it stops mid-event."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    decoder.close()
