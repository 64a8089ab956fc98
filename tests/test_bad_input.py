"""Bad input raises ValueError/TypeError at call time (before any
evaluation: the calls below are never mx.eval'ed) with a message naming the
offending argument. Also: the compiled extension itself accepts mx.arrays and
is the installed one."""

from __future__ import annotations

import os
import sysconfig

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import assert_raises_naming, to_np

ERR = (ValueError, TypeError)

X = mx.zeros((4, 5))
T = mx.array([0, 1, 2, 3])
TP = mx.full((4, 5), 0.2)
P = mx.zeros((3, 4))
Q = mx.ones((3, 4))


def ce_cases():
    ce = "cross_entropy"
    return [
        ("targets shape (index)", "targets", ce, (X, mx.array([0, 1, 2])), {}),
        ("targets shape (index, 2d)", "targets", ce, (X, mx.zeros((4, 2), mx.int32)), {}),
        ("targets shape (probs)", "targets", ce, (X, mx.full((4, 6), 0.2)), {}),
        ("targets rank too high", "targets", ce, (X, mx.zeros((4, 5, 1))), {}),
        ("targets shape with axis=0", "targets", ce, (X, T), dict(axis=0)),
        ("integer logits", "logits", ce, (mx.zeros((4, 5), mx.int32), T), {}),
        ("bool logits", "logits", ce, (mx.zeros((4, 5), mx.bool_), T), {}),
        ("float class indices", "targets", ce, (X, mx.array([0.0, 1.0, 2.0, 3.0])), {}),
        ("weights shape", "weights", ce, (X, T, mx.ones((5,))), {}),
        ("weights shape probs", "weights", ce, (X, TP, mx.ones((4, 5))), {}),
        ("label_smoothing < 0", "label_smoothing", ce, (X, T), dict(label_smoothing=-0.1)),
        ("label_smoothing == 1", "label_smoothing", ce, (X, T), dict(label_smoothing=1.0)),
        ("label_smoothing > 1", "label_smoothing", ce, (X, T), dict(label_smoothing=1.5)),
        ("label_smoothing nan", "label_smoothing", ce, (X, T),
         dict(label_smoothing=float("nan"))),
        ("label_smoothing_mode", "label_smoothing_mode", ce, (X, T),
         dict(label_smoothing_mode="bogus")),
        ("class_weights length", "class_weights", ce, (X, T),
         dict(class_weights=mx.ones((6,)))),
        ("class_weights length probs", "class_weights", ce, (X, TP),
         dict(class_weights=mx.ones((4,)))),
        ("class_weights rank", "class_weights", ce, (X, T),
         dict(class_weights=mx.ones((1, 5)))),
        ("reduction", "reduction", ce, (X, T), dict(reduction="avg")),
        ("reduction probs", "reduction", ce, (X, TP), dict(reduction="")),
        ("axis too large", "axis", ce, (X, T), dict(axis=2)),
        ("axis too small", "axis", ce, (X, T), dict(axis=-3)),
    ]


def reg_cases():
    s, h = "smooth_l1_loss", "huber_loss"
    return [
        ("smooth_l1 shape", ("predictions", "targets"), s, (P, mx.ones((4, 3))), {}),
        ("smooth_l1 shape 2", ("predictions", "targets"), s, (P, mx.ones((3, 4, 1))), {}),
        ("smooth_l1 negative beta", "beta", s, (P, Q), dict(beta=-0.5)),
        ("smooth_l1 reduction", "reduction", s, (P, Q), dict(reduction="max")),
        ("huber shape", ("inputs", "targets"), h, (P, mx.ones((3,))), {}),
        ("huber shape 2", ("inputs", "targets"), h, (P, mx.ones((4, 3))), {}),
        ("huber negative delta", "delta", h, (P, Q), dict(delta=-1.0)),
        ("huber reduction", "reduction", h, (P, Q), dict(reduction="Mean")),
    ]


