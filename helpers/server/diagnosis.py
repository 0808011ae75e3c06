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
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern
    advice: str
    name_zh: str            # the cause, in Chinese (docs/troubleshooting.md)
    advice_zh: str
    example: str            # a log line this rule recognises, from a real vLLM log where we have one


def _rule(name: str, pattern: str, advice: str, *, zh: tuple[str, str], example: str) -> Rule:
    return Rule(name, re.compile(pattern, re.IGNORECASE), advice, zh[0], zh[1], example)


RULES = (
    _rule("model not found",
          r"Invalid repository ID or local directory specified|Repository Not Found|"
          r"does not appear to have a file named config\.json|No such file or directory: '[^']*config\.json'",
          "vLLM could not find a model there: check the path (the folder that holds config.json) "
          "or the hub id.",
          zh=("找不到模型", "vLLM 在那里找不到模型：检查路径（应当是包含 config.json 的文件夹）或 hub id。"),
          example="Value error, Invalid repository ID or local directory specified: '/tmp/emptymodel'."),
    _rule("port in use",
          r"Address already in use|\[Errno 98\]",
          "another program already listens on that port: leave port unset to get a free one, "
          "or stop the other server (./tutorial.sh status lists the tutorial's own).",
          zh=("端口被占用", "已有别的程序在监听这个端口：不设置 port，让 helpers 选一个空闲端口；或者停掉那个"
                       "服务（./tutorial.sh status 会列出本教程自己的服务）。"),
          example="OSError: [Errno 98] Address already in use"),
    _rule("unsupported dtype",
          r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0[^\n]*",
          "this GPU has no bfloat16 (compute capability below 8.0, e.g. T4, V100): serve with "
          "dtype='half', as the origin's --dtype=half does (dtype='auto' in the helpers picks it).",
          zh=("不支持的数据类型", "这张 GPU 不支持 bfloat16（计算能力低于 8.0，例如 T4、V100）：用 dtype='half' 部署，"
                            "也就是原文的 --dtype=half（helpers 的 dtype='auto' 会自动选它）。"),
          example="ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. "
                  "Your Tesla T4 GPU has compute capability 7.5."),
    _rule("memory held by another process",
          r"(?:Free|Available) memory on (?:device|node)[^\n]*on startup is less than desired "
          r"(?:GPU|CPU) memory utilization[^\n]*",
          "another process holds the memory this server planned to take: often a second vLLM "
          "server on the same device, or the orphaned engine of a killed one. Stop it "
          "(./tutorial.sh status, ./tutorial.sh stop), or lower --gpu-memory-utilization so "
          "that several servers share the device.",
          zh=("内存被其他进程占用", "另一个进程占用了这个服务计划使用的内存：常见的是同一张卡上的第二个 vLLM 服务，"
                              "或者被杀掉的服务留下的孤儿引擎进程。停掉它（./tutorial.sh status、"
                              "./tutorial.sh stop），或者调低 --gpu-memory-utilization，让几个服务共用这张卡。"),
          example="ValueError: Free memory on device (10.2/79.1 GiB) on startup is less than desired GPU "
                  "memory utilization (0.9, 71.2 GiB)."),
    _rule("out of memory",
          r"No available memory for the cache blocks|CUDA out of memory|OutOfMemoryError|"
          r"larger than the available KV cache memory|Cannot allocate memory|"
          r"not enough (?:memory|KV cache)|is less than requested memory for kv",
          "the weights plus the KV cache do not fit: lower max_model_len, raise "
          "--gpu-memory-utilization a little, use more GPUs (tensor_parallel_size), or on the CPU "
          "lower VLLM_CPU_KVCACHE_SPACE.",
          zh=("内存不足", "权重加上 KV cache 放不下：调低 max_model_len，把 --gpu-memory-utilization 稍微调高，"
                       "使用更多 GPU（tensor_parallel_size）；在 CPU 上则调低 VLLM_CPU_KVCACHE_SPACE。"),
          example="ValueError: Available memory on node 0 (6.14/8.21 GiB) on kv cache allocation is less "
                  "than requested memory for kv (500.0 GiB)."),
    _rule("max_model_len too large",
          r"max_model_len[^\n]*(?:greater than|exceeds)[^\n]*|User-specified max_model_len[^\n]*",
          "the requested context is longer than the model supports: lower max_model_len.",
          zh=("max_model_len 过大", "要求的上下文长度超过了模型支持的长度：调低 max_model_len。"),
          example="Value error, User-specified max_model_len (100000) is greater than the derived "
                  "max_model_len (max_position_embeddings=8192.0 or model_max_length=None in model's config.json)."),
    _rule("tensor parallel size",
          r"(?:attention heads|num_attention_heads)[^\n]*divisible by tensor parallel size[^\n]*|"
          r"tensor_parallel_size[^\n]*(?:greater than|exceeds|larger than)[^\n]*available[^\n]*",
          "tensor_parallel_size must divide the model's attention heads and not exceed the GPU count.",
          zh=("张量并行数不合适", "tensor_parallel_size 必须能整除模型的注意力头数，并且不能超过 GPU 数量。"),
          example="ValueError: Total number of attention heads (28) must be divisible by tensor parallel size (3)."),
    _rule("NCCL",
          r"NCCL error[^\n]*|ncclInternalError|ncclUnhandledCudaError|ncclSystemError",
          "multi-GPU communication failed: check that the NCCL package torch declares is the one "
          "installed (do not pin another; notebook 00), and on consumer GPUs try NCCL_P2P_DISABLE=1.",
          zh=("NCCL 通信失败", "多卡之间的通信失败：检查已安装的 NCCL 是否就是 torch 声明的版本（不要固定成别的版本，"
                            "见 notebook 00）；在消费级显卡上可以试试 NCCL_P2P_DISABLE=1。"),
          example="RuntimeError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, "
                  "unhandled system error"),
    _rule("bad argument",
          r"error: unrecognized arguments:[^\n]*|error: argument [^\n]*",
          "vLLM rejected a command-line argument: check extra_args against `vllm serve --help`.",
          zh=("参数错误", "vLLM 拒绝了某个命令行参数：对照 `vllm serve --help` 检查 extra_args。"),
          example="api_server.py: error: unrecognized arguments: --no-such-flag"),
    _rule("vLLM not installed",
          r"No module named '?vllm'?",
          "this Python has no vLLM: run the set-up (./tutorial.sh setup).",
          zh=("没有安装 vLLM", "这个 Python 环境里没有 vLLM：运行安装脚本（./tutorial.sh setup）。"),
          example="ModuleNotFoundError: No module named 'vllm'"),
)


