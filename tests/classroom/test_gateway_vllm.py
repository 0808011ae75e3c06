"""The gateway in front of the run's real vLLM server (``shared_server``), started the way the
lead's integration will start it: ``start_gateway(server, host=...)``. The helpers' own stream
readers talk to it as a student's notebook would."""

from __future__ import annotations

import pytest
import requests

from classroom_support import make_keys
from helpers.classroom import keys as keyfile
from helpers.classroom.policy import Limits
from helpers.classroom.service import gateways, start_gateway
from helpers.endpoint import Endpoint
from helpers.errors import ApiKeyError, StreamErrorEvent, StreamHTTPError
from helpers.logs.metrics import running_requests, wait_for_running
from helpers.stream.chat import Content, Finish, requests_chat
from support import wait_for

CAP = 400          # long enough that a stream outlives a revocation (the keys file is looked at each second)
SMALL_CAP = 8


@pytest.fixture(scope="module")
def classroom(shared_server, tmp_path_factory):
    path, made = make_keys(tmp_path_factory.mktemp("classroom"), "ana", "bo", "rev")
    lines: list[str] = []
    gateway = start_gateway(shared_server, host="127.0.0.1", keys_path=path,
                            limits=Limits(max_tokens=CAP), progress=lines.append)
    try:
        yield shared_server, gateway, path, made, lines
    finally:
        gateway.stop()
        assert not gateway.alive and not gateway.pids()


def student(gateway, server, key) -> Endpoint:
    return gateway.endpoint(key, server.name)


def test_start_gateway_reports_and_records_it(classroom):
    server, gateway, _, _, lines = classroom
    assert any(f"gateway ready: {gateway.url} serves {server.name!r}" in line for line in lines)
    assert any("takes requests without a key" in line for line in lines)    # the shared server has none
    assert gateway.url in [g.url for g in gateways()]
    assert requests.get(gateway.url + "/health", timeout=10).json() == {"status": "ok"}


def test_a_student_streams_through_the_gateway_with_the_helpers(classroom):
    server, gateway, _, made, _ = classroom
    api = student(gateway, server, made["ana"])
    assert [m["id"] for m in api.models()] == [server.name]
    stream = requests_chat(api, "Name three colours.", max_tokens=6, ignore_eos=True)
    pieces = list(stream)
    assert "".join(p.text for p in pieces if isinstance(p, Content))
    assert [p.reason for p in pieces if isinstance(p, Finish)] == ["length"]
    assert stream.stats.completion_tokens == 6
    sdk = api.client().chat.completions.create(model=server.name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4)
    assert sdk.usage.completion_tokens <= 4


def test_max_tokens_is_capped_by_the_gateway(shared_server, tmp_path):
    path, made = make_keys(tmp_path, "ana")
    gateway = start_gateway(shared_server, host="127.0.0.1", keys_path=path, limits=Limits(max_tokens=SMALL_CAP),
                            progress=lambda line: None)
    try:
        stream = requests_chat(student(gateway, shared_server, made["ana"]), "Count to fifty.", max_tokens=1000,
                               ignore_eos=True)
        list(stream)
        assert stream.stats.completion_tokens == SMALL_CAP          # 1000 asked, the cap served
    finally:
        gateway.stop()


def test_no_key_is_an_api_key_error_that_says_what_to_set(classroom):
    server, gateway, _, _, _ = classroom
    with pytest.raises(ApiKeyError, match="TUTORIAL_API_KEY"):
        Endpoint(gateway.url, server.name).models()


def test_the_engine_killing_allowed_token_ids_never_reach_vllm(classroom):
    server, gateway, _, made, _ = classroom
    api = student(gateway, server, made["ana"])
    before = server.log_text().count("POST /v1/chat/completions")
    with pytest.raises(StreamHTTPError) as refused:
        list(requests_chat(api, "Hi", max_tokens=4, allowed_token_ids=list(range(2000))))
    assert refused.value.status == 400 and "at most 1024" in refused.value.message
    assert server.log_text().count("POST /v1/chat/completions") == before
    fine = list(requests_chat(api, "Hi", max_tokens=2, allowed_token_ids=list(range(1000))))
    assert any(isinstance(p, Finish) for p in fine)
    assert server.health()


def test_structured_outputs_the_engine_would_compile_for_long_are_refused_and_small_ones_answered(classroom):
    import json

    server, gateway, _, made, _ = classroom
    url = gateway.url + "/v1/chat/completions"
    key = {"Authorization": f"Bearer {made['bo']}"}
    chat = {"model": server.name, "messages": [{"role": "user", "content": "Give a colour as JSON."}],
            "max_tokens": 40, "temperature": 0}

    def schema(max_length):
        return {"type": "json_schema", "json_schema": {"name": "colour", "schema": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": max_length}},
            "required": ["colour"], "additionalProperties": False}}}

    before = server.log_text().count("POST /v1/chat/completions")
    for extra, code in [({"response_format": schema(100_000)}, "structured_output_too_complex"),
                        ({"structured_outputs": {"regex": "(a|b){0,100000}"}}, "structured_output_too_complex"),
                        ({"structured_outputs": {"choice": ["x" * 100] * 100}}, "structured_output_too_large")]:
        reply = requests.post(url, json={**chat, **extra}, headers=key, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == code, reply.text
    assert server.log_text().count("POST /v1/chat/completions") == before      # none reached vLLM
    # a small schema passes, and the engine holds the answer to it
    reply = requests.post(url, json={**chat, "response_format": schema(12)}, headers=key, timeout=300)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    text = choice["message"]["content"]
    assert text.lstrip().startswith("{"), text          # the grammar, not the model, chose this
    if choice["finish_reason"] == "stop":
        answer = json.loads(text)
        assert set(answer) == {"colour"} and len(answer["colour"]) <= 12
    else:   # cut at max_tokens: the schema allows any whitespace, and random weights (the GPU suite) spent them on it
        assert choice["finish_reason"] == "length", choice
    assert server.health()


def test_stop_through_the_gateway_makes_vllm_abort_the_request(classroom):
    server, gateway, _, made, _ = classroom
    stream = requests_chat(student(gateway, server, made["bo"]), "Tell a long story.", max_tokens=CAP,
                           ignore_eos=True)
    pieces = iter(stream)
    next(pieces)
    assert wait_for(lambda: running_requests(server.url) == 1, 30)
    stream.close()                                   # the Stop button's effect, from the reading thread
    assert wait_for_running(server.url, 0, timeout=10) < 10


def test_revoking_a_key_mid_stream_ends_it_with_an_error_and_vllm_aborts(classroom):
    server, gateway, path, made, _ = classroom
    stream = requests_chat(student(gateway, server, made["rev"]), "Tell a long story.", max_tokens=CAP,
                           ignore_eos=True)
    pieces = iter(stream)
    next(pieces)
    keyfile.revoke(path, "rev")
    with pytest.raises(StreamErrorEvent) as ended:
        for _ in pieces:
            pass
    assert ended.value.code == "revoked_api_key" and "revoked" in ended.value.message
    assert wait_for_running(server.url, 0, timeout=10) < 10
    with pytest.raises(ApiKeyError):
        student(gateway, server, made["rev"]).models()
