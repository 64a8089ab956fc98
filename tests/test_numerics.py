"""Numerical hardening of the CPU kernels (issue 7 "Numerics", issue 10
"Backward accuracy"): large logit offsets, gradient accuracy at scale,
confident sigmoid predictions, NaN propagation, infinities, and results that do
not depend on position, alignment or thread count. Each test here failed
before its fix. The Metal kernels get the same checks in
tests/test_metal_kernels.py (CPU harness)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R


def _rel_l2(got, want):
    got = np.array(got, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# --------------------------------------------------------------------------
# cross-entropy at large logits (item 2)
# --------------------------------------------------------------------------
CE_LARGE_CASES = {
    "hard": dict(soft=False),
    "smoothed": dict(soft=False, label_smoothing=0.1),
    "others": dict(soft=False, label_smoothing=0.1, label_smoothing_mode="others"),
    "weighted": dict(soft=False, weights=True, z_loss=1e-4),
    "soft": dict(soft=True),
    "soft_smoothed_weighted": dict(soft=True, label_smoothing=0.1, weights=True),
}


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("case", list(CE_LARGE_CASES))
def test_cross_entropy_large_offset(fl, offset, case):
    """Logits offset + N(0, 1), K = 4097: within 1e-6 relative of float64 on
    the same float32 inputs (a gap from raw running sums lost 2.4e-5 with
    smoothing and 2e-4 / 1.6e-3 with soft targets at 1e4 / 1e5)."""
    opts = dict(CE_LARGE_CASES[case])
    soft, weights = opts.pop("soft"), opts.pop("weights", False)
    rng = np.random.default_rng(int(offset) + len(case))
    N, K = 8, 4097
    x = (offset + rng.standard_normal((N, K))).astype(np.float32)
    if soft:
        t = rng.random((N, K))
        t = (t / t.sum(-1, keepdims=True)).astype(np.float32)
    else:
        t = rng.integers(0, K, N)
    cw = rng.uniform(0.5, 2.0, K).astype(np.float32) if weights else None
    out = fl.cross_entropy(mx.array(x), mx.array(t), reduction="none",
                           class_weights=None if cw is None else mx.array(cw), **opts)
    ref = R.cross_entropy(x, t, class_weights=cw, **opts)
    err = np.abs(np.array(out, np.float64) - ref) / np.abs(ref)
    assert err.max() <= 1e-6, f"max relative error {err.max():.3g}"


# --------------------------------------------------------------------------
# gradient accuracy at scale (issue 10)
# --------------------------------------------------------------------------
def _scaled_logits(which, rng, shape=(64, 1000)):
    if which == "std50":
        return (50 * rng.standard_normal(shape)).astype(np.float32)
    return (1000 + rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("which", ["std50", "shift1000"])
def test_cross_entropy_grad_accurate_at_scale(fl, which):
    """exp(x - lse) with one float32 lse costs |lse| * 2^-24 in every exponent
    (rel-L2 2.1e-6 at std 50, 9.2e-7 at +1000 before). With lse + lse_lo the
    gradient is as accurate as mlx.nn.losses' (2.9e-8 here) or better."""
    rng = np.random.default_rng(1)
    x = _scaled_logits(which, rng)
    t = rng.integers(0, x.shape[1], x.shape[0])
    xm, tm = mx.array(x), mx.array(t)
    ref = R.cross_entropy_grad(x, t, reduction="sum")
    ours = _rel_l2(mx.grad(lambda a: fl.cross_entropy(a, tm, reduction="sum"))(xm), ref)
    theirs = _rel_l2(mx.grad(lambda a: nn.losses.cross_entropy(a, tm, reduction="sum"))(xm), ref)
    assert ours <= max(1.5 * theirs, 5e-8), (ours, theirs)


@pytest.mark.parametrize("which", ["std50", "shift1000"])
def test_softmax_focal_grad_accurate_at_scale(fl, which):
    """The same for the softmax focal loss (2.1e-6 / 9.8e-7 before)."""
    rng = np.random.default_rng(2)
    x = _scaled_logits(which, rng)
    t = rng.integers(0, x.shape[1], x.shape[0])
    ref = R.softmax_focal_grad(x, t, gamma=2.0, reduction="sum")
    g = mx.grad(lambda a: fl.softmax_focal_loss(a, mx.array(t), gamma=2.0, reduction="sum"))
    assert _rel_l2(g(mx.array(x)), ref) <= 3e-7


