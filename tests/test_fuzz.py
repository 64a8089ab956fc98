"""Differential fuzz against the float64 NumPy reference (tests/reference.py).

Seeded random cases over every loss, option, dtype and reduction: awkward
shapes (empty, one class, odd sizes, class axis anywhere, broadcast targets),
every integer index dtype, ignore_index (also one the dtype cannot hold),
out-of-range indices, class weights with zeros, per-sample weights, z-loss,
label smoothing in both modes, soft targets, and values that stress the
numerics: large logit offsets (1e4, 1e5), confident sigmoid logits up to
+-100, -inf logits, NaN and +inf injected into inputs. Each case compares the
loss and the vector-Jacobian product of every differentiable input with the
reference, within conftest.TOL.

The same cases pin properties of issue 7's numerics items:
* NaN in an input is NaN in that element's (row's) loss and gradient;
* cross-entropy at offsets 1e4/1e5 is as accurate as at 0 (the float32 error
  bound uses the spread of the row, x - max, not |x|);
* BCE-with-logits and the sigmoid focal loss are accurate relative to the loss
  itself for confident logits (no error bound from |x| in float32);
* "others" smoothing with eps > (K-1)/K and a -inf logit is inf, not NaN;
* every output is bit-identical at every position and alignment, and for
  FL_NUM_THREADS 1, 2, 3 and 7 (broadcast targets included); so is every
  output and gradient of the linear cross-entropy across FL_NUM_THREADS
  (issue 18: its GEMM blocks followed the thread count), with OpenBLAS made
  multithreaded mid-run in some runs.
Run under ASan+UBSan by .ci/sanitize (a CI step).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl
import reference as R
from conftest import TOL, assert_close, to_np

SEED = 20261126
CASES = int(os.environ.get("FL_FUZZ_CASES", "3000"))
BATCH = 250
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
INDEX_DTYPES = [mx.int32, mx.int64, mx.uint8, mx.int8, mx.int16, mx.uint16, mx.uint32,
                mx.uint64]
LOSSES = ["cross_entropy", "softmax_focal_loss", "smooth_l1_loss", "huber_loss",
          "sigmoid_focal_loss"]
REDUCTIONS = ["none", "mean", "sum"]


# ---------------------------------------------------------------------------
# case generation
# ---------------------------------------------------------------------------
def _pick(rng, items, p=None):
    return items[rng.choice(len(items), p=p)]


def _rounded(values, dtype):
    """float64 values rounded to ``dtype`` (what the package will see)."""
    return to_np(mx.array(np.asarray(values, np.float32)).astype(dtype))


def _fits(dtype, values):
    info = mx.iinfo(dtype)
    return all(info.min <= int(v) <= info.max for v in np.ravel(values))


def _gen_rowwise(rng, loss):
    dtype = _pick(rng, DTYPES)
    K = int(_pick(rng, [1, 2, 3, 5, 8, 31, 32, 33, 100, 257, 1025, 4097],
                  p=[.05, .1, .1, .1, .1, .1, .1, .1, .08, .07, .07, .03]))
    batch = _pick(rng, [(), (int(rng.integers(0, 10)),), (2, int(rng.integers(1, 5)))],
                  p=[.15, .65, .2])
    if batch and batch[0] == 0 and rng.random() < 0.7:
        batch = (int(rng.integers(1, 10)),)
    regime = _pick(rng, ["normal", "offset", "neg_inf", "nan", "pos_inf"],
                   p=[.55, .15, .12, .1, .08])
    x = rng.normal(size=batch + (K,)) * _pick(rng, [1.0, 5.0, 30.0])
    if regime == "offset":
        # float16 cannot hold 1e5 (max 65504).
        x = x / 30.0 + _pick(rng, [1e4, 1e5] if dtype != mx.float16 else [1e3, 1e4])
    rows = int(np.prod(batch)) if batch else 1
    flat = x.reshape(rows, K)
    if regime in ("neg_inf", "nan", "pos_inf") and rows and K:
        special = {"neg_inf": -np.inf, "nan": np.nan, "pos_inf": np.inf}[regime]
        for r in rng.choice(rows, size=max(1, rows // 3), replace=False):
            cols = rng.choice(K, size=int(rng.integers(1, max(2, K // 4))), replace=False)
            flat[r, cols] = special
        if regime == "pos_inf" and rows and K > 1:
            flat[0, 0], flat[0, -1] = np.inf, np.nan  # +inf and NaN in one row
    x = flat.reshape(x.shape)
    case = dict(loss=loss, dtype=dtype, regime=regime, kwargs={},
                # a +inf row has no finite loss to compare: its reductions neither
                reduction="none" if regime == "pos_inf" else _pick(rng, REDUCTIONS))
    kw = case["kwargs"]
    # class axis anywhere; passed as a positive or negative axis
    ndim = x.ndim
    pos = int(rng.integers(0, ndim))
    x = np.moveaxis(x, -1, pos)
    kw["axis"] = pos if rng.random() < 0.5 else pos - ndim
    case["x"] = _rounded(x, dtype)
    soft = loss == "cross_entropy" and rng.random() < 0.3
    if soft:
        t = rng.dirichlet(np.ones(K) * _pick(rng, [0.1, 1.0]), size=batch or None)
        if rng.random() < 0.3:
            t = np.where(t < 0.05, 0.0, t)  # exact zeros, also on -inf logits
        t = np.moveaxis(np.asarray(t).reshape(batch + (K,)), -1, pos)
        case["t_dtype"] = _pick(rng, [dtype, mx.float32])
        # the op casts probabilities to the logits' dtype: the reference sees that
        case["t_raw"] = _rounded(t, case["t_dtype"])
        case["t"] = _rounded(case["t_raw"], dtype)
    else:
        t = rng.integers(0, K, size=batch)
        ignore = None
        if rng.random() < 0.4:
            ignore = int(_pick(rng, [-100, -1, 0, K - 1, 255, 300]))
            t = np.where(rng.random(size=batch) < 0.3, ignore, t)
        if rng.random() < 0.1 and np.size(t):
            bad = np.array(t).reshape(-1)
            bad[rng.integers(0, bad.size)] = _pick(rng, [K, K + 7, -3])
            t = bad.reshape(np.shape(t))
        candidates = [d for d in INDEX_DTYPES if _fits(d, t)]
        case["t_dtype"] = _pick(rng, candidates)
        case["t"] = np.asarray(t, np.int64)
        if ignore is not None:
            kw["ignore_index"] = ignore
    if loss == "cross_entropy":
        if rng.random() < 0.5:
            kw["label_smoothing"] = float(_pick(rng, [0.1, 0.5, 0.9, rng.uniform(0, 0.99)]))
            kw["label_smoothing_mode"] = _pick(rng, ["uniform", "others"])
        if rng.random() < 0.35:
            w = rng.uniform(0, 2, size=K)
            w[rng.random(size=K) < 0.2] = 0.0
            kw["class_weights"] = w.astype(np.float32)
        if rng.random() < 0.25:
            case["weights"] = rng.uniform(0, 2, size=batch).astype(np.float32)
        if rng.random() < 0.25:
            kw["z_loss"] = float(_pick(rng, [1e-4, 1e-2]))
    else:
        kw["gamma"] = float(_pick(rng, [0.0, 0.5, 1.0, 2.0, 3.5]))
        a = _pick(rng, ["none", "scalar", "0d", "class"])
        if a == "scalar":
            kw["alpha"] = float(_pick(rng, [0.0, 0.25, 1.0, 3.0]))
        elif a == "0d":
            kw["alpha"] = np.float32(rng.uniform(0, 2))
        elif a == "class":
            kw["alpha"] = rng.uniform(0, 2, size=K).astype(np.float32)
    return case


def _gen_elementwise(rng, loss):
    dtype = _pick(rng, DTYPES)
    rank = int(rng.integers(0, 4))
    dims = [0, 1, 2, 3, 5, 7, 16, 17, 33, 64, 100, 257]
    shape = tuple(int(_pick(rng, dims, p=[.03] + [.97 / 11] * 11)) for _ in range(rank))
    while np.prod(shape) > 20000:
        shape = shape[1:]
    regime = _pick(rng, ["normal", "wide", "nan"], p=[.6, .25, .15])
    if loss == "sigmoid_focal_loss":
        x = rng.uniform(-100, 100, size=shape) if regime == "wide" else \
            rng.normal(size=shape) * _pick(rng, [1.0, 4.0, 16.0])
        t = _pick(rng, ["hard", "soft", "mixed"])
        tv = (rng.random(size=shape) < 0.5).astype(float) if t == "hard" else rng.random(size=shape)
        if t == "mixed":
            tv = np.where(rng.random(size=shape) < 0.5, np.round(tv), tv)
    else:
        s = _pick(rng, [0.1, 1.0, 10.0]) * (1e3 if regime == "wide" else 1.0)
        x, tv = rng.normal(size=shape) * s, rng.normal(size=shape) * s
    # broadcast targets: drop leading axes and/or set axes to 1 (read in place)
    if rng.random() < 0.3 and shape:
        drop = int(rng.integers(0, len(shape) + 1)) if all(shape) else 0
        index = [0] * drop + [slice(0, 1) if (d > 0 and rng.random() < 0.4) else slice(None)
                              for d in shape[drop:]]
        tv = np.asarray(tv)[tuple(index)]
    if regime == "nan" and np.size(x):
        flat = np.asarray(x, float).reshape(-1)
        flat[rng.choice(flat.size, size=max(1, flat.size // 10), replace=False)] = np.nan
        x = flat.reshape(np.shape(x))
        if np.size(tv) and rng.random() < 0.5:
            tflat = np.asarray(tv, float).reshape(-1)
            tflat[rng.integers(0, tflat.size)] = np.nan
            tv = tflat.reshape(np.shape(tv))
    case = dict(loss=loss, dtype=dtype, regime=regime, reduction=_pick(rng, REDUCTIONS),
                kwargs={})
    case["x"] = _rounded(x, dtype)
    t_dtype = _pick(rng, [dtype, mx.float32])
    case["t_dtype"] = t_dtype
    # the op casts the targets to the predictions' dtype: the reference sees that
    case["t"] = _rounded(_rounded(tv, t_dtype), dtype)
    case["t_raw"] = _rounded(tv, t_dtype)
    if loss == "smooth_l1_loss":
        case["kwargs"]["beta"] = float(_pick(rng, [0.0, 0.1, 1.0, 2.5]))
    elif loss == "huber_loss":
        case["kwargs"]["delta"] = float(_pick(rng, [1e-3, 0.5, 1.0, 3.0]))  # > 0 (PyTorch)
    else:
        case["kwargs"]["alpha"] = float(_pick(rng, [-1.0, 0.0, 0.25, 0.5, 1.0]))
        case["kwargs"]["gamma"] = float(_pick(rng, [0.0, 0.5, 1.0, 2.0, 3.5]))
    return case


def make_case(i):
    rng = np.random.default_rng([SEED, i])
    loss = LOSSES[i % len(LOSSES)]
    if loss in ("cross_entropy", "softmax_focal_loss"):
        return _gen_rowwise(rng, loss)
    return _gen_elementwise(rng, loss)


# ---------------------------------------------------------------------------
# running a case: the package and the reference
# ---------------------------------------------------------------------------
def _mx_inputs(case):
    x = mx.array(case["x"].astype(np.float32)).astype(case["dtype"])
    if "t_raw" in case:
        t = mx.array(case["t_raw"].astype(np.float32)).astype(case["t_dtype"])
    elif mx.issubdtype(case["t_dtype"], mx.floating):
        t = mx.array(case["t"].astype(np.float32)).astype(case["t_dtype"])
    else:
        t = mx.array(case["t"]).astype(case["t_dtype"])
    kw = {k: (mx.array(v) if isinstance(v, np.ndarray) else v)
          for k, v in case["kwargs"].items()}
    if isinstance(kw.get("alpha"), np.floating):
        kw["alpha"] = mx.array(kw["alpha"])
    return x, t, kw


def _call(case, x, t, kw, weights=None):
    fn = getattr(fl, case["loss"])
    if case["loss"] == "cross_entropy":
        return fn(x, t, weights, reduction=case["reduction"], **kw)
    return fn(x, t, reduction=case["reduction"], **kw)


def _differentiable_targets(case):
    if case["loss"] == "cross_entropy":
        return mx.issubdtype(case["t_dtype"], mx.floating)
    return case["loss"] in ("smooth_l1_loss", "huber_loss")


def run_package(case, cot_seed=0):
    """Loss and vjps (w.r.t. the first input and, where defined, the targets)."""
    x, t, kw = _mx_inputs(case)
    w = mx.array(case["weights"]) if "weights" in case else None
    loss = _call(case, x, t, kw, w)
    rng = np.random.default_rng(cot_seed)
    cot = mx.array(rng.normal(size=loss.shape).astype(np.float32)).astype(loss.dtype)
    argnums = [0, 1] if _differentiable_targets(case) else [0]
    if len(argnums) == 2:
        _, grads = mx.vjp(lambda a, b: _call(case, a, b, kw, w), [x, t], [cot])
    else:
        _, grads = mx.vjp(lambda a: _call(case, a, t, kw, w), [x], [cot])
    return loss, cot, grads


def _ref_ignore(case):
    ign = case["kwargs"].get("ignore_index")
    if ign is None or mx.issubdtype(case["t_dtype"], mx.floating):
        return ign
    info = mx.iinfo(case["t_dtype"])
    return ign if info.min <= ign <= info.max else None


def _spread_scale(x64, axis):
    """max(1, max |x - rowmax|) per row: the float32 error of a log-sum-exp
    kept relative to the running max does not grow with a common offset."""
    finite = np.where(np.isfinite(x64), x64, -np.inf)
    m = finite.max(axis=axis, keepdims=True, initial=-np.inf)
    gap = np.where(np.isfinite(x64) & np.isfinite(m), np.abs(x64 - m), 0.0)
    return np.maximum(1.0, gap.max(axis=axis, initial=0.0))


def check_rowwise(case, loss, cot, grads):
    x64, t = case["x"], case["t"]
    kw = dict(case["kwargs"])
    red = case["reduction"]
    axis = kw.pop("axis")
    dtype = case["dtype"]
    kw["ignore_index"] = _ref_ignore(case)
    c64 = to_np(cot)
    if case["loss"] == "cross_entropy":
        w = case.get("weights")
        ref = R.cross_entropy(x64, t, w, axis=axis, reduction=red, **kw)
        lscale, gscale = R.cross_entropy_error_scales(x64, t, w, axis=axis, reduction=red,
                                                      cotangent=c64, **kw)
        # Scales from the spread of each row instead of max|x| (see the
        # module docstring): an offset of 1e5 must not widen the bound.
        mag = np.maximum(1.0, np.where(np.isfinite(x64), np.abs(x64), 0).max(axis=axis))
        ratio = _spread_scale(x64, axis) / mag
        lscale = lscale * (ratio if red == "none" else ratio.max(initial=1.0))
        gscale = gscale * np.expand_dims(ratio, axis)
        gref = R.cross_entropy_grad(x64, t, w, axis=axis, reduction=red, cotangent=c64, **kw)
        if len(grads) == 2:
            kw_t = {k: v for k, v in kw.items() if k != "ignore_index"}
            tref = R.cross_entropy_grad_targets(x64, t, w, axis=axis, reduction=red,
                                                cotangent=c64, **kw_t)
    else:
        alpha = kw.pop("alpha", None)
        alpha64 = None if alpha is None else np.asarray(alpha, np.float64)
        K = x64.shape[axis]
        ign = kw["ignore_index"]
        tt = np.asarray(t)
        oob = ((tt < 0) | (tt >= K)) & (tt != (ign if ign is not None else -(2 ** 70)))
        safe_t = np.where(oob, 0, tt)
        ref = R.softmax_focal(x64, safe_t, alpha=alpha64, axis=axis, reduction="none", **kw)
        ref = np.where(oob, np.nan, ref)
        ignored = (tt == ign) if ign is not None else np.zeros(tt.shape, bool)
        den = int((~ignored).sum())
        ref = R.reduce(ref, red, den if red == "mean" else None)
        # per-row cotangent with the kept-row count (an out-of-range row is
        # kept), so that the stand-in class of such a row cannot be ignored
        c_row = R.reduce_cotangent(tt.shape, red, c64, den if red == "mean" else None)
        gref = R.softmax_focal_grad(x64, safe_t, alpha=alpha64, axis=axis, reduction="none",
                                    cotangent=np.where(ignored, 0.0, c_row), **kw)
        # an out-of-range row's gradient is NaN; the other rows' are not
        gref = np.where(np.expand_dims(oob, axis), np.nan, gref)
        sc = _spread_scale(x64, axis)
        amax = 1.0 if alpha is None else float(np.max(np.abs(alpha), initial=0.0))
        g = kw["gamma"]
        lscale = R.reduce(sc * amax * (1 + g), red, den if red == "mean" else None)
        crow = np.abs(R.reduce_cotangent(tt.shape, red, c64, den if red == "mean" else None))
        gscale = np.expand_dims(sc * crow * amax * (1 + g) ** 2, axis) * np.ones_like(x64)
    if case["regime"] == "pos_inf":
        _check_pos_inf(case, loss, ref, grads[0], gref, axis)
        return
    assert_close(loss, ref, dtype, scale=np.nan_to_num(lscale), what="loss")
    assert_close(grads[0], gref, dtype, scale=np.nan_to_num(gscale), what="d/dlogits")
    if len(grads) == 2:
        tscale = np.nan_to_num(gscale) * _spread_scale(x64, axis).max(initial=1.0)
        assert_close(grads[1], tref, _looser(dtype, case["t_dtype"]), scale=tscale,
                     what="d/dtargets")


def _check_pos_inf(case, loss, ref, g, gref, axis):
    """A row holding +inf has no finite loss; every other row must match."""
    x64 = case["x"]
    ign = _ref_ignore(case)
    inf_row = np.isposinf(x64).any(axis=axis)
    if ign is not None:
        inf_row &= case["t"] != ign
    got = to_np(loss)
    assert not np.isfinite(got[inf_row]).any(), "a +inf row gave a finite loss"
    scale = 4 * _spread_scale(x64, axis)
    assert_close(got[~inf_row], ref[~inf_row], case["dtype"], scale=scale[~inf_row],
                 what="finite rows")
    keep = np.expand_dims(~inf_row, axis)
    gmax = np.nan_to_num(np.abs(np.where(keep, gref, 0.0)), posinf=0.0).max(initial=1.0)
    gscale = np.expand_dims(scale, axis) * gmax
    assert_close(np.where(keep, to_np(g), 0.0), np.where(keep, gref, 0.0), case["dtype"],
                 scale=gscale, what="finite rows' gradient")


def _looser(a, b):
    return a if TOL[a] >= TOL[b] else b


def check_elementwise(case, loss, cot, grads):
    x64, t64 = case["x"], case["t"]
    kw, red, dtype = case["kwargs"], case["reduction"], case["dtype"]
    c64 = to_np(cot)
    b = np.broadcast_to(t64, x64.shape)
    fin = lambda a: np.where(np.isfinite(a), np.abs(a), 0.0)  # noqa: E731
    sc = np.maximum(1.0, np.maximum(fin(x64), fin(b)))
    gcot = np.abs(R.reduce_cotangent(x64.shape, red, c64))
    if case["loss"] == "sigmoid_focal_loss":
        ref = R.sigmoid_focal(x64, b, reduction=red, **kw)
        gref = R.sigmoid_focal_grad(x64, b, reduction=red, cotangent=c64, **kw)
        # Relative to the loss itself, not to |x|: BCE of a confident logit
        # (x = 16, t = 1: 1.1e-7) must not drown in an error of eps * 16.
        lscale = 0.0
        gscale = gcot * max(1.0, kw["gamma"])
        tref = None
    elif case["loss"] == "smooth_l1_loss":
        beta = kw["beta"]
        ref = R.smooth_l1(x64, b, beta, red)
        gref = R.smooth_l1_grad(x64, b, beta, red, c64)
        lscale = R.reduce(sc * max(1.0, 1.0 / beta if beta else 1.0), red)
        gscale = gcot * sc * (1.0 / beta if beta > 0 else 1.0)
        tref = R.smooth_l1_grad(x64, b, beta, red, c64, "targets")
    else:
        delta = kw["delta"]
        ref = R.huber(x64, b, delta, red)
        gref = R.huber_grad(x64, b, delta, red, c64)
        lscale = R.reduce(sc * sc, red)
        gscale = gcot * sc
        tref = R.huber_grad(x64, b, delta, red, c64, "targets")
    assert_close(loss, ref, dtype, scale=lscale, what="loss")
    if case["loss"] == "sigmoid_focal_loss" and dtype == mx.float32 and red == "none":
        # Confident logits: BCE of x = 16, t = 1 is 1.1e-7, far below the
        # float32 atol; the loss must still be right relative to itself.
        got = to_np(loss)
        tiny = np.isfinite(ref) & (np.abs(ref) > 1e-36) & (np.abs(ref) < 1e-3)
        rel = np.abs(got[tiny] - ref[tiny]) / np.abs(ref[tiny])
        assert rel.max(initial=0.0) <= TOL[mx.float32][0], (
            f"small losses: max relative error {rel.max():.3g}")
    assert_close(grads[0], gref, dtype, scale=gscale, what="d/dpred")
    if len(grads) == 2:
        # the targets' gradient is summed over the axes they were broadcast along
        extra = x64.ndim - t64.ndim
        summed = tref.sum(axis=tuple(range(extra))) if extra else tref
        bcast = tuple(i for i, d in enumerate(t64.shape) if d == 1 and x64.shape[i + extra] != 1)
        if bcast:
            summed = summed.sum(axis=bcast, keepdims=True)
        count = max(1, tref.size // max(1, t64.size))
        tscale = np.nan_to_num(np.broadcast_to(gscale, x64.shape)).max(initial=0.0) * count
        # each summed term is rounded to the dtype: the bound scales with
        # their magnitudes (NaN terms make NaN sums, matched separately)
        mag = None
        if count > 1:
            mag = np.nan_to_num(np.abs(tref), posinf=0.0).sum(axis=tuple(range(extra)))
            mag = (mag.sum(axis=bcast, keepdims=True) if bcast else mag).reshape(t64.shape)
        assert_close(grads[1], summed.reshape(t64.shape), _looser(dtype, case["t_dtype"]),
                     scale=tscale, mag=mag, what="d/dtargets")


def check_case(i):
    case = make_case(i)
    loss, cot, grads = run_package(case)
    if case["loss"] in ("cross_entropy", "softmax_focal_loss"):
        check_rowwise(case, loss, cot, grads)
    else:
        check_elementwise(case, loss, cot, grads)


def describe(i):
    case = make_case(i)
    return (f"case {i}: {case['loss']} {case['dtype']} {case['reduction']} "
            f"regime={case['regime']} x{case['x'].shape} t{np.shape(case['t'])}:"
            f"{case['t_dtype']} {sorted(case['kwargs'])}")


@pytest.mark.parametrize("batch", range((CASES + BATCH - 1) // BATCH))
def test_differential_fuzz(batch):
    failures = []
    for i in range(batch * BATCH, min(CASES, (batch + 1) * BATCH)):
        try:
            with np.errstate(all="ignore"):
                check_case(i)
        except AssertionError as err:
            failures.append(f"{describe(i)}\n    {str(err).splitlines()[0][:400]}")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:8])


def test_fuzz_covers_every_loss_option_dtype_and_reduction():
    seen = set()
    for i in range(CASES):
        c = make_case(i)
        seen |= {("loss", c["loss"]), ("dtype", str(c["dtype"])), ("red", c["reduction"]),
                 ("regime", c["regime"]), ("tdtype", str(c["t_dtype"]))}
        seen |= {("opt", c["loss"], k) for k in c["kwargs"]}
        if "weights" in c:
            seen.add(("opt", c["loss"], "weights"))
    for loss in LOSSES:
        assert ("loss", loss) in seen
    for dt in DTYPES + INDEX_DTYPES:
        assert ("dtype", str(dt)) in seen or ("tdtype", str(dt)) in seen
    for red in REDUCTIONS:
        assert ("red", red) in seen
    for opt in ["label_smoothing", "label_smoothing_mode", "class_weights", "z_loss",
                "ignore_index", "weights", "axis"]:
        assert ("opt", "cross_entropy", opt) in seen, opt
    for opt in ["alpha", "gamma", "ignore_index", "axis"]:
        assert ("opt", "softmax_focal_loss", opt) in seen, opt
    for loss, opt in [("smooth_l1_loss", "beta"), ("huber_loss", "delta"),
                      ("sigmoid_focal_loss", "alpha"), ("sigmoid_focal_loss", "gamma")]:
        assert ("opt", loss, opt) in seen
    for regime in ["offset", "neg_inf", "nan", "pos_inf", "wide"]:
        assert ("regime", regime) in seen


# ---------------------------------------------------------------------------
# position, alignment and thread count
# ---------------------------------------------------------------------------
def test_same_element_same_result_at_every_position():
    # 47 copies of the same (x, t) pairs at every offset modulo the vector width.
    rng = np.random.default_rng(SEED)
    base_x = np.concatenate([rng.normal(size=29) * 4, [10.0, 16.0, -16.0, 0.0, 100.0, -100.0]])
    base_t = np.concatenate([rng.random(29), [1.0, 1.0, 0.0, 0.5, 0.0, 1.0]])
    for dtype in DTYPES:
        for name, kw in [("sigmoid_focal_loss", dict(alpha=0.25, gamma=2.0)),
                         ("sigmoid_focal_loss", dict(alpha=-1.0, gamma=0.5)),
                         ("smooth_l1_loss", dict(beta=0.5)), ("huber_loss", dict(delta=1.5))]:
            fn = getattr(fl, name)
            for lead in range(0, 9):
                x = np.concatenate([np.zeros(lead), np.tile(base_x, 47)])
                t = np.concatenate([np.zeros(lead), np.tile(base_t, 47)])
                xm, tm = mx.array(x.astype(np.float32)).astype(dtype), \
                    mx.array(t.astype(np.float32)).astype(dtype)
                out = to_np(fn(xm, tm, reduction="none", **kw))[lead:].reshape(47, -1)
                g = mx.grad(lambda a: fn(a, tm, reduction="sum", **kw))(xm)
                g = to_np(g)[lead:].reshape(47, -1)
                for a in (out, g):
                    same = (a == a[0]) | (np.isnan(a) & np.isnan(a[0]))
                    assert same.all(), f"{name} {kw} {dtype} lead={lead}: differs by position"


def test_same_row_same_result_at_every_position():
    rng = np.random.default_rng(SEED + 1)
    for K in [7, 33, 1025]:
        row = rng.normal(size=K) * 3
        x = np.tile(row, (13, 1))
        t = np.full(13, K // 2)
        for name, kw in [("cross_entropy", dict(label_smoothing=0.1)),
                         ("softmax_focal_loss", dict(gamma=2.0))]:
            fn = getattr(fl, name)
            xm = mx.array(x.astype(np.float32))
            out = to_np(fn(xm, mx.array(t), **kw))
            g = to_np(mx.grad(lambda a: fn(a, mx.array(t), reduction="sum", **kw))(xm))
            assert (out == out[0]).all() and (g == g[0]).all(), f"{name} K={K}"


# Large enough that every kernel splits its work across threads.
_THREADS_SCRIPT = r"""
import hashlib, json, os, sys
import numpy as np
import mlx.core as mx
sys.path.insert(0, sys.argv[1])
import test_fuzz as F
digest = {}
for i in range(int(sys.argv[2])):
    case = F.make_case(i)
    loss, cot, grads = F.run_package(case)
    h = hashlib.sha256()
    for a in [loss, *grads]:
        h.update(np.array(a.astype(mx.float32)).tobytes())
    digest[i] = h.hexdigest()
