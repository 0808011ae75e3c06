"""Tests for helpers/settings.py: defaults, TOML file, environment variables, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import settings
from helpers.errors import SettingsError
from helpers.settings import load_settings


@pytest.fixture(autouse=True)
def no_repo_toml(tmp_path, monkeypatch):
    """A tutorial.toml at the real repository root must never leak into these tests."""
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.setattr(settings, "REPO_ROOT", root)
    return root


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment():
    s = load_settings(environ={})
    assert s.model == "embedded"
    assert s.uses_embedded_model
    assert s.host == "127.0.0.1"
    assert s.port is None
    assert s.dtype == "auto"
    assert s.tensor_parallel_size is None
    assert s.extra_args == ()
    assert s.log_preset == "default"
    assert s.source == ("defaults",)


def test_repo_root_tutorial_toml_is_read_when_no_variable_names_a_file(no_repo_toml):
    write_toml(no_repo_toml / "tutorial.toml", 'model = "/models/x"\n')
    assert settings.config_file({}) == no_repo_toml / "tutorial.toml"
    s = load_settings(environ={})
    assert s.model == "/models/x"
    assert not s.uses_embedded_model


def test_flat_toml_named_by_variable(tmp_path):
    cfg = write_toml(tmp_path / "flat.toml", """
model = "/home/hyh/model/Qwen2-7B-Instruct"
served_model_name = "Qwen2-7B-Instruct"
port = 8000
tensor_parallel_size = 2
dtype = "half"
startup_timeout = 60
""")
    s = load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})
    assert s.model == "/home/hyh/model/Qwen2-7B-Instruct"
    assert s.served_model_name == "Qwen2-7B-Instruct"
    assert s.port == 8000
    assert s.tensor_parallel_size == 2
    assert s.dtype == "half"
    assert s.startup_timeout == 60.0
    assert str(cfg) in s.source


def test_server_table_toml(tmp_path):
    cfg = write_toml(tmp_path / "table.toml", """
