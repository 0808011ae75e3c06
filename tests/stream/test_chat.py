"""Tests for helpers/chat_stream.py: one streamed answer, whole or a named error, from every source.

* ``pieces_from_chunk`` reads chat and plain-completion chunks, as parsed JSON and as ``openai``
  SDK objects alike (roles, text, finish reasons, usage, several choices by index); the usage
  chunk's empty ``choices`` is fine. ``error_in`` finds both error shapes vLLM has used.
* ``ChatStream`` over a plain iterable: text, finish, usage and stats kept as it goes; leaving
  the loop, failing and cancelling all close the source; a stream is read once.
* Against a small local HTTP server (tests/sse_fault_server.py, 127.0.0.1 only) that replays the
  recorded vLLM 0.32.0 stream in odd chunkings and produces the faults vLLM will not produce on
  demand, through ``requests`` (our SSE reader), the ``openai`` SDK and its async client:

  - the exact text (multi-byte characters cut across HTTP chunks), usage 33/33/66, finish "stop"
    and stats whose tokens come from usage;
  - an ``{"error": ...}`` event mid-stream raises ``StreamErrorEvent`` with the server's message;
  - a 404 (vLLM's own body) or a 500 in plain text raises ``StreamHTTPError`` with the status and
    the server's words;
  - a cut connection (mid-chunk, after a whole event, a body ending without ``[DONE]``), nothing
    listening, or a server that stalls raises ``StreamInterruptedError``, never a short answer;
  - leaving the loop early or ``cancel()`` from another thread closes the connection, and the
    server sees the client go.

Every wait is bounded and every server and thread is gone when a test ends (checked).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import openai
import pytest
import requests
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from helpers.stream import chat as chat_stream
from helpers.stream.chat import (DONE, AsyncChatStream, ChatStream, Content, Finish, Role, Usage,
                                 async_openai_chat, error_in, openai_chat, pieces_from_chunk,
                                 requests_chat, requests_completion, requests_stream, wrap_openai)
from helpers.endpoint import Endpoint
from helpers.errors import StreamErrorEvent, StreamHTTPError, StreamInterruptedError
from helpers.errors import IncompleteEventError
from helpers.stream.sse import SSEDecoder
from sse_fault_server import (DATA, FaultServer, Reply, free_port, json_reply, split_at, split_every,
                              text_reply)

CHAT = (DATA / "sse_vllm_chat_zh_usage.sse").read_bytes()
COMPLETION = (DATA / "sse_vllm_completion.sse").read_bytes()
NOT_FOUND = (DATA / "vllm_404_unknown_model.json").read_bytes()
CHAT_TEXT = "你好，世界！🚀 vLLM 流式输出。"
COMPLETION_TEXT = " Paris.\n\nThe answer is:"
CHAT_USAGE = Usage(prompt_tokens=33, completion_tokens=33, total_tokens=66)
MODEL = "smollm2-135m-instruct"

EVENTS = [block + b"\n\n" for block in CHAT.split(b"\n\n")[:-1]]       # each "data: ...\n\n"
CHUNKS = [json.loads(event[len(b"data: "):]) for event in EVENTS[:-1]]  # the parsed JSON, no [DONE]
FIRST_TEXT = 2                      # EVENTS[2] carries the first character ("你")
FINISH = len(EVENTS) - 3            # the event with finish_reason "stop"; then usage, [DONE]
ERROR = {"message": "The engine died: CUDA error: an illegal memory access was encountered",
         "type": "InternalServerError", "param": None, "code": 500}
ERROR_EVENT = b"data: " + json.dumps({"error": ERROR}).encode() + b"\n\n"

SOURCES = ["requests", "openai"]
WAIT = 5.0                          # the longest any test waits for anything


# --- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_thread_left():
    """Every thread a test starts (servers, their handlers, cancelling threads) ends with it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left:
            return
        time.sleep(0.02)
    pytest.fail(f"threads left running: {[t.name for t in left]}")


def sdk_client(server: FaultServer, timeout: float = WAIT) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=timeout)


