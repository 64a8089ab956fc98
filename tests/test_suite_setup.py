"""How the suite itself behaves for a new user (issue 7, item 10): it fails
when the package is missing, and it summarises skips with their reasons."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import CLANG_MISSING

REPO = Path(__file__).resolve().parents[1]


def test_suite_fails_when_the_package_cannot_be_imported():
    # sys.modules[name] = None makes `import name` raise ImportError, as on a
    # machine where the package was never installed.
    code = ("import sys; sys.modules['mlx_fused_losses'] = None; import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_suite_setup.py']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "mlx_fused_losses cannot be imported" in done.stdout + done.stderr
    assert "passed" not in done.stdout


def test_skips_are_summarised_with_their_reasons(tmp_path):
    test = tmp_path / "test_skipping.py"
    test.write_text("import pytest\n\n"
                    "def test_a():\n    pytest.skip('a reason worth reading')\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(test)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"SKIPPED \[1\] .*a reason worth reading", done.stdout), done.stdout


def test_one_wording_for_a_missing_clang():
    # Every skip for want of clang-19 says the same thing (CLANG_MISSING).
    reasons = set()
    for path in (REPO / "tests").glob("test_*.py"):
        for m in re.finditer(r"reason=\"([^\"]*clang[^\"]*)\"", path.read_text()):
            reasons.add(m.group(1))
    assert not reasons, f"spell the missing-clang skip as conftest.CLANG_MISSING: {reasons}"
    assert "apt-get install clang-19" in CLANG_MISSING
