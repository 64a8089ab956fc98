"""PyTorch's own test cases of its losses, ported as our tests.

The cases are data: tests/peer_cases/torch_loss_cases.json, written by
tools/torch_loss_cases.py from PyTorch's module inputs (common_modules.py),
OpInfo samples (common_methods_invocations.py) and criterion tests
(common_nn.py); its header names the PyTorch release. Each case's shapes,
options and integer targets are PyTorch's; the float values are drawn here
from the recorded kind and range (our seeds). Every case runs in float32, at
the tolerance PyTorch's tests apply to float32 results (assertEqual's default:
rtol 1.3e-6, atol 1e-5); a module case also runs in the 16-bit dtypes its
ModuleInfo tests, at that module's test_forward tolerance there (from the
table's header). The expected values are float64 NumPy of PyTorch's
definition of the loss (tests/reference.py, and the KL divergence written out
below) on the inputs rounded to the dtype. Gradients (which PyTorch checks
with gradcheck in float64) are compared with the float64 derivative at the
same tolerance. PyTorch's LinearCrossEntropyOptions (chunk sizes, chunking
method, accumulation dtype) steer its memory and speed, not the value: the
cases that set them run here like the others.

PyTorch's bad-input cases of these losses (its module_error_inputs and
OpInfo error_inputs) must raise TypeError or ValueError here too
(test_bad_input_case).

A case runs when we have the loss and every option it uses with PyTorch's
meaning; otherwise it is counted, with the reason, in
test_cases_that_cannot_run (the counts are asserted: a new PyTorch release or
a new option here changes them visibly).
"""

from __future__ import annotations

import collections
import json
import os
import re
import zlib

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl
import reference as R

TABLE_PATH = os.path.join(os.path.dirname(__file__), "peer_cases", "torch_loss_cases.json")
with open(TABLE_PATH) as _f:
    TABLE = json.load(_f)
CASES = TABLE["cases"]
RTOL, ATOL = 1.3e-6, 1e-5  # PyTorch's assertEqual default for float32
# make_tensor's default range, for the logits a softmax/log-softmax case was
# drawn from (the table keeps the normalisation, not the logits)
LOGIT_RANGE = (-9.0, 9.0)


# Why a case cannot run (the key is what the counts below name).
REASONS = {
    "no counterpart": "a loss this package does not have (NLL, MSE, margin losses, CTC, ...)",
    "BCE weight": "binary cross-entropy's weight=: not an option of sigmoid_focal_loss",
    "BCE pos_weight": "binary cross-entropy's pos_weight=: not an option of sigmoid_focal_loss",
    "BCE targets outside [0,1]": "PyTorch extrapolates the formula; ours gives NaN there by design",
    "NaN input": "the input holds NaN (PyTorch's log of make_tensor's negative values)",
    "KL input not log-probs": "PyTorch's KL takes any log-input; ours takes logits and normalises "
                              "them: equal only for log-probabilities along the last axis",
    "KL element-wise reduction": "PyTorch's 'none' and 'mean' are per element (the mean divides by "
                                 "the element count); ours are per row",
    "KL batchmean of 1-D": "PyTorch's batchmean of a 1-D input divides by the class count",
    "mean over nothing": "every row ignored under 'mean': PyTorch NaN, ours 0 by design (README; "
                         "checked)",
    "bad input": "a bad-input case: test_bad_input_case runs it",
    "leading axes are batch axes here": "PyTorch rejects a 3-D linear CE input; ours takes "
                                        "hidden [..., H] (checked to give a loss)",
}


class CannotRun(Exception):
    """A case whose loss or option we do not have: ``reason`` is a key of
    REASONS; ``check``, if given, asserts what we do instead (a ValueError)."""

    def __init__(self, reason, check=None):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason, self.check = reason, check


# ---- the table's tensors ---------------------------------------------------
_TENSOR = re.compile(r"^T:(\w+)\[([\d,]*)\](?: (\S+))?(.*)$")


