"""linear_cross_entropy(filter_eps=...): Cut Cross-Entropy's gradient filtering.

The backward leaves out of dH = dZ W and dW = dZ^T H every block of
vocabulary columns of a chunk whose entries all have |dZ_rj| <= eps |g_r|.
Checked against the float64 gradient with the documented bound (each dropped
entry at most eps |g_r|), on data whose softmax leaves most blocks below eps
(so the filter does drop work: the filtered gradients differ from the exact
ones, and the dead blocks' weight rows get exactly 0); an adversarial block
holding one entry just above eps must be computed; NaN rows still poison;
"auto" is Cut Cross-Entropy's resolution; under mx.compile."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from conftest import assert_close, assert_raises_naming, dtype_id, to_np

fl = pytest.importorskip("mlx_fused_losses")

from test_linear_cross_entropy import fused_loss_and_grads, gradient_bounds, logit_scale, row_cotangent  # noqa: E402

# The CPU's filter block (Metal's, a GEMM tile's width, is not wider):
# columns from 2 BLOCK on are in blocks that hold no live entry.
BLOCK = fl._ext.LINEAR_CE_FILTER_BLOCK


def zipf_inputs(rng, n, h, v, dtype, hot=64):
    """A peaked softmax: every row's mass sits in the first `hot` classes (a
    bias falling as -3 log(j + 1) beyond them, as a unigram prior would), the
    targets among them; the tail's entries are far below any eps tried here."""
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    j = np.arange(v)
    b = np.where(j < hot, 0.0, -3.0 * np.log1p(np.maximum(j - hot + 1.0, 0.0)) - 8.0).astype(np.float32)
    t = rng.integers(0, hot, n)
    return dict(hidden=mx.array(hid).astype(dtype), weight=mx.array(w).astype(dtype),
                targets=mx.array(t.astype(np.int32)), bias=mx.array(b).astype(dtype))


def filter_bound(args, r, eps, reduction, cotangent):
    """Per gradient, the documented bound on what filtering may change:
    eps |g_r| summed over the entries it may drop (those with |dZ_rj| <= eps
    |g_r|, with a float32 margin), times |W_j| (dH) or |h_r| (dW)."""
    g = np.abs(row_cotangent(args, reduction, cotangent, None))[:, None]
    dz = np.abs(r["dz"])
    droppable = (dz <= eps * g * (1 + 1e-3) + 1e-30).astype(np.float64) * eps * g
    h = np.abs(to_np(args["hidden"])).reshape(dz.shape[0], -1)
    w = np.abs(to_np(args["weight"]))
    return {"hidden": (droppable @ w).reshape(r["hidden"].shape), "weight": droppable.T @ h}


def reference64(args, **options):
    np_args = {k: to_np(v) for k, v in args.items()}
    return ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                    np_args.get("bias"), **options)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_filtered_gradients_within_the_bound(rng, dtype, reduction):
    # V: four 256-column blocks and a partial one; several chunks of rows.
    n, h, v, eps = 40, 24, 1100, 1e-5
    args = zipf_inputs(rng, n, h, v, dtype)
    cot = None
    if reduction == "none":  # per-row cotangents: the recomputing backward
        cot = mx.array(rng.uniform(-2, 2, n).astype(np.float32))
    r = reference64(args, reduction=reduction, cotangent=None if cot is None else to_np(cot))
    options = dict(reduction=reduction, chunk_bytes=7 * 4 * v)
    _, exact = fused_loss_and_grads(args, cotangent=cot, **options)
    loss, grads = fused_loss_and_grads(args, cotangent=cot, filter_eps=eps, **options)
    loss_exact = fl.linear_cross_entropy(**args, **options)
    assert np.array_equal(to_np(loss), to_np(loss_exact)), "the loss does not depend on the filter"
    mags, logit_err = gradient_bounds(args, r, reduction, cot)
    bound = filter_bound(args, r, eps, reduction, cot)
    for name in ("hidden", "weight"):
        assert grads[name].dtype == dtype
        # float64 truth, the unfiltered kernel's own tolerance plus the filter's bound
        assert_close(grads[name], r[name], dtype, scale=logit_err[name] + bound[name] / (8 * 2.0**-23),
                     mag=mags[name], what=f"d{name} (filtered)")
    # dbias sums every entry, filtered or not.
    assert np.array_equal(to_np(grads["bias"]), to_np(exact["bias"]))
    # The filter dropped work: the tail's weight rows (blocks past the hot
    # classes' block) get exactly 0, the unfiltered gradient does not.
    tail = to_np(grads["weight"])[2 * BLOCK:]
    assert np.all(tail == 0.0)
    assert np.any(to_np(exact["weight"])[2 * BLOCK:] != 0.0)
    # ... and the hot block is computed as without the filter.
    assert_close(grads["weight"][:64], to_np(exact["weight"][:64]), dtype, mag=mags["weight"][:64],
                 scale=logit_err["weight"][:64], what="dW of the kept block")


