"""One interface over every way of streaming an answer: ``requests`` + our SSE reader, and the
``openai`` SDK (sync and async). Each yields the same typed pieces and keeps the same stats.

    from helpers.stream.chat import requests_chat, openai_chat, Content

    stream = requests_chat(server, "Name three colours.", max_tokens=32)
    for piece in stream:
        if isinstance(piece, Content):
            print(piece.text, end="", flush=True)
    print(stream.stats)         # time to first token, tokens/s (from usage), total time

What each source does right that the common snippets get wrong:

* **requests**: the body is read as it arrives (``iter_content(chunk_size=None)``) and parsed by
  ``helpers.stream.sse`` on bytes, so no character is lost at a chunk boundary; ``[DONE]`` ends the
  answer; an ``{"error": ...}`` event raises ``StreamErrorEvent``; a non-200 answer raises
  ``StreamHTTPError`` with the server's message; a cut connection raises
  ``StreamInterruptedError`` instead of returning a silently short answer.
* **openai**: usage is requested (``stream_options={"include_usage": True}``), and its chunk has
  an **empty** ``choices`` list, which the usual ``chunk.choices[0]`` loop crashes on
  (vllm-project/vllm#7299): pieces are read from every choice present, none assumed.
* **Cancelling** (``cancel()`` from any thread, ``close()``, or leaving the loop early) closes
  the HTTP connection; vLLM sees the client go and aborts the request, freeing its batch slot.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Union

import requests

from ..endpoint import as_endpoint
from ..errors import IncompleteEventError, StreamErrorEvent, StreamHTTPError, StreamInterruptedError
from .sse import SSEDecoder
from .stats import StreamStats

DONE = "[DONE]"


# ---------------------------------------------------------------------- the pieces
@dataclass(frozen=True)
class Role:
    role: str
    index: int = 0


@dataclass(frozen=True)
class Content:
    text: str
    index: int = 0


@dataclass(frozen=True)
class Finish:
    reason: str
    index: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


Piece = Union[Role, Content, Finish, Usage]


def _get(obj: Any, name: str) -> Any:
    """A field of a chunk, whether it is parsed JSON (dict) or an openai SDK object."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def pieces_from_chunk(chunk: Any) -> list[Piece]:
    """The pieces in one chunk of a chat or plain completion stream (dict or SDK object)."""
    pieces: list[Piece] = []
    for choice in _get(chunk, "choices") or ():       # empty in the usage chunk
        index = _get(choice, "index") or 0
        delta = _get(choice, "delta")
        if delta is not None:                          # chat completion
            role = _get(delta, "role")
            if role:
                pieces.append(Role(role, index))
            text = _get(delta, "content")
        else:                                          # plain completion
            text = _get(choice, "text")
        if text:
            pieces.append(Content(text, index))
        reason = _get(choice, "finish_reason")
        if reason:
            pieces.append(Finish(reason, index))
    usage = _get(chunk, "usage")
    if usage:
        pieces.append(Usage(int(_get(usage, "prompt_tokens") or 0), int(_get(usage, "completion_tokens") or 0),
                            int(_get(usage, "total_tokens") or 0)))
    return pieces


def error_in(payload: Any) -> StreamErrorEvent | None:
    """The error an event carries: ``{"error": {...}}`` (vLLM, OpenAI) or ``{"object": "error"}``."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        return StreamErrorEvent(str(error.get("message") or error), type=error.get("type"), code=error.get("code"))
    if error:
        return StreamErrorEvent(str(error))
    if payload.get("object") == "error":
        return StreamErrorEvent(str(payload.get("message")), type=payload.get("type"), code=payload.get("code"))
    return None


# ---------------------------------------------------------------------- one answer
class _Answer:
    """What both the sync and the async stream keep: text per choice, finish, usage, stats."""

    def __init__(self, source: str, stats: StreamStats | None = None):
        self.source = source
        self.stats = stats or StreamStats.begin()
        self.role: str | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.cancelled = False
        self._parts: dict[int, list[str]] = {}
        self._unfinished: set[int] = set()
        self._cancel = threading.Event()

    def _take(self, piece: Piece) -> None:
        if isinstance(piece, Content):
            self.stats.on_content()
            self._parts.setdefault(piece.index, []).append(piece.text)
            self._unfinished.add(piece.index)
        elif isinstance(piece, Finish):
            self._unfinished.discard(piece.index)
            self._parts.setdefault(piece.index, [])
            if piece.index == 0:
                self.finish_reason = piece.reason
        elif isinstance(piece, Role):
            self._unfinished.add(piece.index)
            if piece.index == 0:
                self.role = piece.role
        elif isinstance(piece, Usage):
            self.usage = piece
            self.stats.on_usage(piece.prompt_tokens, piece.completion_tokens)

    @property
    def text(self) -> str:
        """The answer so far (choice 0)."""
        return "".join(self._parts.get(0, ()))

    def texts(self) -> list[str]:
        """Every choice's answer (``n`` > 1), by index."""
        return ["".join(self._parts[i]) for i in sorted(self._parts)]

    @property
    def complete(self) -> bool:
        return bool(self._parts) and not self._unfinished

    def cancel(self) -> None:
        """Ask the stream to stop; safe from any thread (a Stop button's callback)."""
        self._cancel.set()

    def _check_whole(self, saw_done: bool | None) -> None:
        if self.cancelled:
            return
        if saw_done is False or not self.complete:
            missing = "no [DONE]" if saw_done is False else "no finish reason"
            raise StreamInterruptedError(
                f"the {self.source} stream ended early ({missing}) after {self.stats.pieces} piece(s); "
                f"the answer is incomplete: {self.text[-60:]!r}")

    def __repr__(self) -> str:
        state = ("cancelled" if self.cancelled else self.finish_reason and f"finished ({self.finish_reason})"
                 or "streaming")
        return f"<{type(self).__name__} via {self.source}, {state}: {self.stats}>"


