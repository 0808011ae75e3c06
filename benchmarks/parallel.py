"""Two GPUs for the origin's Qwen2-7B-Instruct: one GPU, tensor parallel 2, data parallel 2.

Run by hand (on the GPU machine, unattended, one call of at most 10 minutes per few configurations):

    python benchmarks/parallel.py --make-model /tmp/qwen2-7b              # config + tokenizer, no weights
    python benchmarks/parallel.py --model /tmp/qwen2-7b --configs one,dp2 --out results.json
    python benchmarks/parallel.py --model /tmp/qwen2-7b --configs tp2 --out results-tp2.json
    python benchmarks/parallel.py --merge results.json results-tp2.json --out all.json
    python benchmarks/parallel.py --cpu-smoke                             # the same code here, tiny numbers

For each configuration it starts the server through the helpers (``VLLMServer`` with a
``ServerConfig`` from ``from_settings``: ``--served-model-name Qwen --dtype=half
--max-model-len 8192``, ``--load-format dummy`` for a folder without weights), and records:

* start-up: seconds from launch to ready, each phase as the helpers saw it in the log, and
  vLLM's own timings (weights, torch.compile, CUDA graphs, KV cache size);
* GPU memory of every GPU before, after the start, and after the stop (it must come back);
* one stream's decode speed (tokens/s after the first token, ``max_tokens`` with
  ``ignore_eos``), next to the memory-bandwidth ceiling: weight bytes read per token on one GPU
  / the GPU's HBM bandwidth from its datasheet;
* 1, 8, 32 and 128 concurrent streams through ``helpers.loadtest`` (each a conversation of
  ``--turns`` requests): time to first token p50/p95 (nearest rank), total tokens/s, per-stream
  decode tokens/s; errors by kind.

Results go to one JSON file (device, driver, torch/vLLM/NCCL versions, the exact command line
and the environment variables that matter for every server, every number), written again
after every step, so a run killed at its time limit keeps what it measured.

Known on vLLM 0.26.0 (the GPU machine's; torch 2.11): tensor parallel 2 compiled crashes in
the all-reduce + RMSNorm fusion (FlashInfer's multicast workspace, which that machine forbids)
unless ``VLLM_ALLREDUCE_USE_FLASHINFER=0`` and ``--compilation-config '{"pass_config":
{"fuse_allreduce_rms": false}}'``: the ``tp2`` configurations carry both (``tp2-fused`` leaves
them out, to see the crash). NVLink multicast stays off in every child's environment
(``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import loadtest  # noqa: E402
from helpers.endpoint import Endpoint  # noqa: E402
import requests  # noqa: E402

from helpers.errors import ServerDiedError, ServerStartError, TutorialError  # noqa: E402
from helpers.server import hardware  # noqa: E402
from helpers.server.config import ServerConfig, from_settings  # noqa: E402
from helpers.server.lifecycle import VLLMServer  # noqa: E402
from helpers.settings import load_settings  # noqa: E402

SERVED_NAME = "Qwen"                # the origin's --served-model-name
MAX_MODEL_LEN = 8192                # the origin's config (configs/qwen2-7b-two-gpus.toml)
MEMORY_MARGIN_MIB = 256             # "back to baseline": within this of the reading before the start
MEMORY_WAIT_S = 90.0

# The GPU machine forbids NVLink multicast: every child process gets these.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# vLLM 0.26.0, tensor parallel on Hopper: keep the all-reduce + RMSNorm fusion off.
TP_FIX_ENV = {"VLLM_ALLREDUCE_USE_FLASHINFER": "0"}
TP_FIX_ARGS = ("--compilation-config", json.dumps({"pass_config": {"fuse_allreduce_rms": False}}))
# Variables whose values the results record (present or not).
RECORDED_ENV = ("VLLM_ALLREDUCE_USE_FLASHINFER", "VLLM_FLASHINFER_ALLREDUCE_BACKEND", "VLLM_ALLREDUCE_USE_SYMM_MEM",
                "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "NCCL_P2P_DISABLE",
                "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES", "VLLM_USE_V2_MODEL_RUNNER", "VLLM_ATTENTION_BACKEND",
                "VLLM_CPU_KVCACHE_SPACE")
RECORDED_PREFIXES = ("VLLM_", "NCCL_", "TORCH_", "NVSHMEM_", "CUDA_")
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)

# HBM bandwidth per GPU, TB/s, from NVIDIA's datasheets; the first name that matches wins.
DATASHEET_TBPS = (
    ("H200", 4.8, "H200 (SXM and NVL) datasheet: 4.8 TB/s"),
    ("H100 NVL", 3.9, "H100 NVL datasheet: 3.9 TB/s"),
    ("H100 PCIe", 2.0, "H100 PCIe datasheet: 2.0 TB/s"),
    ("H100", 3.35, "H100 SXM datasheet: 3.35 TB/s"),
    ("A100-SXM4-80GB", 2.039, "A100 80GB SXM datasheet: 2,039 GB/s"),
    ("A100 80GB PCIe", 1.935, "A100 80GB PCIe datasheet: 1,935 GB/s"),
    ("A100", 1.555, "A100 40GB datasheet: 1,555 GB/s"),
    ("L4", 0.3, "L4 datasheet: 300 GB/s"),
    ("T4", 0.32, "T4 datasheet: 320 GB/s"),
)


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Spec:
    name: str
    tensor_parallel: int = 1
    data_parallel: int = 1
    eager: bool = False
    tp_fix: bool = True
    describe: str = ""
    start_estimate_s: float = 150.0        # for the time budget (2x H200 figures, rounded up)

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.data_parallel


SPECS = {s.name: s for s in (
    Spec("one", describe="one GPU, compiled with CUDA graphs (vLLM's default)", start_estimate_s=150),
    Spec("one-eager", eager=True, describe="one GPU, --enforce-eager", start_estimate_s=90),
    Spec("tp2", tensor_parallel=2, describe="--tensor-parallel-size 2 (the origin's), compiled, fusion off",
         start_estimate_s=330),
    Spec("tp2-eager", tensor_parallel=2, eager=True, describe="--tensor-parallel-size 2, --enforce-eager",
         start_estimate_s=120),
    Spec("tp2-fused", tensor_parallel=2, tp_fix=False,
         describe="--tensor-parallel-size 2, compiled, vLLM's defaults (crashed on vLLM 0.26.0 here)",
         start_estimate_s=330),
    Spec("dp2", data_parallel=2, describe="--data-parallel-size 2: two one-GPU engines behind one API server",
         start_estimate_s=200),
    Spec("dp2-eager", data_parallel=2, eager=True, describe="--data-parallel-size 2, --enforce-eager",
         start_estimate_s=120),
)}
DEFAULT_CONFIGS = ("one", "tp2", "dp2")


def server_config(spec: Spec, model: str, *, gpu: bool, dummy: bool, startup_timeout: float,
                  log: Callable[[str], None] = print, gpus: tuple[hardware.Gpu, ...] | None = None) -> ServerConfig:
    """The helpers' ``ServerConfig`` for one configuration (``from_settings`` picks the rest;
    ``gpus``: this machine's, read by nvidia-smi, unless given)."""
    extra: list[str] = []
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    if gpu:
        env.update(MULTICAST_OFF)
        overrides.update(model=model, served_model_name=SERVED_NAME, dtype="half", max_model_len=MAX_MODEL_LEN)
    else:                               # the CPU smoke: the embedded model (or --model), the helpers' CPU flags
        overrides.update(model=model)
    overrides["tensor_parallel_size"] = spec.tensor_parallel
    if dummy:
        extra += ["--load-format", "dummy"]
    if spec.data_parallel > 1:
        extra += ["--data-parallel-size", str(spec.data_parallel)]
    if spec.tensor_parallel > 1 and spec.tp_fix:
        env.update(TP_FIX_ENV)
        if not spec.eager:              # nothing is compiled under --enforce-eager: no pass to turn off
            extra += list(TP_FIX_ARGS)
    if spec.eager:
        extra += ["--enforce-eager"]
    settings = load_settings(environ={}, extra_args=tuple(extra), startup_timeout=startup_timeout, **overrides)
    config = from_settings(settings, gpus=gpus, log=lambda line: log(f"    {line}"))
    return replace(config, env={**config.env, **env})


