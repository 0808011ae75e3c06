"""Helpers for the vLLM serving walkthrough: each module holds one concern.

The notebooks mostly need one call::

    from helpers import get_server
    server = get_server()   # reuse the running server for the current settings, or start one
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