def focal_cases():
    sf, mf = "sigmoid_focal_loss", "softmax_focal_loss"
    return [
        ("sigmoid shape", ("inputs", "targets"), sf, (P, mx.ones((3, 5))), {}),
        ("sigmoid shape 2", ("inputs", "targets"), sf, (P, mx.ones((2, 3, 4))), {}),
        ("sigmoid negative gamma", "gamma", sf, (P, Q), dict(gamma=-1.0)),
        ("sigmoid reduction", "reduction", sf, (P, Q), dict(reduction="none ")),
        ("sigmoid integer logits", "inputs", sf, (mx.zeros((3, 4), mx.int32), Q), {}),
        ("softmax targets shape", "targets", mf, (X, mx.array([0, 1])), {}),
        ("softmax float targets", "targets", mf, (X, mx.zeros((4,))), {}),
        ("softmax integer logits", "logits", mf, (mx.zeros((4, 5), mx.int16), T), {}),
        ("softmax negative gamma", "gamma", mf, (X, T), dict(gamma=-0.5)),
        ("softmax alpha length", "alpha", mf, (X, T), dict(alpha=mx.ones((4,)))),
        ("softmax alpha rank", "alpha", mf, (X, T), dict(alpha=mx.ones((5, 1)))),
        ("softmax reduction", "reduction", mf, (X, T), dict(reduction="total")),
        ("softmax axis", "axis", mf, (X, T), dict(axis=5)),
        ("softmax axis negative", "axis", mf, (X, T), dict(axis=-3)),
    ]


CASES = ce_cases() + reg_cases() + focal_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fl, case):
    name, names, fn, args, kw = case
    assert_raises_naming(ERR, names, getattr(fl, fn), *args, **kw)


def test_bad_input_under_transforms(fl):
    """Validation also happens when traced by grad/compile/vmap."""
    bad = lambda x: fl.cross_entropy(x, mx.array([0, 1]))  # noqa: E731
    with pytest.raises(ERR):
        mx.grad(lambda x: bad(x).sum())(X)
    with pytest.raises(ERR):
        mx.compile(bad)(X)
    with pytest.raises(ERR):
        mx.vmap(lambda x: fl.cross_entropy(x, T, label_smoothing=2.0))(
            mx.zeros((2, 4, 5)))


@pytest.mark.parametrize("mod,kw,args", [
    ("CrossEntropyLoss", dict(reduction="bogus"), (X, T)),
    ("CrossEntropyLoss", dict(label_smoothing=1.0), (X, T)),
    ("SmoothL1Loss", dict(beta=-1.0), (P, Q)),
    ("HuberLoss", dict(delta=-1.0), (P, Q)),
    ("SigmoidFocalLoss", dict(gamma=-2.0), (P, Q)),
    ("SoftmaxFocalLoss", dict(alpha=mx.ones((3,))), (X, T)),
])
def test_bad_module_options(fl, mod, kw, args):
    """Either the constructor or the call rejects the option."""
    with pytest.raises(ERR) as ei:
        m = getattr(fl.nn, mod)(**kw)
        m(*args)
    key = next(iter(kw))
    assert key in str(ei.value).lower() or key.replace("_", " ") in str(ei.value).lower()


def test_edge_values_are_accepted(fl):
    """Boundary values that are valid must not raise."""
    mx.eval(fl.cross_entropy(X, T, label_smoothing=0.0),
            fl.cross_entropy(X, T, label_smoothing=0.999),
            fl.cross_entropy(X, T, axis=-2 + 1),
            fl.cross_entropy(X.T, T, axis=-2),
            fl.cross_entropy(X, T, z_loss=0.0, class_weights=mx.ones((5,))),
            fl.smooth_l1_loss(P, Q, beta=0.0),
            fl.huber_loss(P, Q, delta=1e-30),
            fl.sigmoid_focal_loss(P, Q, gamma=0.0, alpha=-1.0),
            fl.softmax_focal_loss(X, T, gamma=0.0, alpha=0.5),
            fl.softmax_focal_loss(X.T, T, axis=0))


def test_nothing_evaluated_on_error(fl):
    """The error is raised eagerly even inside a lazily built graph."""
    y = mx.exp(X)  # not evaluated
    with pytest.raises(ERR):
        fl.cross_entropy(y, T, reduction="bogus")


# --------------------------------------------------------------------------
# the compiled extension
# --------------------------------------------------------------------------
def test_ext_accepts_mx_arrays(fl):
    ext = fl._ext
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(3, 7)).astype(np.float32))
    t = mx.array(np.array([0, 6, 3], np.int32))
    out = ext.cross_entropy(x, t)
    assert isinstance(out, mx.array)
    np.testing.assert_allclose(to_np(out).reshape(-1),
                               R.cross_entropy(to_np(x), to_np(t)), rtol=1e-5)
    p = mx.array(rng.normal(size=(2, 3)).astype(np.float32))
    q = mx.array(rng.normal(size=(2, 3)).astype(np.float32))
    for name in ("smooth_l1_loss", "huber_loss", "sigmoid_focal_loss"):
        out = getattr(ext, name)(p, mx.sigmoid(q) if "focal" in name else q)
        assert isinstance(out, mx.array), name
        assert np.all(np.isfinite(to_np(out))), name
    out = ext.softmax_focal_loss(x, t)
    assert isinstance(out, mx.array)
    with pytest.raises(TypeError):
        ext.cross_entropy(np.zeros((3, 7), np.float32).tolist(), "nope")


