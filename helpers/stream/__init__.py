"""Streamed answers: ``sse`` (bytes to events, exactly), ``chat`` (one piece interface over
``requests`` and ``openai``, sync and async), ``stats`` (time to first token, tokens/s) and
``widget`` (a live view with a Stop button that makes vLLM abort the request)."""
