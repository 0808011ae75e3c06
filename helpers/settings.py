"""The one setting every notebook follows: which model to serve, under which name, where.

Values come from three layers, later ones winning:

1. defaults: the embedded SmolLM2-135M-Instruct on 127.0.0.1, a free port;
2. a TOML file: ``$TUTORIAL_CONFIG``, else ``tutorial.toml`` at the repository root;
3. environment variables ``TUTORIAL_<KEY>`` (``TUTORIAL_MODEL=...``; the old spelling
   ``VLLM_TUTORIAL_<KEY>`` still works, with a warning: see ``helpers.paths``).

Keys (TOML name / environment suffix): ``model``, ``served_model_name``, ``host``, ``port``,
``dtype``, ``tensor_parallel_size``, ``max_model_len``, ``api_key``, ``extra_args``,
``startup_timeout``, ``log_preset`` (how loud the server's log is: ``default``, ``quiet``,
``silent``, ``no-stats``; see ``helpers.logs.presets``), ``server_url`` (a server elsewhere, such
as a class server: ``get_server()`` then connects to it with ``api_key`` and starts nothing).
``configs/`` holds ready examples, e.g. the origin's Qwen2-7B on two GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SettingsError
from .logs.presets import PRESET_NAMES
from .paths import OTHER_VARIABLES, PATH_VARIABLES, REPO_ROOT, SCRIPT_VARIABLES, tutorial_variables

EMBEDDED = "embedded"
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass(frozen=True)
class Settings:
    """What the learner asked for; ``helpers.server.config`` turns it into an exact command."""

    model: str = EMBEDDED
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()
    startup_timeout: float = 900.0
    log_preset: str = "default"
    server_url: str | None = None       # a server elsewhere (a class server): connect, start nothing
    source: tuple[str, ...] = field(default=(), compare=False)

    @property
    def uses_embedded_model(self) -> bool:
        return self.model == EMBEDDED


_INT_KEYS = {"port", "tensor_parallel_size", "max_model_len"}
_FLOAT_KEYS = {"startup_timeout"}
_KEYS = {f.name for f in dataclasses.fields(Settings)} - {"source"}


def _coerce(key: str, value: object, origin: str) -> object:
    if key not in _KEYS:
        raise SettingsError(f"{origin}: unknown setting {key!r}; known: {', '.join(sorted(_KEYS))}")
    try:
        if key in _INT_KEYS:
            number = int(value)  # type: ignore[arg-type]
            if number <= 0 or (key == "port" and number > 65535):
                raise ValueError
            return number
        if key in _FLOAT_KEYS:
            number = float(value)  # type: ignore[arg-type]
            if number <= 0:
                raise ValueError
            return number
    except (TypeError, ValueError):
        limit = " up to 65535" if key == "port" else ""
        raise SettingsError(f"{origin}: {key} must be a positive number{limit}, got {value!r}") from None
    if key == "extra_args":
        if isinstance(value, str):
            return tuple(shlex.split(value))
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise SettingsError(f"{origin}: extra_args must be a string or a list of strings")
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{origin}: {key} must be a non-empty string, got {value!r}")
    if key == "dtype" and value not in DTYPES:
        raise SettingsError(f"{origin}: dtype must be one of {', '.join(DTYPES)}, got {value!r}")
    if key == "log_preset":
        if value.strip() not in PRESET_NAMES:
            raise SettingsError(f"{origin}: log_preset must be one of {', '.join(PRESET_NAMES)}, got {value!r}")
    return value.strip()


def config_file(environ: os._Environ | dict | None = None) -> Path | None:
    """The TOML file in force, or None. A file named in the environment must exist."""
    entry = tutorial_variables(environ).get("CONFIG")
    if entry and entry[1]:
        name, named = entry
        path = Path(named).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_file():
            raise SettingsError(f"{name} names {path}, which is not a file")
        return path
    default = REPO_ROOT / "tutorial.toml"
    return default if default.is_file() else None


def load_settings(environ: os._Environ | dict | None = None, **overrides: object) -> Settings:
    """Defaults, then the TOML file, then ``TUTORIAL_*`` variables, then ``overrides``."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    sources = ["defaults"]
    path = config_file(environ)
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise SettingsError(f"{path}: not valid TOML ({err})") from None
        table = table.get("server", table)  # both a flat file and a [server] table work
        for key, value in table.items():
            values[key] = _coerce(key, value, str(path))
        sources.append(str(path))
    for suffix, (name, value) in sorted(tutorial_variables(environ).items()):
        if suffix in PATH_VARIABLES + SCRIPT_VARIABLES + OTHER_VARIABLES:   # not settings of the server
            continue
        values[suffix.lower()] = _coerce(suffix.lower(), value, name)
        sources.append(name)
    for key, value in overrides.items():
        values[key] = _coerce(key, value, "argument")
    return Settings(**values, source=tuple(sources))  # type: ignore[arg-type]
