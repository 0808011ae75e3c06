"""`vllm bench serve` and this package's load generator on the same server, side by side.

    .venv/bin/python benchmarks/two_tools.py [--out benchmarks/results/two-tools-cpu-DATE.json]

One server of the walkthrough's settings (the embedded model on a CPU), then for 1 and 4
concurrent streams: ``vllm bench serve`` (random prompts of 32 tokens, 64 output tokens,
``--ignore-eos``, 4 requests per stream, a new ``--seed`` each run) and ``helpers.loadtest``
(as many simulated users, each a conversation of 4 requests, 64 tokens each, ``ignore_eos``).
Both report output tokens per second over the run, the median time to first token and the
median time per output token (the load generator: 1 / its median decode speed). Their prompts
differ (random tokens against short chat questions with a system prompt), so time to first token
is compared loosely; the output side is the same length in both.

The notebooks use ``vllm bench serve`` for every throughput and latency figure; the load
generator stays for what it alone does (notebook 08: one key per student through the class
gateway, revocation and Stop mid-stream). This file says what each gives on one server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_fit  # noqa: E402  (the `vllm bench serve` argv for this build)
import parallel  # noqa: E402  (the versions record)
from helpers.loadtest import run_load  # noqa: E402
from helpers.server.config import from_settings  # noqa: E402
from helpers.server.lifecycle import VLLMServer  # noqa: E402

STREAMS = (1, 4)
PER_STREAM = 4
TOKENS = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="two-tools-"))
    with VLLMServer(from_settings()).start(progress=lambda *a, **k: None) as server:
        key = server.endpoint.api_key or "EMPTY"
        model = Path(server.config.model).name
        for seed, streams in enumerate(STREAMS, start=1):
            command = gpu_fit.bench_entry() + [
                "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", server.url,
                "--model", server.name, "--tokenizer", server.config.model, "--dataset-name", "random",
                "--random-input-len", "32", "--random-output-len", str(TOKENS), "--ignore-eos",
                "--num-prompts", str(PER_STREAM * streams), "--max-concurrency", str(streams), "--seed", str(seed),
                "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50",
                "--save-result", "--result-dir", str(folder), "--result-filename", f"bench-{streams}.json"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                  env={**os.environ, "OPENAI_API_KEY": key})
            if done.returncode != 0:
                sys.exit(f"vllm bench serve failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            bench = json.loads((folder / f"bench-{streams}.json").read_text())
            load = run_load(server, streams, turns=PER_STREAM, max_tokens=TOKENS, ignore_eos=True,
                            duration_limit=600, progress=None)
            decode = load.decode_tokens_per_s_p50
            rows.append({
                "streams": streams,
                "vllm_bench_serve": {"requests": bench["completed"], "output_tokens_per_s": bench["output_throughput"],
                                     "ttft_p50_ms": bench["median_ttft_ms"], "tpot_p50_ms": bench["median_tpot_ms"]},
                "helpers_loadtest": {"requests": len(load.completed), "output_tokens_per_s": load.tokens_per_s,
                                     "ttft_p50_ms": load.ttft_p50 * 1000 if load.ttft_p50 is not None else None,
                                     "tpot_p50_ms": 1000 / decode if decode else None},
            })
    print(f"{'streams':>7}  {'tool':<18}{'requests':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}")
    for row in rows:
        for tool in ("vllm_bench_serve", "helpers_loadtest"):
            r = row[tool]
            print(f"{row['streams']:>7}  {tool:<18}{r['requests']:>9}{r['output_tokens_per_s']:>11.1f}"
                  f"{r['ttft_p50_ms']:>8.0f}ms{r['tpot_p50_ms']:>8.1f}ms")
        ratio = row["helpers_loadtest"]["output_tokens_per_s"] / row["vllm_bench_serve"]["output_tokens_per_s"]
        print(f"{'':>7}  load generator / vllm bench serve, output tokens/s: {ratio:.2f}")
    if args.out:
        args.out.write_text(json.dumps({
            "what": "benchmarks/two_tools.py", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count()}, "versions": parallel.versions(), "model": model,
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
