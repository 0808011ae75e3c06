"""Tests for helpers/sse.py: Server-Sent Events read exactly, whatever the chunking.

* On two real vLLM 0.32.0 streams (tests/data/), a Chinese answer with an emoji and a plain
  completion, the decoder gives the same events and the exact text when the bytes arrive in one
  piece, split in two at every byte offset, in three pieces (a sample of offset pairs, and every
  way of cutting each multi-byte character), and one byte at a time.
* The origin's ``chunk.decode('utf-8', errors='ignore')`` per chunk loses characters exactly at
  the offsets that fall inside a multi-byte character: the split tests are sensitive to the bug
  they guard against.
* The WHATWG rules the decoder claims: every kind of line end (also ``\\r`` at the end of one
  chunk and ``\\n`` at the start of the next, one line end), comments, multi-line data, fields
  with and without colon or space, ``event:``/``id:``/``retry:``, a byte order mark, U+2028 and
  other Unicode line breaks inside JSON, events without data, and the end of the stream
  (``IncompleteEventError`` in the middle of an event, nothing when it ends cleanly).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from helpers.errors import TutorialError
from helpers.errors import IncompleteEventError
from helpers.stream.sse import ServerSentEvent, SSEDecoder, iter_events

DATA = Path(__file__).resolve().parent.parent / "data"
CHAT = (DATA / "sse_vllm_chat_zh_usage.sse").read_bytes()
COMPLETION = (DATA / "sse_vllm_completion.sse").read_bytes()
CHAT_TEXT = "你好，世界！🚀 vLLM 流式输出。"
COMPLETION_TEXT = " Paris.\n\nThe answer is:"

RECORDINGS = {
    "chat_zh_usage": (CHAT, CHAT_TEXT),
    "completion": (COMPLETION, COMPLETION_TEXT),
}


# --- helpers ----------------------------------------------------------------------------------

def decode(pieces) -> list[ServerSentEvent]:
    """Feed ``pieces`` one by one, then close (which raises if the stream stopped mid-event)."""
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
    decoder.close()
    return events


def datas(*pieces: bytes) -> list[str]:
    return [event.data for event in decode(pieces)]


def answer_text(events) -> str:
    """The streamed answer of choice 0, read straight from the JSON (not via chat_stream)."""
    text = []
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in json.loads(event.data)["choices"]:
            text.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(text)


def expected_events(raw: bytes) -> list[ServerSentEvent]:
    """The recording's events, found without the decoder: vLLM writes ``data: ...\\n\\n``."""
    blocks = raw.split(b"\n\n")
    assert blocks[-1] == b"", "the recording ends with a blank line"
    return [ServerSentEvent(data=block.removeprefix(b"data: ").decode("utf-8")) for block in blocks[:-1]]


def naive_pieces_text(pieces) -> str:
    """The origin's way: each chunk decoded on its own, dropping what does not decode."""
    return "".join(piece.decode("utf-8", errors="ignore") for piece in pieces)


def naive_answer(pieces) -> str:
    """The origin's whole reader: decode each chunk with errors='ignore', then cut events."""
    buffer, events = "", []
    for piece in pieces:
        buffer += piece.decode("utf-8", errors="ignore")
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            events.append(ServerSentEvent(data=block.removeprefix("data: ")))
    return answer_text(events)


def inside_character(raw: bytes) -> set[int]:
    """Offsets that cut a multi-byte UTF-8 character (the byte there is a continuation byte)."""
    return {i for i in range(1, len(raw)) if 0x80 <= raw[i] < 0xC0}


def characters(raw: bytes) -> list[tuple[int, int]]:
    """(start, length) of every multi-byte character in ``raw``."""
    found, i = [], 0
    while i < len(raw):
        lead = raw[i]
        length = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if length > 1:
            found.append((i, length))
        i += length
    return found


# --- the recorded vLLM streams ----------------------------------------------------------------