@contextmanager
def chat_via(source: str, server: FaultServer, timeout: float = WAIT, **params):
    """A ChatStream from ``source`` ("requests" or "openai") for a one-line question; the SDK
    client is closed afterwards. ``timeout`` is the read timeout."""
    if source == "requests":
        if timeout == WAIT:
            yield requests_chat(server.base_url, "Say hello in Chinese.", model=MODEL, **params)
        else:                                   # requests_chat sends its keywords in the body
            yield requests_stream(server.base_url + "/chat/completions", {"model": MODEL, **params},
                                  timeout=timeout)
        return
    with sdk_client(server, timeout) as client:
        yield openai_chat(client, "Say hello in Chinese.", model=MODEL, **params)


def run_async(server: FaultServer, use, **params):
    """``await use(stream)`` on an AsyncChatStream from ``openai.AsyncOpenAI``; bounded."""
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=WAIT)
        try:
            stream = await async_openai_chat(client, "Say hello in Chinese.", model=MODEL, **params)
            return await use(stream)
        finally:
            await client.close()
    return asyncio.run(asyncio.wait_for(main(), 3 * WAIT))


async def collect(stream: AsyncChatStream):
    await stream.collect()
    return stream


def assert_whole_chat_answer(stream) -> None:
    assert stream.text == CHAT_TEXT
    assert stream.usage == CHAT_USAGE
    assert (stream.finish_reason, stream.role) == ("stop", "assistant")
    assert stream.complete and not stream.cancelled
    assert (stream.stats.tokens, stream.stats.tokens_from) == (33, "usage")
    assert stream.stats.pieces == 18                       # content pieces; usage says 33 tokens
    assert stream.stats.prompt_tokens == 33
    assert stream.stats.ended_at is not None and stream.stats.time_to_first_token is not None


def inside_characters(data: bytes) -> list[int]:
    """Every offset of ``data`` that cuts a multi-byte UTF-8 character."""
    return [i for i in range(1, len(data)) if 0x80 <= data[i] < 0xC0]


# --- pieces_from_chunk ----------------------------------------------------------------------------

def test_recorded_chat_chunks_give_role_text_finish_and_usage():
    pieces = [piece for chunk in CHUNKS for piece in pieces_from_chunk(chunk)]
    assert pieces[0] == Role("assistant", 0)
    assert "".join(p.text for p in pieces if isinstance(p, Content)) == CHAT_TEXT
    assert [p for p in pieces if isinstance(p, Finish)] == [Finish("stop", 0)]
    assert pieces[-1] == CHAT_USAGE
    assert [type(p) for p in pieces].count(Role) == 1