class ChatStream(_Answer):
    """A streamed answer: iterate for pieces; ``text``, ``stats``, ``finish_reason`` as it goes."""

    def __init__(self, chunks: Iterable[Any], close: Callable[[], None], source: str,
                 done_marker: bool = False, stats: StreamStats | None = None):
        super().__init__(source, stats)
        self._chunks = chunks
        self._close = close
        self._done_marker = done_marker
        self._iterated = False

    def __iter__(self) -> Iterator[Piece]:
        if self._iterated:
            raise RuntimeError("a stream can be read once")
        self._iterated = True
        saw_done = False
        try:
            for chunk in self._chunks:
                if self._cancel.is_set():
                    self._stop()
                    break
                if chunk is DONE:
                    saw_done = True
                    break
                for piece in pieces_from_chunk(chunk):
                    self._take(piece)
                    yield piece
        except GeneratorExit:                      # the reader left the loop: cancel
            self._stop()
            raise
        except Exception as err:
            if self._cancel.is_set():              # closing the connection ended the read
                self._stop()
            else:
                raise _as_stream_error(err, self) from err
        finally:
            self.stats.end()
            if not self.complete and not self.cancelled:
                self._stop(cancelled=False)        # left early or failed: free the server's slot
        self._check_whole(saw_done if self._done_marker else None)

    def _stop(self, cancelled: bool = True) -> None:
        self.cancelled = self.cancelled or cancelled
        self._close()

    def close(self) -> None:
        """Cancel now (from the thread that reads the stream)."""
        self._cancel.set()
        self._stop()

    def collect(self) -> str:
        """Read to the end and return the text."""
        for _ in self:
            pass
        return self.text

    def text_pieces(self) -> Iterator[str]:
        """Only the text, piece by piece (choice 0)."""
        for piece in self:
            if isinstance(piece, Content) and piece.index == 0:
                yield piece.text

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        if not self.complete:
            self.close()


class AsyncChatStream(_Answer):
    """The same over the async ``openai`` client: ``async for piece in stream``."""

    def __init__(self, sdk_stream: Any, stats: StreamStats | None = None):
        super().__init__("openai (async)", stats)
        self._sdk = sdk_stream
        self._iterated = False

    async def __aiter__(self) -> AsyncIterator[Piece]:
        if self._iterated:
            raise RuntimeError("a stream can be read once")
        self._iterated = True
        try:
            async for chunk in self._sdk:
                if self._cancel.is_set():
                    self.cancelled = True
                    break
                for piece in pieces_from_chunk(chunk):
                    self._take(piece)
                    yield piece
        except GeneratorExit:                      # the reader left the loop: cancel
            self.cancelled = True
            raise
        except Exception as err:
            if not self._cancel.is_set():
                raise _as_stream_error(err, self) from err
            self.cancelled = True
        finally:
            self.stats.end()
            if not self.complete:
                await self._sdk.close()
        self._check_whole(None)

    async def collect(self) -> str:
        async for _ in self:
            pass
        return self.text

    async def close(self) -> None:
        self._cancel.set()
        self.cancelled = True
        await self._sdk.close()


def _as_stream_error(err: Exception, answer: _Answer) -> Exception:
    """The SDK's and requests' errors during a stream, as the helpers' own."""
    if isinstance(err, (StreamErrorEvent, StreamHTTPError, StreamInterruptedError)):
        return err
    if isinstance(err, (requests.exceptions.ChunkedEncodingError, requests.ConnectionError,
                        IncompleteEventError)):
        return StreamInterruptedError(f"the connection broke after {answer.stats.pieces} piece(s): {err}")
    try:
        import httpx
        import openai
    except ImportError:  # pragma: no cover
        return err
    if isinstance(err, (httpx.TransportError, openai.APIConnectionError)):
        return StreamInterruptedError(f"the connection broke after {answer.stats.pieces} piece(s): {err}")
    if isinstance(err, openai.APIError) and not isinstance(err, openai.APIStatusError):
        body = err.body if isinstance(err.body, dict) else {}
        return StreamErrorEvent(err.message, type=body.get("type"), code=body.get("code"))
    return err