@pytest.mark.parametrize("name", RECORDINGS)
def test_recording_in_one_piece_gives_every_event_and_the_exact_text(name):
    raw, text = RECORDINGS[name]
    events = decode([raw])
    assert events == expected_events(raw)
    assert events[-1].data == "[DONE]"
    assert all(event.event == "message" and event.id is None for event in events)
    assert answer_text(events) == text


def test_chat_recording_has_multi_byte_characters_and_the_usage_chunk():
    """What makes the recording a real test: 3- and 4-byte characters, and the include_usage
    chunk with an empty ``choices`` list."""
    assert {length for _, length in characters(CHAT)} == {3, 4}
    usage = json.loads(decode([CHAT])[-2].data)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 33, "total_tokens": 66, "completion_tokens": 33}


@pytest.mark.parametrize("name", RECORDINGS)
def test_every_split_in_two_gives_the_same_events(name):
    """Equal events means equal data strings, so the answer text is exact at every offset."""
    raw, _ = RECORDINGS[name]
    reference = expected_events(raw)
    wrong = [cut for cut in range(1, len(raw)) if decode([raw[:cut], raw[cut:]]) != reference]
    assert wrong == []


@pytest.mark.parametrize("name", RECORDINGS)
def test_splits_in_three_give_the_same_events(name):
    """A sample of offset pairs, plus every way of cutting each multi-byte character into three
    (the middle piece may be a single continuation byte)."""
    raw, _ = RECORDINGS[name]
    reference = expected_events(raw)
    rng = random.Random(2026)
    pairs = {tuple(sorted(rng.sample(range(1, len(raw)), 2))) for _ in range(1500)}
    pairs |= {(a, a + 1) for a in range(1, len(raw) - 1, 7)}          # one-byte middle pieces
    for start, length in characters(raw):
        inner = range(start + 1, start + length)
        pairs |= {(a, b) for a in inner for b in range(a + 1, start + length + 1)}
        pairs |= {(start - 1, a) for a in inner} | {(a, start + length + 1) for a in inner}
    wrong = [(a, b) for a, b in sorted(pairs) if decode([raw[:a], raw[a:b], raw[b:]]) != reference]
    assert wrong == []


@pytest.mark.parametrize("name", RECORDINGS)
def test_one_byte_at_a_time_gives_the_same_events_and_text(name):
    raw, text = RECORDINGS[name]
    events = decode([raw[i:i + 1] for i in range(len(raw))])
    assert events == expected_events(raw)
    assert answer_text(events) == text


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000])
def test_iter_events_over_fixed_size_chunks(size):
    chunks = (CHAT[i:i + size] for i in range(0, len(CHAT), size))
    events = list(iter_events(chunks))
    assert events == expected_events(CHAT)
    assert answer_text(events) == CHAT_TEXT


def test_feed_returns_each_event_as_soon_as_its_blank_line_arrives():
    raw = expected_events(CHAT)
    decoder = SSEDecoder()
    first_end = CHAT.index(b"\n\n") + 2
    assert decoder.feed(CHAT[:first_end - 1]) == []           # the blank line not yet there
    assert decoder.feed(CHAT[first_end - 1:first_end]) == raw[:1]
    assert decoder.feed(CHAT[first_end:]) == raw[1:]
    decoder.close()


# --- the naive decoding is caught -------------------------------------------------------------

def test_naive_per_chunk_decode_loses_characters_exactly_at_cuts_inside_a_character():
    """The split tests above would fail for the origin's decoding: at every offset inside a
    multi-byte character (and only there) it drops that character."""
    full = CHAT.decode("utf-8")
    lossy = {cut for cut in range(1, len(CHAT))
             if naive_pieces_text([CHAT[:cut], CHAT[cut:]]) != full}
    assert lossy == inside_character(CHAT)
    assert len(lossy) == sum(length - 1 for _, length in characters(CHAT)) > 0