# --------------------------------------------------------------------------- the machine
def _smi(*query: str) -> list[list[str]] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[part.strip() for part in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def gpu_memory() -> dict[str, int] | None:
    """MiB used on each GPU (nvidia-smi ``memory.used``), by index; None without nvidia-smi."""
    rows = _smi("index", "memory.used")
    if rows is None:
        return None
    return {row[0]: int(float(row[1])) for row in rows if len(row) == 2}


def wait_memory_back(baseline: dict[str, int] | None,
                     timeout: float = MEMORY_WAIT_S) -> tuple[dict | None, bool, float]:
    """Poll until every GPU uses at most its baseline + ``MEMORY_MARGIN_MIB``: (reading, back, seconds)."""
    started = time.monotonic()
    if baseline is None:
        return None, True, 0.0
    while True:
        now = gpu_memory() or {}
        back = all(now.get(i, 0) <= used + MEMORY_MARGIN_MIB for i, used in baseline.items())
        if back or time.monotonic() - started > timeout:
            return now, back, time.monotonic() - started
        time.sleep(1.0)


def bandwidth_for(gpu_name: str | None) -> tuple[float | None, str]:
    """(TB/s, where the figure comes from) for a GPU name as nvidia-smi prints it."""
    if not gpu_name:
        return None, "no GPU"
    for key, tbps, source in DATASHEET_TBPS:
        if key.lower() in gpu_name.lower():
            return tbps, source
    return None, f"no datasheet figure here for {gpu_name!r}"


def device_info() -> dict:
    rows = _smi("index", "name", "memory.total", "driver_version") or []
    info: dict[str, Any] = {"count": len(rows), "names": [r[1] for r in rows if len(r) == 4],
                            "memory_total_mib": [int(float(r[2])) for r in rows if len(r) == 4],
                            "driver": rows[0][3] if rows and len(rows[0]) == 4 else None}
    info["name"] = info["names"][0] if info["names"] else None
    if rows:
        try:
            info["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                              timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["topology"] = None
    else:
        info["cpu"] = {"cores": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor()}
    return info


def versions() -> dict:
    machine = hardware.detect()
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": machine.python, "torch": machine.torch, "torch_cuda": machine.torch_cuda,
            "nccl": machine.nccl, "nccl_package": machine.nccl_package,
            "nccl_pinned_by_torch": machine.nccl_pinned_by_torch,
            "vllm_distribution": machine.vllm_distribution, "vllm": machine.vllm_version,
            "transformers": version("transformers"), "openai": version("openai")}


def recorded_environment(extra: dict[str, str] | None = None) -> dict[str, str | None]:
    """The variables that matter, as a server started now would see them (secrets left out)."""
    env = {**os.environ, **(extra or {})}
    names = set(RECORDED_ENV) | {k for k in env if k.startswith(RECORDED_PREFIXES)}
    return {k: env.get(k) for k in sorted(names) if not SECRET.search(k)}


# --------------------------------------------------------------------------- the model
def model_parameters(config: dict) -> dict | None:
    """Parameter counts of a Llama/Qwen2-style decoder from its config.json, and the weight
    bytes one decoded token reads (every weight but the input embedding table, whose one row
    per token is negligible; with tied embeddings the table is read as the output layer)."""
    try:
        h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        vocab = config["vocab_size"]
    except (KeyError, TypeError):
        return None
    head_dim = config.get("head_dim") or h // heads
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias"))
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    if qkv_bias:
        attention += heads * head_dim + 2 * kv * head_dim
    per_layer = attention + 3 * h * inter + 2 * h
    embedding = vocab * h
    tied = bool(config.get("tie_word_embeddings"))
    total = layers * per_layer + h + embedding + (0 if tied else embedding)
    read_per_token = total - (0 if tied else embedding)
    return {"total": total, "embedding": embedding, "tied_embeddings": tied, "read_per_token": read_per_token}


def dtype_bytes(dtype: str, config: dict) -> int:
    if dtype in ("float", "float32"):
        return 4
    if dtype == "auto" and str(config.get("torch_dtype") or config.get("dtype")) == "float32":
        return 4
    return 2


def has_weights(model_dir: Path) -> bool:
    return any(p.suffix in {".safetensors", ".bin", ".pt", ".gguf"} for p in model_dir.iterdir())


# Qwen2-7B-Instruct's config.json (huggingface.co/Qwen/Qwen2-7B-Instruct), for a folder without weights.
QWEN2_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}
# A model of the same vocabulary and layout, small enough for the CPU (tests the tokenizer here).
# (head_dim 64: the CPU backend's attention refuses 16.)
TINY_QWEN2 = {**QWEN2_7B_INSTRUCT, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Qwen2's pre-tokenizer split (its tokenizer.json), then byte-level.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (what byte-level BPE vocabularies hold)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer built like Qwen2's (its split, byte-level, ChatML tokens at
    Qwen's ids) whose vocabulary fills **every** id below ``vocab_size``: the 256 bytes, then
    words of a space and two to four letters, each reachable through its merges (" ab" from
    " a" + "b" ...). Random weights then never emit an id it cannot decode, and an answer
    tokenizes back to as many tokens as were generated."""
    import itertools
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = _byte_level_alphabet()
    space = alphabet[ord(" ")]                      # "Ġ"
    letters = string.ascii_letters
    ids = (i for i in range(vocab_size) if i not in QWEN_SPECIAL.values())
    vocab = {char: next(ids) for char in alphabet}
    vocab.update(QWEN_SPECIAL)                      # in the vocabulary at Qwen's ids, matched as added tokens
    merges: list[tuple[str, str]] = []
    needed = vocab_size - len(vocab)

    def words():
        for a in letters:
            yield space, a
        for a, b in itertools.product(letters, repeat=2):
            yield space + a, b
        for a, b, c in itertools.product(letters, repeat=3):
            yield space + a + b, c
        for a, b, c, d in itertools.product(letters, repeat=4):
            yield space + a + b + c, d

    for left, right in itertools.islice(words(), needed):
        merges.append((left, right))
        vocab[left + right] = next(ids)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    for token, token_id in sorted(QWEN_SPECIAL.items(), key=lambda kv: kv[1]):
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    return tokenizer


def make_model(folder: Path, tiny: bool = False) -> Path:
    """A model folder without weights, for ``--load-format dummy``: Qwen2-7B-Instruct's
    config.json (``tiny``: the same vocabulary, a tiny body, for the CPU) and a synthetic
    tokenizer covering its whole 152,064-id vocabulary (``synthetic_tokenizer``)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = TINY_QWEN2 if tiny else QWEN2_7B_INSTRUCT
    tokenizer = synthetic_tokenizer(config["vocab_size"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "bos_token": None, "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False, "errors": "replace", "split_special_tokens": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for t, i in QWEN_SPECIAL.items()},
        "chat_template": CHATML}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, indent=1))
    (folder / "README.md").write_text(
        "Qwen2-7B-Instruct's config.json (with --tiny: a tiny model of the same vocabulary) and a synthetic "
        "byte-level BPE tokenizer covering every id of its vocabulary. No weights: serve with "
        "--load-format dummy (random weights of the right shape: the text is noise, the speed is real).\n"
        "Made by benchmarks/parallel.py --make-model.\n")
    return folder


# --------------------------------------------------------------------------- the log
LOG_TIMINGS = {
    "weights_loaded_s": r"Loading weights took ([\d.]+) s",
    "model_loading": r"Model loading took ([^\n]*)",
    "torch_compile_s": r"torch\.compile takes ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) s",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for ([\d,]+ tokens per request: [\d.]+x)",
    "nccl": r"vLLM is using nccl==(\S+)",
    "all_reduce_backends": (r"((?:all-?reduce|backends?)[^\n]{0,80}"
                            r"\[['\"](?:CUSTOM|PYNCCL|NCCL|FLASHINFER|SYMM_MEM|QUICK)[^\n]*)"),
    "flashinfer_all_reduce": r"(Initialized FlashInfer[^\n]*|FlashInfer[^\n]{0,40}(?:multicast|allreduce)[^\n]*)",
    "custom_all_reduce_off": r"((?:Custom allreduce|custom all-?reduce) is disabled[^\n]*)",
}


def log_timings(text: str) -> dict[str, list[str]]:
    """vLLM's own start-up figures from its log, every occurrence (one per worker or engine)."""
    found = {}
    for key, pattern in LOG_TIMINGS.items():
        values = [m.group(1).strip()[:200] for m in re.finditer(pattern, text, re.IGNORECASE)]
        if values:
            found[key] = values[:8]
    return found


# --------------------------------------------------------------------------- measuring
def measure(endpoint: Endpoint, *, streams: tuple[int, ...], max_tokens: int, turns: int, single_tokens: int,
            load_limit: float, deadline: float | None = None, extra_body: dict | None = None,
            on_step: Callable[[str, Any], None] = lambda key, value: None, log: Callable[[str], None] = print,
            check: Callable[[], None] = lambda: None) -> dict:
    """Warm-up, one stream's decode speed, then each number of concurrent streams.
    ``check`` runs after each step and raises when the server is gone (the steps stop there)."""
    def limit() -> float:
        if deadline is None:
            return load_limit
        return max(5.0, min(load_limit, deadline - time.monotonic()))

    common = dict(ignore_eos=True, extra_body=extra_body, progress=None)
    out: dict[str, Any] = {}
    warm = loadtest.run_load(endpoint, 1, turns=1, max_tokens=min(16, max_tokens), duration_limit=limit(), **common)
    out["warmup"] = warm.summary()
    on_step("warmup", out["warmup"])
    log(f"    warm-up: {warm}")
    check()
    single = loadtest.run_load(endpoint, 1, turns=1, max_tokens=single_tokens, duration_limit=limit(), **common)
    out["single_stream"] = single.as_dict()
    on_step("single_stream", out["single_stream"])
    log(f"    one stream, {single_tokens} tokens: {single.decode_tokens_per_s_p50 or 0:,.1f} tokens/s decoding, "
        f"first token {single.ttft_p50 or 0:.3f} s")
    check()
    out["loads"] = []
    for n in streams:
        if deadline is not None and deadline - time.monotonic() < 10:
            out["loads"].append({"users": n, "skipped": "time budget"})
            log(f"    {n} streams: skipped (time budget)")
            continue
        result = loadtest.run_load(endpoint, n, turns=turns, max_tokens=max_tokens, duration_limit=limit(), **common)
        out["loads"].append(result.as_dict())
        on_step("loads", out["loads"])
        log(f"    {n:>4} streams: {result}")
        check()
        if result.client_lag_p95_s and result.client_lag_p95_s > 0.05:
            log(f"         note: the client's loop ran {result.client_lag_p95_s * 1000:.0f} ms late (p95)")
    return out


def run_config(spec: Spec, args, *, gpu: bool, dummy: bool, params: dict | None, bytes_per_param: int,
               bandwidth: float | None, baseline: dict | None, deadline: float,
               save: Callable[[dict], None], log: Callable[[str], None] = print) -> dict:
    """Start, measure, stop one configuration; every outcome (a failed start too) is recorded."""
    record: dict[str, Any] = {"name": spec.name, "gpus": spec.gpus if gpu else 0,
                              "describe": spec.describe if gpu else "the CPU backend (a smoke test of the script)",
                              "tensor_parallel": spec.tensor_parallel, "data_parallel": spec.data_parallel,
                              "eager": spec.eager, "status": "starting"}
    if params:
        per_gpu = params["read_per_token"] * bytes_per_param / spec.tensor_parallel
        record["weight_bytes_read_per_token_per_gpu"] = per_gpu
        if bandwidth:
            record["ceiling_tokens_per_s"] = bandwidth * 1e12 / per_gpu
            record["ceiling_note"] = ("one stream's decode ceiling: HBM bandwidth (datasheet) / weight bytes each GPU "
                                      "reads per token; ignores KV-cache reads, kernel and communication time")
    startup_timeout = max(60.0, deadline - time.monotonic() - 60.0)
    try:
        config = server_config(spec, args.model, gpu=gpu, dummy=dummy, startup_timeout=startup_timeout, log=log)
    except (TutorialError, OSError, ValueError) as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
        log(f"  FAILED before start: {record['error']}")
        save(record)
        return record
    server = VLLMServer(config)
    phases: list[tuple[float, str]] = []
    launched = time.monotonic()

    def progress(line: str) -> None:
        if "still starting" not in line:       # the helpers' heartbeat is no phase
            phases.append((round(time.monotonic() - launched, 1), line.strip()))
        log(f"    {line.strip()}")

    record["memory_before_mib"] = baseline
    try:
        server.start(progress=progress)
        record["startup_s"] = round(time.monotonic() - launched, 1)
        record["command_line"] = server.config.command_line()
        record["environment"] = recorded_environment(server.config.environment())
        record["phases"] = phases
        record["vllm_version_served"] = server.version()
        record["memory_after_start_mib"] = gpu_memory()
        record["log_timings"] = log_timings(server.log_text())
        record["status"] = "measuring"
        save(record)
        log(f"  ready in {record['startup_s']:.0f} s; GPU memory {record['memory_after_start_mib']}")

        def on_step(key, value):
            record[key] = value
            save(record)

        measured = measure(server.endpoint, streams=args.streams, max_tokens=args.max_tokens, turns=args.turns,
                           single_tokens=args.single_tokens, load_limit=args.load_limit,
                           deadline=deadline - 45, extra_body=args.extra_body, on_step=on_step, log=log,
                           check=lambda: _check_alive(server))
        record.update(measured)
        done = [load.get("completed", 0) for load in measured["loads"]] + [measured["single_stream"]["completed"]]
        record["status"] = "ok" if all(done) else "incomplete: a load completed no request"
    except ServerStartError as err:
        record.update(status="failed to start", error=str(err).split("\n--- last lines")[0], cause=err.cause,
                      startup_s=round(time.monotonic() - launched, 1), phases=phases, log_tail=err.log_tail)
        log(f"  FAILED to start after {record['startup_s']:.0f} s: {record['error'][:400]}")
    except (TutorialError, OSError, RuntimeError, requests.RequestException) as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}"[:4000])
        log(f"  FAILED: {record['error'][:400]}")
    finally:
        record.setdefault("command_line", server.config.command_line() if server.config.port else None)
        record.setdefault("environment", recorded_environment(server.config.environment()))
        if server.log_path is not None:
            record["log_path"] = str(server.log_path)
            if "log_timings" not in record:
                record["log_timings"] = log_timings(server.log_text())
            if args.keep_logs:
                keep_log(server.log_path, Path(args.keep_logs) / f"{spec.name}.log.gz")
        if server.alive:
            stop = server.stop()
            record["stop"] = str(stop)
            log(f"  {stop}")
        after, back, waited = wait_memory_back(baseline)
        record.update(memory_after_stop_mib=after, memory_back_to_baseline=back, memory_wait_s=round(waited, 1))
        if baseline is not None:
            log(f"  GPU memory after stop: {after} ({'back to baseline' if back else 'NOT back to baseline'}"
                f" after {waited:.0f} s)")
        save(record)
    return record


