"""PyTorch's K-dimensional linear cross-entropy (a head [C, d1, ..., dK, H]):
loss and gradients against float64 (logits [N, C, d1, ...], the class axis 1,
as PyTorch's cross_entropy), every reduction and option, compile, memory and
bad input. (PyTorch's own K-dim cases: tests/test_peer_torch_losses.py.)"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import assert_close, assert_raises_naming, to_np

import mlx_fused_losses as fl


def f64(a):
    return np.asarray(to_np(a), np.float64)


def problem(rng, lead=(6,), C=5, out=(3, 2), H=7, bias=True, soft=False, dtype=mx.float32):
    h = rng.standard_normal(lead + (H,)).astype(np.float32)
    W = (rng.standard_normal((C,) + out + (H,)) * 0.8).astype(np.float32)
    b = rng.standard_normal((C,) + out).astype(np.float32) if bias else None
    if soft:
        t = rng.random(lead + (C,) + out) + 0.05
        t = (t / t.sum(len(lead), keepdims=True)).astype(np.float32)
    else:
        t = rng.integers(0, C, lead + out)
    arrs = [mx.array(h).astype(dtype), mx.array(W).astype(dtype)]
    if bias:
        arrs.append(mx.array(b).astype(dtype))
    return arrs, (mx.array(t).astype(dtype) if soft else mx.array(t))


def want(arrs, t, cotangent=None, **ce):
    """Loss and gradients in float64 on [N..., H] hidden: the logits
    [N..., C, d...] with the class axis after the batch axes."""
    h, W = f64(arrs[0]), f64(arrs[1])
    b = f64(arrs[2]) if len(arrs) > 2 else 0.0
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    Wf = W.reshape(W.shape[0], -1, W.shape[-1])  # [C, D, H]
    z = np.einsum("nh,cdh->ncd", h2, Wf).reshape((h2.shape[0],) + W.shape[:-1]) + b
    soft = np.issubdtype(to_np(t).dtype, np.floating)
    tt = f64(t) if soft else np.asarray(t, np.int64)
    tt = tt.reshape((-1,) + tt.shape[len(lead):])
    ce = dict(ce)
    for key in ("weights",):
        if ce.get(key) is not None:
            ce[key] = f64(ce[key]).reshape((-1,) + ce[key].shape[len(lead):])
    loss = R.cross_entropy(z, tt, axis=1, **ce)
    dz = R.cross_entropy_grad(z, tt, axis=1, cotangent=cotangent, **ce)
    if ce.get("reduction") == "none":
        loss = loss.reshape(lead + loss.shape[1:])
    dzf = dz.reshape(dz.shape[0], W.shape[0], -1)
    grads = [np.einsum("ncd,cdh->nh", dzf, Wf).reshape(h.shape),
             np.einsum("ncd,nh->cdh", dzf, h2).reshape(W.shape)]
    if len(arrs) > 2:
        grads.append(dz.sum(0))
    return loss, grads


def check(arrs, t, tol_dtype=mx.float32, **opts):
    ce = {"reduction": "mean", **{k: v for k, v in opts.items() if k not in ("chunk_bytes", "dtype")}}
    cw = ce.get("class_weights")
    if cw is not None:
        ce["class_weights"] = f64(cw)
    loss_want, grads_want = want(arrs, t, **ce)

    def f(*a):
        return fl.linear_cross_entropy(a[0], a[1], t, a[2] if len(a) > 2 else None, **opts)

    loss = f(*arrs)
    assert loss.dtype == arrs[0].dtype
    assert_close(loss, loss_want, tol_dtype, scale=np.abs(loss_want) + 1, what="loss")
    cot = (lambda x: (x * mx.arange(1, x.size + 1, dtype=mx.float32).reshape(x.shape)).sum()) \
        if opts.get("reduction") == "none" else (lambda x: x)
    grads = mx.grad(lambda *a: cot(f(*a)), argnums=list(range(len(arrs))))(*arrs)
    if opts.get("reduction") == "none":  # the non-uniform cotangent, in float64
        c = np.arange(1, loss.size + 1, dtype=np.float64).reshape(loss.shape)
        _, grads_want = want(arrs, t, cotangent=c.reshape((-1,) + c.shape[len(arrs[0].shape) - 1:]),
                             **ce)
    for k, (g, gw) in enumerate(zip(grads, grads_want)):
        assert g.shape == arrs[k].shape
        assert g.dtype == arrs[k].dtype
        assert_close(g, gw, tol_dtype, scale=np.abs(gw).max() + 1, what=f"gradient {k}")


REDUCTIONS = ("mean", "sum", "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("out", [(3,), (3, 2), (1, 4, 2)], ids=str)
def test_class_indices(reduction, out):
    rng = np.random.default_rng(len(out) * 7 + len(reduction))
    arrs, t = problem(rng, out=out)
    check(arrs, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(reduction):
    """ignore_index, label smoothing, class weights (PyTorch's weighted mean
    over every kept (n, d)), per-token weights, without bias."""
    rng = np.random.default_rng(3)
    arrs, t = problem(rng, lead=(9,), bias=False)
    t = mx.where(mx.array(rng.random(t.shape) < 0.3), -100, t)
    cw = mx.array(rng.uniform(0.2, 3.0, 5).astype(np.float32))
    check(arrs, t, reduction=reduction, ignore_index=-100)
    check(arrs, t, reduction=reduction, ignore_index=-100, label_smoothing=0.2)
    check(arrs, t, reduction=reduction, ignore_index=-100, class_weights=cw)
    check(arrs, t, reduction=reduction, ignore_index=-100, class_weights=cw, label_smoothing=0.1)
    w = mx.array(rng.uniform(0.0, 2.0, t.shape).astype(np.float32))
    check(arrs, t, reduction=reduction, ignore_index=-100, weights=w, z_loss=0.01)
    check(arrs, t, reduction=reduction, ignore_index=-100, logit_softcap=3.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probabilities(reduction):
    """[N, C, d1, ...] targets (the class axis before the positions)."""
    rng = np.random.default_rng(5)
    arrs, t = problem(rng, soft=True)
    check(arrs, t, reduction=reduction)
    cw = mx.array(rng.uniform(0.2, 3.0, 5).astype(np.float32))
    check(arrs, t, reduction=reduction, class_weights=cw, label_smoothing=0.1)


def test_mask_and_leading_axes():
    """hidden [B, T, H] with targets [B, T, d...]; a mask is ignore_index."""
    rng = np.random.default_rng(7)
    arrs, t = problem(rng, lead=(2, 5), out=(2, 3))
    mask = mx.array(rng.random(t.shape) < 0.7)
    got = fl.linear_cross_entropy(*arrs[:2], t, arrs[2], mask=mask)
    check(arrs, mx.where(mask, t, -1), ignore_index=-1)
    ref = fl.linear_cross_entropy(*arrs[:2], mx.where(mask, t, -1), arrs[2], ignore_index=-1)
    assert got.item() == ref.item()


def test_every_row_ignored_is_zero():
    rng = np.random.default_rng(8)
    arrs, t = problem(rng)
    t = mx.full(t.shape, -100)
    loss, g = mx.value_and_grad(lambda h: fl.linear_cross_entropy(
        h, arrs[1], t, arrs[2], ignore_index=-100))(arrs[0])
    assert loss.item() == 0.0 and not np.any(to_np(g))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_16_bit(dtype):
    """Computed in float32, rounded once: the tolerance of the dtype (the
    sum of 16-bit per-position gradients missed it)."""
    rng = np.random.default_rng(9)
    arrs, t = problem(rng, dtype=dtype, out=(4, 6))
    check(arrs, t, tol_dtype=dtype)
    check(arrs, t, tol_dtype=dtype, reduction="none", class_weights=mx.array(
        rng.uniform(0.2, 3.0, 5).astype(np.float32)), label_smoothing=0.1)
    arrs, t = problem(rng, dtype=dtype, out=(4, 6), soft=True)
    check(arrs, t, tol_dtype=dtype, reduction="sum")


def test_stats_are_each_positions():
    rng = np.random.default_rng(10)
    arrs, t = problem(rng)
    _, stats = fl.linear_cross_entropy(*arrs[:2], t, arrs[2], return_stats=True)
    W, b = arrs[1], arrs[2]
    for i in range(3):
        for j in range(2):
            _, s = fl.linear_cross_entropy(arrs[0], W[:, i, j], t[:, i, j], b[:, i, j],
                                           return_stats=True)
            for k in ("lse", "entropy", "correct", "argmax"):
                assert stats[k].shape == t.shape
                assert np.array_equal(to_np(stats[k])[:, i, j], to_np(s[k])), k


def test_chunks_and_the_2d_call_agree():
    """A one-position head [C, 1, H] is the 2-D head; small chunks change
    nothing."""
    rng = np.random.default_rng(11)
    arrs, t = problem(rng, out=(1,), lead=(40,))
    flat = fl.linear_cross_entropy(arrs[0], arrs[1][:, 0], t[:, 0], arrs[2][:, 0])
    kdim = fl.linear_cross_entropy(arrs[0], arrs[1], t, arrs[2])
    small = fl.linear_cross_entropy(arrs[0], arrs[1], t, arrs[2], chunk_bytes=64)
    assert flat.item() == kdim.item()
    np.testing.assert_allclose(small.item(), kdim.item(), rtol=1e-6)


def test_compile():
    """Same call twice, and again at new values; a shapeless compile raises
    MLX's ValueError (a slice cannot infer its shape), never a wrong value."""
    rng = np.random.default_rng(12)
    arrs, t = problem(rng, lead=(6,))

    def loss_and_grads(h, W, b, tt):
        return mx.value_and_grad(lambda h, W, b: fl.linear_cross_entropy(
            h, W, tt, b, ignore_index=-100, label_smoothing=0.1), argnums=[0, 1, 2])(h, W, b)

    compiled = mx.compile(loss_and_grads)
    arrs2, t2 = problem(np.random.default_rng(13), lead=(6,))
    t2 = mx.where(mx.array(rng.random(t2.shape) < 0.3), -100, t2)
    for a, tt in ((arrs, t), (arrs, t), (arrs2, t2)):
        got, eager = compiled(*a, tt), loss_and_grads(*a, tt)
        assert np.allclose(to_np(got[0]), to_np(eager[0]), rtol=1e-6)
        for g, e in zip(got[1], eager[1]):
            assert np.allclose(to_np(g), to_np(e), rtol=1e-5, atol=1e-7)
    shapeless = mx.compile(loss_and_grads, shapeless=True)
    with pytest.raises(ValueError, match="cannot infer output shapes"):
        mx.eval(shapeless(*arrs, t))


