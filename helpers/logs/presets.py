"""Log presets: how loud a vLLM server's log is, built only from vLLM's supported switches.

The origin silenced vLLM's periodic "Avg prompt throughput ..." line by commenting out lines
of ``vllm/engine/metrics.py`` in site-packages. That edit is lost on every upgrade (the line now
lives in ``vllm/v1/metrics/loggers.py``), changes vLLM for every user of the environment, and
throws the numbers away. The presets here use only what vLLM documents:

============  ===============================================================================
``default``   vLLM as shipped: a stats line every ``VLLM_LOG_STATS_INTERVAL`` seconds while
              busy, one uvicorn access line per HTTP request, INFO and above
``quiet``     no stats line, no access lines; start-up INFO, warnings and errors kept; the
              numbers stay at ``/metrics``. A generated logging config (``VLLM_LOGGING_CONFIG_PATH``)
              raises only the stats logger to WARNING, and ``--disable-uvicorn-access-log``
``silent``    errors only: ``VLLM_LOGGING_LEVEL=ERROR``, ``--uvicorn-log-level error``,
              ``--disable-uvicorn-access-log``; ``/metrics`` still complete
``no-stats``  ``--disable-log-stats``, the one flag that turns the stats line off at its
              source: it also turns off the statistics themselves, so ``/metrics`` loses every
              ``vllm:`` number (shown in notebook 05; measured on vLLM 0.32.0)
============  ===============================================================================

``VLLM_LOG_STATS_INTERVAL`` only changes how often the line comes (a value <= 0 falls back to
10 s), so it is no way to silence it. Which switches the installed vLLM knows is read from its
source text (``vllm/envs.py``, the argument definitions), without importing vLLM, and a missing
one is named through the progress printer. This module also sorts log lines into kinds
(stats, access, debug, info, warning, error, other) and counts them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import LogPresetError
from ..paths import state_dir

# Where the stats line was in vLLM 0.32.0; stats_source() finds it again if it moves.
STATS_LOGGER = "vllm.v1.metrics.loggers"
STATS_MARK = "Avg prompt throughput"
FILTER_FILE = "filter-stats-logger.json"

# The same format, date format and handler as vLLM's own DEFAULT_LOGGING_CONFIG (vllm/logger.py,
# 0.32.0; tests/logs/test_presets.py checks they still match): a filtered log reads like the
# default one, minus the stats lines.
VLLM_FORMAT = ("(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s "
               "[%(fileinfo)s:%(lineno)d] %(message)s")
# vLLM 0.26.0's (the GPU set): no process name in the format (0.26.0 prefixes the process's output
# instead). Its records have no `vllm_process_name`, so 0.32.0's format there would print a
# logging error for every line.
VLLM_FORMAT_0_26 = "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s"
VLLM_DATE_FORMAT = "%m-%d %H:%M:%S"


@dataclass(frozen=True)
class Switch:
    """One supported switch: a command-line flag (``value`` None for a bare flag) or a variable."""

    name: str
    value: str | None = None
    why: str = ""

    @property
    def is_flag(self) -> bool:
        return self.name.startswith("--")

    def words(self) -> list[str]:
        return [self.name] if self.value is None else [self.name, self.value]

    def __str__(self) -> str:
        if self.is_flag:
            return " ".join(self.words())
        return f"{self.name}={self.value}"


# The value of VLLM_LOGGING_CONFIG_PATH is the generated file's path, filled in by resolve().
_CONFIG_PATH = Switch("VLLM_LOGGING_CONFIG_PATH", "<generated>",
                      "a logging config like vLLM's own, with the stats logger raised to WARNING")
_CONFIGURE = Switch("VLLM_CONFIGURE_LOGGING", "1", "vLLM reads the config file only when it configures logging")
_NO_ACCESS = Switch("--disable-uvicorn-access-log", None, "no line per HTTP request")

PRESETS: dict[str, tuple[str, tuple[Switch, ...]]] = {
    "default": ("vLLM as shipped: stats line, access lines, INFO and up", ()),
    "quiet": ("no stats line, no access lines; warnings, errors and /metrics kept",
              (_NO_ACCESS, _CONFIGURE, _CONFIG_PATH)),
    "silent": ("errors only; /metrics kept",
               (Switch("VLLM_LOGGING_LEVEL", "ERROR", "vLLM's loggers print errors only"),
                Switch("--uvicorn-log-level", "error", "uvicorn prints errors only"), _NO_ACCESS)),
    "no-stats": ("no statistics at all: no stats line, and no vllm: numbers at /metrics",
                 (Switch("--disable-log-stats", None, "the engine keeps no statistics"),)),
}
PRESET_NAMES = tuple(PRESETS)


@dataclass(frozen=True)
class Resolved:
    """A preset made concrete for the installed vLLM: the flags and variables to pass."""

    name: str
    summary: str
    args: tuple[str, ...]
    env: dict
    missing: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        used = [*self.args, *(f"{k}={v}" for k, v in self.env.items())]
        note = f"; the installed vLLM lacks {', '.join(self.missing)}" if self.missing else ""
        return self.summary + (f" ({' '.join(used)})" if used else "") + note


# --------------------------------------------------------------------------- the installed vLLM

def vllm_dir() -> Path | None:
    """The installed ``vllm`` package folder, found without importing it (None: not installed)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _argument_sources(root: Path) -> str:
    """The text of the files that define ``vllm serve``'s arguments (they move between releases)."""
    files = [root / "engine" / "arg_utils.py", *sorted((root / "entrypoints").rglob("cli_args.py"))]
    return "\n".join(_read(f) for f in files)