def _check_alive(server: VLLMServer) -> None:
    if not server.alive or not server.health():
        raise ServerDiedError(f"the server died while it was measured; last log lines:\n{server.tail(25)}")


def keep_log(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


# --------------------------------------------------------------------------- results
def write_json(path: Path, data: dict) -> None:
    """Write atomically: a run killed mid-write keeps the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _rate(x) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 100 else f"{x:,.0f}")


def _mem(reading: dict | None) -> str:
    return "-" if not reading else "/".join(f"{v:,}" for _, v in sorted(reading.items()))


def configs_table(results: dict) -> str:
    """One row per configuration: start-up, memory, one stream against its ceiling."""
    lines = [f"{'config':<11}{'status':<18}{'start s':>8}  {'GPU MiB after start':<22}{'1 stream tok/s':>15}"
             f"{'ceiling':>9}  {'memory after stop':<18}"]
    for rec in results.get("configs", []):
        single = (rec.get("single_stream") or {}).get("decode_tokens_per_s_p50")
        back = rec.get("memory_back_to_baseline")
        after = "-" if rec.get("memory_after_stop_mib") is None else (
            "back" if back else f"NOT back: {_mem(rec.get('memory_after_stop_mib'))}")
        lines.append(f"{rec['name']:<11}{rec.get('status', '-'):<18}{_f(rec.get('startup_s'), '.0f'):>8}  "
                     f"{_mem(rec.get('memory_after_start_mib')):<22}{_rate(single):>15}"
                     f"{_f(rec.get('ceiling_tokens_per_s'), ',.0f'):>9}  {after:<18}")
    return "\n".join(lines)


def loads_table(results: dict) -> str:
    """One row per configuration and number of streams."""
    lines = [f"{'config':<11}{'streams':>8}{'done':>6}{'failed':>7}{'TTFT p50':>10}{'TTFT p95':>10}"
             f"{'total tok/s':>13}{'per stream':>12}  errors"]
    for rec in results.get("configs", []):
        for load in rec.get("loads", []):
            if "skipped" in load:
                lines.append(f"{rec['name']:<11}{load['users']:>8}  skipped: {load['skipped']}")
                continue
            errors = ", ".join(f"{k}: {n}" for k, n in (load.get("errors") or {}).items()) or "-"
            lines.append(f"{rec['name']:<11}{load['users']:>8}{load['completed']:>6}{load['failed']:>7}"
                         f"{_f(load.get('ttft_p50_s'), '.3f'):>10}{_f(load.get('ttft_p95_s'), '.3f'):>10}"
                         f"{_rate(load.get('tokens_per_s')):>13}{_rate(load.get('decode_tokens_per_s_p50')):>12}"
                         f"  {errors}")
    lines.append("TTFT in s, nearest-rank percentiles over completed requests; total = completion tokens / wall "
                 "time; per stream = median decode tokens/s after the first token")
    return "\n".join(lines)


def report(results: dict) -> str:
    device = results.get("device", {})
    v = results.get("versions", {})
    head = (f"{device.get('count') or 0} x {device.get('name') or 'no GPU'} (driver {device.get('driver') or '-'}); "
            f"torch {v.get('torch')}, vLLM {v.get('vllm')}, NCCL {v.get('nccl')}; {results.get('date')}")
    parts = [head, configs_table(results), "", loads_table(results)]
    ceiling = results.get("bandwidth", {})
    if ceiling.get("note"):
        parts += ["", ceiling["note"]]
    return "\n".join(parts)


def merge(paths: list[Path]) -> dict:
    """Several result files as one: the first file's machine, every configuration (a later file's
    configuration of the same name replaces an earlier one); differing machines are noted."""
    merged: dict | None = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = {**data, "configs": [], "merged_from": []}
        elif (data.get("device", {}).get("names"), data.get("versions")) != \
                (merged.get("device", {}).get("names"), merged.get("versions")):
            merged.setdefault("warnings", []).append(f"{path}: another device or other versions than {paths[0]}")
        merged["merged_from"].append(str(path))
        names = {c["name"] for c in data.get("configs", [])}
        merged["configs"] = [c for c in merged["configs"] if c["name"] not in names] + data.get("configs", [])
    if merged is None:
        raise SystemExit("nothing to merge")
    return merged


# --------------------------------------------------------------------------- main
def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("each number must be at least 1")
    return values


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {unknown}; known: {', '.join(SPECS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="configurations:\n" + "\n".join(f"  {s.name:<10} {s.describe}"
                                                                           for s in SPECS.values()))
    parser.add_argument("--model", help="a model folder (config.json + tokenizer; without weights it is served "
                                        "with --load-format dummy). Default: the embedded model (--cpu-smoke only)")
    parser.add_argument("--configs", type=_configs, default=DEFAULT_CONFIGS, help="comma-separated, in order "
                        f"(default {','.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--streams", type=_csv_ints, default=(1, 8, 32, 128),
                        help="concurrent streams (default 1,8,32,128)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per answer, with ignore_eos (default 256)")
    parser.add_argument("--turns", type=int, default=2, help="requests per stream, each follow-up carrying the "
                                                             "previous answer (default 2)")
    parser.add_argument("--single-tokens", type=int, default=512,
                        help="tokens of the one-stream decode test (default 512)")
    parser.add_argument("--load-limit", type=float, default=90.0, help="hard limit of each load, s (default 90)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds this run may take; a configuration that would not fit is skipped (default 540)")
    parser.add_argument("--allowed-token-ids", type=int, default=0, metavar="N",
                        help="ask for tokens 0..N-1 only (vLLM's allowed_token_ids, at most 1024 on 0.26.0): for a "
                             "tokenizer smaller than the model's vocabulary; --make-model's needs none")
    parser.add_argument("--out", help="results JSON (default benchmarks/results/parallel-<device>-<date>.json)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy each server's log there, gzipped (<config>.log.gz)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="on this CPU machine: the embedded model, one config, 1 and 2 streams, tiny numbers")
    parser.add_argument("--make-model", metavar="DIR",
                        help="write a Qwen2-7B-Instruct-shaped folder without weights, then exit")
    parser.add_argument("--tiny", action="store_true",
                        help="with --make-model: a tiny model of the same vocabulary (CPU tests)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files (print; write with --out)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        defaults = dict(configs=("one",), streams=(1, 2), max_tokens=8, single_tokens=16, turns=2, load_limit=120.0,
                        budget=900.0)
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.extra_body = ({"allowed_token_ids": list(range(args.allowed_token_ids))} if args.allowed_token_ids else None)
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:  # pragma: no cover
        pass
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.make_model:
        folder = make_model(Path(args.make_model), tiny=args.tiny)
        log(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        return 0
    if args.merge:
        merged = merge([Path(p) for p in args.merge])
        print(report(merged))
        if args.out:
            write_json(Path(args.out), merged)
            log(f"\nwrote {args.out}")
        return 0

    previous = signal.signal(signal.SIGTERM, _interrupt)   # `timeout` sends SIGTERM: stop the server, keep results
    try:
        return _run(args, log)
    finally:
        signal.signal(signal.SIGTERM, previous)


def device_slug(device: dict) -> str:
    """``2xH200``, ``1xH100-80GB-HBM3``: for the results file's name."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", (device.get("name") or "").replace("NVIDIA ", "")).strip("-")
    return f"{device.get('count', 0)}x{name}" if name else "cpu"


