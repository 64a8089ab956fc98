"""cross_entropy: float64 reference self-checks, then the package against the
reference and against mlx.nn.losses.cross_entropy."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import reference as R
from conftest import (DTYPES, assert_close, dtype_id, to_mx, to_np,
                      row_scale)

REDUCTIONS = ["none", "mean", "sum"]


def _softmax_rows(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


# ==========================================================================
# 1. reference self-validation (no package needed)
# ==========================================================================
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.7])
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_reference_matches_mlx(rng, reduction, label_smoothing, axis, probs,
                               with_weights):
    shape = (4, 7, 5)
    x, x64 = to_mx(rng.normal(size=shape) * 3)
    ax = axis % 3
    if probs:
        t, t64 = to_mx(_softmax_rows(rng.normal(size=shape) * 2, axis=ax))
    else:
        t64 = rng.integers(0, shape[ax], size=shape[:ax] + shape[ax + 1:])
        t = mx.array(t64.astype(np.int32))
    lshape = shape[:ax] + shape[ax + 1:]
    w, w64 = (to_mx(rng.uniform(0.1, 2, size=lshape)) if with_weights
              else (None, None))
    kw = dict(axis=axis, label_smoothing=label_smoothing, reduction=reduction)
    got = nn.losses.cross_entropy(x, t, w, **kw)
    ref = R.cross_entropy(x64, t64, w64, **kw)
    lscale, gscale = R.cross_entropy_error_scales(x64, t64, w64, **kw)
    assert_close(got, ref, mx.float32, scale=lscale, what="mlx vs ref")
    # gradients through MLX's (differentiable) composite implementation
    g = mx.grad(lambda a: nn.losses.cross_entropy(a, t, w, **kw).sum())(x)
    gref = R.cross_entropy_grad(x64, t64, w64, **kw)
    assert_close(g, gref, mx.float32, scale=gscale, what="mlx grad vs ref")


def _ce_fd_case(rng, opts, probs, axis=-1):
    shape = (3, 5) if axis % 2 == 1 else (5, 3)  # always K = 5 classes
    x64 = rng.normal(size=shape) * 2
    ax = axis % len(shape)
    if probs:
        t64 = _softmax_rows(rng.normal(size=shape), axis=ax)
    else:
        t64 = rng.integers(0, shape[ax], size=shape[:ax] + shape[ax + 1:])
        if opts.get("ignore_index") is not None:
            t64.flat[0] = opts["ignore_index"]
    return x64, t64


CE_OPTS = [
    dict(),
    dict(label_smoothing=0.2),
    dict(label_smoothing=0.3, label_smoothing_mode="others"),
    dict(z_loss=0.1),
    dict(class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0])),
    dict(class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0]),
         label_smoothing=0.25, z_loss=1e-2),
    dict(class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0]),
         label_smoothing=0.25, label_smoothing_mode="others"),
    dict(ignore_index=-100),
    dict(ignore_index=1, class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0])),
    dict(weights=True),
    dict(weights=True, class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0]),
         ignore_index=-100, label_smoothing=0.1, z_loss=0.05),
]


@pytest.mark.parametrize("opts", CE_OPTS, ids=lambda o: ",".join(sorted(o)) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("axis", [-1, 0])
def test_reference_grad_finite_differences(rng, opts, reduction, probs, axis):
    opts = dict(opts)
    if probs and "ignore_index" in opts:
        opts.pop("ignore_index")
    x64, t64 = _ce_fd_case(rng, opts, probs, axis)
    w64 = None
    if opts.pop("weights", False):
        ax = axis % 2
        w64 = rng.uniform(0.2, 2.0, size=x64.shape[:ax] + x64.shape[ax + 1:])
    kw = dict(opts, axis=axis, reduction=reduction)
    ax = axis % 2
    lshape = x64.shape[:ax] + x64.shape[ax + 1:]
    cot = rng.normal(size=lshape) if reduction == "none" else None

    def f(a):
        out = R.cross_entropy(a, t64, w64, **kw)
        return (out * (cot if cot is not None else 1.0)).sum()

    num = R.numerical_grad(f, x64)
    ana = R.cross_entropy_grad(x64, t64, w64, cotangent=cot, **kw)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-7)


def test_reference_pytorch_formulation(rng):
    """Class weights + label smoothing written the way PyTorch documents it:
    loss_i = (1-eps) * w[t_i] * (-log p_{t_i}) + eps/K * sum_j w_j (-log p_j),
    mean = sum_i loss_i / sum_i w[t_i] over non-ignored rows."""
    K, N, eps = 6, 9, 0.15
    x = rng.normal(size=(N, K)) * 2
    t = rng.integers(0, K, size=N)
    t[[2, 5]] = -100
    w = rng.uniform(0.1, 3, size=K)
    logp = x - R.logsumexp(x, keepdims=True)
    keep = t != -100
    tt = np.where(keep, t, 0)
    li = (1 - eps) * w[tt] * -logp[np.arange(N), tt] + eps / K * (-(w * logp)).sum(-1)
    li = np.where(keep, li, 0)
    kw = dict(label_smoothing=eps, class_weights=w, ignore_index=-100)
    np.testing.assert_allclose(R.cross_entropy(x, t, **kw), li, rtol=1e-12)
    np.testing.assert_allclose(R.cross_entropy(x, t, reduction="mean", **kw),
                               li.sum() / w[tt][keep].sum(), rtol=1e-12)
    np.testing.assert_allclose(R.cross_entropy(x, t, reduction="sum", **kw),
                               li.sum(), rtol=1e-12)


def test_reference_others_mode_distribution():
    q = R.ce_target_dist(np.array([1, 0]), 4, False, 0.3, "others")
    np.testing.assert_allclose(q, [[0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    q = R.ce_target_dist(np.array([[0.0, 1.0, 0.0, 0.0]]), 4, True, 0.3, "others")
    np.testing.assert_allclose(q, [[0.1, 0.7, 0.1, 0.1]])
    q = R.ce_target_dist(np.array([[1.0]]), 1, True, 0.3, "others")
    np.testing.assert_allclose(q, [[1.0]])
    q = R.ce_target_dist(np.array([2]), 4, False, 0.4, "uniform")
    np.testing.assert_allclose(q, [[0.1, 0.1, 0.7, 0.1]])


def test_reference_special_rows():
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf] * 3, [1e4, -1e4, 0.0]])
    t = np.array([2, 0, 1])
    out = R.cross_entropy(x, t)
    assert np.isclose(out[0], np.log1p(np.exp(-1.0)))
    assert np.isnan(out[1])
    assert out[2] == 2e4
    g = R.cross_entropy_grad(x, t)
    assert g[0, 1] == 0 and np.all(np.isfinite(g[0]))
    out = R.cross_entropy(x[:1], t[:1], label_smoothing=0.1)
    assert np.isposinf(out[0])
    # out-of-range and ignored
    out = R.cross_entropy(x[[0, 0, 0]], np.array([3, -1, -100]), ignore_index=-100)
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2] == 0
    assert R.cross_entropy(x[:1], np.array([-100]), ignore_index=-100,
                           reduction="mean") == 0


# ==========================================================================
# 2. the package
# ==========================================================================
def _mx_opts(opts):
    o = dict(opts)
    if o.get("class_weights") is not None:
        o["class_weights"] = mx.array(np.asarray(o["class_weights"], np.float32))
    return o


def _np_opts(opts):
    o = dict(opts)
    if o.get("class_weights") is not None:
        o["class_weights"] = np.asarray(o["class_weights"], np.float32).astype(np.float64)
    return o


def check_ce(fl, x, t, weights=None, rng=None, check_grad=True, what="",
             **opts):
    """Forward + vjp of fl.cross_entropy against the float64 reference,
    everything computed from the exact (rounded) values the package sees."""
    dtype = x.dtype
    x64, t64 = to_np(x), to_np(t)
    w64 = None if weights is None else to_np(weights)
    ropts = _np_opts(opts)
    mopts = _mx_opts(opts)
    ref = R.cross_entropy(x64, t64, w64, **ropts)
    got = fl.cross_entropy(x, t, weights, **mopts)
    assert got.dtype == dtype, f"{what}: result dtype {got.dtype} != {dtype}"
    assert got.shape == ref.shape
    lscale, _ = R.cross_entropy_error_scales(x64, t64, w64, **ropts)
    assert_close(got, ref, dtype, scale=lscale, what=f"{what} loss")
    if not check_grad:
        return got
    rng = rng or np.random.default_rng(0)
    cot = mx.array(rng.normal(size=ref.shape).astype(np.float32)).astype(dtype)
    out, vjps = mx.vjp(lambda a: fl.cross_entropy(a, t, weights, **mopts),
                       [x], [cot])
    g = vjps[0]
    assert g.dtype == dtype and g.shape == x.shape
    gref = R.cross_entropy_grad(x64, t64, w64, cotangent=to_np(cot), **ropts)
    _, gscale = R.cross_entropy_error_scales(x64, t64, w64,
                                             cotangent=to_np(cot), **ropts)
    assert_close(g, gref, dtype, scale=gscale, what=f"{what} grad")
    return got


def _int_targets(rng, K, bshape, dtype=mx.int32):
    return mx.array(rng.integers(0, K, size=bshape).astype(np.int64)).astype(dtype)


def _logits(rng, shape, dtype, scale=3.0):
    return to_mx(rng.normal(size=shape) * scale, dtype)[0]


SHAPE_CASES = (
    [(V, b) for V in (1, 2, 31, 32, 33) for b in ((), (1,), (5,), (2, 3), (2, 1, 3))]
    + [(1000, ()), (1000, (4,)), (1000, (2, 3)), (1000, (1, 2, 2))]
    + [(4097, ()), (4097, (3,)), (50257, (2,)), (50257, (1, 1))]
)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V,bshape", SHAPE_CASES, ids=str)
def test_class_index_shapes(fl, rng, V, bshape, dtype):
    x = _logits(rng, bshape + (V,), dtype)
    t = _int_targets(rng, V, bshape)
    check_ce(fl, x, t, rng=rng, what=f"V={V} b={bshape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V,bshape", [(1, (3,)), (2, ()), (33, (2, 3)),
                                      (1000, (3,)), (4097, (2,)),
                                      (50257, (1,))], ids=str)
def test_prob_targets_shapes(fl, rng, V, bshape, dtype):
    x = _logits(rng, bshape + (V,), dtype)
    t = to_mx(_softmax_rows(rng.normal(size=bshape + (V,)) * 2), dtype)[0]
    check_ce(fl, x, t, rng=rng, what=f"probs V={V} b={bshape}")


OPTION_SETS = [
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.9),
    dict(label_smoothing=0.2, label_smoothing_mode="others"),
    dict(z_loss=1e-4),
    dict(z_loss=0.5, label_smoothing=0.05),
    dict(class_weights="rand"),
    dict(class_weights="rand", label_smoothing=0.3),
    dict(class_weights="rand", label_smoothing=0.3, label_smoothing_mode="others"),
    dict(ignore_index=-100),
    dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-3),
    dict(ignore_index=-1, class_weights="rand"),
    dict(weights="rand"),
    dict(weights="rand", label_smoothing=0.2, z_loss=1e-2),
    dict(weights="rand", class_weights="rand", ignore_index=-100,
         label_smoothing=0.1, label_smoothing_mode="others", z_loss=1e-3),
    dict(class_weights="rand", ignore_index=-100, z_loss=0.5),
]


def _materialize(rng, opts, K, bshape, probs):
    """Turn "rand" placeholders into arrays; returns (weights, opts, ignore)"""
    o = dict(opts)
    w = None
    if o.pop("weights", None) == "rand":
        w = to_mx(rng.uniform(0.0, 2.0, size=bshape))[0]
    if o.get("class_weights") == "rand":
        o["class_weights"] = rng.uniform(0.1, 3.0, size=K)
    if probs:
        o.pop("ignore_index", None)
    return w, o


def _opt_id(o):
    return ",".join(f"{k}={v if not isinstance(v, float) else f'{v:g}'}"
                    for k, v in sorted(o.items()))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_opt_id)
@pytest.mark.parametrize("V", [1, 2, 33, 1000])
def test_options_class_index(fl, rng, V, opts, reduction):
    bshape = (3, 4) if V < 1000 else (5,)
    w, o = _materialize(rng, opts, V, bshape, probs=False)
    t64 = rng.integers(0, V, size=bshape)
    if "ignore_index" in o:
        t64.flat[::3] = o["ignore_index"]  # several ignored rows
        if 0 <= o["ignore_index"] < V:
            pass  # an in-range class can be the ignore_index (PyTorch)
    x = _logits(rng, bshape + (V,), mx.float32)
    t = mx.array(t64.astype(np.int32))
    check_ce(fl, x, t, w, rng=rng, reduction=reduction, **o)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=_opt_id)
@pytest.mark.parametrize("V", [1, 2, 33, 1000])
def test_options_prob_targets(fl, rng, V, opts, reduction):
    bshape = (3, 4) if V < 1000 else (5,)
    w, o = _materialize(rng, opts, V, bshape, probs=True)
    x = _logits(rng, bshape + (V,), mx.float32)
    t = to_mx(_softmax_rows(rng.normal(size=bshape + (V,)) * 3))[0]
    check_ce(fl, x, t, w, rng=rng, reduction=reduction, **o)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [OPTION_SETS[i] for i in (0, 2, 3, 6, 9, 13)],
                         ids=_opt_id)
def test_options_low_precision(fl, rng, dtype, opts, reduction):
    V, bshape = 50, (6,)
    w, o = _materialize(rng, opts, V, bshape, probs=False)
    if w is not None:
        w = w.astype(dtype)
    t64 = rng.integers(0, V, size=bshape)
    if "ignore_index" in o:
        t64[1] = o["ignore_index"]
    x = _logits(rng, bshape + (V,), dtype)
    check_ce(fl, x, mx.array(t64.astype(np.int32)), w, rng=rng,
             reduction=reduction, **o)


def test_soft_targets_not_summing_to_one(fl, rng):
    """The definition is sum_j w_j q_j (lse - x_j); for targets that do not sum
    to one this is *not* lse - <x, t>."""
    x = _logits(rng, (4, 9), mx.float32)
    t = to_mx(rng.uniform(0, 1, size=(4, 9)))[0]
    for o in [dict(), dict(label_smoothing=0.3),
              dict(label_smoothing=0.3, label_smoothing_mode="others")]:
        check_ce(fl, x, t, rng=rng, **o)


# --------------------------------------------------------------------------
# layouts: non-contiguous, transposed, axis != -1, broadcast
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_transposed_logits(fl, rng, dtype):
    V, N = 37, 6
    base = _logits(rng, (V, N), dtype)
    t = _int_targets(rng, V, (N,))
    check_ce(fl, base.T, t, rng=rng, what="x.T axis=-1")
    check_ce(fl, base, t, axis=0, rng=rng, what="axis=0")
    check_ce(fl, base.T, t, rng=rng, reduction="mean", label_smoothing=0.1,
             what="x.T mean ls")
    tp = to_mx(_softmax_rows(rng.normal(size=(N, V))), dtype)[0]
    check_ce(fl, base, tp.T, axis=0, rng=rng, what="probs axis=0")
    check_ce(fl, base.T, tp, rng=rng, what="probs x.T")


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("probs", [False, True])
def test_3d_axes(fl, rng, axis, probs):
    shape = (5, 33, 4)
    x = _logits(rng, shape, mx.float32)
    ax = axis % 3
    lshape = shape[:ax] + shape[ax + 1:]
    if probs:
        t = to_mx(_softmax_rows(rng.normal(size=shape), axis=ax))[0]
    else:
        t = _int_targets(rng, shape[ax], lshape)
    w = to_mx(rng.uniform(0.5, 1.5, size=lshape))[0]
    for red in REDUCTIONS:
        check_ce(fl, x, t, axis=axis, rng=rng, reduction=red,
                 what=f"axis={axis} {red}")
    check_ce(fl, x, t, w, axis=axis, rng=rng, label_smoothing=0.2,
             z_loss=1e-3, class_weights=rng.uniform(0.5, 2, size=shape[ax]),
             reduction="mean", what=f"axis={axis} all-options")


def test_strided_slices(fl, rng):
    X = _logits(rng, (8, 70), mx.float32)
    T = _int_targets(rng, 70, (8,))
    x = X[::2, ::3]  # stepped class axis
    t = mx.array(to_np(T)[::2] % x.shape[-1]).astype(mx.int32)
    check_ce(fl, x, t, rng=rng, what="X[::2, ::3]")
    x = X[1::3, 5:60:7]
    t = mx.array(rng.integers(0, x.shape[-1], size=x.shape[0]).astype(np.int32))
    check_ce(fl, x, t, rng=rng, what="X[1::3, 5:60:7]")
    x = X[:, ::-1]
    check_ce(fl, x, T, rng=rng, what="reversed classes")
    # non-contiguous targets
    T2 = _int_targets(rng, 70, (16,))
    check_ce(fl, X, T2[::2], rng=rng, what="strided targets")
    # non-contiguous per-sample weights
    W = to_mx(rng.uniform(0, 2, size=(16,)))[0]
    check_ce(fl, X, T, W[::2], rng=rng, reduction="sum", what="strided weights")
    # 3-D transposes
    Y = _logits(rng, (3, 4, 40), mx.float32)
    y = mx.transpose(Y, (1, 0, 2))
    check_ce(fl, y, _int_targets(rng, 40, (4, 3)), rng=rng, what="transpose(1,0,2)")
    y = mx.transpose(Y, (2, 0, 1))
    check_ce(fl, y, _int_targets(rng, 4, (40, 3)), rng=rng, what="transpose(2,0,1)")
    check_ce(fl, y, _int_targets(rng, 40, (3, 4)), axis=0, rng=rng,
             what="transpose(2,0,1) axis=0")


def test_broadcast_logits(fl, rng):
    row = _logits(rng, (1, 33), mx.float32)
    x = mx.broadcast_to(row, (6, 33))
    t = _int_targets(rng, 33, (6,))
    check_ce(fl, x, t, rng=rng, what="stride-0 rows")
    col = _logits(rng, (6, 1), mx.float32)
    x = mx.broadcast_to(col, (6, 33))
    check_ce(fl, x, t, rng=rng, what="stride-0 classes")


def test_large_vocab_non_contiguous(fl, rng):
    X = _logits(rng, (50257, 2), mx.float32)
    t = _int_targets(rng, 50257, (2,))
    check_ce(fl, X.T, t, rng=rng, what="50257 transposed")
    check_ce(fl, X, t, axis=0, rng=rng, label_smoothing=0.1, z_loss=1e-4,
             reduction="mean", what="50257 axis=0")


# --------------------------------------------------------------------------
# extreme values
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [2, 33, 4097])
def test_huge_logits(fl, rng, dtype, V):
    x64 = rng.choice([-1e4, 1e4], size=(4, V)) + rng.normal(size=(4, V))
    x = to_mx(x64, dtype)[0]
    t = _int_targets(rng, V, (4,))
    check_ce(fl, x, t, rng=rng, what="+-1e4")
    check_ce(fl, x, t, rng=rng, label_smoothing=0.1, reduction="mean",
             what="+-1e4 ls mean")
    tp = to_mx(_softmax_rows(rng.normal(size=(4, V))), dtype)[0]
    check_ce(fl, x, tp, rng=rng, what="+-1e4 probs")


def test_huge_differences(fl, rng):
    x = mx.array([[-1e30, 0.0, 1e30], [1e38, -1e38, 0.0], [1e-30, 0.0, -1e-30],
                  [88.0, -88.0, 0.0], [1e4, 1e4 - 1, 1e4 - 2]], dtype=mx.float32)
    t = mx.array([0, 2, 2, 1, 0])
    check_ce(fl, x, t, rng=rng, what="huge differences")
    check_ce(fl, x, t, rng=rng, label_smoothing=0.1, what="huge differences ls")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [2, 33, 1000])
def test_neg_inf_entries(fl, rng, dtype, V):
    x64 = rng.normal(size=(5, V))
    t64 = rng.integers(0, V, size=5)
    mask = rng.uniform(size=(5, V)) < 0.5
    mask[np.arange(5), t64] = False  # target never -inf
    x64[mask] = -np.inf
    x = to_mx(x64, dtype)[0]
    t = mx.array(t64.astype(np.int32))
    check_ce(fl, x, t, rng=rng, what="-inf entries")
    check_ce(fl, x, t, rng=rng, z_loss=1e-3, class_weights=rng.uniform(0.5, 2, V),
             reduction="mean", what="-inf entries z cw")
    # probability targets with zero mass on the -inf classes
    p64 = _softmax_rows(rng.normal(size=(5, V)))
    p64[mask] = 0
    p64 /= p64.sum(-1, keepdims=True)
    check_ce(fl, x, to_mx(p64, dtype)[0], rng=rng, what="-inf entries probs")


def test_neg_inf_with_smoothing_is_inf(fl):
    """With label smoothing every class has target mass, so a -inf logit makes
    the loss +inf (as in mlx.nn.losses.cross_entropy)."""
    x = mx.array([[0.0, -float("inf"), 1.0], [0.0, 1.0, 2.0]])
    t = mx.array([2, 0])
    out = fl.cross_entropy(x, t, label_smoothing=0.1)
    ref = nn.losses.cross_entropy(x, t, label_smoothing=0.1)
    assert np.isposinf(to_np(out)[0]) and np.isposinf(to_np(ref)[0])
    assert np.isclose(to_np(out)[1], to_np(ref)[1], rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_all_neg_inf_row_is_nan(fl, dtype):
    x = mx.array([[-float("inf")] * 4, [0.0, 1.0, 2.0, 3.0]]).astype(dtype)
    t = mx.array([1, 2])
    out = to_np(fl.cross_entropy(x, t))
    mref = to_np(nn.losses.cross_entropy(x.astype(mx.float32), t))
    assert np.isnan(out[0]) and np.isnan(mref[0])
    assert np.isfinite(out[1])
    assert_close(out[1:], R.cross_entropy(to_np(x)[1:], to_np(t)[1:]), dtype)


# --------------------------------------------------------------------------
# ignore_index / out of range / integer dtypes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("cw", [False, True])
def test_all_rows_ignored(fl, rng, reduction, cw):
    x = _logits(rng, (4, 7), mx.float32)
    t = mx.full((4,), -100, dtype=mx.int32)
    kw = dict(ignore_index=-100, reduction=reduction, label_smoothing=0.1,
              z_loss=1e-2)
    if cw:
        kw["class_weights"] = mx.array(rng.uniform(0.5, 2, 7).astype(np.float32))
    out = fl.cross_entropy(x, t, **kw)
    assert np.all(to_np(out) == 0), to_np(out)
    g = mx.grad(lambda a: fl.cross_entropy(a, t, **kw).sum())(x)
    assert np.all(to_np(g) == 0), to_np(g)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 6])
def test_ignore_index_values(fl, rng, ignore_index):
    x = _logits(rng, (3, 4, 7), mx.float32)
    t64 = rng.integers(0, 7, size=(3, 4))
    t64[0, :2] = ignore_index
    t64[2, 3] = ignore_index
    t = mx.array(t64.astype(np.int32))
    for red in REDUCTIONS:
        got = check_ce(fl, x, t, rng=rng, ignore_index=ignore_index,
                       reduction=red, label_smoothing=0.2, z_loss=0.01)
        if red == "none":
            assert np.all(to_np(got)[t64 == ignore_index] == 0)
        cw = rng.uniform(0.5, 2, 7)
        check_ce(fl, x, t, rng=rng, ignore_index=ignore_index, reduction=red,
                 class_weights=cw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad,ignore", [(7, None), (-1, None), (100, -100),
                                        (-5, -100), (2**31 - 1, None),
                                        (-2**31, -100)])
def test_out_of_range_index_is_nan(fl, rng, reduction, bad, ignore):
    K = 7
    x = _logits(rng, (4, K), mx.float32)
    t64 = rng.integers(0, K, size=4)
    t64[1] = bad
    if ignore is not None:
        t64[3] = ignore
    t = mx.array(t64.astype(np.int64)).astype(mx.int32)
    kw = dict(reduction=reduction)
    if ignore is not None:
        kw["ignore_index"] = ignore
    out = to_np(fl.cross_entropy(x, t, **kw))
    if reduction == "none":
        assert np.isnan(out[1])
        good = [0, 2] + ([3] if ignore is None else [])
        assert np.all(np.isfinite(out[good]))
        np.testing.assert_allclose(out[good], R.cross_entropy(
            to_np(x), t64, ignore_index=ignore)[good], rtol=1e-5)
        if ignore is not None:
            assert out[3] == 0
    else:
        assert np.isnan(out), out
    g = to_np(mx.grad(lambda a: fl.cross_entropy(a, t, **kw).sum())(x))
    assert np.all(np.isnan(g[1])), g[1]
    if reduction == "none":
        gref = R.cross_entropy_grad(to_np(x), t64, ignore_index=ignore)
        good = [0, 2, 3]
        np.testing.assert_allclose(g[good], gref[good], rtol=1e-5, atol=1e-6)


INT_DTYPES = [mx.int8, mx.int16, mx.int32, mx.int64, mx.uint8, mx.uint16,
              mx.uint32, mx.uint64]


@pytest.mark.parametrize("tdtype", INT_DTYPES, ids=str)
def test_integer_target_dtypes(fl, rng, tdtype):
    V = 100
    x = _logits(rng, (2, 3, V), mx.float32)
    t = _int_targets(rng, V, (2, 3), tdtype)
    check_ce(fl, x, t, rng=rng, what=str(tdtype))
    check_ce(fl, x, t, rng=rng, reduction="mean", label_smoothing=0.1,
             class_weights=rng.uniform(0.5, 2, V), what=str(tdtype))
    if tdtype in (mx.int8, mx.int16, mx.int32, mx.int64):
        t2 = mx.array(np.array([[5, -100, 7], [-100, 0, 99]])).astype(tdtype)
        check_ce(fl, x, t2, rng=rng, ignore_index=-100, reduction="mean",
                 what=f"{tdtype} ignore")
    # an out-of-range value representable in the dtype
    t3 = mx.array(np.array([[V + 1, 0, 1], [2, 3, 4]])).astype(tdtype)
    out = to_np(fl.cross_entropy(x, t3))
    assert np.isnan(out[0, 0]) and np.all(np.isfinite(out.flat[1:]))


# --------------------------------------------------------------------------
# against mlx.nn.losses.cross_entropy
# --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ls", [0.0, 0.25])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("V", [1, 33, 4097])
def test_matches_mlx(fl, rng, reduction, ls, axis, probs, with_weights, V):
    shape = (V, 3) if axis == 0 else (3, V)
    ax = axis % 2
    x = _logits(rng, shape, mx.float32)
    if probs:
        t = to_mx(_softmax_rows(rng.normal(size=shape), axis=ax))[0]
    else:
        t = _int_targets(rng, V, (3,))
    w = to_mx(rng.uniform(0, 2, size=(3,)))[0] if with_weights else None
    kw = dict(axis=axis, label_smoothing=ls, reduction=reduction)
    got = fl.cross_entropy(x, t, w, **kw)
    exp = nn.losses.cross_entropy(x, t, w, **kw)
    assert got.dtype == exp.dtype and got.shape == exp.shape
    # both are fp32 computations: allow the fp32 error bound of each
    w64 = None if w is None else to_np(w)
    lsc, gsc = R.cross_entropy_error_scales(to_np(x), to_np(t), w64, **kw)
    assert_close(got, to_np(exp), mx.float32, scale=2 * lsc, what="vs mlx")

    def fg(a):
        return fl.cross_entropy(a, t, w, **kw).sum()

    def fm(a):
        return nn.losses.cross_entropy(a, t, w, **kw).sum()

    assert_close(mx.grad(fg)(x), to_np(mx.grad(fm)(x)), mx.float32,
                 scale=2 * gsc, what="grad vs mlx")


# --------------------------------------------------------------------------
# finite differences through the package (fp32, small)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("opts", CE_OPTS, ids=lambda o: ",".join(sorted(o)) or "plain")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_package_grad_finite_differences(fl, rng, opts, reduction):
    """Central differences of the package's own fp32 forward (h = 1e-2,
    float64 accumulation) agree with its backward."""
    opts = dict(opts)
    x64, t64 = _ce_fd_case(rng, opts, probs=False)
    w = None
    if opts.pop("weights", False):
        w = to_mx(rng.uniform(0.2, 2.0, size=t64.shape))[0]
    mopts = _mx_opts(opts)
    t = mx.array(t64.astype(np.int32))
    cot = rng.normal(size=t64.shape) if reduction == "none" else np.array(1.0)
    cmx = mx.array(cot.astype(np.float32))

    def f64(a):
        out = fl.cross_entropy(mx.array(a.astype(np.float32)), t, w,
                               reduction=reduction, **mopts)
        return float((np.array(out, np.float64) * cot).sum())

    num = R.numerical_grad(f64, x64, h=1e-2)
    x = mx.array(x64.astype(np.float32))
    ana = mx.vjp(lambda a: fl.cross_entropy(a, t, w, reduction=reduction,
                                            **mopts), [x], [cmx])[1][0]
    np.testing.assert_allclose(to_np(ana), num, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------
# defaults, dtypes, nn module
# --------------------------------------------------------------------------
def test_defaults_and_dtype(fl, rng):
    x = _logits(rng, (3, 5), mx.float32)
    t = _int_targets(rng, 5, (3,))
    assert fl.cross_entropy(x, t).shape == (3,)  # reduction="none" default
    assert to_np(fl.cross_entropy(x, t, z_loss=0.0)).shape == (3,)
    for dt in DTYPES:
        out = fl.cross_entropy(x.astype(dt), t, reduction="mean")
        assert out.dtype == dt and out.shape == ()
        g = mx.grad(lambda a: fl.cross_entropy(a, t, reduction="sum"))(x.astype(dt))
        assert g.dtype == dt


def test_stream_argument(fl, rng):
    x = _logits(rng, (3, 5), mx.float32)
    t = _int_targets(rng, 5, (3,))
    a = fl.cross_entropy(x, t, stream=mx.cpu)
    b = fl.cross_entropy(x, t, stream=mx.default_stream(mx.cpu))
    c = fl.cross_entropy(x, t)
    assert np.array_equal(to_np(a), to_np(c)) and np.array_equal(to_np(b), to_np(c))


def test_nn_module(fl, rng):
    x = _logits(rng, (4, 9), mx.float32)
    t = mx.array(np.array([1, -100, 3, 8], np.int32))
    cw = mx.array(rng.uniform(0.5, 2, 9).astype(np.float32))
    kw = dict(label_smoothing=0.1, reduction="mean", label_smoothing_mode="others",
              ignore_index=-100, class_weights=cw, z_loss=1e-3)
    mod = fl.nn.CrossEntropyLoss(**kw)
    assert isinstance(mod, nn.Module)
    np.testing.assert_allclose(to_np(mod(x, t)), to_np(fl.cross_entropy(x, t, **kw)),
                               rtol=1e-6)
    mod2 = fl.nn.CrossEntropyLoss(reduction="none")
    out = mod2(x[:2], t[:1].astype(mx.int32) * 0 + mx.array([1, 2]))
    np.testing.assert_allclose(to_np(out), to_np(fl.cross_entropy(
        x[:2], mx.array([1, 2]))), rtol=1e-6)
    assert out.shape == (2,)
    g = mx.grad(lambda a: mod(a, t))(x)
    np.testing.assert_allclose(to_np(g), to_np(mx.grad(
        lambda a: fl.cross_entropy(a, t, **kw))(x)), rtol=1e-6)


# --------------------------------------------------------------------------
# many rows (multi-threaded CPU paths), mixed dtypes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,V", [(20001, 7), (1500, 1000), (3, 50257)])
def test_many_rows(fl, rng, N, V, reduction):
    x = _logits(rng, (N, V), mx.float32)
    t64 = rng.integers(0, V, size=N)
    t64[::17] = -100
    t = mx.array(t64.astype(np.int32))
    w = to_mx(rng.uniform(0, 2, size=N))[0]
    check_ce(fl, x, t, rng=rng, reduction=reduction, what="many rows")
    check_ce(fl, x, t, w, rng=rng, reduction=reduction, ignore_index=-100,
             label_smoothing=0.1, z_loss=1e-4, what="many rows, options")
    check_ce(fl, x, t, rng=rng, reduction=reduction, ignore_index=-100,
             class_weights=rng.uniform(0.5, 2, V), what="many rows, cw")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weights_with_ignore_index_mean(fl, rng, reduction):
    """Per-sample weights + ignore_index (no class weights): "mean" divides
    by the number of non-ignored rows."""
    x = _logits(rng, (6, 9), mx.float32)
    t = mx.array(np.array([1, -100, 3, 8, -100, 0], np.int32))
    w = to_mx(rng.uniform(0.1, 2, 6))[0]
    check_ce(fl, x, t, w, rng=rng, reduction=reduction, ignore_index=-100)
    if reduction == "mean":
        out = fl.cross_entropy(x, t, w, reduction="mean", ignore_index=-100)
        per = R.cross_entropy(to_np(x), to_np(t), to_np(w), ignore_index=-100)
        np.testing.assert_allclose(out.item(), per.sum() / 4, rtol=1e-5)


@pytest.mark.parametrize("ldt", [mx.float16, mx.bfloat16, mx.float32], ids=dtype_id)
def test_mixed_input_dtypes_result_in_logits_dtype(fl, rng, ldt):
    x = _logits(rng, (4, 6), ldt)
    t = _int_targets(rng, 6, (4,))
    other = mx.float32 if ldt != mx.float32 else mx.float16
    w = to_mx(rng.uniform(0.5, 2, 4), other)[0]
    cw = rng.uniform(0.5, 2, 6)
    for red in REDUCTIONS:
        out = fl.cross_entropy(x, t, w, reduction=red,
                               class_weights=mx.array(cw.astype(np.float32)).astype(other))
        assert out.dtype == ldt, (red, out.dtype)
        ref = R.cross_entropy(to_np(x), to_np(t), to_np(w), reduction=red,
                              class_weights=to_np(mx.array(cw.astype(np.float32)).astype(other)))
        assert_close(out, ref, ldt, scale=30.0, what=f"mixed {red}")
        g = mx.grad(lambda a: fl.cross_entropy(a, t, w, reduction=red).sum())(x)
        assert g.dtype == ldt
    p = to_mx(_softmax_rows(rng.normal(size=(4, 6))), other)[0]
    out = fl.cross_entropy(x, p)
    assert out.dtype == ldt
    assert_close(out, R.cross_entropy(to_np(x), to_np(p)), ldt, scale=30.0,
                 what="mixed probs")


@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.3),
                                  dict(label_smoothing=0.3, label_smoothing_mode="others"),
                                  dict(class_weights=np.array([0.5, 2.0, 1.0, 0.1, 3.0]),
                                       z_loss=0.1)], ids=_opt_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_grad_wrt_prob_targets_fd(rng, opts, reduction):
    x = rng.normal(size=(3, 5))
    t = _softmax_rows(rng.normal(size=(3, 5)))
    w = rng.uniform(0.5, 2, size=3)
    kw = dict(opts, reduction=reduction)
    cot = rng.normal(size=3) if reduction == "none" else None
    num = R.numerical_grad(lambda a: (R.cross_entropy(x, a, w, **kw)
                                      * (1.0 if cot is None else cot)).sum(), t)
    np.testing.assert_allclose(R.cross_entropy_grad_targets(x, t, w, cotangent=cot, **kw),
                               num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.3),
                                  dict(label_smoothing=0.3, label_smoothing_mode="others"),
                                  dict(class_weights="rand", z_loss=0.1)], ids=_opt_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_wrt_prob_targets(fl, rng, dtype, opts, reduction):
    """Probability targets are differentiable (as with mlx.nn.losses)."""
    V = 33
    x = _logits(rng, (4, V), dtype)
    t = to_mx(_softmax_rows(rng.normal(size=(4, V))), dtype)[0]
    w, o = _materialize(rng, dict(opts, weights="rand"), V, (4,), probs=True)
    mo, ro = _mx_opts(o), _np_opts(o)
    g = mx.grad(lambda b: fl.cross_entropy(x, b, w, reduction=reduction, **mo).sum())(t)
    assert g.dtype == dtype
    gref = R.cross_entropy_grad_targets(to_np(x), to_np(t), to_np(w),
                                        reduction=reduction, **ro)
    sc = 8 * np.maximum(1, np.abs(to_np(x)).max())  # |lse - x_j| magnitudes
    assert_close(g, gref, dtype, scale=sc, what="d/dtargets")
    # (not compared with mlx.nn.losses: its target gradient is max - x_j
    # instead of lse - x_j, equal only on the simplex' tangent space)


def test_grad_wrt_per_sample_weights(fl, rng):
    x = _logits(rng, (5, 9), mx.float32)
    t = mx.array(np.array([1, -100, 3, 8, 0], np.int32))
    w = to_mx(rng.uniform(0.1, 2, 5))[0]
    kw = dict(ignore_index=-100, label_smoothing=0.1)
    g = mx.grad(lambda a: fl.cross_entropy(x, t, a, reduction="sum", **kw))(w)
    per = R.cross_entropy(to_np(x), to_np(t), **kw)
    assert_close(g, per, mx.float32, scale=10.0)


@pytest.mark.parametrize("value,tdtype,ignore", [
    (2**32 + 1, mx.int64, None), (2**31, mx.int64, None),
    (-2**32 + 2, mx.int64, None), (2**63 - 1, mx.int64, None),
    (2**32 - 1, mx.uint32, -1), (2**32 + 3, mx.int64, 3)], ids=str)
def test_out_of_range_beyond_int32(fl, rng, value, tdtype, ignore):
    """Indices that would alias a valid class (or the ignore_index) if
    truncated to 32 bits are still out of range."""
    x = _logits(rng, (3, 5), mx.float32)
    t = mx.array(np.array([value, 1, 2], dtype=np.int64 if tdtype == mx.int64
                          else np.uint32))
    assert t.dtype == tdtype
    for f in (lambda: fl.cross_entropy(x, t, ignore_index=ignore),
              lambda: fl.softmax_focal_loss(x, t, ignore_index=ignore)):
        out = to_np(f())
        assert np.isnan(out[0]) and np.all(np.isfinite(out[1:])), out


# ==========================================================================
# dtype=: the loss in float32 for float16/bfloat16 logits
# ==========================================================================
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, ignore_index=2)],
                         ids=["plain", "smooth+ignore"])
def test_result_dtype_float32(fl, rng, dtype, reduction, opts):
    """dtype=float32 returns the float32 loss, so a 16-bit model's mean/sum
    meets the float32 tolerance (it is not rounded to 8 or 11 mantissa bits);
    the gradient stays in the logits' dtype and equals the default's."""
    x = _logits(rng, (300, 67), dtype)
    t = _int_targets(rng, 67, (300,))
    x64, t64 = to_np(x), to_np(t)
    kw = dict(opts, reduction=reduction)
    ref = R.cross_entropy(x64, t64, **kw)
    got = fl.cross_entropy(x, t, dtype=mx.float32, **kw)
    assert got.dtype == mx.float32
    lscale, _ = R.cross_entropy_error_scales(x64, t64, **kw)
    assert_close(got, ref, mx.float32, scale=lscale, what="float32 loss")

    grad_f32 = mx.grad(lambda a: fl.cross_entropy(a, t, dtype=mx.float32, **kw).sum())(x)
    grad_default = mx.grad(lambda a: fl.cross_entropy(a, t, **kw).sum())(x)
    assert grad_f32.dtype == dtype
    np.testing.assert_array_equal(to_np(grad_f32), to_np(grad_default))


def test_result_dtype_bf16_mean_error(fl, rng):
    """The issue's case: the bf16 mean in the logits' dtype is off by up to
    ~2e-2 relative; the float32 result is within float32 tolerance."""
    x = _logits(rng, (2048, 1000), mx.bfloat16, scale=2.0)
    t = _int_targets(rng, 1000, (2048,))
    ref = float(R.cross_entropy(to_np(x), to_np(t), reduction="mean"))
    got = fl.cross_entropy(x, t, reduction="mean", dtype=mx.float32).item()
    default = fl.cross_entropy(x, t, reduction="mean").item()
    assert abs(got - ref) <= 2e-5 * abs(ref), (got, ref)
    # the default rounds to bf16 (8 bits): its error is bf16's, not fp32's
    assert abs(default - ref) <= 2 ** -8 * abs(ref)


def test_result_dtype_module_and_compile(fl, rng):
    x = _logits(rng, (16, 33), mx.bfloat16)
    t = _int_targets(rng, 33, (16,))
    crit = fl.nn.CrossEntropyLoss(dtype=mx.float32)
    eager = crit(x, t)
    assert eager.dtype == mx.float32
    compiled = mx.compile(lambda a: fl.cross_entropy(a, t, reduction="sum", dtype=mx.float32))(x)
    assert compiled.dtype == mx.float32
    np.testing.assert_allclose(compiled.item(), eager.item() * 16, rtol=1e-6)


@pytest.mark.parametrize("bad", [mx.int32, mx.bool_, "float32", np.float32])
def test_result_dtype_rejected(fl, bad):
    from conftest import assert_raises_naming
    assert_raises_naming((TypeError,), "dtype", fl.cross_entropy,
                         mx.zeros((2, 3)), mx.array([0, 1]), dtype=bad)


# ==========================================================================
# 3. the mean: the z term's denominator, and accuracy against float64
# ==========================================================================
ISSUE_X = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]]
ISSUE_T = [0, 2]
ISSUE_W = [1.0, 1.0, 0.5]


def _issue_mean_f64(scale=1.0, z=0.1):
    """The class-weighted mean with a z term, written out in float64: the
    cross-entropy over the summed class weights, z * lse^2 over the rows."""
    x, t, w = np.array(ISSUE_X), np.array(ISSUE_T), np.array(ISSUE_W) * scale
    lse = np.log(np.exp(x).sum(1))
    ce = (lse - x[np.arange(2), t]) * w[t]
    return ce.sum() / w[t].sum() + z * (lse ** 2).mean()


def test_class_weighted_z_loss_mean_is_scale_invariant(fl):
    """The z term was divided by the summed class weights: scaling the
    weights by 10 changed the loss (1.2915 vs 0.7650)."""
    x, t = mx.array(ISSUE_X), mx.array(ISSUE_T)
    want = _issue_mean_f64()
    assert abs(want - 1.1452229) < 1e-6
    for scale in (1.0, 10.0, 0.01, 1000.0):
        w = mx.array(ISSUE_W) * scale
        got = fl.cross_entropy(x, t, class_weights=w, z_loss=0.1, reduction="mean").item()
        assert abs(got - want) <= 2e-7 * want, (scale, got, want)
    # its gradient too: the z term's part is the same whatever the scale
    g1, g10 = (mx.grad(lambda a, w=w: fl.cross_entropy(
        a, t, class_weights=w, z_loss=0.1, reduction="mean"))(x)
        for w in (mx.array(ISSUE_W), mx.array(ISSUE_W) * 10))
    np.testing.assert_allclose(np.array(g1), np.array(g10), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [1, 31, 33, 4097])
def test_class_weighted_z_loss_mean_vs_reference(fl, rng, V, dtype):
    """Forward and gradient of the split mean against float64, with ignored
    rows and per-sample weights, at awkward vocabulary sizes."""
    bshape = (7,)
    t64 = rng.integers(0, V, size=bshape)
    t64[::3] = -100
    x = _logits(rng, bshape + (V,), dtype)
    t = mx.array(t64.astype(np.int32))
    cw = rng.uniform(0.1, 3.0, size=V)
    for weights in (None, mx.array(rng.uniform(0.5, 2.0, size=bshape).astype(np.float32))):
        check_ce(fl, x, t, weights, rng=rng, reduction="mean", class_weights=cw,
                 ignore_index=-100, z_loss=0.3, what=f"V={V}")


def _mean_rel_error(fl, rng, N, K, class_weights):
    x = (rng.standard_normal((N, K)) * 3).astype(np.float32)
    t = rng.integers(0, K, N)
    w = rng.uniform(0.1, 2.0, K).astype(np.float32) if class_weights else None
    got = fl.cross_entropy(mx.array(x), mx.array(t), class_weights=None if w is None else mx.array(w),
                           reduction="mean").item()
    x64 = x.astype(np.float64)
    rows = R.logsumexp(x64) - x64[np.arange(N), t]
    want = (rows * w[t]).sum() / w[t].astype(np.float64).sum() if class_weights else rows.mean()
    return abs(got - want) / want


@pytest.mark.parametrize("seed,K,class_weights", [(1, 32000, False), (0, 1000, True), (2, 1000, True)])
def test_mean_as_accurate_as_its_rows(fl, seed, K, class_weights):
    """1269 rows: the float32 sums of the per-row losses and of the class
    weights (mx.sum) gave 5.6e-7 (unweighted, 32000 classes) and 1.4e-6
    (class-weighted) relative error against float64 for these seeds (PyTorch:
    ~1e-7). Summed in double, the mean is the rows' mean rounded once or
    twice: within 2^-23."""
    err = _mean_rel_error(fl, np.random.default_rng(seed), 1269, K, class_weights)
    assert err <= 2.0 ** -23, err


def test_accurate_sum(fl):
    """The reduction behind the means: a million float32 values whose float32
    running sum drifts, against float64; its gradient is ones; shapeless
    compile at another size; vmap sums each entry."""
    from mlx_fused_losses import _ext
    rng = np.random.default_rng(3)
    v = rng.uniform(0.0, 1.0, 10 ** 6).astype(np.float32)
    got = _ext.accurate_sum(mx.array(v)).item()
    want = v.astype(np.float64).sum()
    assert abs(got - want) <= 0.5 * np.spacing(np.float32(want)), (got, want)
    assert _ext.accurate_sum(mx.zeros((0,))).item() == 0.0
    assert np.isinf(_ext.accurate_sum(mx.array([1.0, np.inf, 2.0])).item())
    assert np.isnan(_ext.accurate_sum(mx.array([1.0, np.nan])).item())
    # 16-bit input is summed as float32
    assert _ext.accurate_sum(mx.ones((3, 5), mx.bfloat16)).dtype == mx.float32
    g = mx.grad(lambda a: 3.0 * _ext.accurate_sum(a))(mx.ones((2, 3)))
    assert np.array_equal(np.array(g), np.full((2, 3), 3.0))
    f = mx.compile(mx.value_and_grad(lambda a: _ext.accurate_sum(a * a)), shapeless=True)
    for n in (4, 9, 0):
        a = mx.arange(n).astype(mx.float32)
        val, grad = f(a)
        assert val.item() == float((np.arange(n) ** 2).sum()) and np.array_equal(np.array(grad), 2 * np.arange(n))
    b = mx.array(rng.standard_normal((3, 4, 5)).astype(np.float32))
    np.testing.assert_allclose(np.array(mx.vmap(_ext.accurate_sum, in_axes=1)(b)),
                               np.array(b).sum(axis=(0, 2)), rtol=1e-6)


# ==========================================================================
# 4. logit_softcap (Gemma 2): the loss of c * tanh(logits / c)
# ==========================================================================
SOFTCAP_OPTIONS = [
    dict(logit_softcap=2.5),
    dict(logit_softcap=30.0, label_smoothing=0.1, z_loss=1e-3),
    dict(logit_softcap=1.5, class_weights="rand", ignore_index=-100, z_loss=0.2),
    dict(logit_softcap=4.0, label_smoothing=0.2, label_smoothing_mode="others", weights="rand"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", SOFTCAP_OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [1, 31, 33, 4097])
def test_logit_softcap_vs_reference(fl, rng, V, dtype, opts, reduction):
    """Forward and gradient w.r.t. the raw logits against float64, hard
    targets with ignored rows and soft targets, awkward vocabularies."""
    bshape = (3, 4) if V < 4097 else (5,)
    for probs in (False, True):
        w, o = _materialize(rng, opts, V, bshape, probs=probs)
        x = _logits(rng, bshape + (V,), dtype, scale=6.0)  # beyond the cap: tanh saturates
        if probs:
            t = to_mx(_softmax_rows(rng.normal(size=bshape + (V,))), dtype)[0]
        else:
            t64 = rng.integers(0, V, size=bshape)
            if "ignore_index" in o:
                t64.flat[::3] = o["ignore_index"]
            t = mx.array(t64.astype(np.int32))
        check_ce(fl, x, t, w, rng=rng, reduction=reduction, what=f"probs={probs}", **o)


def test_logit_softcap_changes_the_loss_and_neg_inf(fl, rng):
    """The cap is applied (not ignored): a capped loss differs from the
    uncapped one; a -inf logit becomes -c (finite) and gets no gradient."""
    x = mx.array([[8.0, -np.inf, 0.5, 3.0]])
    t = mx.array([2])
    capped = fl.cross_entropy(x, t, logit_softcap=2.0).item()
    z = 2.0 * np.tanh(np.array([8.0, -np.inf, 0.5, 3.0]) / 2.0)
    want = np.log(np.exp(z).sum()) - z[2]
    assert abs(capped - want) <= 1e-6 * want
    assert abs(capped - fl.cross_entropy(x, t).item()) > 1.0
    g = np.array(mx.grad(lambda a: fl.cross_entropy(a, t, logit_softcap=2.0).sum())(x))
    assert np.all(np.isfinite(g)) and g[0, 1] == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_logit_softcap_matches_linear_cross_entropy(fl, rng, dtype):
    """The same logits through cross_entropy(logit_softcap=c) and the fused
    linear CE with the same option: loss and the gradients w.r.t. hidden and
    weight (through hidden @ weight.T) agree."""
    N, H, V = 37, 24, 257
    h = to_mx(rng.normal(size=(N, H)), dtype)[0]
    W = to_mx(rng.normal(size=(V, H)) * 0.6, dtype)[0]
    t64 = rng.integers(0, V, N)
    t64[::5] = -100
    t = mx.array(t64.astype(np.int32))
    opts = dict(logit_softcap=3.0, label_smoothing=0.1, z_loss=1e-3, ignore_index=-100,
                reduction="mean", dtype=mx.float32)

    def via_logits(h, W):
        logits = (h.astype(mx.float32) @ W.astype(mx.float32).T)
        return fl.cross_entropy(logits, t, **opts)

    def fused(h, W):
        return fl.linear_cross_entropy(h.astype(mx.float32), W.astype(mx.float32), t, **opts)

    (a, ga), (b, gb) = (mx.value_and_grad(f, argnums=(0, 1))(h, W) for f in (via_logits, fused))
    assert abs(a.item() - b.item()) <= 2e-6 * abs(b.item())
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(to_np(x), to_np(y), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_logit_softcap_rejected(fl, bad):
    x, t = mx.zeros((2, 3)), mx.array([0, 1])
    with pytest.raises(ValueError, match="logit_softcap must be a finite number > 0"):
        fl.cross_entropy(x, t, logit_softcap=bad)
    with pytest.raises(ValueError, match="logit_softcap must be a finite number > 0"):
        fl.nn.CrossEntropyLoss(logit_softcap=bad)
    with pytest.raises(TypeError, match="logit_softcap must be a number"):
        fl.cross_entropy(x, t, logit_softcap="30")


# Liger-Kernel's own cases (test/transformers/test_cross_entropy.py:
# test_correctness_with_softcap_once and
# test_correctness_with_weight_with_other_params_once), as our tests: their
# B*T = 3*423 rows, standard-normal logits, reductions, options and
# tolerances (float32 atol 1e-8 / rtol 1e-6, bfloat16 rtol 5e-2), judged
# against float64 instead of PyTorch. Vocabulary 1031 (odd) instead of
# 32000, to keep the suite fast.
LIGER_CASES = [
    dict(logit_softcap=30.0),
    dict(logit_softcap=30.0, class_weights="unit", ignore_index=-100, z_loss=1e-4,
         label_smoothing=0.1),
    dict(logit_softcap=40.0, class_weights="unit", ignore_index=42, z_loss=1e-5,
         label_smoothing=0.2),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", LIGER_CASES, ids=_opt_id)
@pytest.mark.parametrize("dtype,atol,rtol", [(mx.float32, 1e-8, 1e-6), (mx.bfloat16, 1e-8, 5e-2)],
                         ids=["fp32", "bf16"])
def test_liger_softcap_cases(fl, dtype, atol, rtol, opts, reduction):
    rng = np.random.default_rng(0)
    N, V = 3 * 423, 1031
    o = dict(opts)
    if o.get("class_weights") == "unit":
        o["class_weights"] = rng.random(V).astype(np.float32)  # torch.rand(V)
    x = to_mx(rng.standard_normal((N, V)), dtype)[0]
    t64 = rng.integers(0, V, N)
    if "ignore_index" in o:  # Liger: a random number (1 .. N/2) of rows ignored
        t64[rng.permutation(N)[:rng.integers(1, N // 2)]] = o["ignore_index"]
    t = mx.array(t64)
    x64, ro, mo = to_np(x), _np_opts(o), _mx_opts(o)
    want = R.cross_entropy(x64, t64, reduction=reduction, **ro)
    cot = np.ones(want.shape)
    got, vjps = mx.vjp(lambda a: fl.cross_entropy(a, t, reduction=reduction, dtype=mx.float32, **mo),
                       [x], [mx.array(cot.astype(np.float32))])
    np.testing.assert_allclose(np.array(got[0]), want, atol=atol, rtol=rtol)
    gwant = R.cross_entropy_grad(x64, t64, reduction=reduction, cotangent=cot, **ro)
    np.testing.assert_allclose(to_np(vjps[0]), gwant, atol=atol, rtol=rtol)


# ==========================================================================
# 5. return_stats: (loss, {"lse", "correct", "entropy", "argmax"})
# ==========================================================================
def _stats_f64(x, t, axis=-1, cap=None, ignore_index=None, soft=False):
    z = np.moveaxis(R.softcap(x, cap), axis, -1)
    lse = R.logsumexp(z)
    p = np.exp(z - lse[..., None])
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    argmax = z.argmax(-1)
    K = z.shape[-1]
    if soft:
        cls, kept = np.moveaxis(t, axis, -1).argmax(-1), np.ones(lse.shape, bool)
    else:
        cls = np.asarray(t, np.int64)
        kept = (cls >= 0) & (cls < K) & ((cls != ignore_index) if ignore_index is not None else True)
    target = np.take_along_axis(z, np.clip(cls, 0, K - 1)[..., None], -1)[..., 0]
    correct = kept & (target == z.max(-1))
    return lse, entropy, argmax, correct


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [1, 31, 33, 4097])
def test_return_stats_vs_reference(fl, rng, V, dtype, cap):
    """Every statistic against float64 of the (capped) logits, for hard
    targets with ignored and out-of-range rows and for soft targets; the loss
    is the one return_stats=False gives; stats are not differentiable."""
    bshape = (3, 5)
    x = _logits(rng, bshape + (V,), dtype, scale=4.0)
    x64 = to_np(x)
    # peaked rows: the target is the argmax of some rows (accuracy not all False)
    t64 = x64.argmax(-1)
    t64[0, ::2] = rng.integers(0, V, 3)
    t64[1, 1] = -100
    t64[2, 2] = V  # out of range
    t = mx.array(t64.astype(np.int32))
    p = to_mx(_softmax_rows(rng.normal(size=bshape + (V,))), dtype)[0]
    for targets, soft in ((t, False), (p, True)):
        kw = dict(ignore_index=-100, logit_softcap=cap, reduction="mean", label_smoothing=0.1)
        loss, stats = fl.cross_entropy(x, targets, return_stats=True, **kw)
        assert set(stats) == {"lse", "correct", "entropy", "argmax"}
        plain = fl.cross_entropy(x, targets, **kw)
        assert np.array_equal(to_np(loss), to_np(plain), equal_nan=True)
        lse, entropy, argmax, correct = _stats_f64(x64, to_np(targets), cap=cap, ignore_index=-100,
                                                   soft=soft)
        for key, want in (("lse", lse), ("entropy", entropy)):
            assert stats[key].dtype == mx.float32 and stats[key].shape == bshape
            np.testing.assert_allclose(to_np(stats[key]), want, rtol=2e-6,
                                       atol=2e-6 * max(1.0, np.abs(lse).max()), err_msg=key)
        assert stats["argmax"].dtype == mx.int64
        if cap is None:  # (capping in float32 can tie two large logits; float64 cannot)
            assert np.array_equal(np.array(stats["argmax"]), argmax)
            assert np.array_equal(np.array(stats["correct"]), correct)
            if not soft and V > 1:
                assert correct.sum() >= 5 and not correct[1, 1] and not correct[2, 2]
        assert stats["correct"].dtype == mx.bool_
        g = mx.grad(lambda a: sum(v.astype(mx.float32).sum() for v in fl.cross_entropy(
            a, targets, return_stats=True, **kw)[1].values()))(x)
        assert not np.any(to_np(g))


def test_return_stats_other_axis_and_linear_ce(fl, rng):
    """Class axis 1 of [N, K, L] logits; and the linear CE's statistics on the
    same logits (same keys, same values)."""
    x = _logits(rng, (2, 9, 4), mx.float32)
    t = mx.array(rng.integers(0, 9, (2, 4)).astype(np.int32))
    _, stats = fl.cross_entropy(x, t, axis=1, return_stats=True)
    lse, entropy, argmax, correct = _stats_f64(to_np(x), to_np(t), axis=1)
    np.testing.assert_allclose(to_np(stats["lse"]), lse, rtol=2e-6)
    np.testing.assert_allclose(to_np(stats["entropy"]), entropy, rtol=2e-6, atol=2e-6)
    assert np.array_equal(np.array(stats["argmax"]), argmax)
    assert np.array_equal(np.array(stats["correct"]), correct)

    N, H, V = 29, 16, 70
    h = mx.array(rng.normal(size=(N, H)).astype(np.float32))
    W = mx.array((rng.normal(size=(V, H)) * 0.8).astype(np.float32))
    t64 = rng.integers(0, V, N)
    t64[::4] = -100
    t = mx.array(t64)
    opts = dict(ignore_index=-100, logit_softcap=5.0, return_stats=True)
    _, a = fl.cross_entropy(h @ W.T, t, **opts)
    _, b = fl.linear_cross_entropy(h, W, t, **opts)
    for key in ("lse", "entropy"):
        np.testing.assert_allclose(to_np(a[key]), to_np(b[key]), rtol=3e-6, atol=3e-6, err_msg=key)
    assert np.array_equal(np.array(a["correct"]), np.array(b["correct"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_return_stats_argmax_ties_nan_inf(fl, dtype):
    """argmax is mx.argmax's: the first maximal index, ties across the CPU
    kernel's 2048-element chunks and inside one, a NaN (the first NaN wins),
    +inf, and a row of -inf (index 0; its entropy is NaN, its lse -inf);
    entropy of rows with -inf entries is finite. Hard and soft targets."""
    V = 5000
    x = np.random.default_rng(3).normal(size=(7, V)).astype(np.float32)
    x[0, [10, 2047, 2048, 4999]] = 9.0  # first tie at 10
    x[1, [4097, 2049]] = 9.0  # the tie inside the second chunk and later: 2049
    x[2, [3000, 100]] = np.nan  # first NaN
    x[3, 777] = np.inf
    x[4, :] = -np.inf
    x[5, ::2] = -np.inf
    x[6, [4999, 4998]] = 9.0  # in the last chunk
    xm = to_mx(x, dtype)[0]
    want = np.array(mx.argmax(xm, axis=-1)).astype(np.int64)
    assert list(want[:4]) == [10, 2049, 100, 777] and want[4] == 0 and want[6] == 4998
    t = mx.array(np.arange(7) * 700)
    p = mx.softmax(mx.array(np.random.default_rng(4).normal(size=(7, V)).astype(np.float32)), axis=-1)
    for targets in (t, p.astype(xm.dtype)):
        _, stats = fl.cross_entropy(xm, targets, return_stats=True)
        assert np.array_equal(np.array(stats["argmax"]), want)
        ent, lse = to_np(stats["entropy"]), to_np(stats["lse"])
        assert np.isnan(ent[4]) and lse[4] == -np.inf
        assert np.all(np.isfinite(ent[[0, 1, 5, 6]])) and ent[5] > 0


# ==========================================================================
# token_scaling (Liger's use_token_scaling, DFT)
# ==========================================================================
def _target_prob_f64(x64, t64, cap, ignore_index):
    z = R.softcap(x64, cap)
    p = np.exp(z - R.logsumexp(z)[..., None])
    K = z.shape[-1]
    kept = (t64 >= 0) & (t64 < K) & (t64 != ignore_index)
    return np.where(kept, np.take_along_axis(p, np.clip(t64, 0, K - 1)[..., None], -1)[..., 0], 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("V", [1, 33, 4097])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0),
    dict(class_weights=True, z_loss=1e-2),  # the mean's separate z term, scaled too
    dict(class_weights=True, label_smoothing=0.2, label_smoothing_mode="others"),
], ids=["plain", "smooth_z_cap", "cw_z", "cw_others"])
def test_token_scaling_vs_reference(fl, rng, V, dtype, reduction, opts):
    """Each row's loss (z term included) times its target's probability,
    detached: the float64 loss with per-sample weights w * p_t, and its
    gradient (p_t a constant); with per-sample weights and ignored rows."""
    opts = dict(opts)
    x = _logits(rng, (3, 6, V), dtype)
    x64 = to_np(x)
    t64 = x64.argmax(-1)  # peaked: probabilities not all small
    t64[0, ::2] = rng.integers(0, V, 3)
    t64[1, 2] = -100
    t = mx.array(t64.astype(np.int32))
    if opts.pop("class_weights", False):
        opts["class_weights"], cw64 = to_mx(rng.uniform(0.2, 2.0, V))
    w, w64 = to_mx(rng.uniform(0.5, 1.5, (3, 6)))
    kw = dict(ignore_index=-100, reduction=reduction, **opts)
    p64 = _target_prob_f64(x64, t64, opts.get("logit_softcap"), -100)
    ref_kw = dict(kw, class_weights=cw64 if "class_weights" in opts else None)
    want = R.cross_entropy(x64, t64, w64 * p64, **ref_kw)
    got = fl.cross_entropy(x, t, w, token_scaling=True, **kw)
    lscale, gscale = R.cross_entropy_error_scales(x64, t64, w64, **ref_kw)
    assert_close(got, want, dtype, scale=lscale, what="loss")
    g = mx.grad(lambda a: fl.cross_entropy(a, t, w, token_scaling=True, **kw).sum())(x)
    gwant = R.cross_entropy_grad(x64, t64, w64 * p64, **ref_kw)
    assert_close(g, gwant, dtype, scale=gscale, what="grad")
    assert float(np.abs(to_np(got)).sum()) < float(np.abs(to_np(
        fl.cross_entropy(x, t, w, **kw))).sum()) or V == 1


def test_token_scaling_liger_cases(fl, rng):
    """Liger-Kernel's test_correctness_token_scaling* (B*T = 8, V = 16, with
    bias; reduction none and sum) on logits, with its tolerances (1e-4), and
    the Module equal to the function (its consistency case, 1e-6)."""
    h64 = rng.normal(size=(8, 8))
    W64, b64 = rng.normal(size=(16, 8)), rng.normal(size=16)
    logits = mx.array((h64 @ W64.T + b64).astype(np.float32))
    t64 = rng.integers(0, 16, 8)
    t64[3] = -100
    t = mx.array(t64)
    x64 = to_np(logits)
    p64 = _target_prob_f64(x64, t64, None, -100)
    for reduction in ("none", "sum"):
        got = fl.cross_entropy(logits, t, ignore_index=-100, reduction=reduction, token_scaling=True)
        want = R.cross_entropy(x64, t64, p64, ignore_index=-100, reduction=reduction)
        np.testing.assert_allclose(to_np(got), want, atol=1e-4, rtol=1e-4)
        g = mx.grad(lambda a: fl.cross_entropy(a, t, ignore_index=-100, reduction=reduction,
                                               token_scaling=True).sum())(logits)
        gwant = R.cross_entropy_grad(x64, t64, p64, ignore_index=-100, reduction=reduction)
        np.testing.assert_allclose(to_np(g), gwant, atol=1e-4, rtol=1e-4)
    module = fl.nn.CrossEntropyLoss(reduction="sum", token_scaling=True)
    np.testing.assert_allclose(to_np(module(logits, t)), to_np(fl.cross_entropy(
        logits, t, ignore_index=-100, reduction="sum", token_scaling=True)), atol=1e-6, rtol=1e-6)
    assert to_np(fl.cross_entropy(logits, t, ignore_index=-100, token_scaling=True))[3] == 0.0


def test_token_scaling_bad_input(fl):
    x = mx.zeros((2, 3))
    with pytest.raises(ValueError, match="token_scaling.*class-index"):
        fl.cross_entropy(x, mx.zeros((2, 3)), token_scaling=True)
    with pytest.raises(TypeError, match="token_scaling must be a bool"):
        fl.cross_entropy(x, mx.array([0, 1]), token_scaling=1)
    with pytest.raises(TypeError, match="token_scaling must be a bool"):
        fl.nn.CrossEntropyLoss(token_scaling="yes")


def test_liger_structured_output_case(fl):
    """Liger-Kernel's test_liger_cross_entropy_structured_output, as our test:
    predicted tokens are the logits' argmax (int64), token accuracy the mean
    of "correct" and consistent with them; the loss still differentiates."""
    logits = mx.array([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.7, -0.2, 0.9]])
    targets = mx.array([0, 1, 2])
    loss, stats = fl.cross_entropy(logits, targets, reduction="mean", z_loss=1e-4, return_stats=True)
    assert loss.shape == ()
    expected = np.array(logits).argmax(-1)
    assert stats["argmax"].dtype == mx.int64 and stats["argmax"].shape == (3,)
    assert np.array_equal(np.array(stats["argmax"]), expected)
    accuracy = stats["correct"].astype(mx.float32).mean().item()
    assert abs(accuracy - (expected == np.array(targets)).mean()) <= 1e-6
    g = mx.grad(lambda a: fl.cross_entropy(a, targets, reduction="mean", return_stats=True)[0])(logits)
    assert np.any(np.array(g))


def test_return_stats_empty_batch(fl):
    """No rows: empty statistics of the rows' shape (mx.argmax refuses an
    empty array when built)."""
    for t in (mx.zeros((0,), mx.int32), mx.zeros((0, 5))):
        loss, stats = fl.cross_entropy(mx.zeros((0, 5)), t, return_stats=True, reduction="mean")
        assert loss.item() == 0.0
        assert {k: v.shape for k, v in stats.items()} == dict.fromkeys(stats, (0,))
