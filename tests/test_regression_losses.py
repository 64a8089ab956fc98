"""smooth_l1_loss and huber_loss: reference self-checks, package vs the
float64 reference and vs mlx.nn.losses, gradients w.r.t. both arguments."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R
from conftest import DTYPES, assert_close, dtype_id, to_mx, to_np

REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(), (1,), (2,), (31,), (33,), (3, 5, 7), (2, 1, 3, 4), (4097,),
          (2, 50257)]


def _pair(rng, shape, dtype, spread=3.0):
    p, _ = to_mx(rng.normal(size=shape) * spread, dtype)
    t, _ = to_mx(rng.normal(size=shape) * spread, dtype)
    return p, t


def _scale(p, t):
    """input magnitude for the fp32-arithmetic part of the error bound"""
    return np.maximum(np.abs(to_np(p)), np.abs(to_np(t)))


# ==========================================================================
# reference self-checks
# ==========================================================================
@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_smooth_l1_matches_mlx(rng, beta, reduction):
    p, t = _pair(rng, (6, 7), mx.float32)
    got = nn.losses.smooth_l1_loss(p, t, beta=beta, reduction=reduction)
    ref = R.smooth_l1(to_np(p), to_np(t), beta, reduction)
    assert_close(got, ref, mx.float32, scale=_scale(p, t).max(), what="mlx")
    g = mx.grad(lambda a: nn.losses.smooth_l1_loss(a, t, beta, reduction).sum())(p)
    assert_close(g, R.smooth_l1_grad(to_np(p), to_np(t), beta, reduction),
                 mx.float32, scale=1.0 / beta, what="mlx grad")


@pytest.mark.parametrize("delta", [0.0, 0.5, 1.0, 15.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_huber_matches_mlx(rng, delta, reduction):
    p, t = _pair(rng, (6, 7), mx.float32, spread=10)
    got = nn.losses.huber_loss(p, t, delta=delta, reduction=reduction)
    ref = R.huber(to_np(p), to_np(t), delta, reduction)
    assert_close(got, ref, mx.float32, scale=_scale(p, t).max() ** 2, what="mlx")
    g = mx.grad(lambda a: nn.losses.huber_loss(a, t, delta, reduction).sum())(p)
    assert_close(g, R.huber_grad(to_np(p), to_np(t), delta, reduction),
                 mx.float32, scale=_scale(p, t).max(), what="mlx grad")


def test_reference_known_values():
    np.testing.assert_allclose(
        R.huber(np.array([10.0, 10.0, 220.0]), np.zeros(3), 15.0, "mean"),
        1095.8333333333333)
    np.testing.assert_allclose(R.smooth_l1(np.array([0.5, 2.0, -3.0]), np.zeros(3),
                                           1.0, "none"), [0.125, 1.5, 2.5])
    np.testing.assert_allclose(R.smooth_l1(np.array([0.5, 0.0, -3.0]), np.zeros(3),
                                           0.0, "none"), [0.5, 0.0, 3.0])
    np.testing.assert_allclose(R.smooth_l1_grad(np.array([0.5, 0.0, -3.0]),
                                                np.zeros(3), 0.0, "none"),
                               [1.0, 0.0, -1.0])
    # smooth_l1(beta) * beta == huber(delta=beta)
    x = np.linspace(-4, 4, 41)
    np.testing.assert_allclose(R.smooth_l1(x, 0 * x, 1.7, "none") * 1.7,
                               R.huber(x, 0 * x, 1.7, "none"))


@pytest.mark.parametrize("which", ["smooth_l1", "huber"])
@pytest.mark.parametrize("param", [0.0, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("wrt", ["predictions", "targets"])
def test_reference_grad_finite_differences(rng, which, param, reduction, wrt):
    p = rng.normal(size=(3, 4)) * 2
    t = rng.normal(size=(3, 4)) * 2
    # keep away from the kinks (|d| = param, d = 0) for the difference quotient
    d = p - t
    d = np.where(np.abs(np.abs(d) - param) < 1e-3, d + 0.01, d)
    d = np.where(np.abs(d) < 1e-3, 0.01, d)
    p = t + d
    cot = rng.normal(size=p.shape) if reduction == "none" else None
    fn = R.smooth_l1 if which == "smooth_l1" else R.huber
    gfn = R.smooth_l1_grad if which == "smooth_l1" else R.huber_grad
    w = (wrt if which == "smooth_l1" else
         {"predictions": "inputs", "targets": "targets"}[wrt])

    def f(a):
        out = fn(a, t, param, reduction) if wrt == "predictions" else \
            fn(p, a, param, reduction)
        return (out * (1.0 if cot is None else cot)).sum()

    num = R.numerical_grad(f, p if wrt == "predictions" else t)
    ana = gfn(p, t, param, reduction, cotangent=cot, wrt=w)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-7)


# ==========================================================================
# the package
# ==========================================================================
def check_reg(fl, which, p, t, param, reduction, rng, what=""):
    dtype = p.dtype
    p64, t64 = to_np(p), to_np(t)
    if which == "smooth_l1":
        out = fl.smooth_l1_loss(p, t, beta=param, reduction=reduction)
        ref = R.smooth_l1(p64, t64, param, reduction)
        fwd = lambda a, b: fl.smooth_l1_loss(a, b, param, reduction)  # noqa: E731
        gp = lambda c: R.smooth_l1_grad(p64, t64, param, reduction, c)  # noqa: E731
        gt = lambda c: R.smooth_l1_grad(p64, t64, param, reduction, c, "targets")  # noqa
        gmag = 1.0 / param if param > 0 else 1.0
    else:
        out = fl.huber_loss(p, t, delta=param, reduction=reduction)
        ref = R.huber(p64, t64, param, reduction)
        fwd = lambda a, b: fl.huber_loss(a, b, param, reduction)  # noqa: E731
        gp = lambda c: R.huber_grad(p64, t64, param, reduction, c)  # noqa: E731
        gt = lambda c: R.huber_grad(p64, t64, param, reduction, c, "targets")  # noqa
        gmag = 1.0
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    sc = np.maximum(1.0, _scale(p, t))
    lsc = sc * (sc if which == "huber" else max(1.0, 1.0 / param if param else 1))
    lsc = R.reduce(lsc, reduction)
    assert_close(out, ref, dtype, scale=lsc, what=f"{what} loss")
    cot = mx.array(rng.normal(size=ref.shape).astype(np.float32)).astype(dtype)
    _, (g_p, g_t) = mx.vjp(fwd, [p, t], [cot])
    c64 = to_np(cot)
    gsc = gmag * sc * np.abs(R.reduce_cotangent(p64.shape, reduction, c64))
    assert g_p.dtype == dtype and g_t.dtype == dtype
    assert_close(g_p, gp(c64), dtype, scale=gsc, what=f"{what} d/dpred")
    assert_close(g_t, gt(c64), dtype, scale=gsc, what=f"{what} d/dtarget")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.5])
def test_smooth_l1_shapes(fl, rng, dtype, shape, beta):
    p, t = _pair(rng, shape, dtype)
    for red in REDUCTIONS:
        check_reg(fl, "smooth_l1", p, t, beta, red, rng, f"beta={beta} {red}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("delta", [0.01, 0.5, 1.0, 15.0])
def test_huber_shapes(fl, rng, dtype, shape, delta):
    p, t = _pair(rng, shape, dtype, spread=10.0)
    for red in REDUCTIONS:
        check_reg(fl, "huber", p, t, delta, red, rng, f"delta={delta} {red}")


@pytest.mark.parametrize("which", ["smooth_l1", "huber"])
def test_non_contiguous(fl, rng, which):
    P, T = _pair(rng, (8, 12), mx.float32)
    cases = [(P.T, T.T), (P[::2, 1::3], T[1::2, ::3]), (P[:, ::-1], T),
             (mx.broadcast_to(P[:1], (8, 12)), T),
             (P, mx.broadcast_to(T[:, :1], (8, 12))),
             (mx.transpose(P.reshape(2, 4, 12), (2, 0, 1)),
              T.reshape(12, 2, 4))]
    for i, (p, t) in enumerate(cases):
        for red in REDUCTIONS:
            check_reg(fl, which, p, t, 0.7, red, rng, f"case {i} {red}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
# Huber's delta must be > 0 (rejected: tests/test_bad_input.py); smooth-L1's
# beta = 0 is MLX's plain L1 and stays.
@pytest.mark.parametrize("which,param", [("smooth_l1", 0.0), ("smooth_l1", 1.0), ("smooth_l1", 2.0),
                                         ("huber", 1.0), ("huber", 2.0)])
def test_kinks_and_zero(fl, rng, dtype, which, param):
    """|d| exactly at the threshold, d = 0, and large |d|."""
    t = mx.array(np.array([0.0, 0.0, 0.0, 1.0, -1.0, 3.0, 0.0, 5.0], np.float32))
    p = t + mx.array(np.array([param, -param, 0.0, 0.0, param, -param, 1e4, -1e3],
                              np.float32))
    p, t = p.astype(dtype), t.astype(dtype)
    for red in REDUCTIONS:
        check_reg(fl, which, p, t, param, red, rng, f"{which} {red}")


def test_beta_zero_is_l1(fl, rng):
    p, t = _pair(rng, (5, 6), mx.float32)
    p = mx.concatenate([p, t[:1]], axis=0)  # a row with d == 0
    t = mx.concatenate([t, t[:1]], axis=0)
    out = fl.smooth_l1_loss(p, t, beta=0.0, reduction="none")
    np.testing.assert_array_equal(to_np(out), np.abs(to_np(p - t)))
    g = mx.grad(lambda a: fl.smooth_l1_loss(a, t, beta=0.0, reduction="sum"))(p)
    np.testing.assert_array_equal(to_np(g), np.sign(to_np(p - t)))
    assert np.all(to_np(g)[-1] == 0)


def test_huber_known_value(fl):
    x = mx.array([10.0, 10.0, 220.0])
    out = fl.huber_loss(x, mx.zeros(3), delta=15.0, reduction="mean")
    assert abs(out.item() - 1095.8333) < 1e-3
    # inputs - targets, not the other way around
    out = fl.huber_loss(mx.zeros(3), x, delta=15.0, reduction="mean")
    assert abs(out.item() - 1095.8333) < 1e-3


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_defaults(fl, rng, reduction):
    p, t = _pair(rng, (4, 5), mx.float32)
    assert fl.smooth_l1_loss(p, t).shape == ()  # default reduction mean
    assert fl.huber_loss(p, t).shape == (4, 5)  # default reduction none
    np.testing.assert_allclose(to_np(fl.smooth_l1_loss(p, t)),
                               R.smooth_l1(to_np(p), to_np(t)), rtol=1e-5)
    np.testing.assert_allclose(to_np(fl.huber_loss(p, t)),
                               R.huber(to_np(p), to_np(t)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("param", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("shape", [(7,), (3, 33), (4097,)], ids=str)
def test_matches_mlx(fl, rng, reduction, param, shape):
    p, t = _pair(rng, shape, mx.float32)
    for ours, theirs, kw in [
            (fl.smooth_l1_loss, nn.losses.smooth_l1_loss, dict(beta=param)),
            (fl.huber_loss, nn.losses.huber_loss, dict(delta=param))]:
        a = ours(p, t, reduction=reduction, **kw)
        b = theirs(p, t, reduction=reduction, **kw)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=2e-5, atol=2e-6)
        ga = mx.grad(lambda x: ours(x, t, reduction=reduction, **kw).sum())(p)
        gb = mx.grad(lambda x: theirs(x, t, reduction=reduction, **kw).sum())(p)
        np.testing.assert_allclose(to_np(ga), to_np(gb), rtol=2e-5, atol=2e-6)


def test_nn_modules(fl, rng):
    p, t = _pair(rng, (4, 5), mx.float32)
    m = fl.nn.SmoothL1Loss(beta=0.5, reduction="sum")
    assert isinstance(m, nn.Module)
    np.testing.assert_allclose(to_np(m(p, t)), to_np(fl.smooth_l1_loss(
        p, t, beta=0.5, reduction="sum")), rtol=1e-6)
    m = fl.nn.HuberLoss(delta=2.0, reduction="mean")
    assert isinstance(m, nn.Module)
    np.testing.assert_allclose(to_np(m(p, t)), to_np(fl.huber_loss(
        p, t, delta=2.0, reduction="mean")), rtol=1e-6)
    for red in REDUCTIONS:  # (module defaults are the module's own choice)
        np.testing.assert_allclose(to_np(fl.nn.HuberLoss(reduction=red)(p, t)),
                                   to_np(fl.huber_loss(p, t, reduction=red)),
                                   rtol=1e-6)
        np.testing.assert_allclose(to_np(fl.nn.SmoothL1Loss(reduction=red)(p, t)),
                                   to_np(fl.smooth_l1_loss(p, t, reduction=red)),
                                   rtol=1e-6)


@pytest.mark.parametrize("which", ["smooth_l1_loss", "huber_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast_targets_rejected_or_consistent(fl, rng, which, reduction):
    """Targets broadcastable to the predictions' shape: either rejected
    (ValueError naming targets) or identical to broadcasting explicitly,
    with the targets' gradient summed back to the targets' shape."""
    p, _ = _pair(rng, (3, 4), mx.float32)
    t = to_mx(rng.normal(size=(4,)) * 3)[0]
    f = getattr(fl, which)
    try:
        out = f(p, t, reduction=reduction)
    except ValueError as e:
        assert "targets" in str(e)
        return
    tb = mx.broadcast_to(t, p.shape)
    np.testing.assert_allclose(to_np(out), to_np(f(p, tb, reduction=reduction)),
                               rtol=1e-6, atol=1e-7)
    gp, gt = mx.grad(lambda a, b: f(a, b, reduction=reduction).sum(),
                     argnums=(0, 1))(p, t)
    assert gt.shape == t.shape
    gp2, gt2 = mx.grad(lambda a, b: f(a, mx.broadcast_to(b, p.shape),
                                      reduction=reduction).sum(),
                       argnums=(0, 1))(p, t)
    np.testing.assert_allclose(to_np(gp), to_np(gp2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(gt), to_np(gt2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_reductions(fl, rng, dtype, reduction):
    """2**20 + 3 elements: the in-kernel (multi-threaded) reduction must
    keep fp32-level accuracy (naive fp32 accumulation would not)."""
    p, t = _pair(rng, (2**20 + 3,), dtype)
    for which, param in [("smooth_l1", 1.0), ("huber", 0.5), ("smooth_l1", 0.0)]:
        f = fl.smooth_l1_loss if which == "smooth_l1" else fl.huber_loss
        ref = (R.smooth_l1 if which == "smooth_l1" else R.huber)(
            to_np(p), to_np(t), param, reduction)
        out = f(p, t, param, reduction=reduction)
        assert_close(out, ref, dtype, what=f"{which} {reduction}")


# ==========================================================================
# 16-bit element-wise losses: the kernels write the loss and read the
# cotangent in the input dtype (no float32 array plus a cast)
# ==========================================================================
_EXT_ELEMENTWISE = {
    "smooth_l1": lambda p, t: _ext().smooth_l1_loss(p, t, beta=0.7, reduction="none"),
    "huber": lambda p, t: _ext().huber_loss(p, t, delta=1.3, reduction="none"),
    "sigmoid_focal": lambda p, t: _ext().sigmoid_focal_loss(
        p, mx.clip(t, 0, 1), alpha=0.25, gamma=2.0, reduction="none"),
    "sigmoid_focal_g15": lambda p, t: _ext().sigmoid_focal_loss(
        p, mx.clip(t, 0, 1), alpha=0.25, gamma=1.5, reduction="none"),
}


def _ext():
    from mlx_fused_losses import _ext as ext
    return ext


@pytest.mark.parametrize("name", list(_EXT_ELEMENTWISE))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_elementwise_16bit_loss_and_cotangent_in_input_dtype(rng, name, dtype):
    """The primitive's loss has the input dtype and equals the float32
    computation rounded once; its backward takes the 16-bit cotangent as is and
    equals the float32 backward with that cotangent, rounded once. 4097
    elements: vector tails and more than one chunk."""
    fn = _EXT_ELEMENTWISE[name]
    p, t = _pair(rng, (4097,), dtype)
    p32, t32 = p.astype(mx.float32), t.astype(mx.float32)
    loss = fn(p, t)
    assert loss.dtype == dtype
    want = fn(p32, t32).astype(dtype)
    np.testing.assert_array_equal(np.array(loss.astype(mx.float32)), np.array(want.astype(mx.float32)))

    cot = (mx.array(rng.uniform(0.5, 2.0, size=(4097,))) * 3).astype(dtype)
    _, (grad,) = mx.vjp(lambda a: fn(a, t), [p], [cot])
    _, (grad32,) = mx.vjp(lambda a: fn(a, t32), [p32], [cot.astype(mx.float32)])
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.array(grad.astype(mx.float32)),
                                  np.array(grad32.astype(dtype).astype(mx.float32)))
