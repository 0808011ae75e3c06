"""Where a server answers and how to talk to it: one object for the URL, the key and the name.

Every part of the helpers that sends a request (the server manager's readiness checks, the
stream readers, the metrics sampler) takes an ``Endpoint`` or anything that has one
(``server.endpoint``), instead of each reading a server's configuration on its own::

    from helpers.endpoint import Endpoint
    api = Endpoint("http://127.0.0.1:8000", model="Qwen", api_key=None)
    api.base_url             # http://127.0.0.1:8000/v1: what the openai SDK calls base_url
    api.headers()            # {"Authorization": "Bearer ..."} when there is a key
    api.client()             # openai.OpenAI(base_url=..., api_key=key or "EMPTY", max_retries=0)

It is also what a student gets from a class server elsewhere: a URL, a key and a model name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from .errors import ApiKeyError

# What the openai SDK needs as a key when the server wants none (any string does).
NO_KEY = "EMPTY"


# The URL of a server on a Unix socket: its host is only the HTTP Host header there, and a name
# that never resolves, so code that ignores the socket fails instead of reaching another server.
UDS_URL = "http://vllm.invalid"


def server_url(host: str, port: int | None, uds: str | None = None) -> str:
    """The URL requests to a server use: ``http_url``, or ``UDS_URL`` for one on a Unix socket."""
    return UDS_URL if uds else http_url(host, port)


def shown_at(url: str, uds: str | None = None) -> str:
    """Where a server listens, for people: its URL, or ``unix:/path`` for a socket."""
    return f"unix:{uds}" if uds else url


def http_url(host: str, port: int | None) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", "", "::"):  # every interface: loopback is one of them
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    url: str                        # the server's root, e.g. http://127.0.0.1:8000
    model: str                      # the served name clients send as ``model``
    api_key: str | None = None
    uds: str | None = None          # a Unix socket the server listens on instead (vLLM's --uds)

    def __post_init__(self):
        object.__setattr__(self, "url", self.url.rstrip("/"))

    @property
    def base_url(self) -> str:
        """The OpenAI-style API root (``.../v1``)."""
        return self.url + "/v1"

    @property
    def where(self) -> str:
        return shown_at(self.url, self.uds)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, *, timeout: float = 10.0):
        """``GET url + path`` with the key (``path`` starts with ``/``): a ``requests`` response, or
        for a Unix socket an ``httpx`` one (the same ``status_code``, ``json()``, ``text``)."""
        if self.uds:
            import httpx

            with httpx.Client(transport=httpx.HTTPTransport(uds=self.uds), timeout=timeout) as client:
                return client.get(self.url + path, headers=self.headers())
        return requests.get(self.url + path, headers=self.headers(), timeout=timeout)

    def models(self) -> list[dict]:
        """The ``/v1/models`` list; a 401 is an ``ApiKeyError`` that says what to set."""
        reply = self.get("/v1/models")
        if reply.status_code == 401:
            raise ApiKeyError(
                f"{self.url}/v1/models answered 401: the server wants an API key and this request "
                f"{'sent another one' if self.api_key else 'sent none'}. Set TUTORIAL_API_KEY "
                f"(or api_key in tutorial.toml) to the key you were given.")
        reply.raise_for_status()
        return reply.json()["data"]

    def client(self, **kwargs: Any):
        """An ``openai.OpenAI`` for this server: no hidden retries, a finite timeout."""
        return self._openai("OpenAI", kwargs)

    def async_client(self, **kwargs: Any):
        """An ``openai.AsyncOpenAI`` for this server, set up like ``client()``."""
        return self._openai("AsyncOpenAI", kwargs)

    def _openai(self, kind: str, kwargs: dict):
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 120.0)
        if self.uds and "http_client" not in kwargs:
            import httpx

            pool = httpx.Limits(max_connections=1000, max_keepalive_connections=100)   # the SDK's own
            if kind == "AsyncOpenAI":
                kwargs["http_client"] = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.uds, limits=pool))
            else:
                kwargs["http_client"] = httpx.Client(transport=httpx.HTTPTransport(uds=self.uds, limits=pool))
        return getattr(openai, kind)(base_url=self.base_url, api_key=self.api_key or NO_KEY, **kwargs)

    def __repr__(self) -> str:  # never show the key
        where = f", uds={self.uds!r}" if self.uds else ""
        return f"Endpoint({self.url!r}, model={self.model!r}, api_key={'***' if self.api_key else None}{where})"


def as_endpoint(target: Any, model: str | None = None, api_key: str | None = None) -> Endpoint:
    """An ``Endpoint`` from an endpoint, a server (``.endpoint``) or a base URL plus ``model``."""
    if isinstance(target, Endpoint):
        endpoint = target
    elif hasattr(target, "endpoint"):
        endpoint = target.endpoint
    elif isinstance(target, str):
        if model is None:
            raise ValueError("give model= when talking to a server by its URL")
        url = target.rstrip("/")
        endpoint = Endpoint(url[:-3] if url.endswith("/v1") else url, model, api_key)
    else:
        raise TypeError(f"expected an Endpoint, a server or a URL, got {type(target).__name__}")
    if model is not None or api_key is not None:
        from dataclasses import replace
        endpoint = replace(endpoint, model=model or endpoint.model, api_key=api_key or endpoint.api_key)
    return endpoint