def _editable_install(fl):
    pkg_dir = os.path.dirname(os.path.abspath(fl.__file__))
    site_dirs = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    in_site = any(os.path.realpath(pkg_dir).startswith(d) for d in site_dirs)
    return not in_site


def test_ext_is_installed_not_build_dir(fl):
    if _editable_install(fl):
        pytest.skip("running from an editable/source install")
    ext_file = os.path.realpath(fl._ext.__file__)
    site_dirs = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")]
    assert any(ext_file.startswith(d + os.sep) for d in site_dirs), ext_file
    assert "site-packages" in ext_file or "dist-packages" in ext_file, ext_file
    parts = ext_file.split(os.sep)
    assert "build" not in parts and "_skbuild" not in parts, ext_file
    pkg_dir = os.path.realpath(os.path.dirname(fl.__file__))
    assert os.path.dirname(ext_file) == pkg_dir, (ext_file, pkg_dir)


# --------------------------------------------------------------------------
# PyTorch habits and bad arguments (issue 18, items 7-9). Each case below was
# accepted, truncated, or answered with another library's message before.
# --------------------------------------------------------------------------
H8 = mx.zeros((4, 8))
W8 = mx.zeros((5, 8))
T5 = mx.array([0, 1, 2, 4])

# (module class, constructor options, the function those options belong to,
# the arguments to call it with, the name the message must say)
OPTION_CASES = [
    ("CrossEntropyLoss", dict(reduction="avg"), "cross_entropy", (X, T), "reduction"),
    ("CrossEntropyLoss", dict(label_smoothing=1.5), "cross_entropy", (X, T), "label_smoothing"),
    ("CrossEntropyLoss", dict(label_smoothing_mode="ohters"), "cross_entropy", (X, T),
     "label_smoothing_mode"),
    ("CrossEntropyLoss", dict(z_loss=-1.0), "cross_entropy", (X, T), "z_loss"),
    ("CrossEntropyLoss", dict(z_loss=float("inf")), "cross_entropy", (X, T), "z_loss"),
    ("CrossEntropyLoss", dict(ignore_index=1.0), "cross_entropy", (X, T), "ignore_index"),
    ("CrossEntropyLoss", dict(ignore_index="a"), "cross_entropy", (X, T), "ignore_index"),
    ("CrossEntropyLoss", dict(ignore_index=2**64), "cross_entropy", (X, T), "ignore_index"),
    ("CrossEntropyLoss", dict(class_weights=mx.array([1.0, float("nan"), 1.0, 1.0, 1.0])),
     "cross_entropy", (X, T), "class_weights"),
    ("CrossEntropyLoss", dict(class_weights=mx.ones((5,), mx.int32)), "cross_entropy", (X, T),
     "class_weights"),
    ("CrossEntropyLoss", dict(dtype=mx.int32), "cross_entropy", (X, T), "dtype"),
    ("CrossEntropyLoss", dict(weight=mx.ones((5,))), "cross_entropy", (X, T), "class_weights"),
    ("SmoothL1Loss", dict(beta=-1.0), "smooth_l1_loss", (P, Q), "beta"),
    ("SmoothL1Loss", dict(beta="1"), "smooth_l1_loss", (P, Q), "beta"),
    ("SmoothL1Loss", dict(reduction="avg"), "smooth_l1_loss", (P, Q), "reduction"),
    ("HuberLoss", dict(delta=-1.0), "huber_loss", (P, Q), "delta"),
    ("HuberLoss", dict(delta=0.0), "huber_loss", (P, Q), "delta"),
    ("HuberLoss", dict(delta=1e-50), "huber_loss", (P, Q), "delta"),
    ("SigmoidFocalLoss", dict(gamma=-1.0), "sigmoid_focal_loss", (P, Q), "gamma"),
    ("SigmoidFocalLoss", dict(alpha=1.5), "sigmoid_focal_loss", (P, Q), "alpha"),
    ("SigmoidFocalLoss", dict(reduction="avg"), "sigmoid_focal_loss", (P, Q), "reduction"),
    ("SoftmaxFocalLoss", dict(gamma=-1.0), "softmax_focal_loss", (X, T), "gamma"),
    ("SoftmaxFocalLoss", dict(alpha=-0.5), "softmax_focal_loss", (X, T), "alpha"),
    ("SoftmaxFocalLoss", dict(reduction="avg"), "softmax_focal_loss", (X, T), "reduction"),
    ("SoftmaxFocalLoss", dict(ignore_index=1.0), "softmax_focal_loss", (X, T), "ignore_index"),
    ("LinearCrossEntropyLoss", dict(reduction="avg"), "linear_cross_entropy", (H8, W8, T5),
     "reduction"),
    ("LinearCrossEntropyLoss", dict(label_smoothing=1.5), "linear_cross_entropy", (H8, W8, T5),
     "label_smoothing"),
    ("LinearCrossEntropyLoss", dict(z_loss=-1.0), "linear_cross_entropy", (H8, W8, T5), "z_loss"),
    ("LinearCrossEntropyLoss", dict(logit_softcap=0.0), "linear_cross_entropy", (H8, W8, T5),
     "logit_softcap"),
    ("LinearCrossEntropyLoss", dict(logit_softcap=1e-50), "linear_cross_entropy",
     (H8, W8, T5), "logit_softcap"),
    ("LinearCrossEntropyLoss", dict(chunk_bytes=0), "linear_cross_entropy", (H8, W8, T5),
     "chunk_bytes"),
    ("LinearCrossEntropyLoss", dict(chunk_bytes=2**70), "linear_cross_entropy", (H8, W8, T5),
     "chunk_bytes"),
    ("LinearCrossEntropyLoss", dict(chunk_bytes=1e6), "linear_cross_entropy", (H8, W8, T5),
     "chunk_bytes"),
    ("LinearCrossEntropyLoss", dict(ignore_index="a"), "linear_cross_entropy", (H8, W8, T5),
     "ignore_index"),
    ("LinearCrossEntropyLoss", dict(dtype="float32"), "linear_cross_entropy", (H8, W8, T5),
     "dtype"),
]


