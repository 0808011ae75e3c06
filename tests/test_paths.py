"""Tests for helpers/paths.py: where files live, and the tutorial's own variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import paths


def test_cache_dir_from_environment(tmp_path):
    assert paths.cache_dir({"TUTORIAL_CACHE_DIR": str(tmp_path / "c")}) == tmp_path / "c"


def test_cache_dir_default_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir({}) == tmp_path / ".cache" / "vllm-tutorial"


def test_state_dir_defaults_to_servers_under_cache_dir(tmp_path):
    environ = {"TUTORIAL_CACHE_DIR": str(tmp_path / "c")}
    assert paths.state_dir(environ) == tmp_path / "c" / "servers"


def test_state_dir_from_environment_wins(tmp_path):
    environ = {"TUTORIAL_CACHE_DIR": str(tmp_path / "c"),
               "TUTORIAL_STATE_DIR": str(tmp_path / "s")}
    assert paths.state_dir(environ) == tmp_path / "s"


def test_state_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.state_dir({"TUTORIAL_STATE_DIR": "~/st"}) == tmp_path / "st"


def test_old_state_dir_name_still_works(tmp_path):
    with pytest.warns(FutureWarning):
        assert paths.state_dir({"VLLM_TUTORIAL_STATE_DIR": str(tmp_path / "old")}) == tmp_path / "old"


def test_the_server_environment_has_none_of_the_tutorials_variables():
    environ = {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "TUTORIAL_API_KEY": "secret",
               "VLLM_TUTORIAL_MODEL": "/m", "TUTORIAL_STATE_DIR": "/s"}
    assert paths.server_environment(environ) == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_short_path_writes_home_as_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.short_path(tmp_path / ".cache" / "x.log") == "~/.cache/x.log"
    assert paths.short_path("/var/log/x.log") == "/var/log/x.log"
    assert paths.short_path(str(tmp_path) + "other/x") == str(tmp_path) + "other/x"