def test_naive_reader_gets_a_wrong_answer_where_the_decoder_gets_it_right():
    rocket = CHAT.index("🚀".encode())
    pieces = [CHAT[:rocket + 2], CHAT[rocket + 2:]]               # the emoji cut in half
    assert naive_answer(pieces) == CHAT_TEXT.replace("🚀", "")
    assert answer_text(decode(pieces)) == CHAT_TEXT
    one_byte = [CHAT[i:i + 1] for i in range(len(CHAT))]
    assert naive_answer(one_byte) == " vLLM "                     # only ASCII survives
    assert answer_text(decode(one_byte)) == CHAT_TEXT


# --- line ends --------------------------------------------------------------------------------

@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_kind_of_line_end(end):
    stream = end.join([b"data: one", b"data: two", b"", b"data: three", b"", b""])
    assert datas(stream) == ["one\ntwo", "three"]
    assert [e.data for e in decode([stream[i:i + 1] for i in range(len(stream))])] == ["one\ntwo", "three"]


def test_mixed_line_ends_in_one_stream():
    assert datas(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r") == ["a\nb\nc", "d"]


def test_cr_at_the_end_of_a_chunk_and_lf_at_the_start_of_the_next_are_one_line_end():
    # Were the \n a second line end, it would be a blank line: "a" and "b" as two events.
    assert datas(b"data: a\r", b"\ndata: b\r\n\r\n") == ["a\nb"]
    assert datas(b"data: a\r", b"\n", b"\r", b"\n") == ["a"]


def test_cr_at_the_end_of_a_chunk_then_an_empty_chunk_then_lf_is_still_one_line_end():
    assert datas(b"data: a\r", b"", b"\ndata: b\n\n") == ["a\nb"]


def test_cr_at_the_end_of_a_chunk_followed_by_another_line():
    assert datas(b"data: a\r", b"data: b\r", b"\r") == ["a\nb"]


def test_a_blank_line_ending_in_cr_dispatches_without_waiting_for_a_possible_lf():
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: a\r\r")] == ["a"]
    assert decoder.feed(b"\n") == []                               # the pair of that \r
    decoder.close()


def test_several_events_in_one_chunk():
    assert datas(b"data: 1\n\ndata: 2\n\ndata: 3\n\n") == ["1", "2", "3"]


def test_a_line_arriving_in_many_pieces():
    line = b"data: " + b"x" * 10_000 + b"\n\n"
    assert datas(*[line[i:i + 333] for i in range(0, len(line), 333)]) == ["x" * 10_000]


# --- fields -----------------------------------------------------------------------------------

def test_comment_lines_are_keep_alives_and_never_events():
    assert datas(b": ping\n\n: ping\n\n") == []
    assert datas(b": ping\ndata: a\n: in the middle\ndata: b\n\n:\n\n") == ["a\nb"]


def test_multi_line_data_is_joined_with_newlines():
    assert datas(b"data: line one\ndata: line two\ndata: line three\n\n") == [
        "line one\nline two\nline three"]


def test_data_without_a_space_and_only_one_space_removed():
    assert datas(b"data:x\n\ndata:  two spaces\n\ndata:\n\n") == ["x", " two spaces", ""]


def test_a_field_without_colon_has_an_empty_value():
    assert datas(b"data\n\n") == [""]
    assert datas(b"data\ndata\ndata: x\n\n") == ["\n\nx"]


def test_unknown_fields_are_ignored():
    assert decode([b"foo: bar\nfoo\ndata: a\nDATA: no\n\n"]) == [ServerSentEvent(data="a")]


def test_event_field_names_the_type_for_one_event_only():
    events = decode([b"event: error\ndata: a\n\ndata: b\n\n"])
    assert [(e.event, e.data) for e in events] == [("error", "a"), ("message", "b")]


def test_id_persists_across_events_until_changed():
    events = decode([b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 9\ndata: d\n\n"])
    assert [(e.id, e.data) for e in events] == [("7", "a"), ("7", "b"), ("", "c"), ("9", "d")]


def test_an_id_containing_nul_is_ignored():
    events = decode([b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"])
    assert [e.id for e in events] == ["1", "1"]


def test_retry_takes_only_ascii_digits():
    events = decode([b"retry: 1500\ndata: a\n\nretry: 2s\ndata: b\n\nretry: \xd9\xa3\ndata: c\n\n"])
    assert [e.retry for e in events] == [1500, 1500, 1500]
    assert decode([b"retry: 10\n\ndata: x\n\n"]) == [ServerSentEvent(data="x", retry=10)]


def test_a_byte_order_mark_at_the_start_is_dropped():
    assert datas(b"\xef\xbb\xbfdata: a\n\n") == ["a"]
    assert datas(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == ["a"]


def test_a_byte_order_mark_later_in_the_stream_is_not_dropped():
    # Only the stream's first line may start with it; elsewhere "\ufeffdata" is an unknown field.
    assert datas(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == ["a"]
    assert datas(b"data: \xef\xbb\xbfa\n\n") == ["\ufeffa"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85"], ids=["LS", "PS", "NEL"])
def test_unicode_line_breaks_inside_json_do_not_split_the_line(char):
    """JSON may carry these unescaped and ``str.splitlines`` breaks at them; SSE lines end only
    at CR and LF."""
    payload = json.dumps({"choices": [{"delta": {"content": f"a{char}b"}}]}, ensure_ascii=False)
    raw = f"data: {payload}\n\n".encode("utf-8")
    assert len(payload.splitlines()) == 2                          # what the decoder must not do
    for cut in range(1, len(raw)):
        events = decode([raw[:cut], raw[cut:]])
        assert len(events) == 1 and json.loads(events[0].data)["choices"][0]["delta"]["content"] == f"a{char}b"


def test_other_characters_splitlines_breaks_at_stay_inside_the_line():
    line = "a\x0bb\x0cc\x1cd\x1de\x1ef"
    assert len(line.splitlines()) == 6
    assert datas(f"data: {line}\n\n".encode()) == [line]


def test_invalid_utf8_is_replaced_not_dropped():
    assert datas(b"data: a\xffb\n\n") == ["a\ufffdb"]


# --- events without data, and the end of the stream ---------------------------------------------

def test_an_event_without_data_is_not_dispatched_and_its_type_does_not_leak():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: ping\n\n") == []
    assert decoder.feed(b"id: 3\n\n") == []
    assert decoder.feed(b"\n\n\n") == []
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent(data="x", event="message", id="3")]
    decoder.close()


@pytest.mark.parametrize("stream", [
    b"data: a\n\ndata: b",            # inside the last line
    b"data: a\n\ndata: b\n",          # last line whole, no blank line after it
    b"data: a\n\ndata: b\r",          # the same with a CR
    b"data: a\n\nevent: x\n",         # a field without data is still an unfinished event
    b"data: a\n\n: ping",             # inside a keep-alive
    b"data: a\n\ndata: {\"content\": \"\xe4\xbd",   # inside a character
], ids=["mid-line", "no-blank-line", "no-blank-line-cr", "field-only", "mid-comment", "mid-character"])
def test_a_stream_that_stops_mid_event_raises_on_close(stream):
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(stream)] == ["a"]
    with pytest.raises(IncompleteEventError, match="middle of an event"):
        decoder.close()


def test_iter_events_yields_the_whole_events_then_raises_for_the_cut_one():
    cut = CHAT.index(b"\n\n", 2000) + 30                          # a few bytes into an event
    events = []
    with pytest.raises(IncompleteEventError):
        for event in iter_events([CHAT[:cut]]):
            events.append(event)
    assert events == expected_events(CHAT)[:len(events)] and len(events) >= 1
    assert issubclass(IncompleteEventError, TutorialError)


@pytest.mark.parametrize("stream", [b"", b"data: a\n\n", b"data: a\r\n\r\n", b"data: a\r\r",
                                    b": ping\n", b"\n\n", b"data: a\n\n: bye\n"])
def test_a_stream_that_ends_cleanly_closes_without_error(stream):
    decoder = SSEDecoder()
    decoder.feed(stream)
    decoder.close()
    assert list(iter_events([stream])) == decode([stream])


def test_empty_chunks_change_nothing():
    assert datas(b"", b"data: a", b"", b"\n", b"", b"\n", b"") == ["a"]