rng = np.random.default_rng(0)
import mlx_fused_losses as fl
big = {}
x = mx.array(rng.normal(size=(300_001,)).astype(np.float32) * 4)
t = mx.array(rng.random(300_001).astype(np.float32))
for name, kw in [("sigmoid_focal_loss", {}), ("smooth_l1_loss", {}), ("huber_loss", {})]:
    for red in ("none", "mean", "sum"):
        f = getattr(fl, name)
        out = f(x, t, reduction=red, **kw)
        g = mx.grad(lambda a: f(a, t, reduction="sum", **kw))(x)
        big[f"{name}-{red}"] = hashlib.sha256(np.array(out).tobytes() + np.array(g).tobytes()).hexdigest()
xb = mx.array(rng.normal(size=(601, 500)).astype(np.float32) * 4)
for tshape in [(500,), (601, 1), ()]:
    tb = mx.array(rng.random(tshape).astype(np.float32))
    for name in ("sigmoid_focal_loss", "smooth_l1_loss", "huber_loss"):
        f = getattr(fl, name)
        for red in ("none", "mean"):
            out = f(xb, tb, reduction=red)
            g = mx.grad(lambda a: f(a, tb, reduction="sum" if red == "none" else red))(xb)
            big[f"{name}-{red}-{tshape}"] = hashlib.sha256(
                np.array(out).tobytes() + np.array(g).tobytes()).hexdigest()
