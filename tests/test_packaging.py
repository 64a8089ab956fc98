"""The installed distribution: the mlx version guard, the metadata, the license.

CI runs these against the auditwheel-repaired wheel (.ci/run); cibuildwheel
runs them against every release wheel.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlx_fused_losses as fl
from mlx_fused_losses import _mlx_guard

DIST = "mlx-fused-losses"
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_build_info_records_the_installed_mlx():
    import mlx.core as mx

    assert fl._build_info.MLX_VERSION == metadata.version("mlx") == mx.__version__


def import_with_recorded_mlx(version: str) -> dict:
    """Import the package in a fresh interpreter whose _build_info says `version`.

    The test fakes the *recorded* build version with a patched module placed in
    sys.modules before the import (nothing in the package reads an override).
    """
    code = textwrap.dedent(f"""
        import json, sys, types
        fake = types.ModuleType("mlx_fused_losses._build_info")
        fake.MLX_VERSION = {version!r}
        sys.modules["mlx_fused_losses._build_info"] = fake
        try:
            import mlx_fused_losses
            error = None
        except ImportError as e:
            error = str(e)
        print(json.dumps({{"error": error,
                          "ext_loaded": "mlx_fused_losses._ext" in sys.modules,
                          "mlx_core_loaded": "mlx.core" in sys.modules}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_refuses_an_mlx_other_than_the_build_one():
    installed = metadata.version("mlx")
    result = import_with_recorded_mlx("0.31.0")
    error = result["error"]
    assert error is not None, "import succeeded next to a different mlx"
    # Names both versions and says what to install.
    assert "0.31.0" in error and installed in error, error
    assert f'pip install "{_mlx_guard.mlx_requirement("0.31.0")}"' in error, error
    # Raised before the compiled module (or even mlx.core) was loaded.
    assert not result["ext_loaded"] and not result["mlx_core_loaded"]


def test_import_accepts_the_build_mlx():
    result = import_with_recorded_mlx(metadata.version("mlx"))
    assert result == {"error": None, "ext_loaded": True, "mlx_core_loaded": True}


def fake_installed(monkeypatch, versions: dict[str, str]):
    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(_mlx_guard.metadata, "version", version)


def test_guard_checks_the_library_wheel_too(monkeypatch):
    # A user who upgraded mlx-cpu alone has the right bindings but another libmlx.
    fake_installed(monkeypatch, {"mlx": "0.32.4", "mlx-cpu": "0.33.0"})
    with pytest.raises(ImportError, match=r"mlx-cpu 0\.33\.0"):
        _mlx_guard.check_mlx_version("0.32.4")
    fake_installed(monkeypatch, {"mlx": "0.32.4", "mlx-metal": "0.32.4"})
    _mlx_guard.check_mlx_version("0.32.4")


def test_guard_without_mlx(monkeypatch):
    fake_installed(monkeypatch, {})
    with pytest.raises(ImportError, match=r"mlx is not installed: pip install"):
        _mlx_guard.check_mlx_version("0.32.4")


def test_install_hint_per_platform():
    assert _mlx_guard.mlx_requirement("1.2.3", "linux") == "mlx[cpu]==1.2.3"
    assert _mlx_guard.mlx_requirement("1.2.3", "darwin") == "mlx==1.2.3"


def test_version_comes_from_the_metadata():
    assert fl.__version__ == metadata.version(DIST)
    assert re.fullmatch(r"\d+\.\d+\.\d+", fl.__version__)


def test_metadata_requires_mlx_once_per_platform():
    from packaging.requirements import Requirement

    def mlx_lines(platform_system):
        env = {"platform_system": platform_system, "extra": ""}
        reqs = [Requirement(r) for r in metadata.requires(DIST)]
        return [r for r in reqs if r.name == "mlx" and (r.marker is None or r.marker.evaluate(env))]

    (linux,) = mlx_lines("Linux")
    assert linux.extras == {"cpu"} and str(linux.specifier) == f"=={fl._build_info.MLX_VERSION}"
    (mac,) = mlx_lines("Darwin")
    assert mac.extras == set() and str(mac.specifier) == f"=={fl._build_info.MLX_VERSION}"


def test_license_ships_with_the_distribution():
    meta = metadata.metadata(DIST)
    assert meta["License"] == "MIT"
    assert "License :: OSI Approved :: MIT License" in meta.get_all("Classifier")
    (license_file,) = [f for f in metadata.files(DIST) if f.name == "LICENSE"]
    text = license_file.read_text()
    assert text.startswith("MIT License") and "the mlx-fused-losses authors" in text


def test_classifiers_match_the_release_builds():
    """The Python versions advertised are the ones cibuildwheel builds wheels for."""
    tomllib = pytest.importorskip("tomllib")
    pyproject_path = REPO_ROOT / "pyproject.toml"
    if not pyproject_path.exists():
        pytest.skip("pyproject.toml is not beside the tests")
    pyproject = tomllib.loads(pyproject_path.read_text())
    built = {f"3.{m}" for m in re.findall(r"\bcp3(\d+)t?-", pyproject["tool"]["cibuildwheel"]["build"])}
    classified = {c.rsplit(" :: ", 1)[1] for c in metadata.metadata(DIST).get_all("Classifier")
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert built == classified
    lowest = min(built, key=lambda v: int(v.split(".")[1]))
    assert metadata.metadata(DIST)["Requires-Python"] == f">={lowest}"


@pytest.mark.skipif(sys.platform != "darwin", reason="the metallib exists only in macOS builds")
def test_metallib_beside_ext():
    ext_dir = Path(fl._ext.__file__).parent
    assert (ext_dir / "mlx_fused_losses.metallib").is_file()


def load_repair_script():
    path = REPO_ROOT / ".ci" / "repair_wheel.py"
    if not path.exists():
        pytest.skip(".ci/repair_wheel.py is not beside the tests")
    import importlib.util

    spec = importlib.util.spec_from_file_location("repair_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repair_checks_reject_what_pypi_users_cannot_install():
    repair = load_repair_script()
    repair.check_tags(["manylinux_2_35_x86_64"], "Linux")
    repair.check_tags(["manylinux_2_28_aarch64"], "Linux")
    repair.check_tags(["macosx_14_0_arm64"], "Darwin")
    for tags, system in [(["linux_x86_64"], "Linux"), (["manylinux_2_39_x86_64"], "Linux"),
                         (["macosx_15_0_arm64"], "Darwin"), (["macosx_14_0_x86_64"], "Darwin")]:
        with pytest.raises(AssertionError):
            repair.check_tags(tags, system)


def test_repair_checks_reject_a_grafted_libmlx(tmp_path):
    import zipfile

    repair = load_repair_script()

    def wheel(*members):
        path = tmp_path / "mlx_fused_losses-0.1.0-cp311-cp311-manylinux_2_35_x86_64.whl"
        with zipfile.ZipFile(path, "w") as zf:
            for name in members:
                zf.writestr(name, "")
        return path

    ok = ["mlx_fused_losses/_ext.so", "mlx_fused_losses-0.1.0.dist-info/licenses/LICENSE"]
    repair.check_repaired(wheel(*ok), "Linux")
    with pytest.raises(AssertionError, match="copied in"):
        repair.check_repaired(wheel(*ok, "mlx_fused_losses.libs/libmlx-1a2b3c4d.so"), "Linux")
    with pytest.raises(AssertionError, match="LICENSE"):
        repair.check_repaired(wheel(ok[0]), "Linux")
