"""sigmoid_focal_loss (torchvision semantics) and softmax_focal_loss."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R
from conftest import DTYPES, assert_close, dtype_id, to_mx, to_np

REDUCTIONS = ["none", "mean", "sum"]


def _softmax_rows(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


# ==========================================================================
# reference self-checks
# ==========================================================================
def _torchvision_formula(x, t, alpha, gamma):
    """Literal transcription of torchvision.ops.sigmoid_focal_loss in
    float64 (fine for moderate |x|)."""
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.0, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_reference_sigmoid_focal_formula(rng, alpha, gamma):
    x = rng.normal(size=(4, 6)) * 3
    t = np.where(rng.uniform(size=(4, 6)) < 0.5, 1.0, 0.0)
    t[0] = rng.uniform(size=6)  # soft targets
    np.testing.assert_allclose(R.sigmoid_focal(x, t, alpha, gamma),
                               _torchvision_formula(x, t, alpha, gamma),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_sigmoid_focal_gamma0_is_bce(rng, reduction):
    x, x64 = to_mx(rng.normal(size=(5, 7)) * 4)
    t, t64 = to_mx((rng.uniform(size=(5, 7)) < 0.3).astype(np.float64))
    ref = R.sigmoid_focal(x64, t64, -1.0, 0.0, reduction)
    mlx = nn.losses.binary_cross_entropy(x, t, reduction=reduction)
    assert_close(mlx, ref, mx.float32, scale=4 * np.abs(x64).max(), what="bce")
    assert R.sigmoid_focal(np.array(100.0), np.array(0.0), -1, 0.0) == 100.0


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_sigmoid_focal_grad_fd(rng, alpha, gamma, reduction):
    x = rng.normal(size=(3, 4)) * 3
    t = np.where(rng.uniform(size=(3, 4)) < 0.5, 1.0, 0.0)
    t[0] = rng.uniform(size=4)
    cot = rng.normal(size=x.shape) if reduction == "none" else None

    def f(a):
        return (R.sigmoid_focal(a, t, alpha, gamma, reduction)
                * (1.0 if cot is None else cot)).sum()

    np.testing.assert_allclose(
        R.sigmoid_focal_grad(x, t, alpha, gamma, reduction, cot),
        R.numerical_grad(f, x), rtol=1e-6, atol=1e-8)


def test_reference_sigmoid_focal_saturated():
    x = np.array([30.0, -30.0, 100.0, -100.0, 30.0, -30.0, 100.0, -100.0])
    t = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    for gamma in [0.0, 0.3, 0.5, 0.99, 2.0]:
        g = R.sigmoid_focal_grad(x, t, 0.25, gamma)
        assert np.all(np.isfinite(g))
        assert np.all(np.abs(g[:4]) < 1e-12)  # correct & confident: ~0
        np.testing.assert_allclose(np.abs(g[4:]), [0.75, 0.25, 0.75, 0.25],
                                   rtol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.5, "array"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_reference_softmax_focal_grad_fd(rng, alpha, gamma, reduction, axis):
    K = 5
    shape = (3, K) if axis == -1 else (K, 3)
    x = rng.normal(size=shape) * 2
    t = rng.integers(0, K, size=3)
    t[1] = -100
    a = rng.uniform(0.1, 1, size=K) if alpha == "array" else alpha
    cot = rng.normal(size=3) if reduction == "none" else None
    kw = dict(alpha=a, gamma=gamma, axis=axis, reduction=reduction,
              ignore_index=-100)

    def f(z):
        return (R.softmax_focal(z, t, **kw) * (1.0 if cot is None else cot)).sum()

    np.testing.assert_allclose(R.softmax_focal_grad(x, t, cotangent=cot, **kw),
                               R.numerical_grad(f, x), rtol=1e-6, atol=1e-8)


def test_reference_softmax_focal_formula(rng):
    x = rng.normal(size=(6, 4)) * 2
    t = rng.integers(0, 4, size=6)
    logp = x - R.logsumexp(x, keepdims=True)
    pt = np.exp(logp[np.arange(6), t])
    alpha = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(
        R.softmax_focal(x, t, alpha=alpha, gamma=2.0),
        -alpha[t] * (1 - pt) ** 2 * np.log(pt), rtol=1e-10)
    np.testing.assert_allclose(R.softmax_focal(x, t, gamma=0.0),
                               R.cross_entropy(x, t), rtol=1e-12)


# ==========================================================================
# package: sigmoid focal
# ==========================================================================
def check_sigmoid(fl, x, t, alpha, gamma, reduction, rng, what=""):
    dtype = x.dtype
    x64, t64 = to_np(x), to_np(t)
    ref = R.sigmoid_focal(x64, t64, alpha, gamma, reduction)
    out = fl.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma,
                                reduction=reduction)
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    sc = np.maximum(1.0, np.abs(x64))
    assert_close(out, ref, dtype, scale=R.reduce(sc, reduction),
                 what=f"{what} loss")
    cot = mx.array(rng.normal(size=ref.shape).astype(np.float32)).astype(dtype)
    _, (g,) = mx.vjp(lambda a: fl.sigmoid_focal_loss(
        a, t, alpha=alpha, gamma=gamma, reduction=reduction), [x], [cot])
    assert g.dtype == dtype and g.shape == x.shape
    c64 = to_np(cot)
    gref = R.sigmoid_focal_grad(x64, t64, alpha, gamma, reduction, c64)
    gsc = sc * np.abs(R.reduce_cotangent(x64.shape, reduction, c64)) * max(1, gamma)
    assert_close(g, gref, dtype, scale=gsc, what=f"{what} grad")
    return out, g


def _binary(rng, shape, dtype, soft=False):
    if soft:
        v = rng.uniform(size=shape)
    else:
        v = (rng.uniform(size=shape) < 0.3).astype(np.float64)
    return to_mx(v, dtype)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(), (1,), (33,), (3, 5, 7), (2, 4097)], ids=str)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.5, 0.5),
                                         (0.0, 1.0), (1.0, 3.5), (-1.0, 2.0)])
def test_sigmoid_focal_shapes(fl, rng, dtype, shape, alpha, gamma):
    x = to_mx(rng.normal(size=shape) * 4, dtype)[0]
    for soft in (False, True):
        t = _binary(rng, shape, dtype, soft)
        for red in REDUCTIONS:
            check_sigmoid(fl, x, t, alpha, gamma, red, rng,
                          f"a={alpha} g={gamma} soft={soft} {red}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 0.99, 1.0, 2.0])
def test_sigmoid_focal_saturated_logits(fl, rng, dtype, gamma):
    x = mx.array([30.0, -30.0, 100.0, -100.0, 30.0, -30.0, 100.0, -100.0,
                  15.0, -15.0]).astype(dtype)
    t = mx.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]).astype(dtype)
    for alpha in (0.25, -1.0):
        for red in REDUCTIONS:
            out, g = check_sigmoid(fl, x, t, alpha, gamma, red, rng,
                                   f"saturated a={alpha} {red}")
            assert np.all(np.isfinite(to_np(out)))
            assert np.all(np.isfinite(to_np(g))), to_np(g)


def test_sigmoid_focal_logit_100_target_0(fl):
    out = fl.sigmoid_focal_loss(mx.array([100.0, -100.0]), mx.array([0.0, 1.0]),
                                alpha=-1.0, gamma=0.0)
    np.testing.assert_allclose(to_np(out), [100.0, 100.0], rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_gamma0_matches_mlx_bce(fl, rng, reduction):
    x = to_mx(rng.normal(size=(6, 33)) * 5)[0]
    t = _binary(rng, (6, 33), mx.float32)
    a = fl.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0, reduction=reduction)
    b = nn.losses.binary_cross_entropy(x, t, reduction=reduction)
    np.testing.assert_allclose(to_np(a), to_np(b), rtol=2e-5, atol=2e-6)
    ga = mx.grad(lambda z: fl.sigmoid_focal_loss(z, t, -1.0, 0.0, reduction).sum())(x)
    gb = mx.grad(lambda z: nn.losses.binary_cross_entropy(z, t, reduction=reduction).sum())(x)
    np.testing.assert_allclose(to_np(ga), to_np(gb), rtol=2e-5, atol=2e-6)


def test_sigmoid_focal_non_contiguous(fl, rng):
    X = to_mx(rng.normal(size=(8, 10)) * 3)[0]
    T = _binary(rng, (10, 8), mx.float32)
    for x, t in [(X.T, T), (X[::2, 1::2], T.T[1::2, ::2]), (X[:, ::-1], T.T),
                 (mx.broadcast_to(X[:1], (8, 10)), T.T)]:
        check_sigmoid(fl, x, t, 0.25, 2.0, "none", rng, "non-contiguous")
        check_sigmoid(fl, x, t, 0.25, 2.0, "mean", rng, "non-contiguous")


def test_sigmoid_focal_defaults(fl, rng):
    x = to_mx(rng.normal(size=(3, 4)))[0]
    t = _binary(rng, (3, 4), mx.float32)
    out = fl.sigmoid_focal_loss(x, t)
    assert out.shape == (3, 4)
    np.testing.assert_allclose(to_np(out), R.sigmoid_focal(to_np(x), to_np(t)),
                               rtol=1e-5, atol=1e-7)


def test_sigmoid_focal_package_fd(fl, rng):
    x64 = rng.normal(size=(3, 4)) * 2
    t = _binary(rng, (3, 4), mx.float32, soft=True)
    for alpha, gamma in [(0.25, 2.0), (-1, 0.5), (0.7, 1.0)]:
        def f(a):
            return float(np.array(fl.sigmoid_focal_loss(
                mx.array(a.astype(np.float32)), t, alpha, gamma,
                reduction="sum"), np.float64))

        num = R.numerical_grad(f, x64, h=1e-2)
        ana = mx.grad(lambda a: fl.sigmoid_focal_loss(a, t, alpha, gamma, "sum"))(
            mx.array(x64.astype(np.float32)))
        np.testing.assert_allclose(to_np(ana), num, rtol=2e-3, atol=2e-3)


# ==========================================================================
# package: softmax focal
# ==========================================================================
def check_softmax(fl, x, t, rng, what="", **kw):
    dtype = x.dtype
    x64, t64 = to_np(x), to_np(t)
    rkw = dict(kw)
    mkw = dict(kw)
    a = kw.get("alpha")
    if a is not None and np.ndim(a) == 1:
        rkw["alpha"] = np.asarray(a, np.float32).astype(np.float64)
        mkw["alpha"] = mx.array(np.asarray(a, np.float32))
    red = kw.get("reduction", "none")
    ref = R.softmax_focal(x64, t64, **rkw)
    out = fl.softmax_focal_loss(x, t, **mkw)
    assert out.dtype == dtype and out.shape == ref.shape, what
    ax = kw.get("axis", -1)
    sc = np.maximum(1.0, np.where(np.isfinite(x64), np.abs(x64), 0).max(axis=ax))
    amax = 1.0 if a is None else float(np.max(np.abs(a)))
    g = kw.get("gamma", 2.0)
    den = None
    if red == "mean":
        ign = kw.get("ignore_index")
        den = int((t64 != ign).sum()) if ign is not None else t64.size
    assert_close(out, ref, dtype, scale=R.reduce(sc * amax * (1 + g), red, den),
                 what=f"{what} loss")
    cot = mx.array(rng.normal(size=ref.shape).astype(np.float32)).astype(dtype)
    _, (gr,) = mx.vjp(lambda z: fl.softmax_focal_loss(z, t, **mkw), [x], [cot])
    assert gr.dtype == dtype and gr.shape == x.shape
    c64 = to_np(cot)
    gref = R.softmax_focal_grad(x64, t64, cotangent=c64, **rkw)
    crow = np.abs(R.reduce_cotangent(t64.shape, red, c64, den))
    gsc = np.expand_dims(sc * crow * amax * (1 + g) ** 2, ax) * np.ones_like(x64)
    assert_close(gr, gref, dtype, scale=gsc, what=f"{what} grad")
    return out, gr


def _ints(rng, K, shape):
    return mx.array(rng.integers(0, K, size=shape).astype(np.int32))


SOFTMAX_SHAPES = (
    [(V, b) for V in (1, 2, 31, 32, 33) for b in ((), (4,), (2, 3), (2, 1, 2))]
    + [(1000, (3,)), (4097, (2,)), (50257, (2,))]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V,bshape", SOFTMAX_SHAPES, ids=str)
def test_softmax_focal_shapes(fl, rng, dtype, V, bshape):
    x = to_mx(rng.normal(size=bshape + (V,)) * 3, dtype)[0]
    t = _ints(rng, V, bshape)
    check_softmax(fl, x, t, rng, f"V={V}")
    check_softmax(fl, x, t, rng, f"V={V} g=0.5 a=0.3 mean", gamma=0.5,
                  alpha=0.3, reduction="mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25, "array"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("ignore_index", [None, -100, 3])
def test_softmax_focal_options(fl, rng, reduction, alpha, gamma, ignore_index):
    V = 33
    x = to_mx(rng.normal(size=(4, 5, V)) * 3)[0]
    t64 = rng.integers(0, V, size=(4, 5))
    if ignore_index is not None:
        t64[0] = ignore_index
        t64[2, 1] = ignore_index
    t = mx.array(t64.astype(np.int32))
    a = rng.uniform(0.1, 1.0, size=V) if alpha == "array" else alpha
    out, _ = check_softmax(fl, x, t, rng, alpha=a, gamma=gamma,
                           reduction=reduction, ignore_index=ignore_index)
    if reduction == "none" and ignore_index is not None:
        assert np.all(to_np(out)[t64 == ignore_index] == 0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_focal_low_precision_options(fl, rng, dtype, reduction):
    V = 40
    x = to_mx(rng.normal(size=(6, V)) * 3, dtype)[0]
    t64 = rng.integers(0, V, size=6)
    t64[2] = -100
    check_softmax(fl, x, mx.array(t64.astype(np.int32)), rng,
                  alpha=rng.uniform(0.1, 1, V), gamma=1.5, reduction=reduction,
                  ignore_index=-100)


@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_softmax_focal_axes_and_layouts(fl, rng, axis):
    shape = (6, 17, 3)
    X = to_mx(rng.normal(size=shape) * 2)[0]
    ax = axis % 3
    t = _ints(rng, shape[ax], shape[:ax] + shape[ax + 1:])
    for red in REDUCTIONS:
        check_softmax(fl, X, t, rng, f"axis={axis}", axis=axis, reduction=red,
                      gamma=2.0, alpha=0.25)
    base = to_mx(rng.normal(size=(33, 5)))[0]
    t = _ints(rng, 33, (5,))
    check_softmax(fl, base.T, t, rng, "x.T")
    check_softmax(fl, base, t, rng, "axis=0", axis=0)
    check_softmax(fl, base[::2].T, _ints(rng, 17, (5,)), rng, "strided")
    check_softmax(fl, mx.broadcast_to(base[:, :1], (33, 5)).T, t, rng, "bcast")


def test_softmax_focal_all_ignored(fl, rng):
    x = to_mx(rng.normal(size=(3, 7)))[0]
    t = mx.full((3,), -100, mx.int32)
    for red in REDUCTIONS:
        out = fl.softmax_focal_loss(x, t, ignore_index=-100, reduction=red)
        assert np.all(to_np(out) == 0), (red, to_np(out))
        g = mx.grad(lambda z: fl.softmax_focal_loss(
            z, t, ignore_index=-100, reduction=red).sum())(x)
        assert np.all(to_np(g) == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_extremes(fl, rng, dtype, gamma):
    x64 = rng.choice([-1e4, 1e4], size=(4, 33)) + rng.normal(size=(4, 33))
    x64[0, :10] = -np.inf
    t64 = rng.integers(10, 33, size=4)
    x64[3] = 0.0
    x64[3, t64[3]] = 1e4  # p_t == 1 exactly: loss 0, gradient 0
    x = to_mx(x64, dtype)[0]
    out, g = check_softmax(fl, x, mx.array(t64.astype(np.int32)), rng,
                           gamma=gamma, alpha=0.5)
    assert np.all(np.isfinite(to_np(g)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("V", [1, 33, 4097])
def test_softmax_focal_gamma0_equals_cross_entropy(fl, rng, reduction, V):
    x = to_mx(rng.normal(size=(3, V)) * 3)[0]
    t = _ints(rng, V, (3,))
    a = fl.softmax_focal_loss(x, t, gamma=0.0, reduction=reduction)
    b = fl.cross_entropy(x, t, reduction=reduction)
    c = nn.losses.cross_entropy(x, t, reduction=reduction)
    np.testing.assert_allclose(to_np(a), to_np(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(to_np(a), to_np(c), rtol=2e-5, atol=2e-6)
    ga = mx.grad(lambda z: fl.softmax_focal_loss(z, t, gamma=0.0,
                                                 reduction=reduction).sum())(x)
    gc = mx.grad(lambda z: nn.losses.cross_entropy(z, t, reduction=reduction).sum())(x)
    np.testing.assert_allclose(to_np(ga), to_np(gc), rtol=2e-5, atol=2e-6)


def test_softmax_focal_package_fd(fl, rng):
    x64 = rng.normal(size=(3, 6)) * 2
    t = mx.array(np.array([1, -100, 5], np.int32))
    alpha = mx.array(rng.uniform(0.2, 1, 6).astype(np.float32))
    for gamma in (0.5, 2.0):
        kw = dict(alpha=alpha, gamma=gamma, reduction="mean", ignore_index=-100)

        def f(a):
            return float(np.array(fl.softmax_focal_loss(
                mx.array(a.astype(np.float32)), t, **kw), np.float64))

        num = R.numerical_grad(f, x64, h=1e-2)
        ana = mx.grad(lambda a: fl.softmax_focal_loss(a, t, **kw))(
            mx.array(x64.astype(np.float32)))
        np.testing.assert_allclose(to_np(ana), num, rtol=2e-3, atol=2e-3)


def test_softmax_focal_defaults(fl, rng):
    x = to_mx(rng.normal(size=(3, 4)))[0]
    t = _ints(rng, 4, (3,))
    out = fl.softmax_focal_loss(x, t)
    assert out.shape == (3,)
    np.testing.assert_allclose(to_np(out), R.softmax_focal(to_np(x), to_np(t)),
                               rtol=1e-5, atol=1e-7)


def test_nn_modules(fl, rng):
    x = to_mx(rng.normal(size=(3, 4)))[0]
    tb = _binary(rng, (3, 4), mx.float32)
    m = fl.nn.SigmoidFocalLoss(alpha=0.3, gamma=1.5, reduction="mean")
    assert isinstance(m, nn.Module)
    np.testing.assert_allclose(to_np(m(x, tb)), to_np(fl.sigmoid_focal_loss(
        x, tb, alpha=0.3, gamma=1.5, reduction="mean")), rtol=1e-6)
    np.testing.assert_allclose(
        to_np(fl.nn.SigmoidFocalLoss(reduction="none")(x, tb)),
        to_np(fl.sigmoid_focal_loss(x, tb, reduction="none")), rtol=1e-6)
    t = mx.array([0, -100, 3])
    alpha = mx.array([0.1, 0.2, 0.3, 0.4])
    m = fl.nn.SoftmaxFocalLoss(alpha=alpha, gamma=0.5, reduction="sum",
                               ignore_index=-100)
    assert isinstance(m, nn.Module)
    np.testing.assert_allclose(to_np(m(x, t)), to_np(fl.softmax_focal_loss(
        x, t, alpha=alpha, gamma=0.5, reduction="sum", ignore_index=-100)),
        rtol=1e-6)
    t = mx.array([0, 1, 3])
    np.testing.assert_allclose(
        to_np(fl.nn.SoftmaxFocalLoss(reduction="none")(x, t)),
        to_np(fl.softmax_focal_loss(x, t, reduction="none")), rtol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_many_rows_and_elements(fl, rng, reduction):
    x = to_mx(rng.normal(size=(20001, 5)) * 3)[0]
    t64 = rng.integers(0, 5, size=20001)
    t64[::13] = -100
    check_softmax(fl, x, mx.array(t64.astype(np.int32)), rng, gamma=2.0,
                  alpha=rng.uniform(0.1, 1, 5), ignore_index=-100,
                  reduction=reduction)
    xs = to_mx(rng.normal(size=(2**18 + 1,)) * 4)[0]
    ts = _binary(rng, (2**18 + 1,), mx.float32)
    check_sigmoid(fl, xs, ts, 0.25, 2.0, reduction, rng, "many elements")
