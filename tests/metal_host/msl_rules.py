"""MSL rules that a C++ compiler accepts, checked on clang's AST (libclang).

static_check.py compiles a .metal source as C++ against a shim; C++ allows much that
the Metal Shading Language does not, and some of it never reaches the LLVM IR that
the check used to inspect (an unused static data member of a class template, say).
These rules walk the AST of the kernel's own code (the .metal file and the project
headers it includes; never the shim or system headers) and report each construct
`xcrun metal` rejects, with the section of Apple's Metal Shading Language
Specification (version 3.2, the "MSL" below) that forbids it:

- static storage outside `constant` (MSL 4.2 "constant Address Space": program-scope
  variables, and so static data members and function-scope statics, must be declared
  in `constant`; Apple's compiler says "program scope variable must reside in
  constant address space"), `thread_local` (MSL 1.5.4), and `threadgroup` variables
  anywhere but the body of a kernel (MSL 4.4: they are allocated per threadgroup
  executing a kernel, so program-scope ones have no meaning; the project keeps
  function-scope ones in kernels, which is what every MSL translator emits);
- the C++ features MSL 1.5.4 ("Restrictions") removes: lambda expressions (before
  Metal 3.2; the metallib is built with -std=metal3.1), dynamic_cast and typeid
  (RTTI), new and delete, goto (and labels), virtual functions;
- function pointers (MSL 1.5.4 / 5.1.4: only `[[visible]]` functions through
  function tables linked at pipeline creation, which the host never does);
- 64-bit floating point in any declared type, also one deduced by `auto` from an
  unsuffixed literal (MSL 2.1 lists no double; in the harness such a variable would
  silently compute in double while the GPU computes in float);
- calls into the C/C++ standard library (MSL 1.5.4: "the C++ standard library is not
  supported", only the Metal standard library, MSL 6): any function declared in a
  system header, which the shim's <cmath> makes visible to C++ but not to Metal;
- kernel functions (MSL 5.1.3 "Compute Function Attributes"): return type void,
  pointer and reference parameters in device, constant or threadgroup (MSL 4, "the
  arguments to a kernel function that are a pointer or reference must be declared
  with an address space attribute"; `thread` is for locals), and no overloading
  (MSL 1.5.1: graphics and kernel functions cannot be overloaded); no function is
  called `main` (MSL 1.5.4).

Rules clang enforces itself in the check's C++ mode are not repeated here: writes
through `constant` and cross-address-space pointers (address_space attributes),
exceptions (-fno-exceptions), RTTI again (-fno-rtti), variable-length arrays
(-Werror=vla), `register` (an error in C++17 and later). Recursion is found in the
LLVM IR (static_check.ir_violations).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .build import INCLUDE, REPO, STATIC_INCLUDE, BuildError, is_library_code

# The static shim's address spaces (static_include/metal_stdlib).
_DEVICE, _CONSTANT, _THREADGROUP = 1, 2, 3
_ADDRESS_SPACE = re.compile(r"address_space\((\d+)\)")
_DOUBLE = re.compile(r"\bdouble\b")
KERNEL_MARK = "msl_kernel"


def _cindex():
    """clang.cindex bound to libclang 19 (the `clang` pip package, pinned in the
    project's test extra, over Debian's libclang1-19, which clang-19 depends on)."""
    try:
        import clang.cindex as cindex
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BuildError(
            "the static check needs libclang's Python bindings: pip install clang==19.1.7"
        ) from e
    if not cindex.Config.loaded:
        library = os.environ.get("MH_LIBCLANG") or _find_libclang()
        if library is None:
            raise BuildError("libclang 19 not found (apt-get install libclang1-19, or set MH_LIBCLANG)")
        if not cindex.Config.library_file:
            cindex.Config.set_library_file(library)
    return cindex


def _find_libclang() -> str | None:
    from .build import find_clang

    candidates = []
    clang = find_clang()
    if clang:
        import shutil

        real = Path(shutil.which(clang) or clang).resolve()  # /usr/lib/llvm-19/bin/clang
        candidates += [real.parents[1] / "lib" / n for n in ("libclang-19.so.1", "libclang.so.1")]
    candidates += [Path("/usr/lib/llvm-19/lib/libclang-19.so.1"),
                   Path("/usr/lib/x86_64-linux-gnu/libclang-19.so.1")]
    return next((str(c) for c in candidates if c.exists()), None)


def _kind(type_):
    """The type's TypeKind, or None for kinds these bindings do not name (bfloat16
    is 32 in libclang 19 and missing from its Python enum): never a pointer."""
    try:
        return type_.kind
    except ValueError:
        return None


def _address_space(type_) -> int | None:
    m = _ADDRESS_SPACE.search(type_.get_canonical().spelling)
    return int(m[1]) if m else None


class _Walker:
    def __init__(self, cindex, tu_file: str, display: str):
        self.ci = cindex
        self.K = cindex.CursorKind
        self.tu_file = tu_file
        self.display = display
        self.errors: list[str] = []
        self.kernels: dict[str, list[str]] = {}

    # -- where ----------------------------------------------------------------
    @lru_cache(maxsize=None)
    def _kernel_file(self, name: str) -> bool:
        if name == self.tu_file:
            return True
        path = Path(name).resolve()
        return not (is_library_code(path) or str(path).startswith(("/usr/", "/opt/", "/lib/")))

    def _in_kernel_code(self, cursor) -> bool:
        loc = cursor.location
        return loc.file is not None and not loc.is_in_system_header and self._kernel_file(loc.file.name)

    def _where(self, cursor) -> str:
        loc = cursor.location
        if loc.file.name == self.tu_file:  # line 1 is the #line directive naming the .metal file
            return f"{self.display}:{loc.line - 1}"
        path = Path(loc.file.name).resolve()
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        return f"{name}:{loc.line}"

    def report(self, cursor, rule: str, why: str) -> None:
        self.errors.append(f"{self._where(cursor)}: error: {rule} ({why})")

    # -- walk -----------------------------------------------------------------
    def run(self, tu) -> list[str]:
        for child in tu.cursor.get_children():
            if self._in_kernel_code(child):
                self._visit(child, function=None)
        for name, sites in self.kernels.items():
            if len(sites) > 1:
                self.errors.append(
                    f"{sites[1]}: error: kernel '{name}' overloaded (MSL 1.5.1: kernel functions "
                    f"cannot be overloaded; also declared at {sites[0]})")
        return self.errors

    def _visit(self, cursor, function) -> None:
        K = self.K
        kind = cursor.kind
        if kind in (K.FUNCTION_DECL, K.FUNCTION_TEMPLATE, K.CXX_METHOD, K.CONSTRUCTOR,
                    K.DESTRUCTOR, K.CONVERSION_FUNCTION):
            function = cursor
            self._function(cursor)
        elif kind == K.VAR_DECL:
            self._variable(cursor, function)
        elif kind in (K.PARM_DECL, K.FIELD_DECL, K.TYPEDEF_DECL, K.TYPE_ALIAS_DECL):
            self._declared_type(cursor)
        elif kind == K.LAMBDA_EXPR:
            self.report(cursor, "lambda expression",
                        "MSL 1.5.4; lambdas need Metal 3.2 and the metallib is built for 3.1")
        elif kind in (K.GOTO_STMT, K.INDIRECT_GOTO_STMT, K.LABEL_STMT):
            self.report(cursor, "goto / label", "MSL 1.5.4: no goto statement")
        elif kind in (K.CXX_NEW_EXPR, K.CXX_DELETE_EXPR):
            self.report(cursor, "new / delete", "MSL 1.5.4: no new and delete operators")
        elif kind in (K.CXX_DYNAMIC_CAST_EXPR, K.CXX_TYPEID_EXPR):
            self.report(cursor, "dynamic_cast / typeid",
                        "MSL 1.5.4: no dynamic_cast, no type identification")
        elif kind == K.CALL_EXPR:
            self._call(cursor)
        for child in cursor.get_children():
            self._visit(child, function)

    # -- rules ----------------------------------------------------------------
    def _is_kernel(self, cursor) -> bool:
        return any(c.kind == self.K.ANNOTATE_ATTR and c.spelling == KERNEL_MARK
                   for c in cursor.get_children())

    def _function(self, cursor) -> None:
        K = self.K
        if cursor.kind == K.CXX_METHOD and cursor.is_virtual_method():
            self.report(cursor, f"virtual function '{cursor.spelling}'",
                        "MSL 1.5.4: no virtual functions")
        if cursor.kind not in (K.FUNCTION_DECL, K.FUNCTION_TEMPLATE):
            self._double(cursor, cursor.result_type, f"function '{cursor.spelling}' returns")
            return
        self._double(cursor, cursor.result_type, f"function '{cursor.spelling}' returns")
        if cursor.spelling == "main" and cursor.semantic_parent.kind == K.TRANSLATION_UNIT:
            self.report(cursor, "function named 'main'",
                        "MSL 1.5.4: Metal functions cannot be called main")
        if not self._is_kernel(cursor):
            return
        self.kernels.setdefault(cursor.spelling, []).append(self._where(cursor))
        if cursor.result_type.spelling != "void":
            self.report(cursor, f"kernel '{cursor.spelling}' returns {cursor.result_type.spelling}",
                        "MSL 5.1.3: a kernel function's return type must be void")
        for param in cursor.get_children():
            if param.kind != K.PARM_DECL:
                continue
            canonical = param.type.get_canonical()
            if _kind(canonical) in (self.ci.TypeKind.POINTER, self.ci.TypeKind.LVALUEREFERENCE,
                                  self.ci.TypeKind.RVALUEREFERENCE):
                if _address_space(canonical.get_pointee()) not in (_DEVICE, _CONSTANT, _THREADGROUP):
                    self.report(param, f"kernel parameter '{param.spelling}' of type "
                                f"{param.type.spelling} has no device/constant/threadgroup address space",
                                "MSL 4: pointer and reference arguments of a kernel must name "
                                "device, constant or threadgroup")

    def _variable(self, cursor, function) -> None:
        K = self.K
        self._declared_type(cursor)
        if cursor.tls_kind != self.ci.TLSKind.NONE:
            self.report(cursor, f"thread_local '{cursor.spelling}'",
                        "MSL 1.5.4: no thread_local storage")
            return
        parent = cursor.semantic_parent.kind
        program_scope = parent in (K.TRANSLATION_UNIT, K.NAMESPACE, K.LINKAGE_SPEC)
        static_member = parent in (K.STRUCT_DECL, K.CLASS_DECL, K.CLASS_TEMPLATE,
                                   K.CLASS_TEMPLATE_PARTIAL_SPECIALIZATION, K.UNION_DECL)
        function_static = (not program_scope and not static_member
                           and cursor.storage_class == self.ci.StorageClass.STATIC)
        if not (program_scope or static_member or function_static):
            return  # automatic storage: the thread address space, as in MSL
        space = _address_space(cursor.type)
        if space == _CONSTANT:
            return
        if space == _THREADGROUP:
            # rewrite.py turns a function-scope `threadgroup T x[N];` into a static.
            if function_static and function is not None and self._is_kernel(function):
                return
            self.report(cursor, f"threadgroup variable '{cursor.spelling}' outside a kernel body",
                        "MSL 4.4: threadgroup variables belong to the threadgroup running a "
                        "kernel; declare them in the kernel and pass pointers")
            return
        what = ("static data member" if static_member else
                "function-scope static" if function_static else "program-scope variable")
        self.report(cursor, f"{what} '{cursor.spelling}' not in the constant address space",
                    "MSL 4.2: program-scope and static variables must be declared `constant` "
                    "(e.g. `static constexpr constant int k = 4;`) or be an enumerator")

    def _declared_type(self, cursor) -> None:
        self._double(cursor, cursor.type, f"'{cursor.spelling}' has type")
        if cursor.kind == self.K.VAR_DECL or cursor.kind == self.K.PARM_DECL \
                or cursor.kind == self.K.FIELD_DECL or cursor.kind in (
                    self.K.TYPEDEF_DECL, self.K.TYPE_ALIAS_DECL):
            t = (cursor.underlying_typedef_type if cursor.kind in (
                self.K.TYPEDEF_DECL, self.K.TYPE_ALIAS_DECL) else cursor.type).get_canonical()
            TK = self.ci.TypeKind
            if _kind(t) == TK.MEMBERPOINTER or (
                    _kind(t) in (TK.POINTER, TK.LVALUEREFERENCE, TK.RVALUEREFERENCE)
                    and _kind(t.get_pointee()) in (TK.FUNCTIONPROTO, TK.FUNCTIONNOPROTO)):
                self.report(cursor, f"function or member pointer '{cursor.spelling}' "
                            f"({t.spelling})", "MSL 1.5.4/5.1.4: function pointers exist only "
                            "for [[visible]] functions linked into the pipeline, which this host "
                            "never does")

    def _double(self, cursor, type_, what: str) -> None:
        spelling = type_.get_canonical().spelling
        if _DOUBLE.search(spelling):
            self.report(cursor, f"{what} {spelling}",
                        "MSL 2.1: no 64-bit floating point; write float and suffix literals with f")

    def _call(self, cursor) -> None:
        callee = cursor.referenced
        if callee is None or callee.location.file is None:
            return
        # Free functions only: members of the few std classes the shim re-exports as
        # their metal:: namesakes (numeric_limits) are reached through metal:: here.
        # Compiler builtins (`NAN`, `INFINITY` expand to them) exist in MSL too.
        if callee.location.is_in_system_header and callee.kind in (
                self.K.FUNCTION_DECL, self.K.FUNCTION_TEMPLATE) \
                and not callee.spelling.startswith("__builtin"):
            self.report(cursor, f"call to '{callee.spelling}' from the C/C++ standard library",
                        "MSL 1.5.4: no C++ standard library; use the Metal standard library "
                        "(MSL 6), e.g. metal::exp")


def ast_violations(source: str, args: Iterable[str], display: str) -> list[str]:
    """'file:line: error: rule (why)' for each MSL rule broken in kernel code."""
    cindex = _cindex()
    tu = cindex.Index.create().parse(source, args=list(args))
    return _Walker(cindex, tu.spelling, display).run(tu)