def adversarial_inputs(eps_row, dtype=mx.float32):
    """hidden = the identity's first rows, so weight^T is the logits: row r's
    target (class r, logit 0) holds the mass, every other logit is -60 but
    for row 3's two planted entries: class 600 with p = 1.001 eps_row (above
    the threshold: its block must be kept) and class 900 with p = 0.999
    eps_row (alone in its block: dropped)."""
    n, v = 8, 1024
    z = np.full((n, v), -60.0)
    z[np.arange(n), np.arange(n)] = 0.0
    # p = exp(z - lse), lse = log(1 + tiny): z = log(p) to within 1e-20.
    z[3, 600] = math.log(1.001 * eps_row)
    z[3, 900] = math.log(0.999 * eps_row)
    return dict(hidden=mx.array(np.eye(n, dtype=np.float32)).astype(dtype),
                weight=mx.array(z.T.astype(np.float32)).astype(dtype),
                targets=mx.array(np.arange(n, dtype=np.int32))), z


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_entry_just_above_eps_keeps_its_block(reduction):
    eps = 1e-6
    # dZ = g (p - q): the threshold eps |g| is p = eps on the planted row.
    args, z = adversarial_inputs(eps)
    cot = mx.array(np.linspace(0.5, 2.0, 8).astype(np.float32)) if reduction == "none" else None
    r = reference64(args, reduction=reduction, cotangent=None if cot is None else to_np(cot))
    _, grads = fused_loss_and_grads(args, cotangent=cot, argnames=("hidden", "weight"), reduction=reduction,
                                    filter_eps=eps)
    dw = to_np(grads["weight"])
    # Column 600 (p just above eps) and every column of its block: exact.
    block = slice(600 // BLOCK * BLOCK, 600 // BLOCK * BLOCK + BLOCK)
    assert dw[600, 3] != 0.0
    assert_close(dw[block], r["weight"][block], mx.float32, what="dW of the kept block")
    # Column 900 (p just below eps, alone in its block): dropped.
    assert 600 // BLOCK < 900 // BLOCK
    assert r["weight"][900, 3] != 0.0 and np.all(dw[900 // BLOCK * BLOCK:] == 0.0)
    # dH: exact but for the dropped entry's (and the -60 logits') products.
    g = np.abs(row_cotangent(args, reduction, cot, None))
    dropped = g[3] * 0.999 * eps * np.abs(to_np(args["weight"])[900])
    tiny = 8 * np.exp(-60.0) * np.abs(to_np(args["weight"])).sum(0)
    bound = np.zeros(r["hidden"].shape)
    bound[3] = dropped
    assert_close(grads["hidden"], r["hidden"], mx.float32, scale=(bound + tiny) / (8 * 2.0**-23),
                 what="dH")
    # A larger eps drops column 600's block as well.
    _, coarse = fused_loss_and_grads(args, cotangent=cot, argnames=("weight",), reduction=reduction,
                                     filter_eps=2 * eps)
    assert np.all(to_np(coarse["weight"])[BLOCK:] == 0.0)


def test_a_nan_row_is_never_filtered():
    # An out-of-range target without ignore_index: a NaN row, which poisons
    # every column of dW whatever the filter (as unfiltered).
    args, _ = adversarial_inputs(1e-6)
    args["targets"] = mx.array(np.array([0, 1, 2, 3, 4, 5, 6, 5000], np.int32))
    _, grads = fused_loss_and_grads(args, argnames=("weight",), filter_eps=1e-3)
    assert np.isnan(to_np(grads["weight"])[:, 7]).all()


def test_auto_is_the_dtype_resolution_over_32(rng):
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        args = zipf_inputs(rng, 12, 16, 600, dtype)
        eps = float(np.finfo(np.float32).eps if dtype == mx.float32 else
                    np.finfo(np.float16).eps if dtype == mx.float16 else 2.0**-7) / 32
        _, auto = fused_loss_and_grads(args, filter_eps="auto")
        _, explicit = fused_loss_and_grads(args, filter_eps=eps)
        for name in auto:
            assert np.array_equal(to_np(auto[name]), to_np(explicit[name])), (dtype, name)


def test_default_is_exact_and_zero_filters_nothing(rng):
    args = zipf_inputs(rng, 12, 16, 600, mx.float32)
    _, none = fused_loss_and_grads(args)
    _, zero = fused_loss_and_grads(args, filter_eps=0.0)
    for name in none:
        assert np.array_equal(to_np(none[name]), to_np(zero[name])), name
    assert np.any(to_np(none["weight"])[2 * BLOCK:] != 0.0)


def test_with_class_weights_smoothing_and_softcap(rng):
    # The filter applies to the fused kernel's part (class-index targets with
    # class weights: per-token weights); options that change dZ change what
    # counts as negligible, not the bound.
    n, h, v, eps = 24, 16, 800, 1e-5
    args = zipf_inputs(rng, n, h, v, mx.float32)
    cw = mx.array(rng.uniform(0.5, 2.0, v).astype(np.float32))
    for options in (dict(class_weights=cw), dict(logit_softcap=30.0), dict(z_loss=1e-3)):
        _, exact = fused_loss_and_grads(args, argnames=("hidden", "weight"), **options)
        _, got = fused_loss_and_grads(args, argnames=("hidden", "weight"), filter_eps=eps, **options)
        scale = np.abs(to_np(exact["weight"])).max()
        # dW: each dropped entry is at most eps |g_r| with |g_r| <= max w / sum of
        # the kept rows' w <= 2 / (0.5 n)
        err = np.abs(to_np(got["weight"]) - to_np(exact["weight"])).max()
        h_abs = np.abs(to_np(args["hidden"])).sum(0).max()
        assert err <= eps * 4.0 * h_abs / n * 1.01 + 1e-6 * scale, options
        assert np.all(to_np(got["weight"])[2 * BLOCK:] == 0.0), options


def test_under_compile_same_call_twice_other_eps_and_shapeless(rng):
    args = zipf_inputs(rng, 16, 16, 700, mx.float32)
    t = args["targets"]

    def step(h, w, b, eps):
        return mx.value_and_grad(
            lambda h_, w_: fl.linear_cross_entropy(h_, w_, t, b, filter_eps=eps), argnums=(0, 1))(h, w)

    eager = {eps: step(args["hidden"], args["weight"], args["bias"], eps) for eps in (None, 1e-5)}

    def two(h, w, b):  # the same call twice, and unfiltered: not merged with them
        return step(h, w, b, 1e-5), step(h, w, b, 1e-5), step(h, w, b, None)

    first, again, exact = mx.compile(two)(args["hidden"], args["weight"], args["bias"])
    for got, eps in ((first, 1e-5), (again, 1e-5), (exact, None)):
        for a, b in zip(got[1], eager[eps][1]):
            assert np.array_equal(to_np(a), to_np(b)), eps
    assert not np.array_equal(to_np(exact[1][1]), to_np(first[1][1]))
    # Shapeless, called at two sizes (rows 10, then 14).
    def small(h, w, b, targets):
        return mx.value_and_grad(
            lambda h_, w_: fl.linear_cross_entropy(h_, w_, targets, b, filter_eps=1e-5), argnums=(0, 1))(h, w)

    compiled = mx.compile(small, shapeless=True)
    for rows in (10, 14):
        inputs = (args["hidden"][:rows], args["weight"], args["bias"], t[:rows])
        got, want = compiled(*inputs), small(*inputs)
        for a, b in zip(got[1], want[1]):
            assert np.array_equal(to_np(a), to_np(b)), rows


@pytest.mark.parametrize("bad,exc", [(-1e-6, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     ("fast", ValueError), (True, TypeError), ([1e-6], TypeError)])
def test_bad_filter_eps(bad, exc):
    args, _ = adversarial_inputs(1e-6)
    assert_raises_naming(exc, "filter_eps", fl.linear_cross_entropy, **args, filter_eps=bad)


def test_filter_eps_refused_where_it_does_not_apply(rng):
    args = zipf_inputs(rng, 4, 8, 16, mx.float32)
    probs = mx.softmax(mx.array(rng.standard_normal((4, 16)).astype(np.float32)), axis=-1)
    assert_raises_naming(ValueError, "filter_eps", fl.linear_cross_entropy, args["hidden"], args["weight"],
                         probs, filter_eps=1e-6)
    assert_raises_naming(ValueError, "filter_eps", fl.linear_cross_entropy, args["hidden"], args["weight"],
                         args["targets"], vocab_start=0, filter_eps=1e-6)


def test_module_option(rng):
    args = zipf_inputs(rng, 12, 16, 600, mx.bfloat16)
    crit = fl.nn.LinearCrossEntropyLoss(filter_eps="auto", ignore_index=None)
    _, by_module = mx.value_and_grad(lambda w: crit(args["hidden"], w, args["targets"], args["bias"]))(args["weight"])
    _, by_function = fused_loss_and_grads(args, argnames=("weight",), filter_eps="auto")
    assert np.array_equal(to_np(by_module), to_np(by_function["weight"]))
    assert_raises_naming(ValueError, "filter_eps", fl.nn.LinearCrossEntropyLoss, filter_eps=-1.0)
    assert_raises_naming(ValueError, "filter_eps", fl.nn.LinearCrossEntropyLoss, filter_eps="exact")
