"""helpers/classroom/gateway.py against a fake vLLM that records what reaches it (no model).

Each test runs the gateway app in uvicorn on loopback, in a thread, and talks HTTP to it.
What reaches "vLLM" is read from the fake's records, so "refused without touching vLLM" is
checked, not assumed. Everything waits with bounded ``wait_for`` loops (no timing asserts).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading

import httpx
import pytest

from classroom_support import INTERNAL_KEY, FakeVLLM, ThreadServer, bearer, make_keys
from helpers.classroom import keys as keyfile
from helpers.classroom.gateway import make_app
from helpers.classroom.policy import Limits
from support import wait_for


@pytest.fixture
def class_keys(tmp_path):
    return make_keys(tmp_path, "ana", "bo", "dee", revoked=("cy",))


@contextlib.contextmanager
def gateway(upstream_url: str, keys_path, **limits):
    lines: list[str] = []
    app = make_app(upstream_url, INTERNAL_KEY, keys_path, Limits(**limits), log=lines.append)
    with ThreadServer(app) as server:
        server.lines = lines
        server.state = app.state.gateway
        yield server


def chat(**extra) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(reply: httpx.Response) -> dict:
    payload = reply.json()
    assert set(payload) == {"error"}, payload
    assert payload["error"]["message"] and payload["error"]["type"] and payload["error"]["code"]
    return payload["error"]


def generation_requests(fake: FakeVLLM) -> list[dict]:
    return [r for r in fake.requests if r["path"] != "/health"]


# --------------------------------------------------------------------------- routes
def test_only_the_class_routes_pass_everything_else_is_404_or_405_without_reaching_vllm(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        for method, url in [("POST", "/invocations"), ("POST", "/tokenize/"), ("GET", "/TOKENIZE"),
                            ("GET", "/load"), ("GET", "/docs"), ("GET", "/openapi.json"),
                            ("POST", "/pause"), ("POST", "/resume"), ("GET", "/metrics/"), ("GET", "/v1/models/"),
                            ("POST", "/v1/chat/completions/render"), ("POST", "/v1/responses"),
                            ("GET", "/V1/MODELS"), ("POST", "/inference/v1/generate"), ("GET", "/")]:
            for headers in ({}, bearer(made["ana"])):
                reply = client.request(method, url, headers=headers, json={"prompt": "x"})
                assert reply.status_code == 404, (method, url, reply.text)
                assert error_of(reply)["code"] == "not_found"
        for method, url in [("POST", "/v1/models"), ("DELETE", "/v1/models"), ("HEAD", "/v1/models"),
                            ("POST", "/metrics"), ("DELETE", "/version"),
                            ("GET", "/v1/chat/completions"), ("PUT", "/v1/completions"), ("GET", "/tokenize"),
                            ("OPTIONS", "/v1/chat/completions"), ("POST", "/health")]:
            reply = client.request(method, url, headers=bearer(made["ana"]))
            assert reply.status_code == 405, (method, url, reply.status_code)
            assert "allow" in reply.headers
        health = client.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert generation_requests(fake) == []


def test_metrics_and_version_need_a_key_and_reach_vllm_with_the_internal_one(fake, class_keys):
    # Notebook 04 reads vllm:num_requests_running to show a stopped stream ending at the server.
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        for url in ("/metrics", "/version"):
            assert client.get(url).status_code == 401
            reply = client.get(url, headers=bearer(made["ana"]))
            assert reply.status_code == 200, reply.text
        assert "vllm:num_requests_running" in client.get("/metrics", headers=bearer(made["ana"])).text
    reached = [r for r in fake.requests if r["path"] in ("/metrics", "/version")]
    assert len(reached) == 3 and all(made["ana"] not in str(r["headers"]) for r in reached)


def test_tokenize_and_detokenize_need_a_key_and_take_only_their_plain_fields(fake, class_keys):
    # Notebook 02 shows the prompt the chat template builds with /tokenize, then /detokenize.
    path, made = class_keys
    messages = [{"role": "user", "content": "hi"}]
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        assert client.post("/tokenize", json={"model": "fake", "messages": messages}).status_code == 401
        reply = client.post("/tokenize", headers=bearer(made["ana"]),
                            json={"model": "fake", "messages": messages, "return_token_strs": True})
        assert reply.status_code == 200 and reply.json()["tokens"] == [1, 2], reply.text
        reply = client.post("/detokenize", headers=bearer(made["ana"]), json={"model": "fake", "tokens": [1, 2]})
        assert reply.status_code == 200 and reply.json() == {"prompt": "ab"}, reply.text
        for route, extra in [("/tokenize", {"chat_template": "{{ 7 * 7 }}"}),
                             ("/tokenize", {"chat_template_kwargs": {"enable_thinking": True}}),
                             ("/tokenize", {"tools": []}), ("/tokenize", {"mm_processor_kwargs": {}}),
                             ("/detokenize", {"messages": messages})]:
            body = {"model": "fake", **({"tokens": [1]} if route == "/detokenize" else {"messages": messages}), **extra}
            reply = client.post(route, headers=bearer(made["ana"]), json=body)
            assert reply.status_code == 400, (route, extra, reply.text)
            error = error_of(reply)
            assert error["code"] == "field_not_allowed" and error["param"] == next(iter(extra)), error
            assert next(iter(extra)) in error["message"] and route in error["message"]
        too_big = {"model": "fake", "tokens": list(range(20000))}        # over 64 KiB of JSON
        assert client.post("/detokenize", headers=bearer(made["ana"]), json=too_big).status_code == 413
    reached = [r for r in fake.requests if r["path"] in ("/tokenize", "/detokenize")]
    assert [r["path"] for r in reached] == ["/tokenize", "/detokenize"]
    assert all(made["ana"] not in str(r["headers"]) for r in reached)
    assert reached[0]["body"] == {"model": "fake", "messages": messages, "return_token_strs": True}


def test_health_says_only_the_status_and_503_when_vllm_is_down(class_keys):
    path, _ = class_keys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]            # nothing listens there once closed
    with gateway(f"http://127.0.0.1:{closed_port}", path) as gw:
        reply = httpx.get(gw.url + "/health", timeout=10)
        assert reply.status_code == 503 and reply.json() == {"status": "unavailable"}


def test_upstream_down_is_a_502_that_says_so(class_keys):
    path, made = class_keys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with gateway(f"http://127.0.0.1:{closed_port}", path) as gw:
        reply = httpx.post(gw.url + "/v1/chat/completions", json=chat(), headers=bearer(made["ana"]), timeout=10)
        assert reply.status_code == 502
        assert error_of(reply)["code"] == "upstream_unavailable"
        assert "cannot be reached" in error_of(reply)["message"]
        assert wait_for(lambda: gw.state.open_total == 0, 10)         # released right after the answer


def test_vllm_refusing_the_internal_key_is_a_502_for_the_teacher_not_a_401_for_the_student(fake, class_keys):
    path, made = class_keys
    fake.required_key = "vllm-has-another-key"
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        for reply in (client.get("/v1/models", headers=bearer(made["ana"])),
                      client.post("/v1/chat/completions", headers=bearer(made["ana"]), json=chat())):
            assert reply.status_code == 502
            assert error_of(reply)["code"] == "upstream_auth" and "teacher" in error_of(reply)["message"]
        fake.required_key = INTERNAL_KEY
        assert client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200


# --------------------------------------------------------------------------- keys
def test_keys_missing_wrong_revoked_are_401_and_name_the_cause(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        cases = [({}, "missing_api_key"), ({"Authorization": made["ana"]}, "invalid_api_key"),
                 ({"Authorization": "Basic " + made["ana"]}, "invalid_api_key"),
                 (bearer("sk-not-a-key"), "invalid_api_key"), (bearer(made["cy"]), "revoked_api_key"),
                 (bearer(INTERNAL_KEY), "invalid_api_key")]           # vLLM's own key is no student key
        for headers, code in cases:
            for method, url in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
                reply = client.request(method, url, headers=headers, json=chat())
                assert reply.status_code == 401, (headers, url)
                assert error_of(reply)["code"] == code
                assert error_of(reply)["type"] == "authentication_error"
        assert "revoked" in error_of(client.get("/v1/models", headers=bearer(made["cy"])))["message"]
    assert generation_requests(fake) == []


def test_a_valid_key_is_replaced_by_the_internal_key_and_no_other_header_goes_along(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        headers = {**bearer(made["ana"]), "Cookie": "session=1", "X-Forwarded-For": "10.0.0.1",
                   "X-Request-Id": "mine"}
        assert client.get("/v1/models", headers=headers).json()["data"][0]["id"] == "fake"
        reply = client.post("/v1/completions?debug=1", headers=headers, json={"model": "fake", "prompt": "hi"})
        assert reply.status_code == 200, reply.text
    seen = generation_requests(fake)
    assert [(r["method"], r["path"]) for r in seen] == [("GET", "/v1/models"), ("POST", "/v1/completions")]
    for r in seen:
        assert r["headers"]["authorization"] == f"Bearer {INTERNAL_KEY}"
        assert made["ana"] not in json.dumps(r)
        assert not {"cookie", "x-forwarded-for", "x-request-id"} & set(r["headers"])
    assert any("ana POST /v1/completions 200" in line for line in gw.lines)
    assert not any(made["ana"] in line or INTERNAL_KEY in line for line in gw.lines)


def test_each_key_goes_upstream_with_a_session_id_of_its_own_that_the_student_cannot_set(fake, class_keys):
    """A router's consistent_hash (notebook 09) keeps a student on one replica by X-Session-ID:
    one value per key, derived from its hash (never the key or the name), not the client's."""
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        for name in ("ana", "bo", "ana"):
            reply = client.post("/v1/completions", json={"model": "fake", "prompt": "hi"},
                                headers={**bearer(made[name]), "X-Session-ID": "pick-replica-1"})
            assert reply.status_code == 200, reply.text
    sent = [r["headers"]["x-session-id"] for r in generation_requests(fake)]
    ana, bo = (keyfile.hash_key(made[name])[:16] for name in ("ana", "bo"))
    assert sent == [ana, bo, ana] and ana != bo