logits = mx.array(rng.normal(size=(67, 3001)).astype(np.float32) * 5)
labels = mx.array(rng.integers(0, 3001, 67))
for name in ("cross_entropy", "softmax_focal_loss"):
    f = getattr(fl, name)
    out = f(logits, labels, reduction="none")
    g = mx.grad(lambda a: f(a, labels, reduction="mean"))(logits)
    big[name] = hashlib.sha256(np.array(out).tobytes() + np.array(g).tobytes()).hexdigest()

# The linear cross-entropy: every output and gradient, dense and quantized
# heads, at shapes with several row chunks and ragged vocabulary and hidden
# tiles (the first is issue 18's: 44 of 257 row losses moved with the thread
# count). sys.argv[3] = "poke" sets our OpenBLAS copy multithreaded after the
# first call (as another user of that library could): its threading must not
# change a bit either.
def lce_digest(hidden, weight, targets, bias=None, **kw):
    def loss(h, w, b, red, **more):
        return fl.linear_cross_entropy(h, w, targets, b, reduction=red, **kw, **more)
    dense = "scales" not in kw
    args = [hidden] + ([weight] if dense else []) + ([bias] if bias is not None else [])
    def call(red, *a):
        a = list(a)
        h = a.pop(0)
        w = a.pop(0) if dense else weight
        b = a.pop(0) if bias is not None else None
        return loss(h, w, b, red)
    per_row, stats = loss(hidden, weight, bias, "none", return_stats=True)
    argnums = tuple(range(len(args)))
    cot = mx.array(np.linspace(-1.0, 2.0, per_row.size, dtype=np.float32).reshape(per_row.shape))
    total, g_sum = mx.value_and_grad(lambda *a: call("sum", *a), argnums=argnums)(*args)
    mean, g_mean = mx.value_and_grad(lambda *a: call("mean", *a), argnums=argnums)(*args)
    g_rows = mx.grad(lambda *a: (call("none", *a) * cot).sum(), argnums=argnums)(*args)
    outs = [per_row, stats["lse"], stats["correct"], stats["entropy"], total, *g_sum, mean, *g_mean,
            *g_rows]
    mx.eval(outs)
    return hashlib.sha256(b"".join(np.array(o.view(mx.uint16) if o.dtype == mx.bfloat16 else o).tobytes()
                                  for o in outs)).hexdigest()

