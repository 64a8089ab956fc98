"""MLX's Metal headers from the macOS mlx-metal wheel that matches the installed mlx.

The kernels include MLX's steel GEMM headers (metal/lce_gemm.h) as the wheel ships
them; on Linux that wheel is not installed, so the harness, the static check and the
host-code check (tests/test_metal_host_code.py) download it once with pip and keep its
mlx/include under tests/.cache (FL_MLX_METAL_CACHE overrides). Nothing is copied into
the repository.

Two stand-ins (mlx_standins/, in front of MLX's directory) replace what C++ cannot
express once Metal's address spaces are erased; each file says why. The static check,
which keeps the address spaces apart, uses only the first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("FL_MLX_METAL_CACHE", REPO / "tests" / ".cache"))
# complex.h: MLX's overloads constructors on the address space of `this`.
STANDINS_COMMON = HERE / "mlx_standins" / "common"
# steel/utils/type_traits.h: one pointer_element specialisation per address space.
STANDINS_HARNESS = HERE / "mlx_standins" / "harness"


class HeadersUnavailable(Exception):
    """The mlx-metal wheel's headers could not be had (message says why)."""


def _download(version: str, root: Path) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "macosx_14_0_arm64", f"mlx-metal=={version}", "-d", tmp, "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise HeadersUnavailable(f"`{' '.join(cmd[2:])}` timed out") from None
        wheels = list(Path(tmp).glob("mlx_metal-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise HeadersUnavailable(f"`{' '.join(cmd[2:])}` failed: {' | '.join(tail)}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked, [n for n in wheel.namelist() if n.startswith("mlx/include/")])
        shutil.rmtree(root, ignore_errors=True)
        os.replace(unpacked, root)  # whole or not at all, for concurrent test runs


@lru_cache(maxsize=None)
def mlx_metal_include() -> Path:
    """mlx/include of the mlx-metal wheel matching the installed mlx (downloaded once)."""
    version = importlib.metadata.version("mlx")
    root = CACHE / f"mlx-metal-{version}"
    include = root / "mlx" / "include"
    if not (include / "mlx" / "backend" / "metal" / "device.h").exists():
        _download(version, root)
    return include


# The static check keeps Metal's address spaces apart as clang address spaces, and
# C++ (unlike MSL) gives a struct no assignment operator for an object outside the
# generic address space: steel's BlockLoader::load_unsafe copies a ReadVector struct
# from device to threadgroup memory by plain assignment, which MSL allows. For the
# static check only, the steel headers are read through this rewrite (generated under
# _build, never kept in the repository): such an assignment becomes mh_struct_copy
# (static_include/metal_stdlib), which takes the same two pointer types, so a pointer
# of the wrong address space is still rejected. Everything else is MLX's text.
_STRUCT_ASSIGNMENT = re.compile(
    r"\*\(\((?P<dst>threadgroup|device) (?P<type>\w+)\*\)\((?P<d>[^;]*?)\)\)\s*=\s*"
    r"\*\(\((?P<src>(?:const )?(?:device|threadgroup|constant)) (?P=type)\*\)\((?P<s>[^;]*?)\)\);")


def _static_rewrite(text: str) -> str:
    return _STRUCT_ASSIGNMENT.sub(
        lambda m: (f"mh_struct_copy(({m['dst']} {m['type']}*)({m['d']}), "
                   f"({m['src']} {m['type']}*)({m['s']}));"), text)


@lru_cache(maxsize=None)
def static_steel_include() -> Path:
    """MLX's steel headers with _static_rewrite applied, for the static check."""
    from .build import BUILD_DIR

    src = mlx_metal_include()
    steel = src / "mlx" / "backend" / "metal" / "kernels" / "steel"
    files = sorted(p for p in steel.rglob("*.h"))
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in files:
        h.update(p.read_bytes())
    out = BUILD_DIR / f"mlx-static-{h.hexdigest()[:16]}"
    if not out.exists():
        BUILD_DIR.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
            for p in files:
                target = Path(tmp) / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(_static_rewrite(p.read_text()))
            try:
                os.replace(tmp, out)
            except OSError:  # another process published it first
                pass
            Path(tmp).mkdir(exist_ok=True)  # for TemporaryDirectory's cleanup
    return out


def kernel_include_flags(harness: bool) -> list[str]:
    """-I flags that make `#include "mlx/backend/metal/kernels/..."` resolve: the
    stand-ins first, then MLX's own headers (for the static check, its steel headers
    through _static_rewrite)."""
    dirs = [STANDINS_HARNESS, STANDINS_COMMON] if harness else [STANDINS_COMMON,
                                                                 static_steel_include()]
    return [f"-I{d}" for d in dirs] + [f"-I{mlx_metal_include()}"]
