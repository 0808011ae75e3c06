"""Tests for helpers/log_presets.py (and the load in helpers/log_experiment.py).

Fast tests: the switches of each preset, the support check against the installed vLLM's source
and against a vLLM that lacks a switch, the generated logging config, and the sorting of real
vLLM 0.32.0 log lines (``data/vllm_logs/``). Then **real vLLM**: the same fixed load under
``default`` and ``quiet`` (two servers, each stopped, no process left).
"""

from __future__ import annotations

import json
import logging.config
import shutil
from pathlib import Path

import pytest

from helpers.logs import presets as log_presets
from helpers.logs.presets import (KINDS, LogPresetError, PRESET_NAMES, Switch, classify, count,
                                 filter_config, lines_of, resolve, stats_source, supports)

LOGS = Path(__file__).resolve().parent.parent / "data" / "vllm_logs"
ROOT = log_presets.vllm_dir()


def quiet(*_a, **_k):
    pass


# --- presets and the installed vLLM -----------------------------------------------------------

def test_default_changes_nothing_and_reads_no_source(tmp_path):
    r = resolve("default", root=tmp_path / "no-vllm-here", folder=tmp_path)
    assert (r.args, r.env, r.missing) == ((), {}, ())
    assert not list(tmp_path.iterdir())


def test_quiet_filters_only_the_stats_logger_and_drops_access_lines(tmp_path):
    r = resolve("quiet", folder=tmp_path, log=quiet)
    assert r.args == ("--disable-uvicorn-access-log",)
    assert r.env["VLLM_CONFIGURE_LOGGING"] == "1"
    config = json.loads(Path(r.env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    takes = log_presets.formatter_takes_log_level(log_presets.vllm_dir())
    assert config == filter_config("vllm.v1.metrics.loggers", log_level_kwarg=takes)
    assert config["loggers"]["vllm.v1.metrics.loggers"] == {"level": "WARNING"}
    assert "--disable-log-stats" not in r.args  # that one would empty /metrics too
    assert "VLLM_LOGGING_LEVEL" not in r.env     # warnings and errors stay
    assert "access lines" in r.reason and "VLLM_LOGGING_CONFIG_PATH=" in r.reason


def test_silent_and_no_stats_switches(tmp_path):
    silent = resolve("silent", folder=tmp_path, log=quiet)
    assert silent.args == ("--uvicorn-log-level", "error", "--disable-uvicorn-access-log")
    assert silent.env == {"VLLM_LOGGING_LEVEL": "ERROR"}
    assert resolve("no-stats", folder=tmp_path, log=quiet).args == ("--disable-log-stats",)


def test_unknown_preset_is_named():
    with pytest.raises(LogPresetError, match="unknown log preset 'loud'; known: default, quiet, silent, no-stats"):
        resolve("loud")


@pytest.mark.parametrize("switch", [s for _, switches in log_presets.PRESETS.values() for s in switches],
                         ids=str)
def test_the_installed_vllm_supports_every_switch(switch):
    assert supports(switch, ROOT), f"vLLM at {ROOT} lacks {switch.name}"


def test_a_made_up_switch_is_not_supported():
    assert not supports(Switch("--disable-everything"), ROOT)
    assert not supports(Switch("VLLM_NO_SUCH_VARIABLE", "1"), ROOT)


def test_a_vllm_without_a_switch_is_named_and_the_switch_left_out(tmp_path):
    """An older or newer vLLM: copy the installed sources the check reads, minus one flag."""
    fake = tmp_path / "vllm"
    for rel in ("envs.py", "engine/arg_utils.py", "v1/metrics/loggers.py",
                *[str(p.relative_to(ROOT)) for p in (ROOT / "entrypoints").rglob("cli_args.py")]):
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, fake / rel)
    for p in (fake / "entrypoints").rglob("cli_args.py"):
        p.write_text(p.read_text().replace("disable_uvicorn_access_log", "renamed_switch"))
    said = []
    r = resolve("quiet", root=fake, folder=tmp_path / "logging", log=said.append)
    assert r.args == () and r.missing == ("--disable-uvicorn-access-log",)
    assert "VLLM_LOGGING_CONFIG_PATH" in r.env  # the rest of the preset still applies
    assert len(said) == 1 and said[0].startswith("WARNING: the installed vLLM")
    assert "has no --disable-uvicorn-access-log" in said[0] and "no line per HTTP request" in said[0]


def test_stats_line_found_in_the_installed_source():
    source = stats_source()
    assert source.path == ROOT / "v1" / "metrics" / "loggers.py"
    assert source.logger == "vllm.v1.metrics.loggers"
    assert "Avg prompt throughput" in source.excerpt
    assert "logger.debug if self.engine_is_idle else logger.info" in source.excerpt


def test_filter_config_keeps_vllms_own_format_and_handler():
    """The generated config is vLLM's DEFAULT_LOGGING_CONFIG plus the stats logger's level."""
    import vllm.logger

    default = vllm.logger.DEFAULT_LOGGING_CONFIG
    ours = filter_config()
    theirs = default["formatters"]["vllm"]
    assert ours["formatters"]["vllm"]["format"] == theirs["format"]
    assert ours["formatters"]["vllm"]["datefmt"] == theirs["datefmt"]
    # 0.32.0 names the formatter with "()" (a factory), 0.26.0 with "class": the same formatter
    assert ours["formatters"]["vllm"]["()"] == theirs.get("()", theirs.get("class"))
    assert ours["handlers"]["vllm"]["stream"] == default["handlers"]["vllm"]["stream"]
    assert ours["loggers"]["vllm"] == {**default["loggers"]["vllm"], "level": "INFO"}
    # and uvicorn's own default, which a file handed to vLLM replaces (vLLM gives uvicorn the file)
    from uvicorn.config import LOGGING_CONFIG

    assert set(ours["loggers"]) == {"vllm", "vllm.v1.metrics.loggers", *LOGGING_CONFIG["loggers"]}
    for part in ("formatters", "handlers", "loggers"):
        assert {k: ours[part][k] for k in LOGGING_CONFIG[part]} == LOGGING_CONFIG[part]


def test_the_formatter_gets_log_level_only_where_vllm_takes_it(tmp_path):
    for version, signature, takes in (
            ("0.26", "def __init__(self, fmt, datefmt=None, style='%'):", False),    # refused it
            ("0.32", "def __init__(self, fmt, datefmt=None, style='%', log_level=None):", True)):
        folder = tmp_path / version / "vllm" / "logging_utils"
        folder.mkdir(parents=True)
        (folder / "formatter.py").write_text(
            f"class NewLineFormatter(logging.Formatter):\n    {signature}\n")
        assert log_presets.formatter_takes_log_level(tmp_path / version / "vllm") is takes
    assert "log_level" not in filter_config(log_level_kwarg=False)["formatters"]["vllm"]


def test_filter_config_is_valid_for_dictconfig():
    """Applied in this process, the stats logger stops at WARNING and its parent does not."""
    names = ("vllm", "vllm.v1.metrics.loggers", "uvicorn", "uvicorn.error", "uvicorn.access")
    before = {name: (logging.getLogger(name).level, logging.getLogger(name).handlers[:],
                     logging.getLogger(name).propagate) for name in names}
    try:
        takes = log_presets.formatter_takes_log_level(log_presets.vllm_dir())
        logging.config.dictConfig(filter_config(log_level_kwarg=takes))
        assert not logging.getLogger("vllm.v1.metrics.loggers").isEnabledFor(logging.INFO)
        assert logging.getLogger("vllm.v1.metrics.loggers").isEnabledFor(logging.WARNING)
        assert logging.getLogger("vllm.engine").isEnabledFor(logging.INFO)
        # uvicorn's start-up lines keep a handler (uvicorn applies this file, not its default)
        assert logging.getLogger("uvicorn.error").isEnabledFor(logging.INFO)
        assert logging.getLogger("uvicorn").handlers
    finally:
        for name, (level, handlers, propagate) in before.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate


# --- sorting real log lines -------------------------------------------------------------------

@pytest.mark.parametrize("line, kind", [
    ("(APIServer pid=3586) INFO 11-27 08:50:25 [loggers.py:335] Engine 000: Avg prompt throughput: "
     "16.1 tokens/s, Avg generation throughput: 4.3 tokens/s, Running: 1 reqs, Waiting: 0 reqs, "
     "CPU KV cache usage: 0.3%, Prefix cache hit rate: 0.0%", "stats"),
    ('INFO:     127.0.0.1:34316 - "POST /v1/chat/completions HTTP/1.1" 200 OK', "access"),
    ('INFO:     127.0.0.1:34316 - "POST /v1/chat/completions HTTP/1.1" 404 Not Found', "access"),
    ("INFO:     Application startup complete.", "info"),
    ("(APIServer pid=3949) ERROR 11-27 08:51:25 [serving.py:274] Error with model error=ErrorInfo("
     "message='The model `nope` does not exist.', type='NotFoundError', param='model', code=404)", "error"),
    ("(APIServer pid=3949) WARNING 11-27 08:51:25 [protocol.py:65] Request contains the removed "
     "guided-decoding field(s) ['guided_choice'], which are ignored", "warning"),
    ("(EngineCore pid=2899) INFO 11-25 05:22:47 [core.py:133] Initializing a V1 LLM engine", "info"),
    ("(Worker pid=2934) DEBUG 11-25 05:23:01 [x.py:1] detail", "debug"),
    # 0.32.0 under a configuration with vLLM 0.26.0's format: no process name in front
    ("INFO 12-06 11:10:22 [api_utils.py:286] non-default args: {'host': '127.0.0.1'}", "info"),
    ("INFO 12-06 11:10:40 [loggers.py:335] Engine 000: Avg prompt throughput: 0.0 tokens/s", "stats"),
    ("a line that mentions INFO 12-06 11:10:40 [x.py:1] in its middle", "other"),
    ("/VENV/lib/python3.11/site-packages/vllm/entrypoints/openai/api_server.py:24: DeprecationWarning: "
     "`vllm.entrypoints.openai.api_server` is deprecated", "warning"),
    ("[W1125 05:23:01.139645556 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy", "warning"),
    ("Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:01<00:00,  1.11s/it]", "other"),
    ("[process_guard 3585] received SIGTERM; ending process group 3585", "other"),
    ("   ", None),
])
def test_classify(line, kind):
    assert classify(line) == kind


def test_count_the_real_ready_log():
    counts = count((LOGS / "ready.log").read_text())
    assert set(counts) == set(KINDS)
    assert counts["stats"] == 1
    assert counts["access"] == 5
    assert counts["error"] == 0
    assert counts["warning"] >= 10 and counts["info"] >= 30


def test_lines_of_one_kind():
    text = (LOGS / "ready.log").read_text()
    assert lines_of(text, "stats")[0].endswith("Prefix cache hit rate: 0.0%")
    with pytest.raises(ValueError, match="unknown kind 'noise'"):
        lines_of(text, "noise")


def test_preset_names_are_the_settings_choices():
    from helpers.errors import SettingsError
    from helpers.settings import load_settings

    assert load_settings(environ={}, log_preset="quiet").log_preset == "quiet"
    assert PRESET_NAMES == ("default", "quiet", "silent", "no-stats")
    with pytest.raises(SettingsError, match="log_preset must be one of default, quiet, silent, no-stats"):
        load_settings(environ={}, log_preset="loud")


def test_real_logs_of_the_fixed_load_under_default_and_quiet():
    """Saved logs of the same load (``run_preset``, stats every 1 s) on vLLM 0.32.0."""
    default = (LOGS / "load_default.log").read_text()
    quiet_ = (LOGS / "load_quiet.log").read_text()
    assert count(default)["stats"] == 5 and count(quiet_)["stats"] == 0
    assert count(default)["access"] == 13 and count(quiet_)["access"] == 0
    for text in (default, quiet_):
        assert any("Error with model" in line for line in lines_of(text, "error"))
        assert any("guided_choice" in line for line in lines_of(text, "warning"))
    assert count(quiet_)["info"] >= 80  # the start-up story is still told


def test_on_a_gpu_a_running_server_is_named_before_anything_starts(monkeypatch):
    """On a GPU the running server holds the card's memory: say so, start nothing."""
    from helpers.errors import TutorialError
    from helpers.lessons import log_experiment
    from helpers.server import hardware
    from helpers.server.registry import ServerRecord

    h100 = (hardware.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 81559),)
    running = ServerRecord(guard_pid=4242, guard_started=1, server_id="x", host="127.0.0.1", port=8000,
                           model="m", served_model_name="m", log_path="/dev/null", owner_pid=None,
                           started_at=0.0, command="")
    monkeypatch.setattr(hardware, "gpus", lambda: h100)
    monkeypatch.setattr(log_experiment.registry, "live", lambda **_: [running])
    monkeypatch.setattr(log_experiment.VLLMServer, "start",
                        lambda *a, **k: pytest.fail("no server may start"))
    with pytest.raises(TutorialError, match=r"holds: m at http://127.0.0.1:8000.*tutorial.sh stop"):
        log_experiment.run_preset("quiet", gpus=h100)


def test_the_generated_config_takes_the_installed_releases_format(tmp_path):
    # vLLM 0.26.0 (the GPU set) has no process name in its records: 0.32.0's format there would
    # print a logging error for every line. The format is read from the installed logger.py.
    from helpers.logs import presets

    old = tmp_path / "vllm"
    old.mkdir()
    (old / "logger.py").write_text('_FORMAT = (f"{envs.VLLM_LOGGING_PREFIX}%(levelname)s %(asctime)s "\n'
                                   '    "[%(fileinfo)s:%(lineno)d] %(message)s")\n')
    assert presets.log_format(old) == presets.VLLM_FORMAT_0_26
    (old / "logger.py").write_text('_FORMAT = "(%(vllm_process_name)s pid=%(process)d) %(levelname)s ..."\n')
    assert presets.log_format(old) == presets.VLLM_FORMAT