def is_tensor(v) -> bool:
    return isinstance(v, str) and v.startswith("T:")


def parse(desc: str):
    dtype, shape, kind, rest = _TENSOR.match(desc).groups()
    shape = tuple(int(s) for s in shape.split(",") if s)
    return dtype, shape, kind, rest.split()


def draw(desc: str, rng: np.random.Generator, dtype: mx.Dtype) -> np.ndarray:
    """Our values for one of PyTorch's tensors: float ones rounded to
    ``dtype`` (returned as float64), integer ones exact."""
    _, shape, kind, nums = parse(desc)
    if kind == "=":
        return np.array([int(v) for v in nums], np.int64).reshape(shape)
    if kind == "nan_inside":
        raise CannotRun("NaN input")
    if kind == "uniform":
        x = rng.uniform(float(nums[0]), float(nums[1]), size=shape)
    elif kind == "value":
        x = np.full(shape, float(nums[0]))
    elif kind == "binary":
        x = rng.integers(0, 2, size=shape).astype(np.float64)
    elif kind in ("softmax", "log_softmax"):
        z = rng.uniform(*LOGIT_RANGE, size=shape)
        x = z - R.logsumexp(z, axis=int(nums[0]), keepdims=True)
        x = np.exp(x) if kind == "softmax" else x
    else:
        raise AssertionError(f"unknown tensor kind in the table: {desc}")
    return to64(mx.array(x.astype(np.float32)).astype(dtype))


class Inputs:
    """Draws a case's tensors (``inputs(desc)``) and converts float64 values
    to mx arrays (``inputs.arr(a)``), in one dtype."""

    def __init__(self, rng: np.random.Generator, dtype: mx.Dtype):
        self.rng, self.dtype = rng, dtype

    def __call__(self, desc: str) -> np.ndarray:
        return draw(desc, self.rng, self.dtype)

    def arr(self, a: np.ndarray) -> mx.array:
        return mx.array(np.asarray(a, np.float32)).astype(self.dtype)


def to64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), np.float64)


# ---- per loss: PyTorch's options -> ours, and the float64 expectation ------
def _opt(case, name, default=None):
    v = case.get("opts", {}).get(name, default)
    return default if v is None else v


def _class_weights(case, d):
    """PyTorch's weight= as our class_weights (float64); negative ones too
    (PyTorch's range, its minimum kept exactly)."""
    w_d = _opt(case, "weight")
    if w_d is None:
        return None
    w = d(w_d)
    _, _, kind, nums = parse(w_d)
    if float(nums[0]) < 0:  # PyTorch's weights held a negative value (its min)
        w.reshape(-1)[np.argmin(w)] = float(nums[0])
    return w


def _all_ignored_mean(t, ignore_index, reduction):
    return reduction == "mean" and t.size > 0 and np.all(t == ignore_index)


def run_cross_entropy(case, d):
    x_d, t_d = case["args"][:2]
    x, t = d(x_d), d(t_d)
    soft = t.dtype == np.float64
    reduction = _opt(case, "reduction", "mean")
    ignore_index = _opt(case, "ignore_index", -100)
    ls = float(_opt(case, "label_smoothing", 0.0))
    axis = 1 if x.ndim >= 2 else 0
    tm = d.arr(t) if soft else mx.array(t)
    w = _class_weights(case, d)
    if not soft and _all_ignored_mean(t, ignore_index, reduction):
        def check():  # ours: 0, and a zero gradient
            loss, g = mx.value_and_grad(lambda a: fl.cross_entropy(
                a, tm, axis=axis, reduction="mean", ignore_index=ignore_index,
                label_smoothing=ls, class_weights=None if w is None else d.arr(w)))(d.arr(x))
            assert loss.item() == 0.0 and not np.any(to64(g))
        raise CannotRun("mean over nothing", check)
    opts = dict(axis=axis, label_smoothing=ls, reduction=reduction, ignore_index=ignore_index,
                class_weights=w)
    wm = None if w is None else d.arr(w)

    def ours(a):
        return fl.cross_entropy(a, tm, **{**opts, "class_weights": wm})

    want = R.cross_entropy(x, t, **opts)
    gwant = R.cross_entropy_grad(x, t, **opts)
    return ours, [x], want, [gwant]