@pytest.mark.parametrize("which", ["std50", "shift1000"])
def test_soft_target_grad_accurate_at_scale(fl, which):
    """d loss / d t_j = c_target w_j (lse - x_j), formed as (lse - x_j) + lse_lo."""
    rng = np.random.default_rng(3)
    x = _scaled_logits(which, rng, (16, 300))
    p = rng.random(x.shape)
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    g = mx.grad(lambda b: fl.cross_entropy(mx.array(x), b, reduction="sum"))(mx.array(p))
    ref = R.logsumexp(x)[:, None] - x.astype(np.float64)
    assert _rel_l2(g, ref) <= 1e-7


# --------------------------------------------------------------------------
# NaN propagates, forward and backward (item 1)
# --------------------------------------------------------------------------
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
NAN_AT = [0, 17, 36]  # vector body and scalar tail of a 37-element row


def _elementwise_cases(fl):
    return {
        "smooth_l1": lambda x, t, **kw: fl.smooth_l1_loss(x, t, beta=1.0, **kw),
        "smooth_l1_beta0": lambda x, t, **kw: fl.smooth_l1_loss(x, t, beta=0.0, **kw),
        "huber": lambda x, t, **kw: fl.huber_loss(x, t, delta=1.5, **kw),
        # (delta = 0 is rejected, as PyTorch does: the smallest float32 normal)
        "huber_tiny_delta": lambda x, t, **kw: fl.huber_loss(x, t, delta=1.2e-38, **kw),
        "sigmoid_focal": lambda x, t, **kw: fl.sigmoid_focal_loss(x, t, **kw),
        "sigmoid_focal_g05_noalpha": lambda x, t, **kw: fl.sigmoid_focal_loss(
            x, t, alpha=-1.0, gamma=0.5, **kw),
        "sigmoid_focal_g0": lambda x, t, **kw: fl.sigmoid_focal_loss(x, t, gamma=0.0, **kw),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["pred", "target"])
@pytest.mark.parametrize("case", ["smooth_l1", "smooth_l1_beta0", "huber", "huber_tiny_delta",
                                  "sigmoid_focal", "sigmoid_focal_g05_noalpha",
                                  "sigmoid_focal_g0"])
def test_elementwise_nan_propagates(fl, case, where, dtype):
    """A NaN prediction or target gives NaN in that element's loss and
    gradients and nowhere else (smooth-L1 and Huber gave a finite gradient:
    sign(NaN) was taken as 0 and the clamp swallowed it)."""
    fn = _elementwise_cases(fl)[case]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 37)) * 3
    t = rng.random((2, 37)) if case.startswith("sigmoid") else rng.standard_normal((2, 37))
    (x if where == "pred" else t)[1, NAN_AT] = np.nan
    xm, tm = mx.array(x).astype(dtype), mx.array(t).astype(dtype)
    nan = np.zeros(x.shape, bool)
    nan[1, NAN_AT] = True
    loss = np.array(fn(xm, tm, reduction="none").astype(mx.float32))
    np.testing.assert_array_equal(np.isnan(loss), nan)
    for red in ("mean", "sum"):
        assert np.isnan(np.array(fn(xm, tm, reduction=red).astype(mx.float32)))
    gx = mx.grad(lambda a: fn(a, tm, reduction="sum"))(xm)
    np.testing.assert_array_equal(np.isnan(np.array(gx.astype(mx.float32))), nan)
    if not case.startswith("sigmoid"):  # d/d target of the regression losses
        gt = mx.grad(lambda b: fn(xm, b, reduction="sum"))(tm)
        np.testing.assert_array_equal(np.isnan(np.array(gt.astype(mx.float32))), nan)
    gm = mx.grad(lambda a: fn(a, tm, reduction="mean"))(xm)
    np.testing.assert_array_equal(np.isnan(np.array(gm.astype(mx.float32))), nan)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["ce_hard", "ce_smooth_weighted", "ce_soft", "ce_soft_nan_target",
                                  "softmax_focal"])
