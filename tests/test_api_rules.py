"""One rule for every loss (issue 7, item 9): empty and zero-weight means,
alpha validation, ignore_index and index dtypes, array-like inputs.

Each test here failed before the rule was implemented: the mean of an empty
batch was NaN for the row-wise losses, kept class weights adding up to 0 gave
the plain sum, softmax focal took a NaN or negative alpha, uint8 targets with
ignore_index=-100 raised under "mean", a uint64 index of 2^64-100 was taken
for -100 and ignored, and NumPy arrays or lists were a TypeError.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl
import reference as R
from conftest import assert_close, to_np

REDUCTIONS = ["none", "mean", "sum"]


# -- the mean over nothing is 0 ------------------------------------------------

def _empty_calls():
    x0 = mx.zeros((0, 5))
    t0 = mx.zeros((0,), mx.int32)
    p0 = mx.zeros((0, 3))
    return {
        "cross_entropy": lambda: fl.cross_entropy(x0, t0, reduction="mean"),
        "cross_entropy_probs": lambda: fl.cross_entropy(x0, x0, reduction="mean"),
        "cross_entropy_class_weights": lambda: fl.cross_entropy(
            x0, t0, reduction="mean", class_weights=mx.ones((5,))),
        "softmax_focal_loss": lambda: fl.softmax_focal_loss(x0, t0, reduction="mean"),
        "smooth_l1_loss": lambda: fl.smooth_l1_loss(p0, p0, reduction="mean"),
        "huber_loss": lambda: fl.huber_loss(p0, p0, reduction="mean"),
        "sigmoid_focal_loss": lambda: fl.sigmoid_focal_loss(p0, p0, reduction="mean"),
    }


@pytest.mark.parametrize("name", list(_empty_calls()))
def test_empty_batch_mean_is_zero(name):
    out = _empty_calls()[name]()
    assert out.shape == ()
    assert float(out.item()) == 0.0, name


@pytest.mark.parametrize("loss", ["cross_entropy", "softmax_focal_loss"])
def test_empty_batch_mean_gradient_is_empty_and_finite(loss):
    fn = getattr(fl, loss)
    g = mx.grad(lambda x: fn(x, mx.zeros((0,), mx.int32), reduction="mean"))(mx.zeros((0, 4)))
    assert g.shape == (0, 4)


# -- class weights of the kept rows adding up to 0 -----------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_zero_class_weight_total_mean_is_zero(rng, label_smoothing):
    x = mx.array(rng.normal(size=(6, 4)).astype(np.float32))
    t = mx.array([1, 1, 1, 1, 1, 1])
    w = mx.array([1.0, 0.0, 2.0, 3.0])
    out = fl.cross_entropy(x, t, class_weights=w, reduction="mean",
                           label_smoothing=label_smoothing)
    assert float(out.item()) == 0.0
    g = mx.grad(lambda z: fl.cross_entropy(z, t, class_weights=w, reduction="mean",
                                           label_smoothing=label_smoothing))(x)
    assert np.all(to_np(g) == 0.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_class_weight_mean_is_continuous_as_a_weight_goes_to_zero(rng, label_smoothing):
    # While other kept rows keep the denominator positive, the mean moves
    # continuously as one class's weight goes to 0 (its rows drop out), and
    # matches the float64 reference on the way.
    x = rng.normal(size=(8, 4)).astype(np.float32)
    t = np.array([1, 1, 2, 0, 1, 3, 2, 1])
    values = []
    for w1 in [1e-2, 1e-4, 1e-6, 0.0]:
        w = np.array([1.0, w1, 2.0, 0.5], np.float32)
        out = fl.cross_entropy(mx.array(x), mx.array(t), class_weights=mx.array(w),
                               reduction="mean", label_smoothing=label_smoothing)
        ref = R.cross_entropy(x, t, class_weights=w, reduction="mean",
                              label_smoothing=label_smoothing)
        assert_close(out, ref, mx.float32, scale=4.0, what=f"w1={w1}")
        values.append(float(out.item()))
    assert abs(values[2] - values[3]) <= 1e-5 * abs(values[3])


# -- alpha ---------------------------------------------------------------------

X4 = mx.zeros((3, 4))
T4 = mx.array([0, 1, 3])


@pytest.mark.parametrize("alpha", [
    float("nan"), -1.0, -1e-9,
    mx.array(float("nan")), mx.array(-0.5),
    mx.array([1.0, float("nan"), 1.0, 1.0]), mx.array([1.0, -0.25, 1.0, 1.0]),
], ids=["nan", "neg", "tiny-neg", "0d-nan", "0d-neg", "class-nan", "class-neg"])
def test_softmax_focal_rejects_nan_and_negative_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        fl.softmax_focal_loss(X4, T4, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        fl.nn.SoftmaxFocalLoss(alpha=alpha)


def test_softmax_focal_alpha_zero_is_allowed():
    assert float(fl.softmax_focal_loss(X4, T4, alpha=0.0, reduction="sum").item()) == 0.0
    out = fl.softmax_focal_loss(X4, T4, alpha=mx.array([0.0, 1.0, 1.0, 1.0]))
    assert to_np(out)[0] == 0.0


def test_sigmoid_focal_alpha_rules():
    p = mx.array([[0.5, -2.0, 3.0]])
    t = mx.array([[1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="alpha"):
        fl.sigmoid_focal_loss(p, t, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        fl.nn.SigmoidFocalLoss(alpha=float("nan"))(p, t)
    # alpha < 0 disables the alpha weighting (documented, kept).
    off = fl.sigmoid_focal_loss(p, t, alpha=-1.0)
    assert_close(off, R.sigmoid_focal(to_np(p), to_np(t), alpha=-1.0), mx.float32)


# -- ignore_index and index dtypes ---------------------------------------------

ROWWISE = {
    "cross_entropy": (fl.cross_entropy, R.cross_entropy),
    "softmax_focal_loss": (fl.softmax_focal_loss, R.softmax_focal),
}


@pytest.mark.parametrize("loss", list(ROWWISE))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype,ignore_index", [
    (mx.uint8, -100), (mx.int8, -200), (mx.int8, 128), (mx.uint16, 70000), (mx.uint32, -1),
    (mx.uint64, -100), (mx.int16, 40000),
])
def test_unrepresentable_ignore_index_matches_no_row(rng, loss, reduction, dtype, ignore_index):
    fn, ref_fn = ROWWISE[loss]
    x = rng.normal(size=(5, 6)).astype(np.float32)
    t = np.array([0, 5, 2, 2, 1])
    out = fn(mx.array(x), mx.array(t).astype(dtype), reduction=reduction,
             ignore_index=ignore_index)
    plain = fn(mx.array(x), mx.array(t), reduction=reduction)
    assert np.array_equal(to_np(out), to_np(plain))
    assert_close(out, ref_fn(x, t, reduction=reduction), mx.float32, scale=3.0)


@pytest.mark.parametrize("loss", list(ROWWISE))
def test_representable_ignore_index_still_ignores_in_small_dtypes(rng, loss):
    fn, _ = ROWWISE[loss]
    x = mx.array(rng.normal(size=(4, 6)).astype(np.float32))
    t = mx.array([0, 255, 2, 255]).astype(mx.uint8)
    out = fn(x, t, ignore_index=255)
    assert to_np(out)[1] == 0.0 and to_np(out)[3] == 0.0
    assert np.all(np.isfinite(to_np(out)))
    mean = fn(x, t, ignore_index=255, reduction="mean")
    assert_close(mean, to_np(out).sum() / 2, mx.float32)


@pytest.mark.parametrize("loss", list(ROWWISE))
def test_uint64_index_compares_in_its_own_dtype(rng, loss):
    fn, _ = ROWWISE[loss]
    x = mx.array(rng.normal(size=(3, 6)).astype(np.float32))
    big = np.array([1, 2**64 - 100, 4], np.uint64)
    t = mx.array(big)
    assert t.dtype == mx.uint64
    for reduction in REDUCTIONS:
        out = to_np(fn(x, t, ignore_index=-100, reduction=reduction))
        # 2^64 - 100 is not -100: an out-of-range index, a NaN row.
        assert np.isnan(out).any(), reduction
    rows = to_np(fn(x, t, ignore_index=-100))
    assert np.isnan(rows[1]) and np.isfinite(rows[[0, 2]]).all()
    # A representable ignore_index still works for uint64.
    kept = to_np(fn(x, mx.array(np.array([1, 3, 4], np.uint64)), ignore_index=3))
    assert kept[1] == 0.0 and np.isfinite(kept).all()


# -- NumPy arrays and lists ----------------------------------------------------

def _array_like_cases(rng):
    x = rng.normal(size=(4, 5)).astype(np.float32)
    t = np.array([0, 4, 2, 1])
    p = rng.normal(size=(3, 4)).astype(np.float32)
    q = rng.uniform(size=(3, 4)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=(4,)).astype(np.float32)
    cw = rng.uniform(0.5, 2.0, size=(5,)).astype(np.float32)
    return [
        ("cross_entropy", fl.cross_entropy, (x, t), dict(reduction="mean")),
        ("cross_entropy weights", fl.cross_entropy, (x, t, w), dict(reduction="sum")),
        ("cross_entropy class_weights", fl.cross_entropy, (x, t), dict(class_weights=cw)),
        ("cross_entropy probs", fl.cross_entropy, (x, np.full((4, 5), 0.2, np.float32)), {}),
        ("smooth_l1_loss", fl.smooth_l1_loss, (p, q), {}),
        ("huber_loss", fl.huber_loss, (p, q), dict(reduction="mean")),
        ("sigmoid_focal_loss", fl.sigmoid_focal_loss, (p, q), {}),
        ("softmax_focal_loss", fl.softmax_focal_loss, (x, t), dict(alpha=cw)),
    ]


@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_numpy_arrays_and_lists_are_accepted(rng, kind):
    for name, fn, args, kwargs in _array_like_cases(rng):
        as_mx = fn(*[mx.array(a) for a in args],
                   **{k: mx.array(v) if isinstance(v, np.ndarray) else v
                      for k, v in kwargs.items()})
        convert = (lambda a: a) if kind == "numpy" else (lambda a: a.tolist())
        got = fn(*[convert(a) for a in args],
                 **{k: convert(v) if isinstance(v, np.ndarray) else v
                    for k, v in kwargs.items()})
        assert isinstance(got, mx.array), name
        assert np.array_equal(to_np(got), to_np(as_mx)), name


def test_other_types_are_a_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="targets"):
        fl.smooth_l1_loss(mx.zeros((2,)), "zeros")
    with pytest.raises(TypeError, match="logits"):
        fl.cross_entropy({"a": 1}, mx.array([0]))
    with pytest.raises(TypeError, match="logits"):
        fl.cross_entropy([[0.0, "x"]], mx.array([0]))


def test_numpy_float64_inputs_follow_mlx_conversion(rng):
    # mx.array turns float64 NumPy data into float32, as mlx.nn.losses sees it.
    p = rng.normal(size=(3, 4))
    q = rng.normal(size=(3, 4))
    out = fl.smooth_l1_loss(p, q)
    assert out.dtype == mx.float32
    assert_close(out, R.smooth_l1(p.astype(np.float32), q.astype(np.float32)), mx.float32)
    assert math.isfinite(float(out.item()))


# -- Module classes: docstrings and repr ---------------------------------------

MODULES = [fl.nn.CrossEntropyLoss, fl.nn.SmoothL1Loss, fl.nn.HuberLoss,
           fl.nn.SigmoidFocalLoss, fl.nn.SoftmaxFocalLoss, fl.nn.LinearCrossEntropyLoss]


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_module_docstring_documents_every_option(cls):
    import inspect

    doc = inspect.getdoc(cls)
    assert doc and "Args:" in doc
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"{name}:" in doc, f"{cls.__name__} does not document {name}"


def test_module_repr_shows_options():
    ce = fl.nn.CrossEntropyLoss(0.1, ignore_index=-1, class_weights=mx.ones((5,)))
    text = repr(ce)
    assert text.startswith("CrossEntropyLoss(label_smoothing=0.1, reduction='mean'")
    assert "ignore_index=-1" in text and "class_weights=array(shape=(5,)" in text
    assert repr(fl.nn.HuberLoss(0.5, "sum")) == "HuberLoss(delta=0.5, reduction='sum')"
    assert "gamma=3.0" in repr(fl.nn.SoftmaxFocalLoss(gamma=3.0))
    assert "logit_softcap=30.0" in repr(fl.nn.LinearCrossEntropyLoss(logit_softcap=30.0))
    # Options read as attributes, and the arrays stay out of the trainable parameters.
    assert ce.ignore_index == -1 and ce.trainable_parameters() == {}


# -- out-of-range rows and the "mean" denominator ------------------------------

def test_out_of_range_row_adds_no_class_weight_to_the_mean(rng):
    x = mx.array(rng.normal(size=(3, 4)).astype(np.float32))
    t = mx.array([1, 9, 2])
    w = mx.array([1.0, 2.0, 3.0, 4.0])
    loss = fl.cross_entropy(x, t, class_weights=w, reduction="mean")
    assert np.isnan(loss.item())  # the out-of-range row poisons the loss...
    g = to_np(mx.grad(lambda a: fl.cross_entropy(a, t, class_weights=w, reduction="mean"))(x))
    ref = R.cross_entropy_grad(to_np(x)[[0, 2]], np.array([1, 2]), class_weights=to_np(w),
                               reduction="sum") / (2.0 + 3.0)
    # ...but the kept rows' gradient divides by their own weights only (2 + 3).
    assert_close(g[[0, 2]], ref, mx.float32, scale=4.0)
    assert np.isnan(g[1]).all()


def test_mean_over_nothing_keeps_a_nan_row_visible():
    # Every row ignored or weightless: 0 -- unless a row is NaN (out of range).
    x = mx.zeros((2, 3))
    w = mx.array([0.0, 1.0, 1.0])
    assert fl.cross_entropy(x, mx.array([0, -100]), ignore_index=-100, class_weights=w,
                            reduction="mean").item() == 0.0
    out = fl.cross_entropy(x, mx.array([7, -100]), ignore_index=-100, class_weights=w,
                           reduction="mean")
    assert np.isnan(out.item())


# -- broadcast targets are read in place ---------------------------------------

ELEMENTWISE = {
    "smooth_l1_loss": (lambda p, t, **k: fl.smooth_l1_loss(p, t, beta=0.5, **k),
                       lambda p, t, r: R.smooth_l1(p, t, 0.5, r)),
    "huber_loss": (lambda p, t, **k: fl.huber_loss(p, t, delta=1.5, **k),
                   lambda p, t, r: R.huber(p, t, 1.5, r)),
    "sigmoid_focal_loss": (lambda p, t, **k: fl.sigmoid_focal_loss(p, t, **k),
                           lambda p, t, r: R.sigmoid_focal(p, t, reduction=r)),
}
BROADCASTS = [((6, 5, 7), (7,)), ((6, 5, 7), (5, 1)), ((6, 5, 7), (6, 1, 7)),
              ((6, 5, 7), (1, 5, 1)), ((6, 5, 7), ()), ((6, 5, 7), (6, 1, 1)),
              ((1, 5, 1), (5, 1)), ((0, 4), (4,)), ((70000,), (1,)), ((300, 301), (300, 1))]


@pytest.mark.parametrize("loss", list(ELEMENTWISE))
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast_targets_match_the_reference(rng, loss, shapes, reduction):
    fn, ref_fn = ELEMENTWISE[loss]
    pshape, tshape = shapes
    p = rng.normal(size=pshape).astype(np.float32) * 2
    t = rng.random(size=tshape).astype(np.float32)
    out = fn(mx.array(p), mx.array(t), reduction=reduction)
    ref = ref_fn(p.astype(np.float64), np.broadcast_to(t, pshape).astype(np.float64), reduction)
    assert_close(out, ref, mx.float32, scale=4.0 if reduction == "none" else 4.0 * max(1, p.size))
    # bit for bit what the caller's full-size copy of the target gives
    dense = fn(mx.array(p), mx.array(np.ascontiguousarray(np.broadcast_to(t, pshape))),
               reduction=reduction)
    assert np.array_equal(to_np(out), to_np(dense), equal_nan=True)
    if loss != "sigmoid_focal_loss":
        # d/dtargets: the dense target's gradient summed over the broadcast axes
        tb = mx.array(np.ascontiguousarray(np.broadcast_to(t, pshape)))
        g = mx.grad(lambda b: fn(mx.array(p), b, reduction="sum"))(mx.array(t))
        gd = to_np(mx.grad(lambda b: fn(mx.array(p), b, reduction="sum"))(tb))
        lead = p.ndim - t.ndim
        axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(t.shape)
                                          if d == 1 and pshape[lead + i] != 1)
        want = gd.sum(axis=axes, keepdims=True).reshape(t.shape) if axes else gd
        assert g.shape == t.shape
        assert_close(g, want, mx.float32, mag=np.abs(gd).sum(axis=axes).reshape(t.shape)
                     if axes else None)


@pytest.mark.parametrize("loss", list(ELEMENTWISE))
def test_broadcast_targets_under_vmap(rng, loss):
    fn, ref_fn = ELEMENTWISE[loss]
    p = rng.normal(size=(3, 4, 5)).astype(np.float32)
    t = rng.random(size=(5,)).astype(np.float32)
    tb = rng.random(size=(3, 5)).astype(np.float32)
    # target not vmapped, lined up with the predictions' last axis
    out = mx.vmap(lambda a: fn(a, mx.array(t), reduction="sum"))(mx.array(p))
    ref = [ref_fn(p[i].astype(np.float64), np.broadcast_to(t, (4, 5)), "sum") for i in range(3)]
    assert_close(out, np.array(ref), mx.float32, scale=40.0)
    # target vmapped too, with fewer axes than the predictions
    out = mx.vmap(lambda a, b: fn(a, b, reduction="none"))(mx.array(p), mx.array(tb))
    ref = np.stack([ref_fn(p[i].astype(np.float64), np.broadcast_to(tb[i], (4, 5)), "none")
                    for i in range(3)])
    assert_close(out, ref, mx.float32, scale=4.0)


@pytest.mark.parametrize("tshape", [(4096,), (2048, 1), ()], ids=str)
def test_broadcast_targets_make_no_full_size_copy(tshape):
    # 8M float32 predictions (32 MiB): a full-size copy of the target would
    # add 32 MiB to the peak; reading it in place adds nothing of that size.
    p = mx.random.normal((2048, 4096))
    t = mx.random.uniform(shape=tshape)
    mx.eval(p, t)
    full = p.nbytes
    for loss in ("smooth_l1_loss", "huber_loss", "sigmoid_focal_loss"):
        fn = ELEMENTWISE[loss][0]
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(p, t, reduction="mean"))
        assert mx.get_peak_memory() - base < full // 8, (loss, "mean")
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = fn(p, t, reduction="none")
        mx.eval(out)
        # the float32 loss itself, nothing more of that size
        assert mx.get_peak_memory() - base < full + full // 8, (loss, "none")
        del out
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        g = mx.grad(lambda a: fn(a, t, reduction="mean"))(p)
        mx.eval(g)
        assert mx.get_peak_memory() - base < full + full // 8, (loss, "grad")
        del g


# -- PyTorch's -100 padding in the Module classes (issue 18, item 6) -----------

def test_modules_ignore_pytorch_padding_by_default(rng):
    """Labels padded with -100 gave a NaN loss and NaN gradients silently;
    the modules now default to ignore_index=-100 as PyTorch's do."""
    x = mx.array(rng.normal(size=(5, 6)).astype(np.float32))
    t = mx.array([1, -100, 3, -100, 0])
    kept_x, kept_t = x[mx.array([0, 2, 4])], mx.array([1, 3, 0])
    for module, fn in [(fl.nn.CrossEntropyLoss(), fl.cross_entropy),
                       (fl.nn.SoftmaxFocalLoss(), fl.softmax_focal_loss)]:
        assert module.ignore_index == -100
        out = module(x, t)
        assert_close(out, fn(kept_x, kept_t, reduction="mean"), mx.float32, scale=4.0)
        g = to_np(mx.grad(lambda a: module(a, t))(x))
        assert np.isfinite(g).all() and (g[[1, 3]] == 0).all()
    h = mx.array(rng.normal(size=(5, 8)).astype(np.float32))
    w = mx.array(rng.normal(size=(6, 8)).astype(np.float32))
    lce = fl.nn.LinearCrossEntropyLoss()
    assert lce.ignore_index == -100
    assert_close(lce(h, w, t), fl.linear_cross_entropy(h[mx.array([0, 2, 4])], w, kept_t),
                 mx.float32, scale=8.0)
    gh, gw = mx.grad(lambda a, b: lce(a, b, t), argnums=(0, 1))(h, w)
    assert np.isfinite(to_np(gw)).all() and (to_np(gh)[[1, 3]] == 0).all()
    # The functions keep MLX's default (no ignore_index): -100 is out of
    # range there, a NaN row, as documented.
    assert np.isnan(fl.cross_entropy(x, t, reduction="mean").item())
    assert np.isnan(fl.linear_cross_entropy(h, w, t).item())


