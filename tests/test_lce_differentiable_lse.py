"""linear_cross_entropy(..., return_stats=True, differentiable_lse=True):
stats["lse"] carries gradients (Cut Cross-Entropy's return_lse), folded into
the loss's own backward (dZ_r += g_lse_r softmax_r). Checked against float64
for a loss that uses both (per-row cotangents on each), the lse alone,
ignored / masked rows (their lse is differentiable too), every option that
changes dZ, class weights, shift, under mx.compile; and that without it the
statistics stay constants."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from conftest import assert_close, assert_raises_naming, dtype_id, to_np

fl = pytest.importorskip("mlx_fused_losses")

from test_linear_cross_entropy import gradient_bounds, make_inputs  # noqa: E402

NAMES = ("hidden", "weight", "bias")


def reference64(args, c_loss, c_lse, reduction, logit_softcap=None, **options):
    """Float64 gradients of sum(c_loss * loss_rows) + sum(c_lse * lse) (reduction
    "none"), or c_loss * loss + sum(c_lse * lse) (a reduced loss)."""
    np_args = {k: to_np(v) for k, v in args.items()}
    cot = c_loss if reduction == "none" else float(c_loss)
    r = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"], np_args.get("bias"),
                                 logit_softcap=logit_softcap, reduction=reduction,
                                 cotangent=np.asarray(cot, np.float64), **options)
    z = r["logits"]
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    dz_dy = 1.0 if logit_softcap is None else 1.0 - (z / logit_softcap) ** 2
    dz = r["dz"] + np.asarray(c_lse, np.float64).reshape(-1, 1) * p * dz_dy
    h = np_args["hidden"].reshape(dz.shape[0], -1)
    out = dict(r, dz=dz, lse=lse, hidden=(dz @ np_args["weight"]).reshape(r["hidden"].shape),
               weight=dz.T @ h, bias=dz.sum(0))
    return out


def grads_of(args, c_loss, c_lse, argnames=NAMES, uses_loss=True, **options):
    names = [n for n in argnames if n in args]
    fixed = {k: v for k, v in args.items() if k not in names}

    def f(*primals):
        kw = dict(zip(names, primals), **fixed)
        loss, stats = fl.linear_cross_entropy(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"),
                                              kw.pop("bias", None), return_stats=True,
                                              differentiable_lse=True, **kw, **options)
        total = (stats["lse"] * c_lse).sum()
        if uses_loss:
            total = total + (loss * c_loss).sum()
        return total, stats["lse"]

    (_, lse), grads = mx.value_and_grad(f, argnums=tuple(range(len(names))))(*[args[n] for n in names])
    mx.eval(lse, grads)
    return lse, dict(zip(names, grads))


def check(args, dtype, c_loss, c_lse, reduction, uses_loss=True, chunk_bytes=None, **options):
    r = reference64(args, c_loss if uses_loss else np.zeros_like(c_loss), c_lse, reduction, **options)
    kernel_options = dict(options, chunk_bytes=chunk_bytes)
    lse, grads = grads_of(args, mx.array(c_loss.astype(np.float32)), mx.array(c_lse.astype(np.float32)),
                          reduction=reduction, uses_loss=uses_loss, **kernel_options)
    assert_close(lse, r["lse"], mx.float32, scale=np.abs(r["logits"]).max(-1) + 1, what="lse")
    mags, logit_err = gradient_bounds(args, r, reduction, None if reduction != "none" else mx.array(c_loss),
                                      options.get("ignore_index"), options.get("z_loss", 0.0))
    for name, g in grads.items():
        assert g.dtype == args[name].dtype
        assert_close(g, r[name], dtype, scale=logit_err[name], mag=mags[name], what=f"d{name}")


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_lse_gradients_vs_float64(rng, dtype, reduction):
    n, h, v = 37, 24, 300
    args = make_inputs(rng, n, h, v, dtype=dtype, bias=True)
    c_loss = rng.uniform(-2, 2, n) if reduction == "none" else np.array(1.5)
    c_lse = rng.uniform(-1, 1, n)
    # a small chunk budget: several chunks
    check(args, dtype, c_loss, c_lse, reduction, chunk_bytes=5 * 4 * v)


@pytest.mark.parametrize("options", [
    dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, ignore_index=3),
    dict(label_smoothing=0.2, label_smoothing_mode="others", ignore_index=-100),
], ids=["smooth_z_cap_ignore", "others_ignore"])
def test_with_the_options_that_change_dz(rng, options):
    n, h, v = 29, 16, 130
    args = make_inputs(rng, n, h, v, bias=True)
    t = np.array(args["targets"])
    t[1::4] = options["ignore_index"]  # ignored rows: their lse still has a gradient
    args["targets"] = mx.array(t)
    check(args, mx.float32, np.array(1.0), rng.uniform(-1, 1, n), "mean", **options)


def test_the_lse_alone(rng):
    # The loss unused: its cotangent is 0, the gradient is the lse's alone.
    n, h, v = 21, 12, 90
    args = make_inputs(rng, n, h, v, bias=True)
    check(args, mx.float32, np.zeros(n), rng.uniform(-1, 1, n), "none", uses_loss=False)


def test_masked_rows_lse_is_differentiable(rng):
    n, h, v = 16, 8, 40
    args = make_inputs(rng, n, h, v)
    mask = mx.array(np.arange(n) % 3 != 0)
    c_lse = rng.uniform(0.5, 1.5, n)

    def lse_sum(hidden, m):
        _, stats = fl.linear_cross_entropy(hidden, args["weight"], args["targets"], mask=m, return_stats=True,
                                           differentiable_lse=True)
        return (stats["lse"] * mx.array(c_lse.astype(np.float32))).sum()

    # The lse does not depend on the mask: the same gradient with and without it.
    with_mask = mx.grad(lse_sum)(args["hidden"], mask)
    without = mx.grad(lse_sum)(args["hidden"], None)
    assert_close(with_mask, to_np(without), mx.float32, what="dH of the lse, masked rows")
    assert np.all(np.abs(to_np(with_mask))[0] > 0)  # row 0 is masked


def test_without_it_the_statistics_are_constants(rng):
    args = make_inputs(rng, 8, 8, 20)

    def lse_sum(hidden):
        _, stats = fl.linear_cross_entropy(hidden, args["weight"], args["targets"], return_stats=True)
        return stats["lse"].sum()

    assert np.all(to_np(mx.grad(lse_sum)(args["hidden"])) == 0.0)


def test_class_weights_and_shift(rng):
    n, h, v = 18, 8, 50
    args = make_inputs(rng, n, h, v)
    cw = mx.array(rng.uniform(0.5, 2.0, v).astype(np.float32))
    c_lse = mx.array(rng.uniform(-1, 1, n).astype(np.float32))

    def total(hidden, **kw):
        loss, stats = fl.linear_cross_entropy(hidden, args["weight"], args["targets"], return_stats=True,
                                              differentiable_lse=True, **kw)
        return loss + (stats["lse"] * c_lse[: stats["lse"].shape[-1]]).sum()

    def composed(hidden, **kw):  # the same loss, the lse from the row statistics
        loss = fl.linear_cross_entropy(hidden, args["weight"], args["targets"], **kw)
        lse = fl._ext.linear_row_stats(hidden, args["weight"], None, None, stats=["lse"])[0]
        return loss + (lse * c_lse).sum()

    got = mx.grad(lambda x: total(x, class_weights=cw))(args["hidden"])
    want = mx.grad(lambda x: composed(x, class_weights=cw))(args["hidden"])
    assert_close(got, to_np(want), mx.float32, scale=4.0, what="class weights")
    # shift: row t's lse is hidden t's; the last s rows have none.
    hid3, t3 = args["hidden"].reshape(2, 9, h), args["targets"].reshape(2, 9)
    c3 = mx.array(rng.uniform(-1, 1, (2, 7)).astype(np.float32))

    def shifted(x):
        _, stats = fl.linear_cross_entropy(x, args["weight"], t3, shift=2, return_stats=True,
                                           differentiable_lse=True)
        return (stats["lse"] * c3).sum()

    def sliced(x):
        _, stats = fl.linear_cross_entropy(x[:, :7], args["weight"], t3[:, 2:], return_stats=True,
                                           differentiable_lse=True)
        return (stats["lse"] * c3).sum()

    assert_close(mx.grad(shifted)(hid3), to_np(mx.grad(sliced)(hid3)), mx.float32, scale=4.0, what="shift")


def test_under_compile(rng):
    n, h, v = 12, 8, 70
    args = make_inputs(rng, n, h, v, bias=True)
    c_lse = mx.array(rng.uniform(-1, 1, n).astype(np.float32))

    def step(hidden, weight, targets, c):
        def total(x, w):
            loss, stats = fl.linear_cross_entropy(x, w, targets, args["bias"], return_stats=True,
                                                  differentiable_lse=True)
            return loss + (stats["lse"] * c).sum()
        return mx.value_and_grad(total, argnums=(0, 1))(hidden, weight)

    eager = step(args["hidden"], args["weight"], args["targets"], c_lse)
    twice = mx.compile(lambda *a: (step(*a), step(*a)))(args["hidden"], args["weight"], args["targets"], c_lse)
    for got in twice:
        for a, b in zip(got[1], eager[1]):
            assert_close(a, to_np(b), mx.float32, scale=4.0, what="compiled")
    shapeless = mx.compile(step, shapeless=True)
    for rows in (12, 7):
        inputs = (args["hidden"][:rows], args["weight"], args["targets"][:rows], c_lse[:rows])
        got, want = shapeless(*inputs), step(*inputs)
        for a, b in zip(got[1], want[1]):
            assert_close(a, to_np(b), mx.float32, scale=4.0, what=f"shapeless at {rows} rows")


def test_bad_input(rng):
    args = make_inputs(rng, 4, 8, 16)
    lce = fl.linear_cross_entropy
    assert_raises_naming(ValueError, "return_stats", lce, **args, differentiable_lse=True)
    assert_raises_naming(TypeError, "differentiable_lse", lce, **args, return_stats=True, differentiable_lse=1)
    assert_raises_naming(ValueError, "differentiable_lse", lce, **args, return_stats=True,
                         differentiable_lse=True, vocab_start=0)
