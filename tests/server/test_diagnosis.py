"""Tests for helpers/server/diagnosis.py against real vLLM 0.32.0 logs (tests/data/vllm_logs), and
the troubleshooting page generated from its rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.paths import REPO_ROOT
from helpers.server.diagnosis import FATAL_RULES, RULES, diagnose, fatal_sign, phases_reached, troubleshooting_markdown

LOGS = Path(__file__).resolve().parent.parent / "data" / "vllm_logs"

BF16_ERROR = (
    "ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. "
    "Your Tesla T4 GPU has compute capability 7.5. You can use float16 instead by explicitly "
    "setting the `dtype` flag in CLI, for example: --dtype=half.")


def read_log(name: str) -> str:
    return (LOGS / name).read_text(encoding="utf-8")


def log_lines(name: str) -> list[str]:
    return [line.strip() for line in read_log(name).splitlines()]


# log file, expected cause, a text that must appear in the real log line quoted as evidence
FAILURES = [
    ("model_folder_without_config.log", "model not found",
     "Invalid repository ID or local directory specified: '/tmp/emptymodel'"),
    ("port_in_use.log", "port in use", "OSError: [Errno 98] Address already in use"),
    ("cpu_kv_cache_too_large.log", "out of memory",
     "is less than requested memory for kv (500.0 GiB)"),
    ("max_model_len_too_large.log", "max_model_len too large",
     "positions exceeding derived_max_model_len"),
]


@pytest.mark.parametrize("name, cause, quoted", FAILURES)
def test_real_failure_logs_name_the_cause(name, cause, quoted):
    diagnosis = diagnose(read_log(name), exit_code=1)
    assert diagnosis is not None
    assert diagnosis.cause == cause
    assert quoted in diagnosis.evidence
    # the evidence is (a part of) one real line of the log, not something made up
    assert any(diagnosis.evidence in line for line in log_lines(name) if quoted in line)
    assert diagnosis.advice
    assert cause in str(diagnosis) and "what to do" in str(diagnosis)


def _matched_text(name: str, cause: str) -> str:
    rule = next(r for r in RULES if r.name == cause)
    for line in reversed(read_log(name).splitlines()):
        match = rule.pattern.search(line)
        if match:
            return match.group(0)
    raise AssertionError(f"no line of {name} matches {cause}")


@pytest.mark.parametrize("name, cause", [pytest.param(n, c, id=n) for n, c, _ in FAILURES])
def test_evidence_keeps_the_text_the_rule_matched(name, cause):
    diagnosis = diagnose(read_log(name))
    assert _matched_text(name, cause) in diagnosis.evidence


def test_ready_log_has_no_diagnosis():
    assert diagnose(read_log("ready.log")) is None
    assert diagnose(read_log("ready.log"), exit_code=0) is None


@pytest.mark.parametrize("code", [-9, 137])
def test_killed_without_any_log(code):
    diagnosis = diagnose("", exit_code=code)
    assert diagnosis is not None
    assert diagnosis.cause == "killed"
    assert str(code) in diagnosis.evidence


def test_no_diagnosis_for_an_unknown_failure():
    assert diagnose("", exit_code=1) is None
    assert diagnose("something odd happened\n", exit_code=-15) is None


def test_a_recognised_error_wins_over_the_exit_code():
    assert diagnose(read_log("port_in_use.log"), exit_code=-9).cause == "port in use"


def test_bf16_on_t4():
    log = "(EngineCore pid=1) ERROR 01-01 00:00:00 [core.py:1] EngineCore failed to start.\n" + BF16_ERROR
    diagnosis = diagnose(log)
    assert diagnosis.cause == "unsupported dtype"
    assert "Tesla T4 GPU has compute capability 7.5" in diagnosis.evidence
    assert "half" in diagnosis.advice


def test_unrecognized_argument():
    log = ("usage: api_server.py [-h] [--host HOST] [--port PORT]\n"
           "api_server.py: error: unrecognized arguments: --bogus\n")
    diagnosis = diagnose(log, exit_code=2)
    assert diagnosis.cause == "bad argument"
    assert "--bogus" in diagnosis.evidence


def test_last_error_wins():
    port = "OSError: [Errno 98] Address already in use"
    assert diagnose(port + "\n" + BF16_ERROR + "\n").cause == "unsupported dtype"
    assert diagnose(BF16_ERROR + "\n" + port + "\n").cause == "port in use"


def test_last_error_wins_over_a_real_log():
    log = read_log("model_folder_without_config.log") + "\nOSError: [Errno 98] Address already in use\n"
    assert diagnose(log).cause == "port in use"
    log = read_log("port_in_use.log") + "\n" + BF16_ERROR + "\n"
    assert diagnose(log).cause == "unsupported dtype"


def test_phases_of_the_ready_log_in_order():
    phases = phases_reached(read_log("ready.log"))
    assert phases == [
        "arguments parsed, reading the model's config",
        "engine core process started",
        "loading weights",
        "weights loaded, sizing the KV cache",
        "KV cache allocated",
        "HTTP server starting",
        "HTTP server up",
    ]
    assert "capturing CUDA graphs" not in phases  # CPU backend, --enforce-eager


def test_phases_of_a_failed_start_stop_early():
    phases = phases_reached(read_log("port_in_use.log"))
    assert phases == ["arguments parsed, reading the model's config"]
    assert "HTTP server up" not in phases


def test_phases_of_the_kv_cache_failure_reach_loading_but_not_the_server():
    phases = phases_reached(read_log("cpu_kv_cache_too_large.log"))
    assert "weights loaded, sizing the KV cache" in phases
    assert "HTTP server starting" not in phases
    assert "HTTP server up" not in phases


def test_phases_of_an_empty_log():
    assert phases_reached("") == []


@pytest.mark.parametrize("line", [
    # Built from the format strings in vLLM 0.32.0's vllm/v1/worker/utils.py (GPU) and
    # vllm/v1/worker/cpu_worker.py (CPU); the numbers are examples. On an H100, a second server
    # started beside one holding 0.9 of the memory failed with "Engine core initialization
    # failed" and, without this rule, no named cause.
    "(EngineCore pid=1466) ValueError: Free memory on device cuda:0 (7.55/79.19 GiB) on startup is "
    "less than desired GPU memory utilization (0.9, 71.27 GiB). Decrease GPU memory utilization or "
    "reduce GPU memory used by other processes.",
    "ValueError: Available memory on node 0 (3.10/8.21 GiB) on startup is less than desired CPU "
    "memory utilization (0.5, 4.10 GiB). On the CPU backend, the `--gpu-memory-utilization` flag ...",
])
def test_memory_taken_by_another_server_is_named(line):
    log = line + "\nRuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    diagnosis = diagnose(log, exit_code=1)
    assert diagnosis.cause == "memory held by another process"
    assert "on startup is less than desired" in diagnosis.evidence
    assert "--gpu-memory-utilization" in diagnosis.advice


@pytest.mark.parametrize("rule", RULES + FATAL_RULES, ids=lambda rule: rule.name)
def test_every_rule_recognises_its_own_example_and_has_both_languages(rule):
    assert rule.pattern.search(rule.example), rule.example
    assert diagnose(rule.example).cause == rule.name
    assert rule.advice and rule.name_zh and rule.advice_zh


def test_examples_from_recorded_logs_are_real_lines():
    recorded = "\n".join(read_log(path.name) for path in LOGS.glob("*.log"))
    real = [rule.name for rule in RULES + FATAL_RULES if rule.example in recorded]
    assert {"model not found", "port in use", "out of memory", "max_model_len too large",
            "a worker died", "engine core failed"} <= set(real)


def test_a_worker_killed_during_start_is_named_by_the_first_sign_not_the_last():
    # vLLM 0.32.0 (CPU): the worker was SIGKILLed; the engine core then failed, and the API
    # server reported EngineDeadError. The root cause is the first of these signs.
    text = read_log("worker_killed.log")
    assert diagnose(text).cause == "a worker died"
    assert "died unexpectedly (exit code: -9)" in diagnose(text).evidence
    assert fatal_sign(text).cause == "a worker died"
    assert fatal_sign(read_log("ready.log")) is None


def test_the_troubleshooting_page_is_generated_from_the_rules():
    page = (REPO_ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert page == troubleshooting_markdown(), "regenerate: python -m helpers troubleshooting > docs/troubleshooting.md"
    for rule in RULES + FATAL_RULES:
        assert f"### {rule.name} · {rule.name_zh}" in page and rule.example in page


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_start_watch_reports_new_phases_once():
    from helpers.server.diagnosis import StartWatch

    watch = StartWatch()
    text = read_log("ready.log")
    first = watch.new_phases(text[: text.index("Starting to load model")])
    assert first and watch.new_phases(text[: text.index("Starting to load model")]) == []
    assert watch.new_phases(text)[0] == "loading weights" and watch.last == "HTTP server up"


def test_start_watch_waits_the_settle_time_after_a_fatal_sign():
    from helpers.server.diagnosis import StartWatch

    clock = Clock()
    watch = StartWatch(settle=2.0, clock=clock)
    assert watch.failed(read_log("ready.log"), [11]) is None
    text = read_log("worker_killed.log")
    assert watch.failed(text, [11]) is None          # seen, but vLLM may still exit by itself
    clock.now = 1.5
    assert watch.failed(text, [11]) is None
    clock.now = 2.5
    assert watch.failed(text, [11]).cause == "a worker died"


def test_start_watch_takes_a_vanished_worker_for_a_failure():
    from helpers.server.diagnosis import StartWatch

    clock = Clock()
    watch = StartWatch(settle=1.0, clock=clock)
    assert watch.failed("", [11, 12]) is None
    assert watch.failed("", [11]) is None
    clock.now = 1.5
    failure = watch.failed("", [11])
    assert failure.cause == "a worker died" and "[12]" in failure.evidence


def test_start_watch_takes_a_vanished_engine_core_for_a_failure():
    # One GPU, vLLM 0.26.0: the worker runs inside the engine core (the `uni` executor), so no
    # VLLM::Worker process exists and the engine core is the process whose loss ends the start
    from helpers.server.diagnosis import StartWatch

    clock = Clock()
    watch = StartWatch(settle=1.0, clock=clock)
    assert watch.failed("", [], [21]) is None
    assert watch.failed("", [], []) is None
    clock.now = 1.5
    failure = watch.failed("", [], [])
    assert failure.cause == "engine core failed" and "[21]" in failure.evidence
