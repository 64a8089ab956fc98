"""kl_div and jsd on logits: values and gradients against float64 NumPy
(tests/reference.py), mlx-lm's kl_div_loss / js_div_loss, the teacher's
zero gradient, transforms, and bad input. A float32 student's "mean" / "sum"
without weights forms its gradient in the forward (csrc/ops/distillation.h):
checked against float64, against the backward primitive, and that it is the
path taken."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import EPS32, SCALE_ULPS, TOL, assert_close, assert_raises_naming, dtype_id, to_np

# (kind, beta): every divergence, the JSD's ends included
KINDS = [("kl", None), ("reverse_kl", None), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]
KIND_IDS = ["kl", "rkl", "jsd0", "jsd.3", "jsd.5", "jsd1"]


def _call(fl, kind, beta, s, t, **kw):
    if kind == "jsd":
        return fl.jsd(s, t, beta=beta, **kw)
    return fl.kl_div(s, t, direction="forward" if kind == "kl" else "reverse", **kw)


def _ref_kw(kind, beta, **kw):
    return dict(kind=kind, beta=0.5 if beta is None else beta, **kw)


def _logits(rng, shape, scale=3.0, dtype=mx.float32, peaked=True):
    x = rng.normal(size=shape) * scale
    if peaked and shape[-1] > 4:
        # a few large entries per row, so the softmax is not flat
        idx = rng.integers(0, shape[-1], size=shape[:-1] + (3,))
        np.put_along_axis(x, idx, np.take_along_axis(x, idx, -1) + 8.0, -1)
    a = mx.array(x.astype(np.float32)).astype(dtype)
    return a, to_np(a)


def _scales(s64, t64, kind, beta, temperature, alpha, t2, targets):
    """Rounding-error scales of the float32 computation: each term of D is
    p_j or q_j times log-probabilities (each rounded at their own size), so
    the loss's error is ~eps * sum_j (p_j + q_j)(|lq_j| + |lp_j| + 1), and a
    gradient entry's ~eps * (p_k + q_k)(|lq_k| + |lp_k| + |D| + 1), times the
    coefficients; the CE's likewise with its own softmax."""
    _, _, lq, lp, q, p = R._distill_parts(s64, t64, temperature)
    mag = np.where(np.isfinite(lq), np.abs(lq), 0) + np.where(np.isfinite(lp), np.abs(lp), 0) + 1
    d = R.distill_rows(s64, t64, **_ref_kw(kind, beta, temperature=temperature))
    d_abs = np.where(np.isfinite(d), np.abs(d), 0)[..., None]
    ds = (1 - alpha) * (temperature ** 2 if t2 else 1.0)
    loss_scale = ds * ((p + q) * mag).sum(-1)
    grad_scale = ds / temperature * (p + q) * (mag + d_abs)
    if alpha:
        lq1 = s64 - R.logsumexp(s64, keepdims=True)
        q1 = np.exp(lq1)
        y = np.clip(np.asarray(targets).astype(np.int64), 0, s64.shape[-1] - 1)
        loss_scale = loss_scale + alpha * (np.abs(np.take_along_axis(lq1, y[..., None], -1)[..., 0]) + 1)
        grad_scale = grad_scale + alpha * q1 * (np.abs(lq1) + 1)
    return loss_scale, grad_scale


