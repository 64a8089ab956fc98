"""The kernels a set of .metal sources defines, derived from the sources themselves.

A kernel's name in the metallib is the `[[host_name("...")]]` of an explicit
instantiation of a `[[kernel]]` template, or the name of a plain (non-template)
`[[kernel]]` function (its `host_name`, if it has one). The names are usually
assembled by macros (`"fl_ce_fwd_" #var "_" #dname`), so they are read from the
source *after preprocessing*: clang-19 -E with the harness's shim
(include/metal_stdlib), the way `xcrun metal` expands the same macros. The only
text change before preprocessing turns the `kernel` keyword (which the shim
defines away) into a marker identifier that survives -E.

Users: build.py (the harness's kernel registry of every library it builds is
generated from `kernel_instances`), the kernel-name tests (every name a launch
plan can ask for must be defined here), and `python -m metal_host.kernel_names
metal/*.metal`, which prints the names.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .build import CXX_FLAGS, INCLUDE, REPO, BuildError, _clang, _in_repo, mlx_flags

# `kernel` as an attribute (`[[kernel]]`, `[[kernel, host_name("x")]]`) or as the
# MSL keyword before a return type. The shim defines `kernel` as nothing, so it is
# renamed before preprocessing.
_KERNEL_ATTR = re.compile(r"\[\[\s*kernel\s*(?P<end>\]\]|,)")
_KERNEL_KEYWORD = re.compile(r"\bkernel(?=\s+void\b)")
_MARK = "mh_kernel_entry_"


def mark_kernels(msl: str) -> str:
    """MSL source with its kernel attribute/keyword as a marker -E leaves alone."""
    msl = _KERNEL_ATTR.sub(lambda m: f"[[{_MARK}]]" + ("" if m["end"] == "]]" else " [["), msl)
    return _KERNEL_KEYWORD.sub(_MARK, msl)


_STRING = r'"(?:[^"\\\n]|\\.)*"'
# One attribute group `[[ ... ]]` (no nested brackets in the attributes we meet).
_ATTR_GROUP = re.compile(r"\[\[(?P<body>[^\[\]]*)\]\]")
_HOST_NAME = re.compile(rf"\bhost_name\s*\(\s*(?P<lits>(?:{_STRING}\s*)+)\)")


@dataclass(frozen=True)
class KernelInstance:
    """One kernel of the metallib: its name, the C++ function the harness calls
    for it (a template specialization such as `ce_forward<float, false, false,
    false>` or a plain function name), and the .metal file that defines it."""

    name: str
    function: str
    source: str


class KernelNameError(Exception):
    """A source whose kernels cannot be named (e.g. an instantiation without host_name)."""


def _concat_literals(text: str) -> str:
    out = []
    for lit in re.findall(_STRING, text):
        out.append(bytes(lit[1:-1], "utf-8").decode("unicode_escape"))
    return "".join(out)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _balanced(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket matching text[i] == open_."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise KernelNameError(f"unbalanced {open_}{close} in preprocessed source")


def parse_preprocessed(text: str, source: str) -> list[KernelInstance]:
    """The kernels in preprocessed MSL whose kernel attributes/keywords mark_kernels
    replaced."""
    found: list[KernelInstance] = []
    for m in re.finditer(rf"\[\[\s*{_MARK}\s*\]\]|\b{_MARK}\b", text):
        # The attribute groups around the marker, and what precedes them.
        start, end = m.start(), m.end()
        while True:  # (windows of the text: it is ~1 MB after preprocessing)
            back = text[max(0, start - 400):start].rstrip()
            if back.endswith("]]") and "[[" in back:
                start = max(0, start - 400) + back.rfind("[[")
                continue
            break
        while True:
            k = _skip_space(text, end)
            g = _ATTR_GROUP.match(text, k)
            if not g:
                break
            end = g.end()
        attrs = text[start:end]
        host = _HOST_NAME.search(attrs)
        before = text[max(0, start - 400):start].rstrip()
        rest = text[end:end + 400]
        if re.search(r"\btemplate$", before):
            # Explicit instantiation: template [[host_name(..)]] [[kernel]] decltype(F) F;
            if host is None:
                raise KernelNameError(f"{source}: an instantiated kernel without host_name: "
                                      f"{text[start:end + 80]!r}")
            k = _skip_space(text, end)
            if text.startswith("decltype", k):  # decltype(f<..>) f<..>;
                k = _balanced(text, text.index("(", k), "(", ")")
                declarator = text[k:text.index(";", k)]
            else:  # void f<..>(params);
                head = text[k:text.index(";", k)].split("(", 1)[0]
                fm = re.search(r"([A-Za-z_][\w:]*\s*<.*>)\s*$", head)
                if fm is None:
                    raise KernelNameError(f"{source}: cannot read the instantiation "
                                          f"{text[start:end + 80]!r}")
                declarator = fm.group(1)
            function = " ".join(declarator.split())
            found.append(KernelInstance(_concat_literals(host.group("lits")), function, source))
        elif before.endswith(">"):
            continue  # a template's definition: only its instantiations are kernels
        else:
            # A plain kernel: [[kernel]] void name(...) { ... }
            fm = re.match(r"\s*void\s+(?P<name>[A-Za-z_]\w*)\s*\(", rest)
            if fm is None:
                raise KernelNameError(f"{source}: cannot read the kernel declared at "
                                      f"{text[start:end + 80]!r}")
            name = _concat_literals(host.group("lits")) if host else fm.group("name")
            found.append(KernelInstance(name, fm.group("name"), source))
    return found


def preprocess(path: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (REPO,),
               defines: Iterable[str] = ()) -> str:
    """clang-19 -E of one .metal file with the harness's shim (build.py's flags)."""
    path = _in_repo(path)
    text = mark_kernels(path.read_text())
    cmd = [_clang(), *CXX_FLAGS, f"-I{INCLUDE}", *mlx_flags(harness=True), f"-iquote{path.parent}",
           *[f"-I{_in_repo(d)}" for d in include_dirs], *[f"-D{d}" for d in defines],
           "-E", "-P", "-x", "c++", "-", "-o", "-"]
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} < {path}\n{proc.stderr}")
    return proc.stdout


def kernel_instances(metal: Iterable[str | os.PathLike],
                     include_dirs: Iterable[str | os.PathLike] = (REPO,),
                     defines: Iterable[str] = ()) -> list[KernelInstance]:
    """Every kernel the sources define, in source order; a name defined twice is an error
    (the metallib could hold only one of them)."""
    include_dirs = list(include_dirs)
    defines = list(defines)
    out: list[KernelInstance] = []
    seen: dict[str, str] = {}
    for m in metal:
        path = _in_repo(m)
        shown = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        for k in parse_preprocessed(preprocess(path, include_dirs, defines), shown):
            if k.name in seen:
                raise KernelNameError(f"kernel name {k.name!r} defined twice ({seen[k.name]}, {shown})")
            seen[k.name] = shown
            out.append(k)
    return out


def kernel_names(metal: Iterable[str | os.PathLike] | None = None, **kw) -> set[str]:
    """The names of kernel_instances; default: the package's metal/*.metal."""
    if metal is None:
        metal = sorted((REPO / "metal").glob("*.metal"))
    return {k.name for k in kernel_instances(metal, **kw)}


def compare_with_plans(plan_names: Iterable[str], defined: Iterable[str]) -> list[str]:
    """Problems between the names launch plans ask for and the names the sources
    define: a plan name no source defines (the kernel would fail to load) or a
    defined kernel no plan asks for (dead code, or a plan that lost it). Empty: agree."""
    plan_names, defined = set(plan_names), set(defined)
    problems = [f"a launch plan asks for {n!r}, which no .metal source defines"
                for n in sorted(plan_names - defined)]
    problems += [f"{n!r} is defined by the .metal sources but no launch plan asks for it"
                 for n in sorted(defined - plan_names)]
    return problems


if __name__ == "__main__":
    for k in kernel_instances(sys.argv[1:] or sorted((REPO / "metal").glob("*.metal"))):
        print(k.name)
