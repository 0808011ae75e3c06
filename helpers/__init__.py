"""Helpers for the vLLM serving walkthrough: each module holds one concern.

The notebooks mostly need one call::

    from helpers import get_server
    server = get_server()   # reuse the running server for the current settings, or start one

The modules, by concern:

* the server's life: ``settings`` (the one setting), ``model_source`` and ``embedded_model``
  (what to serve), ``hardware`` and ``server_config`` (the exact command), ``server`` (start,
  wait, stop), ``process_guard`` and ``server_registry`` (no orphans, no pile-up),
  ``startup_diagnosis`` (why a start failed), ``__main__`` (a detached class server);
* streaming: ``sse`` (bytes to events, exactly), ``chat_stream`` (one piece interface over
  ``requests`` and ``openai``), ``stream_stats``, ``stream_widget`` (live view, Stop),
  ``stream_loss`` (what the origin's decoding drops);
* logs and numbers: ``log_presets`` (supported switches only), ``log_experiment`` (notebook
  05's measured comparison), ``server_metrics`` (``/metrics``);
* ``errors``: every error the helpers raise.
"""

from .errors import (ApiKeyError, ModelNotFoundError, NotOwnerError, PortInUseError,
                     ServerDiedError, ServerStartError, StartupTimeoutError, TutorialError)
from .server import VLLMServer, get_server
from .server_config import ServerConfig, from_settings
from .settings import Settings, load_settings

__all__ = [
    "ApiKeyError", "ModelNotFoundError", "NotOwnerError", "PortInUseError", "ServerConfig",
    "ServerDiedError", "ServerStartError", "Settings", "StartupTimeoutError", "TutorialError",
    "VLLMServer", "from_settings", "get_server", "load_settings",
]
