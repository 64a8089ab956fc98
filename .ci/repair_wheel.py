"""Repair a freshly built wheel into a PyPI-uploadable one, and check the result.

    python .ci/repair_wheel.py dist/mlx_fused_losses-*.whl wheelhouse/

Used by .ci/run (Linux, here) and by cibuildwheel for the release wheels
(pyproject.toml `repair-wheel-command`). Linux: auditwheel tags the wheel
manylinux_2_35 (the tag of mlx-cpu's own wheels), macOS: delocate. Then the
repaired wheel is checked: platform tag, no copy of an excluded library, every
dependency either inside the wheel, a system library or an excluded one, the
license file, and (macOS) the metallib beside _ext.

Standard library only: cibuildwheel runs it with the build environment's Python.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Libraries the extension links against that come from OTHER wheels at run
# time, found through _ext's rpath into site-packages: they must not be copied
# into this wheel (a second libmlx would be a second MLX runtime). One entry per
# library, the platform's suffix is added below.
EXTERNAL_LIBRARIES = [
    "libmlx",  # mlx-cpu (Linux) / mlx-metal (macOS): mlx/lib/libmlx.{so,dylib}
    "libscipy_openblas",  # scipy-openblas32 (Linux): scipy_openblas32/lib/, the linear CE's BLAS
]

# The oldest platforms mlx's own wheels support: manylinux_2_35 (mlx-cpu) and
# macOS 14 (mlx-metal). A user who can install mlx can install ours: the
# repaired tag must be this or lower (CI asserts it).
MANYLINUX_GLIBC = (2, 35)
MACOS_VERSION = (14, 0)


def excluded_names(system: str) -> list[str]:
    suffix = ".dylib" if system == "Darwin" else ".so"
    return [stem + suffix for stem in EXTERNAL_LIBRARIES]


def run(cmd: list[str]) -> str:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def platform_tags(wheel: Path) -> list[str]:
    # name-version(-build)?-python-abi-platform.whl; the platform part may be
    # a dotted set of tags.
    return wheel.name[: -len(".whl")].split("-")[-1].split(".")


def repair_linux(wheel: Path, dest: Path) -> None:
    plat = os.environ.get("AUDITWHEEL_PLAT") or (
        f"manylinux_{MANYLINUX_GLIBC[0]}_{MANYLINUX_GLIBC[1]}_{platform.machine()}")
    cmd = ["auditwheel", "repair", "--plat", plat, "--only-plat", "-w", str(dest)]
    for name in excluded_names("Linux"):
        cmd += ["--exclude", name]
    run(cmd + [str(wheel)])


def repair_macos(wheel: Path, dest: Path) -> None:
    # delocate resolves @rpath/libmlx.dylib before it applies --exclude, and
    # libmlx is not in the wheel, so it must be allowed to stay unresolved;
    # check_macos_dependencies() below then fails on anything else missing.
    cmd = ["delocate-wheel", "--require-archs", "arm64", "--ignore-missing-dependencies",
           "-w", str(dest), "-v"]
    for name in excluded_names("Darwin"):
        cmd += ["--exclude", name]
    run(cmd + [str(wheel)])


def check_tags(tags: list[str], system: str) -> None:
    pattern, newest = {
        "Linux": (r"manylinux_(\d+)_(\d+)_(?:x86_64|aarch64)", MANYLINUX_GLIBC),
        "Darwin": (r"macosx_(\d+)_(\d+)_arm64", MACOS_VERSION),
    }[system]
    for tag in tags:
        m = re.fullmatch(pattern, tag)
        assert m, f"unexpected platform tag {tag} (want {pattern})"
        version = (int(m.group(1)), int(m.group(2)))
        assert version <= newest, f"{tag} needs a newer platform than mlx's wheels ({newest})"


def check_macos_dependencies(root: Path) -> None:
    """Every Mach-O dependency is a system library, inside the wheel, or excluded."""
    excluded = set(excluded_names("Darwin"))
    for lib in [*root.rglob("*.so"), *root.rglob("*.dylib")]:
        own_id = {line.strip() for line in run(["otool", "-D", str(lib)]).splitlines()[1:]}
        for line in run(["otool", "-L", str(lib)]).splitlines()[1:]:
            dep = line.strip().split(" (")[0]
            if dep in own_id or dep.startswith(("/usr/lib/", "/System/", "@loader_path/")):
                continue
            assert dep.startswith("@rpath/") and Path(dep).name in excluded, (
                f"{lib.name} depends on {dep}, which is neither in the wheel nor a "
                f"library another wheel provides ({sorted(excluded)})")


def check_repaired(wheel: Path, system: str) -> None:
    tags = platform_tags(wheel)
    print(f"repaired: {wheel.name}")
    check_tags(tags, system)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        with tempfile.TemporaryDirectory() as tmp:
            zf.extractall(tmp)
            if system == "Darwin":
                check_macos_dependencies(Path(tmp))
    # auditwheel renames what it grafts (libmlx-1a2b3c4d.so): match the stem.
    copies = [n for n in names for stem in EXTERNAL_LIBRARIES
              if Path(n).name.startswith(stem) and re.search(r"\.(so|dylib)\b", n)]
    assert not copies, f"libraries other wheels provide were copied in: {copies}"
    assert any(re.search(r"\.dist-info/licenses/LICENSE$", n) for n in names), \
        "LICENSE missing from the wheel's .dist-info/licenses"
    if system == "Darwin":
        assert "mlx_fused_losses/mlx_fused_losses.metallib" in names, \
            "the Metal kernels (mlx_fused_losses.metallib) are not beside _ext"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, dest = Path(sys.argv[1]), Path(sys.argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    system = platform.system()
    before = set(dest.glob("*.whl"))
    if system == "Linux":
        repair_linux(wheel, dest)
    elif system == "Darwin":
        repair_macos(wheel, dest)
    else:
        sys.exit(f"no wheel repair for {system}")
    (repaired,) = set(dest.glob("*.whl")) - before
    check_repaired(repaired, system)


if __name__ == "__main__":
    main()
