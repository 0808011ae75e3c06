"""Tests for benchmarks/parallel.py and benchmarks/nccl_check.py, the two-GPU benchmark, here on the CPU.

* The command line of every configuration for two H200s (given, not read from this machine):
  tensor parallel 2 carries the fusion fix (``VLLM_ALLREDUCE_USE_FLASHINFER=0`` and the pass
  turned off; under ``--enforce-eager`` only the variable), ``tp2-fused`` neither, data parallel
  ``--data-parallel-size 2``; multicast off in every one; ``--load-format dummy`` for a folder
  without weights; a configuration that cannot be built is recorded, nothing started.
* The arithmetic: Qwen2-7B's parameters from its config (7.62 B), the weight bytes one token
  reads, the datasheet bandwidth picked from nvidia-smi's GPU names, the ceiling.
* vLLM's start-up figures read from log lines; the tables, the JSON written atomically, several
  result files merged; the options (``--cpu-smoke``'s tiny defaults, unknown configurations
  refused).
* ``--make-model``'s tokenizer: every id of the 152,064 decodes, Qwen's ChatML tokens sit at
  Qwen's ids, and random ids decode to text that encodes back to the same ids.
* **Real vLLM** (the shared server): the measuring steps (warm-up, one stream, 1 and 2 streams)
  with ``ignore_eos`` giving exactly the tokens asked for; a failed check stops them.
* ``nccl_check.py``: with no GPU it says so and exits 0; with ``--gloo`` two CPU processes
  all-reduce, check the sum and report bandwidth.

The GPU runs themselves are in benchmarks/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.server import hardware
from helpers.server.hardware import Gpu

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module              # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("parallel_bench", ROOT / "benchmarks" / "parallel.py")

H200S = (Gpu(0, "NVIDIA H200", (9, 0), 143771), Gpu(1, "NVIDIA H200", (9, 0), 143771))
FIX = '{"pass_config": {"fuse_allreduce_rms": false}}'


@pytest.fixture
def qwen_folder(tmp_path):
    folder = tmp_path / "Qwen2-7B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(bench.QWEN2_7B_INSTRUCT))
    return folder


def config_for(name, folder, dummy=True):
    return bench.server_config(bench.SPECS[name], str(folder), gpu=True, dummy=dummy, startup_timeout=300,
                               log=lambda line: None, gpus=H200S).with_port(8000)


# --------------------------------------------------------------------------- command lines
def test_tp2_carries_the_fusion_fix_and_the_origins_flags(qwen_folder):
    config = config_for("tp2", qwen_folder)
    args = config.args()
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--dtype=half" in args and args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--served-model-name") + 1] == "Qwen"
    assert args[args.index("--load-format") + 1] == "dummy"
    assert args[args.index("--compilation-config") + 1] == FIX
    assert "--enforce-eager" not in args and "--data-parallel-size" not in args
    env = config.environment()
    assert env["VLLM_ALLREDUCE_USE_FLASHINFER"] == "0"
    assert {k: env[k] for k in bench.MULTICAST_OFF} == bench.MULTICAST_OFF
    line = config.command_line(style="module")
    assert line.startswith("NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                           "VLLM_ALLREDUCE_USE_FLASHINFER=0 python -m vllm.entrypoints.openai.api_server")
    assert "--compilation-config '" + FIX + "'" in line


def test_each_configuration_has_its_own_flags(qwen_folder):
    eager = config_for("tp2-eager", qwen_folder)
    assert "--enforce-eager" in eager.args() and "--compilation-config" not in eager.args()
    assert eager.environment()["VLLM_ALLREDUCE_USE_FLASHINFER"] == "0"
    fused = config_for("tp2-fused", qwen_folder)
    assert "--compilation-config" not in fused.args() and "VLLM_ALLREDUCE_USE_FLASHINFER" not in fused.environment()
    assert fused.tensor_parallel_size == 2
    dp = config_for("dp2", qwen_folder)
    assert dp.args()[dp.args().index("--data-parallel-size") + 1] == "2"
    assert dp.tensor_parallel_size == 1 and "VLLM_ALLREDUCE_USE_FLASHINFER" not in dp.environment()
    one = config_for("one", qwen_folder, dummy=False)
    for flag in ("--tensor-parallel-size", "--data-parallel-size", "--enforce-eager", "--load-format",
                 "--compilation-config", "--gpu-memory-utilization"):     # no CPU flags on a GPU either
        assert flag not in one.args()
    assert {k: one.environment()[k] for k in bench.MULTICAST_OFF} == bench.MULTICAST_OFF
    assert bench.SPECS["dp2"].gpus == bench.SPECS["tp2"].gpus == 2 and bench.SPECS["one"].gpus == 1


def test_a_configuration_that_cannot_be_built_is_recorded_and_starts_nothing(tmp_path):
    args = SimpleNamespace(model=str(tmp_path / "no-such-model"), keep_logs=None)
    saved = []
    record = bench.run_config(bench.SPECS["one"], args, gpu=True, dummy=True, params=None, bytes_per_param=2,
                              bandwidth=4.8, baseline=None, deadline=1e12, save=saved.append, log=lambda line: None)
    assert record["status"] == "failed" and "ModelNotFoundError" in record["error"]
    assert saved[-1] is record and "command_line" not in record


# --------------------------------------------------------------------------- arithmetic
def test_qwen2_7b_parameters_and_the_bytes_a_token_reads():
    params = bench.model_parameters(bench.QWEN2_7B_INSTRUCT)
    assert params["total"] == 7_615_616_512                      # "7.62 B" on its model card
    assert params["embedding"] == 152_064 * 3_584 and not params["tied_embeddings"]
    assert params["read_per_token"] == params["total"] - params["embedding"]
    assert bench.dtype_bytes("half", bench.QWEN2_7B_INSTRUCT) == 2
    assert bench.model_parameters({"hidden_size": 8}) is None


@pytest.mark.parametrize("name, tbps", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8), ("NVIDIA H200 NVL", 4.8), ("NVIDIA H100 PCIe", 2.0),
    ("NVIDIA H100 NVL", 3.9), ("Tesla T4", 0.32), ("NVIDIA GeForce RTX 4090", None), (None, None)])
def test_datasheet_bandwidth_by_gpu_name(name, tbps):
    found, source = bench.bandwidth_for(name)
    assert found == tbps
    assert source


def test_the_single_stream_ceiling_on_one_h100_and_two_h200s():
    per_token = bench.model_parameters(bench.QWEN2_7B_INSTRUCT)["read_per_token"] * 2
    assert 3.35e12 / per_token == pytest.approx(237, abs=1)       # one H100 SXM
    assert 4.8e12 / per_token == pytest.approx(339, abs=1)        # one H200
    assert 4.8e12 / (per_token / 2) == pytest.approx(679, abs=1)  # tensor parallel 2 on H200s


# --------------------------------------------------------------------------- log, tables, JSON
LOG = """\
(EngineCore_DP0 pid=1) INFO 11-28 [cuda_communicator.py:1] Using all-reduce backends ['CUSTOM', 'PYNCCL']
(Worker_TP0 pid=2) INFO [gpu_model_runner.py:2] Model loading took 7.1 GiB memory and 12.3 seconds
(Worker_TP1 pid=3) INFO [gpu_model_runner.py:2] Model loading took 7.1 GiB memory and 12.4 seconds
INFO Loading weights took 3.21 seconds
INFO torch.compile takes 44.2 s in total
INFO Graph capturing finished in 12 secs, took 0.5 GiB
INFO init engine (profile, create kv cache, warmup model) took 120.5 seconds
INFO GPU KV cache size: 1,234,567 tokens
INFO Maximum concurrency for 8,192 tokens per request: 150.70x
INFO vLLM is using nccl==2.28.9
INFO engine config: custom_all_reduce=True, quantization=None
"""


def test_vllms_own_start_up_figures_are_read_from_its_log():
    found = bench.log_timings(LOG)
    assert found["model_loading"] == ["7.1 GiB memory and 12.3 seconds", "7.1 GiB memory and 12.4 seconds"]
    assert found["torch_compile_s"] == ["44.2"] and found["graph_capture_s"] == ["12"]
    assert found["init_engine_s"] == ["120.5"] and found["kv_cache_tokens"] == ["1,234,567"]
    assert found["max_concurrency"] == ["8,192 tokens per request: 150.70x"] and found["nccl"] == ["2.28.9"]
    assert found["all_reduce_backends"] == ["all-reduce backends ['CUSTOM', 'PYNCCL']"]   # not the config dump
    assert bench.log_timings("nothing here") == {}


def load(users, completed, failed=0, **extra):
    return {"users": users, "completed": completed, "failed": failed, "ttft_p50_s": 0.0123, "ttft_p95_s": 0.25,
            "tokens_per_s": 12345.6, "decode_tokens_per_s_p50": 98.76, "errors": {}, **extra}


def results(device="NVIDIA H200", configs=None):
    return {
        "date": "2026-11-28T00:00:00+00:00",
        "device": {"count": 2, "name": device, "names": [device, device], "driver": "570.1"},
        "versions": {"torch": "2.11.0", "vllm": "0.26.0", "nccl": "2.28.9"},
        "bandwidth": {"note": "ceiling note"},
        "configs": configs if configs is not None else [
            {"name": "one", "status": "ok", "startup_s": 88.4, "memory_after_start_mib": {"0": 129000, "1": 0},
             "single_stream": {"decode_tokens_per_s_p50": 211.04}, "ceiling_tokens_per_s": 339.4,
             "memory_after_stop_mib": {"0": 0, "1": 0}, "memory_back_to_baseline": True,
             "loads": [load(1, 2), load(128, 250, 6, errors={"HTTP 500": 6}), {"users": 32, "skipped": "time budget"}]},
            {"name": "tp2", "status": "failed to start", "startup_s": 31.0, "memory_after_stop_mib": {"0": 900, "1": 0},
             "memory_back_to_baseline": False},
            {"name": "dp2", "status": "skipped", "error": "time budget"},
        ]}


def test_the_tables_show_every_configuration_and_load():
    text = bench.report(results())
    assert text.splitlines()[0] == ("2 x NVIDIA H200 (driver 570.1); torch 2.11.0, vLLM 0.26.0, NCCL 2.28.9; "
                                    "2026-11-28T00:00:00+00:00")
    rows = {line.split()[0]: line for line in bench.configs_table(results()).splitlines()[1:]}
    assert rows["one"].split()[1:7] == ["ok", "88", "129,000/0", "211", "339", "back"]
    assert "failed to start" in rows["tp2"] and "NOT back: 900/0" in rows["tp2"]
    assert "skipped" in rows["dp2"]
    loads = bench.loads_table(results()).splitlines()
    assert loads[1].split() == ["one", "1", "2", "0", "0.012", "0.250", "12,346", "98.8", "-"]
    assert loads[2].split()[-2:] == ["500:", "6"] and "HTTP" in loads[2]
    assert loads[3].split()[:4] == ["one", "32", "skipped:", "time"]
    assert "ceiling note" in text


def test_results_are_written_atomically_and_merged(tmp_path):
    first, second, merged_path = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    bench.write_json(first, results())
    assert not list(tmp_path.glob("*.tmp"))
    rerun = {"name": "tp2", "status": "ok", "loads": [load(1, 2)]}
    bench.write_json(second, results(configs=[rerun]))
    merged = bench.merge([first, second])
    assert [c["name"] for c in merged["configs"]] == ["one", "dp2", "tp2"]
    assert merged["configs"][-1]["status"] == "ok" and "warnings" not in merged
    bench.write_json(second, results(device="NVIDIA H100 80GB HBM3", configs=[rerun]))
    assert "another device" in bench.merge([first, second])["warnings"][0]
    assert bench.main(["--merge", str(first), str(second), "--out", str(merged_path)]) == 0
    assert json.loads(merged_path.read_text())["merged_from"] == [str(first), str(second)]


def test_options_and_the_cpu_smokes_tiny_defaults():
    args = bench.parse_args(["--cpu-smoke"])
    assert (args.configs, args.streams, args.max_tokens, args.turns) == (("one",), (1, 2), 8, 2)
    args = bench.parse_args(["--cpu-smoke", "--max-tokens", "32", "--streams", "1,3"])
    assert (args.max_tokens, args.streams) == (32, (1, 3))
    args = bench.parse_args(["--configs", "one,tp2-eager,dp2", "--allowed-token-ids", "4"])
    assert args.configs == ("one", "tp2-eager", "dp2") and args.streams == (1, 8, 32, 128)
    assert args.extra_body == {"allowed_token_ids": [0, 1, 2, 3]}
    for bad in (["--configs", "tp3"], ["--streams", "0,8"], ["--streams", "a"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


NO_GPU = pytest.mark.skipif(bool(hardware.gpus()), reason="checks what happens on a machine without a GPU")


@NO_GPU
def test_without_a_gpu_it_refuses_unless_asked_for_the_smoke(capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--model", "/nowhere"]) == 2
    assert "--cpu-smoke" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before          # main() gives SIGTERM back


def fake_gpu_machine(monkeypatch, count):
    """What main() reads of a GPU machine, and a run_config that records instead of starting vLLM."""
    device = {"count": count, "name": "NVIDIA H200", "names": ["NVIDIA H200"] * count, "driver": "570.1",
              "memory_total_mib": [143771] * count, "topology": "GPU0 X NV18"}
    monkeypatch.setattr(bench, "device_info", lambda: device)
    monkeypatch.setattr(bench, "versions", lambda: {"torch": "2.11.0", "vllm": "0.26.0", "nccl": "2.28.9",
                                                   "torch_cuda": "13.0", "nccl_pinned_by_torch": "nvidia-nccl-cu13"})
    monkeypatch.setattr(bench, "gpu_memory", lambda: {str(i): 0 for i in range(count)})
    for name in bench.MULTICAST_OFF:          # main() sets them for its children: undone after the test
        monkeypatch.delenv(name, raising=False)
    started = []

    def run_config(spec, args, *, save, bandwidth, params, bytes_per_param, **kwargs):
        started.append(spec.name)
        record = {"name": spec.name, "status": "ok", "ceiling_tokens_per_s": bandwidth * 1e12 / (
            params["read_per_token"] * bytes_per_param / spec.tensor_parallel), "loads": [load(1, 2)]}
        save(record)
        return record

    monkeypatch.setattr(bench, "run_config", run_config)
    return started


def test_on_two_gpus_every_configuration_runs_in_order_and_the_json_holds_them(monkeypatch, qwen_folder, tmp_path,
                                                                               capsys):
    started = fake_gpu_machine(monkeypatch, 2)
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(qwen_folder), "--configs", "one,tp2,dp2", "--out", str(out)]) == 0
    assert started == ["one", "tp2", "dp2"]
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["configs"]] == ["one", "tp2", "dp2"]
    assert data["model"]["weights"].startswith("dummy") and data["model"]["served_model_name"] == "Qwen"
    assert data["bandwidth"]["hbm_tb_per_s"] == 4.8 and "datasheet" in data["bandwidth"]["note"]
    assert data["configs"][1]["ceiling_tokens_per_s"] == pytest.approx(679, abs=1)
    assert data["environment"]["NCCL_NVLS_ENABLE"] == "0"
    text = capsys.readouterr().out
    assert "at most 339 tokens/s on one GPU" in text and "2 x NVIDIA H200" in text
    assert bench.device_slug(bench.device_info()) == "2xH200"


def test_configurations_that_do_not_fit_are_skipped_and_said(monkeypatch, qwen_folder, tmp_path):
    started = fake_gpu_machine(monkeypatch, 1)
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(qwen_folder), "--configs", "one,tp2,dp2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert started == ["one"]
    assert [(c["name"], c["status"]) for c in data["configs"]] == [("one", "ok"), ("tp2", "skipped"), ("dp2", "skipped")]
    assert data["configs"][1]["error"] == "needs 2 GPUs, this machine has 1"
    assert bench.main(["--model", str(qwen_folder), "--configs", "one", "--budget", "100", "--out", str(out)]) == 0
    skipped = json.loads(out.read_text())["configs"][0]
    assert skipped["status"] == "skipped" and skipped["error"].startswith("time budget")
    assert started == ["one"]


# --------------------------------------------------------------------------- the model folder
@pytest.mark.vllm      # the heavy part: 20 s to build and load a 152,064-token tokenizer
def test_make_model_gives_a_tokenizer_for_every_id(tmp_path):
    from transformers import AutoTokenizer

    folder = bench.make_model(tmp_path / "qwen", tiny=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 152_064 and config["model_type"] == "qwen2"
    assert not bench.has_weights(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 152_064
    assert [tokenizer.convert_tokens_to_ids(t) for t in bench.QWEN_SPECIAL] == list(bench.QWEN_SPECIAL.values())
    assert tokenizer.eos_token_id == 151_645
    tokens = tokenizer.convert_ids_to_tokens(list(range(152_064)))
    assert None not in tokens and len(set(tokens)) == 152_064          # every id is a distinct token
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    rng = random.Random(0)
    ids = [i for i in (rng.randrange(256, 152_064) for _ in range(500)) if i not in bench.QWEN_SPECIAL.values()]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids    # an answer re-reads as itself
    full = bench.QWEN2_7B_INSTRUCT
    assert (full["hidden_size"], full["num_hidden_layers"], full["num_key_value_heads"]) == (3584, 28, 4)


# --------------------------------------------------------------------------- real vLLM
def test_the_measuring_steps_against_real_vllm(shared_server):
    checks = []
    out = bench.measure(shared_server.endpoint, streams=(1, 2), max_tokens=4, turns=2, single_tokens=8,
                        load_limit=240, log=lambda line: None, check=lambda: checks.append(1))
    assert out["warmup"]["completed"] == 1
    assert out["single_stream"]["completed"] == 1
    assert out["single_stream"]["requests"][0]["completion_tokens"] == 8                 # ignore_eos
    assert [(l["users"], l["completed"], l["failed"]) for l in out["loads"]] == [(1, 2, 0), (2, 4, 0)]
    assert all(r["completion_tokens"] == 4 for l in out["loads"] for r in l["requests"])
    assert len(checks) == 4


def test_a_failed_check_stops_the_steps(shared_server):
    from helpers.errors import ServerDiedError

    def dead():
        raise ServerDiedError("gone")

    steps = []
    with pytest.raises(ServerDiedError):
        bench.measure(shared_server.endpoint, streams=(1, 2), max_tokens=2, turns=1, single_tokens=2,
                      load_limit=240, log=lambda line: None, check=dead, on_step=lambda key, value: steps.append(key))
    assert steps == ["warmup"]


# --------------------------------------------------------------------------- nccl_check
@NO_GPU
def test_nccl_check_without_gpus_says_so_and_exits_0():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nccl_check.py")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "nothing to check" in run.stdout and "torch " in run.stdout


@pytest.mark.vllm      # the heavy part: three processes import torch
def test_nccl_check_runs_its_all_reduce_with_gloo():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nccl_check.py"), "--gloo", "--size-mib", "4",
                          "--iters", "3"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "across 2 CPU processes (gloo)" in run.stdout and "bus bandwidth" in run.stdout
    assert "healthy" in run.stdout