def test_keys_made_or_revoked_while_running_count_without_a_restart(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        assert client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200   # the file was just read
        new = keyfile.create_keys(path, ["eve"])["eve"]
        # A key made a moment ago works on the very next request (notebook 08 makes keys and uses
        # them at once), not only after the next look at the file's mtime.
        assert client.get("/v1/models", headers=bearer(new)).status_code == 200
        keyfile.revoke(path, "ana")
        assert wait_for(lambda: client.get("/v1/models", headers=bearer(made["ana"])).status_code == 401, 10)
        assert error_of(client.get("/v1/models", headers=bearer(made["ana"])))["code"] == "revoked_api_key"
        assert client.get("/v1/models", headers=bearer(made["bo"])).status_code == 200
        assert any("keys: reloaded" in line for line in gw.lines)


def test_a_keys_file_others_can_read_is_refused_at_start_and_fails_closed_while_running(fake, class_keys):
    path, made = class_keys
    os.chmod(path, 0o644)
    with pytest.raises(keyfile.KeysError, match="chmod 600"):
        make_app(fake.url, INTERNAL_KEY, path)
    os.chmod(path, 0o600)
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        assert client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200
        path.write_text("{ not json")
        assert wait_for(lambda: client.get("/v1/models", headers=bearer(made["ana"])).status_code == 503, 10)
        assert error_of(client.get("/v1/models", headers=bearer(made["ana"])))["code"] == "keys_unavailable"
        keyfile.create_keys(path.with_name("other.json"), ["x"])
        os.replace(path.with_name("other.json"), path)            # a valid file again: ana is not in it
        assert wait_for(lambda: client.get("/v1/models", headers=bearer(made["ana"])).status_code == 401, 10)


# --------------------------------------------------------------------------- bodies
def test_bodies_too_large_or_not_json_are_refused_before_vllm(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path, max_body_bytes=1000) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        key = bearer(made["ana"])
        big = chat(messages=[{"role": "user", "content": "x" * 2000}])
        assert error_of(client.post("/v1/chat/completions", headers=key, json=big))["code"] == "body_too_large"

        def chunked():                                 # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 200
        reply = client.post("/v1/chat/completions", headers=key, content=chunked())
        assert reply.status_code == 413
        for raw, code in [(b"{", "invalid_json"), (b"[1, 2]", "invalid_json"), (b'"text"', "invalid_json"),
                          (b'{"max_tokens": NaN}', "invalid_json"), (b"\xff\xfe", "invalid_json"),
                          (b"[" * 900, "invalid_json")]:    # deep (60,000 levels was a RecursionError, a 500)
            reply = client.post("/v1/completions", headers=key, content=raw)
            assert reply.status_code == 400 and error_of(reply)["code"] == code, raw
        reply = client.post("/v1/completions", headers=key, json={"prompt": "x", "max_tokens": "many"})
        assert reply.status_code == 400 and "max_tokens must be an integer" in error_of(reply)["message"]
    assert generation_requests(fake) == []


def test_lists_that_can_kill_the_engine_are_refused_and_smaller_ones_pass(fake, class_keys):
    path, made = class_keys
    refused = [({"allowed_token_ids": list(range(2000))}, "too_many_allowed_token_ids"),
               ({"logit_bias": {str(i): 1 for i in range(1025)}}, "too_many_logit_bias"),
               ({"stop_token_ids": list(range(65))}, "too_many_stop_token_ids"),
               # vLLM 0.26.0's GPU runner: more than 128 bad-word sequences or 1,024 tokens kill the
               # engine, and one word may become two sequences: words and their bytes are capped
               ({"bad_words": ["w"] * 33}, "too_many_bad_words"),
               ({"bad_words": ["a" * 200, "b" * 57]}, "too_many_bad_words"),
               ({"stop": ["s"] * 17}, "too_many_stop"),
               ({"prompt_embeds": "AAAA"}, "field_not_allowed"),
               ({"kv_transfer_params": {"do_remote_decode": True}}, "field_not_allowed"),
               ({"structured_outputs": {"regex": "[a-z]{1,5000}"}}, "structured_output_too_complex"),
               ({"guided_grammar": 'start: "a" ~ 3..9999'}, "structured_output_too_complex"),
               ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
                   "type": "object", "properties": {"xs": {"type": "array", "maxItems": 10_000}}}}}],
                 "tool_choice": "required"}, "structured_output_too_complex"),
               # ways around a first version of the rule, found by a reader: JSON in a string,
               # counts that multiply where they nest, a regex as a key
               ({"structured_outputs": {"json": json.dumps({"type": "string", "maxLength": 100_000})}},
                "structured_output_too_complex"),
               ({"structured_outputs": {"regex": "((a{250}){250}){250}"}}, "structured_output_too_complex"),
               ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                   "type": "array", "maxItems": 64, "items": {"type": "array", "maxItems": 64}}}}},
                "structured_output_too_complex"),
               ({"response_format": {"type": "json_schema", "json_schema": {"name": "k", "schema": {
                   "type": "object", "patternProperties": {"^a{0,100000}$": {"type": "string"}}}}}},
                "structured_output_too_complex"),
               ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
                   "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(400)}}}}},
                "structured_output_too_large")]
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        key = bearer(made["ana"])
        for extra, code in refused:
            reply = client.post("/v1/chat/completions", headers=key, json=chat(**extra))
            assert reply.status_code == 400, extra.keys()
            assert error_of(reply)["code"] == code
            assert "at most" in error_of(reply)["message"] or "not accepted" in error_of(reply)["message"]
        reply = client.post("/v1/completions", headers=key, json={"prompt": ["a", "b", "c"]})
        assert error_of(reply)["code"] == "too_many_prompts"
        assert generation_requests(fake) == []
        fine = chat(allowed_token_ids=list(range(1024)), logit_bias={str(i): 1 for i in range(1024)},
                    stop_token_ids=list(range(64)), bad_words=["w" * 8] * 32)
        assert client.post("/v1/chat/completions", headers=key, json=fine).status_code == 200
        assert client.post("/v1/completions", headers=key, json={"prompt": [1, 2, 3]}).status_code == 200
        assert client.post("/v1/completions", headers=key, json={"prompt": ["one"]}).status_code == 200
        small = chat(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}}}}},
            structured_outputs=None)
        assert client.post("/v1/chat/completions", headers=key, json=small).status_code == 200
        # tools the model may call or not (tool_choice auto): no grammar is built, nothing to police
        tools = chat(tools=[{"type": "function", "function": {"name": "note", "parameters": {
            "type": "object", "properties": {"text": {"type": "string", "maxLength": 5000}}}}}], tool_choice="auto")
        assert client.post("/v1/chat/completions", headers=key, json=tools).status_code == 200
    assert len(generation_requests(fake)) == 5


