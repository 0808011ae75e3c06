"""Is NCCL healthy on this machine? Two processes, one GPU each, all-reduce through NCCL.

    python benchmarks/nccl_check.py                   # 1 GiB all-reduce, 20 timed rounds
    python benchmarks/nccl_check.py --size-mib 256 --iters 50
    python benchmarks/nccl_check.py --gloo            # the same code on this CPU (gloo), to test the script

The classic check before tensor parallelism (the origin pinned ``nvidia-nccl-cu12`` for it):

1. versions: torch, its CUDA, the NCCL torch runs (``torch.cuda.nccl.version()``), the NCCL
   package torch's wheel declares (``importlib.metadata.requires("torch")``) and the one installed;
2. two processes (``torch.multiprocessing``), ``torch.distributed`` over NCCL with
   ``NCCL_DEBUG=INFO`` written to a file per process: an all-reduce whose result is checked,
   then a 1 GiB float32 all-reduce timed over ``--iters`` rounds;
3. the transports NCCL chose between the two GPUs (its ``... via P2P/...`` lines: P2P over
   NVLink or PCIe, SHM through host memory, NET), and the bandwidth: algorithm bandwidth
   (bytes / time) and bus bandwidth (algorithm x 2(n-1)/n, as nccl-tests reports it).

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and friends, as the GPU machine requires).
With fewer than two GPUs it says so and exits 0. Exit status 1: the all-reduce gave a wrong
result, failed, or did not finish within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections import Counter
from importlib import metadata

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WORLD = 2


def versions() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": None, "nccl_pinned_by_torch": None,
            "nccl_installed": None}
    if torch.version.cuda:
        try:
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as err:  # noqa: BLE001 (a broken NCCL is what this script looks for)
            info["nccl"] = f"unreadable: {err}"
    try:
        pinned = [r.split(";")[0].strip() for r in metadata.requires("torch") or []
                  if r.lower().startswith("nvidia-nccl")]
        info["nccl_pinned_by_torch"] = ", ".join(pinned) or None
    except metadata.PackageNotFoundError:
        pass
    installed = []
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-nccl"):
            installed.append(f"{name}=={dist.version}")
    info["nccl_installed"] = ", ".join(sorted(set(installed))) or None
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, size_bytes: int, iters: int, backend: str, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        sync = torch.cuda.synchronize
    else:
        device = torch.device("cpu")
        sync = lambda: None  # noqa: E731
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, **kwargs)
    try:
        check = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(check)
        expected = float(sum(range(1, WORLD + 1)))
        correct = torch.tensor([float(torch.all(check == expected).item())], device=device)
        dist.all_reduce(correct, op=dist.ReduceOp.MIN)        # right on every rank
        buf = torch.zeros(size_bytes // 4, dtype=torch.float32, device=device)
        for _ in range(3):                       # warm-up: connections, buffers
            dist.all_reduce(buf)
        sync()
        dist.barrier()
        started = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        sync()
        seconds = torch.tensor([(time.perf_counter() - started) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)       # the slowest rank's time
        if rank == 0:
            with open(os.path.join(outdir, "result.json"), "w") as f:
                json.dump({"correct": correct.item() == 1.0, "seconds": seconds.item(), "size_bytes": buf.numel() * 4,
                           "iters": iters, "backend": backend}, f)
    finally:
        dist.destroy_process_group()


def nccl_lines(outdir: str) -> list[str]:
    lines: list[str] = []
    for path in sorted(glob.glob(os.path.join(outdir, "nccl.*.log"))):
        with open(path, errors="replace") as f:
            lines += [line.rstrip() for line in f]
    return lines


def summarize_transports(lines: list[str]) -> Counter:
    """``Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read`` -> Counter({"P2P/CUMEM/read": n})."""
    return Counter(m.group(1) for line in lines for m in [re.search(r"\bvia (\S+)", line)] if m)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=None, help="all-reduce size (default 1024; 64 with --gloo)")
    parser.add_argument("--iters", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds (default 240)")
    parser.add_argument("--gloo", action="store_true", help="gloo on the CPU instead of NCCL (tests this script)")
    args = parser.parse_args(argv)
    backend = "gloo" if args.gloo else "nccl"
    size_mib = args.size_mib or (64 if args.gloo else 1024)

    import torch
    import torch.multiprocessing as mp

    info = versions()
    print(f"torch {info['torch']} (CUDA {info['cuda']}); NCCL torch runs: {info['nccl']}; "
          f"NCCL torch's wheel asks for: {info['nccl_pinned_by_torch']}; installed: {info['nccl_installed']}",
          flush=True)
    if backend == "nccl":
        count = torch.cuda.device_count() if torch.version.cuda else 0
        if count < WORLD:
            print(f"{count} GPU(s) here: an NCCL check needs {WORLD}; nothing to check.", flush=True)
            return 0
        print(f"{count} GPUs: {', '.join(torch.cuda.get_device_name(i) for i in range(WORLD))} (using 0 and 1)",
              flush=True)

    outdir = tempfile.mkdtemp(prefix="nccl-check-")
    os.environ.update(MULTICAST_OFF)
    os.environ.update({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,P2P,SHM,NET,ENV",
                       "NCCL_DEBUG_FILE": os.path.join(outdir, "nccl.%h.%p.log")})
    started = time.monotonic()
    context = mp.start_processes(worker, args=(free_port(), size_mib << 20, args.iters, backend, outdir),
                                 nprocs=WORLD, join=False, start_method="spawn")
    failure = None
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() - started > args.timeout:
                failure = f"the all-reduce did not finish within {args.timeout:.0f} s (a hang: see the NCCL lines)"
                break
    except Exception as err:  # noqa: BLE001 (a worker's exception, re-raised by join)
        failure = f"a worker failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(10)

    lines = nccl_lines(outdir)
    transports = summarize_transports(lines)
    if backend == "nccl":
        print(f"\nNCCL's own lines ({len(lines)} in {outdir}):", flush=True)
        for line in [l for l in lines if re.search(r"NCCL version|NVLS|via |Init COMPLETE|Using network", l)][:12]:
            print("  " + line.split(" NCCL INFO ", 1)[-1][:160])
        print("transports NCCL chose: " + (", ".join(f"{t} ({n} channel(s))" for t, n in transports.items())
                                         or "none found in the log"))
    result_path = os.path.join(outdir, "result.json")
    if failure or not os.path.exists(result_path):
        print(f"\nNOT HEALTHY: {failure or 'no result came back'}", flush=True)
        return 1
    with open(result_path) as f:
        result = json.load(f)
    algbw = result["size_bytes"] / result["seconds"] / 1e9
    busbw = algbw * 2 * (WORLD - 1) / WORLD
    print(f"\nall-reduce of {result['size_bytes'] / 2**30:.3g} GiB float32 across {WORLD} "
          f"{'GPUs' if backend == 'nccl' else 'CPU processes (gloo)'}: {result['seconds'] * 1e3:.2f} ms a round "
          f"(slowest rank, {result['iters']} rounds); algorithm bandwidth {algbw:.1f} GB/s, bus bandwidth "
          f"{busbw:.1f} GB/s (algorithm x 2(n-1)/n, as nccl-tests reports)", flush=True)
    if not result["correct"]:
        print("NOT HEALTHY: the all-reduce gave a wrong sum", flush=True)
        return 1
    print("healthy: the all-reduce's sum was right on both ranks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