def lce_inputs(n, h, v, dtype=mx.float32, bias=False, seed=0):
    r = np.random.default_rng(seed)
    x = mx.array((r.normal(size=(n, h)) * 2).astype(np.float32)).astype(dtype)
    w = mx.array((r.normal(size=(v, h)) / np.sqrt(h)).astype(np.float32)).astype(dtype)
    t = mx.array(r.integers(0, v, n))
    b = mx.array(r.normal(size=(v,)).astype(np.float32)) if bias else None
    return x, w, t, b

lce = {}
x, w, t, b = lce_inputs(257, 64, 31)
lce["issue-18"] = lce_digest(x, w, t, chunk_bytes=199 * 31 * 4)
if sys.argv[3] == "poke":
    import scipy_openblas32
    scipy_openblas32.dll.scipy_openblas_set_num_threads(int(os.environ["FL_NUM_THREADS"]))
x, w, t, b = lce_inputs(257, 64, 31, bias=True)
lce["issue-18-bias-options"] = lce_digest(x, w, t, b, chunk_bytes=199 * 31 * 4, label_smoothing=0.1,
                                          z_loss=1e-3, logit_softcap=5.0)
# OpenBLAS run threaded splits this GEMM differently (different bits).
x, w, t, b = lce_inputs(300, 700, 1000)
lce["f32-300x700x1000"] = lce_digest(x, w, t)
# f32: several vocab tiles (ragged last) and hidden tiles (ragged last), 3 chunks.
x, w, t, b = lce_inputs(70, 600, 4500, bias=True)
lce["f32-70x600x4500"] = lce_digest(x, w, t, b, chunk_bytes=25 * 4500 * 4)
for dt in (mx.bfloat16, mx.float16):
    x, w, t, b = lce_inputs(45, 600, 2000, dtype=dt, bias=True)
    lce[f"{str(dt).split('.')[-1]}-45x600x2000"] = lce_digest(x, w, t, b, chunk_bytes=20 * (2000 + 600) * 4)