def test_rowwise_nan_propagates(fl, case, dtype):
    """A NaN logit (or soft target) makes its row's loss and its whole gradient
    row NaN, and no other row."""
    rng = np.random.default_rng(6)
    N, K = 4, 37
    x = rng.standard_normal((N, K))
    t = rng.integers(0, K, N)
    p = rng.random((N, K))
    p /= p.sum(-1, keepdims=True)
    if case == "ce_soft_nan_target":
        p[2, 36] = np.nan
    else:
        x[2, 17] = np.nan
    xm = mx.array(x).astype(dtype)
    if case == "softmax_focal":
        fn = lambda a, **kw: fl.softmax_focal_loss(a, mx.array(t), **kw)
    elif case == "ce_hard":
        fn = lambda a, **kw: fl.cross_entropy(a, mx.array(t), **kw)
    elif case == "ce_smooth_weighted":
        cw = mx.array(rng.uniform(0.5, 2, K).astype(np.float32))
        fn = lambda a, **kw: fl.cross_entropy(a, mx.array(t), label_smoothing=0.1,
                                              class_weights=cw, **kw)
    else:
        fn = lambda a, **kw: fl.cross_entropy(a, mx.array(p).astype(dtype), **kw)
    loss = np.array(fn(xm, reduction="none").astype(mx.float32))
    np.testing.assert_array_equal(np.isnan(loss), np.arange(N) == 2)
    g = np.array(mx.grad(lambda a: fn(a, reduction="sum"))(xm).astype(mx.float32))
    np.testing.assert_array_equal(np.isnan(g).all(-1), np.arange(N) == 2)
    assert np.isfinite(g[np.arange(N) != 2]).all()


# --------------------------------------------------------------------------
# BCE-with-logits and the focal factor for confident predictions (item 3)
# --------------------------------------------------------------------------
def _ulps(got, want64):
    got = np.array(got, np.float64)
    spacing = np.maximum(np.spacing(np.abs(want64.astype(np.float32))).astype(np.float64),
                         float(np.finfo(np.float32).smallest_subnormal))
    return np.abs(got - want64) / spacing


def _bce64(x, t):
    x, t = np.float64(x), np.float64(t)
    linear = np.where(x >= 0, x * (1 - t), -x * t)
    return linear + np.log1p(np.exp(-np.abs(x)))


def test_bce_with_logits_confident_values(fl):
    """The issue's numbers: x = 10 gave 4.5776e-5 (0.8% off), x = 16 gave 0."""
    x = mx.array([10.0, 16.0, 30.0, -10.0, -16.0])
    t = mx.array([1.0, 1.0, 1.0, 0.0, 0.0])
    got = np.array(fl.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0, reduction="none"))
    want = _bce64(np.array(x), np.array(t))
    assert _ulps(got, want).max() <= 2, (got, want)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("target", ["0", "1", "0.3", "0.9", "random"])
def test_sigmoid_focal_within_ulps_of_float64(fl, target, gamma):
    """Over x in [-100, 100], hard and soft targets: the loss (and, for hard
    targets, the gradient) within a few ulp of float64; the focal factor
    (1 - p_t)^2 likewise. softplus(x) - x t cancelled (2% off at x = 10)."""
    x = np.concatenate([np.linspace(-100, 100, 20_001), [-16.0, -10.0, 10.0, 16.0, 87.0]])
    x = x.astype(np.float32)
    rng = np.random.default_rng(8)
    t = (rng.random(x.size) if target == "random" else np.full(x.size, float(target)))
    t = t.astype(np.float32)
    xm, tm = mx.array(x), mx.array(t)
    got = fl.sigmoid_focal_loss(xm, tm, alpha=-1.0, gamma=gamma, reduction="none")
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    e = np.exp(-np.abs(x64))
    p = np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
    q = np.where(x64 >= 0, e / (1 + e), 1 / (1 + e))
    m = p * (1 - t64) + q * t64
    want = _bce64(x64, t64) * m ** gamma
    assert _ulps(got, want).max() <= (4 if gamma == 0 else 8)
    if target in ("0", "1"):  # no cancellation in the exact gradient either
        g = mx.grad(lambda a: fl.sigmoid_focal_loss(a, tm, alpha=-1.0, gamma=gamma,
                                                    reduction="sum"))(xm)
        r = p * q / np.where(m > 0, m, 1)
        gwant = (p * (1 - t64) - q * t64) * m ** gamma + \
            gamma * _bce64(x64, t64) * m ** gamma * r * (1 - 2 * t64)
        # (gamma = 2: three rounded products more than the loss; 8.1 measured)
        assert _ulps(g, gwant).max() <= (4 if gamma == 0 else 10)