def _check(fl, kind, beta, s, t, s64, t64, *, temperature=1.0, alpha=0.0, t2=False, targets=None,
           ignore_index=None, weights=None, reduction="none", grad=True):
    kw = dict(temperature=temperature, alpha=alpha, scale_by_temperature_squared=t2,
              targets=targets, ignore_index=ignore_index)
    rkw = _ref_kw(kind, beta, temperature=temperature, alpha=alpha, t2=t2,
                  targets=None if targets is None else to_np(targets), ignore_index=ignore_index)
    rows = R.distill_rows(s64, t64, **rkw)
    w64 = np.ones(rows.shape) if weights is None else to_np(weights)
    kept = np.ones(rows.shape, bool)
    if ignore_index is not None:
        kept = to_np(targets) != ignore_index
    denom = max(kept.sum(), 1) if reduction == "mean" else 1
    loss_scale, grad_scale = _scales(s64, t64, kind, beta, temperature, alpha, t2, rkw["targets"])
    if reduction == "none":
        exp, scale = rows * w64, loss_scale * np.abs(w64)
    else:
        exp = (rows * w64).sum() / denom
        scale = (loss_scale * np.abs(w64)).sum() / denom
    got = _call(fl, kind, beta, s, t, reduction=reduction, weights=weights, dtype=mx.float32, **kw)
    assert got.dtype == mx.float32
    assert_close(got, exp, mx.float32, scale=scale, what=f"{kind} loss")
    if not grad:
        return
    # a non-uniform cotangent per row (reduction none), else the mean's
    cot_rows = (1.0 + np.arange(rows.size).reshape(rows.shape) % 3) if reduction == "none" else None

    def f(a, b):
        out = _call(fl, kind, beta, a, b, reduction=reduction, weights=weights, dtype=mx.float32, **kw)
        return (out * mx.array(cot_rows.astype(np.float32))).sum() if cot_rows is not None else out

    gs, gt = mx.grad(f, argnums=(0, 1))(s, t)
    cot = (cot_rows if cot_rows is not None else np.full(rows.shape, 1.0 / denom)) * w64
    exp_g = R.distill_grad(s64, t64, cotangent=cot, **rkw)
    assert gs.dtype == s.dtype and gs.shape == s.shape
    assert_close(gs.astype(mx.float32), exp_g, mx.float32 if s.dtype == mx.float32 else s.dtype,
                 scale=grad_scale * np.abs(cot)[..., None], what=f"{kind} grad")
    # the teacher is frozen: its gradient is zeros
    assert gt.dtype == t.dtype and not np.any(to_np(gt))


# ---- the reference itself --------------------------------------------------------
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("alpha,t2", [(0.0, False), (0.4, True)])
def test_reference_grad_is_the_derivative(rng, kind, beta, alpha, t2):
    s = rng.normal(size=(3, 6)) * 2
    t = rng.normal(size=(3, 6)) * 2
    y = np.array([0, 5, 2])
    cot = np.array([1.0, -0.5, 2.0])
    kw = _ref_kw(kind, beta, temperature=1.7, alpha=alpha, t2=t2, targets=y)
    num = R.numerical_grad(lambda a: (R.distill_rows(a, t, **kw) * cot).sum(), s)
    np.testing.assert_allclose(R.distill_grad(s, t, cotangent=cot, **kw), num, rtol=1e-6, atol=1e-8)


def test_reference_definitions():
    # hand-computed two-class case: p = (0.5, 0.5), q = (sigmoid(1), 1 - sigmoid(1)) at logits (1, 0)
    s, t = np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]])
    q = np.array([1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))])
    p = np.array([0.5, 0.5])
    m = (p + q) / 2
    kl = lambda a, b: (a * np.log(a / b)).sum()  # noqa: E731
    np.testing.assert_allclose(R.distill_rows(s, t, "kl"), [kl(p, q)], rtol=1e-12)
    np.testing.assert_allclose(R.distill_rows(s, t, "reverse_kl"), [kl(q, p)], rtol=1e-12)
    np.testing.assert_allclose(R.distill_rows(s, t, "jsd", beta=0.5), [(kl(p, m) + kl(q, m)) / 2], rtol=1e-12)


