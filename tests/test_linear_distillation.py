"""linear_distillation_loss: both heads' logits one chunk at a time, against
the float64 divergence of the materialised logits (tests/reference.py) and
against kl_div / jsd on those logits; quantized teachers and students, the
teacher's zero gradient, transforms and bad input. A loss reduced to a scalar
forms its gradients in the forward (ops/student_head_grads.h): checked against
float64, against the recomputing backward, and that it is the path taken."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference as R
from conftest import assert_close, assert_raises_naming, to_np
from mlx_fused_losses import _ext

mx.set_default_device(mx.cpu)

KINDS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
KIND_IDS = ["kl", "rkl", "jsd0", "jsd.3", "jsd1"]


def _heads(rng, N, Hs, Ht, V, dtype=mx.float32, scale=0.4):
    def arr(shape, s=1.0):
        return mx.array((rng.standard_normal(shape) * s).astype(np.float32)).astype(dtype)
    return arr((N, Hs)), arr((V, Hs), scale), arr((N, Ht)), arr((V, Ht), scale)


def _materialised(hs, ws, ht, wt):
    return (to_np(hs) @ to_np(ws).T, to_np(ht) @ to_np(wt).T)


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("chunk_bytes", [None, 3000])
@pytest.mark.parametrize("rows", ["weighted", "mean", "sum"])
def test_values_and_grads_vs_float64(fl, rng, kind, beta, chunk_bytes, rows):
    # H differs per head; chunks of a few rows (3000 bytes: 1 row of both heads'
    # logits) and the default (one chunk); ignored rows, the CE mix. Per-row
    # weights: the recomputing backward (a cotangent per row); "mean" / "sum"
    # without weights: the gradients formed in the forward.
    N, Hs, Ht, V = 13, 24, 40, 257
    hs, ws, ht, wt = _heads(rng, N, Hs, Ht, V)
    y = rng.integers(0, V, N)
    y[[2, 7]] = -100
    targets = mx.array(y.astype(np.int32))
    w64 = rng.uniform(0.5, 1.5, N) if rows == "weighted" else np.ones(N)
    weights = mx.array(w64.astype(np.float32)) if rows == "weighted" else None
    kw = dict(kind=kind, beta=beta, temperature=1.6, alpha=0.3, scale_by_temperature_squared=True,
              ignore_index=-100, weights=weights, chunk_bytes=chunk_bytes,
              reduction="sum" if rows == "sum" else "mean")

    def f(a, b, c, d):
        return fl.linear_distillation_loss(a, b, c, d, targets, dtype=mx.float32, **kw)

    (loss, grads) = mx.value_and_grad(f, argnums=(0, 1, 2, 3))(hs, ws, ht, wt)
    s64, t64 = _materialised(hs, ws, ht, wt)
    rkw = dict(kind=kind, beta=beta, temperature=1.6, alpha=0.3, t2=True, targets=y, ignore_index=-100)
    row_loss = R.distill_rows(s64, t64, **rkw)
    kept = (y != -100).sum() if rows != "sum" else 1
    assert_close(loss, (row_loss * w64).sum() / kept, mx.float32, scale=10.0, what="loss")
    dz = R.distill_grad(s64, t64, cotangent=w64 / kept, **rkw)
    g_h, g_w = dz @ to_np(ws), dz.T @ to_np(hs)
    scale_h = np.abs(dz).sum(-1, keepdims=True) * np.abs(to_np(ws)).max() * 4
    assert_close(grads[0], g_h, mx.float32, scale=scale_h, what="d student_hidden")
    assert_close(grads[1], g_w, mx.float32, scale=np.abs(dz).sum(0)[:, None] * np.abs(to_np(hs)).max() * 4,
                 what="d student_weight")
    assert not np.any(to_np(grads[2])) and not np.any(to_np(grads[3]))  # the teacher is frozen


def _graph_primitives(*outputs):
    """The names of the primitives in the graph of `outputs` (not evaluated)."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.dot")
        mx.export_to_dot(path, *outputs)
        return open(path).read()