def test_probability_targets_accept_a_negative_ignore_index(rng):
    """As PyTorch: a negative ignore_index matches no probability row (so the
    module's default works with probabilities); a class index >= 0 cannot
    apply to probabilities and is an error."""
    x = mx.array(rng.normal(size=(4, 5)).astype(np.float32))
    q = mx.softmax(mx.array(rng.normal(size=(4, 5)).astype(np.float32)), axis=-1)
    plain = fl.cross_entropy(x, q, reduction="mean")
    assert np.array_equal(to_np(fl.nn.CrossEntropyLoss()(x, q)), to_np(plain))
    assert np.array_equal(to_np(fl.cross_entropy(x, q, ignore_index=-100, reduction="mean")),
                          to_np(plain))
    with pytest.raises(ValueError, match="ignore_index"):
        fl.cross_entropy(x, q, ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index"):
        fl.nn.CrossEntropyLoss(ignore_index=2)(x, q)


# -- sigmoid focal targets outside [0, 1] (issue 18, item 8) -------------------

def test_sigmoid_focal_target_outside_unit_interval_is_nan(rng):
    """A target outside [0, 1] gave a finite, even negative, loss. It is now
    NaN for that element (loss and gradient), found by the kernel itself: no
    check on the host, so no sync and nothing different under mx.compile."""
    x = mx.array([[0.5, -2.0, 3.0, 1.0, 0.0]])
    t = mx.array([[1.5, -0.5, 1.0, 0.0, 0.3]])
    for fn in (fl.sigmoid_focal_loss, mx.compile(fl.sigmoid_focal_loss)):
        out = to_np(fn(x, t))
        assert np.isnan(out[0, :2]).all() and np.isfinite(out[0, 2:]).all()
        assert_close(out[0, 2:], R.sigmoid_focal(to_np(x)[:, 2:], to_np(t)[:, 2:])[0],
                     mx.float32)
        g = to_np(mx.grad(lambda a: fn(a, t).sum())(x))
        assert np.isnan(g[0, :2]).all() and np.isfinite(g[0, 2:]).all()
    for reduction in ("mean", "sum"):
        assert np.isnan(fl.sigmoid_focal_loss(x, t, reduction=reduction).item())
    for dtype in (mx.float16, mx.bfloat16):
        assert np.isnan(to_np(fl.sigmoid_focal_loss(x.astype(dtype), t))[0, :2]).all()
    # the ends of the interval are targets
    ends = fl.sigmoid_focal_loss(x[:, :2], mx.array([[0.0, 1.0]]))
    assert np.isfinite(to_np(ends)).all()


# -- one rule for an out-of-range index, masked or not (issue 18, item 10) -----

@pytest.mark.parametrize("dtype,bad", [(mx.int64, -(2**63)), (mx.uint64, 2**63)])
def test_mask_does_not_hide_an_out_of_range_target(rng, dtype, bad):
    """With a mask (and no ignore_index), masked rows were turned into the
    index -2^63 and every row equal to it was ignored: an unmasked target of
    -2^63 (or a uint64 2^63, which int64 reads as -2^63) was silently left
    out, while without the mask it gave NaN. Now only masked rows and
    ignore_index rows are left out; any other index outside [0, V) is NaN."""
    h = mx.array(rng.normal(size=(4, 8)).astype(np.float32))
    w = mx.array(rng.normal(size=(6, 8)).astype(np.float32))
    t = mx.array(np.array([1, bad, 3, 2], np.int64 if dtype == mx.int64 else np.uint64))
    assert t.dtype == dtype
    mask = mx.array([True, True, True, False])
    for kw in ({}, {"mask": mask}):
        rows = to_np(fl.linear_cross_entropy(h, w, t, reduction="none", **kw))
        assert np.isnan(rows[1]) and np.isfinite(rows[[0, 2]]).all(), kw
        assert np.isnan(fl.linear_cross_entropy(h, w, t, **kw).item()), kw
    assert to_np(fl.linear_cross_entropy(h, w, t, reduction="none", mask=mask))[3] == 0.0
