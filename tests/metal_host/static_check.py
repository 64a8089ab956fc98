"""Static check of .metal sources: what `xcrun metal` would reject, without it.

No MSL compiler runs on Linux, so clang's C++ mode stands in for it, in four steps
(the sources go through the same rewrites as the dynamic build, rewrite.py, and
`[[kernel]]` becomes a mark the AST rules find):

1. Address spaces and semantics: static_include/metal_stdlib maps
   device/constant/threadgroup to distinct clang address spaces, so passing a
   pointer into one space where another is expected, or writing through a
   constant pointer, is a compile error as in Metal; -fno-exceptions rejects
   `throw` and `try`, -fno-rtti `typeid` and `dynamic_cast` of polymorphic types,
   -Werror=vla variable-length arrays (MSL has none; C++ clang allows them as an
   extension).
2. Tokens of the kernel's own code (the .metal file and the project headers it
   includes, after preprocessing; never the shim or system headers): `double`
   (Metal has no 64-bit float), `virtual`, `std::` (MSL has no C++ standard
   library: use metal::), `throw` / `try` / `catch`.
3. The LLVM IR clang generates for the file: recursion (a cycle in the call
   graph of the defined functions) and mutable globals (a variable at namespace
   or function scope with static storage that is neither `constant` nor a
   function-scope `threadgroup` array).
4. clang's AST of the kernel's own code (msl_rules.py, through libclang): every
   declaration, used or not, against the rules of the MSL specification that C++
   lacks: static storage outside `constant` (static data members too), where
   threadgroup variables live, thread_local, lambdas, goto, new/delete, RTTI,
   virtual functions, function pointers, double types (also deduced ones), C/C++
   library calls, and kernel signatures (void return, address spaces of pointer
   parameters, no overloads). Each rule cites its section there.

    python tests/metal_host/static_check.py metal/*.metal
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "metal_host"

from .build import (
    BUILD_DIR, INCLUDE, REPO, STATIC_INCLUDE, BuildError, _clang, _display_name, _in_repo,
    is_library_code, mlx_flags)
from .msl_rules import KERNEL_MARK, ast_violations
from .rewrite import translation_unit_source

FLAGS = (
    "-x",
    "c++",
    "-std=c++20",
    "-Wno-unknown-attributes",
    # MSL has no exceptions: `throw` / `try` become errors.
    "-fno-exceptions",
    # MSL 1.5.4: no type identification or dynamic_cast (msl_rules.py reports them
    # too, with the section); no variable-length arrays (C99 arrays are not C++ nor MSL).
    "-fno-rtti",
    "-Werror=vla",
    # A kernel could compile and still be wrong for Metal; these are the usual ones.
    "-Werror=double-promotion",
    "-Werror=return-type",
)

# (pattern, message) for tokens of the kernel's own code.
_FORBIDDEN_TOKENS = (
    (re.compile(r"\bdouble\b"), "'double': Metal has no 64-bit floating point"),
    (re.compile(r"\bvirtual\b"), "'virtual': MSL has no virtual functions"),
    (re.compile(r"\bstd\s*::"), "'std::': MSL has no C++ standard library (use metal::)"),
    (re.compile(r"\b(?:throw|try|catch)\b"), "exceptions: MSL has none"),
)
_LITERAL = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'')
_LINE_MARKER = re.compile(r'^# (\d+) "((?:[^"\\]|\\.)*)"((?: \d)*)$')


@dataclass
class Result:
    path: Path
    ok: bool
    diagnostics: str


def _is_kernel_code(filename: str, flags: str) -> bool:
    """The .metal file and project headers; not the shims, system headers or clang's."""
    if filename.startswith("<") or " 3" in flags:
        return False
    return not is_library_code(filename)


def forbidden_tokens(preprocessed: str) -> list[str]:
    """'file:line: error: ...' for each forbidden token in kernel code."""
    errors = []
    filename, line, flags = "", 0, ""
    for text in preprocessed.splitlines():
        marker = _LINE_MARKER.match(text)
        if marker:
            line, filename, flags = int(marker[1]), marker[2], marker[3]
            continue
        if _is_kernel_code(filename, flags):
            code = _LITERAL.sub('""', text)
            for pattern, message in _FORBIDDEN_TOKENS:
                if pattern.search(code):
                    errors.append(f"{filename}:{line}: error: {message}: {text.strip()}")
        line += 1
    return errors