@pytest.mark.parametrize("topk", [False, True], ids=["two_heads", "topk"])
def test_gradients_formed_in_the_forward(fl, rng, topk):
    # A mean under value_and_grad: no backward primitive in the graph (each
    # chunk's logits computed once), the forward's unit-cotangent gradients
    # scaled by the cotangent. Per-row weights: the recomputing backward.
    hs, ws, ht, wt = _heads(rng, 5, 8, 6, 30)
    ids = mx.array(rng.integers(0, 30, (5, 4)).astype(np.int32))
    lp = mx.array(rng.normal(size=(5, 4)).astype(np.float32) - 3.0)

    def loss(a, b, weights=None):
        if topk:
            return fl.linear_topk_distillation_loss(a, b, ids, lp, weights=weights)
        return fl.linear_distillation_loss(a, b, ht, wt, kind="jsd", weights=weights)

    vjp_name = "FusedLinearTopkDistillVJP" if topk else "FusedLinearDistillVJP"
    _, fused = mx.value_and_grad(loss, (0, 1))(hs, ws)
    graph = _graph_primitives(*fused)
    assert vjp_name not in graph and "ScaleGrad" in graph, graph
    _, rows = mx.value_and_grad(lambda a, b: loss(a, b, mx.ones((5,))), (0, 1))(hs, ws)
    assert vjp_name in _graph_primitives(*rows)
    for a, b in zip(fused, rows):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,beta", KINDS, ids=KIND_IDS)
def test_fused_and_recomputing_backward_agree(rng, kind, beta):
    # The same summed loss, its gradients formed in the forward (scaled by a
    # cotangent of 0.7) and by the backward primitive that recomputes both
    # heads' logits; bf16 student hidden, several chunks, ignored rows, the CE.
    N, Hs, Ht, V = 17, 24, 40, 300
    hs, ws, ht, wt = _heads(rng, N, Hs, Ht, V)
    hs = hs.astype(mx.bfloat16)
    y = rng.integers(0, V, N)
    y[[1, 9]] = -100
    opts = dict(kind=kind, beta=beta, temperature=0.7, alpha=0.25, ignore_index=-100,
                chunk_bytes=5000, sum_rows=True)

    def grads(fuse):
        def f(a, b):
            return 0.7 * _ext.linear_distill_loss(a, b, ht, wt, mx.array(y), fuse_grads=fuse, **opts)
        return mx.value_and_grad(f, (0, 1))(hs, ws)

    (l1, g1), (l2, g2) = grads(True), grads(False)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-6)
    assert g1[0].dtype == mx.bfloat16 and g1[1].dtype == mx.float32
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-7)
    # every declared gradient asked alone (the other never formed)
    for i in (0, 1):
        alone = mx.grad(lambda a, b: _ext.linear_distill_loss(a, b, ht, wt, mx.array(y), **opts),
                        argnums=i)(hs, ws)
        np.testing.assert_allclose(to_np(0.7 * alone.astype(mx.float32)),
                                   to_np(g2[i].astype(mx.float32)), rtol=1e-2 if i == 0 else 1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("kind,beta", KINDS[:3], ids=KIND_IDS[:3])
def test_equals_the_logits_form(fl, rng, kind, beta):
    # per-row values and per-row cotangents (reduction "none"), bf16 operands
    N, Hs, Ht, V = 9, 32, 16, 100
    hs, ws, ht, wt = _heads(rng, N, Hs, Ht, V, dtype=mx.bfloat16)
    kw = dict(temperature=0.8)
    cot = mx.array(rng.uniform(-1, 2, N).astype(np.float32))

    def fused(a, b):
        return (fl.linear_distillation_loss(a, b, ht, wt, kind=kind, beta=beta, reduction="none",
                                            chunk_bytes=2000, dtype=mx.float32, **kw) * cot).sum()

    def logits_form(a, b):
        s = (a.astype(mx.float32) @ b.astype(mx.float32).T)
        t = (ht.astype(mx.float32) @ wt.astype(mx.float32).T)
        if kind == "jsd":
            rows = fl.jsd(s, t, beta=beta, reduction="none", **kw)
        else:
            rows = fl.kl_div(s, t, direction="forward" if kind == "kl" else "reverse",
                             reduction="none", **kw)
        return (rows * cot).sum()

    l1, (g1h, g1w) = mx.value_and_grad(fused, (0, 1))(hs, ws)
    l2, (g2h, g2w) = mx.value_and_grad(logits_form, (0, 1))(hs, ws)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5, atol=1e-6)
    assert g1h.dtype == mx.bfloat16 and g1w.dtype == mx.bfloat16
    np.testing.assert_allclose(to_np(g1h), to_np(g2h.astype(mx.bfloat16)), rtol=2e-2, atol=1e-3)
    np.testing.assert_allclose(to_np(g1w), to_np(g2w.astype(mx.bfloat16)), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 32), ("affine", 3, 64), ("mxfp4", 4, 32)])