def _lce_f64(h, W, b, t, soft, **ce):
    """Loss and (hidden, weight, bias) gradients of PyTorch's
    linear_cross_entropy in float64: cross_entropy(h @ W.T + b, t); with a
    K-dimensional head W [C, d1, ..., H] the logits are [N, C, d1, ...]
    (position d's slice W[:, d]) and the class axis is 1."""
    if W.ndim > 2:
        Wf = W.reshape(W.shape[0], -1, W.shape[-1])  # [C, D, H]
        z = np.einsum("nh,cdh->ncd", h, Wf).reshape((h.shape[0],) + W.shape[:-1])
        z = z + (0.0 if b is None else b)
        loss = R.cross_entropy(z, t, axis=1, **ce)
        dz = R.cross_entropy_grad(z, t, axis=1, **ce)
        dzf = dz.reshape(dz.shape[0], W.shape[0], -1)
        grads = [np.einsum("ncd,cdh->nh", dzf, Wf), np.einsum("ncd,nh->cdh", dzf, h).reshape(W.shape)]
        return loss, grads + ([] if b is None else [dz.sum(0)])
    H, V = h.shape[-1], W.shape[0]
    h2 = h.reshape(-1, H)
    t2 = t.reshape(-1, V) if soft else t.reshape(-1)
    z = h2 @ W.T + (0.0 if b is None else b)
    loss = R.cross_entropy(z, t2, **ce)
    if ce.get("reduction") == "none":
        loss = loss.reshape(t.shape[:-1] if soft else t.shape)
    dz = R.cross_entropy_grad(z, t2, **ce)
    grads = [(dz @ W).reshape(h.shape), dz.T @ h2]
    if b is not None:
        grads.append(dz.sum(0))
    return loss, grads


def _run_linear_ce(d, h_d, W_d, b_d, t_d, case, out_features=()):
    """``out_features``: the module's K-dim positions, whose flat Linear
    parameters PyTorch's forward reshapes to [C, *out_features, H] / [C, *out_features]."""
    h, W, t = d(h_d), d(W_d), d(t_d)
    b = None if b_d is None else d(b_d)
    if out_features:
        W = W.reshape(-1, *out_features, W.shape[-1])
        b = None if b is None else b.reshape(W.shape[:-1])
    soft = t.dtype == np.float64
    reduction = _opt(case, "reduction", "mean")
    ignore_index = _opt(case, "ignore_index")  # PyTorch's default: none
    ls = float(_opt(case, "label_smoothing", 0.0))
    tm = d.arr(t) if soft else mx.array(t)
    w = _class_weights(case, d)
    if not soft and ignore_index is not None and _all_ignored_mean(t, ignore_index, reduction):
        raise CannotRun("mean over nothing")
    ce = dict(label_smoothing=ls, reduction=reduction, ignore_index=ignore_index, class_weights=w)
    wm = None if w is None else d.arr(w)

    def ours(hh, WW, *bb):
        return fl.linear_cross_entropy(hh, WW, tm, bb[0] if bb else None,
                                       **{**ce, "class_weights": wm})

    want, gwant = _lce_f64(h, W, b, t, soft, **ce)
    return ours, [h, W] + ([] if b is None else [b]), want, gwant


def run_linear_cross_entropy_module(case, d):
    p = case["params"]
    return _run_linear_ce(d, case["args"][0], p["linear.weight"], p.get("linear.bias"),
                          case["args"][1], case, tuple(case["opts"].get("out_features") or ()))