def test_empty_content_is_no_piece_and_the_usage_chunk_has_no_choices():
    assert CHUNKS[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert pieces_from_chunk(CHUNKS[0]) == [Role("assistant", 0)]
    assert pieces_from_chunk(CHUNKS[1]) == []
    assert pieces_from_chunk(CHUNKS[FIRST_TEXT]) == [Content("你", 0)]
    assert CHUNKS[-1]["choices"] == []
    assert pieces_from_chunk(CHUNKS[-1]) == [CHAT_USAGE]


def test_sdk_chat_chunks_give_the_same_pieces_as_the_json():
    for chunk in CHUNKS:
        sdk = ChatCompletionChunk.model_validate(chunk)
        assert pieces_from_chunk(sdk) == pieces_from_chunk(chunk)
    assert pieces_from_chunk(ChatCompletionChunk.model_validate(CHUNKS[-1])) == [CHAT_USAGE]


def completion_chunks() -> list[dict]:
    blocks = COMPLETION.split(b"\n\n")[:-1]
    assert blocks[-1] == b"data: [DONE]"
    return [json.loads(block[len(b"data: "):]) for block in blocks[:-1]]


def test_plain_completion_chunks_give_text_finish_and_usage():
    pieces = [p for chunk in completion_chunks() for p in pieces_from_chunk(chunk)]
    assert "".join(p.text for p in pieces if isinstance(p, Content)) == COMPLETION_TEXT
    assert [p for p in pieces if not isinstance(p, Content)] == [
        Finish("length", 0), Usage(prompt_tokens=5, completion_tokens=8, total_tokens=13)]


def test_sdk_completion_chunks_give_the_same_pieces_as_the_json():
    # The SDK builds stream chunks without validation (finish_reason is null until the end).
    for chunk in completion_chunks():
        sdk = Completion.construct(**chunk)
        assert not any(isinstance(choice, dict) for choice in sdk.choices)
        assert pieces_from_chunk(sdk) == pieces_from_chunk(chunk)


def two_choice_chunks() -> list[dict]:
    """An n=2 chat stream: the choices interleave, each with its own index."""
    def chunk(*choices, usage=None):
        return {"object": "chat.completion.chunk", "id": "c", "created": 1, "model": MODEL,
                "choices": list(choices), **({"usage": usage} if usage else {})}

    def choice(index, content=None, role=None, finish=None):
        delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
        return {"index": index, "delta": delta, "finish_reason": finish}

    return [chunk(choice(0, "", role="assistant"), choice(1, "", role="assistant")),
            chunk(choice(1, "Bon")), chunk(choice(0, "Hel")), chunk(choice(0, "lo", finish="stop")),
            chunk(choice(1, "jour", finish="length")),
            chunk(usage={"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9})]


def test_several_choices_keep_their_index():
    chunks = two_choice_chunks()
    assert pieces_from_chunk(chunks[0]) == [Role("assistant", 0), Role("assistant", 1)]
    assert pieces_from_chunk(chunks[1]) == [Content("Bon", 1)]
    assert pieces_from_chunk(chunks[4]) == [Content("jour", 1), Finish("length", 1)]
    for chunk in chunks:
        assert pieces_from_chunk(ChatCompletionChunk.model_validate(chunk)) == pieces_from_chunk(chunk)


def test_a_chunk_without_choices_usage_or_index():
    assert pieces_from_chunk({}) == []
    assert pieces_from_chunk({"choices": None, "usage": None}) == []
    assert pieces_from_chunk({"choices": [{"delta": {"content": "x"}}]}) == [Content("x", 0)]
    assert pieces_from_chunk({"choices": [{"delta": {}, "finish_reason": None}]}) == []


# --- error_in ---------------------------------------------------------------------------------------

def test_error_in_reads_vllms_error_body():
    problem = error_in(json.loads(NOT_FOUND))
    assert isinstance(problem, StreamErrorEvent)
    assert problem.message == "The model `no-such-model` does not exist. Valid aliases: smollm2-135m-instruct."
    assert (problem.type, problem.code) == ("NotFoundError", 404)
    assert "NotFoundError, code 404" in str(problem) and problem.message in str(problem)


def test_error_in_reads_the_older_flat_error_shape():
    problem = error_in({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400})
    assert (problem.message, problem.type, problem.code) == ("bad", "BadRequestError", 400)


def test_error_in_reads_an_error_given_as_words():
    assert error_in({"error": "overloaded"}).message == "overloaded"


@pytest.mark.parametrize("payload", [CHUNKS[2], CHUNKS[-1], {"error": None}, {"error": ""}, [], "error", None])
def test_error_in_finds_nothing_in_an_ordinary_chunk(payload):
    assert error_in(payload) is None


# --- ChatStream over an iterable ---------------------------------------------------------------

class Source:
    """An iterable of chunks that remembers being closed, and may fail after some chunks."""

    def __init__(self, chunks, fail_with: Exception | None = None):
        self.chunks, self.fail_with, self.closed = list(chunks), fail_with, 0

    def __iter__(self):
        yield from self.chunks
        if self.fail_with is not None:
            raise self.fail_with

    def close(self):
        self.closed += 1


def stream_over(source: Source, done_marker: bool = True) -> ChatStream:
    return ChatStream(source, source.close, "test", done_marker=done_marker)


def test_chat_stream_keeps_text_finish_usage_and_stats():
    stream = stream_over(Source([*CHUNKS, DONE]))
    pieces = list(stream)
    assert len(pieces) == 1 + 18 + 1 + 1                                 # role, text, finish, usage
    assert_whole_chat_answer(stream)
    assert "finished (stop)" in repr(stream)


def test_chat_stream_ignores_what_follows_done():
    stream = stream_over(Source([*CHUNKS, DONE, CHUNKS[FIRST_TEXT]]))
    assert stream.collect() == CHAT_TEXT


def test_text_pieces_gives_choice_zero_text_only():
    stream = stream_over(Source([*two_choice_chunks(), DONE]))
    assert list(stream.text_pieces()) == ["Hel", "lo"]
    assert stream.texts() == ["Hello", "Bonjour"]
    assert stream.usage == Usage(4, 5, 9) and stream.finish_reason == "stop"


def test_every_choice_must_finish():
    chunks = two_choice_chunks()
    stream = stream_over(Source([c for i, c in enumerate(chunks) if i != 4] + [DONE]))
    with pytest.raises(StreamInterruptedError, match="no finish reason"):
        stream.collect()
    assert stream.texts() == ["Hello", "Bon"]


def test_a_stream_can_be_read_once():
    source = Source([*CHUNKS, DONE])
    stream = stream_over(source)
    assert stream.collect() == CHAT_TEXT
    with pytest.raises(RuntimeError, match="read once"):
        list(stream)


def test_leaving_the_loop_early_closes_the_source_and_marks_the_stream_cancelled():
    source = Source([*CHUNKS, DONE])
    stream = stream_over(source)
    for piece in stream:
        if isinstance(piece, Content):
            break
    assert source.closed == 1
    assert stream.cancelled and not stream.complete
    assert stream.text == "你" and stream.stats.ended_at is not None
    assert "cancelled" in repr(stream)


def test_leaving_a_with_block_early_closes_the_source():
    source = Source([*CHUNKS, DONE])
    with stream_over(source) as stream:
        pieces = iter(stream.text_pieces())
        assert next(pieces) == "你"
    assert source.closed >= 1 and stream.cancelled


def test_a_failing_source_is_closed_and_named_as_interrupted():
    source = Source(CHUNKS[:5], fail_with=requests.exceptions.ChunkedEncodingError("connection broken"))
    stream = stream_over(source)
    with pytest.raises(StreamInterruptedError, match="after 2 piece"):
        stream.collect()
    assert source.closed == 1 and not stream.cancelled and stream.text == "你好"


def test_an_incomplete_event_is_named_as_interrupted():
    stream = stream_over(Source(CHUNKS[:5], fail_with=IncompleteEventError("cut")))
    with pytest.raises(StreamInterruptedError):
        stream.collect()


def test_another_error_passes_through_unchanged():
    stream = stream_over(Source(CHUNKS[:5], fail_with=KeyError("bug")))
    with pytest.raises(KeyError):
        stream.collect()


def test_a_source_ending_without_done_is_interrupted_even_after_the_finish():
    source = Source(CHUNKS)                                              # finish and usage, no [DONE]
    with pytest.raises(StreamInterruptedError, match=r"no \[DONE\]"):
        stream_over(source).collect()


def test_without_a_done_marker_the_finish_reason_decides():
    assert stream_over(Source(CHUNKS), done_marker=False).collect() == CHAT_TEXT
    with pytest.raises(StreamInterruptedError, match="no finish reason"):
        stream_over(Source(CHUNKS[:FINISH]), done_marker=False).collect()


def test_cancel_stops_before_the_next_chunk():
    source = Source([*CHUNKS, DONE])
    stream = stream_over(source)
    seen = []
    for piece in stream:
        seen.append(piece)
        if isinstance(piece, Content):
            stream.cancel()
    assert seen == [Role("assistant", 0), Content("你", 0)]
    assert stream.cancelled and source.closed == 1
    assert "cancelled" in repr(stream)


# --- requests against the local server: whole answers ------------------------------------------

CHUNKINGS = {
    "one-piece": [CHAT],
    "every-7-bytes": split_every(CHAT, 7),
    "cut-inside-every-character": split_at(CHAT, inside_characters(CHAT)),
    "event-per-chunk": EVENTS,
    "one-byte-at-a-time": split_every(CHAT, 1),
}


class RecordingDecoder(SSEDecoder):
    fed: list[bytes] = []

    def feed(self, chunk: bytes):
        RecordingDecoder.fed.append(bytes(chunk))
        return super().feed(chunk)


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_requests_gets_the_exact_answer_in_any_chunking(chunking, monkeypatch):
    parts = CHUNKINGS[chunking]
    RecordingDecoder.fed = []
    monkeypatch.setattr(chat_stream, "SSEDecoder", RecordingDecoder)
    with FaultServer(Reply(parts=parts)) as server:
        stream = requests_chat(server.base_url, "Say hello in Chinese.", model=MODEL)
        assert stream.collect() == CHAT_TEXT
    assert_whole_chat_answer(stream)
    # The reader saw the HTTP chunks as sent (up to [DONE]): characters really were cut.
    assert b"".join(RecordingDecoder.fed) == CHAT
    assert RecordingDecoder.fed == parts
    request = server.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body == {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in Chinese."}],
                            "stream": True, "stream_options": {"include_usage": True}}


def test_requests_completion_gets_the_recorded_completion():
    with FaultServer(Reply(parts=split_every(COMPLETION, 5))) as server:
        stream = requests_completion(server.base_url, "The capital of France is", model=MODEL,
                                     max_tokens=8)
        assert stream.collect() == COMPLETION_TEXT
    assert stream.finish_reason == "length" and stream.role is None
    assert stream.usage == Usage(5, 8, 13) and stream.stats.tokens_from == "usage"
    assert server.requests[0].path == "/v1/completions"
    assert server.requests[0].body == {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                                       "stream": True, "stream_options": {"include_usage": True}}


def test_without_usage_the_tokens_are_counted_from_pieces():
    without_usage = [e for e in EVENTS if b'"usage"' not in e]
    with FaultServer(Reply(parts=without_usage)) as server:
        stream = requests_chat(server.base_url, "hi", model=MODEL, include_usage=False)
        assert stream.collect() == CHAT_TEXT
    assert stream.usage is None
    assert (stream.stats.tokens, stream.stats.tokens_from) == (18, "pieces")
    assert "stream_options" not in server.requests[0].body


def test_requests_sends_the_api_key_and_takes_name_and_key_from_a_server():
    with FaultServer(Reply(parts=[CHAT])) as server:
        api = Endpoint(server.base_url.removesuffix("/v1"), "served-name", "sk-local")
        assert requests_chat(api, "hi").collect() == CHAT_TEXT                       # an Endpoint
        assert requests_chat(SimpleNamespace(endpoint=api), "hi").collect() == CHAT_TEXT  # a server
    for request in server.requests:
        assert request.headers["Authorization"] == "Bearer sk-local"
        assert request.body["model"] == "served-name"


def test_a_url_without_a_model_is_refused():
    with pytest.raises(ValueError, match="model="):
        requests_chat("http://127.0.0.1:9/v1", "hi")


def test_a_close_delimited_stream_is_read_whole():
    with FaultServer(Reply(parts=split_every(CHAT, 100), framing="close")) as server:
        stream = requests_chat(server.base_url, "hi", model=MODEL)
        assert stream.collect() == CHAT_TEXT
    assert_whole_chat_answer(stream)


# --- openai SDK (sync and async) against the local server: whole answers -------------------------

@pytest.mark.parametrize("chunking", ["one-piece", "cut-inside-every-character", "event-per-chunk"])
def test_openai_gets_the_exact_answer_and_survives_the_empty_choices_chunk(chunking):
    with FaultServer(Reply(parts=CHUNKINGS[chunking])) as server:
        with chat_via("openai", server) as stream:
            pieces = list(stream)
    assert_whole_chat_answer(stream)
    assert pieces[-1] == CHAT_USAGE                                      # from the choices: [] chunk
    assert server.requests[0].body["stream_options"] == {"include_usage": True}
    assert server.requests[0].body["stream"] is True


def test_wrap_openai_reads_a_stream_made_with_the_sdk_directly():
    with FaultServer(Reply(parts=EVENTS)) as server, sdk_client(server) as client:
        sdk_stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        stream = wrap_openai(sdk_stream)
        assert stream.collect() == CHAT_TEXT
    assert stream.usage == CHAT_USAGE and stream.finish_reason == "stop"


@pytest.mark.parametrize("chunking", ["one-piece", "cut-inside-every-character"])
def test_async_openai_gets_the_exact_answer(chunking):
    with FaultServer(Reply(parts=CHUNKINGS[chunking])) as server:
        stream = run_async(server, collect)
    assert_whole_chat_answer(stream)
    assert server.requests[0].body["stream_options"] == {"include_usage": True}


def test_async_openai_yields_the_same_pieces():
    async def pieces(stream):
        return [piece async for piece in stream]

    with FaultServer(Reply(parts=EVENTS)) as server:
        got = run_async(server, pieces)
    assert got == [p for chunk in CHUNKS for p in pieces_from_chunk(chunk)]


# --- errors the server reports ----------------------------------------------------------------

ERROR_MIDWAY = Reply(parts=EVENTS[:6] + [ERROR_EVENT, b"data: [DONE]\n\n"])


def assert_the_error_event(err: StreamErrorEvent) -> None:
    assert err.message == ERROR["message"]
    assert (err.type, err.code) == ("InternalServerError", 500)
    assert "illegal memory access" in str(err)


@pytest.mark.parametrize("source", SOURCES)
def test_an_error_event_mid_stream_raises_with_the_servers_message(source):
    with FaultServer(ERROR_MIDWAY) as server, chat_via(source, server) as stream:
        with pytest.raises(StreamErrorEvent) as caught:
            stream.collect()
    assert_the_error_event(caught.value)
    assert stream.text == "你好，" and not stream.complete


def test_async_an_error_event_mid_stream_raises_with_the_servers_message():
    with FaultServer(ERROR_MIDWAY) as server, pytest.raises(StreamErrorEvent) as caught:
        run_async(server, collect)
    assert_the_error_event(caught.value)


NOT_FOUND_MESSAGE = "The model `no-such-model` does not exist. Valid aliases: smollm2-135m-instruct."
REFUSALS = {
    "404-vllm-json": (json_reply(404, NOT_FOUND), 404, NOT_FOUND_MESSAGE),
    "500-plain-text": (text_reply(500, "Internal Server Error: engine is dead\n"), 500,
                       "Internal Server Error: engine is dead"),
    "400-detail": (json_reply(400, {"detail": "bad body"}), 400, "bad body"),
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_requests_names_a_refusal_with_status_and_the_servers_message(refusal):
    reply, status, message = REFUSALS[refusal]
    with FaultServer(reply) as server, pytest.raises(StreamHTTPError) as caught:
        requests_chat(server.base_url, "hi", model="no-such-model")
    assert (caught.value.status, caught.value.message) == (status, message)
    assert f"answered {status}: {message}" in str(caught.value)


@pytest.mark.parametrize("refusal", REFUSALS)
def test_openai_names_a_refusal_with_status_and_the_servers_message(refusal):
    reply, status, message = REFUSALS[refusal]
    with FaultServer(reply) as server, pytest.raises(StreamHTTPError) as caught:
        with chat_via("openai", server):
            pass
    assert (caught.value.status, caught.value.message) == (status, message)
    assert len(server.requests) == 1                                     # no retry


@pytest.mark.parametrize("refusal", ["404-vllm-json", "500-plain-text"])
def test_async_openai_names_a_refusal_with_status_and_the_servers_message(refusal):
    reply, status, message = REFUSALS[refusal]
    with FaultServer(reply) as server, pytest.raises(StreamHTTPError) as caught:
        run_async(server, collect)
    assert (caught.value.status, caught.value.message) == (status, message)


# --- the connection ends early ----------------------------------------------------------------------

CUTS = {
    # chunked, the socket closed in the middle of an announced HTTP chunk (and of an event)
    "mid-chunk": Reply(parts=EVENTS[:6] + [EVENTS[6][:40]], end="cut_mid_chunk"),
    # chunked, the socket closed right after a whole event: no final 0-chunk, no [DONE]
    "after-an-event": Reply(parts=EVENTS[:6], end="cut"),
    # a proper chunked body that simply ends before [DONE]
    "body-ends-early": Reply(parts=EVENTS[:6]),
    # no length, no chunks: the close is the end; after a whole event
    "close-after-an-event": Reply(parts=EVENTS[:6], framing="close"),
    # the same, in the middle of an event (and of a character)
    "close-mid-event": Reply(parts=EVENTS[:6] + [EVENTS[6][:-60]], framing="close"),
}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("source", SOURCES)
def test_a_cut_connection_raises_interrupted_never_a_short_answer(source, cut):
    with FaultServer(CUTS[cut]) as server, chat_via(source, server) as stream:
        started = time.monotonic()
        with pytest.raises(StreamInterruptedError):
            stream.collect()
        assert time.monotonic() - started < WAIT
    assert stream.text == "你好，" and not stream.complete and not stream.cancelled


@pytest.mark.parametrize("cut", ["mid-chunk", "after-an-event", "close-mid-event"])
def test_async_a_cut_connection_raises_interrupted(cut):
    with FaultServer(CUTS[cut]) as server, pytest.raises(StreamInterruptedError):
        run_async(server, collect)


def test_requests_wants_done_even_after_the_finish_reason():
    """Cut after the finish chunk: the answer's text is whole, but its usage never came."""
    with FaultServer(Reply(parts=EVENTS[:FINISH + 1], end="cut")) as server:
        stream = requests_chat(server.base_url, "hi", model=MODEL)
        with pytest.raises(StreamInterruptedError):
            stream.collect()
    assert stream.text == CHAT_TEXT and stream.usage is None


@pytest.mark.parametrize("source", SOURCES)
def test_nothing_listening_raises_interrupted_at_once(source):
    url = f"http://127.0.0.1:{free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(StreamInterruptedError, match="could not reach"):
        if source == "requests":
            requests_chat(url, "hi", model=MODEL)
        else:
            with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=WAIT) as client:
                openai_chat(client, "hi", model=MODEL)
    assert time.monotonic() - started < 2.0


def test_async_nothing_listening_raises_interrupted():
    async def main(url):
        async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=WAIT) as client:
            await async_openai_chat(client, "hi", model=MODEL)

    with pytest.raises(StreamInterruptedError):
        asyncio.run(asyncio.wait_for(main(f"http://127.0.0.1:{free_port()}/v1"), WAIT))


@pytest.mark.parametrize("source", SOURCES)
def test_a_server_that_never_answers_raises_interrupted_after_the_timeout(source):
    with FaultServer(Reply(parts=[CHAT], header_delay=WAIT)) as server:
        started = time.monotonic()
        with pytest.raises(StreamInterruptedError), chat_via(source, server, timeout=0.3):
            pass
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("source", SOURCES)
def test_a_server_that_stalls_mid_stream_raises_interrupted_after_the_timeout(source):
    with FaultServer(Reply(parts=EVENTS[:6], end="hold")) as server, \
            chat_via(source, server, timeout=0.3) as stream:
        started = time.monotonic()
        with pytest.raises(StreamInterruptedError):
            stream.collect()
        assert time.monotonic() - started < 2.0
        assert stream.text == "你好，"
        assert server.client_gone.wait(WAIT)                               # and the connection closed


# --- leaving early, cancelling ------------------------------------------------------------------------

HELD = Reply(parts=EVENTS[:6], end="hold")   # three characters, then the server keeps the line open


@pytest.mark.parametrize("source", SOURCES)
def test_leaving_the_loop_early_closes_the_connection(source):
    with FaultServer(HELD) as server, chat_via(source, server) as stream:
        for piece in stream:
            if isinstance(piece, Content):
                break
        left = time.monotonic()
        assert server.client_gone.wait(WAIT), "the server never saw the client go"
        assert server.client_gone_at - left < 1.0
    assert stream.cancelled and stream.text == "你"


@pytest.mark.parametrize("source", SOURCES)
def test_leaving_a_with_block_early_closes_the_connection(source):
    with FaultServer(HELD) as server, chat_via(source, server) as stream:
        with stream:
            pieces = stream.text_pieces()          # kept: only the with block may close the stream
            assert next(pieces) == "你"
            assert not server.client_gone.wait(0.2)
        assert server.client_gone.wait(WAIT)
        assert stream.cancelled
        pieces.close()


def test_async_leaving_the_loop_early_closes_the_connection():
    async def leave(stream):
        async for piece in stream:
            if isinstance(piece, Content):
                break
        for _ in range(int(WAIT / 0.01)):          # the event loop finalises the left generator
            if server.client_gone.is_set() and stream.cancelled:
                break
            await asyncio.sleep(0.01)
        return stream

    with FaultServer(HELD) as server:
        stream = run_async(server, leave)
        assert server.client_gone.is_set(), "the server never saw the client go"
    assert stream.cancelled and stream.text == "你"


def test_async_close_closes_the_connection():
    async def close_midway(stream):
        async for piece in stream:
            if isinstance(piece, Content):
                await stream.close()
        return stream

    with FaultServer(HELD) as server:
        stream = run_async(server, close_midway)
        assert server.client_gone.wait(WAIT)
    assert stream.cancelled and stream.text == "你"


PAUSE = 0.4


@pytest.mark.parametrize("source", SOURCES)
def test_cancel_from_another_thread_stops_at_the_next_chunk(source):
    """A Stop button's callback runs in another thread while the reader waits for the network."""
    with FaultServer(Reply(parts=EVENTS, pause=PAUSE)) as server, chat_via(source, server) as stream:
        seen, cancelled_at = [], []

        def stop_soon():
            time.sleep(PAUSE / 4)
            cancelled_at.append(time.monotonic())
            stream.cancel()

        stopper = threading.Thread(target=stop_soon, name="stopper")
        for piece in stream:
            seen.append((time.monotonic(), piece))
            if isinstance(piece, Content) and stopper.ident is None:
                stopper.start()
        ended = time.monotonic()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert server.client_gone.wait(WAIT), "the server never saw the client go"
    assert [piece for _, piece in seen] == [Role("assistant", 0), Content("你", 0)]
    assert all(at < cancelled_at[0] for at, _ in seen)                   # nothing after cancel()
    assert ended - cancelled_at[0] < PAUSE + 1.0                          # the next chunk, not the end
    assert stream.cancelled and not stream.complete and stream.text == "你"


@pytest.mark.parametrize("source", SOURCES)
def test_a_stream_read_twice_raises(source):
    with FaultServer(Reply(parts=[CHAT])) as server, chat_via(source, server) as stream:
        assert stream.collect() == CHAT_TEXT
        with pytest.raises(RuntimeError, match="read once"):
            stream.collect()
    assert len(server.requests) == 1


def test_async_a_stream_read_twice_raises():
    async def twice(stream):
        await stream.collect()
        with pytest.raises(RuntimeError, match="read once"):
            await stream.collect()
        return stream

    with FaultServer(Reply(parts=[CHAT])) as server:
        assert run_async(server, twice).text == CHAT_TEXT


def test_requests_on_a_unix_socket_endpoint_says_so_instead_of_a_dns_error(tmp_path):
    """A class server's vLLM listens on a Unix socket (Endpoint.uds): requests cannot open one,
    and the error says so and names what can, before any lookup of the made-up host name."""
    from helpers.endpoint import UDS_URL

    api = Endpoint(UDS_URL, "served-name", "sk-local", uds=str(tmp_path / "vllm.sock"))
    for call in (requests_chat, requests_completion):
        with pytest.raises(ValueError, match=r"unix:.*vllm\.sock is a Unix socket.*openai_chat\(endpoint\.client\(\)"):
            call(api, "hi")