def test_max_tokens_n_and_best_of_are_capped_and_the_answer_says_so(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path, max_tokens=64) as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        key = bearer(made["ana"])
        reply = client.post("/v1/completions", headers=key,
                            json={"prompt": "x", "max_tokens": 100000, "n": 8, "best_of": 8, "priority": -5})
        assert reply.status_code == 200
        adjusted = reply.headers["x-tutorial-gateway-adjusted"]
        assert "max_tokens 100000 -> 64" in adjusted and "n 8 -> 1" in adjusted and "best_of dropped" in adjusted
        client.post("/v1/chat/completions", headers=key, json=chat())                       # nothing asked: the cap
        client.post("/v1/chat/completions", headers=key, json=chat(max_completion_tokens=9000, max_tokens=10))
        client.post("/v1/chat/completions", headers=key, json=chat(max_tokens=12))          # below the cap: kept
    bodies = [r["body"] for r in generation_requests(fake)]
    assert bodies[0] == {"prompt": "x", "max_tokens": 64, "n": 1}
    assert bodies[1]["max_tokens"] == 64
    assert (bodies[2]["max_completion_tokens"], bodies[2]["max_tokens"]) == (64, 10)
    assert bodies[3]["max_tokens"] == 12


# --------------------------------------------------------------------------- streams
def test_sse_bytes_pass_unchanged_and_arrive_as_they_are_made(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", headers=bearer(made["ana"]),
                           json=chat(stream=True, max_tokens=20, split=True, gap=0.02)) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            assert reply.headers["cache-control"] == "no-cache" and reply.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in reply.headers
            pieces = list(reply.iter_raw())
    received = b"".join(pieces)
    assert received == b"".join(fake.sent)                      # byte for byte, cut characters included
    assert received.endswith(b"data: [DONE]\n\n")
    assert b"[DONE]" not in pieces[0] and len(pieces) > 5       # it came in many pieces, not all at the end
    assert all(piece.endswith(b"\n\n") for piece in pieces)     # sent on at event boundaries


