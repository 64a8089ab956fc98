"""Compiles .metal kernels + an adaptor + the runtime into a shared library.

The translation unit is generated: metal_host.h first (the standard headers it
pulls in must precede the shim's keyword macros), then each .metal source
rewritten by rewrite.py under a #line directive, then mh_metal_end.h (which
removes those macros), then the kernel table (mh_kernels.h: every kernel of the
sources by its metallib name, generated from the sources by kernel_names.py), then
the adaptor .cpp, which finds a launch plan's kernel in that table by name. Outputs are cached under _build/ by a hash of the preprocessed
source and the flags, so a rebuild happens exactly when some included file changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from .rewrite import translation_unit_source

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INCLUDE = HERE / "include"
STATIC_INCLUDE = HERE / "static_include"
BUILD_DIR = HERE / "_build"
MLX_STANDINS = HERE / "mlx_standins"

CXX_FLAGS = (
    "-std=c++20",
    "-fPIC",
    # -O0 with frame pointers: every source-level call is its own call instruction
    # and frame, so the runtime can tell a helper's SIMD call reached from one
    # branch from the same call reached from another (no inlining, no merging of
    # identical branch tails, no duplication of a call into several branches).
    "-O0",
    "-fno-omit-frame-pointer",
    "-Wall",
    # MSL attributes ([[buffer(0)]], [[thread_position_in_grid]], ...) mean nothing here.
    "-Wno-unknown-attributes",
    # MLX's STEEL_CONST is `static constant constexpr const`: `constant` is `const`
    # in the shims, as in MSL's constant address space.
    "-Wno-duplicate-decl-specifier",
    # Metal has no double: `x * 0.1` would compute in double here but in float there.
    "-Werror=double-promotion",
    # No a * b + c fused behind the source's back, as in the metallib (CMakeLists.txt
    # builds it with -ffp-contract=off) and the CPU build. clang's default is `on`,
    # which fuses on aarch64 hosts (and x86 ones built with FMA): the harness would
    # then round differently from both.
    "-ffp-contract=off",
    # Round every half/bfloat operation to the type, as the GPU does, instead of
    # computing expressions in float.
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
)


class BuildError(Exception):
    """clang rejected a source; the message is its diagnostics."""


def mlx_flags(harness: bool = True) -> list[str]:
    """The include flags for MLX's Metal kernel headers (mlx_headers.py), or none when
    they cannot be had: sources that include them then fail to build, with the reason
    appended to clang's diagnostics (see _run)."""
    from .mlx_headers import HeadersUnavailable, kernel_include_flags

    global _MLX_UNAVAILABLE
    try:
        return kernel_include_flags(harness)
    except HeadersUnavailable as e:
        _MLX_UNAVAILABLE = str(e)
        return []


_MLX_UNAVAILABLE = ""


def is_library_code(path: str | os.PathLike) -> bool:
    """A shim header of this harness, a stand-in, or one of MLX's own headers: code the
    static rules do not judge (they hold our kernel sources to MSL; MLX's headers are
    compiled by Apple's compiler for MLX's own metallib)."""
    p = Path(path).resolve()
    return (p.is_relative_to(INCLUDE) or p.is_relative_to(STATIC_INCLUDE)
            or p.is_relative_to(MLX_STANDINS) or "/mlx/backend/metal/kernels/" in str(p))


def find_clang() -> str | None:
    """clang++ 19 (Debian's `clang-19` package), or MH_CLANGXX if set."""
    return os.environ.get("MH_CLANGXX") or shutil.which("clang++-19")


def _clang() -> str:
    clang = find_clang()
    if clang is None:
        raise BuildError("clang++-19 not found (apt-get install clang-19, or set MH_CLANGXX)")
    return clang


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        why = (f"\nMLX's Metal headers are unavailable: {_MLX_UNAVAILABLE}"
               if _MLX_UNAVAILABLE and "mlx/backend/metal/kernels" in proc.stderr else "")
        raise BuildError(f"{' '.join(cmd)}\n{proc.stderr}{why}")
    return proc


def _in_repo(path: str | os.PathLike) -> Path:
    """Relative paths are relative to the repository root, wherever pytest runs."""
    return (REPO / path).resolve()