[server]
model = "Qwen/Qwen2-7B-Instruct"
host = "127.0.0.1"
port = 8123
max_model_len = 4096
""")
    s = load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})
    assert s.model == "Qwen/Qwen2-7B-Instruct"
    assert s.port == 8123
    assert s.max_model_len == 4096


def test_relative_config_path_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    write_toml(tmp_path / "rel.toml", "port = 8555\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={"TUTORIAL_CONFIG": "rel.toml"}).port == 8555


def test_environment_overrides_toml(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", 'model = "/from/toml"\nport = 8000\ndtype = "half"\n')
    s = load_settings(environ={
        "TUTORIAL_CONFIG": str(cfg),
        "TUTORIAL_MODEL": "/from/env",
        "TUTORIAL_PORT": "9001",
    })
    assert s.model == "/from/env"
    assert s.port == 9001
    assert s.dtype == "half"  # not overridden: the TOML value stays
    assert "TUTORIAL_MODEL" in s.source and "TUTORIAL_PORT" in s.source


def test_overrides_win_over_environment_and_toml(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", 'model = "/from/toml"\nport = 8000\n')
    s = load_settings(
        environ={"TUTORIAL_CONFIG": str(cfg), "TUTORIAL_MODEL": "/from/env"},
        model="/from/argument", port=8200)
    assert s.model == "/from/argument"
    assert s.port == 8200


def test_unrelated_environment_variables_are_ignored():
    s = load_settings(environ={"HOME": "/nowhere", "VLLM_CPU_KVCACHE_SPACE": "4",
                               "VLLM_TUTORIAL": "x", "TUTORIAL": "y"})
    assert s.model == "embedded"


def test_the_set_up_scripts_and_the_gateways_own_variables_are_not_settings():
    s = load_settings(environ={"TUTORIAL_FLAVOR": "cpu", "TUTORIAL_PYTHON": "/usr/bin/python3",
                               "TUTORIAL_VENV": "/tmp/venv", "TUTORIAL_INSTALLER": "pip", "TUTORIAL_GATEWAY_KEYS": "/k.json",
                               "TUTORIAL_GATEWAY_INTERNAL_KEY": "x", "TUTORIAL_SERVER_ID": "abc"})
    assert s.model == "embedded"


def test_the_old_names_still_work_with_a_warning_that_names_the_new_one():
    with pytest.warns(FutureWarning, match="VLLM_TUTORIAL_MODEL is the old name of TUTORIAL_MODEL"):
        s = load_settings(environ={"VLLM_TUTORIAL_MODEL": "/old/name"})
    assert s.model == "/old/name"
    assert "VLLM_TUTORIAL_MODEL" in s.source


def test_the_new_name_wins_over_the_old_one():
    s = load_settings(environ={"VLLM_TUTORIAL_PORT": "8001", "TUTORIAL_PORT": "8002"})
    assert s.port == 8002


def test_unknown_key_in_toml_names_the_key(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", 'modle = "/typo"\n')
    with pytest.raises(SettingsError, match="modle"):
        load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})


def test_unknown_environment_variable_names_the_key():
    with pytest.raises(SettingsError, match="gpu_count"):
        load_settings(environ={"TUTORIAL_GPU_COUNT": "2"})


def test_unknown_override_names_the_key():
    with pytest.raises(SettingsError, match="prot"):
        load_settings(environ={}, prot=8000)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "8000x", ""])
def test_bad_port_in_environment(value):
    with pytest.raises(SettingsError, match="port"):
        load_settings(environ={"TUTORIAL_PORT": value})


def test_port_above_65535_is_rejected():
    with pytest.raises(SettingsError, match="port"):
        load_settings(environ={"TUTORIAL_PORT": "70000"})


@pytest.mark.parametrize("key, value", [
    ("tensor_parallel_size", "two"),
    ("max_model_len", "0"),
    ("startup_timeout", "-1"),
    ("startup_timeout", "soon"),
])
def test_bad_numbers_in_environment(key, value):
    with pytest.raises(SettingsError, match=key):
        load_settings(environ={"TUTORIAL_" + key.upper(): value})


def test_bad_port_in_toml_names_the_file(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", 'port = "eighty"\n')
    with pytest.raises(SettingsError, match="port") as info:
        load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})
    assert str(cfg) in str(info.value)


def test_environment_numbers_are_converted():
    s = load_settings(environ={"TUTORIAL_TENSOR_PARALLEL_SIZE": "2",
                               "TUTORIAL_STARTUP_TIMEOUT": "12.5"})
    assert s.tensor_parallel_size == 2
    assert s.startup_timeout == 12.5


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "Half"])
def test_bad_dtype(dtype):
    with pytest.raises(SettingsError, match="dtype"):
        load_settings(environ={"TUTORIAL_DTYPE": dtype})


@pytest.mark.parametrize("dtype", ["half", "bfloat16", "float32"])
def test_good_dtype(dtype):
    assert load_settings(environ={}, dtype=dtype).dtype == dtype


def test_empty_string_setting_is_rejected():
    with pytest.raises(SettingsError, match="model"):
        load_settings(environ={"TUTORIAL_MODEL": "   "})


def test_extra_args_string_is_split_like_a_shell():
    s = load_settings(environ={
        "TUTORIAL_EXTRA_ARGS": "--enforce-eager --chat-template '/tmp/my template.jinja'"})
    assert s.extra_args == ("--enforce-eager", "--chat-template", "/tmp/my template.jinja")


def test_extra_args_list_in_toml(tmp_path):
    cfg = write_toml(tmp_path / "c.toml",
                     'extra_args = ["--max-num-seqs", "4", "--swap-space", "1"]\n')
    s = load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})
    assert s.extra_args == ("--max-num-seqs", "4", "--swap-space", "1")


def test_extra_args_of_the_wrong_kind(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", "extra_args = [1, 2]\n")
    with pytest.raises(SettingsError, match="extra_args"):
        load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})


def test_config_variable_naming_a_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="nope.toml"):
        load_settings(environ={"TUTORIAL_CONFIG": str(missing)})


def test_config_variable_naming_a_folder(tmp_path):
    with pytest.raises(SettingsError, match="not a file"):
        load_settings(environ={"TUTORIAL_CONFIG": str(tmp_path)})


def test_invalid_toml(tmp_path):
    cfg = write_toml(tmp_path / "c.toml", "model = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(environ={"TUTORIAL_CONFIG": str(cfg)})


def test_state_and_cache_dir_variables_are_not_settings(tmp_path):
    environ = {"TUTORIAL_STATE_DIR": str(tmp_path / "state"),
               "TUTORIAL_CACHE_DIR": str(tmp_path / "cache")}
    assert load_settings(environ=environ).model == "embedded"


def test_log_preset_from_toml_and_environment(tmp_path):
    cfg = write_toml(tmp_path / "t.toml", 'log_preset = "silent"\n')
    assert load_settings(environ={"TUTORIAL_CONFIG": str(cfg)}).log_preset == "silent"
    env = {"TUTORIAL_CONFIG": str(cfg), "TUTORIAL_LOG_PRESET": "quiet"}
    assert load_settings(environ=env).log_preset == "quiet"


def test_unknown_log_preset_is_named_with_its_origin():
    with pytest.raises(SettingsError, match="TUTORIAL_LOG_PRESET: log_preset must be one of "
                                            "default, quiet, silent, no-stats, got 'loud'"):
        load_settings(environ={"TUTORIAL_LOG_PRESET": "loud"})