# --------------------------------------------------------------------------
# "others" smoothing with eps > (K-1)/K and -inf logits (item 4)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_others_mode_large_eps_neg_inf_is_inf(fl, dtype):
    """eps = 0.9 > (K-1)/K = 2/3 makes the one-hot coefficient negative: a -inf
    logit gave -inf + inf = NaN. Every class has q_j >= 0 and the -inf class
    has q_j > 0, so the loss is +inf (as docs/numerics.md says)."""
    inf = float("inf")
    x = mx.array([[-inf, 0.0, 1.0], [0.5, -inf, 1.0], [0.5, 0.0, 1.0]]).astype(dtype)
    t = mx.array([0, 0, 2])
    out = np.array(fl.cross_entropy(x, t, label_smoothing=0.9, label_smoothing_mode="others",
                                    reduction="none").astype(mx.float32))
    assert np.isposinf(out[:2]).all(), out
    want = R.cross_entropy(np.array(x.astype(mx.float32)), np.array(t), label_smoothing=0.9,
                           label_smoothing_mode="others")
    assert abs(out[2] - want[2]) <= 1e-2 * abs(want[2])
    probs = mx.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5]]).astype(dtype)
    out = np.array(fl.cross_entropy(x[:2], probs, label_smoothing=0.9,
                                    label_smoothing_mode="others",
                                    reduction="none").astype(mx.float32))
    assert np.isposinf(out).all(), out


# --------------------------------------------------------------------------
# results independent of position, alignment and thread count (item 5)
# --------------------------------------------------------------------------
def _bits(a):
    return np.array(a.astype(mx.float32)).view(np.uint32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["smooth_l1", "huber", "sigmoid_focal",
                                  "sigmoid_focal_g05_noalpha", "sigmoid_focal_g0"])