def test_per_key_limit_refuses_the_fifth_stream_while_other_keys_still_stream(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path, per_key_concurrency=4, global_concurrency=6) as gw, \
            httpx.Client(base_url=gw.url, timeout=30) as client, contextlib.ExitStack() as streams:
        held = [streams.enter_context(client.stream("POST", "/v1/chat/completions", headers=bearer(made["ana"]),
                                                    json=chat(stream=True, hold=True))) for _ in range(4)]
        assert [r.status_code for r in held] == [200] * 4
        assert wait_for(lambda: fake.open == 4, 10)
        reply = client.post("/v1/chat/completions", headers=bearer(made["ana"]), json=chat(stream=True))
        assert reply.status_code == 429
        assert error_of(reply)["code"] == "too_many_concurrent_requests" and "4" in error_of(reply)["message"]
        assert client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200   # not a generation
        other = client.post("/v1/chat/completions", headers=bearer(made["bo"]), json=chat(stream=True, max_tokens=3))
        assert other.status_code == 200 and other.text.endswith("data: [DONE]\n\n")
        extra = [streams.enter_context(client.stream("POST", "/v1/completions", headers=bearer(made["bo"]),
                                                     json={"prompt": "x", "stream": True, "hold": True}))
                 for _ in range(2)]
        assert [r.status_code for r in extra] == [200, 200]
        busy = client.post("/v1/completions", headers=bearer(made["dee"]), json={"prompt": "x"})
        assert busy.status_code == 429 and error_of(busy)["code"] == "server_busy"
        held[0].close()
        assert wait_for(lambda: gw.state.open_generation.get(keyfile.hash_key(made["ana"])) == 3, 10)
        assert client.post("/v1/completions", headers=bearer(made["ana"]), json={"prompt": "x"}).status_code == 200
    assert wait_for(lambda: gw.state.open_total == 0 and fake.open == 0, 10)


