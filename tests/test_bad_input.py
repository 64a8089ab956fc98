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
            fl.huber_loss(P, Q, delta=0.0),
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
