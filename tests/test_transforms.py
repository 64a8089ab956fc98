"""Every loss under mx.grad / mx.value_and_grad / mx.vjp, mx.compile
(also shapeless=True), and mx.vmap (leading axis, non-zero in_axes,
unbatched targets), for float32/float16/bfloat16, against the float64
reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import DTYPES, assert_close, dtype_id, to_mx, to_np

V = 13


class Case:
    def __init__(self, name, make, f, ref, gref, classes=True):
        self.name, self.make, self.f = name, make, f
        self.ref, self.gref, self.classes = ref, gref, classes

    def __repr__(self):
        return self.name


CW = np.linspace(0.5, 2.0, V).astype(np.float32)
ALPHA = np.linspace(0.1, 1.0, V).astype(np.float32)


def _idx(rng, lead, dtype):
    x = to_mx(rng.normal(size=lead + (V,)) * 2, dtype)[0]
    t64 = rng.integers(0, V, size=lead)
    if t64.size > 2:
        t64.flat[1] = -100
    return x, mx.array(t64.astype(np.int32))


def _probs(rng, lead, dtype):
    x = to_mx(rng.normal(size=lead + (V,)) * 2, dtype)[0]
    p = rng.uniform(size=lead + (V,))
    return x, to_mx(p / p.sum(-1, keepdims=True), dtype)[0]


def _pair(rng, lead, dtype):
    return (to_mx(rng.normal(size=lead + (V,)) * 2, dtype)[0],
            to_mx(rng.normal(size=lead + (V,)) * 2, dtype)[0])


def _binary(rng, lead, dtype):
    return (to_mx(rng.normal(size=lead + (V,)) * 3, dtype)[0],
            to_mx(rng.uniform(size=lead + (V,)) < 0.4, dtype)[0])


def _fl():
    import mlx_fused_losses as fl
    return fl


CE_KW = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-100)
CEP_KW = dict(label_smoothing=0.2, label_smoothing_mode="others", z_loss=1e-3)
SF_KW = dict(gamma=1.5, ignore_index=-100)

CASES = [
    Case("ce_index", _idx,
         lambda x, t, r: _fl().cross_entropy(x, t, reduction=r, **CE_KW),
         lambda x, t, r: R.cross_entropy(x, t, reduction=r, **CE_KW),
         lambda x, t, r, c: R.cross_entropy_grad(x, t, reduction=r, cotangent=c,
                                                 **CE_KW)),
    Case("ce_index_cw", _idx,
         lambda x, t, r: _fl().cross_entropy(
             x, t, reduction=r, ignore_index=-100, class_weights=mx.array(CW)),
         lambda x, t, r: R.cross_entropy(x, t, reduction=r, ignore_index=-100,
                                         class_weights=CW.astype(np.float64)),
         lambda x, t, r, c: R.cross_entropy_grad(
             x, t, reduction=r, cotangent=c, ignore_index=-100,
             class_weights=CW.astype(np.float64))),
    Case("ce_probs", _probs,
         lambda x, t, r: _fl().cross_entropy(x, t, reduction=r, **CEP_KW),
         lambda x, t, r: R.cross_entropy(x, t, reduction=r, **CEP_KW),
         lambda x, t, r, c: R.cross_entropy_grad(x, t, reduction=r, cotangent=c,
                                                 **CEP_KW)),
    Case("smooth_l1", _pair,
         lambda x, t, r: _fl().smooth_l1_loss(x, t, beta=0.5, reduction=r),
         lambda x, t, r: R.smooth_l1(x, t, 0.5, r),
         lambda x, t, r, c: R.smooth_l1_grad(x, t, 0.5, r, c), classes=False),
    Case("huber", _pair,
         lambda x, t, r: _fl().huber_loss(x, t, delta=1.5, reduction=r),
         lambda x, t, r: R.huber(x, t, 1.5, r),
         lambda x, t, r, c: R.huber_grad(x, t, 1.5, r, c), classes=False),
    Case("sigmoid_focal", _binary,
         lambda x, t, r: _fl().sigmoid_focal_loss(x, t, 0.25, 2.0, reduction=r),
         lambda x, t, r: R.sigmoid_focal(x, t, 0.25, 2.0, r),
         lambda x, t, r, c: R.sigmoid_focal_grad(x, t, 0.25, 2.0, r, c),
         classes=False),
    Case("softmax_focal", _idx,
         lambda x, t, r: _fl().softmax_focal_loss(
             x, t, alpha=mx.array(ALPHA), reduction=r, **SF_KW),
         lambda x, t, r: R.softmax_focal(x, t, alpha=ALPHA.astype(np.float64),
                                         reduction=r, **SF_KW),
         lambda x, t, r, c: R.softmax_focal_grad(
             x, t, alpha=ALPHA.astype(np.float64), reduction=r, cotangent=c,
             **SF_KW)),
]

# inputs are bounded (|x| <~ 10, V = 13), so a fixed magnitude bounds the
# fp32-arithmetic part of the error (see conftest.assert_close)
MAG = 30.0


def _check(case, x, t, r, out, dtype, what, n_rows=None):
    ref = case.ref(to_np(x), to_np(t), r)
    n = n_rows if n_rows is not None else max(1, ref.size)
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}"
    assert_close(out, ref, dtype, scale=MAG * (n if r == "sum" else 1) * V,
                 what=what)


def _check_grad(case, x, t, r, cot, g, dtype, what):
    gref = case.gref(to_np(x), to_np(t), r, to_np(cot))
    assert g.dtype == dtype, f"{what}: grad dtype {g.dtype}"
    assert_close(g, gref, dtype, scale=MAG * float(np.abs(to_np(cot)).max()),
                 what=what)


LEAD = (3, 4)


# --------------------------------------------------------------------------
# autodiff
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad_value_and_grad_vjp(fl, rng, case, dtype):
    x, t = case.make(rng, LEAD, dtype)
    for r in ("mean", "sum"):
        f = lambda a: case.f(a, t, r)  # noqa: E731
        g = mx.grad(f)(x)
        one = mx.array(1.0, dtype=dtype)
        _check_grad(case, x, t, r, one, g, dtype, f"{case} grad {r}")
        v, g2 = mx.value_and_grad(f)(x)
        _check(case, x, t, r, v, dtype, f"{case} value {r}")
        assert np.array_equal(to_np(g), to_np(g2), equal_nan=True)
        assert np.array_equal(to_np(v), to_np(f(x)), equal_nan=True)
    cot = to_mx(rng.normal(size=case.ref(to_np(x), to_np(t), "none").shape),
                dtype)[0]
    outs, (g,) = mx.vjp(lambda a: case.f(a, t, "none"), [x], [cot])
    _check(case, x, t, "none", outs[0], dtype, f"{case} vjp out")
    _check_grad(case, x, t, "none", cot, g, dtype, f"{case} vjp")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_grad_argnums_and_closure(fl, rng, case):
    """Gradient through a model-like composition (loss of a linear map)."""
    x, t = case.make(rng, (5,), mx.float32)
    W = to_mx(rng.normal(size=(V, V)) * 0.3)[0]

    def loss(w, a):
        return case.f(a @ w, t, "mean")

    gw, ga = mx.grad(loss, argnums=(0, 1))(W, x)
    y = x @ W
    gy = case.gref(to_np(y), to_np(t), "mean", np.array(1.0))
    np.testing.assert_allclose(to_np(gw), to_np(x).T @ gy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(ga), gy @ to_np(W).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("which", ["smooth_l1", "huber"])
def test_regression_grad_wrt_targets(fl, rng, which, dtype):
    p, t = _pair(rng, LEAD, dtype)
    if which == "smooth_l1":
        f = lambda a, b: fl.smooth_l1_loss(a, b, beta=0.5, reduction="sum")  # noqa
        gref = R.smooth_l1_grad(to_np(p), to_np(t), 0.5, "sum", wrt="targets")
    else:
        f = lambda a, b: fl.huber_loss(a, b, delta=1.5, reduction="sum")  # noqa
        gref = R.huber_grad(to_np(p), to_np(t), 1.5, "sum", wrt="targets")
    gp, gt = mx.grad(f, argnums=(0, 1))(p, t)
    assert gt.dtype == dtype
    assert_close(gt, gref, dtype, scale=MAG, what="d/dtargets")
    assert_close(gp, -gref, dtype, scale=MAG, what="d/dpred")


# --------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_compile(fl, rng, case, dtype):
    x, t = case.make(rng, LEAD, dtype)
    for r in ("none", "mean", "sum"):
        cf = mx.compile(lambda a, b: case.f(a, b, r))
        out = cf(x, t)
        _check(case, x, t, r, out, dtype, f"{case} compiled {r}")
        assert_close(out, to_np(case.f(x, t, r)), dtype, what="compiled vs eager")
        cg = mx.compile(mx.grad(lambda a, b: case.f(a, b, r).sum()))
        g = cg(x, t)
        ones = mx.ones(out.shape, dtype=dtype)
        _check_grad(case, x, t, r, ones, g, dtype, f"{case} compiled grad {r}")
        # calling again with new values of the same shape reuses the graph
        x2, t2 = case.make(rng, LEAD, dtype)
        _check(case, x2, t2, r, cf(x2, t2), dtype, f"{case} compiled 2nd {r}")
        _check_grad(case, x2, t2, r, ones, cg(x2, t2), dtype,
                    f"{case} compiled grad 2nd {r}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_compile_inside_larger_graph(fl, rng, case):
    x, t = case.make(rng, LEAD, mx.float32)

    @mx.compile
    def step(a, b):
        loss, g = mx.value_and_grad(lambda z: case.f(z * 2.0 - 1.0, b, "mean"))(a)
        return loss + 1.0, g * 3.0

    loss, g = step(x, t)
    y = x * 2.0 - 1.0
    _check(case, y, t, "mean", loss - 1.0, mx.float32, f"{case} value")
    gref = case.gref(to_np(y), to_np(t), "mean", np.array(1.0)) * 6.0
    assert_close(g, gref, mx.float32, scale=6 * MAG, what=f"{case} grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_compile_shapeless(fl, rng, case, dtype):
    for r in ("none", "mean", "sum"):
        cf = mx.compile(lambda a, b: case.f(a, b, r), shapeless=True)
        cg = mx.compile(mx.grad(lambda a, b: case.f(a, b, r).sum()),
                        shapeless=True)
        for lead in [(4,), (9,), (1,), (2, 3), (17,)]:
            if case.classes and len(lead) != 1:
                continue  # same rank, different sizes only
            x, t = case.make(rng, lead, dtype)
            out = cf(x, t)
            _check(case, x, t, r, out, dtype, f"{case} shapeless {lead} {r}")
            g = cg(x, t)
            assert g.shape == x.shape
            _check_grad(case, x, t, r, mx.ones(out.shape, dtype=dtype), g,
                        dtype, f"{case} shapeless grad {lead} {r}")


def test_compile_shapeless_changing_num_classes(fl, rng):
    cf = mx.compile(lambda a, b: fl.cross_entropy(a, b, reduction="mean",
                                                  label_smoothing=0.1),
                    shapeless=True)
    cg = mx.compile(mx.grad(lambda a, b: fl.cross_entropy(
        a, b, label_smoothing=0.1).sum()), shapeless=True)
    for n, k in [(4, 5), (4, 33), (7, 2), (3, 1000)]:
        x = to_mx(rng.normal(size=(n, k)))[0]
        t = mx.array(rng.integers(0, k, size=n).astype(np.int32))
        assert_close(cf(x, t), R.cross_entropy(to_np(x), to_np(t),
                                               label_smoothing=0.1,
                                               reduction="mean"),
                     mx.float32, scale=MAG, what=f"shapeless K={k}")
        assert_close(cg(x, t), R.cross_entropy_grad(to_np(x), to_np(t),
                                                    label_smoothing=0.1),
                     mx.float32, scale=MAG, what=f"shapeless grad K={k}")


# --------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------
def _per_batch_ref(case, X, T, r, x_axis, t_axis):
    outs = []
    for b in range(X.shape[x_axis]):
        xb = np.take(X, b, axis=x_axis)
        tb = T if t_axis is None else np.take(T, b, axis=t_axis)
        outs.append(case.ref(xb, tb, r))
    return np.stack(outs)


def _per_batch_gref(case, X, T, r, x_axis, t_axis, cots):
    outs = []
    for b in range(X.shape[x_axis]):
        xb = np.take(X, b, axis=x_axis)
        tb = T if t_axis is None else np.take(T, b, axis=t_axis)
        outs.append(case.gref(xb, tb, r, cots[b]))
    return np.stack(outs, axis=x_axis)


VMAP_AXES = [(0, 0), (1, 1), (2, 1), (-1, None), (0, None), (1, 0), (None, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("axes", VMAP_AXES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap(fl, rng, case, axes, dtype):
    """vmap over an extra batch axis of size B inserted at ``x_axis`` of the
    inputs ([N, V] per example); targets batched at ``t_axis`` (None: shared)."""
    x_axis, t_axis = axes
    B, N = 3, 4
    xs, ts = zip(*[case.make(rng, (N,), dtype) for _ in range(B)])
    ndim_x = 2
    if x_axis is None:  # shared inputs, batched targets
        xs = [xs[0]] * B
    xa = (x_axis if x_axis is not None else 0) % (ndim_x + 1)
    X = mx.stack(xs, axis=xa)
    Xin = xs[0] if x_axis is None else X
    if t_axis is None:
        T = ts[0]
    else:
        T = mx.stack(ts, axis=t_axis % (ts[0].ndim + 1))
    X64, T64 = to_np(X), to_np(T)
    for r in ("none", "mean", "sum"):
        vf = mx.vmap(lambda a, b: case.f(a, b, r), in_axes=(x_axis, t_axis))
        out = vf(Xin, T)
        ref = _per_batch_ref(case, X64, T64, r, xa,
                             None if t_axis is None else t_axis % (ts[0].ndim + 1))
        assert out.dtype == dtype
        assert_close(out, ref, dtype, scale=MAG * (N * V if r == "sum" else 1),
                     what=f"{case} vmap{axes} {r}")
        # gradient of the vmapped function
        cot = to_mx(rng.normal(size=ref.shape), dtype)[0]
        _, (g,) = mx.vjp(lambda a: vf(a, T), [Xin], [cot])
        gref = _per_batch_gref(case, X64, T64, r, xa,
                               None if t_axis is None else t_axis % (ts[0].ndim + 1),
                               to_np(cot))
        mag = None
        if x_axis is None:  # gradient w.r.t. the shared input: summed
            mag = np.abs(gref).sum(axis=0)  # B terms, each rounded to dtype
            gref = gref.sum(axis=0)
            X_shape = Xin.shape
        else:
            X_shape = X.shape
        assert g.shape == X_shape and g.dtype == dtype
        assert_close(g, gref, dtype, scale=MAG * B * np.abs(to_np(cot)).max(),
                     what=f"{case} vmap{axes} grad {r}", mag=mag)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_of_grad_and_compile(fl, rng, case):
    B, N = 3, 5
    xs, ts = zip(*[case.make(rng, (N,), mx.float32) for _ in range(B)])
    X, T = mx.stack(xs), mx.stack(ts)
    gfn = mx.grad(lambda a, b: case.f(a, b, "mean"))
    for fn in (mx.vmap(gfn), mx.compile(mx.vmap(gfn)),
               mx.vmap(mx.compile(gfn))):
        G = fn(X, T)
        for b in range(B):
            gref = case.gref(to_np(xs[b]), to_np(ts[b]), "mean", np.array(1.0))
            assert_close(G[b], gref, mx.float32, scale=MAG, what=f"{case} b={b}")


def test_nested_vmap(fl, rng):
    X = to_mx(rng.normal(size=(2, 3, 4, V)))[0]
    T = mx.array(rng.integers(0, V, size=(2, 3, 4)).astype(np.int32))
    f = mx.vmap(mx.vmap(lambda a, b: fl.cross_entropy(a, b, reduction="mean",
                                                      label_smoothing=0.1)))
    out = f(X, T)
    ref = np.array([[R.cross_entropy(to_np(X)[i, j], to_np(T)[i, j],
                                     label_smoothing=0.1, reduction="mean")
                     for j in range(3)] for i in range(2)])
    assert_close(out, ref, mx.float32, scale=MAG)


def test_vmap_per_sample_weights_and_axis(fl, rng):
    """weights batched too, and a non-default class axis inside vmap."""
    B, N = 3, 4
    X = to_mx(rng.normal(size=(B, V, N)))[0]  # class axis 0 per example
    T = mx.array(rng.integers(0, V, size=(B, N)).astype(np.int32))
    W = to_mx(rng.uniform(0, 2, size=(N, B)))[0]
    f = mx.vmap(lambda a, b, w: fl.cross_entropy(a, b, w, axis=0, reduction="sum"),
                in_axes=(0, 0, 1))
    out = f(X, T, W)
    ref = np.array([R.cross_entropy(to_np(X)[b], to_np(T)[b], to_np(W)[:, b],
                                    axis=0, reduction="sum") for b in range(B)])
    assert_close(out, ref, mx.float32, scale=MAG * N)
    g = mx.grad(lambda a: f(a, T, W).sum())(X)
    gref = np.stack([R.cross_entropy_grad(to_np(X)[b], to_np(T)[b],
                                          to_np(W)[:, b], axis=0,
                                          reduction="sum") for b in range(B)])
    assert_close(g, gref, mx.float32, scale=MAG)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_non_contiguous_cotangent(fl, rng, case):
    x, t = case.make(rng, (4, 5), mx.float32)
    shape = case.ref(to_np(x), to_np(t), "none").shape
    C = to_mx(rng.normal(size=shape[::-1]))[0]
    cot = mx.transpose(C, list(range(len(shape)))[::-1])  # transposed view
    _, (g,) = mx.vjp(lambda a: case.f(a, t, "none"), [x], [cot])
    gref = case.gref(to_np(x), to_np(t), "none", to_np(cot))
    assert_close(g, gref, mx.float32, scale=MAG * 4, what="transposed cotangent")
    cot = mx.broadcast_to(to_mx(rng.normal(size=shape[-1:]))[0], shape)
    _, (g,) = mx.vjp(lambda a: case.f(a, t, "none"), [x], [cot])
    gref = case.gref(to_np(x), to_np(t), "none", to_np(cot))
    assert_close(g, gref, mx.float32, scale=MAG * 4, what="broadcast cotangent")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_stream_argument(fl, rng, case):
    x, t = case.make(rng, (3,), mx.float32)
    name = {"ce": "cross_entropy", "smooth_l1": "smooth_l1_loss",
            "huber": "huber_loss", "sigmoid_focal": "sigmoid_focal_loss",
            "softmax_focal": "softmax_focal_loss"}[case.name.split("_index")[0]
                                                   .split("_probs")[0]]
    f = getattr(fl, name)
    a = f(x, t, stream=mx.cpu)
    b = f(x, t, stream=mx.default_stream(mx.cpu))
    c = f(x, t)
    np.testing.assert_array_equal(to_np(a), to_np(c))
    np.testing.assert_array_equal(to_np(b), to_np(c))


# --------------------------------------------------------------------------
# NaN confinement and determinism
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_nan_input_stays_in_its_row(fl, rng, case):
    """A NaN in one example makes that example's loss (and gradient) NaN and
    leaves every other example exact."""
    x, t = case.make(rng, (4,), mx.float32)
    x64 = to_np(x)
    x64[2, 3] = np.nan
    x = mx.array(x64.astype(np.float32))
    out = to_np(case.f(x, t, "none"))
    ref = case.ref(np.nan_to_num(x64), to_np(t), "none")
    bad = (np.arange(out.shape[0]) == 2) if out.ndim == 1 else \
        np.zeros(out.shape, bool)
    if out.ndim == 2:
        bad[2, 3] = True
    if case.name == "ce_index" or case.name == "ce_index_cw" or case.name == "softmax_focal":
        bad &= to_np(t) != -100  # an ignored row stays 0
    assert np.all(np.isnan(out[bad])), out
    assert_close(out[~bad], ref[~bad], mx.float32, scale=MAG, what="other rows")
    g = to_np(mx.grad(lambda a: case.f(a, t, "none").sum())(x))
    gref = case.gref(np.nan_to_num(x64), to_np(t), "none", np.ones(out.shape))
    gbad = np.broadcast_to(bad[..., None], g.shape) if out.ndim == 1 else bad
    assert_close(g[~gbad], gref[~gbad], mx.float32, scale=MAG, what="other grads")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_deterministic(fl, rng, case):
    """Repeated evaluation (multi-threaded reductions included) is bitwise
    reproducible."""
    x, t = case.make(rng, (20000,), mx.float32)
    for r in ("none", "mean", "sum"):
        f = lambda a: case.f(a, t, r)  # noqa: E731
        a = [to_np(f(x)) for _ in range(3)]
        g = [to_np(mx.grad(lambda z: f(z).sum())(x)) for _ in range(2)]
        assert all(np.array_equal(a[0], b, equal_nan=True) for b in a[1:]), r
        assert np.array_equal(g[0], g[1], equal_nan=True), r
