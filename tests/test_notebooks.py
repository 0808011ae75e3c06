"""The walkthrough's form, checked on the saved notebooks (nbval runs their code; this checks how
they teach): each lesson has a time estimate, a summary and exercises whose solutions exist; every
text cell stands in English and in Chinese; most code cells are plain code a learner would write;
saved outputs carry no paths of the machine that ran them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers.paths import REPO_ROOT
from plain_code import classify, counts    # tools/plain_code.py (pyproject's pythonpath)
from refresh_notebooks import machine_paths   # tools/refresh_notebooks.py: the same check it saves by

NOTEBOOKS = REPO_ROOT / "notebooks"
LESSONS = sorted(NOTEBOOKS.glob("0*.ipynb"))
SOLUTIONS = sorted((NOTEBOOKS / "solutions").glob("*.ipynb"))
CHINESE = "\n---\n\n**中文**\n"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def belongs_to_both(text: str) -> bool:
    """A text cell of fenced code blocks and tables only: it is read the same in both languages,
    so it stands outside the language halves (and neither half repeats it or points to it)."""
    rest = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)
    return bool(text.strip()) and all(not line.strip() or line.lstrip().startswith("|")
                                      for line in rest.splitlines())


def test_the_walkthrough_is_there():
    assert [p.name[:2] for p in LESSONS][:6] == ["00", "01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_a_lesson_opens_with_its_time_and_ends_with_a_summary_and_exercises(path):
    first, last = source(cells(path)[0]), source(cells(path)[-1])
    assert re.search(r"\*About \d+ minutes", first) and re.search(r"约 \d+ 分钟", first), first[:300]
    for heading in ("## Summary", "**Exercises**", "## 小结", "**练习**"):
        assert heading in last, f"{path.name}: no {heading!r} in the last cell"
    solution = f"solutions/{path.stem}_solutions.ipynb"
    assert solution in last and (NOTEBOOKS / solution).is_file()
    assert len(re.findall(r"^\d\. ", last.split("**Exercises**")[1].split(CHINESE)[0], re.M)) >= 3


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: p.stem)
def test_every_text_cell_stands_in_english_and_in_chinese(path):
    for cell in cells(path):
        if cell["cell_type"] == "markdown" and not belongs_to_both(source(cell)):
            english, _, chinese = source(cell).partition(CHINESE)
            assert english.strip() and chinese.strip(), source(cell)[:200]
            # a "---" right under a line of text makes that line a heading (Markdown's setext form)
            assert not re.search(r"[^\n]\n---\n", source(cell)), f"no blank line before ---: {source(cell)[:200]}"
            quoted = english.replace("算力", "")        # the origin's own word, quoted in English
            assert re.search(r"[\u4e00-\u9fff]", chinese) and not re.search(r"[\u4e00-\u9fff]", quoted), \
                source(cell)[:200]
            # 笔记本电脑 is a laptop; a Jupyter notebook is "notebook" (docs/glossary.md)
            assert "笔记本" not in chinese.replace("笔记本电脑", ""), "a Jupyter notebook is 'notebook', not 笔记本"
            # code and tables stand outside the halves: no half sends its reader to the other one
            assert not re.search(r"英文部分|英文版|见上方英文|见上文英文", chinese), source(cell)[:200]


def test_a_cell_of_code_and_tables_belongs_to_both_languages():
    assert belongs_to_both("```bash\nvllm serve MODEL\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert not belongs_to_both("```bash\nvllm serve MODEL\n```\nThen open the page.\n")
    assert not belongs_to_both("")


def test_most_code_cells_of_lessons_01_to_05_are_plain_code():
    lessons = [p for p in LESSONS if p.name[:2] in {"01", "02", "03", "04", "05"}]
    code, plain, _ = (sum(column) for column in zip(*map(counts, lessons)))
    assert plain / code >= 0.4, f"{plain} of {code} code cells import nothing from helpers"


@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: p.stem)
def test_saved_outputs_carry_no_paths_of_the_machine(path):
    for cell in cells(path):
        for output in cell.get("outputs", []):
            text = json.dumps(output, ensure_ascii=False)
            assert not machine_paths(text), text[:300]


def test_the_strict_count_calls_a_cell_that_uses_what_a_helper_gave_not_plain():
    cells = ["from helpers import get_server\nserver = get_server()",   # imports: neither
             "client = server.client()",                                # imports nothing, calls one
             "URL = server.url",                                        # a value read: plain
             "!curl -s {URL}/v1/models",                                # plain
             "requests.get(f'{URL}/health')",                           # plain
             "!curl -s {server.base_url_for('x')}"]                     # a call inside a shell line
    assert classify(cells) == [(False, False), (True, False), (True, True), (True, True),
                               (True, True), (True, False)]
