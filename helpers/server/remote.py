"""A server that runs elsewhere: a class server a student reaches by URL and key.

With ``server_url`` set (``TUTORIAL_SERVER_URL``, with the key in ``TUTORIAL_API_KEY``),
``get_server()`` starts nothing: it connects to that server, checks within seconds that it
answers, that the key is accepted and that it serves the expected model, and hands back a
``RemoteServer``, which notebooks use like a server of their own (``base_url``, ``name``,
``client()``, ``endpoint``), except that it cannot be stopped from here and its log is on the
teacher's machine. Each way a connection can fail is a clear error that says what to set.
"""

from __future__ import annotations

from pathlib import Path

import requests

from ..endpoint import Endpoint
from ..errors import ModelNotServedError, NotOwnerError, ServerUnreachableError
from ..settings import EMBEDDED, Settings
from .embedded_model import SERVED_NAME
from .model_source import looks_like_path

CONNECT_SECONDS = 5.0


def expected_name(settings: Settings) -> str:
    """The served name the settings ask for, worked out without touching the model."""
    if settings.served_model_name:
        return settings.served_model_name
    if settings.model == EMBEDDED:
        return SERVED_NAME
    return Path(settings.model).name if looks_like_path(settings.model) else settings.model.split("/")[-1]


class RemoteServer:
    """A server reached by URL and key; started and stopped by someone else (the teacher)."""

    owned = False
    record = None
    pgid = None
    log_path = None

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def name(self) -> str:
        return self.endpoint.model

    @classmethod
    def connect(cls, settings: Settings, progress=print) -> "RemoteServer":
        """Reach ``settings.server_url``, or raise an error that names what is wrong."""
        url = settings.server_url.rstrip("/")
        url = url[:-3] if url.endswith("/v1") else url
        server = cls(Endpoint(url, expected_name(settings), settings.api_key))
        try:
            health = requests.get(url + "/health", timeout=CONNECT_SECONDS)
        except requests.RequestException as err:
            raise ServerUnreachableError(
                f"nothing answers at {url} ({type(err).__name__}): check TUTORIAL_SERVER_URL, and ask "
                f"whether the class server is running and this machine may reach it") from None
        if health.status_code != 200:
            raise ServerUnreachableError(
                f"something answers at {url}, but not as a vLLM server ready to serve (GET /health "
                f"answered {health.status_code}): check TUTORIAL_SERVER_URL, or wait if it is starting")
        served = [m["id"] for m in server.endpoint.models()]      # ApiKeyError on a wrong key
        if server.name not in served:
            raise ModelNotServedError(
                f"{url} serves {served}, not {server.name!r}: set TUTORIAL_SERVED_MODEL_NAME="
                f"{served[0] if served else '<name>'} (the name your teacher gave)")
        progress(f"Connected to {server.base_url}, which serves {server.name!r}")
        return server

    # ------------------------------------------------------------ as VLLMServer does
    @property
    def alive(self) -> bool:
        return self.health()

    def health(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=CONNECT_SECONDS).status_code == 200
        except requests.RequestException:
            return False

    def version(self) -> str:
        return self.endpoint.get("/version").json()["version"]

    def models(self) -> list[dict]:
        return self.endpoint.models()

    def client(self, **kwargs):
        return self.endpoint.client(**kwargs)

    def async_client(self, **kwargs):
        return self.endpoint.async_client(**kwargs)

    def processes(self) -> list[tuple[int, str]]:
        return []

    def log_text(self) -> str:
        return ""

    def tail(self, lines: int = 20, grep: str | None = None) -> str:
        return f"(the log of {self.url} is on the machine that runs it)"

    def wait_ready(self, timeout: float | None = None, progress=print) -> "RemoteServer":
        return self

    def stop(self, force: bool = False):
        raise NotOwnerError(f"{self.url} is a server elsewhere (a class server): it is stopped where it runs")

    def __repr__(self) -> str:
        return f"<RemoteServer {self.name!r} {self.url}>"


def local_server_only(what: str, settings: Settings | None = None) -> bool:
    """Call at the top of a notebook that starts servers of its own (01, 05, 06, 08).

    On a student's machine connected to a class server (``server_url`` set), say so and turn
    every later cell of this notebook into that note, so that it runs through (under nbval too)
    without starting anything, and return False. Elsewhere do nothing and return True.
    """
    from ..settings import load_settings

    settings = settings or load_settings()
    if not settings.server_url:
        return True
    note = f"skipped: {what}; connected to a class server ({settings.server_url}), nothing starts here"
    print(note)
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is not None:
        shell.input_transformers_post.append(lambda lines: [f"print({note!r})\n"])
    return False