def _display_name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _key(clang: str, source: Path, flags: Sequence[str]) -> str:
    """Hash of the fully preprocessed source: covers every header it includes."""
    pre = _run([clang, *flags, "-E", "-x", "c++", str(source), "-o", "-"]).stdout
    h = hashlib.sha256(pre.encode())
    h.update("\0".join([clang, *flags]).encode())
    return h.hexdigest()[:24]


def _publish(tmp: Path, final: Path) -> None:
    # Atomic, so that concurrent test processes never load a half-written file.
    os.replace(tmp, final)


def _runtime_object(clang: str, flags: Sequence[str]) -> Path:
    # A separate object, never inlined into kernel code: to the optimizer a barrier
    # is an opaque call that may change any memory, so kernels reload threadgroup
    # memory after it, as a GPU compiler must.
    flags = [*flags, "-O1"]  # after -O0: the scheduler itself may be optimised
    key = _key(clang, HERE / "runtime.cpp", flags)
    obj = BUILD_DIR / f"runtime-{key}.o"
    if not obj.exists():
        with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
            out = Path(tmp) / obj.name
            _run([clang, *flags, "-c", str(HERE / "runtime.cpp"), "-o", str(out)])
            _publish(out, obj)
    return obj


def _cxx_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kernel_table_source(metal: Sequence[Path], include_dirs, defines) -> str:
    """mh::kernel_table() of the translation unit, from the sources' own kernel names."""
    from .kernel_names import kernel_instances  # imports this module

    rows = [f"      ::mh::kernel_entry({_cxx_string(k.name)}, &{k.function}, "
            f"{_cxx_string(k.function)}, {_cxx_string(k.source)}),\n"
            for k in kernel_instances(metal, include_dirs, defines)]
    return ('#include "mh_kernels.h"\n'
            "const std::vector<::mh::KernelEntry>& mh::kernel_table() {\n"
            "  static const std::vector<::mh::KernelEntry> table = {\n"
            + "".join(rows) + "  };\n  return table;\n}\n")


def compile_library(
    metal: Iterable[str | os.PathLike],
    adaptor: str | os.PathLike,
    include_dirs: Iterable[str | os.PathLike] = (REPO,),
    defines: Iterable[str] = (),
) -> tuple[Path, str]:
    """Builds (or finds in the cache) the library; returns its path and clang's
    warnings from the build that produced it ('' when it came from the cache).
    Relative paths are taken from the repository root."""
    clang = _clang()
    BUILD_DIR.mkdir(exist_ok=True)
    metal = [_in_repo(m) for m in metal]
    include_dirs = list(include_dirs)
    defines = list(defines)
    adaptor = _in_repo(adaptor)
    flags = [*CXX_FLAGS, f"-I{INCLUDE}", *mlx_flags(harness=True)]
    # Quoted includes in a .metal file are relative to its own directory.
    flags += [f"-iquote{d}" for d in dict.fromkeys(m.parent for m in metal)]
    flags += [f"-I{_in_repo(d)}" for d in include_dirs]
    flags += [f"-D{d}" for d in defines]

    parts = ['#include "metal_host.h"\n']
    # Repository-relative names keep diagnostics and reported call sites short.
    parts += [translation_unit_source(_display_name(m), m.read_text()) for m in metal]
    parts.append('#include "mh_metal_end.h"\n')
    parts.append(_kernel_table_source(metal, include_dirs, defines))
    parts.append(f'#include "{adaptor}"\n')
    tu_text = "".join(parts)
    tu = BUILD_DIR / f"tu-{hashlib.sha256(tu_text.encode()).hexdigest()[:24]}.cpp"
    if not tu.exists():
        with tempfile.NamedTemporaryFile("w", dir=BUILD_DIR, suffix=".cpp", delete=False) as f:
            f.write(tu_text)
        _publish(Path(f.name), tu)

    runtime = _runtime_object(clang, CXX_FLAGS + (f"-I{INCLUDE}",))
    lib = BUILD_DIR / f"lib-{_key(clang, tu, flags)}-{runtime.stem[8:]}.so"
    if lib.exists():
        return lib, ""
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        out = Path(tmp) / lib.name
        proc = _run([clang, *flags, "-shared", "-x", "c++", str(tu), "-x", "none",
                     str(runtime), "-o", str(out)])
        _publish(out, lib)
    return lib, proc.stderr