def supports(switch: Switch, root: Path) -> bool:
    """True when the installed vLLM at ``root`` defines this flag or environment variable.

    A flag is found as a literal (``"--disable-log-stats"``) or as the dataclass field vLLM
    derives it from (``disable_uvicorn_access_log: bool``); a variable as a key in ``envs.py``.
    """
    if switch.is_flag:
        text = _argument_sources(root)
        field_name = switch.name[2:].replace("-", "_")
        return (f'"{switch.name}"' in text
                or re.search(rf"^\s+{field_name}\s*:", text, re.MULTILINE) is not None)
    return f'"{switch.name}"' in _read(root / "envs.py")


@dataclass(frozen=True)
class StatsSource:
    """Where the installed vLLM writes the stats line: file, line number, logger name."""

    path: Path
    line: int
    logger: str
    excerpt: str


def stats_source(root: Path | None = None, context: int = 3) -> StatsSource | None:
    """Find the stats line in the installed vLLM's source by reading (never editing) it."""
    root = root or vllm_dir()
    if root is None:
        return None
    likely = root / "v1" / "metrics" / "loggers.py"
    candidates = [likely] if likely.is_file() else []
    candidates += [p for p in sorted(root.rglob("*.py")) if p != likely]
    for path in candidates:
        text = _read(path)
        if STATS_MARK not in text:
            continue
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if STATS_MARK in line)
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        logger = module if "init_logger(__name__)" in text else STATS_LOGGER
        excerpt = "\n".join(f"{n + 1:5d}  {lines[n]}" for n in range(max(0, at - context),
                                                                       min(len(lines), at + context + 1)))
        return StatsSource(path, at + 1, logger, excerpt)
    return None


def formatter_takes_log_level(root: Path) -> bool:
    """Whether the installed ``NewLineFormatter`` takes ``log_level=`` (0.32.0 does; 0.26.0,
    which a GPU machine here runs, refuses it and vLLM then fails to start)."""
    text = "\n".join(_read(p) for p in sorted((root / "logging_utils").glob("*.py")))
    init = re.search(r"class NewLineFormatter\b.*?def __init__\(([^)]*)\)", text, re.DOTALL)
    return bool(init and "log_level" in init.group(1))


def log_format(root: Path | None = None) -> str:
    """The log format of the installed vLLM (read from its ``logger.py``, not imported)."""
    root = root or vllm_dir()
    if root is not None and "vllm_process_name" not in _read(root / "logger.py"):
        return VLLM_FORMAT_0_26
    return VLLM_FORMAT


def filter_config(stats_logger: str = STATS_LOGGER, *, log_level_kwarg: bool = True,
                  fmt: str | None = None) -> dict:
    """A ``logging.config.dictConfig`` that is vLLM's default one plus one line: the stats
    logger at WARNING. Everything else (format, handler, stream, levels) stays vLLM's; ``fmt``
    defaults to the installed vLLM's format.

    vLLM hands the same file to uvicorn too, as its ``log_config`` (``--log-config-file``
    defaults to ``VLLM_LOGGING_CONFIG_PATH``: ``get_uvicorn_log_config``, vLLM 0.32.0; 0.26.0
    alike), and uvicorn then applies it instead of its own default. So uvicorn's default
    (``uvicorn.config.LOGGING_CONFIG`` of the installed uvicorn) is part of this one: without it
    uvicorn's INFO lines ("Application startup complete") would have no handler and vanish."""
    import copy

    from uvicorn.config import LOGGING_CONFIG as uvicorn_default   # installed with vLLM

    uvicorn_default = copy.deepcopy(uvicorn_default)
    formatter = {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": VLLM_DATE_FORMAT,
                 "format": fmt or log_format()}
    if log_level_kwarg:
        formatter["log_level"] = "INFO"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": formatter, **uvicorn_default["formatters"]},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm",
                              "level": "INFO", "stream": "ext://sys.stdout"},
                     **uvicorn_default["handlers"]},
        "loggers": {
            "vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False},
            # The one change: the periodic stats line is INFO, so WARNING drops it (and vLLM,
            # seeing INFO disabled for this logger, does not even create the line's logger).
            stats_logger: {"level": "WARNING"},
            **uvicorn_default["loggers"],
        },
    }


