"""How much of each lesson is plain code, counted two ways (for maintainers).

    python tools/plain_code.py [notebooks/]

* **imports nothing**: the code cell has no ``import helpers…`` / ``from helpers… import``
  (the rule ``tests/test_notebooks.py`` holds lessons 01-05 to);
* **calls no helper**: stricter, the cell also calls nothing the helpers gave: no function or class
  imported from them (``local_server_only(...)``), and no method of an object a helper call returned
  (``server.client()``, ``config.args()``), in this cell or any earlier one. Reading a plain value
  (``URL = server.url``, then ``requests.get(URL)``) does not count as a call.

Shell lines (``!curl {URL}``) count by the Python expressions inside their braces.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path


def python_of(source: str) -> str:
    """A cell's source as Python: a ``!`` or ``%`` line becomes the tuple of its ``{…}`` expressions."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("!", "%")):
            exprs = re.findall(r"\{([^{}]+)\}", stripped)
            stripped = f"({', '.join(exprs)},)" if exprs else "pass"
            line = line[: len(line) - len(line.lstrip())] + stripped
        lines.append(line)
    return "\n".join(lines)


def _root(node: ast.AST) -> str | None:
    """The name a call, attribute or subscript chain starts from: ``server`` in ``server.a.b()``."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def classify(sources: list[str]) -> list[tuple[bool, bool]]:
    """For each code cell, in order: (imports nothing from helpers, calls no helper)."""
    helper: set[str] = set()          # names imported from helpers, and what a call of one returned
    result = []
    for source in sources:
        tree = ast.parse(python_of(source))
        imports = False
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "helpers":
                imports = True
                helper.update(alias.asname or alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "helpers":
                        imports = True
                        helper.add((alias.asname or alias.name).split(".")[0])
        calls = any(isinstance(n, ast.Call) and _root(n.func) in helper for n in ast.walk(tree))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and _root(node.value) in helper:
                for target in node.targets:
                    helper.update(_names(target))
            elif isinstance(node, ast.With):
                for item in node.items:
                    if isinstance(item.context_expr, ast.Call) and _root(item.context_expr) in helper:
                        helper.update(_names(item.optional_vars))
        result.append((not imports, not (imports or calls)))
    return result


def counts(path: Path) -> tuple[int, int, int]:
    """(code cells, cells that import nothing from helpers, cells that call no helper)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    kinds = classify(["".join(c["source"]) for c in cells if c["cell_type"] == "code"])
    return len(kinds), sum(loose for loose, _ in kinds), sum(strict for _, strict in kinds)


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "notebooks")
    print(f"{'lesson':<28} {'code cells':>10} {'import nothing':>15} {'call no helper':>15}")
    for path in sorted(folder.glob("0*.ipynb")):
        total, loose, strict = counts(path)
        print(f"{path.stem:<28} {total:>10} {loose:>15} {strict:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