def test_every_route_counts_against_a_keys_places_so_one_key_cannot_fill_the_class(fake, class_keys):
    # /metrics, /v1/models and /version are not generation, but each open one holds a place of
    # the whole class: a key may hold at most per_key_requests of any route (a reader found that
    # one key's /metrics requests, held open, could take every place of the class)
    path, made = class_keys
    fake.hold_metrics = True
    with gateway(fake.url, path, per_key_concurrency=4, per_key_requests=3) as gw, \
            httpx.Client(base_url=gw.url, timeout=30) as client, contextlib.ExitStack() as held_open:
        held = [held_open.enter_context(client.stream("GET", "/metrics", headers=bearer(made["ana"])))
                for _ in range(3)]
        assert [r.status_code for r in held] == [200] * 3
        assert wait_for(lambda: fake.open == 3, 10)
        for method, route, body in (("GET", "/metrics", None), ("GET", "/v1/models", None),
                                    ("POST", "/v1/chat/completions", chat())):
            reply = client.request(method, route, headers=bearer(made["ana"]), json=body)
            assert reply.status_code == 429, route
            assert error_of(reply)["code"] == "too_many_concurrent_requests" and "of any kind" in error_of(reply)["message"]
        assert client.get("/v1/models", headers=bearer(made["bo"])).status_code == 200
        held[0].close()
        assert wait_for(lambda: gw.state.open_requests.get(keyfile.hash_key(made["ana"])) == 2, 10)
        assert client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200
    assert wait_for(lambda: gw.state.open_total == 0 and not gw.state.open_requests and fake.open == 0, 10)


