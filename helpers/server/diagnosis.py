"""Read a vLLM log and name why the server failed, with what to do about it.

Each rule is a pattern seen in a real vLLM log (the tests hold those lines) and the advice a
learner needs. The first rule that matches, searching from the end of the log, wins: the last
error is the one that stopped the server. ``FATAL_RULES`` are the generic signs that a start
has failed (a worker died, the engine core gave up, a CUDA error): they name the cause only
when no specific rule does, and the server manager watches for them while a server starts, so a
start whose API server stays alive after its engine died (seen with tensor parallelism on two
GPUs) fails within seconds instead of at the timeout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern
    advice: str


def _rule(name: str, pattern: str, advice: str) -> Rule:
    return Rule(name, re.compile(pattern, re.IGNORECASE), advice)


RULES = (
    _rule("model not found",
          r"Invalid repository ID or local directory specified|Repository Not Found|"
          r"does not appear to have a file named config\.json|No such file or directory: '[^']*config\.json'",
          "vLLM could not find a model there: check the path (the folder that holds config.json) "
          "or the hub id."),
    _rule("port in use",
          r"Address already in use|\[Errno 98\]",
          "another program already listens on that port: leave port unset to get a free one, "
          "or stop the other server (./tutorial.sh status lists the tutorial's own)."),
    _rule("unsupported dtype",
          r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0[^\n]*",
          "this GPU has no bfloat16 (compute capability below 8.0, e.g. T4, V100): serve with "
          "dtype='half', as the origin's --dtype=half does (dtype='auto' in the helpers picks it)."),
    _rule("memory held by another process",
          r"(?:Free|Available) memory on (?:device|node)[^\n]*on startup is less than desired "
          r"(?:GPU|CPU) memory utilization[^\n]*",
          "another process holds the memory this server planned to take: often a second vLLM "
          "server on the same device, or the orphaned engine of a killed one. Stop it "
          "(./tutorial.sh status, ./tutorial.sh stop), or lower --gpu-memory-utilization so "
          "that several servers share the device."),
    _rule("out of memory",
          r"No available memory for the cache blocks|CUDA out of memory|OutOfMemoryError|"
          r"larger than the available KV cache memory|Cannot allocate memory|"
          r"not enough (?:memory|KV cache)|is less than requested memory for kv",
          "the weights plus the KV cache do not fit: lower max_model_len, raise "
          "--gpu-memory-utilization a little, use more GPUs (tensor_parallel_size), or on the CPU "
          "lower VLLM_CPU_KVCACHE_SPACE."),
    _rule("max_model_len too large",
          r"max_model_len[^\n]*(?:greater than|exceeds)[^\n]*|User-specified max_model_len[^\n]*",
          "the requested context is longer than the model supports: lower max_model_len."),
    _rule("tensor parallel size",
          r"(?:attention heads|num_attention_heads)[^\n]*divisible by tensor parallel size[^\n]*|"
          r"tensor_parallel_size[^\n]*(?:greater than|exceeds|larger than)[^\n]*available[^\n]*",
          "tensor_parallel_size must divide the model's attention heads and not exceed the GPU count."),
    _rule("NCCL",
          r"NCCL error[^\n]*|ncclInternalError|ncclUnhandledCudaError|ncclSystemError",
          "multi-GPU communication failed: check that torch's own nvidia-nccl-cu12 is installed "
          "(do not pin another), and on consumer GPUs try NCCL_P2P_DISABLE=1."),
    _rule("bad argument",
          r"error: unrecognized arguments:[^\n]*|error: argument [^\n]*",
          "vLLM rejected a command-line argument: check extra_args against `vllm serve --help`."),
    _rule("vLLM not installed",
          r"No module named '?vllm'?",
          "this Python has no vLLM: run the set-up (./tutorial.sh setup)."),
)


# Generic: the start has failed, whatever the root cause (which a rule above may name).
FATAL_RULES = (
    _rule("a worker died",
          r"Worker proc \S+ died unexpectedly[^\n]*|WorkerProc initialization failed[^\n]*",
          "a vLLM worker process ended during start-up: the lines above it in the log say why "
          "(often memory, a CUDA error, or a killed process)."),
    _rule("CUDA error",
          r"CUDA error[^\n]*|CUBLAS_STATUS_[A-Z_]+[^\n]*|an illegal memory access[^\n]*",
          "a GPU kernel failed. With tensor parallelism on Hopper GPUs and vLLM 0.25-0.26 this is "
          "the all-reduce + RMSNorm fusion (see notebook 06): start with "
          "VLLM_ALLREDUCE_USE_FLASHINFER=0 and -cc.pass_config.fuse_allreduce_rms=False, or "
          "--enforce-eager."),
    _rule("engine core failed",
          r"EngineCore (?:failed to start|encountered a fatal error)[^\n]*|"
          r"Engine core initialization failed[^\n]*|EngineDeadError[^\n]*",
          "vLLM's engine core stopped: the first ERROR lines of the log name the root cause."),
)


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    evidence: str
    advice: str

    def __str__(self) -> str:
        return f"{self.cause}: {self.evidence.strip()}\n  what to do: {self.advice}"


def _search(lines: list[str], rules: tuple[Rule, ...]) -> Diagnosis | None:
    for line in reversed(lines):
        for rule in rules:
            match = rule.pattern.search(line)
            if match:
                # Quote the matched text with a little context: long lines lose their ends, not it.
                begin = max(0, match.start() - 80)
                evidence = line[begin:match.end() + 240].strip()
                return Diagnosis(rule.name, evidence, rule.advice)
    return None


def diagnose(log_text: str, exit_code: int | None = None) -> Diagnosis | None:
    """The named cause of a failed start, or None when no rule recognises the log."""
    lines = log_text.splitlines()
    found = _search(lines, RULES) or _search(lines, FATAL_RULES)
    if found:
        return found
    if exit_code is not None and exit_code in (-9, 137):
        return Diagnosis("killed", f"the server was killed with SIGKILL (exit code {exit_code})",
                         "often the system's out-of-memory killer: give the server less memory to "
                         "use, or free memory on the machine.")
    return None


def fatal_sign(log_text: str) -> Diagnosis | None:
    """A line that says the start has failed (``FATAL_RULES``), or None."""
    return _search(log_text.splitlines(), FATAL_RULES)


# Start-up phases, in order, as vLLM logs them; a waiting cell prints each one it reaches.
PHASES = (
    ("non-default args", "arguments parsed, reading the model's config"),
    ("Initializing a V1 LLM engine", "engine core process started"),
    ("Starting to load model", "loading weights"),
    ("Loading weights took", "weights loaded, sizing the KV cache"),
    ("init engine (profile, create kv cache", "KV cache allocated"),
    ("Capturing CUDA graph", "capturing CUDA graphs"),
    ("Starting vLLM server on", "HTTP server starting"),
    ("Application startup complete", "HTTP server up"),
)


def phases_reached(log_text: str) -> list[str]:
    """The start-up phases found in the log, in order."""
    return [label for marker, label in PHASES if marker in log_text]