x, w, t, b = lce_inputs(40, 640, 2100, bias=True)
wq, sc, qb = mx.quantize(w, group_size=64, bits=4)
lce["q4-40x640x2100"] = lce_digest(x, wq, t, b, scales=sc, biases=qb, group_size=64, bits=4,
                                   chunk_bytes=15 * 2100 * 4)
x, w, t, b = lce_inputs(33, 256, 9000, dtype=mx.bfloat16)
wq, sc, qb = mx.quantize(w, group_size=32, bits=8)
lce["q8-33x256x9000"] = lce_digest(x, wq, t, scales=sc, biases=qb, group_size=32, bits=8,
                                   chunk_bytes=10 * (9000 + 256) * 4)
# Words that straddle (3 bits) and a floating-point mode: other dequantisers.
x, w, t, b = lce_inputs(21, 576, 1500, seed=1)
wq, sc, qb = mx.quantize(w, group_size=32, bits=3)
lce["q3-21x576x1500"] = lce_digest(x, wq, t, scales=sc, biases=qb, group_size=32, bits=3,
                                   chunk_bytes=8 * 1500 * 4)
wq, sc = mx.quantize(w, mode="mxfp4")[:2]
lce["mxfp4-21x576x1500"] = lce_digest(x, wq, t, scales=sc, biases=None, mode="mxfp4",
                                      chunk_bytes=8 * 1500 * 4)