def run_linear_cross_entropy_functional(case, d):
    h_d, W_d, t_d = case["args"][:3]
    return _run_linear_ce(d, h_d, W_d, _opt(case, "linear_bias"), t_d, case)


def _pair(case, d):
    x_d, t_d = case["args"][:2]
    return d(x_d), d(t_d)


def run_smooth_l1(case, d, beta=None):
    x, t = _pair(case, d)
    beta = float(_opt(case, "beta", 1.0)) if beta is None else beta
    reduction = _opt(case, "reduction", "mean")
    tm = d.arr(t)

    def ours(a):
        return fl.smooth_l1_loss(a, tm, beta=beta, reduction=reduction)

    return (ours, [x], R.smooth_l1(x, t, beta, reduction),
            [R.smooth_l1_grad(x, t, beta, reduction)])


def run_l1(case, d):
    return run_smooth_l1(case, d, beta=0.0)


def run_huber(case, d):
    x, t = _pair(case, d)
    delta = float(_opt(case, "delta", 1.0))
    reduction = _opt(case, "reduction", "mean")
    tm = d.arr(t)

    def ours(a):
        return fl.huber_loss(a, tm, delta=delta, reduction=reduction)

    return (ours, [x], R.huber(x, t, delta, reduction),
            [R.huber_grad(x, t, delta, reduction)])


def run_bce_with_logits(case, d):
    for name in ("weight", "pos_weight"):
        if _opt(case, name) is not None:
            raise CannotRun(f"BCE {name}")
    x, t = _pair(case, d)
    if ((t < 0) | (t > 1)).any():
        raise CannotRun("BCE targets outside [0,1]")
    reduction = _opt(case, "reduction", "mean")
    tm = d.arr(t)

    def ours(a):  # alpha < 0, gamma = 0: exactly BCE with logits (documented)
        return fl.sigmoid_focal_loss(a, tm, alpha=-1.0, gamma=0.0, reduction=reduction)

    want = R.reduce(R._bce_with_logits(x, t), reduction)
    gwant = (R._sigmoid(x) - t) * R.reduce_cotangent(x.shape, reduction)
    return ours, [x], want, [gwant]


def run_kl_div(case, d):
    """PyTorch's kl_div(input, target) = sum target * (log target - input)
    is ours, KL(softmax(teacher) || softmax(student)) per row of the last
    axis, where input holds log-probabilities over that axis, the target
    probabilities (or their logs, log_target), and the reduction sums
    (over everything, or over rows for "batchmean", our "mean")."""
    x_d, t_d = case["args"][:2]
    _, shape, kind, nums = parse(x_d)
    reduction = _opt(case, "reduction", "mean")
    log_target = bool(_opt(case, "log_target", False))
    if kind == "nan_inside":
        raise CannotRun("NaN input")
    target_kind = "log_softmax" if log_target else "softmax"
    if (kind != "log_softmax" or int(nums[0]) != len(shape) - 1
            or parse(t_d)[2] != target_kind or int(parse(t_d)[3][0]) != len(shape) - 1):
        raise CannotRun("KL input not log-probs")
    if reduction in ("none", "mean"):
        raise CannotRun("KL element-wise reduction")
    if reduction == "batchmean" and len(shape) != 2:
        raise CannotRun("KL batchmean of 1-D")
    x, t = _pair(case, d)
    logp = t if log_target else np.log(t)
    p = np.exp(logp)
    terms = p * (logp - x)
    want = terms.sum() / (shape[0] if reduction == "batchmean" else 1)
    ours_reduction = "mean" if reduction == "batchmean" else "sum"
    teacher = d.arr(logp)

    def ours(a):
        return fl.kl_div(a, teacher, reduction=ours_reduction)

    # our gradient: w.r.t. the student's logits (softmax - p), not PyTorch's
    # w.r.t. free log-probabilities (-p): the float64 derivative of ours
    gwant = R.distill_grad(x, logp) * (1.0 / shape[0] if reduction == "batchmean" else 1.0)
    return ours, [x], np.asarray(want), [gwant]


