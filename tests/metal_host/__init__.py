"""Metal-on-CPU harness: run metal/*.metal kernels under pytest on Linux.

    import metal_host as mh
    lib = mh.build(["metal/foo.metal"], "tests/metal_host/adaptors/foo.cpp")
    out = np.full(rows, np.nan, np.float32)
    lib.run("foo_forward", out, x, np.uint32(rows), np.uint32(cols))

See README.md.
"""

from __future__ import annotations

import os
from typing import Iterable

from .build import REPO, BuildError, compile_library, find_clang
from .driver import (
    DEFAULT_SCHEDULES,
    FLUSH_SUBNORMALS_ENV,
    HarnessError,
    KernelError,
    Library,
    POISON_HUGE,
    POISON_HUGE_NEGATIVE,
    POISON_NAN,
    OutOfBounds,
    Schedule,
    ScheduleDependent,
    flush_subnormals_default,
)


def build(
    metal: Iterable[str | os.PathLike],
    adaptor: str | os.PathLike,
    include_dirs: Iterable[str | os.PathLike] = (REPO,),
    defines: Iterable[str] = (),
) -> Library:
    """Compiles (or reuses from the cache) and loads kernels + adaptor + runtime."""
    path, warnings = compile_library(metal, adaptor, include_dirs, defines)
    return Library(path, warnings)


__all__ = [
    "DEFAULT_SCHEDULES",
    "FLUSH_SUBNORMALS_ENV",
    "BuildError",
    "HarnessError",
    "KernelError",
    "Library",
    "OutOfBounds",
    "POISON_HUGE",
    "POISON_HUGE_NEGATIVE",
    "POISON_NAN",
    "Schedule",
    "ScheduleDependent",
    "build",
    "find_clang",
    "flush_subnormals_default",
]
