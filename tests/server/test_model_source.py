"""Tests for helpers/model_source.py: a model setting becomes a folder vLLM can load, or a clear error."""

from __future__ import annotations

import json
import time

import pytest

from helpers.errors import ModelNotFoundError, TutorialError
from helpers.server.model_source import check_model_folder, looks_like_path, resolve_model


def quiet(*_a, **_k):
    pass


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "Qwen2-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 28}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def test_missing_absolute_path_fails_fast_naming_the_path(tmp_path):
    missing = tmp_path / "home" / "hyh" / "model" / "Qwen2-7B-Instruct"
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(missing), log=quiet)
    assert time.monotonic() - start < 1.0
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)
    assert isinstance(info.value, TutorialError)


def test_a_file_instead_of_a_folder(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file") as info:
        resolve_model(str(weights), log=quiet)
    assert str(weights) in str(info.value)


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "emptymodel"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="config.json") as info:
        resolve_model(str(folder), log=quiet)
    assert str(folder) in str(info.value)


def test_config_json_that_is_a_folder_does_not_count(tmp_path):
    folder = tmp_path / "odd"
    (folder / "config.json").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        check_model_folder(folder)


def test_good_folder(model_folder):
    resolved = resolve_model(str(model_folder), log=quiet)
    assert resolved.model == str(model_folder.resolve())
    assert resolved.served_name == "Qwen2-7B-Instruct"
    assert resolved.local_dir == model_folder.resolve()
    assert resolved.max_model_len is None
    assert resolved.env == {}
    assert "local" in resolved.origin


def test_relative_and_home_paths_are_resolved(model_folder, monkeypatch):
    monkeypatch.chdir(model_folder.parent)
    assert resolve_model("./Qwen2-7B-Instruct", log=quiet).model == str(model_folder.resolve())
    monkeypatch.setenv("HOME", str(model_folder.parent))
    assert resolve_model("~/Qwen2-7B-Instruct", log=quiet).model == str(model_folder.resolve())


def test_trailing_slash_keeps_the_folder_name_as_served_name(model_folder):
    assert resolve_model(str(model_folder) + "/", log=quiet).served_name == "Qwen2-7B-Instruct"


def test_looks_like_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so no folder named Qwen/ can exist here
    assert looks_like_path("Qwen/Qwen2-7B-Instruct") is False
    assert looks_like_path("meta-llama/Llama-3.1-8B-Instruct") is False
    assert looks_like_path("./x") is True
    assert looks_like_path("../x") is True
    assert looks_like_path("/x") is True
    assert looks_like_path("~/x") is True
    assert looks_like_path("a/b/c") is True  # not a hub id


def test_an_existing_relative_folder_shaped_like_a_hub_id_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2-7B-Instruct").mkdir(parents=True)
    assert looks_like_path("Qwen/Qwen2-7B-Instruct") is True


def test_unreachable_hub_id_fails_within_seconds(tmp_path, monkeypatch):
    """This machine has no internet: the download must fail fast with a clear error."""
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as hf_constants  # read the variables when first imported
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    messages = []
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("tutorial-tests/no-such-model-xyz", log=messages.append)
    assert time.monotonic() - start < 15
    assert "tutorial-tests/no-such-model-xyz" in str(info.value)
    assert any("tutorial-tests/no-such-model-xyz" in m for m in messages)


# --- locate: what --model will be, with no work done -------------------------------------------

def hub_cache(monkeypatch, folder):
    """An empty hub cache of the test's own (huggingface_hub reads the variable when first
    imported, so its constant is set too: the machine's real cache may hold the model)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(folder))


def test_a_hub_model_in_the_cache_is_located_there_without_a_download(tmp_path, monkeypatch, model_folder):
    from helpers.server import model_source

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2-7B-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((model_folder / "config.json").read_text())
    (tmp_path / "hub" / "models--Qwen--Qwen2-7B-Instruct" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Qwen2-7B-Instruct" / "refs" / "main").write_text("abc")
    hub_cache(monkeypatch, tmp_path / "hub")
    assert model_source.locate("Qwen/Qwen2-7B-Instruct").local_dir == snapshot

def test_locating_the_embedded_model_converts_nothing(tmp_path, monkeypatch):
    from helpers.server import embedded_model
    from helpers.server.model_source import locate

    monkeypatch.setenv("TUTORIAL_CACHE_DIR", str(tmp_path / "cache"))
    located = locate("embedded")
    assert located.model == str(tmp_path / "cache" / "models" / embedded_model.FOLDER_NAME)
    assert located.served_name == embedded_model.SERVED_NAME and not located.prepared
    assert not (tmp_path / "cache").exists()                  # nothing converted, no folder made


def test_locating_a_hub_id_downloads_nothing(tmp_path, monkeypatch):
    from helpers.server import model_source

    hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.setattr(model_source, "download", lambda *a, **k: pytest.fail("downloaded while locating"))
    located = model_source.locate("Qwen/Qwen2-7B-Instruct")
    assert (located.model, located.served_name, located.env) == (
        "Qwen/Qwen2-7B-Instruct", "Qwen2-7B-Instruct", {"HF_HUB_OFFLINE": "1"})
    assert located.local_dir is None and not located.prepared
    assert not (tmp_path / "hub").exists()


def test_prepare_downloads_a_located_hub_model(tmp_path, monkeypatch, model_folder):
    from helpers.server import model_source

    hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.setattr(model_source, "download", lambda repo_id, log: model_folder)
    ready = model_source.prepare(model_source.locate("Qwen/Qwen2-7B-Instruct"), log=quiet)
    assert ready.prepared and ready.local_dir == model_folder and ready.model == "Qwen/Qwen2-7B-Instruct"


def test_locating_an_id_the_hub_would_refuse_does_not_raise_before_the_download():
    # huggingface_hub refuses "--" in an id (HFValidationError, a ValueError): locate() only reads
    # the cache, so it says "not there"; the download at start names the error, as before
    from helpers.server.model_source import locate

    located = locate("someone/model--name")
    assert located.local_dir is None and not located.prepared