RUNNERS = {
    "torch.nn.CrossEntropyLoss": run_cross_entropy,
    "nn.functional.cross_entropy": run_cross_entropy,
    "torch.nn.LinearCrossEntropyLoss": run_linear_cross_entropy_module,
    "nn.functional.linear_cross_entropy": run_linear_cross_entropy_functional,
    "nn.functional.linear_cross_entropy.chunked": run_linear_cross_entropy_functional,
    "nn.functional.linear_cross_entropy.chunked_none": run_linear_cross_entropy_functional,
    "torch.nn.SmoothL1Loss": run_smooth_l1,
    "nn.functional.smooth_l1_loss": run_smooth_l1,
    "torch.nn.L1Loss": run_l1,
    "nn.functional.l1_loss": run_l1,
    "torch.nn.HuberLoss": run_huber,
    "nn.functional.huber_loss": run_huber,
    "torch.nn.BCEWithLogitsLoss": run_bce_with_logits,
    "nn.functional.binary_cross_entropy_with_logits": run_bce_with_logits,
    "torch.nn.KLDivLoss": run_kl_div,
    "nn.functional.kl_div": run_kl_div,
}


def case_id(case) -> str:
    peer = case["peer"].replace("torch.nn.", "").replace("nn.functional.", "F.")
    return f"{case['src']}-{peer}-{case['i']}"


def case_rng(case, dtype: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{case_id(case)}-{dtype}".encode()))


MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FORWARD_TOLERANCES = TABLE["header"]["module_forward_tolerances"]


def variants(case):
    """(dtype, (rtol, atol)) of each run of a case: float32 at PyTorch's
    float32 tolerance; a module case also in each 16-bit dtype its
    ModuleInfo tests, at the tolerance its test_forward uses there
    (float64, which PyTorch also tests, is not an input dtype here)."""
    tols = FORWARD_TOLERANCES.get(case["peer"], {}) if case["src"] == "module" else {}
    out = [("float32", tuple(tols.get("float32", (RTOL, ATOL))))]
    out += [(dt, tuple(tols[dt])) for dt in ("float16", "bfloat16") if dt in tols]
    return out


def _accepts_leading_axes(case):
    """PyTorch's linear CE takes a 1-D or 2-D input and its error samples
    include a 3-D one; ours takes hidden [..., H] (any leading axes)."""
    return case["peer"].startswith("nn.functional.linear_cross_entropy") and \
        len(parse(case["args"][0])[1]) > 2


def plan(case, dtype="float32"):
    """(ours, float64 inputs, expected loss, expected gradients), or the
    CannotRun that says why not."""
    if case["src"].endswith("_error"):
        if "args" not in case:
            return CannotRun("no counterpart")
        if _accepts_leading_axes(case):
            def check():  # the input's shape with matching targets: a loss
                d = Inputs(case_rng(case, "float32"), mx.float32)
                h, W = (d.arr(d(a)) for a in case["args"][:2])
                t = mx.array(d.rng.integers(0, W.shape[0], size=h.shape[:-1]))
                assert np.isfinite(fl.linear_cross_entropy(h, W, t).item())
            return CannotRun("leading axes are batch axes here", check)
        return CannotRun("bad input")
    runner = RUNNERS.get(case["peer"])
    if runner is None:
        return CannotRun("no counterpart")
    try:
        return runner(case, Inputs(case_rng(case, dtype), MX_DTYPES[dtype]))
    except CannotRun as why:
        return why


PLANS = {case_id(c): plan(c) for c in CASES}
RUNS = [pytest.param(c, dt, tol, id=f"{case_id(c)}-{dt}")
        for c in CASES if not isinstance(PLANS[case_id(c)], CannotRun)
        for dt, tol in variants(c)]


def _close(got, want, tol, what):
    rtol, atol = tol
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= atol + rtol * np.abs(want))
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.size} out of tolerance, max err "
                           f"{err.max():.3g}; got {got[bad][:4]} expected {want[bad][:4]}")


