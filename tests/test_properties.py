"""Hypothesis property tests over shapes, layouts, dtypes and options.

The settings profile ("fast", registered in conftest.py) bounds the number of
examples and disables the deadline; set FL_HYPOTHESIS_EXAMPLES to explore
more."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, strategies as st

import reference as R
from conftest import DTYPES, assert_close, to_mx, to_np
from test_cross_entropy import check_ce
from test_focal import check_sigmoid, check_softmax
from test_regression_losses import check_reg

dtypes = st.sampled_from(DTYPES)
reductions = st.sampled_from(["none", "mean", "sum"])
batch_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


def _layout(x, kind):
    """Present the same values with a different memory layout."""
    if kind == "contiguous" or x.ndim == 0:
        return x
    if kind == "transposed":
        perm = list(range(x.ndim))[::-1]
        inv = list(np.argsort(perm))
        return mx.transpose(mx.array(np.ascontiguousarray(
            np.transpose(np.array(x.astype(mx.float32)), perm))).astype(x.dtype), inv)
    # strided: embed in a twice-as-large array and slice every other element
    big = mx.repeat(x, 2, axis=-1)
    return big[..., ::2]


layouts = st.sampled_from(["contiguous", "transposed", "strided"])


@st.composite
def ce_problems(draw):
    bshape = draw(batch_shapes)
    K = draw(st.sampled_from([1, 2, 3, 7, 31, 32, 33, 100]))
    pos = draw(st.integers(0, len(bshape)))
    neg = draw(st.booleans())
    ndim = len(bshape) + 1
    axis = pos - ndim if neg else pos
    shape = bshape[:pos] + (K,) + bshape[pos:]
    probs = draw(st.booleans())
    opts = dict(
        reduction=draw(reductions),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 0.99])),
        label_smoothing_mode=draw(st.sampled_from(["uniform", "others"])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1])),
    )
    if draw(st.booleans()):
        opts["class_weights"] = "rand"
    if not probs:
        ii = draw(st.sampled_from([None, None, -100, 0]))
        if ii is not None:
            opts["ignore_index"] = ii
    return dict(shape=shape, axis=axis, K=K, bshape=bshape, probs=probs,
                opts=opts, weights=draw(st.booleans()), dtype=draw(dtypes),
                scale=draw(st.sampled_from([0.1, 3.0, 30.0])),
                layout=draw(layouts), seed=draw(seeds))


@given(ce_problems())
def test_cross_entropy_matches_reference(fl, pb):
    rng = np.random.default_rng(pb["seed"])
    dtype, K, ax = pb["dtype"], pb["K"], pb["axis"] % len(pb["shape"])
    x = to_mx(rng.normal(size=pb["shape"]) * pb["scale"], dtype)[0]
    x = _layout(x, pb["layout"])
    lshape = pb["bshape"]
    if pb["probs"]:
        p = rng.uniform(size=pb["shape"])
        t = to_mx(p / p.sum(axis=ax, keepdims=True), dtype)[0]
    else:
        t64 = rng.integers(0, K, size=lshape)
        ii = pb["opts"].get("ignore_index")
        if ii is not None and t64.size:
            t64.flat[rng.integers(0, t64.size)] = ii
        t = mx.array(np.asarray(t64, np.int32))
    opts = dict(pb["opts"])
    if opts.get("class_weights") == "rand":
        opts["class_weights"] = rng.uniform(0.1, 3.0, size=K)
    w = None
    if pb["weights"]:
        w = to_mx(rng.uniform(0.0, 2.0, size=lshape), dtype)[0]
    check_ce(fl, x, t, w, axis=pb["axis"], rng=rng, what=str(pb), **opts)


@given(st.integers(1, 40), batch_shapes, st.floats(-50, 50), seeds)
def test_cross_entropy_shift_invariance(fl, K, bshape, c, seed):
    """Adding a constant to every logit of a row leaves the loss (z_loss=0)
    unchanged and the gradient too."""
    rng = np.random.default_rng(seed)
    x = to_mx(rng.normal(size=bshape + (K,)) * 2)[0]
    t = mx.array(rng.integers(0, K, size=bshape).astype(np.int32))
    kw = dict(label_smoothing=0.1, class_weights=mx.array(
        rng.uniform(0.5, 2, K).astype(np.float32)))
    a = fl.cross_entropy(x, t, **kw)
    xs = x + np.float32(c)
    b = fl.cross_entropy(xs, t, **kw)
    mag = np.maximum(1.0, np.abs(to_np(xs)).max(axis=-1)) * 4  # |sum_j w_j q_j| <= 3 + 1
    assert_close(b, to_np(a), mx.float32, scale=2 * mag)
    ga = mx.grad(lambda z: fl.cross_entropy(z, t, **kw).sum())(x)
    gb = mx.grad(lambda z: fl.cross_entropy(z, t, **kw).sum())(xs)
    assert_close(gb, to_np(ga), mx.float32, scale=2 * mag[..., None])


@given(batch_shapes, st.sampled_from([1, 2, 5, 33]), dtypes, reductions,
       st.sampled_from([None, 0.25, "array"]), st.sampled_from([0.0, 0.5, 2.0]),
       st.sampled_from([None, -100]), layouts, seeds)
def test_softmax_focal_matches_reference(fl, bshape, K, dtype, reduction, alpha,
                                         gamma, ignore_index, layout, seed):
    rng = np.random.default_rng(seed)
    x = _layout(to_mx(rng.normal(size=bshape + (K,)) * 3, dtype)[0], layout)
    t64 = rng.integers(0, K, size=bshape)
    if ignore_index is not None and t64.size > 1:
        t64.flat[0] = ignore_index
    a = rng.uniform(0.1, 1, K) if alpha == "array" else alpha
    check_softmax(fl, x, mx.array(np.asarray(t64, np.int32)), rng, alpha=a,
                  gamma=gamma, reduction=reduction, ignore_index=ignore_index)


@given(batch_shapes, dtypes, reductions,
       st.sampled_from([-1.0, 0.0, 0.25, 1.0]), st.sampled_from([0.0, 0.5, 2.0, 3.0]),
       st.booleans(), st.sampled_from([1.0, 10.0, 60.0]), layouts, seeds)
def test_sigmoid_focal_matches_reference(fl, shape, dtype, reduction, alpha,
                                         gamma, soft, scale, layout, seed):
    rng = np.random.default_rng(seed)
    shape = shape + (3,)
    x = _layout(to_mx(rng.normal(size=shape) * scale, dtype)[0], layout)
    tv = rng.uniform(size=shape) if soft else (rng.uniform(size=shape) < 0.5)
    t = to_mx(tv, dtype)[0]
    out, g = check_sigmoid(fl, x, t, alpha, gamma, reduction, rng)
    assert np.all(np.isfinite(to_np(g)))


@given(batch_shapes, dtypes, reductions, st.sampled_from([0.0, 0.1, 1.0, 4.0]),
       layouts, seeds)
def test_regression_matches_reference(fl, shape, dtype, reduction, param,
                                      layout, seed):
    rng = np.random.default_rng(seed)
    shape = shape + (2,)
    p = _layout(to_mx(rng.normal(size=shape) * 3, dtype)[0], layout)
    t = to_mx(rng.normal(size=shape) * 3, dtype)[0]
    check_reg(fl, "smooth_l1", p, t, param, reduction, rng)
    if param > 0:  # huber's delta must be > 0 (tests/test_bad_input.py)
        check_reg(fl, "huber", p, t, param, reduction, rng)


@given(batch_shapes, st.floats(0.05, 5.0), seeds)
def test_smooth_l1_huber_relation(fl, shape, beta, seed):
    """beta * smooth_l1(beta) == huber(delta=beta); both symmetric."""
    rng = np.random.default_rng(seed)
    p = to_mx(rng.normal(size=shape) * 3)[0]
    t = to_mx(rng.normal(size=shape) * 3)[0]
    s = fl.smooth_l1_loss(p, t, beta=beta, reduction="none")
    h = fl.huber_loss(p, t, delta=beta, reduction="none")
    np.testing.assert_allclose(to_np(s) * np.float32(beta), to_np(h),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(fl.smooth_l1_loss(t, p, beta=beta, reduction="none")),
                               to_np(s), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(fl.huber_loss(t, p, delta=beta)), to_np(h),
                               rtol=1e-6, atol=1e-7)


@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([1, 2, 13]),
       st.integers(0, 2), reductions, seeds)
def test_vmap_matches_loop(fl, B, N, K, in_axis, reduction, seed):
    rng = np.random.default_rng(seed)
    x = to_mx(rng.normal(size=(B, N, K)))[0]
    t = mx.array(rng.integers(0, K, size=(B, N)).astype(np.int32))
    xm = mx.moveaxis(x, 0, in_axis)
    f = lambda a, b: fl.cross_entropy(a, b, reduction=reduction, z_loss=1e-2,  # noqa
                                      label_smoothing=0.1)
    out = mx.vmap(f, in_axes=(in_axis, 0))(xm, t)
    ref = np.stack([R.cross_entropy(to_np(x)[b], to_np(t)[b], reduction=reduction,
                                    z_loss=1e-2, label_smoothing=0.1)
                    for b in range(B)])
    assert_close(out, ref, mx.float32, scale=20.0 * N)
