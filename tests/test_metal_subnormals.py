"""The Metal kernels run as an Apple GPU runs them: float32 subnormals flushed to zero.

Apple GPUs flush float32 (and so bfloat16) subnormals to zero, in operands and results,
even without fast math (ml-explore/mlx#4205: MLX's -fno-fast-math kernels on an M3 Pro;
float16 keeps its subnormals); the CPU build keeps them. The harness's flush mode
(MH_FLUSH_SUBNORMALS=1 or lib.run(..., flush_subnormals=True); metal_host/runtime.cpp;
tests/test_metal_harness.py::test_flush_subnormals_mode_flushes_like_an_apple_gpu
proves that it flushes) runs the real kernels that way, and here:

1. inputs built to make subnormals (softmax probabilities and sigmoid tails of
   e^-88 .. e^-104, differences of 1e-39 in the element-wise losses) go through the
   cross-entropy (block and looped), sigmoid focal and smooth-L1 kernels flushed, and
   must agree with the CPU primitive within the GPU tests' tolerances (tests/test_gpu.py's
   TOL and close, the ones a Mac applies to the real GPU); the same launch without the
   mode must produce subnormals that the mode turns into zeros (else the case proves
   nothing);
2. representative parts of the kernel suites run again in subprocesses under the mode,
   with their own assertions (SUITE_PARTS: 190 of test_metal_kernels.py's 677 cases,
   18 of the linear cross-entropy's and quantized head's 277; ~30 s + ~25 s here).
   The whole suites pass under the mode too (`MH_FLUSH_SUBNORMALS=1 python -m pytest
   tests/test_metal_kernels.py tests/test_metal_linear_cross_entropy.py
   tests/test_metal_quantized_head.py`: 677 passed in 3.7 min; 276 passed and the one
   skip of a normal run in 2.6 min, on this project's 2-core CI-sized machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING

pytestmark = pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)

import test_gpu  # noqa: E402  (the GPU tests' tolerances: TOL, close)
import test_metal_kernels as kernels  # noqa: E402  (the harness runners)

mx = kernels.mx
ext = kernels.ext
TINY = float(np.finfo(np.float32).tiny)
REPO = Path(__file__).resolve().parents[1]

# The kernel suite's own library fixture: the same kernels, adaptor and build.
lib = kernels.lib


def flushed_and_plain(monkeypatch, run):
    """run() with the mode on, then off (the env var is the runners' default)."""
    monkeypatch.setenv(mh.FLUSH_SUBNORMALS_ENV, "1")
    flushed = run()
    monkeypatch.setenv(mh.FLUSH_SUBNORMALS_ENV, "0")
    return flushed, run()


def assert_flushed_somewhere(flushed, plain, what):
    """The case reaches subnormals: somewhere the IEEE result is one and the flushed is 0."""
    sub = (np.abs(plain) > 0) & (np.abs(plain) < TINY)
    assert np.any(sub & (flushed == 0)), f"{what}: no subnormal result was flushed"


@pytest.mark.parametrize("K", [33, 4097])  # block and looped row kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_with_flushed_subnormals(lib, monkeypatch, dtype, K):
    # Row 0: logits 0 .. -104 (probabilities down to e^-104; the kernels, like the CPU
    # build, give gradient 0 below FLT_MIN there, so the mode changes nothing in it);
    # row 1: subnormal logits (read as 0 under the mode); row 2: ordinary.
    x = np.stack([np.linspace(0.0, -104.0, K), np.full(K, 3e-39), np.linspace(-2.0, 2.0, K)])
    x = x.astype(np.float32)
    t = np.array([0, K - 1, K // 2], np.int64)
    w = np.ones(K, np.float32)
    case = kernels.CE_CASES["plain"]

    def run():
        return kernels.ce_run(lib, dtype, K, case, np.random.default_rng(K), inputs=(x, t, w))

    flushed, plain = flushed_and_plain(monkeypatch, run)
    np.testing.assert_array_equal(flushed["grad"][0][np.abs(plain["grad"][0]) < TINY], 0)

    xm = kernels.mx_array(flushed["x"], dtype)
    cpu_loss = kernels.np_of(ext.cross_entropy(xm, mx.array(t), stream=mx.cpu))
    _, (cpu_grad,) = mx.vjp(lambda a: ext.cross_entropy(a, mx.array(t), stream=mx.cpu),
                            [xm], [mx.array(flushed["g_loss"])])
    tol = test_gpu.TOL[dtype]
    test_gpu.close(flushed["loss"].astype(np.float64), cpu_loss.astype(np.float64), tol)
    test_gpu.close(flushed["grad"].astype(np.float64), kernels.np_of(cpu_grad).astype(np.float64),
                   tol + 1e-5)


@pytest.mark.parametrize("case", ["sigmoid_bce", "sigmoid_focal", "smooth_l1"])
def test_pointwise_with_flushed_subnormals(lib, monkeypatch, case):
    kind, p0, p1 = {"sigmoid_bce": (2, -1.0, 0.0), "sigmoid_focal": (2, 0.25, 2.0),
                    "smooth_l1": (0, 1.0, 0.0)}[case]
    n = 257
    if kind == 2:
        # Sigmoid tails: loss and gradient ~ e^x (BCE) or ~ e^2x (gamma = 2) are float32
        # subnormals somewhere in x in [-104, -30]; and ordinary values.
        x = np.concatenate([np.linspace(-104.0, -30.0, n - 64), np.linspace(-3, 3, 64)])
        t = np.zeros(n)
    else:
        # Differences of 1e-39 (subnormal): gradient d / beta subnormal, loss 0; the
        # rest d = 0, so the whole expected gradient is subnormal-sized (the GPU
        # tolerance's FLT_MIN floor is what admits the flushed zeros).
        t = np.linspace(-2.0, 2.0, n)
        x = t.copy()
        x[: n - 64] = 0.0
        t[: n - 64] = np.float32(1e-39)
    x, t = x.astype(np.float32), t.astype(np.float32)
    cot = np.ones(n, np.float32)

    def run():
        return kernels.pw_run(lib, kind, "none", x, t, p0, p1, cot)

    (loss_f, grad_f), (loss_p, grad_p) = flushed_and_plain(monkeypatch, run)
    assert_flushed_somewhere(grad_f, grad_p, "gradient")

    xm, tm = mx.array(x), mx.array(t)
    cpu = kernels.np_of(kernels.pw_cpu(kind, p0, p1, xm, tm, "none"))
    _, (cpu_grad,) = mx.vjp(lambda a: kernels.pw_cpu(kind, p0, p1, a, tm, "none"), [xm],
                            [mx.array(cot)])
    tol = test_gpu.TOL["float32"]
    test_gpu.close(loss_f.astype(np.float64), cpu.astype(np.float64), tol)
    test_gpu.close(grad_f.astype(np.float64), kernels.np_of(cpu_grad).astype(np.float64),
                   tol + 1e-5)


# Representative parts of the kernel suites: every test function of test_metal_kernels.py,
# its three large parametrized families (cross-entropy, softmax focal, element-wise) only
# at size 33 and 4097, and not the check that the whole file ran every instantiation (a
# subset does not); the linear cross-entropy's dtype pairs and its few-hundred shape
# (3 row chunks), and the quantized head at every bits x group size and every fp mode.
SUITE_PARTS = {
    "kernels": (["tests/test_metal_kernels.py"],
                "(not test_cross_entropy and not test_softmax_focal and not test_pointwise"
                " or 33 or 4097) and not test_zz_every_instantiation_ran", 150),
    "linear_ce": (["tests/test_metal_linear_cross_entropy.py",
                   "tests/test_metal_quantized_head.py"],
                  "test_dtype_pairs or test_a_few_hundred"
                  " or test_every_bits_and_group_size and not all_schedules"
                  " or test_fp_modes_every_tile", 17),
}


@pytest.mark.parametrize("part", list(SUITE_PARTS))
def test_kernel_suites_pass_with_flushed_subnormals(part):
    files, select, at_least = SUITE_PARTS[part]
    env = {**os.environ, mh.FLUSH_SUBNORMALS_ENV: "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
         "-k", select],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= at_least, summary