def write_filter_config(folder: Path, stats_logger: str = STATS_LOGGER, *, log_level_kwarg: bool = True,
                        fmt: str | None = None, write: bool = True) -> Path:
    """Write the filtering config into ``folder`` (the state folder, never the repository);
    ``write=False``: only say where it goes."""
    path = folder / FILTER_FILE
    if not write:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(filter_config(stats_logger, log_level_kwarg=log_level_kwarg, fmt=fmt), indent=2) + "\n"
    if _read(path) != text:
        path.write_text(text, encoding="utf-8")
    return path


def resolve(name: str, *, root: Path | None = None, folder: Path | None = None, log=print,
            write: bool = True) -> Resolved:
    """The flags and variables of preset ``name`` that the installed vLLM supports.

    A switch the installed vLLM lacks is left out (an unknown flag would stop vLLM from
    starting) and named through ``log``. ``folder`` receives the generated logging config
    (default: ``<state dir>/logging``); ``write=False`` names that file without writing it.
    """
    if name not in PRESETS:
        raise LogPresetError(f"unknown log preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    summary, switches = PRESETS[name]
    if not switches:
        return Resolved(name, summary, (), {})
    root = root or vllm_dir()
    if root is None:
        raise LogPresetError(f"log preset {name!r} needs vLLM installed, and it is not")
    args: list[str] = []
    env: dict[str, str] = {}
    missing: list[str] = []
    for switch in switches:
        if not supports(switch, root):
            missing.append(switch.name)
            log(f"WARNING: the installed vLLM ({root}) has no {switch.name}; log preset "
                f"{name!r} goes on without it, so {switch.why or 'its effect'} will not apply")
            continue
        if switch is _CONFIG_PATH:
            source = stats_source(root)
            if source is None:
                missing.append("the stats line")
                log(f"WARNING: no {STATS_MARK!r} line in the installed vLLM ({root}); "
                    f"log preset {name!r} does not filter it")
                continue
            if folder is None:
                folder = state_dir() / "logging"
            env[switch.name] = str(write_filter_config(folder, source.logger,
                                                       log_level_kwarg=formatter_takes_log_level(root),
                                                       fmt=log_format(root), write=write))
        elif switch.is_flag:
            args += switch.words()
        else:
            env[switch.name] = str(switch.value)
    if _CONFIGURE.name in env and _CONFIG_PATH.name not in env:
        del env[_CONFIGURE.name]  # it only serves the config file
    return Resolved(name, summary, tuple(args), env, tuple(missing))


# --------------------------------------------------------------------------- reading the log

KINDS = ("stats", "access", "debug", "info", "warning", "error", "other")

# (APIServer pid=3586) INFO 11-27 08:50:25 [loggers.py:335] Engine 000: Avg prompt throughput: ...
# vLLM 0.26.0 puts that prefix on every line of the process's output (decorate_logs); 0.32.0 puts it
# in the format, so a configuration with 0.26.0's format (notebook 05) gives lines without it.
_VLLM_LINE = re.compile(r"(?:\([^()]*pid=\d+\) |^)(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                        r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\] ?(?P<message>.*)$")
# INFO:     127.0.0.1:34316 - "POST /v1/chat/completions HTTP/1.1" 200 OK
_UVICORN_LINE = re.compile(r"^(?P<level>TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(?P<message>.*)$")
_ACCESS = re.compile(r'^\S+ - "[A-Z]+ \S+ HTTP/[\d.]+" \d{3}\b')
# Python's warnings module ("/x.py:24: DeprecationWarning: ...") and torch's C++ ("[W1125 ...] Warning:")
_PY_WARNING = re.compile(r"^\S+:\d+: [A-Za-z]*Warning: |^\[W\d{4} [^\]]*\] Warning: ")
_LEVEL_KIND = {"TRACE": "debug", "DEBUG": "debug", "INFO": "info", "WARNING": "warning",
               "ERROR": "error", "CRITICAL": "error"}


def classify(line: str) -> str | None:
    """The kind of one log line (one of ``KINDS``), or None for a blank line.

    ``stats`` is vLLM's periodic throughput line, ``access`` uvicorn's line per request; other
    lines of vLLM or uvicorn go by their level. ``other`` is anything else: tracebacks,
    progress bars, the process guard's notes.
    """
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    match = _VLLM_LINE.search(line)
    if match:
        if STATS_MARK in match["message"]:
            return "stats"
        return _LEVEL_KIND[match["level"]]
    match = _UVICORN_LINE.match(line)
    if match:
        if _ACCESS.match(match["message"]):
            return "access"
        return _LEVEL_KIND[match["level"]]
    if _PY_WARNING.search(line):
        return "warning"
    return "other"


def count(text: str) -> Counter:
    """How many lines of each kind ``text`` holds (every kind present, zeros included)."""
    counts = Counter({kind: 0 for kind in KINDS})
    for line in text.splitlines():
        kind = classify(line)
        if kind is not None:
            counts[kind] += 1
    return counts


def lines_of(text: str, kind: str) -> list[str]:
    """The lines of ``text`` of one kind, e.g. ``lines_of(log, "error")``."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    return [line for line in text.splitlines() if classify(line) == kind]
