"""What a peer can hold before it has sent one whole request: bounded here, below the gateway.

uvicorn (0.55) puts no limit on how long a request's headers may take, and its
``limit_concurrency`` counts idle connections too. Seen on the class gateway: 600 sockets that
each sent half a request line and waited got every student, valid key or not, a 503 until they
closed. Anyone on the class network can do that with a few lines of Python.

``guarded_h11(...)`` is uvicorn's h11 protocol with two bounds added:

* **per peer address**: at most ``per_peer`` connections open at once; one more is closed at once
  (before a byte is read), so one machine cannot take the server's connection budget;
* **time to a whole request head**: a new connection must deliver a complete request line and
  headers within ``header_timeout`` seconds, or it is closed; after an answer, uvicorn's keep-alive
  timeout closes an idle connection, and a next head that stalls is closed ``header_timeout``
  after that. A request in progress (a long stream) is never cut.

Bodies are bounded by the gateway itself (size, time, and the key's concurrency, counted before
the body is read). The subclass uses uvicorn's ``H11Protocol`` hooks ``connection_made``,
``handle_events``, ``on_response_complete``, ``connection_lost`` and its ``cycle`` and ``loop``
attributes; ``tests/classroom/test_gateway_process.py`` fails if a uvicorn release changes them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout: float, per_peer: int, log: Callable[[str], None],
                idle_timeout: float = 15.0) -> type[H11Protocol]:
    """An ``H11Protocol`` class with the two bounds above (pass it as uvicorn's ``http=``, with
    ``ws="none"``: a WebSocket upgrade hands the socket to another protocol object, whose end this
    one would never see, so the peer's count would never come down). ``idle_timeout`` is
    uvicorn's ``timeout_keep_alive``: after an answer, uvicorn closes an idle connection itself
    (gracefully) at that time; a next request's head that starts and then stalls is closed
    ``header_timeout`` later."""
    open_by_peer: Counter[str] = Counter()
    told: dict[str, float] = {}           # peer -> when we last logged its refusal (once a minute)

    class GuardedH11(H11Protocol):
        _peer: str | None = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:   # type: ignore[override]
            super().connection_made(transport)
            peer = str((transport.get_extra_info("peername") or ("unknown",))[0])
            if open_by_peer[peer] >= per_peer:
                now = time.monotonic()
                if now - told.get(peer, -1e9) > 60:
                    told[peer] = now
                    log(f"connections: {peer} has {per_peer} open, the most one address may hold; "
                        f"closing its new ones")
                transport.abort()
                return
            open_by_peer[peer] += 1
            self._peer = peer
            self._arm()

        def _arm(self, after: float = header_timeout) -> None:
            self._disarm()
            self._timer = self.loop.call_later(after, self._head_late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _waiting_for_a_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_late(self) -> None:
            self._timer = None
            if self._waiting_for_a_head() and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_a_head():      # a whole head arrived: the request is the app's now
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._waiting_for_a_head():
                self._arm(idle_timeout + header_timeout)   # uvicorn closes it idle first; a stalled head, then

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._peer is not None:
                open_by_peer[self._peer] -= 1
                if open_by_peer[self._peer] <= 0:
                    del open_by_peer[self._peer]
                self._peer = None
            super().connection_lost(exc)

    GuardedH11.open_by_peer = open_by_peer       # for tests and the teacher's curiosity
    return GuardedH11
