"""Refuse to load the compiled module next to an mlx it was not built against.

``_ext`` is compiled against one exact mlx release (MLX's C++ API and nanobind's
ABI change between releases). Loaded next to another one it either fails with
undefined symbols or, worse, imports and then rejects every ``mx.array`` with
nanobind's "incompatible function arguments". So ``import mlx_fused_losses``
compares the recorded build version (``_build_info.py``, written by CMake) with
the installed distributions first, before ``mlx.core`` or ``_ext`` is imported,
and raises an ImportError that says what to install.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

# The distributions _ext binds to: mlx (mlx.core, whose nanobind types _ext
# shares) and the ones that ship libmlx itself (mlx-cpu on Linux, mlx-metal on
# macOS). Each one that is installed must be the build's release.
MLX_DISTRIBUTIONS = ("mlx", "mlx-cpu", "mlx-metal")


def mlx_requirement(version: str, platform: str = sys.platform) -> str:
    """The pip requirement that installs this mlx release with its library."""
    # Plain mlx on Linux has no libmlx: the CPU build comes with the extra.
    extra = "[cpu]" if platform.startswith("linux") else ""
    return f"mlx{extra}=={version}"


def installed_mlx_versions() -> dict[str, str]:
    found = {}
    for name in MLX_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def check_mlx_version(built_with: str) -> None:
    """Raise ImportError unless the installed mlx is the release ``built_with``."""
    install = f'pip install "{mlx_requirement(built_with)}"'
    found = installed_mlx_versions()
    if "mlx" not in found:
        raise ImportError(
            f"mlx_fused_losses was built against mlx {built_with}, but mlx is not "
            f"installed: {install}"
        )
    wrong = {name: version for name, version in found.items() if version != built_with}
    if wrong:
        installed = ", ".join(f"{name} {version}" for name, version in wrong.items())
        raise ImportError(
            f"mlx_fused_losses was built against mlx {built_with}, but {installed} "
            f"is installed. Its compiled module works only with the mlx release it "
            f"was built against (MLX's C++ API and ABI change between releases): "
            f"{install}, or install a mlx-fused-losses release built for mlx "
            f"{found['mlx']}."
        )