def test_quantized_teacher_and_student(fl, rng, mode, bits, group):
    N, Hs, Ht, V = 11, 64, 128, 150
    hs, ws, ht, wt = _heads(rng, N, Hs, Ht, V)
    q = mx.quantize(wt, group_size=group, bits=bits, mode=mode)
    wq, scales = q[0], q[1]
    biases = q[2] if mode == "affine" else None
    w_deq = mx.dequantize(wq, scales, biases, group_size=group, bits=bits, mode=mode)
    tkw = dict(teacher_scales=scales, teacher_biases=biases, teacher_group_size=group,
               teacher_bits=bits, teacher_mode=mode)

    def fused(a, b):
        return fl.linear_distillation_loss(a, b, ht, wq, kind="jsd", chunk_bytes=5000, **tkw)

    def dense(a, b):
        return fl.linear_distillation_loss(a, b, ht, w_deq, kind="jsd", chunk_bytes=5000)

    l1, g1 = mx.value_and_grad(fused, (0, 1))(hs, ws)
    l2, g2 = mx.value_and_grad(dense, (0, 1))(hs, ws)
    np.testing.assert_allclose(l1.item(), l2.item(), rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-4, atol=1e-7)
    # a quantized student: the hidden's gradient, and none for its packed weight
    sq = mx.quantize(ws, group_size=group, bits=bits, mode=mode)
    skw = dict(student_scales=sq[1], student_biases=sq[2] if mode == "affine" else None,
               student_group_size=group, student_bits=bits, student_mode=mode)
    ws_deq = mx.dequantize(sq[0], sq[1], skw["student_biases"], group_size=group, bits=bits, mode=mode)
    gq = mx.grad(lambda a: fl.linear_distillation_loss(a, sq[0], ht, wt, **skw))(hs)
    gd = mx.grad(lambda a: fl.linear_distillation_loss(a, ws_deq, ht, wt))(hs)
    np.testing.assert_allclose(to_np(gq), to_np(gd), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="quantized student_weight"):
        mx.eval(mx.grad(lambda b: fl.linear_distillation_loss(hs, b, ht, wt, **skw))(sq[0]))


