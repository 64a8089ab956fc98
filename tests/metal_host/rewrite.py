"""Text rewrites that let clang's C++ mode accept valid MSL, shared by the dynamic
build (build.py) and the static check (static_check.py).

Both keep every line where it was (and every column, except after a rewritten
threadgroup declaration), so diagnostics and the call sites that the runtime
reports point into the original .metal file.
"""

from __future__ import annotations

import re

# `template [[host_name("f32")]] [[kernel]] void f<float>(...);` is how MSL names an
# instantiation; C++ forbids attributes there ("an attribute list cannot appear
# here"), even empty ones, so they are blanked out.
_INSTANTIATION_ATTRS = re.compile(r"\btemplate((?:\s*\[\[[^\n]*?\]\])+)")

# `[[threadgroup(0)]]` on a kernel parameter would lose its name to the
# `threadgroup` keyword macro; like every MSL attribute it means nothing to C++.
_THREADGROUP_ATTR = re.compile(r"\[\[\s*threadgroup\s*\([^\]\n]*\)\s*\]\]")

# A function-scope `threadgroup float x[32];` (or a scalar) is one variable per
# threadgroup; in C++ a plain local would be one per thread. `static` gives it one
# instance (the groups of a dispatch run one at a time) and MH_TG_LOCAL lets the
# runtime poison it at each group start. Pointer declarations (`threadgroup T* p`)
# and kernel parameters contain `*`, `&`, `(` or `,` and are left alone.
_THREADGROUP_VAR = re.compile(
    r"^(?P<indent>[ \t]*)threadgroup[ \t]+(?P<type>[A-Za-z_][\w:<> ]*?)[ \t]+"
    r"(?P<name>[A-Za-z_]\w*)[ \t]*(?P<dims>(?:\[[^\]\n]+\][ \t]*)*);",
    re.MULTILINE,
)


def rewrite_metal(text: str) -> str:
    text = _INSTANTIATION_ATTRS.sub(
        lambda m: "template" + re.sub(r"[^\n]", " ", m.group(1)), text
    )
    text = _THREADGROUP_ATTR.sub(lambda m: " " * len(m.group(0)), text)
    return _THREADGROUP_VAR.sub(
        lambda m: f"{m['indent']}static threadgroup {m['type']} {m['name']}{m['dims']}; "
        f"MH_TG_LOCAL({m['name']});",
        text,
    )


def translation_unit_source(path: str, text: str) -> str:
    """The rewritten source, headed by a #line directive naming the original file."""
    return f'#line 1 "{path}"\n{rewrite_metal(text)}\n'