_DEFINE = re.compile(r'^define\b.*?@("[^"]+"|[\w.$]+)\(')
_CALL = re.compile(r'\b(?:call|invoke)\b.*?@("[^"]+"|[\w.$]+)\(')
_GLOBAL = re.compile(r'^@("[^"]+"|[\w.$]+) = ([^"]*?)\b(global|constant)\b')


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(dict.fromkeys(names))
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt-19")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    demangled = out.splitlines()
    return dict(zip(names, demangled)) if len(demangled) == len(names) else {n: n for n in names}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def ir_violations(ir: str, display: str) -> list[str]:
    """Recursion and mutable globals in the LLVM IR of one translation unit."""
    graph: dict[str, set[str]] = {}
    mutable = []
    current = None
    for text in ir.splitlines():
        define = _DEFINE.match(text)
        if define:
            current = define[1].strip('"')
            graph[current] = set()
            continue
        if current is not None:
            if text.startswith("}"):
                current = None
            else:
                graph[current].update(m.strip('"') for m in _CALL.findall(text))
            continue
        glob = _GLOBAL.match(text)
        if glob and glob[3] == "global" and "addrspace(3)" not in glob[2] and "external" not in glob[2]:
            name = glob[1].strip('"')
            if not name.startswith("llvm."):
                mutable.append(name)
    cycles = _cycles(graph)
    names = _demangle([n for c in cycles for n in c] + mutable)
    errors = [
        f"{display}: error: recursion (MSL has none): " + " -> ".join(names[n] for n in c)
        for c in cycles
    ]
    errors += [
        f"{display}: error: mutable global '{names[n]}': kernels may only have `constant` "
        "globals and function-scope `threadgroup` arrays"
        for n in mutable
    ]
    return errors


# `[[kernel]]` (the attribute spelling of MSL's `kernel`) as a mark clang keeps in the
# AST; the `kernel` keyword gets the same mark from static_include/metal_stdlib.
# Instantiation lines lost their attributes in rewrite.py already.
_KERNEL_ATTRIBUTE = re.compile(r"\[\[\s*kernel\s*\]\]")


def check(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (REPO,)) -> Result:
    """Checks one .metal file (a relative path is taken from the repository root)."""
    clang = _clang()
    path = _in_repo(path)
    BUILD_DIR.mkdir(exist_ok=True)
    source = translation_unit_source(_display_name(path), path.read_text())
    source = _KERNEL_ATTRIBUTE.sub(f'[[clang::annotate("{KERNEL_MARK}")]]', source)
    with tempfile.NamedTemporaryFile("w", dir=BUILD_DIR, suffix=".cpp", delete=False) as f:
        f.write(source)
    try:
        args = [*FLAGS, f"-I{STATIC_INCLUDE}", *mlx_flags(harness=False), f"-iquote{path.parent}"]
        args += [f"-I{_in_repo(d)}" for d in include_dirs]
        # Step 1 (and the IR for step 3): -O0 keeps every call and global.
        proc = subprocess.run([clang, *args, "-O0", "-S", "-emit-llvm", "-o", "-", f.name],
                              capture_output=True, text=True)
        # Step 4 runs whether or not clang accepted the file: an AST rule broken beside
        # a compile error is reported too.
        errors = ast_violations(f.name, args, _display_name(path))
        if proc.returncode != 0:
            return Result(path, False, "\n".join([proc.stderr, *errors]))
        errors = ir_violations(proc.stdout, _display_name(path)) + errors
        pre = subprocess.run([clang, *args, "-E", f.name], capture_output=True, text=True)
        if pre.returncode != 0:
            return Result(path, False, pre.stderr)
        errors = forbidden_tokens(pre.stdout) + errors
    finally:
        os.unlink(f.name)
    return Result(path, not errors, "\n".join(errors) or proc.stderr)


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
