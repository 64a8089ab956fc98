"""eval_gpu host code (csrc/metal/*.cpp, csrc/ops/*.cpp under _METAL_) compiled with
clang-19 -fsyntax-only against MLX's real Metal backend headers and Apple's
metal-cpp from the macOS mlx-metal wheel (downloaded once: metal_host/mlx_headers.py), with a few Apple system headers stubbed
(tests/metal_host_code/README.md). Planted wrong calls must be rejected.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import CLANG_MISSING
from metal_host import mlx_headers

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "metal_host_code" / "apple_stubs"
SOURCES = sorted((REPO / "csrc" / "metal").glob("*.cpp")) + sorted((REPO / "csrc" / "ops").glob("*.cpp"))
CLANG = os.environ.get("MH_CLANGXX") or shutil.which("clang++-19")

pytestmark = pytest.mark.skipif(CLANG is None, reason=CLANG_MISSING)


@pytest.fixture(scope="module")
def mlx_metal_include() -> Path:
    try:
        return mlx_headers.mlx_metal_include()
    except mlx_headers.HeadersUnavailable as why:
        pytest.skip(f"cannot get the macOS mlx-metal wheel's headers: {why}")


def syntax_check(source: Path, include: Path) -> subprocess.CompletedProcess:
    cmd = [CLANG, "-std=c++20", "-fsyntax-only", "-fblocks", "-D_METAL_",
           f"-I{REPO / 'csrc'}", f"-I{include}", f"-I{include / 'metal_cpp'}", f"-I{STUBS}",
           "-x", "c++", str(source)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_host_code_compiles_against_real_headers(source, mlx_metal_include):
    proc = syntax_check(source, mlx_metal_include)
    assert proc.returncode == 0, proc.stderr


def test_the_headers_are_the_real_ones(mlx_metal_include):
    # eval_gpu's calls resolve into MLX's encoder and metal-cpp's pipeline state.
    device_h = (mlx_metal_include / "mlx" / "backend" / "metal" / "device.h").read_text()
    assert "class MLX_API CommandEncoder" in device_h and "set_input_array" in device_h
    pipeline = mlx_metal_include / "metal_cpp" / "Metal" / "MTLComputePipeline.hpp"
    assert "maxTotalThreadsPerThreadgroup" in pipeline.read_text()


# Wrong calls planted into real eval_gpu code: each must fail to compile.
PLANTED = [
    # Arguments of MLX's CommandEncoder::set_output_array swapped.
    ("csrc/metal/pointwise_loss.cpp", "enc.set_output_array(out, FL_PW_FWD_OUT);",
     "enc.set_output_array(FL_PW_FWD_OUT, out);", "set_output_array"),
    # A metal-cpp method misspelt (capital G), as a stand-in Metal.hpp might accept.
    ("csrc/metal/host.h", "maxTotalThreadsPerThreadgroup()", "maxTotalThreadsPerThreadGroup()",
     "no member named 'maxTotalThreadsPerThreadGroup'"),
    # dispatch_threadgroups takes two MTL::Size values.
    ("csrc/metal/host.h", "MTL::Size(p.group[0], p.group[1], p.group[2]));",
     "p.group[0]);", "dispatch_threadgroups"),
    # The commit of an older MLX (metal::Device::commit_command_buffer, before the
    # CommandEncoder owned its command buffer): not in 0.32.4's encoder.
    ("csrc/metal/host.h", "enc.commit([kept = kept_]() {});", "enc.commit_command_buffer();",
     "no member named 'commit_command_buffer'"),
    # metal-cpp's completion handler takes the command buffer.
    ("csrc/metal/host.h", "addCompletedHandler([kept = kept_](MTL::CommandBuffer*) {});",
     "addCompletedHandler([kept = kept_]() {});", "addCompletedHandler"),
    # The metallib's function list (check_gpu's self-check): NS::String has no c_str().
    ("csrc/metal/library_names.cpp", "->utf8String()", "->c_str()", "c_str"),
]


def test_every_eval_gpu_launches_through_the_helper():
    # The prologue (device, plan fit, empty plan, encoder, pipeline) is written once,
    # in gpu::launch (csrc/metal/host.h); the eval_gpu files only call it.
    sources = sorted((REPO / "csrc" / "metal").glob("*.cpp")) + sorted((REPO / "csrc" / "ops").glob("*.cpp"))
    with_eval_gpu = 0
    for path in sources:
        text = path.read_text()
        for call in ("fit_plan(", "set_compute_pipeline_state(", "get_kernel(", "metal::device("):
            assert call not in text, f"{path.name} calls {call} itself: use gpu::launch"
        if "::eval_gpu(" in text:
            with_eval_gpu += 1
            assert "gpu::launch(" in text, path.name
    assert with_eval_gpu >= 4


def test_the_metallib_listing_is_checked():
    # _ext.metallib_function_names (macOS) is host code like eval_gpu's.
    assert REPO / "csrc" / "metal" / "library_names.cpp" in SOURCES


@pytest.mark.parametrize("path, right, wrong, diagnostic", PLANTED, ids=lambda v: str(v)[:40])
def test_a_planted_wrong_call_is_rejected(tmp_path, mlx_metal_include, path, right, wrong,
                                          diagnostic):
    # A copy of csrc/ with one wrong call; the file compiled is one that uses it.
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    target = tmp_path / path
    text = target.read_text()
    assert text.count(right) == 1, f"{path} no longer contains {right!r}"
    target.write_text(text.replace(right, wrong))
    source = tmp_path / (path if path.endswith(".cpp") else "csrc/metal/pointwise_loss.cpp")
    cmd = [CLANG, "-std=c++20", "-fsyntax-only", "-fblocks", "-D_METAL_", f"-I{csrc}",
           f"-I{mlx_metal_include}", f"-I{mlx_metal_include / 'metal_cpp'}", f"-I{STUBS}",
           str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0, f"{wrong!r} compiled"
    assert diagnostic in proc.stderr, proc.stderr[-2000:]