def test_one_key_sending_short_requests_back_to_back_is_slowed_to_its_rate_and_others_are_not(fake, class_keys):
    # open requests are capped per key, but short ones one after another (a /tokenize of a long
    # text, /v1/models) would keep vLLM's API server busy for the whole class: a bucket per key.
    # One request every 5 s: however slow this machine, three requests do not refill a place.
    path, made = class_keys
    with gateway(fake.url, path, per_key_rate=0.2, per_key_burst=3) as gw, \
            httpx.Client(base_url=gw.url, timeout=30) as client:
        replies = [client.get("/v1/models", headers=bearer(made["ana"])) for _ in range(3)]
        assert [r.status_code for r in replies] == [200] * 3
        slowed = client.post("/tokenize", headers=bearer(made["ana"]), json={"model": "fake", "prompt": "x"})
        assert slowed.status_code == 429 and error_of(slowed)["code"] == "rate_limited", slowed.text
        assert "0.2 a second after a burst of 3" in error_of(slowed)["message"]   # one every 5 s
        assert int(slowed.headers["Retry-After"]) >= 1
        assert client.get("/v1/models", headers=bearer(made["bo"])).status_code == 200     # another key
        # a refused request spends nothing: asking again and again, the key gets its next place
        assert wait_for(lambda: client.get("/v1/models", headers=bearer(made["ana"])).status_code == 200, 30, interval=0.5)
        assert any("rate_limited" in line for line in gw.lines)
    assert Limits().per_key_rate > 0 and Limits().per_key_burst >= Limits().per_key_requests
    with pytest.raises(ValueError, match="per_key_rate must be positive"):
        Limits(per_key_rate=float("nan"))              # would switch the bucket off: min(burst, nan) is burst


