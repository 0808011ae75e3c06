"""Timing of one streamed answer: time to first token, tokens/s, total time, token count.

Token counts come from the server's ``usage`` (exact) when the request asked for it with
``stream_options={"include_usage": True}``; otherwise the number of content pieces stands in
for it (vLLM sends about one piece per token, but not exactly: it holds back bytes of an
unfinished UTF-8 character), and ``tokens_from`` says which it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class StreamStats:
    started: float                      # time.perf_counter() when the request was sent
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended_at: float | None = None
    pieces: int = 0                     # content pieces received
    prompt_tokens: int | None = None    # from usage
    completion_tokens: int | None = None

    @classmethod
    def begin(cls) -> "StreamStats":
        return cls(started=time.perf_counter())

    def on_content(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.pieces += 1

    def on_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens

    def end(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.perf_counter()

    # ------------------------------------------------------------------ derived
    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else self.pieces

    @property
    def tokens_from(self) -> str:
        return "usage" if self.completion_tokens is not None else "pieces"

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def total_seconds(self) -> float:
        return (self.ended_at if self.ended_at is not None else time.perf_counter()) - self.started

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token: (tokens - 1) / (last token - first token)."""
        if self.first_token_at is None or self.last_token_at is None or self.tokens < 2:
            return None
        span = self.last_token_at - self.first_token_at
        return (self.tokens - 1) / span if span > 0 else None

    def as_dict(self) -> dict:
        return {"time_to_first_token_s": self.time_to_first_token, "tokens": self.tokens,
                "tokens_from": self.tokens_from, "tokens_per_s": self.tokens_per_s,
                "total_s": self.total_seconds, "prompt_tokens": self.prompt_tokens}

    def __str__(self) -> str:
        parts = []
        if self.time_to_first_token is not None:
            parts.append(f"first token after {self.time_to_first_token:.2f} s")
        parts.append(f"{self.tokens} tokens ({self.tokens_from}) in {self.total_seconds:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        return " · ".join(parts)
