"""python -m mlx_fused_losses.check_gpu, the Mac owner's self-check, where no Mac is.

On Linux the command must say there is no Metal device and exit non-zero. Its
logic is not left untested for that: the whole check runs here with the CPU
stream standing in for the GPU (every case builds, differentiates and compares,
the timings run at tiny shapes), and fakes show that a missing kernel name, a
wrong number and a failed timing each make it report FAIL and exit 1.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402
from mlx_fused_losses import check_gpu as cg  # noqa: E402

TINY = cg.TimingShapes(ce=(8, 100), smooth_l1=1000, lce=(8, 32, 100), lce_gemm=((8, 64, 100),))


def plan_names():
    return [name for name, _ in ext.launch_plan_kernels()]


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has a Metal device")
def test_without_metal_it_says_so_and_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "mlx_fused_losses.check_gpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("No Metal device: MLX reports no Metal GPU on this machine")
    assert proc.stderr == ""


def test_help():
    proc = subprocess.run([sys.executable, "-m", "mlx_fused_losses.check_gpu", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--no-timing" in proc.stdout


def test_the_whole_check_runs_with_the_cpu_as_the_device():
    out = io.StringIO()
    rc = cg.run(mx.cpu, mx.cpu, plan_names, timing_shapes=TINY, out=out)
    report = out.getvalue()
    assert rc == 0, report
    cases = cg.default_cases()
    assert f"### GPU vs CPU: {len(cases)} of {len(cases)} passed" in report
    # Every loss and head is in it.
    for what in ("cross_entropy bfloat16 K=5000 soft_others", "softmax_focal_loss float16 K=1000",
                 "sigmoid_focal_loss gamma=1.5 float32 sum broadcast target",
                 "linear_cross_entropy float16 dense", "linear_cross_entropy bfloat16 2-bit",
                 "log_probs float16", "linear_log_probs dense bfloat16", "linear_log_probs 4-bit float32"):
        assert any(c.name.startswith(what) for c in cases), what
    assert "| linear_cross_entropy bfloat16 N=8 H=32 V=100 |" in report
    # the linear CE against MLX's GEMMs on the same shape, dense and 4-bit
    for what in ("forward vs mx.matmul, bfloat16", "forward + backward vs the unfused step, bfloat16",
                 "forward vs mx.quantized_matmul, 4-bit",
                 "forward + backward vs the unfused step, 4-bit",
                 "forward + backward at the CPU's chunk vs the unfused step, bfloat16",
                 "forward + recomputing backward (reduction none) vs the unfused step, bfloat16"):
        assert f"| linear CE {what} N=8 H=64 V=100 |" in report, what
    assert ("| linear_log_probs + entropy forward + backward vs the unfused step, bfloat16 N=8 H=32 V=100 |"
            in report)
    assert "missing from the metallib: 0" in report
    assert report.rstrip().endswith("### Result: PASS")


def test_a_kernel_missing_from_the_metallib_fails():
    out = io.StringIO()
    names = [n for n in plan_names() if n != "fl_lce_dbias"] + ["lce_dbias"]
    rc = cg.run(mx.cpu, mx.cpu, lambda: names, cases=[], timing_shapes=None, out=out)
    report = out.getvalue()
    assert rc == 1
    assert "- MISSING fl_lce_dbias: asked for by lce_dbias_plan()" in report
    assert "asked for by no plan: lce_dbias" in report
    assert report.rstrip().endswith("### Result: FAIL")


def test_a_metallib_that_cannot_be_listed_fails():
    def broken():
        raise RuntimeError("cannot load mlx_fused_losses.metallib")

    out = io.StringIO()
    assert cg.run(mx.cpu, mx.cpu, broken, cases=[], timing_shapes=None, out=out) == 1
    assert "listing failed: RuntimeError: cannot load" in out.getvalue()


class FakeGpu:
    """A 'device' on which the loss is off by 1e-3 relative."""


def test_a_wrong_gpu_number_fails():
    def fn(a, stream):
        y = mx.sin(a)
        return y * (1 + 1e-3) if isinstance(stream, FakeGpu) else y

    def run(check, gpu, cpu):
        x = mx.array(np.linspace(-2, 2, 50).astype(np.float32))
        cg._gpu_vs_cpu(check, fn, [x], mx.ones((50,)), gpu, cpu, 1e-5, 1e-5)

    checks = cg.run_cases([cg.Case("sin", run)], FakeGpu(), mx.cpu)
    assert not checks[0].ok
    assert checks[0].problems[0].startswith("loss: 50 of 50 values differ")
    assert any(p.startswith("grad: ") for p in checks[0].problems)
    # The same case on one device passes.
    assert cg.run_cases([cg.Case("sin", run)], mx.cpu, mx.cpu)[0].ok


def test_a_case_that_raises_is_reported_not_raised():
    def run(check, gpu, cpu):
        raise ValueError("boom")

    checks = cg.run_cases([cg.Case("raises", run)], mx.cpu, mx.cpu)
    assert checks[0].problems == ["raised ValueError: boom"]


def test_a_failed_timing_fails(monkeypatch):
    def broken(stream, shapes):
        raise MemoryError("out of memory")

    monkeypatch.setattr(cg, "time_key_shapes", broken)
    out = io.StringIO()
    assert cg.run(mx.cpu, mx.cpu, plan_names, cases=[], timing_shapes=TINY, out=out) == 1
    assert "not measured: MemoryError: out of memory" in out.getvalue()


# ---- the tolerances: flushed float32 subnormals pass, real differences do not -----------------


def test_flushed_subnormals_agree():
    expected = np.array([1e-39, -5e-39, 3e-40])  # float32 subnormals
    flushed = np.zeros(3)
    # Alone (no larger value to scale the tolerance by), only the flush floor admits them.
    assert cg.disagreement(flushed, expected, 1e-5) is None
    assert cg.FLUSH_ATOL == np.finfo(np.float32).tiny


@pytest.mark.parametrize("actual, expected, message", [
    ([0.0], [1e-30], "1 of 1 values differ"),  # a normal float32 is not flushed
    ([1.0, 2.0], [1.0, 2.001], "1 of 2 values differ"),
    ([np.nan, 1.0], [1.0, 1.0], "NaN pattern differs"),
    ([np.inf, 1.0], [-np.inf, 1.0], "infinity pattern differs"),
    ([1.0], [1.0, 2.0], "shape"),
])
def test_real_differences_disagree(actual, expected, message):
    assert message in cg.disagreement(actual, expected, 1e-5)


def test_names_compare_both_ways():
    r = cg.compare_names(["a", "b", "z"], [("a", "p1"), ("c", "p2"), ("c", "p3")])
    assert r.missing == {"c": ["p2", "p3"]} and r.unplanned == ["b", "z"] and not r.ok
    assert (r.metallib, r.planned) == (3, 2)
    assert cg.compare_names(["a"], [("a", "p")]).ok
