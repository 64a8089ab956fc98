"""Syntax-only check of the address-space rules of .metal sources.

No MSL compiler runs on Linux, so clang's C++ mode stands in for `xcrun metal`:
static_include/metal_stdlib maps device/constant/threadgroup to distinct clang
address spaces, which makes passing a pointer into one space where another is
expected, or writing through a constant pointer, a compile error as in Metal. The
sources go through the same rewrites as the dynamic build (rewrite.py).

    python tests/metal_host/static_check.py metal/*.metal
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "metal_host"

from .build import BUILD_DIR, REPO, STATIC_INCLUDE, BuildError, _clang, _display_name, _in_repo
from .rewrite import translation_unit_source

FLAGS = (
    "-x",
    "c++",
    "-std=c++20",
    "-fsyntax-only",
    "-Wno-unknown-attributes",
    # A kernel could compile and still be wrong for Metal; these are the usual ones.
    "-Werror=double-promotion",
    "-Werror=return-type",
)


@dataclass
class Result:
    path: Path
    ok: bool
    diagnostics: str


def check(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (REPO,)) -> Result:
    """Checks one .metal file (a relative path is taken from the repository root)."""
    clang = _clang()
    path = _in_repo(path)
    BUILD_DIR.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=BUILD_DIR, suffix=".cpp", delete=False) as f:
        f.write(translation_unit_source(_display_name(path), path.read_text()))
    try:
        cmd = [clang, *FLAGS, f"-I{STATIC_INCLUDE}", f"-iquote{path.parent}"]
        cmd += [f"-I{_in_repo(d)}" for d in include_dirs]
        proc = subprocess.run([*cmd, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return Result(path, proc.returncode == 0, proc.stderr)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        results = [check(Path(a).resolve()) for a in argv]
    except BuildError as e:
        print(e, file=sys.stderr)
        return 2
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.path}")
        if not r.ok:
            print(r.diagnostics)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