@pytest.mark.parametrize("case", OPTION_CASES,
                         ids=[f"{c[0]}-{next(iter(c[1]))}={c[1][next(iter(c[1]))]!r}"[:60]
                              for c in OPTION_CASES])
def test_module_constructor_validates_like_the_function(fl, case):
    """The constructor rejects what the function rejects, with the same
    message (one check per argument, shared): before, ``reduction="avg"``,
    ``label_smoothing=1.5``, ``gamma=-1``, ``delta=-1`` and the rest were
    accepted and failed only at the first call."""
    mod, options, fn, args, name = case
    from_module = assert_raises_naming(ERR, name, getattr(fl.nn, mod), **options)
    from_function = assert_raises_naming(ERR, name, getattr(fl, fn), *args, **options)
    assert type(from_module) is type(from_function)
    assert str(from_module) == str(from_function)
    assert "incompatible function arguments" not in str(from_function)


@pytest.mark.parametrize("mod,options", [
    ("CrossEntropyLoss", dict(label_smoothing=0.999, z_loss=0.0, class_weights=mx.zeros((5,)))),
    ("SmoothL1Loss", dict(beta=0.0)),
    ("HuberLoss", dict(delta=1e-30)),
    ("SigmoidFocalLoss", dict(alpha=-1.0, gamma=0.0)),
    ("SoftmaxFocalLoss", dict(alpha=0.0, gamma=0.0, ignore_index=np.int64(3))),
    ("LinearCrossEntropyLoss", dict(logit_softcap=30, chunk_bytes=np.int32(4096),
                                    dtype=mx.float32)),
])
def test_module_constructor_accepts_edge_values(fl, mod, options):
    getattr(fl.nn, mod)(**options)


def test_huber_delta_must_be_positive(fl):
    """delta = 0 made the loss and its gradient 0 everywhere: nothing trained
    (PyTorch rejects delta <= 0). smooth_l1's beta = 0 stays plain L1."""
    for delta in (0.0, -0.0, 1e-50):
        assert_raises_naming(ValueError, "delta", fl.huber_loss, P, Q, delta=delta)
        assert_raises_naming(ValueError, "delta", fl.nn.HuberLoss, delta=delta)
    # 1e-50 is > 0 but float32 (the kernels') rounds it to 0: said as such
    err = assert_raises_naming(ValueError, "delta", fl.huber_loss, P, Q, delta=1e-50)
    assert "1e-50" in str(err) and "got 0" not in str(err)
    mx.eval(fl.smooth_l1_loss(P, Q, beta=0.0), fl.huber_loss(P, Q, delta=1e-30))


