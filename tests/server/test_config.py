"""Tests for helpers/server_config.py: the exact command line, and the picks from_settings makes."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from helpers.server import hardware
from helpers.server.hardware import Gpu
from helpers.server import builds
from helpers.server.config import ENTRYPOINT, ServerConfig, from_settings
from helpers.settings import Settings

QWEN2_7B_BYTES = 15_231_233_024  # Qwen2-7B-Instruct in float16


def config(**kw) -> ServerConfig:
    base = dict(model="/models/Qwen2-7B-Instruct", port=8000, python="/venv/bin/python")
    base.update(kw)
    return ServerConfig(**base)


def machine(*gpus: Gpu) -> tuple[Gpu, ...]:
    """The GPUs ``from_settings`` plans for (none: the CPU backend)."""
    return tuple(gpus)


TWO_T4 = (Gpu(0, "Tesla T4", (7, 5), 15360), Gpu(1, "Tesla T4", (7, 5), 15360))


@pytest.fixture
def model_dir(tmp_path):
    """A local model folder: config.json with 28 heads and a small weights file."""
    folder = tmp_path / "Qwen2-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 28}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


@pytest.fixture
def big_model_dir(model_dir):
    """The same folder, its weights file made to look 15.2 GB (sparse: no disk used)."""
    with open(model_dir / "model.safetensors", "r+b") as f:
        f.truncate(QWEN2_7B_BYTES)
    return model_dir


@pytest.fixture(autouse=True)
def no_kvcache_variable(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)


def quiet(*_a, **_k):
    pass


# --- ServerConfig -----------------------------------------------------------------------------

def test_minimal_args():
    assert config().args() == ["--host", "127.0.0.1", "--port", "8000",
                               "--model", "/models/Qwen2-7B-Instruct"]


def test_full_args_in_order_with_extra_args_last():
    cfg = config(served_model_name="Qwen2-7B-Instruct", dtype="half", tensor_parallel_size=2,
                 max_model_len=4096, api_key="sk-test", extra_args=("--enforce-eager",))
    args = cfg.args()
    assert args == [
        "--host", "127.0.0.1", "--port", "8000", "--model", "/models/Qwen2-7B-Instruct",
        "--served-model-name", "Qwen2-7B-Instruct", "--tensor-parallel-size", "2",
        "--dtype=half", "--max-model-len", "4096", "--enforce-eager",
    ]


def test_dtype_auto_and_single_gpu_add_no_flags():
    args = config(dtype="auto", tensor_parallel_size=1).args()
    assert not any(a.startswith("--dtype") for a in args)
    assert "--tensor-parallel-size" not in args


def test_argv_starts_each_build_its_own_way():
    cfg = config(served_model_name="q")
    flags = ["--host", "127.0.0.1", "--port", "8000", "--served-model-name", "q"]
    assert cfg.argv(builds.CPU) == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                                    "--model", "/models/Qwen2-7B-Instruct", *flags]
    # the CUDA wheel: `vllm serve MODEL` (the module the `vllm` script runs, with this interpreter)
    assert cfg.argv(builds.GPU) == ["/venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve",
                                    "/models/Qwen2-7B-Instruct", *flags]
    assert cfg.argv() == cfg.argv(builds.current())


def test_default_python_is_this_interpreter():
    assert ServerConfig(model="/m", port=1).argv()[0] == sys.executable


def test_args_without_port_raises():
    with pytest.raises(ValueError, match="port"):
        config(port=None).args()


def test_with_port_returns_a_copy():
    cfg = config(port=None)
    assert cfg.with_port(8123).args()[3] == "8123"
    assert cfg.port is None


def test_tensor_parallel_size_below_one_is_refused():
    with pytest.raises(ValueError):
        config(tensor_parallel_size=0)


def test_name_prefers_served_model_name():
    assert config().name == "/models/Qwen2-7B-Instruct"
    assert config(served_model_name="qwen").name == "qwen"


def test_env_is_read_only():
    cfg = config(env={"A": "1"})
    with pytest.raises(TypeError):
        cfg.env["A"] = "2"  # type: ignore[index]


def test_the_api_key_is_never_on_the_command_line():
    # Every user of the machine reads a command line with `ps`: vLLM takes the key from
    # VLLM_API_KEY, set in the server's own environment.
    cfg = config(api_key="sk-very-secret")
    assert "sk-very-secret" not in " ".join(cfg.argv())
    assert cfg.environment() == {"VLLM_API_KEY": "sk-very-secret"}
    line = cfg.command_line(style="module")
    assert "sk-very-secret" not in line
    assert line.startswith("VLLM_API_KEY=$TUTORIAL_API_KEY python -m vllm")
    assert "VLLM_API_KEY=sk-very-secret" in cfg.command_line(hide_key=False)


def test_command_line_module_style_with_env_first():
    cfg = config(served_model_name="Qwen2-7B-Instruct", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert cfg.command_line(style="module") == (
        "VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server "
        "--host 127.0.0.1 --port 8000 --model /models/Qwen2-7B-Instruct "
        "--served-model-name Qwen2-7B-Instruct")


def test_command_line_serve_style_drops_model_flag():
    cfg = config(served_model_name="Qwen2-7B-Instruct", tensor_parallel_size=2, dtype="half")
    line = cfg.command_line(style="serve")
    assert line == ("vllm serve /models/Qwen2-7B-Instruct --host 127.0.0.1 --port 8000 "
                    "--served-model-name Qwen2-7B-Instruct --tensor-parallel-size 2 --dtype=half")
    assert "--model" not in line


def test_command_line_round_trips_through_shlex():
    cfg = config(model="/models/my model's dir", served_model_name="a b",
                 extra_args=("--chat-template", "{{ x }} & $(rm -rf /)"),
                 env={"B": "x y", "A": "1"}, api_key="k")
    words = shlex.split(cfg.command_line(style="module", hide_key=False))
    assert words == ["A=1", "B=x y", "VLLM_API_KEY=k", "python", *ENTRYPOINT, *cfg.args()]


def test_serve_command_line_round_trips_through_shlex():
    cfg = config(model="/models/with space", api_key="secret")
    words = shlex.split(cfg.command_line(style="serve"))
    assert words[:4] == ["VLLM_API_KEY=$TUTORIAL_API_KEY", "vllm", "serve", "/models/with space"]
    assert "--model" not in words


# --- from_settings ----------------------------------------------------------------------------

def test_from_settings_on_cpu(model_dir):
    cfg = from_settings(Settings(model=str(model_dir), port=8000), machine(), log=quiet)
    assert cfg.model == str(model_dir.resolve())
    assert cfg.served_model_name == "Qwen2-7B-Instruct"
    assert cfg.dtype == "auto"
    assert cfg.tensor_parallel_size == 1
    args = cfg.args()
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "--enforce-eager" in args
    assert cfg.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert cfg.command_line(style="module").startswith("VLLM_CPU_KVCACHE_SPACE=1 python -m ")


def test_from_settings_on_cpu_follows_the_kvcache_variable(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    cfg = from_settings(Settings(model=str(model_dir)), machine(), log=quiet)
    assert cfg.env["VLLM_CPU_KVCACHE_SPACE"] == "4"


@pytest.mark.parametrize("extra", [
    ("--gpu-memory-utilization", "0.3"),
    ("--gpu-memory-utilization=0.3",),
])
def test_from_settings_keeps_the_learners_memory_utilization(model_dir, extra):
    cfg = from_settings(Settings(model=str(model_dir), port=8000, extra_args=extra), machine(), log=quiet)
    args = cfg.args()
    assert sum(a.startswith("--gpu-memory-utilization") for a in args) == 1
    assert "0.5" not in args
    at = args.index(extra[0])
    assert args[at:at + len(extra)] == list(extra)
    assert "--gpu-memory-utilization 0.5" not in dict(cfg.reasons)


def test_from_settings_does_not_repeat_enforce_eager(model_dir):
    cfg = from_settings(Settings(model=str(model_dir), port=8000, extra_args=("--enforce-eager",)),
                        machine(), log=quiet)
    assert cfg.args().count("--enforce-eager") == 1


def test_from_settings_on_two_t4_picks_half_and_two_gpus(big_model_dir):
    cfg = from_settings(Settings(model=str(big_model_dir), port=8000), machine(*TWO_T4), log=quiet)
    assert cfg.dtype == "half"
    assert cfg.tensor_parallel_size == 2
    args = cfg.args()
    assert "--dtype=half" in args
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    # GPU: none of the CPU-only additions
    assert "--enforce-eager" not in args
    assert "--gpu-memory-utilization" not in args
    assert "VLLM_CPU_KVCACHE_SPACE" not in cfg.env


def test_from_settings_small_model_on_two_t4_uses_one(model_dir):
    cfg = from_settings(Settings(model=str(model_dir), port=8000), machine(*TWO_T4), log=quiet)
    assert cfg.tensor_parallel_size == 1
    assert cfg.dtype == "half"


def test_settings_values_win_over_the_picks(big_model_dir):
    settings = Settings(model=str(big_model_dir), port=8000, dtype="float32",
                        tensor_parallel_size=1, served_model_name="qwen")
    cfg = from_settings(settings, machine(*TWO_T4), log=quiet)
    assert cfg.dtype == "float32"
    assert cfg.tensor_parallel_size == 1
    assert cfg.served_model_name == "qwen"
    reasons = dict(cfg.reasons)
    assert reasons["--dtype float32"] == "from the settings"
    assert reasons["--tensor-parallel-size 1"] == "from the settings"
    assert reasons["--served-model-name qwen"] == "from the settings"


def test_settings_max_model_len_api_key_and_host_reach_the_config(model_dir):
    settings = Settings(model=str(model_dir), port=8000, max_model_len=1024, api_key="k",
                        startup_timeout=30.0)
    cfg = from_settings(settings, machine(), log=quiet)
    assert cfg.max_model_len == 1024
    assert cfg.api_key == "k"
    assert cfg.port == 8000
    assert cfg.startup_timeout == 30.0
    assert "VLLM_API_KEY=<key>" in dict(cfg.reasons)


def test_every_choice_has_a_reason(big_model_dir):
    cfg = from_settings(Settings(model=str(big_model_dir), port=8000), machine(*TWO_T4), log=quiet)
    assert cfg.reasons
    assert all(what and why for what, why in cfg.reasons)
    explained = cfg.explain()
    assert "--dtype half" in explained
    assert "7.5" in explained  # why half: the T4's compute capability
    assert "--tensor-parallel-size 2" in explained
    assert "--served-model-name Qwen2-7B-Instruct" in explained


def test_a_network_host_is_explained_as_refused_at_start(model_dir):
    # vLLM on a network address would serve routes its key does not guard (notebook 08):
    # VLLMServer refuses it (UnsafeHostError, tests/server/test_lifecycle.py); the config says so.
    cfg = from_settings(Settings(model=str(model_dir), host="0.0.0.0"), machine(), log=quiet)
    why = dict(cfg.reasons)["--host 0.0.0.0"]
    assert "refused at start" in why and "./tutorial.sh serve" in why
    cfg = from_settings(Settings(model=str(model_dir)), machine(), log=quiet)
    assert "refused" not in dict(cfg.reasons)["--host 127.0.0.1"]


# --- log presets --------------------------------------------------------------------------------

def test_default_log_preset_adds_no_flag_or_variable(model_dir):
    cfg = from_settings(Settings(model=str(model_dir), port=8000), machine(), log=quiet)
    assert not [a for a in cfg.args() if a.startswith("--") and "log" in a]
    assert not [k for k in cfg.env if "LOG" in k]
    assert dict(cfg.reasons)["log preset default"].startswith("vLLM as shipped")


def test_quiet_log_preset_reaches_args_env_and_command_line(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_STATE_DIR", str(tmp_path / "state"))
    cfg = from_settings(Settings(model=str(model_dir), port=8000, log_preset="quiet"), machine(), log=quiet)
    assert cfg.args()[-1] == "--disable-uvicorn-access-log"
    config_file = tmp_path / "state" / "logging" / "filter-stats-logger.json"
    assert cfg.env["VLLM_LOGGING_CONFIG_PATH"] == str(config_file) and config_file.is_file()
    line = cfg.command_line(style="module")
    assert line.startswith("VLLM_CONFIGURE_LOGGING=1 VLLM_CPU_KVCACHE_SPACE=1 "
                           f"VLLM_LOGGING_CONFIG_PATH={config_file} python -m ")
    assert line.endswith(" --disable-uvicorn-access-log")
    assert "no stats line" in dict(cfg.reasons)["log preset quiet"]


def test_silent_log_preset_flags_and_level(model_dir):
    cfg = from_settings(Settings(model=str(model_dir), port=8000, log_preset="silent"), machine(), log=quiet)
    args = cfg.args()
    assert args[args.index("--uvicorn-log-level") + 1] == "error"
    assert cfg.env["VLLM_LOGGING_LEVEL"] == "ERROR"


def test_a_log_flag_in_extra_args_wins_over_the_preset(model_dir):
    settings = Settings(model=str(model_dir), port=8000, log_preset="silent",
                        extra_args=("--uvicorn-log-level=warning",))
    args = from_settings(settings, machine(), log=quiet).args()
    assert [a for a in args if a.startswith("--uvicorn-log-level")] == ["--uvicorn-log-level=warning"]
    assert "error" not in args and "--disable-uvicorn-access-log" in args


def test_the_default_command_line_is_the_installed_builds_form():
    cfg = config()
    expected = "vllm serve" if builds.current() is builds.GPU else "python -m vllm.entrypoints.openai.api_server"
    assert cfg.command_line().startswith(expected)


# --- plan: resolving the settings does no work ---------------------------------------------------

def test_plan_writes_nothing_and_from_settings_does_the_work(model_dir, tmp_path, monkeypatch):
    # The quiet preset needs a logging config file: plan() names it, from_settings() writes it.
    from helpers.server.config import plan

    monkeypatch.setenv("TUTORIAL_STATE_DIR", str(tmp_path / "state"))
    settings = Settings(model=str(model_dir), port=8000, log_preset="quiet")
    planned = plan(settings, TWO_T4, log=quiet)
    assert not (tmp_path / "state").exists()
    prepared = from_settings(settings, TWO_T4, log=quiet)
    assert planned == prepared and planned.command_line() == prepared.command_line()
    assert (tmp_path / "state" / "logging").is_dir()


def test_plan_of_the_embedded_model_converts_nothing(tmp_path, monkeypatch):
    from helpers.server import embedded_model
    from helpers.server.config import plan

    monkeypatch.setenv("TUTORIAL_CACHE_DIR", str(tmp_path / "cache"))
    planned = plan(Settings(model="embedded"), machine(), log=quiet)
    assert planned.model == str(embedded_model.model_dir()) and planned.name == embedded_model.SERVED_NAME
    assert not (tmp_path / "cache").exists()


def test_plan_of_a_hub_model_not_downloaded_yet_says_its_size_is_unknown(tmp_path, monkeypatch):
    from helpers.server.config import plan

    import huggingface_hub.constants as hf_constants   # read when first imported: set both

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    planned = plan(Settings(model="Qwen/Qwen2-7B-Instruct"), TWO_T4, log=quiet)
    assert planned.model == "Qwen/Qwen2-7B-Instruct" and planned.tensor_parallel_size == 1
    assert "unknown until it is downloaded" in planned.explain()