def test_a_client_that_goes_away_ends_the_request_in_vllm(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", headers=bearer(made["ana"]),
                           json=chat(stream=True, hold=True)) as reply:
            chunks = reply.iter_raw()           # kept: a dropped iterator closes the connection
            next(chunks)
            assert wait_for(lambda: fake.open == 1, 10), (fake.open, fake.cancelled, gw.lines)
        assert wait_for(lambda: fake.cancelled == 1 and fake.open == 0, 10)
        assert wait_for(lambda: gw.state.open_total == 0, 10)
        # before any answer: a non-streamed request waiting on vLLM, then the client goes
        done = threading.Event()

        def ask():
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(gw.url + "/v1/completions", headers=bearer(made["ana"]),
                           json={"prompt": "x", "hold": True}, timeout=1.0)
            done.set()
        threading.Thread(target=ask, daemon=True).start()
        assert done.wait(10)
        assert wait_for(lambda: fake.cancelled == 2 and fake.open == 0 and gw.state.open_total == 0, 10)


def test_revoking_a_key_ends_its_open_streams_with_an_error_event(fake, class_keys):
    path, made = class_keys
    with gateway(fake.url, path) as gw, httpx.Client(base_url=gw.url, timeout=30) as client:
        answers: dict[str, object] = {}

        def wait_answer():
            answers["waiting"] = httpx.post(gw.url + "/v1/completions", headers=bearer(made["bo"]),
                                            json={"prompt": "x", "hold": True}, timeout=30)
        waiting = threading.Thread(target=wait_answer, daemon=True)
        with client.stream("POST", "/v1/chat/completions", headers=bearer(made["bo"]),
                           json=chat(stream=True, hold=True)) as bo_stream, \
                client.stream("POST", "/v1/chat/completions", headers=bearer(made["ana"]),
                              json=chat(stream=True, hold=True)) as ana_stream:
            bo_chunks = bo_stream.iter_raw()
            first = next(bo_chunks)
            assert first.startswith(b"data: {")
            waiting.start()
            assert wait_for(lambda: fake.open == 3, 10)
            keyfile.revoke(path, "bo")
            rest = b"".join(bo_chunks)                        # ends by itself: the gateway ends it
            event = json.loads(rest.decode().strip().removeprefix("data: "))
            assert event["error"]["code"] == "revoked_api_key" and "revoked" in event["error"]["message"]
            waiting.join(10)
            assert answers["waiting"].status_code == 401
            assert error_of(answers["waiting"])["code"] == "revoked_api_key"
            assert wait_for(lambda: fake.open == 1, 10)                # ana's stream is still open
            assert not ana_stream.is_closed
        assert any("ended open request(s): 2 of bo" in line for line in gw.lines)
    assert wait_for(lambda: fake.open == 0, 10)


def test_json_depth_counts_brackets_outside_strings_only():
    from helpers.classroom.policy import MAX_JSON_DEPTH, Refused, json_depth, parse_body

    assert json_depth(b'{"a": [1, {"b": "[[[[ {{"}]}') == 3
    assert json_depth(b'{"a": "\\"[[[", "b": [[]]}') == 3          # an escaped quote does not end the string
    nested = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_body(nested)["a"]                                   # at the limit: parsed
    with pytest.raises(Refused, match=f"deeper than {MAX_JSON_DEPTH}"):
        parse_body(b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}")
