"""Run notebooks top to bottom against a real vLLM server and save their outputs (for maintainers).

    .venv/bin/python tools/refresh_notebooks.py notebooks/03_stream_requests.ipynb [...]

Each notebook runs in a fresh kernel from its own folder, exactly as nbval runs it; cells tagged
``raises-exception`` may raise. Saved outputs are what a reader sees and are saved
exactly as the cells printed them: a notebook whose outputs name this machine's home folder or a
temporary folder is not saved (fix the cell instead). Start a detached
server first (``./tutorial.sh serve``) so that notebooks 02-04 reuse one server instead of each
starting its own; stop it after (``./tutorial.sh stop``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HOME = str(Path.home())
REPO = str(Path(__file__).resolve().parent.parent)
TEMP = re.compile(re.escape(tempfile.gettempdir()) + r"/(?!…)[^\s\"'\\]*")


def machine_paths(text: str) -> list[str]:
    """The machine's paths ``text`` names: its home folder, this checkout, a temporary folder
    (``/tmp/…``, an elision, is none). The one check of saved outputs: this tool refuses to save
    them, ``tests/test_notebooks.py`` fails on them."""
    return [p for p in (HOME, REPO) if p in text] + TEMP.findall(text)


def machine_traces(nb) -> list[str]:
    """Where a saved output names a path of this machine. Outputs are never rewritten: a cell
    that prints such a path is fixed in the cell (the helpers print the home folder as ``~``
    themselves, ``helpers.paths.short_path``)."""
    found = []
    code_index = -1
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        code_index += 1
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")]
            texts += [v for k, v in output.get("data", {}).items() if isinstance(v, str) and k.startswith("text/")]
            texts += output.get("traceback", [])
            found += [f"code cell {code_index}: {hit}" for text in texts for hit in machine_paths(text)]
    return found


def refresh(path: Path, timeout: int) -> float:
    from nbclient import NotebookClient      # here: the tests import machine_paths alone

    nb = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)     # run timestamps: not part of the lesson
    traces = machine_traces(nb)
    if traces:
        raise SystemExit(f"{path}: not saved, outputs carry machine paths: {sorted(set(traces))}")
    nbformat.write(nb, path)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        print(f"{path}: {refresh(path, args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