# Generic: the start has failed, whatever the root cause (which a rule above may name).
FATAL_RULES = (
    _rule("a worker died",
          r"Worker proc \S+ died unexpectedly[^\n]*|WorkerProc initialization failed[^\n]*",
          "a vLLM worker process ended during start-up: the lines above it in the log say why "
          "(often memory, a CUDA error, or a killed process).",
          zh=("worker 进程退出", "一个 vLLM worker 进程在启动过程中退出了：日志里它上面的几行会说明原因"
                                "（常见的是内存、CUDA 错误，或者进程被杀）。"),
          example="ERROR 11-28 02:38:53 [multiproc_executor.py:315] Worker proc VllmWorker-0 died "
                  "unexpectedly (exit code: -9), shutting down executor."),
    _rule("CUDA error",
          r"CUDA error[^\n]*|CUBLAS_STATUS_[A-Z_]+[^\n]*|an illegal memory access[^\n]*",
          "a GPU kernel failed. With tensor parallelism, vLLM 0.25-0.26 and GPUs without NVLink "
          "multicast, this is most likely the all-reduce + RMSNorm fusion, which those releases turn "
          "on by default on Hopper and Blackwell GPUs (vllm#48071, notebook 07): start with "
          "-cc.pass_config.fuse_allreduce_rms=false, or --enforce-eager.",
          zh=("CUDA 错误", "某个 GPU kernel 出错了。用 vLLM 0.25–0.26 做张量并行、而 GPU 之间没有 NVLink 多播时，"
                          "多半是 all-reduce + RMSNorm 融合的问题：这两个版本在 Hopper 和 Blackwell GPU 上默认打开它"
                          "（vllm#48071，见 notebook 07）。启动时加上 -cc.pass_config.fuse_allreduce_rms=false，"
                          "或者用 --enforce-eager。"),
          example="RuntimeError: CUDA error: an illegal memory access was encountered"),
    _rule("engine core failed",
          r"EngineCore (?:failed to start|encountered a fatal error)[^\n]*|"
          r"Engine core initialization failed[^\n]*|EngineDeadError[^\n]*",
          "vLLM's engine core stopped: the first ERROR lines of the log name the root cause.",
          zh=("engine core 失败", "vLLM 的 engine core 停止了：日志里最早的几行 ERROR 会指出根本原因。"),
          example="ERROR 11-28 02:38:53 [core.py:1512] EngineCore encountered a fatal error."),
)


@dataclass(frozen=True)
class Diagnosis:
    cause: str
    evidence: str
    advice: str

    def __str__(self) -> str:
        return f"{self.cause}: {self.evidence.strip()}\n  what to do: {self.advice}"


