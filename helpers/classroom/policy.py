"""What the gateway lets through to vLLM: the limits, and the rules a request body must obey.

One student must not be able to stop the class. vLLM trusts its clients: a request with
``n=64``, ``max_tokens`` as large as the context, a batch of 500 prompts, or (vLLM 0.26 on a
GPU) 2,000 ``allowed_token_ids`` is served, or kills the engine for everyone
(``EngineDeadError``). So every generation request is read here first, and either refused with
a message that names the rule, or rewritten to fit:

* the body is at most ``max_body_bytes`` (413) and is a JSON object nested at most
  ``MAX_JSON_DEPTH`` levels (400);
* ``max_tokens`` / ``max_completion_tokens`` are clamped to ``max_tokens`` (and set to it when
  the request has neither: vLLM's default is the whole context);
* ``n`` becomes 1, ``best_of`` and ``priority`` are dropped, ``request_id`` is dropped (vLLM
  makes its own; two requests with the same id must not meet in the engine);
* ``allowed_token_ids`` and ``logit_bias`` may hold at most ``max_allowed_token_ids`` /
  ``max_logit_bias`` entries, ``stop_token_ids`` at most ``max_stop_token_ids``, ``bad_words``
  at most ``max_bad_words`` words of ``max_bad_words_bytes`` in all, ``stop`` at most
  ``max_stop`` strings;
* structured outputs (``structured_outputs``, ``response_format``, ``tools`` when a call is
  forced, the older ``guided_*``) take at most ``max_structured_bytes`` in all, and no counted
  repetition (``{m,n}`` in a regex or grammar, ``maxLength``/``maxItems``... in a schema,
  multiplied where they nest) above ``max_structured_repeat``;
* ``/tokenize`` and ``/detokenize`` take only their plain fields (``_TOKEN_FIELDS``): no
  ``chat_template`` or ``chat_template_kwargs``, no tools, no processor arguments;
* ``/v1/completions`` takes one prompt per request (a list of prompts is a batch: as many
  sequences as entries), and never ``prompt_embeds`` (raw tensors from the network) nor the
  disaggregated-serving fields ``kv_transfer_params`` / ``ec_transfer_params``.

The gateway sends vLLM the body it checked (``json.dumps`` of the parsed object), never the
bytes it received, so the two can never read one request two ways. Everything here is pure:
``police(body_bytes, route, limits)`` returns the new body or raises ``Refused``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Limits:
    """The gateway's limits; every one can be changed on the command line (``--max-tokens`` ...)."""

    max_body_bytes: int = 64 * 1024       # a request body larger than this: 413
    max_tokens: int = 512                 # cap on max_tokens / max_completion_tokens
    per_key_concurrency: int = 4          # generation requests open at once on one key (then 429)
    per_key_requests: int = 8             # requests of any route open at once on one key (then 429)
    per_key_rate: float = 10.0            # requests a second on one key, sustained (then 429) ...
    per_key_burst: int = 60               # ... after a burst of this many: a token bucket per key
    global_concurrency: int = 64          # requests open at once through the gateway (then 429)
    max_allowed_token_ids: int = 1024
    max_logit_bias: int = 1024
    # vLLM 0.26.0's GPU model runner raises inside the engine above 128 stop tokens when
    # min_tokens > 0, counting the EOS ids it adds itself (v1/worker/gpu/sample/logit_bias.py)
    max_stop_token_ids: int = 64
    # and above 128 bad-word sequences or 1,024 bad-word tokens (v1/worker/gpu/sample/bad_words.py);
    # a word may become two sequences (with and without a leading space), a byte at most one token
    max_bad_words: int = 32
    max_bad_words_bytes: int = 256        # UTF-8 bytes of all bad_words together
    max_stop: int = 16                    # stop strings
    body_timeout: float = 30.0            # seconds to receive a request body (then 408)
    max_structured_bytes: int = 8 * 1024  # structured_outputs + response_format + tools, as JSON
    max_structured_repeat: int = 1024     # {m,n} in a regex or grammar, maxLength/maxItems in a schema, multiplied where nested
    header_timeout: float = 10.0          # seconds for a request's line and headers, or an idle connection (then closed)
    per_peer_connections: int = 64       # connections open at once from one address (more: closed at once)
    keys_check_interval: float = 1.0      # how often the keys file's mtime is looked at
    health_cache_seconds: float = 1.0     # /health asks vLLM at most this often

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:                             # NaN too: every comparison with it is False
                raise ValueError(f"Limits.{f.name} must be positive, got {value!r}")

    @property
    def upstream_connections(self) -> int:
        """httpx's pool size: above anything the gateway admits at once (plus /health)."""
        return self.global_concurrency + 8