@pytest.mark.parametrize("case,dtype,tol", RUNS)
def test_case(case, dtype, tol):
    ours, inputs, want, gwant = PLANS[case_id(case)] if dtype == "float32" else plan(case, dtype)
    args = [mx.array(np.asarray(a, np.float32)).astype(MX_DTYPES[dtype]) for a in inputs]
    loss = ours(*args)
    assert loss.dtype == args[0].dtype
    _close(to64(loss), want, tol, "loss")
    grads = mx.grad(lambda *a: ours(*a).sum(), argnums=list(range(len(args))))(*args)
    grads = grads if isinstance(grads, (list, tuple)) else [grads]
    assert len(grads) == len(gwant)
    for k, (g, gw) in enumerate(zip(grads, gwant)):
        assert g.dtype == args[k].dtype
        _close(to64(g), gw, tol, f"gradient of argument {k}")


# ---- PyTorch's bad-input cases: ours must raise TypeError or ValueError ----
def _value(v):
    """An option of a bad-input case: a tensor drawn, a complex from its repr."""
    if isinstance(v, dict) and "repr" in v:
        return complex(v["repr"])
    return v


def _bad_args(case, d):
    return [d.arr(a) if a.dtype == np.float64 else mx.array(a)
            for a in (d(desc) for desc in case["args"])]


def bad_cross_entropy_module(case, d):
    o = {k: _value(v) for k, v in case["opts"].items()}
    x, t = _bad_args(case, d)
    w = o.get("weight")
    criterion = fl.nn.CrossEntropyLoss(
        label_smoothing=o.get("label_smoothing", 0.0), ignore_index=o.get("ignore_index", -100),
        class_weights=None if w is None else d.arr(d(w)), axis=1 if x.ndim >= 2 else 0)
    return criterion(x, t)


def bad_huber_module(case, d):
    return fl.nn.HuberLoss(delta=_value(case["opts"]["delta"]))


def bad_linear_cross_entropy_module(case, d):
    in_features, num_classes = case["ctor_args"]
    o = case["opts"]
    h, t = _bad_args(case, d)
    W = d.arr(d(f"T:float32[{num_classes},{in_features}] uniform -0.5 0.5"))
    w = o.get("weight")
    return fl.linear_cross_entropy(h, W, t, label_smoothing=o.get("label_smoothing", 0.0),
                                   class_weights=None if w is None else d.arr(d(w)))


def bad_linear_cross_entropy(case, d):
    o = case["opts"]
    h, W, t = _bad_args(case, d)
    if mx.issubdtype(t.dtype, mx.floating) and t.shape != (*h.shape[:-1], W.shape[0]):
        # PyTorch's error samples draw every target as floats; where they are
        # not probabilities, class indices keep the case about its defect
        t = mx.array(d.rng.integers(0, W.shape[0], size=t.shape))
    b = o.get("linear_bias")
    return fl.linear_cross_entropy(h, W, t, None if b is None else d.arr(d(b)),
                                   ignore_index=o.get("ignore_index"))


def bad_l1(case, d):
    x, t = _bad_args(case, d)
    return fl.smooth_l1_loss(x, t, beta=0.0, reduction=case["opts"].get("reduction", "mean"))


def bad_huber(case, d):
    x, t = _bad_args(case, d)
    o = case["opts"]
    return fl.huber_loss(x, t, delta=o.get("delta", 1.0), reduction=o.get("reduction", "mean"))


