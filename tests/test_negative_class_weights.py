"""Class weights < 0, as PyTorch takes them: cross_entropy and
linear_cross_entropy (2-D and K-dimensional heads) against float64, every
reduction, with label smoothing, z-loss, ignored rows and probability
targets; the weighted mean divides by the kept rows' summed weights whatever
their sign. Kept weights that cancel to 0: PyTorch 2.13's value (checked
with torch: F.cross_entropy(x, [0, 2], weight=[1, -1, -1]) is -inf with and
without label smoothing); kept rows whose weights are all 0 stay the mean
over nothing (0)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import assert_close, to_np

import mlx_fused_losses as fl

REDUCTIONS = ("mean", "sum", "none")
W_NEG = np.array([1.5, -0.7, 0.4, -2.0, 0.9, 1.1], np.float32)  # sum > 0, targets mixed


def _cot(reduction, shape):
    """A non-uniform cotangent for "none" (None otherwise)."""
    return None if reduction != "none" else np.arange(1, math.prod(shape) + 1,
                                                      dtype=np.float64).reshape(shape)


def _loss_and_grad(f, x, cot):
    def scalar(a):
        out = f(a)
        return out if cot is None else (out * mx.array(cot.astype(np.float32))).sum()
    return f(x), mx.grad(scalar)(x)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_cross_entropy(reduction, ls, z_loss):
    rng = np.random.default_rng(int(ls * 10) + int(z_loss * 100) + len(reduction))
    x = rng.standard_normal((13, 6)).astype(np.float32) * 2
    t = rng.integers(0, 6, 13)
    t[[2, 7]] = -100
    opts = dict(reduction=reduction, label_smoothing=ls, z_loss=z_loss, ignore_index=-100)
    cot = _cot(reduction, (13,))
    loss, g = _loss_and_grad(lambda a: fl.cross_entropy(
        a, mx.array(t), class_weights=mx.array(W_NEG), **opts), mx.array(x), cot)
    want = R.cross_entropy(x, t, class_weights=W_NEG, **opts)
    gwant = R.cross_entropy_grad(x, t, class_weights=W_NEG, cotangent=cot, **opts)
    assert_close(loss, want, mx.float32, scale=np.abs(want) + 10, what="loss")
    assert_close(g, gwant, mx.float32, scale=np.abs(gwant).max() + 1, what="gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probabilities(reduction):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    q = rng.random((9, 6)).astype(np.float32)
    q /= q.sum(-1, keepdims=True)
    cot = _cot(reduction, (9,))
    loss, g = _loss_and_grad(lambda a: fl.cross_entropy(
        a, mx.array(q), class_weights=mx.array(W_NEG), reduction=reduction,
        label_smoothing=0.1), mx.array(x), cot)
    opts = dict(class_weights=W_NEG, reduction=reduction, label_smoothing=0.1)
    want, gwant = R.cross_entropy(x, q, **opts), R.cross_entropy_grad(x, q, cotangent=cot, **opts)
    assert_close(loss, want, mx.float32, scale=np.abs(want) + 10, what="loss")
    assert_close(g, gwant, mx.float32, scale=np.abs(gwant).max() + 1, what="gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_linear_cross_entropy(reduction, ls):
    """The fused kernel's per-token weights w_t (no smoothing) and the
    smoothing terms' linear sums, with negative w."""
    rng = np.random.default_rng(5 + len(reduction))
    h = rng.standard_normal((11, 7)).astype(np.float32)
    W = rng.standard_normal((6, 7)).astype(np.float32) * 0.7
    b = rng.standard_normal(6).astype(np.float32)
    t = rng.integers(0, 6, 11)
    t[4] = -100
    cot = _cot(reduction, (11,))
    opts = dict(reduction=reduction, label_smoothing=ls, ignore_index=-100)

    def ours(hh, WW, bb):
        out = fl.linear_cross_entropy(hh, WW, mx.array(t), bb, class_weights=mx.array(W_NEG), **opts)
        return out if cot is None else (out * mx.array(cot.astype(np.float32))).sum()

    args = [mx.array(a) for a in (h, W, b)]
    loss = fl.linear_cross_entropy(*args[:2], mx.array(t), args[2], class_weights=mx.array(W_NEG),
                                   **opts)
    grads = mx.grad(ours, argnums=[0, 1, 2])(*args)
    z = h.astype(np.float64) @ W.T.astype(np.float64) + b
    want = R.cross_entropy(z, t, class_weights=W_NEG, **opts)
    dz = R.cross_entropy_grad(z, t, class_weights=W_NEG, cotangent=cot, **opts)
    assert_close(loss, want, mx.float32, scale=np.abs(want) + 10, what="loss")
    for g, gw, name in zip(grads, (dz @ W, dz.T @ h, dz.sum(0)), ("hidden", "weight", "bias")):
        assert_close(g, gw, mx.float32, scale=np.abs(gw).max() + 1, what=name)


def test_k_dim_head():
    """A K-dimensional head's weighted mean over every position."""
    rng = np.random.default_rng(7)
    h = rng.standard_normal((5, 4)).astype(np.float32)
    W = rng.standard_normal((6, 3, 4)).astype(np.float32)
    t = rng.integers(0, 6, (5, 3))
    loss = fl.linear_cross_entropy(mx.array(h), mx.array(W), mx.array(t),
                                   class_weights=mx.array(W_NEG), label_smoothing=0.1)
    z = np.einsum("nh,cdh->ncd", h.astype(np.float64), W)
    want = R.cross_entropy(z, t, axis=1, class_weights=W_NEG, label_smoothing=0.1,
                           reduction="mean")
    assert_close(loss, want, mx.float32, scale=np.abs(want) + 10, what="loss")


X = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]]


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_weights_adding_up_to_zero(ls):
    """Kept rows' weights 1 and -1: PyTorch's -inf (its losses' sum over 0),
    and a gradient that is not finite; the fused linear head (identity
    weight: the same logits) too."""
    t, w = mx.array([0, 2]), mx.array([1.0, -1.0, -1.0])
    loss, g = mx.value_and_grad(lambda a: fl.cross_entropy(
        a, t, class_weights=w, reduction="mean", label_smoothing=ls))(mx.array(X))
    assert loss.item() == -math.inf
    assert not np.all(np.isfinite(to_np(g)))
    lin = fl.linear_cross_entropy(mx.array(X), mx.eye(3), t, class_weights=w, label_smoothing=ls)
    assert lin.item() == -math.inf
    kdim = fl.linear_cross_entropy(mx.array(X), mx.eye(3)[:, None], t[:, None], class_weights=w,
                                   label_smoothing=ls)
    assert kdim.item() == -math.inf


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_mean_over_nothing_stays_zero(ls):
    """Kept rows whose weights are all 0 are the mean over nothing: 0 with a
    zero gradient (PyTorch: NaN), as every row ignored (tests/test_api_rules.py),
    label smoothing's other classes included; in the linear heads too."""
    t, w = mx.array([0, 0]), mx.array([0.0, 1.0, -1.0])
    for f in (lambda a: fl.cross_entropy(a, t, class_weights=w, label_smoothing=ls,
                                         reduction="mean"),
              lambda a: fl.linear_cross_entropy(a, mx.eye(3), t, class_weights=w,
                                                label_smoothing=ls),
              lambda a: fl.linear_cross_entropy(a, mx.eye(3)[:, None], t[:, None],
                                                class_weights=w, label_smoothing=ls)):
        loss, g = mx.value_and_grad(lambda a: f(a).astype(mx.float32))(mx.array(X))
        assert loss.item() == 0.0 and not np.any(to_np(g))