class Refused(Exception):
    """A request the gateway answers itself: ``status``, an OpenAI-style ``type`` and ``code``,
    and a message that names the cause."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str = "invalid_request", param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}              # sent with the refusal (Retry-After)

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# What the server does with a request before generating (notebook 02): the prompt the chat
# template builds, as token ids, and token ids back to text. Cheap, but still work on vLLM's API
# server, so they count against a key's concurrency like generation does.
TOKEN_ROUTES = ("/tokenize", "/detokenize")
_TOKEN_FIELDS = {
    "/tokenize": {"model", "messages", "prompt", "add_generation_prompt", "add_special_tokens",
                  "continue_final_message", "return_token_strs"},
    "/detokenize": {"model", "tokens"},
}
_DROPPED = ("best_of", "priority", "request_id")
_REFUSED = ("prompt_embeds", "kv_transfer_params", "ec_transfer_params")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Deeper JSON than this is refused before it is parsed: Python's parser recurses once per level
# and a 60,000-deep `[[[...` (under 64 KiB) raised RecursionError, a 500 with a traceback. No
# request a class sends nests deeper (a chat with a tool's JSON schema: about 10).
MAX_JSON_DEPTH = 64
_OPEN, _CLOSE, _QUOTE, _BACKSLASH = b"[{", b"]}", ord('"'), ord("\\")


def json_depth(raw: bytes, stop_above: int = MAX_JSON_DEPTH) -> int:
    """How deep ``raw``'s arrays and objects nest (brackets inside strings do not count);
    counting stops at the first level above ``stop_above``."""
    depth = peak = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPEN:
            depth += 1
            if depth > peak:
                peak = depth
                if peak > stop_above:
                    break
        elif byte in _CLOSE:
            depth -= 1
    return peak


def refuse_if_too_deep(raw: bytes, what: str, param: str | None = None) -> None:
    """``Refused`` (400) when ``raw`` nests deeper than ``MAX_JSON_DEPTH``, before ``json.loads``
    (whose recursion a deep enough body exhausts)."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise Refused(400, f"{what} nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json", param=param)


def parse_body(raw: bytes) -> dict:
    """The request's JSON object; ``Refused`` (400) for anything else."""
    refuse_if_too_deep(raw, "the request body")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Refused(400, f"the request body is not valid JSON ({type(err).__name__}: {err})",
                      code="invalid_json") from None
    if not isinstance(body, dict):
        raise Refused(400, f"the request body must be a JSON object, got {type(body).__name__}",
                      code="invalid_json")
    return body


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Refused(400, f"{name} must be an integer, got {value!r}", param=name)
    return value


def _count(body: dict, name: str, kinds: tuple[type, ...], limit: int, what: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, kinds):
        return                                    # a wrong type: vLLM's own validation names it
    if len(value) > limit:
        raise Refused(400, f"{name} has {len(value)} {what}; this class server allows at most {limit} "
                           f"(larger lists can stop the model server for everyone)",
                      code=f"too_many_{name}", param=name)