@pytest.mark.parametrize("value", [1e39, -1e39, 10**400])
def test_number_beyond_float32_is_a_value_error(fl, value):
    """A finite option that float32 turns into inf is said as such (an int
    beyond float64 raised OverflowError from float())."""
    err = assert_raises_naming(ValueError, "z_loss", fl.cross_entropy, X, T, z_loss=value)
    assert "float32" in str(err)


def test_tiny_logit_softcap_is_not_reported_as_zero(fl):
    err = assert_raises_naming(ValueError, "logit_softcap", fl.linear_cross_entropy,
                               H8, W8, T5, logit_softcap=1e-50)
    assert "1e-50" in str(err) and "got 0" not in str(err)


@pytest.mark.parametrize("kw,name", [
    (dict(bits=4.7), "bits"), (dict(group_size="32"), "group_size"),
    (dict(group_size=64.0), "group_size"), (dict(bits=True), "bits"),
])
def test_quantization_ints_are_not_truncated(fl, kw, name):
    w_q, scales, biases = mx.quantize(mx.zeros((5, 64)), group_size=64, bits=4)
    err = assert_raises_naming(TypeError, name, fl.linear_cross_entropy, mx.zeros((4, 64)),
                               w_q, T5, scales=scales, biases=biases, **kw)
    assert "incompatible function arguments" not in str(err)


def test_unsupported_bit_width_names_the_formats(fl):
    """Every affine width of mx.quantize is read (1-6 and 8 bits); 7 is none."""
    w_q, scales, biases = mx.quantize(mx.zeros((5, 64)), group_size=64, bits=8)
    err = assert_raises_naming(ValueError, "bits", fl.linear_cross_entropy, mx.zeros((4, 64)),
                               w_q, T5, scales=scales, biases=biases, bits=7)
    msg = str(err)
    assert "bits=7" in msg and "1, 2, 3, 4, 5, 6 or 8" in msg


def test_packed_weight_without_scales_says_what_to_pass(fl):
    w_q, _, _ = mx.quantize(mx.zeros((5, 64)), group_size=64, bits=4)
    err = assert_raises_naming(TypeError, "weight", fl.linear_cross_entropy, mx.zeros((4, 64)),
                               w_q, T5)
    assert "scales=" in str(err) and "biases=" in str(err) and "mx.quantize" in str(err)


@pytest.mark.parametrize("fn,args", [
    ("cross_entropy", (X, T.reshape(4, 1))),
    ("cross_entropy", (X, T.reshape(4, 1).astype(mx.int64))),
    ("cross_entropy", (mx.zeros((4, 1)), mx.zeros((4, 1), mx.int32))),
    ("softmax_focal_loss", (X, T.reshape(4, 1))),
    ("linear_cross_entropy", (H8, W8, T5.reshape(4, 1))),
], ids=["ce", "ce-int64", "ce-one-class", "softmax-focal", "linear-ce"])
def test_column_of_labels_says_squeeze(fl, fn, args):
    """[N, 1] integer labels (a PyTorch/Keras habit) are named as such."""
    err = assert_raises_naming(ERR, "targets", getattr(fl, fn), *args)
    assert "squeeze" in str(err)


def test_pytorch_weight_keyword_points_to_class_weights(fl):
    for call in (lambda: fl.cross_entropy(X, T, weight=mx.ones((5,))),
                 lambda: fl.nn.CrossEntropyLoss(weight=mx.ones((5,)))):
        with pytest.raises(TypeError, match="class_weights="):
            call()


@pytest.mark.parametrize("fn,args", [
    ("cross_entropy", (X, T)), ("softmax_focal_loss", (X, T)),
    ("linear_cross_entropy", (H8, W8, T5)),
])
@pytest.mark.parametrize("value", [1.0, "a", 2**63, True])
def test_ignore_index_must_be_an_int64(fl, fn, args, value):
    err = assert_raises_naming(ERR, "ignore_index", getattr(fl, fn), *args, ignore_index=value)
    assert "incompatible function arguments" not in str(err)


def test_nan_class_weights_are_rejected(fl):
    """NaN is a ValueError; negative weights are PyTorch's and taken
    (tests/test_negative_class_weights.py)."""
    nan = mx.array([1.0, float("nan"), 1.0, 1.0, 1.0])
    assert_raises_naming(ValueError, "class_weights", fl.cross_entropy, X, T, class_weights=nan)
    assert_raises_naming(ValueError, "class_weights", fl.nn.CrossEntropyLoss, class_weights=nan)
    assert_raises_naming(ValueError, "class_weights", fl.linear_cross_entropy, H8, W8, T5,
                         class_weights=nan)