print(json.dumps({"threads": __import__("mlx_fused_losses._ext", fromlist=["x"]).num_threads(),
                  "cases": digest, "big": big, "lce": lce}))
"""


def test_bit_identical_across_thread_counts():
    results = {}
    here = str(Path(__file__).resolve().parent)
    # Our OpenBLAS copy made multithreaded mid-run at 2 and 7 threads (Linux).
    poke = {n: "poke" if n in (2, 7) and sys.platform == "linux" else "-" for n in (1, 2, 3, 7)}
    for n in (1, 2, 3, 7):
        env = {**os.environ, "FL_NUM_THREADS": str(n)}
        done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, here, "300", poke[n]], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[n] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[n]["threads"] == n
    for n in (2, 3, 7):
        for key in ("cases", "big", "lce"):
            diff = [k for k in results[1][key] if results[1][key][k] != results[n][key][k]]
            assert not diff, f"FL_NUM_THREADS={n} differs from 1 in {key}: {diff[:10]}"


def test_running_on_the_sanitized_build_when_asked():
    """.ci/sanitize sets FL_EXPECT_SANITIZED: then this process must really
    run the ASan-instrumented extension, not an installed one."""
    if not os.environ.get("FL_EXPECT_SANITIZED"):
        pytest.skip("not a sanitizer run (.ci/sanitize sets FL_EXPECT_SANITIZED)")
    maps = Path("/proc/self/maps").read_text()
    assert "asan" in maps, "the ASan runtime is not loaded"
    import mlx_fused_losses._ext as ext

    assert "/build/" not in ext.__file__ and "site-packages" not in ext.__file__, ext.__file__