def _run(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    started = time.monotonic()
    deadline = started + args.budget
    os.environ.update(MULTICAST_OFF)        # every child, servers included, inherits it
    device = device_info()
    gpu = device["count"] > 0
    if not gpu and not args.cpu_smoke:
        log("No GPU here (nvidia-smi lists none). This benchmark is for a GPU machine; "
            "--cpu-smoke runs the same code on this CPU with tiny numbers.")
        return 2
    if gpu and not args.model:
        log("Give --model: a folder with Qwen2-7B-Instruct's config.json and a tokenizer "
            "(python benchmarks/parallel.py --make-model /tmp/qwen2-7b makes one).")
        return 2
    model = args.model or "embedded"
    model_dir = Path(args.model).expanduser().resolve() if args.model else None
    args.model = str(model_dir) if model_dir is not None else "embedded"
    dummy = model_dir is not None and not has_weights(model_dir)
    log(f"device: {device.get('count')} x {device.get('name') or 'CPU'}, driver {device.get('driver')}")
    vers = versions()
    log(f"versions: torch {vers['torch']} (CUDA {vers['torch_cuda']}), NCCL {vers['nccl']} "
        f"(torch's wheel asks for {vers['nccl_pinned_by_torch']}), vLLM {vers['vllm']}")

    if model_dir is not None:
        model_config = json.loads((model_dir / "config.json").read_text())
    else:
        from helpers.server.embedded_model import ensure_embedded_model
        model_config = json.loads((ensure_embedded_model(log=log) / "config.json").read_text())
    params = model_parameters(model_config)
    bytes_per_param = dtype_bytes("half" if gpu else "auto", model_config)
    bandwidth, source = bandwidth_for(device.get("name"))
    note = None
    if params:
        per_token = params["read_per_token"] * bytes_per_param
        log(f"model: {params['total'] / 1e9:.2f} B parameters; one decoded token reads "
            f"{per_token / 1e9:.2f} GB of weights ({bytes_per_param} bytes each){' (dummy weights)' if dummy else ''}")
        if bandwidth:
            note = (f"ceiling of one stream's decode = weight bytes per GPU / HBM bandwidth: "
                    f"{per_token / 1e9:.2f} GB / "
                    f"{bandwidth} TB/s = {per_token / (bandwidth * 1e12) * 1e3:.2f} ms a token -> at most "
                    f"{bandwidth * 1e12 / per_token:,.0f} tokens/s on one GPU, twice that with tensor parallel 2 "
                    f"(each GPU reads half); {source}, a datasheet figure, not measured here")
            log(note)

    stamp = datetime.now(timezone.utc)
    slug = "cpu-smoke" if not gpu else device_slug(device)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"parallel-{slug}-{stamp:%Y%m%d-%H%M}.json"
    results: dict[str, Any] = {
        "benchmark": "benchmarks/parallel.py", "schema": 1, "date": stamp.isoformat(timespec="seconds"),
        "host": platform.node(), "device": device, "versions": vers, "environment": recorded_environment(),
        "model": {"path": model if model_dir is None else str(model_dir),
                  "served_model_name": SERVED_NAME if gpu else None,
                  "weights": "dummy (random, the right shape)" if dummy else "files", "config": model_config,
                  "parameters": params, "bytes_per_parameter": bytes_per_param},
        "bandwidth": {"hbm_tb_per_s": bandwidth, "source": source, "note": note},
        "options": {k: getattr(args, k) for k in ("configs", "streams", "max_tokens", "turns", "single_tokens",
                                                   "load_limit", "budget", "extra_body", "cpu_smoke")},
        "notes": ["the servers run `python -m vllm.entrypoints.openai.api_server` (the helpers' form): one API "
                  "server process, also with --data-parallel-size 2 (`vllm serve` would start one per engine)",
                  "every load sends ignore_eos, temperature 0; each stream is a conversation of `turns` requests"],
        "configs": [],
    }
    write_json(out, results)
    log(f"results: {out}")
    baseline = gpu_memory()
    if baseline is not None:
        log(f"GPU memory before: {baseline} MiB")

    try:
        for name in args.configs:
            spec = SPECS[name]
            left = deadline - time.monotonic()
            what = spec.describe if gpu else "the CPU backend (the helpers' CPU flags)"
            log(f"\n== {name}: {what} ({left:.0f} s of the budget left)")
            if gpu and spec.gpus > device["count"]:
                results["configs"].append({"name": name, "describe": spec.describe, "status": "skipped",
                                           "error": f"needs {spec.gpus} GPUs, this machine has {device['count']}"})
                log(f"  skipped: needs {spec.gpus} GPUs")
                write_json(out, results)
                continue
            need = (spec.start_estimate_s if gpu else 120.0) + 60.0
            if left < need:
                results["configs"].append({"name": name, "describe": spec.describe, "status": "skipped",
                                           "error": f"time budget: {left:.0f} s left, about {need:.0f} s needed"})
                log(f"  skipped: {left:.0f} s left, about {need:.0f} s needed (run it in another call)")
                write_json(out, results)
                continue
            slot = len(results["configs"])
            results["configs"].append({"name": name, "status": "starting"})

            def save(record, slot=slot):
                results["configs"][slot] = record
                write_json(out, results)

            run_config(spec, args, gpu=gpu, dummy=dummy, params=params, bytes_per_param=bytes_per_param,
                       bandwidth=bandwidth, baseline=baseline, deadline=deadline, save=save, log=log)
    except KeyboardInterrupt:
        results["interrupted"] = f"after {time.monotonic() - started:.0f} s"
        log("\ninterrupted: the server was stopped; results so far are kept")
    finally:
        results["wall_s"] = round(time.monotonic() - started, 1)
        write_json(out, results)
    print("\n" + report(results), flush=True)
    log(f"\nwrote {out}")
    failed = [c["name"] for c in results["configs"] if c.get("status") not in ("ok", "skipped")]
    return 1 if failed or results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