# ---------------------------------------------------------------------- sources
def _messages(messages: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def requests_stream(url: str, body: dict, *, api_key: str | None = None, timeout: float = 120.0,
                    session: requests.Session | None = None, chunk_size: int | None = None) -> ChatStream:
    """POST ``body`` with ``stream: true`` to ``url`` and read the answer as SSE, exactly."""
    stats = StreamStats.begin()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    post = (session or requests).post
    try:
        response = post(url, json={**body, "stream": True}, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as err:     # refused, or no answer in time
        raise StreamInterruptedError(f"could not reach {url}: {err}") from None
    if response.status_code != 200:
        with response:
            raise StreamHTTPError(response.status_code, _server_message(response))

    def chunks() -> Iterator[Any]:
        decoder = SSEDecoder()
        for raw in response.iter_content(chunk_size=chunk_size):
            for event in decoder.feed(raw):
                if event.data == DONE:
                    response.close()                  # the answer is whole: free the connection
                    yield DONE
                    return
                payload = json.loads(event.data)
                problem = error_in(payload)
                if problem is not None:
                    raise problem
                yield payload
        decoder.close()

    return ChatStream(chunks(), response.close, "requests", done_marker=True, stats=stats)


def _server_message(response: requests.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason
    problem = error_in(payload)
    if problem is not None:
        return problem.message
    return str(payload.get("detail") or payload.get("message") or payload)[:500]


def requests_chat(target: Any, messages: str | list[dict], *, model: str | None = None,
                  api_key: str | None = None, include_usage: bool = True, timeout: float = 120.0,
                  **params) -> ChatStream:
    """Stream a chat answer with ``requests`` from a server, an ``Endpoint``, or a base URL + ``model``."""
    return _requests_generate(target, "chat/completions", {"messages": _messages(messages)}, model, api_key,
                              include_usage, timeout, params)


def requests_completion(target: Any, prompt: str, *, model: str | None = None,
                        api_key: str | None = None, include_usage: bool = True, timeout: float = 120.0,
                        **params) -> ChatStream:
    """Stream a plain (non-chat) completion with ``requests``."""
    return _requests_generate(target, "completions", {"prompt": prompt}, model, api_key, include_usage,
                              timeout, params)


def _requests_generate(target: Any, endpoint: str, inputs: dict, model: str | None, api_key: str | None,
                       include_usage: bool, timeout: float, params: dict) -> ChatStream:
    api = as_endpoint(target, model, api_key)
    if api.uds:      # requests speaks TCP only: it would look up UDS_URL's made-up host name
        raise ValueError(f"{api.where} is a Unix socket (a class server's vLLM, reachable only on this machine): "
                         f"requests cannot open one; stream with openai_chat(endpoint.client(), ...), which "
                         f"goes over it, or through the class gateway's URL")
    body = {"model": api.model, **inputs, **params}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return requests_stream(f"{api.base_url}/{endpoint}", body, api_key=api.api_key, timeout=timeout)


def wrap_openai(sdk_stream: Any, stats: StreamStats | None = None) -> ChatStream:
    """A ``ChatStream`` over a stream the ``openai`` SDK returned (``stream=True``)."""
    return ChatStream(sdk_stream, sdk_stream.close, "openai", stats=stats)


def openai_chat(client: Any, messages: str | list[dict], *, model: str, include_usage: bool = True,
                **params) -> ChatStream:
    """Stream a chat answer with an ``openai.OpenAI`` client (``server.client()``)."""
    stats = StreamStats.begin()
    try:
        sdk_stream = client.chat.completions.create(**_openai_request(model, messages, include_usage, params))
    except Exception as err:
        raise _openai_refusal(err) from err
    return wrap_openai(sdk_stream, stats)


async def async_openai_chat(client: Any, messages: str | list[dict], *, model: str,
                            include_usage: bool = True, **params) -> AsyncChatStream:
    """Stream a chat answer with an ``openai.AsyncOpenAI`` client: ``async for piece in ...``."""
    stats = StreamStats.begin()
    try:
        sdk_stream = await client.chat.completions.create(**_openai_request(model, messages, include_usage, params))
    except Exception as err:
        raise _openai_refusal(err) from err
    return AsyncChatStream(sdk_stream, stats)


def _openai_request(model: str, messages: str | list[dict], include_usage: bool, params: dict) -> dict:
    """The keyword arguments of a streamed ``chat.completions.create`` (sync or async)."""
    if include_usage:
        params = {**params, "stream_options": {"include_usage": True}}
    return {"model": model, "messages": _messages(messages), "stream": True, **params}


def _openai_refusal(err: Exception) -> Exception:
    import openai
    if isinstance(err, openai.APIStatusError):
        body = err.body                      # the SDK gives the "error" object itself, or the text
        if isinstance(body, dict):
            problem = error_in(body)
            message = (problem.message if problem
                       else str(body.get("message") or body.get("detail") or body)[:500])
        elif isinstance(body, str) and body.strip():                   # a plain-text answer
            message = body.strip()[:500]
        else:
            message = err.message
        return StreamHTTPError(err.status_code, message)
    if isinstance(err, openai.APIConnectionError):
        return StreamInterruptedError(f"could not reach the server: {err}")
    return err