def police(body: dict, route: str, limits: Limits) -> tuple[dict, list[str]]:
    """Check and rewrite one generation request. Returns the body to send and what was changed
    (``["max_tokens 4096 -> 512", ...]``); raises ``Refused`` for a request it will not send."""
    if route in TOKEN_ROUTES:
        return _police_tokens(body, route), []
    body = dict(body)
    changed: list[str] = []
    for name in _REFUSED:
        if body.get(name) is not None:
            raise Refused(400, f"{name} is not accepted by this class server", code="field_not_allowed",
                          param=name)
    _count(body, "allowed_token_ids", (list,), limits.max_allowed_token_ids, "entries")
    _count(body, "logit_bias", (dict,), limits.max_logit_bias, "entries")
    _count(body, "stop_token_ids", (list,), limits.max_stop_token_ids, "entries")
    _count(body, "bad_words", (list,), limits.max_bad_words, "entries")
    words = body.get("bad_words")
    if isinstance(words, list):
        size = sum(len(w.encode("utf-8", "surrogatepass")) for w in words if isinstance(w, str))
        if size > limits.max_bad_words_bytes:
            raise Refused(400, f"bad_words hold {size} bytes in all; this class server allows at most "
                               f"{limits.max_bad_words_bytes} (longer lists can stop the model server for everyone)",
                          code="too_many_bad_words", param="bad_words")
    _count(body, "stop", (list,), limits.max_stop, "strings")
    _police_structured(body, limits)
    if route == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in prompt):
            if len(prompt) > 1:
                raise Refused(400, f"prompt is a list of {len(prompt)} prompts; this class server takes "
                                   f"one prompt per request", code="too_many_prompts", param="prompt")
    capped = False
    for name in ("max_tokens", "max_completion_tokens"):
        value = _integer(body, name)
        if value is not None:
            capped = True
            if value > limits.max_tokens:
                body[name] = limits.max_tokens
                changed.append(f"{name} {value} -> {limits.max_tokens}")
    if not capped:
        body["max_tokens"] = limits.max_tokens
        changed.append(f"max_tokens (unset) -> {limits.max_tokens}")
    n = _integer(body, "n")
    if n is not None and n != 1:
        body["n"] = 1
        changed.append(f"n {n} -> 1")
    for name in _DROPPED:
        if name in body:
            del body[name]
            changed.append(f"{name} dropped")
    return body, changed


# Fields that make the engine build a grammar (an automaton) before the first token: JSON schemas,
# regexes, grammars, choices, structural tags, and tool schemas when a tool call is forced
# (vLLM 0.32.0: `StructuredOutputsParams` in vllm/sampling_params.py, whose `json` and
# `structural_tag` may be JSON in a string; `response_format` and `tools` in the chat protocol; the
# `guided_*` names are older releases'). The automaton is built in the engine, for the whole
# class: a short regex such as `(a|b){0,100000}`, a schema with `"maxLength": 100000`, or counts
# that multiply when nested (`((a{250}){250}){250}`, arrays in arrays) ask for one of that size.
STRUCTURED_FIELDS = ("structured_outputs", "response_format", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")
_PATTERN_KEYS = {"regex", "grammar", "pattern", "whitespace_pattern", "guided_regex", "guided_grammar"}
_COUNT_KEYS = {"maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties",
               "maxContains", "minContains"}
_JSON_IN_A_STRING = {"json", "structural_tag", "guided_json", "schema", "json_schema"}
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}|~\s*(\d+)(?:\s*\.\.\s*(\d+))?")


def pattern_repeats(pattern: str) -> int:
    """The largest product of counted repetitions nested in ``pattern`` (``{m,n}``, ``{,n}``, and
    a Lark grammar's ``~ m..n``): ``(a{3}){4}`` gives 12, ``a{3}b{4}`` gives 4."""
    stack = [1]                    # per open group: the largest product inside it so far
    last = 1                       # the value of the item just read (a group's inner product, or 1)
    i = 0
    while i < len(pattern):
        char = pattern[i]
        match = _QUANTIFIER.match(pattern, i)
        if char == "\\":
            last, i = 1, i + 2
            continue
        if char == "[":                                   # a character class is one item
            end = i + 1
            while end < len(pattern) and pattern[end] != "]":
                end += 2 if pattern[end] == "\\" else 1
            last, i = 1, end + 1
            continue
        if char == "(":
            stack.append(1)
            last = 1
        elif char == ")" and len(stack) > 1:
            last = stack.pop()
        elif match:
            count = max(int(n) for n in match.groups() if n) if any(match.groups()) else 1
            last = last * count
            stack[-1] = max(stack[-1], last)
            i = match.end()
            continue
        else:
            last = 1
        stack[-1] = max(stack[-1], last)
        i += 1
    return max(stack)