def _search(lines: list[str], rules: tuple[Rule, ...], last: bool = True) -> Diagnosis | None:
    for line in (reversed(lines) if last else lines):
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
    # The last specific error stopped the server; of the generic signs, the first is nearest
    # the root cause (a worker dies, then the engine core, then the API server reports it).
    found = _search(lines, RULES) or _search(lines, FATAL_RULES, last=False)
    if found:
        return found
    if exit_code is not None and exit_code in (-9, 137):
        return Diagnosis("killed", f"the server was killed with SIGKILL (exit code {exit_code})",
                         "often the system's out-of-memory killer: give the server less memory to "
                         "use, or free memory on the machine.")
    return None


def fatal_sign(log_text: str) -> Diagnosis | None:
    """A line that says the start has failed (``FATAL_RULES``), or None."""
    return _search(log_text.splitlines(), FATAL_RULES, last=False)


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


# A process gone with no fatal line in the log: a signal ended it, most often the kernel's
# out-of-memory killer.
LOST_HINT = ("no error in the log before it went: most likely a signal ended it, often the kernel's "
             "out-of-memory killer (see `dmesg` or `journalctl -k`); give the server less memory to use.")


class StartWatch:
    """What a start has shown so far: the phases reached, and whether it has failed.

    A fatal sign in the log, or a worker or engine core process that was there and is gone, is a
    failure once ``settle`` seconds have passed without vLLM exiting by itself (its own exit gives
    a fuller log; an API server that stays alive after its engine died would hang the start). On
    one GPU vLLM 0.26.0 runs the worker inside the engine core (its ``uni`` executor), so there
    the engine core is the process to watch.
    """

    def __init__(self, settle: float = 2.0, clock=time.monotonic):
        self.settle, self.clock = settle, clock
        self.phases: list[str] = []
        self._workers: set[int] = set()
        self._engines: set[int] = set()
        self._sign: tuple[float, Diagnosis] | None = None

    @property
    def last(self) -> str | None:
        return self.phases[-1] if self.phases else None

    def new_phases(self, log_text: str) -> list[str]:
        """The phases reached since the last call."""
        new = phases_reached(log_text)[len(self.phases):]
        self.phases += new
        return new

    def failed(self, log_text: str, workers: list[int], engines: list[int] = ()) -> Diagnosis | None:
        """The failure to act on now, or None. ``workers``/``engines``: the pids of the server's
        ``VLLM::Worker`` and ``VLLM::EngineCore`` processes now."""
        if self._sign is None:
            sign = fatal_sign(log_text)
            lost = self._workers - set(workers)
            lost_engines = self._engines - set(engines)
            if sign is None and lost:
                sign = Diagnosis("a worker died", f"worker process(es) {sorted(lost)} exited during start-up",
                                 LOST_HINT)
            elif sign is None and lost_engines:
                sign = Diagnosis("engine core failed",
                                 f"engine core process(es) {sorted(lost_engines)} exited during start-up",
                                 LOST_HINT)
            self._workers |= set(workers)
            self._engines |= set(engines)
            if sign is not None:
                self._sign = (self.clock(), sign)
        if self._sign is not None and self.clock() - self._sign[0] > self.settle:
            return self._sign[1]
        return None


def troubleshooting_markdown() -> str:
    """``docs/troubleshooting.md``: every rule as symptom, cause and fix, in English and Chinese.
    Generated from the rules, so the page and the helpers never disagree (a test compares them)."""
    out = ["# Troubleshooting a vLLM start · 启动故障排查", "",
           "Generated from `helpers/server/diagnosis.py` (`python -m helpers troubleshooting > "
           "docs/troubleshooting.md`): the same rules name the cause when `VLLMServer.start()` "
           "fails. 本页由 `helpers/server/diagnosis.py` 生成：`VLLMServer.start()` 失败时，"
           "正是这些规则指出原因。", "",
           "Failures named by a specific rule come first; the generic signs of a failed start "
           "after them. 先列出具体原因，后面是启动失败的一般迹象。", ""]
    for heading, rules in (("Specific causes · 具体原因", RULES), ("Generic signs · 一般迹象", FATAL_RULES)):
        out += [f"## {heading}", ""]
        for rule in rules:
            out += [f"### {rule.name} · {rule.name_zh}", "",
                    "The log says · 日志里是这样的:", "", "```", rule.example, "```", "",
                    f"- **Fix:** {rule.advice}", f"- **解决办法：** {rule.advice_zh}", ""]
    return "\n".join(out)

