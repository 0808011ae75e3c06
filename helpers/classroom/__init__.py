"""One vLLM server for a whole class, safe to show to the network.

vLLM's ``--api-key`` guards only some paths (``/v1`` ...): ``/invocations`` generates text
without a key, and ``/tokenize``, ``/metrics``, ``/docs`` and more answer anyone. So for a
class, vLLM listens on 127.0.0.1 with an internal key (with ``./tutorial.sh serve``, on a Unix
socket only the teacher's user can reach), and a small gateway is the only thing bound to the
network address: it passes ``GET /health`` (no key), and with a student's key
``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /tokenize``,
``POST /detokenize``, ``GET /metrics`` and ``GET /version``, and answers everything else itself. (``./tutorial.sh serve`` with a network
host starts both; notebook 08 shows each piece.)

* ``keys``: per-student keys (the file holds only their sha256), revoked without a restart,
  the hand-out lines (``python -m helpers.classroom.keys create|revoke|list``);
* ``policy``: the limits (``Limits``) and the rules a request body must obey (size, JSON,
  ``max_tokens`` cap, ``n``, list sizes that have crashed vLLM's engine);
* ``gateway``: the ASGI app (``make_app``; Starlette, httpx, uvicorn, pinned at the versions vLLM brings)
  and ``python -m helpers.classroom.gateway``;
* ``service``: ``start_gateway(server, host=...)`` runs the gateway under the project's guard,
  ending with its owner and with its server; ``gateways()`` lists the running ones;
  ``start_class_server(settings)`` starts both pieces as ``./tutorial.sh serve`` does;
* ``connections``: the gateway's bounds on what a peer holds before sending a whole request;
* ``network``: ``PrivateNetwork``, a network namespace of this user's own for a router and its
  replicas (notebook 09), which the gateway enters after binding its port; ``isolated``, which
  runs a class server's vLLM alone in one (its engine's ports out of other users' reach).

    from helpers import get_server
    from helpers.classroom import create_keys, start_gateway
    create_keys(names=["ana", "bo"], url="http://198.18.0.1:8080")   # hand-out lines in a file
    gateway = start_gateway(get_server(), host="198.18.0.1", port=8080)
"""

# Imported on first use, so that ``python -m helpers.classroom.gateway`` (or ``.keys``) does not
# find its own module imported already by this package.
_EXPORTS = {
    "make_app": "gateway", "KeysError": "keys", "create_keys": "keys", "revoke": "keys", "students": "keys",
    "Limits": "policy", "GatewayError": "service", "GatewayProcess": "service", "gateways": "service",
    "start_gateway": "service", "start_class_server": "service", "ClassServer": "service",
    "PrivateNetwork": "network", "PrivateNetworkError": "network",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
