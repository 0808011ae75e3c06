"""Helpers for the vLLM serving walkthrough. Each notebook first shows the plain code a learner
writes (``vllm serve``, ``curl``, ``requests``, ``openai``), then what a helper here adds.

The one call most notebooks need::

    from helpers import get_server
    server = get_server()   # reuse the running server for the current settings, or start one

The package, by concern:

* ``settings`` (what to serve, where: ``TUTORIAL_*`` variables or ``tutorial.toml``), ``paths``
  (where files live, how our variables are named), ``endpoint`` (URL + key + model name: what
  every request needs), ``errors`` (every error the helpers raise, one family);
* ``server/``: the server's life (``config``, ``hardware``, ``model_source``,
  ``embedded_model``, ``lifecycle``, ``guard``, ``registry``, ``diagnosis``);
* ``stream/``: streamed answers (``sse``, ``chat``, ``stats``, ``widget``);
* ``logs/``: what a server says (``presets``, ``metrics``);
* ``lessons/``: code that exists for one lesson's demonstration (``stream_loss``,
  ``log_experiment``);
* ``classroom/``: a class on one server (``keys``: students' keys; ``gateway``: the keyed front
  door; ``policy``: what a request may ask; ``service``: the gateway as a process);
* ``loadtest``: simulated users against a server, every failure named (notebooks 07 and 08);
* ``__main__``: ``python -m helpers start|status|stop`` (``./tutorial.sh serve|status|stop``).
"""

from .endpoint import Endpoint
from .errors import (ApiKeyError, ModelNotFoundError, NotOwnerError, PortInUseError,
                     ServerDiedError, ServerStartError, SettingsError, StartupTimeoutError, TutorialError)
from .server.config import ServerConfig, from_settings
from .server.lifecycle import VLLMServer, get_server
from .server.remote import RemoteServer, local_server_only
from .settings import Settings, load_settings

__all__ = [
    "ApiKeyError", "Endpoint", "ModelNotFoundError", "NotOwnerError", "PortInUseError", "ServerConfig",
    "ServerDiedError", "ServerStartError", "Settings", "SettingsError", "StartupTimeoutError",
    "RemoteServer", "TutorialError", "VLLMServer", "from_settings", "get_server", "load_settings",
    "local_server_only",
]