BAD_INPUT_RUNNERS = {
    ("module_error", "torch.nn.CrossEntropyLoss"): bad_cross_entropy_module,
    ("module_error", "torch.nn.HuberLoss"): bad_huber_module,
    ("module_error", "torch.nn.LinearCrossEntropyLoss"): bad_linear_cross_entropy_module,
    ("opinfo_error", "nn.functional.linear_cross_entropy"): bad_linear_cross_entropy,
    ("opinfo_error", "nn.functional.linear_cross_entropy.chunked"): bad_linear_cross_entropy,
    ("opinfo_error", "nn.functional.linear_cross_entropy.chunked_none"): bad_linear_cross_entropy,
    ("opinfo_error", "nn.functional.l1_loss"): bad_l1,
    ("opinfo_error", "nn.functional.huber_loss"): bad_huber,
}


BAD_INPUTS = [c for c in CASES if (c["src"], c["peer"]) in BAD_INPUT_RUNNERS
              and not _accepts_leading_axes(c)]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=case_id)
def test_bad_input_case(case):
    """PyTorch raises (its error type recorded in the table); ours raises a
    TypeError or ValueError, before anything is evaluated."""
    d = Inputs(case_rng(case, "float32"), mx.float32)
    with pytest.raises((TypeError, ValueError)):
        BAD_INPUT_RUNNERS[(case["src"], case["peer"])](case, d)


# What cannot run, and why: per peer and source, the number of cases per
# reason (PyTorch 2.13's cases; a table from another release, or a new option
# here, changes them).
EXPECTED_CANNOT_RUN = {
    "criterion other losses": {"no counterpart": 33},
    "criterion torch.nn.BCEWithLogitsLoss": {"BCE targets outside [0,1]": 3},
    "criterion torch.nn.KLDivLoss": {"KL input not log-probs": 3},
    "module other losses": {"no counterpart": 138},
    "module torch.nn.BCEWithLogitsLoss": {"BCE weight": 2},
    "module torch.nn.CrossEntropyLoss": {"mean over nothing": 1},
    "module torch.nn.KLDivLoss": {"NaN input": 8, "KL input not log-probs": 2},
    "opinfo nn.functional.binary_cross_entropy_with_logits": {"BCE weight": 15, "BCE pos_weight": 3},
    "opinfo nn.functional.kl_div": {"KL element-wise reduction": 8, "KL batchmean of 1-D": 2},
    "opinfo other losses": {"no counterpart": 566},
    "module_error other losses": {"no counterpart": 2},
    "opinfo_error nn.functional.linear_cross_entropy": {"leading axes are batch axes here": 1},
    "opinfo_error nn.functional.linear_cross_entropy.chunked": {
        "leading axes are batch axes here": 1},
    "opinfo_error nn.functional.linear_cross_entropy.chunked_none": {
        "leading axes are batch axes here": 1},
    "opinfo_error other losses": {"no counterpart": 40},
}


def test_cases_that_cannot_run():
    counts = collections.defaultdict(collections.Counter)
    for c in CASES:
        p = PLANS[case_id(c)]
        if isinstance(p, CannotRun) and p.reason != "bad input":
            # (the losses we do not have: one count per source)
            peer = "other losses" if p.reason == "no counterpart" else c["peer"]
            counts[f"{c['src']} {peer}"][p.reason] += 1
            if p.check is not None:
                p.check()
    assert {k: dict(v) for k, v in counts.items()} == EXPECTED_CANNOT_RUN
    # PyTorch's bad-input cases of the losses we have (less the three above)
    assert len(BAD_INPUTS) == 33


def test_table_provenance():
    """The table is PyTorch's, from the release its counts are for, and
    every case of a loss we have kept its data."""
    h = TABLE["header"]
    assert h["peer"] == "PyTorch" and h["version"].startswith("2.13.")
    assert h["count"] == len(CASES)
    kinds = {"=", "uniform", "value", "softmax", "log_softmax", "binary", "nan_inside"}
    for c in CASES:
        assert (c["peer"] in RUNNERS) == ("args" in c), case_id(c)
        for v in [*c.get("args", []), *c.get("opts", {}).values(), *c.get("params", {}).values()]:
            if is_tensor(v):
                assert _TENSOR.match(v) and parse(v)[2] in kinds, (case_id(c), v)
