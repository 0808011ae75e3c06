"""Where the tutorial keeps its files, and how its own environment variables are named.

Every variable the helpers read starts with ``TUTORIAL_`` (``TUTORIAL_MODEL``,
``TUTORIAL_STATE_DIR`` ...), outside vLLM's ``VLLM_`` namespace: vLLM warns about every
``VLLM_*`` variable it does not know, and a learner should be able to tell vLLM's own
variables (``VLLM_CPU_KVCACHE_SPACE``, ``VLLM_LOGGING_CONFIG_PATH``) from ours at a glance.
The old names (``VLLM_TUTORIAL_*``) still work, with a warning that names the new one, and
neither spelling is passed on to the vLLM server (``server_environment``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "TUTORIAL_"
OLD_PREFIX = "VLLM_TUTORIAL_"
# Read by tutorial.sh only (which Python, which build), never settings of the server.
SCRIPT_VARIABLES = ("FLAVOR", "PYTHON", "VENV", "INSTALLER")
# Read by this module, not by ``settings``.
PATH_VARIABLES = ("CONFIG", "STATE_DIR", "CACHE_DIR")
# Read by other parts (a server's marker, the class gateway, the browser test), not settings.
OTHER_VARIABLES = ("SERVER_ID", "GATEWAY_KEYS", "GATEWAY_INTERNAL_KEY", "GATEWAY_INTERNAL_KEY_FILE", "ARTIFACTS")

def tutorial_variables(environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """``{SUFFIX: (variable name, value)}`` for every ``TUTORIAL_*`` (or old ``VLLM_TUTORIAL_*``)
    variable; the new spelling wins where both are set. An old name gets a ``FutureWarning``."""
    environ = os.environ if environ is None else environ
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if name.startswith(OLD_PREFIX):
            suffix = name[len(OLD_PREFIX):]
            if PREFIX + suffix not in environ:
                warnings.warn(f"{name} is the old name of {PREFIX}{suffix}; it still works, but "
                              f"rename it (vLLM warns about every VLLM_* variable it does not know)",
                              FutureWarning, stacklevel=3)
                found[suffix] = (name, value)
        elif name.startswith(PREFIX):
            found[name[len(PREFIX):]] = (name, value)
    return found


def variable(suffix: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of ``TUTORIAL_<suffix>`` (or its old name), or None."""
    entry = tutorial_variables(environ).get(suffix)
    return entry[1] if entry and entry[1] != "" else None


def server_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` without the tutorial's own variables: what a vLLM server is started with
    (the helpers' settings, an API key among them, are not vLLM's business)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith((PREFIX, OLD_PREFIX))}


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where converted models live: ``$TUTORIAL_CACHE_DIR`` or ``~/.cache/vllm-tutorial``."""
    named = variable("CACHE_DIR", environ)
    return Path(named).expanduser() if named else Path.home() / ".cache" / "vllm-tutorial"


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where running servers are recorded and their logs written: ``$TUTORIAL_STATE_DIR``, or
    ``servers/`` in the cache folder."""
    named = variable("STATE_DIR", environ)
    return Path(named).expanduser() if named else cache_dir(environ) / "servers"


def short_path(path: Path | str) -> str:
    """``path`` with the home folder written ``~``: what a notebook prints, so that saved
    outputs do not carry the machine's user name."""
    text = str(path)
    home = str(Path.home())
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text