def test_compile_and_vmap(fl, rng):
    N, Hs, Ht, V = 6, 16, 8, 40
    hs, ws, ht, wt = _heads(rng, N, Hs, Ht, V)
    y = mx.array(rng.integers(0, V, N).astype(np.int32))

    def f(a, b, c):
        return fl.linear_distillation_loss(a, b, c, wt, y, kind="reverse_kl", alpha=0.2, chunk_bytes=700)

    eager = mx.value_and_grad(f, (0, 1))(hs, ws, ht)
    both = mx.compile(lambda a, b, c: (mx.value_and_grad(f, (0, 1))(a, b, c), 2 * f(a, b, c)))
    (l, g), twice = both(hs, ws, ht)
    np.testing.assert_allclose(l.item(), eager[0].item(), rtol=1e-6)
    np.testing.assert_allclose(twice.item(), 2 * eager[0].item(), rtol=1e-6)
    for a, b in zip(g, eager[1]):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-6, atol=1e-8)
    # vmap over the rows' batch: the same rows, one call
    hb, tb = hs.reshape(2, 3, Hs), ht.reshape(2, 3, Ht)
    rows = lambda a, c: fl.linear_distillation_loss(a, ws, c, wt, reduction="none")  # noqa: E731
    np.testing.assert_allclose(to_np(mx.vmap(rows)(hb, tb)), to_np(rows(hs, ht)).reshape(2, 3), rtol=1e-6)
    # vmap of a mean (rows summed in the kernel: one call per example) and of
    # its gradients (formed in the forward)
    mean = lambda a, b, c: fl.linear_distillation_loss(a, b, c, wt, kind="jsd")  # noqa: E731
    wb = mx.stack([ws, 1.5 * ws])
    got = mx.vmap(mx.value_and_grad(mean, (0, 1)))(hb, wb, tb)
    for i in range(2):
        want = mx.value_and_grad(mean, (0, 1))(hb[i], wb[i], tb[i])
        np.testing.assert_allclose(got[0][i].item(), want[0].item(), rtol=1e-6)
        for a, b in zip(got[1], want[1]):
            np.testing.assert_allclose(to_np(a[i]), to_np(b), rtol=1e-5, atol=1e-8)


def test_bad_input(fl, rng):
    hs, ws, ht, wt = _heads(rng, 4, 8, 6, 10)
    f = fl.linear_distillation_loss
    assert_raises_naming(ValueError, "teacher_weight", f, hs, ws, ht, wt[:9])
    assert_raises_naming(ValueError, "teacher_hidden", f, hs, ws, ht[:3], wt)
    assert_raises_naming(ValueError, "student_weight", f, hs, ws[:, :7], ht, wt)
    assert_raises_naming(ValueError, "kind", f, hs, ws, ht, wt, kind="forward")
    assert_raises_naming(ValueError, "targets", f, hs, ws, ht, wt, alpha=0.5)
    assert_raises_naming(ValueError, "chunk_bytes", f, hs, ws, ht, wt, chunk_bytes=0)
    assert_raises_naming(TypeError, "teacher_weight", f, hs, ws, ht, wt.astype(mx.uint32))
    assert_raises_naming(TypeError, "student_hidden", f, hs.astype(mx.int32), ws, ht, wt)


# ---- offline top-k teacher ------------------------------------------------------------------
def _topk_reference(z, ids, vals, temperature, renormalize, alpha, t2, targets, ignore_index, cot):
    """float64 per-row loss and d/dz of sum(cot * loss), from the definitions."""
    c = 1.0 / temperature
    lq = z * c - R.logsumexp(z * c, keepdims=True)
    q = np.exp(lq)
    lp = vals * c - R.logsumexp(vals * c, keepdims=True) if renormalize else vals.astype(np.float64)
    p = np.exp(lp)
    lq_ids = np.take_along_axis(lq, ids, -1)
    d = np.where(p > 0, p * (lp - lq_ids), 0.0).sum(-1)
    ds = (1 - alpha) * (temperature ** 2 if t2 else 1.0)
    loss = ds * d
    dz = ds * c * (q * p.sum(-1, keepdims=True))
    for r in range(len(z)):
        np.subtract.at(dz[r], ids[r], ds * c * p[r])
    if alpha:
        y = np.clip(targets, 0, z.shape[-1] - 1)
        lse = R.logsumexp(z, keepdims=True)
        loss = loss + alpha * (lse[:, 0] - z[np.arange(len(z)), y])
        dz = dz + alpha * (np.exp(z - lse) - np.eye(z.shape[-1])[y])
    kept = np.ones(len(z), bool) if ignore_index is None else targets != ignore_index
    loss = np.where(kept, loss, 0.0)
    dz = np.where(kept[:, None], dz * cot[:, None], 0.0)
    return loss, dz


