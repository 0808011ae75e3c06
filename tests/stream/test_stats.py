"""Tests for helpers/stream_stats.py: what the numbers printed under a streamed answer mean.

Times are given explicitly (``on_content(now=...)`` and a fixed ``started``), so every figure is
checked exactly: time to first token, token count from the server's usage (exact) or from the
content pieces (``tokens_from`` says which), tokens/s as (tokens - 1) / (last token - first
token), the cases where a figure does not exist (None, and left out of the text), and the text.
"""

from __future__ import annotations

import time

import pytest

from helpers.stream.stats import StreamStats


def stats_with_pieces(*times: float, started: float = 100.0) -> StreamStats:
    stats = StreamStats(started=started)
    for now in times:
        stats.on_content(now=now)
    return stats


def test_time_to_first_token_is_measured_from_the_request():
    stats = stats_with_pieces(100.75, 101.0, 101.5)
    assert stats.time_to_first_token == pytest.approx(0.75)
    assert (stats.first_token_at, stats.last_token_at, stats.pieces) == (100.75, 101.5, 3)


def test_without_usage_tokens_are_the_content_pieces():
    stats = stats_with_pieces(101.0, 101.5, 102.0)
    assert (stats.tokens, stats.tokens_from) == (3, "pieces")
    assert stats.prompt_tokens is None


def test_usage_wins_over_the_piece_count():
    """vLLM holds back bytes of an unfinished character, so pieces undercount: the recorded
    Chinese answer came as 18 pieces for 33 tokens."""
    stats = stats_with_pieces(101.0, 101.5, 102.0)
    stats.on_usage(prompt_tokens=33, completion_tokens=33)
    assert (stats.tokens, stats.tokens_from, stats.prompt_tokens) == (33, "usage", 33)


def test_usage_of_zero_tokens_is_still_usage():
    stats = stats_with_pieces()
    stats.on_usage(prompt_tokens=5, completion_tokens=0)
    assert (stats.tokens, stats.tokens_from) == (0, "usage")


def test_tokens_per_second_counts_the_tokens_after_the_first_over_the_time_after_the_first():
    stats = stats_with_pieces(101.0, 101.5, 102.0, 103.0)          # 4 tokens, 2 s after the first
    assert stats.tokens_per_s == pytest.approx(3 / 2.0)
    stats.on_usage(prompt_tokens=10, completion_tokens=9)
    assert stats.tokens_per_s == pytest.approx(8 / 2.0)            # usage's count, the same span


def test_tokens_per_second_ignores_the_wait_for_the_first_token():
    slow_start = stats_with_pieces(110.0, 111.0, 112.0)
    quick_start = stats_with_pieces(100.1, 101.1, 102.1)
    assert slow_start.tokens_per_s == quick_start.tokens_per_s == pytest.approx(1.0)


@pytest.mark.parametrize("times", [(), (101.0,), (101.0, 101.0, 101.0)],
                         ids=["no-token", "one-token", "no-time-between"])
def test_tokens_per_second_is_none_when_it_cannot_be_measured(times):
    assert stats_with_pieces(*times).tokens_per_s is None


def test_one_piece_carrying_many_tokens_has_no_rate():
    stats = stats_with_pieces(101.0)
    stats.on_usage(prompt_tokens=3, completion_tokens=12)
    assert stats.tokens == 12 and stats.tokens_per_s is None


def test_no_content_means_no_time_to_first_token():
    stats = stats_with_pieces()
    assert stats.time_to_first_token is None and stats.tokens == 0


def test_total_time_runs_until_end_and_then_stays():
    stats = StreamStats.begin()
    first = stats.total_seconds
    time.sleep(0.01)
    assert stats.total_seconds > first                            # still running
    stats.end()
    ended = stats.total_seconds
    time.sleep(0.01)
    stats.end()                                                   # a second end() moves nothing
    assert stats.total_seconds == ended
    assert stats.ended_at - stats.started == ended


def test_begin_uses_the_perf_counter_clock_like_on_content():
    before = time.perf_counter()
    stats = StreamStats.begin()
    stats.on_content()
    assert before <= stats.started <= stats.first_token_at <= time.perf_counter()


def test_as_dict_has_every_figure():
    stats = stats_with_pieces(100.5, 101.0, 102.5)
    stats.on_usage(prompt_tokens=7, completion_tokens=5)
    stats.ended_at = 103.0
    assert stats.as_dict() == {
        "time_to_first_token_s": pytest.approx(0.5), "tokens": 5, "tokens_from": "usage",
        "tokens_per_s": pytest.approx(4 / 2.0), "total_s": pytest.approx(3.0), "prompt_tokens": 7}


def test_str_reads_as_one_line_with_every_figure():
    stats = stats_with_pieces(100.5, 101.0, 102.5)
    stats.on_usage(prompt_tokens=7, completion_tokens=5)
    stats.ended_at = 103.0
    assert str(stats) == "first token after 0.50 s · 5 tokens (usage) in 3.00 s · 2.0 tokens/s"


def test_str_leaves_out_what_was_not_measured():
    empty = stats_with_pieces()
    empty.ended_at = 100.25
    assert str(empty) == "0 tokens (pieces) in 0.25 s"
    one = stats_with_pieces(100.5)
    one.ended_at = 101.0
    assert str(one) == "first token after 0.50 s · 1 tokens (pieces) in 1.00 s"