def test_elementwise_bits_independent_of_position(fl, case, dtype):
    """Rotating the inputs rotates the loss and the gradient bit for bit: every
    element visits the vector body and the tail of the loop (47 elements). The
    AVX-512 clone's zmm body used FMAs and its tail did not, so the same (x, t)
    gave gradients 1-3 ulp apart by position."""
    fn = _elementwise_cases(fl)[case]
    rng = np.random.default_rng(9)
    n = 47
    x = mx.array(rng.standard_normal(n) * 4).astype(dtype)
    t = mx.array(rng.random(n) if case.startswith("sigmoid") else rng.standard_normal(n))
    t = t.astype(dtype)
    grad = mx.grad(lambda a, b: fn(a, b, reduction="sum"))
    loss0, grad0 = _bits(fn(x, t, reduction="none")), _bits(grad(x, t))
    for k in range(1, n):
        xr, tr = mx.roll(x, k), mx.roll(t, k)
        np.testing.assert_array_equal(_bits(fn(xr, tr, reduction="none")), np.roll(loss0, k))
        np.testing.assert_array_equal(_bits(grad(xr, tr)), np.roll(grad0, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [37, 2085])
@pytest.mark.parametrize("case", ["ce_hard", "ce_smooth_weighted", "ce_soft", "softmax_focal"])
def test_row_bits_independent_of_alignment(fl, case, K, dtype):
    """The same row at every row index (K = 37: each starts at a different
    alignment) gives the same loss and gradient bits."""
    rng = np.random.default_rng(10)
    N = 16
    x = mx.array(np.tile(rng.standard_normal(K) * 3, (N, 1))).astype(dtype)
    t = mx.array(np.full(N, K // 3))
    p = rng.random(K)
    p = mx.array(np.tile(p / p.sum(), (N, 1))).astype(dtype)
    cw = mx.array(rng.uniform(0.5, 2, K).astype(np.float32))
    fn = {"ce_hard": lambda a, **kw: fl.cross_entropy(a, t, **kw),
          "ce_smooth_weighted": lambda a, **kw: fl.cross_entropy(a, t, label_smoothing=0.1,
                                                                 class_weights=cw, **kw),
          "ce_soft": lambda a, **kw: fl.cross_entropy(a, p, **kw),
          "softmax_focal": lambda a, **kw: fl.softmax_focal_loss(a, t, **kw)}[case]
    loss = _bits(fn(x, reduction="none"))
    grad = _bits(mx.grad(lambda a: fn(a, reduction="sum"))(x))
    assert (loss == loss[0]).all()
    assert (grad == grad[0]).all()


# The CPU row loop (csrc/cpu/row_reduce.h) reads rows in chunks of 2048 and
# takes a float32 chunk's max inside the previous chunk's exp loop when both are
# full (so from K = 4096 on); a short last chunk, and 16-bit rows, get a max
# loop of their own.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [2049, 4096, 4097, 6143, 6144, 8193])
@pytest.mark.parametrize("case", ["ce_smooth", "ce_soft", "softmax_focal"])
def test_row_max_in_every_chunk(fl, case, K, dtype):
    """One logit 100 above the rest (N(0, 1)) in turn in the first chunk, in a
    chunk whose max the previous chunk's loop takes, in the last (short)
    chunk and at the row's last element: loss and gradient match float64. A
    chunk max that missed the spike would exponentiate x - max = ~100, which
    overflows float32."""
    from conftest import assert_close

    rng = np.random.default_rng(K)
    spots = sorted({0, 2047, 2048, min(4100, K - 1), K - 2048, K - 1})
    N = len(spots)
    x = rng.standard_normal((N, K)).astype(np.float32)
    x[np.arange(N), spots] += 100.0
    xm = mx.array(x).astype(dtype)
    x64 = np.array(xm.astype(mx.float32), np.float64)
    t = rng.integers(0, K, N)
    t[0] = spots[0]  # a target on the spike, the rest elsewhere
    p = rng.random((N, K))
    pm = mx.array((p / p.sum(-1, keepdims=True)).astype(np.float32)).astype(dtype)
    p64 = np.array(pm.astype(mx.float32), np.float64)
    if case == "ce_smooth":
        fn = lambda a, r: fl.cross_entropy(a, mx.array(t), label_smoothing=0.1, reduction=r)
        want = R.cross_entropy(x64, t, label_smoothing=0.1)
        gwant = R.cross_entropy_grad(x64, t, label_smoothing=0.1, reduction="sum")
    elif case == "ce_soft":
        fn = lambda a, r: fl.cross_entropy(a, pm, reduction=r)
        want = R.cross_entropy(x64, p64)
        gwant = R.cross_entropy_grad(x64, p64, reduction="sum")
    else:
        fn = lambda a, r: fl.softmax_focal_loss(a, mx.array(t), reduction=r)
        want = R.softmax_focal(x64, t)
        gwant = R.softmax_focal_grad(x64, t, reduction="sum")
    assert_close(fn(xm, "none"), want, dtype, what="loss")
    g = mx.grad(lambda a: fn(a, "sum"))(xm)
    assert_close(g, gwant, dtype, what="grad")


THREADS_SCRIPT = r"""
import hashlib, json, sys
import numpy as np, mlx.core as mx
import mlx_fused_losses as fl
mx.set_default_device(mx.cpu)
rng = np.random.default_rng(12)
out = {}
def put(name, a):
    out[name] = hashlib.sha256(np.array(a.astype(mx.float32)).tobytes()).hexdigest()
for dt in (mx.float32, mx.bfloat16):
    n = 300_007  # ~9 tasks of 32768 elements: each task has its own loop tail
    x = mx.array(rng.standard_normal(n) * 4).astype(dt)
    t = mx.array(rng.random(n)).astype(dt)
    for name, f in [("smooth_l1", lambda a, b, r: fl.smooth_l1_loss(a, b, reduction=r)),
                    ("huber", lambda a, b, r: fl.huber_loss(a, b, reduction=r)),
                    ("focal", lambda a, b, r: fl.sigmoid_focal_loss(a, b, reduction=r)),
                    ("focal05", lambda a, b, r: fl.sigmoid_focal_loss(a, b, gamma=0.5,
                                                                      reduction=r))]:
        for r in ("none", "sum", "mean"):
            put(f"{dt}{name}{r}", f(x, t, r))
            put(f"{dt}{name}{r}grad", mx.grad(lambda a: f(a, t, r).sum())(x))
    N, K = 64, 4097  # 8 rows per task
    z = mx.array(rng.standard_normal((N, K)) * 3).astype(dt)
    c = mx.array(rng.integers(0, K, N))
    for name, f in [("ce", lambda a, r: fl.cross_entropy(a, c, label_smoothing=0.1, reduction=r)),
                    ("sf", lambda a, r: fl.softmax_focal_loss(a, c, reduction=r))]:
        for r in ("none", "sum", "mean"):
            put(f"{dt}{name}{r}", f(z, r))
            put(f"{dt}{name}{r}grad", mx.grad(lambda a: f(a, r).sum())(z))
json.dump(out, sys.stdout)
"""


def test_bits_independent_of_thread_count():
    """Element-wise, per-row and reduced outputs and their gradients are
    bit-identical with FL_NUM_THREADS = 1, 2, 3, 7 (the pool reads it once
    per process, hence subprocesses). Each task's loop tail used to compute
    without the FMAs of the vector body, so the element-wise outputs moved
    with the task boundaries."""
    import json
    import os
    import subprocess
    import sys

    runs = {}
    for threads in (1, 2, 3, 7):
        env = dict(os.environ, FL_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[threads] = json.loads(proc.stdout)
    for threads in (2, 3, 7):
        differ = sorted(k for k in runs[1] if runs[1][k] != runs[threads][k])
        assert not differ, (threads, differ)
