"""The code in README.md and docs/*.md runs as written.

Every ```python block is run on its own (a fresh interpreter, in an empty
temporary directory), so each one can be copied alone: it imports and defines
everything it uses. A block that cannot run here says so on its first line, in
words a reader sees too:

    # Not run by the test suite: <why>, e.g. it downloads a model

Shell blocks are not run, but the commands they name must exist: every
``python -m MODULE`` is importable and every ``python path/to/script.py`` is a
file of the source tree.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"#\s*Not run by the test suite:\s*(\S.*)", re.IGNORECASE)
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def not_run_because(self) -> str | None:
        first = self.code.lstrip("\n").split("\n", 1)[0]
        match = NOT_RUN.fullmatch(first.strip())
        return match.group(1) if match else None


def code_blocks(text: str, path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown text (``` or ~~~ fences, indented
    too: a block inside a list item), dedented, with the first word of the
    info string as the language."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = re.match(r" *(`{3,}|~{3,})\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        fence, language, start = opening.group(1), opening.group(2).lower(), i
        i += 1
        body = []
        while i < len(lines) and not re.match(rf" *{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence (or the end of the text)
        blocks.append(Block(path, start + 1, language, textwrap.dedent("\n".join(body) + "\n")))
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in DOCUMENTS if path.exists() for b in code_blocks(path.read_text(), path)]


BLOCKS = all_blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.language in PYTHON]
RUNNABLE = [b for b in PYTHON_BLOCKS if b.not_run_because is None]


def test_the_extraction_finds_the_blocks():
    text = ("intro\n```python\nx = 1\n```\n\n~~~bash\nls\n~~~\n  ```py title\n  # Not run by the test suite: why\n"
            "  ```\n````python\n```nested\n````\n")
    found = code_blocks(text, REPO / "x.md")
    assert [(b.line, b.language, b.code) for b in found] == [
        (2, "python", "x = 1\n"), (6, "bash", "ls\n"), (9, "py", "# Not run by the test suite: why\n"),
        (12, "python", "```nested\n")]
    assert [b.not_run_because for b in found] == [None, None, "why", None]


def test_every_python_block_runs_or_says_why_not():
    """How many blocks run, listed, so a broken extraction cannot pass by
    running none: the README has runnable Python."""
    if not (REPO / "README.md").exists():
        pytest.skip("README.md is not in this tree")
    skipped = {b.name: b.not_run_because for b in PYTHON_BLOCKS if b.not_run_because}
    ran = [b.name for b in RUNNABLE]
    print(f"\n{len(ran)} of {len(PYTHON_BLOCKS)} Python blocks run: {', '.join(ran)}")
    print(f"not run, with their reasons: {skipped}")
    assert any(name.startswith("README.md:") for name in ran), ran
    assert len(ran) + len(skipped) == len(PYTHON_BLOCKS)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_python_block_runs_as_written(block, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(block.code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{block.name} fails as written:\n{block.code}\n{done.stderr[-3000:]}"


NOT_RUN_BLOCKS = [b for b in PYTHON_BLOCKS if b.not_run_because is not None]


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[b.name for b in NOT_RUN_BLOCKS])
def test_python_block_not_run_compiles_and_its_imports_exist(block, tmp_path):
    """A block the suite cannot run is still valid Python whose imports exist
    (mlx-lm's trainer API included, where mlx-lm is installed)."""
    tree = ast.parse(block.code, filename=block.name)
    imports = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports, f"{block.name}: nothing to check"
    script = tmp_path / "imports.py"
    script.write_text("\n".join(imports) + "\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", done.stderr)
    if missing and missing.group(1).split(".")[0] == "mlx_lm":
        pytest.skip("mlx-lm is not installed (the [lm] extra)")
    assert done.returncode == 0, f"{block.name}: its imports fail:\n{done.stderr[-2000:]}"


def _commands(block: Block):
    """The shell block's lines with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block.code)
    for line in text.split("\n"):
        line = line.split(" #", 1)[0].strip()
        for command in re.split(r"&&|\|\||;", line):
            yield command.strip()


SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.name for b in SHELL_BLOCKS])
def test_shell_block_names_modules_and_scripts_that_exist(block):
    problems = []
    for command in _commands(block):
        words = command.split()
        while words and "=" in words[0]:  # VAR=value prefixes
            words = words[1:]
        if len(words) < 2 or not re.fullmatch(r"python3?", words[0]):
            continue
        if words[1] == "-m":
            module = words[2]
            sys.path.insert(0, str(REPO))  # tools.* run from the repository root
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            finally:
                sys.path.remove(str(REPO))
            if not found:
                problems.append(f"python -m {module}: no such module")
        elif words[1].endswith(".py") and not (REPO / words[1]).is_file():
            problems.append(f"python {words[1]}: no such file in the source tree")
    assert not problems, f"{block.name}: {problems}"


def test_the_command_check_catches_a_stale_name():
    block = Block(REPO / "README.md", 1, "bash", "pip install . && python -m bench --quick\n"
                  "python examples/nowhere.py  # comment\n")
    with pytest.raises(AssertionError, match=r"python -m bench: no such module.*examples/nowhere.py"):
        test_shell_block_names_modules_and_scripts_that_exist(block)


# The project's bookkeeping, which means nothing to a reader: the tracker's issue
# numbers and the paths of the machines it is built on.
BOOKKEEPING = re.compile(r"\bissue[ -]#?\d+|\bthe issue\b|\bissue's\b|/work/\S*", re.IGNORECASE)
USER_FACING = [*DOCUMENTS, REPO / "CHANGELOG.md", *sorted((REPO / "examples").glob("*.py"))]


def test_user_facing_text_has_no_bookkeeping():
    found = {str(p.relative_to(REPO)): BOOKKEEPING.findall(p.read_text()) for p in USER_FACING if p.exists()}
    assert found, "none of the user-facing files is in this tree"
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    # (what it catches; "issues" as a verb is English, not bookkeeping)
    assert BOOKKEEPING.findall("issue 9's targets, the issue's sizes, pip install /work/main") == [
        "issue 9", "the issue", "/work/main"]
    assert not BOOKKEEPING.findall("each SIMD-group issues 4 loads")
