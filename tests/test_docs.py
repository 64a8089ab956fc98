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


# Packages of an optional extra that a runnable block may import: without the
# extra installed (cibuildwheel tests with [test,bench] only) the block is skipped.
EXTRAS = {"mlx_lm": "mlx-lm is not installed (the [lm] extra)"}


def _imported_top_level_modules(code: str) -> set:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_python_block_runs_as_written(block, tmp_path):
    for module in sorted(_imported_top_level_modules(block.code) & EXTRAS.keys()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(EXTRAS[module])
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


# ---- links --------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _outside_fences(text: str) -> str:
    """The text without its fenced blocks."""
    lines, fence = [], None
    for line in text.split("\n"):
        opening = re.match(r" *(`{3,}|~{3,})", line)
        if opening and fence is None:
            fence = opening.group(1)
            continue
        if fence is not None:
            if re.match(rf" *{fence[0]}{{{len(fence)},}}\s*$", line):
                fence = None
            continue
        lines.append(line)
    return "\n".join(lines)


def _outside_code(text: str) -> str:
    """The text without its fenced blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "``", _outside_fences(text))


def anchors(text: str) -> set:
    """The #fragments GitHub gives a Markdown file's headings: lower case, spaces
    to hyphens, punctuation other than - and _ dropped; repeats get -1, -2, ..."""
    seen, found = {}, set()
    for line in _outside_fences(text).replace("`", "").split("\n"):
        heading = re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path) -> list:
    problems = []
    for target in LINK.findall(_outside_code(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            shown = linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked
            problems.append(f"{target}: no file {shown}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
            problems.append(f"{target}: no heading #{fragment} in {linked.name}")
    return problems


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if p.exists()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(path):
    assert not broken_links(path), f"{path.relative_to(REPO)}: {broken_links(path)}"


def test_the_link_check_catches_a_broken_link(tmp_path):
    assert anchors("# API reference\n## `cross_entropy`\n## smooth_l1_loss / huber_loss\n## Errors\n## Errors\n"
                   "```\n# not a heading\n```\n### Metal: linear cross-entropy\n") == {
        "api-reference", "cross_entropy", "smooth_l1_loss--huber_loss", "errors", "errors-1",
        "metal-linear-cross-entropy"}
    (tmp_path / "other.md").write_text("# Other\n## Part two\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[ok](other.md#part-two) [ok](#page) ![img](other.md) [web](https://x.org/#y)\n"
                    "[gone](missing.md) [bad](other.md#part-three) [self](#nowhere) `[code](nope.md)`\n"
                    "```\n[in a block](nope.md)\n```\n")
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}", "other.md#part-three: no heading #part-three in other.md",
        "#nowhere: no heading #nowhere in page.md"]


def test_api_table_names_every_public_loss():
    """The README's API table lists every public function and Module, and
    docs/api.md describes each (a new loss cannot be left out of either)."""
    import inspect

    import mlx_fused_losses as fl
    import mlx_fused_losses.nn as fl_nn

    if not (REPO / "README.md").exists() or not (REPO / "docs" / "api.md").exists():
        pytest.skip("README.md or docs/api.md is not in this tree")
    import mlx_fused_losses.distributed as fl_distributed

    # (the submodules' own functions, not the submodules, are what the docs name)
    names = [n for n in fl.__all__ if n not in ("nn", "distributed")] + list(fl_distributed.__all__)
    names += [n for n, v in vars(fl_nn).items()
              if inspect.isclass(v) and v.__module__ == fl_nn.__name__ and not n.startswith("_")]
    try:
        import mlx_fused_losses.lm as lm
        names += [n for n, v in vars(lm).items()
                  if inspect.isfunction(v) and v.__module__ == lm.__name__ and n.endswith("_loss")]
    except ImportError:  # mlx-lm not installed: its two losses are still named below
        names += ["lm_loss", "linear_lm_loss"]
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("\n## API\n"):]
    table = "\n".join(line for line in table.split("\n")[2:] if line.startswith("|"))
    api = (REPO / "docs" / "api.md").read_text()
    missing = {n: [where for where, text in (("README API table", table), ("docs/api.md", api))
                   if not re.search(rf"`(?:[\w.]+\.)?{n}[`(]", text)] for n in names}
    assert len(names) >= 12 and not any(missing.values()), {n: w for n, w in missing.items() if w}