def _police_structured(body: dict, limits: Limits) -> None:
    present = {name: body[name] for name in STRUCTURED_FIELDS if body.get(name) is not None}
    forced = body.get("tool_choice")
    if body.get("tools") and (forced == "required" or isinstance(forced, dict)):
        present["tools"] = body["tools"]              # a forced call: the tools' schemas become a grammar
    if not present:
        return
    size = len(json.dumps(present, ensure_ascii=False).encode())
    if size > limits.max_structured_bytes:
        raise Refused(400, f"{', '.join(present)} take {size} bytes here; this class server accepts at most "
                           f"{limits.max_structured_bytes} (a schema, regex or grammar that large would hold "
                           f"the engine for everyone while it compiles)", code="structured_output_too_large",
                      param=next(iter(present)))
    where, worst = _largest_repeat(present, "", 1)
    if worst > limits.max_structured_repeat:
        raise Refused(400, f"{where} asks for {worst:,} repetitions (counts multiplied where they nest); this class "
                           f"server accepts at most {limits.max_structured_repeat:,} in a structured output (each "
                           f"one is a state of the automaton the engine builds)",
                      code="structured_output_too_complex", param=where.split(".")[0].split("[")[0])


def _largest_repeat(value, where: str, outer: int) -> tuple[str, int]:
    """(where, product) of the largest repetition count in ``value``: patterns' nested quantifiers,
    and schema counts multiplied along the nesting (``outer``: the product of the enclosing ones).
    JSON sent as a string (``"json": "{...}"``) is read and looked into too."""
    best = (where, outer)
    if isinstance(value, dict):
        local = max((v for k, v in value.items() if k in _COUNT_KEYS and isinstance(v, int)
                     and not isinstance(v, bool)), default=1)
        inner = outer * max(local, 1)
        if inner > best[1]:
            best = (where, inner)
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "patternProperties" and isinstance(item, dict):      # the keys are regexes
                for regex in item:
                    found = inner * pattern_repeats(regex)
                    if found > best[1]:
                        best = (f"{path}[{regex!r}]", found)
            if isinstance(item, str) and key in _PATTERN_KEYS:
                found = inner * pattern_repeats(item)
                if found > best[1]:
                    best = (path, found)
                continue
            if isinstance(item, str) and key in _JSON_IN_A_STRING:
                item = _json_in_a_string(item, path)
            candidate = _largest_repeat(item, path, inner)
            if candidate[1] > best[1]:
                best = candidate
    elif isinstance(value, list):
        for i, item in enumerate(value):
            candidate = _largest_repeat(item, f"{where}[{i}]", outer)
            if candidate[1] > best[1]:
                best = candidate
    return best


def _json_in_a_string(text: str, where: str):
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return text                                    # a plain string (a name, a description)
    refuse_if_too_deep(text.encode(), where, param=where)
    try:
        return json.loads(text)
    except ValueError:
        return text                                    # not JSON: vLLM will say so


def _police_tokens(body: dict, route: str) -> dict:
    """``/tokenize`` and ``/detokenize`` take only their plain fields: no template, template
    arguments, tools or processor arguments of the student's own (vLLM renders templates on its
    API server, the one process the whole class shares)."""
    allowed = _TOKEN_FIELDS[route]
    for name in sorted(body):
        if name not in allowed:
            raise Refused(400, f"{name} is not accepted by this class server on {route} (it takes "
                               f"{', '.join(sorted(allowed))})", code="field_not_allowed", param=name)
    return dict(body)


def encode(body: dict) -> bytes:
    """The bytes sent to vLLM: what was checked, nothing else."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