# ---- values and gradients vs float64 -----------------------------------------------
@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("V", [1, 31, 33, 4097])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_and_grads(fl, rng, kind, beta, V, dtype, temperature):
    s, s64 = _logits(rng, (2, 3, V), dtype=dtype)
    t, t64 = _logits(rng, (2, 3, V), dtype=dtype)
    _check(fl, kind, beta, s, t, s64, t64, temperature=temperature)


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignore_index_weights_alpha(fl, rng, kind, beta, reduction):
    V = 37
    s, s64 = _logits(rng, (6, V))
    t, t64 = _logits(rng, (6, V))
    y = rng.integers(0, V, 6)
    y[1] = y[4] = -100
    targets = mx.array(y.astype(np.int32))
    weights = mx.array(rng.uniform(0.2, 2.0, 6).astype(np.float32))
    _check(fl, kind, beta, s, t, s64, t64, temperature=2.0, alpha=0.35, t2=True, targets=targets,
           ignore_index=-100, weights=weights, reduction=reduction)
    _check(fl, kind, beta, s, t, s64, t64, targets=targets, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_mixed_dtypes(fl, rng, kind, beta):
    # a float32 student against a bfloat16 teacher (computed in float32), and the reverse
    s, s64 = _logits(rng, (4, 300))
    t, t64 = _logits(rng, (4, 300), dtype=mx.bfloat16)
    _check(fl, kind, beta, s, t, s64, t64, temperature=1.5, reduction="mean")
    s, s64 = _logits(rng, (4, 300), dtype=mx.float16)
    t, t64 = _logits(rng, (4, 300))
    _check(fl, kind, beta, s, t, s64, t64, reduction="sum")


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_huge_logits(fl, rng, kind, beta):
    # spread 1e4 (one-hot softmaxes) and an offset of 1e5 on N(0, 1) logits
    s, s64 = _logits(rng, (3, 2500), scale=1e4, peaked=False)
    t, t64 = _logits(rng, (3, 2500), scale=1e4, peaked=False)
    _check(fl, kind, beta, s, t, s64, t64)
    s, s64 = _logits(rng, (3, 2500), scale=1.0)
    t, t64 = _logits(rng, (3, 2500), scale=1.0)
    s, s64 = s + 1e5, to_np(s + 1e5)
    t, t64 = t - 1e5, to_np(t - 1e5)
    _check(fl, kind, beta, s, t, s64, t64, temperature=0.7)


@pytest.mark.parametrize("kind,beta", [("kl", None), ("jsd", 0.5)], ids=["kl", "jsd.5"])
def test_minus_inf_teacher(fl, rng, kind, beta):
    # masked vocabulary entries in the teacher: p = 0 there, no NaN
    s, s64 = _logits(rng, (4, 65))
    tn = rng.normal(size=(4, 65)) * 2
    tn[:, ::3] = -np.inf
    t = mx.array(tn.astype(np.float32))
    _check(fl, kind, beta, s, t, s64, to_np(t), temperature=1.3)
    assert np.isfinite(to_np(_call(fl, kind, beta, s, t, reduction="none"))).all()


@pytest.mark.parametrize("kind,beta", [("kl", None), ("jsd", 0.5)], ids=["kl", "jsd.5"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_minus_inf_leading_chunk(fl, rng, kind, beta, reduction):
    # A first 2048-class chunk of -inf teacher logits, the rest near -1e4: the
    # CPU kernels keep each chunk's exps against its running max, which is
    # -inf there (lse_ref 0, far above the row's -1e4): its factor must be 0,
    # not exp(+1e4) times 0 (NaN).
    V = 4100
    s, s64 = _logits(rng, (3, V))
    tn = rng.normal(size=(3, V)) * 2 - 1e4
    tn[:, :2048] = -np.inf
    t = mx.array(tn.astype(np.float32))
    _check(fl, kind, beta, s, t, s64, to_np(t), temperature=1.3, reduction=reduction)


def _graph_primitives(*outputs):
    """The primitives' names in the graph of `outputs` (not evaluated)."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.dot")
        mx.export_to_dot(path, *outputs)
        return open(path).read()


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (1.0, 0.3), (2.5, 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_in_the_forward(fl, rng, kind, beta, temperature, alpha, reduction):
    # A float32 student's loss reduced to a scalar, no weights: the primitive
    # sums the rows (times the mean's 1 / count) and forms the gradient in its
    # visit of each row (the CE's softmax is q itself at T = 1, its own exp
    # at T != 1); several 2048-class chunks, an ignored row.
    V = 4500
    s, s64 = _logits(rng, (5, V))
    t, t64 = _logits(rng, (5, V))
    y = rng.integers(0, V, 5)
    y[2] = -100
    targets = mx.array(y.astype(np.int32))
    _check(fl, kind, beta, s, t, s64, t64, temperature=temperature, alpha=alpha, targets=targets,
           ignore_index=-100, reduction=reduction)

    def loss(a, **kw):
        return _call(fl, kind, beta, a, t, temperature=temperature, alpha=alpha, targets=targets,
                     ignore_index=-100, reduction=reduction, **kw)

    fused = mx.grad(loss)(s)
    graph = _graph_primitives(fused)
    assert "FusedDistillVJP" not in graph and "ScaleGrad" in graph
    # per-row weights: the backward primitive (one cotangent per row)
    rows = mx.grad(lambda a: loss(a, weights=mx.ones((5,))))(s)
    assert "FusedDistillVJP" in _graph_primitives(rows)
    # (both within the float64 bounds above; against each other to float32
    # rounding of the row's largest entry: q (u - E) cancels where u ~ E)
    np.testing.assert_allclose(to_np(fused), to_np(rows), rtol=1e-5,
                               atol=1e-6 * np.abs(to_np(rows)).max())
    # a cotangent other than 1 scales the forward's gradient (not in place of 1)
    np.testing.assert_allclose(to_np(mx.grad(lambda a: 3.0 * loss(a))(s)), 3.0 * to_np(fused),
                               rtol=1e-6, atol=1e-12)


def test_minus_inf_teacher_reverse_kl_is_inf(fl, rng):
    # KL(q || p) with p_j = 0 < q_j is +inf, as its definition
    s, s64 = _logits(rng, (2, 20))
    tn = rng.normal(size=(2, 20))
    tn[0, 3] = -np.inf
    t = mx.array(tn.astype(np.float32))
    got = to_np(fl.kl_div(s, t, direction="reverse", reduction="none"))
    exp = R.distill_rows(s64, to_np(t), "reverse_kl")
    assert np.isposinf(got[0]) and np.isposinf(exp[0])
    assert_close(got[1:], exp[1:], mx.float32, scale=100)


def test_identical_logits_give_zero(fl, rng):
    x, _ = _logits(rng, (5, 1000))
    for kind, beta in KINDS:
        got = to_np(_call(fl, kind, beta, x, x, reduction="none", temperature=1.7))
        assert np.abs(got).max() < 1e-6, (kind, beta, got)
        g = to_np(mx.grad(lambda a: _call(fl, kind, beta, a, x, reduction="sum"))(x))
        assert np.abs(g).max() < 1e-7, (kind, beta)


def test_out_of_range_target_is_nan(fl, rng):
    s, _ = _logits(rng, (3, 10))
    t, _ = _logits(rng, (3, 10))
    y = mx.array([1, 10, -100])
    rows = to_np(fl.kl_div(s, t, targets=y, ignore_index=-100, reduction="none"))
    assert np.isfinite(rows[0]) and np.isnan(rows[1]) and rows[2] == 0
    g = to_np(mx.grad(lambda a: fl.kl_div(a, t, targets=y, ignore_index=-100, alpha=0.5, reduction="sum"))(s))
    assert np.isfinite(g[0]).all() and np.isnan(g[1]).all() and not g[2].any()


def test_every_row_ignored_mean_is_zero(fl, rng):
    s, _ = _logits(rng, (3, 10))
    t, _ = _logits(rng, (3, 10))
    y = mx.array([-100, -100, -100])
    assert fl.jsd(s, t, targets=y, ignore_index=-100).item() == 0.0


def test_output_dtype_follows_the_student(fl, rng):
    s, _ = _logits(rng, (3, 10), dtype=mx.bfloat16)
    t, _ = _logits(rng, (3, 10))
    assert fl.kl_div(s, t).dtype == mx.bfloat16
    assert fl.kl_div(s, t, dtype=mx.float32).dtype == mx.float32
    assert fl.jsd(s, t, reduction="none").shape == (3,)


# ---- mlx-lm --------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 33, 4097])
def test_equals_mlx_lm(fl, rng, V):
    losses = pytest.importorskip("mlx_lm.tuner.losses")
    s, s64 = _logits(rng, (2, 4, V))
    t, t64 = _logits(rng, (2, 4, V))
    for ours, theirs, kind in [(fl.kl_div, losses.kl_div_loss, "kl"), (fl.jsd, losses.js_div_loss, "jsd")]:
        got = ours(s, t, reduction="none")
        want = theirs(s, t)
        assert got.shape == want.shape and got.dtype == want.dtype
        ls, gs = _scales(s64, t64, kind, 0.5, 1.0, 0.0, False, None)
        # mlx-lm's float32 graph has its own rounding: both within the float64 value's bounds
        assert_close(got, R.distill_rows(s64, t64, kind), mx.float32, scale=ls)
        np.testing.assert_allclose(to_np(got), to_np(want), rtol=1e-5, atol=2e-5 * max(1.0, np.log(V)))
        g_ours = mx.grad(lambda a: ours(a, t, reduction="sum"))(s)
        g_theirs = mx.grad(lambda a: theirs(a, t).sum())(s)
        np.testing.assert_allclose(to_np(g_ours), to_np(g_theirs), rtol=1e-4, atol=1e-6)


# ---- transforms ------------------------------------------------------------------------
def test_compile_and_vmap(fl, rng):
    s, _ = _logits(rng, (4, 3, 50))
    t, _ = _logits(rng, (4, 3, 50))
    y = mx.array(rng.integers(0, 50, (4, 3)).astype(np.int32))

    def f(a, b, c):
        return fl.jsd(a, b, beta=0.2, targets=c, alpha=0.3, temperature=1.4, reduction="none")

    eager = f(s, t, y)
    vm = mx.vmap(f)(s, t, y)
    np.testing.assert_allclose(to_np(vm), to_np(eager), rtol=1e-6, atol=1e-7)
    vm_t = mx.vmap(f, in_axes=(1, 1, 1))(s, t, y)
    np.testing.assert_allclose(to_np(vm_t), to_np(eager).T, rtol=1e-6, atol=1e-7)
    g_eager = mx.grad(lambda a: f(a, t, y).sum())(s)
    g_vm = mx.vmap(mx.grad(lambda a, b, c: f(a, b, c).sum()))(s, t, y)
    np.testing.assert_allclose(to_np(g_vm), to_np(g_eager), rtol=1e-6, atol=1e-7)
    comp = mx.compile(lambda a, b, c: mx.grad(lambda x: f(x, b, c).sum())(a), shapeless=True)
    np.testing.assert_allclose(to_np(comp(s, t, y)), to_np(g_eager), rtol=1e-6, atol=1e-7)
    s2, _ = _logits(rng, (2, 5, 50))
    t2, _ = _logits(rng, (2, 5, 50))
    y2 = mx.array(rng.integers(0, 50, (2, 5)).astype(np.int32))
    np.testing.assert_allclose(to_np(comp(s2, t2, y2)),
                               to_np(mx.grad(lambda a: f(a, t2, y2).sum())(s2)), rtol=1e-6, atol=1e-7)
    # a mean (the rows summed in the kernel, the gradient formed in the
    # forward): vmapped per example, compiled shapeless at a second size
    m = lambda a, b, c: fl.kl_div(a, b, targets=c, ignore_index=0, alpha=0.2)  # noqa: E731
    vg = mx.vmap(mx.value_and_grad(m))(s, t, y)
    for i in range(4):
        l_i, g_i = mx.value_and_grad(m)(s[i], t[i], y[i])
        np.testing.assert_allclose(vg[0][i].item(), l_i.item(), rtol=1e-6)
        np.testing.assert_allclose(to_np(vg[1][i]), to_np(g_i), rtol=1e-6, atol=1e-9)
    cm = mx.compile(mx.value_and_grad(m), shapeless=True)
    for a, b, c in ((s, t, y), (s2, t2, y2)):
        got, want = cm(a, b, c), mx.value_and_grad(m)(a, b, c)
        np.testing.assert_allclose(got[0].item(), want[0].item(), rtol=1e-6)
        np.testing.assert_allclose(to_np(got[1]), to_np(want[1]), rtol=1e-6, atol=1e-9)


# ---- bad input ---------------------------------------------------------------------------
def test_bad_input(fl, rng):
    s, _ = _logits(rng, (3, 10))
    t, _ = _logits(rng, (3, 10))
    y = mx.array([1, 2, 3])
    assert_raises_naming(ValueError, "teacher_logits", fl.kl_div, s, t[:, :9])
    assert_raises_naming(TypeError, "student_logits", fl.kl_div, s.astype(mx.int32), t)
    assert_raises_naming(ValueError, "direction", fl.kl_div, s, t, direction="backward")
    assert_raises_naming(ValueError, "beta", fl.jsd, s, t, beta=1.5)
    assert_raises_naming(ValueError, "beta", fl.jsd, s, t, beta=-0.1)
    assert_raises_naming(ValueError, "temperature", fl.kl_div, s, t, temperature=0.0)
    assert_raises_naming(ValueError, "temperature", fl.kl_div, s, t, temperature=-1.0)
    assert_raises_naming(ValueError, "alpha", fl.kl_div, s, t, targets=y, alpha=1.5)
    assert_raises_naming(ValueError, "targets", fl.kl_div, s, t, alpha=0.5)
    assert_raises_naming(ValueError, "targets", fl.kl_div, s, t, ignore_index=-100)
    assert_raises_naming(ValueError, "targets", fl.kl_div, s, t, targets=mx.array([1, 2]))
    assert_raises_naming(TypeError, "targets", fl.kl_div, s, t, targets=mx.array([1.0, 2.0, 3.0]))
    assert_raises_naming(ValueError, "weights", fl.kl_div, s, t, weights=mx.ones((4,)))
    assert_raises_naming(ValueError, "reduction", fl.kl_div, s, t, reduction="batchmean")
    assert_raises_naming(TypeError, "scale_by_temperature_squared", fl.kl_div, s, t,
                         scale_by_temperature_squared=2.0)
    assert_raises_naming(ValueError, "vocabulary", fl.kl_div, mx.zeros((3, 0)), mx.zeros((3, 0)))


def test_empty_batch_and_numpy_inputs(fl, rng):
    e = mx.zeros((0, 7))
    for kind, beta in KINDS:
        assert _call(fl, kind, beta, e, e).item() == 0.0
        g = mx.grad(lambda a: _call(fl, kind, beta, a, e))(e)
        assert g.shape == (0, 7)
    s = rng.normal(size=(3, 9)).astype(np.float32)
    t = rng.normal(size=(3, 9)).astype(np.float32)
    np.testing.assert_allclose(fl.kl_div(s, t.tolist()).item(),
                               fl.kl_div(mx.array(s), mx.array(t)).item(), rtol=1e-7)
    assert_raises_naming(TypeError, "teacher_logits", fl.jsd, mx.array(s), "x")
