"""Every kernel name a launch plan can ask for is one metal/*.metal defines.

The names on both sides are derived, never typed: the plans' from
`_ext.launch_plan_kernels()` (csrc/metal/launch_plan.cpp calls every plan
function over the whole option space the host can plan for), the sources' from
the .metal files after preprocessing (tests/metal_host/kernel_names.py). On a Mac
`python -m mlx_fused_losses.check_gpu` makes the same comparison against the
loaded metallib. A misspelling planted on either side must fail the check.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import metal_host as mh
from conftest import CLANG_MISSING
from metal_host.kernel_names import (
    KernelNameError,
    compare_with_plans,
    kernel_instances,
    kernel_names,
    mark_kernels,
    parse_preprocessed,
)

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METAL = sorted((REPO / "metal").glob("*.metal"))
needs_clang = pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)


def plan_names() -> set[str]:
    return {name for name, _ in ext.launch_plan_kernels()}


@needs_clang
def test_every_plan_kernel_is_defined_and_every_kernel_planned():
    problems = compare_with_plans(plan_names(), kernel_names(METAL))
    assert not problems, "\n".join(problems)


def test_the_enumeration_covers_the_option_space():
    # Not a list of names: the shape of what the enumeration must have reached.
    kernels = dict(ext.launch_plan_kernels())
    names = set(kernels)
    for d in ("float32", "float16", "bfloat16"):
        for variant in ("block", "looped"):
            assert f"fl_sf_fwd_{variant}_{d}" in names
            assert f"fl_ce_fwd_{variant}_soft_w_{d}" in names
        assert f"fl_pw_bwd_sigmoid_focal_g2_{d}_bcast" in names
        for bits in (1, 2, 3, 4, 5, 6, 8):
            assert f"fl_lce_dh_q{bits}_{d}" in names
            for tile in ("bm64_bn64_bk16_wm2_wn2", "bm64_bn32_bk32_wm2_wn2"):  # s, g/p classes
                assert f"fl_lce_fwd_{d}_q{bits}_bfloat16_{tile}" in names
        # the Ultra's 16-bit tile for a dense head of the hidden dtype
        if d != "float32":
            assert f"fl_lce_dz_{d}_w{d}_bm64_bn64_bk16_wm1_wn2" in names
    assert "fl_pw_bwd_huber_float16_cot16" in names and "fl_pw_sum_finish" in names
    for mode in ("mxfp4", "mxfp8", "nvfp4", "nvfp4_global"):
        assert f"fl_lce_dz_float16_{mode}_bm64_bn32_bk32_wm2_wn2" in names
        assert f"fl_lce_dh_{mode}" in names
    # The call that asked for a name is reported with it.
    assert kernels["fl_pw_sum_finish"].startswith("pw_sum_finish_plan(")


@needs_clang
def test_derived_names_agree_with_the_harness_table():
    # The harness's kernel table comes from the same derivation (build.py);
    # the instantiations it records name the C++ function the harness calls.
    inst = {k.name: k for k in kernel_instances(METAL)}
    assert inst["fl_ce_fwd_looped_soft_w_float16"].function == "ce_forward<half, true, true, true>"
    assert inst["fl_pw_sum_finish"].function == "fl_pw_sum_finish"  # a plain [[kernel]]
    assert all(k.source.startswith("metal/") for k in inst.values())


def _copy_sources(tmp_path: Path) -> Path:
    """metal/ copied, with csrc/ beside it (the kernels include ../csrc/...)."""
    shutil.copytree(REPO / "metal", tmp_path / "metal")
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    return tmp_path / "metal"


# A misspelling planted into a copy of the sources: (file, right, wrong, the name
# no longer defined). One in a host_name macro, one in a plain kernel.
PLANTED_SOURCE = [
    ("cross_entropy.metal", '"fl_ce_bwd_" #tgt', '"fl_ce_bwd" #tgt', "fl_ce_bwd_soft_w_float16"),
    ("linear_cross_entropy.metal", "void fl_lce_dbias(", "void fl_lce_dbais(", "fl_lce_dbias"),
    ("pointwise_loss.metal", "FL_INST_PW(float16, half)", "FL_INST_PW(float_16, half)",
     "fl_pw_fwd_partial_huber_float16_bcast"),
]


@needs_clang
@pytest.mark.parametrize("path, right, wrong, lost", PLANTED_SOURCE, ids=lambda v: str(v)[:30])
def test_a_misspelt_source_fails_the_check(tmp_path, path, right, wrong, lost):
    metal = _copy_sources(tmp_path)
    text = (metal / path).read_text()
    assert text.count(right) == 1, f"{path} no longer contains {right!r}"
    (metal / path).write_text(text.replace(right, wrong))
    problems = compare_with_plans(plan_names(), kernel_names(sorted(metal.glob("*.metal"))))
    assert f"a launch plan asks for {lost!r}, which no .metal source defines" in problems


PROGRAM = r"""
#include <cstdio>
#include "metal/launch_plan.h"
int main() {
  for (const auto& k : fl::mplan::enumerate_plan_kernels()) std::printf("%s\n", k.kernel.c_str());
}
"""


def _enumerate_with(csrc: Path, tmp_path: Path) -> set[str]:
    """The enumeration of a launch_plan.cpp compiled on its own (plain C++)."""
    main = tmp_path / "main.cpp"
    main.write_text(PROGRAM)
    exe = tmp_path / "enumerate"
    cmd = [mh.find_clang(), "-std=c++20", "-O0", f"-I{csrc}", str(main),
           str(csrc / "metal" / "launch_plan.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return set(subprocess.run([str(exe)], check=True, capture_output=True,
                              text=True).stdout.split())


@needs_clang
def test_a_misspelt_plan_fails_the_check(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    # As built: the same names as _ext's enumeration.
    assert _enumerate_with(csrc, tmp_path) == plan_names()
    plan = csrc / "metal" / "launch_plan.cpp"
    text = plan.read_text()
    right = '"fl_lce_fwd_finish"'
    assert text.count(right) == 1
    plan.write_text(text.replace(right, '"fl_lce_fwd_finsh"'))
    problems = compare_with_plans(_enumerate_with(csrc, tmp_path), kernel_names(METAL))
    assert "a launch plan asks for 'fl_lce_fwd_finsh', which no .metal source defines" in problems
    assert "'fl_lce_fwd_finish' is defined by the .metal sources but no launch plan asks for it" \
        in problems


# ---- the parser on small preprocessed sources -----------------------------------------

def test_parser_reads_every_way_msl_names_a_kernel():
    msl = """
    template <typename T> [[kernel]] void f(device T* x) {}
    template [[host_name("f_" "float")]] [[kernel]] decltype(f<float>) f<float>;
    template [[kernel]] [[host_name("f_half")]] decltype(f<half>) f<half>;
    template [[host_name("f_int")]] [[kernel]] void f<int>(device int* x);
    [[kernel]] void plain(device float* x) {}
    kernel void keyword_form(device float* x) {}
    [[kernel, host_name("renamed")]] void g(device float* x) {}
    void not_a_kernel(device float* x) {}
    """
    got = {(k.name, k.function) for k in parse_preprocessed(mark_kernels(msl), "x.metal")}
    assert got == {("f_float", "f<float>"), ("f_half", "f<half>"), ("f_int", "f<int>"),
                   ("plain", "plain"),
                   ("keyword_form", "keyword_form"), ("renamed", "g")}


def test_parser_rejects_an_unnamed_instantiation():
    with pytest.raises(KernelNameError, match="without host_name"):
        parse_preprocessed(mark_kernels("template [[kernel]] decltype(f<int>) f<int>;"), "x.metal")


def test_compare_reports_both_directions():
    assert compare_with_plans({"a", "b"}, {"a", "b"}) == []
    assert compare_with_plans({"a", "x"}, {"a", "y"}) == [
        "a launch plan asks for 'x', which no .metal source defines",
        "'y' is defined by the .metal sources but no launch plan asks for it"]


@needs_clang
def test_a_name_defined_twice_is_an_error(tmp_path):
    metal = _copy_sources(tmp_path)
    shutil.copy(metal / "softmax_focal.metal", metal / "softmax_focal_copy.metal")
    with pytest.raises(KernelNameError, match="defined twice"):
        kernel_instances(sorted(metal.glob("*.metal")))