@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("alpha,t2", [(0.0, False), (0.3, True)])
@pytest.mark.parametrize("summed", [False, True], ids=["rows", "sum"])
def test_topk_vs_float64(fl, rng, k, renormalize, alpha, t2, summed):
    # rows: per-row cotangents (the recomputing backward); sum: the gradients
    # formed in the forward
    N, H, V = 10, 24, 64
    hs, ws, _, _ = _heads(rng, N, H, 8, V)
    z = to_np(hs) @ to_np(ws).T
    teacher = rng.normal(size=(N, V)) * 2
    teacher_lp = teacher - R.logsumexp(teacher, keepdims=True)
    ids = np.argsort(-teacher, -1)[:, :k]  # the teacher's top-k, as a data set stores them
    vals = np.take_along_axis(teacher_lp, ids, -1).astype(np.float32)
    y = rng.integers(0, V, N)
    y[3] = -100
    cot = np.ones(N) if summed else rng.uniform(0.5, 2.0, N)
    kw = dict(temperature=1.5, renormalize=renormalize, alpha=alpha, scale_by_temperature_squared=t2,
              targets=mx.array(y), ignore_index=-100, chunk_bytes=700)

    def f(a, b):
        def loss(reduction):
            return fl.linear_topk_distillation_loss(a, b, mx.array(ids), mx.array(vals),
                                                    reduction=reduction, dtype=mx.float32, **kw)
        rows = loss("none")
        if summed:
            return loss("sum"), mx.stop_gradient(rows)
        return (rows * mx.array(cot.astype(np.float32))).sum(), rows

    (_, rows), (gh, gw) = mx.value_and_grad(f, (0, 1))(hs, ws)
    exp_rows, dz = _topk_reference(z, ids, vals.astype(np.float64), 1.5, renormalize, alpha, t2, y, -100, cot)
    assert_close(rows, exp_rows, mx.float32, scale=10.0, what="rows")
    assert_close(gh, dz @ to_np(ws), mx.float32, scale=np.abs(dz).sum(-1, keepdims=True) * 4, what="dH")
    assert_close(gw, dz.T @ to_np(hs), mx.float32, scale=np.abs(dz).sum(0)[:, None] * 8, what="dW")


def test_topk_with_every_class_is_kl_div(fl, rng):
    # k = V, renormalised: the teacher's full softmax at the temperature
    N, H, V = 6, 16, 40
    hs, ws, _, _ = _heads(rng, N, H, 8, V)
    t = mx.array(rng.normal(size=(N, V)).astype(np.float32) * 2)
    lp = t - mx.logsumexp(t, -1, keepdims=True)
    ids = mx.broadcast_to(mx.arange(V)[None], (N, V))
    for T in (1.0, 2.0):
        a = mx.value_and_grad(lambda x: fl.linear_topk_distillation_loss(
            x, ws, ids, lp, temperature=T, renormalize=True))(hs)
        b = mx.value_and_grad(lambda x: fl.kl_div(x @ ws.T, t, temperature=T))(hs)
        np.testing.assert_allclose(a[0].item(), b[0].item(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_np(a[1]), to_np(b[1]), rtol=1e-4, atol=1e-7)


def test_topk_bad_ids_and_input(fl, rng):
    hs, ws, _, _ = _heads(rng, 3, 8, 8, 10)
    ids = mx.array([[1, 2], [3, 10], [0, 1]])
    vals = mx.array([[-0.5, -1.0]] * 3)
    rows = to_np(fl.linear_topk_distillation_loss(hs, ws, ids, vals, reduction="none"))
    assert np.isfinite(rows[0]) and np.isnan(rows[1]) and np.isfinite(rows[2])
    f = fl.linear_topk_distillation_loss
    assert_raises_naming(ValueError, "teacher_logprobs", f, hs, ws, ids, vals[:, :1])
    assert_raises_naming(ValueError, "teacher_ids", f, hs, ws, ids[:2], vals[:2])
    assert_raises_naming(TypeError, "teacher_ids", f, hs, ws, ids.astype(mx.float32), vals)
    assert_raises_naming(TypeError, "teacher_logprobs", f, hs, ws, ids, ids)