def test_no_logits_of_every_position():
    """Peak memory stays far below the [N, C, D] float32 logits (a chunk of
    one position's logits at a time)."""
    rng = np.random.default_rng(14)
    N, C, D, H = 512, 2048, 16, 32
    h = mx.array(rng.standard_normal((N, H)).astype(np.float32))
    W = mx.array((rng.standard_normal((C, D, H)) * 0.1).astype(np.float32))
    t = mx.array(rng.integers(0, C, (N, D)))
    mx.eval(h, W, t)
    logits_bytes = N * C * D * 4  # 64 MiB
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, grads = mx.value_and_grad(lambda h, W: fl.linear_cross_entropy(
        h, W, t, chunk_bytes=1 << 20), argnums=[0, 1])(h, W)
    mx.eval(loss, grads)
    extra = mx.get_peak_memory() - base
    assert extra < logits_bytes / 4, (extra, logits_bytes)


def test_bad_input():
    rng = np.random.default_rng(15)
    (h, W, b), t = problem(rng)
    lce = fl.linear_cross_entropy
    assert_raises_naming(ValueError, "targets", lce, h, W, t[:, :, :1], b)
    assert_raises_naming(ValueError, "targets", lce, h, W, t.astype(mx.float32), b)
    assert_raises_naming(ValueError, "bias", lce, h, W, t, b[:, 0])
    assert_raises_naming(ValueError, "hidden", lce, h[:, :3], W, t, b)
    assert_raises_naming(ValueError, "mask", lce, h, W, t, b, mask=mx.ones(t.shape[:2], mx.bool_))
    assert_raises_naming(ValueError, "weights", lce, h, W, t, b, weights=mx.ones((6,)))
    assert_raises_naming(ValueError, "shift", lce, h, W, t, b, shift=1)
    assert_raises_naming(ValueError, "scales", lce, h, W, t, b, scales=mx.ones((5, 1)))
    assert_raises_naming(ValueError, "vocab_start", lce, h, W, t, b, vocab_start=0)
    assert_raises_naming(ValueError, "z_loss", lce, h, W, t, b, z_loss=0.1,
                         class_weights=mx.ones((5,)))
    assert_raises_naming(ValueError, "class_weights", lce, h, W, t, b, class_weights=mx.ones((4,)))
