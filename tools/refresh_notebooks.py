"""Run notebooks top to bottom against a real vLLM server and save their outputs (for maintainers).

    .venv/bin/python tools/refresh_notebooks.py notebooks/03_stream_requests.ipynb [...]

Each notebook runs in a fresh kernel from its own folder, exactly as nbval runs it; cells tagged
``raises-exception`` may raise. Saved outputs are what a reader sees, so the machine's home
folder is written ``~`` in them and the run's temporary folders as ``/tmp/…``; cells compared
strictly by nbval must print neither (they print what the lesson guarantees). Start a detached
server first (``./tutorial.sh serve``) so that notebooks 02-04 reuse one server instead of each
starting its own; stop it after (``./tutorial.sh stop``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HOME = str(Path.home())
TEMP = re.compile(r"/tmp/[\w.-]+")


def shorten(text: str) -> str:
    return TEMP.sub("/tmp/…", text.replace(HOME, "~"))


def clean_outputs(nb) -> None:
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = shorten(output["text"])
            for key, value in list(output.get("data", {}).items()):
                if isinstance(value, str) and key.startswith("text/"):
                    output["data"][key] = shorten(value)
            if output.get("output_type") == "error":
                output["traceback"] = [shorten(line) for line in output["traceback"]]


def refresh(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    started = time.monotonic()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    clean_outputs(nb)
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
