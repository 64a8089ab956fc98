"""Fused linear cross-entropy vs the float64 composed formula
``cross_entropy(softcap(hidden @ weight.T + bias), targets)``: forward, every
gradient, every option, dtypes, quantized heads, transforms, bad input, memory
and the chunk plan's thresholds."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from conftest import DTYPES, EPS32, SCALE_ULPS, assert_close, assert_raises_naming, dtype_id, to_np

fl = pytest.importorskip("mlx_fused_losses")
from mlx_fused_losses import _ext  # noqa: E402

GRAD_NAMES = ("hidden", "weight", "bias")


def make_inputs(rng, n, h, v, dtype=mx.float32, bias=False, peaked=True, batch=None):
    """hidden, weight (and bias) rounded to `dtype`, targets; `peaked` makes a
    few logits per row stand out (x20) so the softmax is not flat."""
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(max(h, 1))).astype(np.float32)
    t = rng.integers(0, v, n)
    if peaked and n and v > 1:
        # Make row r's logit of class t_r (and of one other class) large.
        hot = rng.integers(0, v, n)
        for r in range(min(n, 8)):
            w[t[r]] += 2.0 * hid[r] / max(np.linalg.norm(hid[r]) ** 2, 1e-6) * 10
            w[hot[r]] += 1.0 * hid[r] / max(np.linalg.norm(hid[r]) ** 2, 1e-6) * 10
    if batch is not None:
        hid = hid.reshape(batch + (h,))
        t = t.reshape(batch)
    out = dict(
        hidden=mx.array(hid).astype(dtype),
        weight=mx.array(w).astype(dtype),
        targets=mx.array(t.astype(np.int32)),
    )
    if bias:
        out["bias"] = mx.array(rng.standard_normal(v).astype(np.float32)).astype(dtype)
    return out


def logit_scale(args):
    """Per-row magnitude of the fp32 GEMM's inputs: max_j sum_k |h_k w_jk| + |b_j|
    (the scale of the logits' rounding errors)."""
    h = np.abs(to_np(args["hidden"])).reshape(-1, args["hidden"].shape[-1])
    w = np.abs(to_np(args["weight"]))
    s = h @ w.T
    if "bias" in args:
        s = s + np.abs(to_np(args["bias"]))
    return s.max(-1, initial=1.0) if s.size else np.ones(h.shape[0])


def reference(args, **options):
    for kernel_only in ("chunk_bytes", "dtype", "scales", "biases", "group_size", "bits", "mode",
                        "global_scale"):
        options.pop(kernel_only, None)
    np_args = {k: to_np(v) for k, v in args.items()}
    return ref.linear_cross_entropy(
        np_args["hidden"], np_args["weight"], np_args["targets"], np_args.get("bias"), **options)


def fused_loss_and_grads(args, argnames=GRAD_NAMES, cotangent=None, **options):
    """Loss and the gradients of `argnames` through mx.vjp (the cotangent of
    the reduced loss; ones by default)."""
    names = [n for n in argnames if n in args]
    fixed = {k: v for k, v in args.items() if k not in names}

    def f(*primals):
        kw = dict(zip(names, primals), **fixed)
        return fl.linear_cross_entropy(
            kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"), kw.pop("bias", None), **kw, **options)

    primals = [args[n] for n in names]
    loss = f(*primals)
    cot = mx.ones(loss.shape, loss.dtype) if cotangent is None else cotangent
    (out,), grads = mx.vjp(lambda *p: [f(*p)], primals, [cot])
    mx.eval(out, grads)
    return out, dict(zip(names, grads))


def row_cotangent(args, reduction, cotangent, ignore_index):
    """The cotangent each row's loss receives (float64, [N])."""
    t = np.array(args["targets"]).reshape(-1)
    if reduction == "none":
        return np.ones(t.shape) if cotangent is None else to_np(cotangent).reshape(-1)
    g = 1.0 if cotangent is None else float(to_np(cotangent))
    if reduction == "mean":
        kept = t.size if ignore_index is None else int((t != ignore_index).sum())
        g = g / max(kept, 1)
    return np.full(t.shape, g)


def gradient_bounds(args, r, reduction, cotangent=None, ignore_index=None, z_loss=0.0):
    """(mags, logit_err): per gradient name, the magnitude of the products it
    sums and the float32 logits' error carried into it (assert_close's `mag`
    and `scale`); `r` is the float64 reference."""
    scale = logit_scale(args)
    # Gradient bound: the magnitudes of the products each gradient sums
    # (|dZ| |W|, |dZ|^T |H|), plus the logits' rounding carried through the
    # softmax: dz_rj moves by ~|dz_rj| delta_r (the target's entry by up to
    # sum_j |dz_rj| delta_r), delta_r ~ the row's logit scale.
    dz = np.nan_to_num(np.abs(r["dz"]))
    h = np.abs(to_np(args["hidden"])).reshape(dz.shape[0], -1)
    w = np.abs(to_np(args["weight"]))
    mags = {"hidden": (dz @ w).reshape(r["hidden"].shape), "weight": dz.T @ h, "bias": dz.sum(0)}
    # The target's entry, g (A p_t - q_t), also cancels in float32 when p_t
    # is near 1: an absolute error of a few ulps of |g| (A p_t + q_t) ~ 2|g|.
    err = dz.copy()
    t = np.array(args["targets"]).reshape(-1)
    rows = np.arange(err.shape[0])
    ok = (t >= 0) & (t < err.shape[1])
    err[rows[ok], t[ok]] += dz[ok].sum(-1)
    err *= scale.reshape(-1, 1)
    g_rows = np.abs(row_cotangent(args, reduction, cotangent, ignore_index))
    err[rows[ok], t[ok]] += 2 * (1 + 2 * z_loss * scale[ok]) * g_rows[ok]
    logit_err = {"hidden": (err @ w).reshape(r["hidden"].shape), "weight": err.T @ h, "bias": err.sum(0)}
    return mags, logit_err


def check_against_reference(args, dtype, cotangent=None, fused_args=None, argnames=GRAD_NAMES,
                            **options):
    """`fused_args` (default `args`) go to the kernel, `args` to the reference."""
    r = reference(args, cotangent=None if cotangent is None else to_np(cotangent), **options)
    loss, grads = fused_loss_and_grads(fused_args or args, argnames=argnames, cotangent=cotangent,
                                       **options)
    scale = logit_scale(args)
    reduction = options.get("reduction", "mean")
    loss_scale = scale.reshape(np.shape(r["loss"])) if reduction == "none" else scale.mean() if scale.size else 0.0
    out_dtype = options.get("dtype") or dtype
    assert loss.dtype == out_dtype
    assert_close(loss, r["loss"], out_dtype, scale=loss_scale * (1 + 2 * options.get("z_loss", 0) * 50),
                 what="loss")
    mags, logit_err = gradient_bounds(args, r, reduction, cotangent, options.get("ignore_index"),
                                      options.get("z_loss", 0))
    for name, g in grads.items():
        assert g.dtype == args[name].dtype, name
        assert_close(g, r[name], args[name].dtype, scale=logit_err[name], mag=mags[name],
                     what=f"d{name}")
    return loss, grads


# ---------------------------------------------------------------------------
# forward and gradients vs the float64 composed formula

SHAPES = [  # (N, H, V)
    (5, 7, 1),
    (9, 1, 31),
    (16, 64, 32),
    (13, 7, 33),
    (24, 64, 4097),
    (6, 1000, 129),
]


@pytest.mark.parametrize("n,h,v", SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in SHAPES])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_shapes(rng, n, h, v, bias, reduction):
    args = make_inputs(rng, n, h, v, bias=bias)
    cot = None
    if reduction == "none":  # non-uniform cotangent: the weight gradient cannot factor it out
        cot = mx.array(rng.uniform(-2, 2, n).astype(np.float32))
    # A small chunk budget: several chunks of rows (and several weight tiles).
    check_against_reference(args, mx.float32, cotangent=cot, reduction=reduction,
                            chunk_bytes=3 * 4 * v + 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("v", [33, 4097])
def test_dtypes(rng, dtype, v):
    args = make_inputs(rng, 20, 64, v, dtype=dtype, bias=True)
    check_against_reference(args, dtype, reduction="mean", chunk_bytes=5 * 4 * v)
    check_against_reference(args, dtype, reduction="none",
                            cotangent=mx.array(rng.uniform(0, 1, 20).astype(np.float32)).astype(dtype))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
def test_float32_result(rng, dtype):
    """dtype=mx.float32 returns the float32 reduction the kernel computed."""
    args = make_inputs(rng, 64, 32, 300, dtype=dtype)
    loss = fl.linear_cross_entropy(**args, dtype=mx.float32)
    low = fl.linear_cross_entropy(**args)
    assert loss.dtype == mx.float32 and low.dtype == dtype
    r = reference(args)
    assert abs(loss.item() - float(r["loss"])) <= 1e-5 * abs(float(r["loss"])) + 1e-5
    assert abs(low.item() - loss.item()) <= 1e-2 * abs(loss.item())


OPTIONS = [
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.3, label_smoothing_mode="others"),
    dict(z_loss=1e-3),
    dict(logit_softcap=3.0),
    dict(logit_softcap=30.0, label_smoothing=0.1, z_loss=1e-4),
    dict(ignore_index=3),
    dict(ignore_index=-100, label_smoothing=0.2),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options(rng, options, reduction):
    args = make_inputs(rng, 40, 24, 257, bias=True)
    t = np.array(args["targets"])
    if "ignore_index" in options:
        t[::3] = options["ignore_index"]
        args["targets"] = mx.array(t)
    cot = mx.array(rng.uniform(-1, 1, 40).astype(np.float32)) if reduction == "none" else None
    check_against_reference(args, mx.float32, cotangent=cot, reduction=reduction,
                            chunk_bytes=7 * 257 * 4, **options)


def test_softcap_saturated_gradient(rng):
    """Logits far beyond the cap: tanh saturates and the gradient through it
    must follow 1 - tanh^2, not be dropped (a bug CCE and Liger shipped)."""
    args = make_inputs(rng, 12, 16, 50, bias=True)
    args["hidden"] = args["hidden"] * 3
    check_against_reference(args, mx.float32, reduction="sum", logit_softcap=2.0)
    check_against_reference(args, mx.float32, reduction="sum", logit_softcap=0.05)


def test_mask_equals_ignore_index(rng):
    args = make_inputs(rng, 30, 16, 40, bias=True)
    mask = mx.array(rng.random(30) < 0.6)
    t_ignored = mx.where(mask, args["targets"], -100)
    a, ga = fused_loss_and_grads(dict(args), mask=mask)
    b, gb = fused_loss_and_grads(dict(args, targets=t_ignored), ignore_index=-100)
    assert np.allclose(to_np(a), to_np(b), rtol=1e-6)
    for k in ga:
        assert np.allclose(to_np(ga[k]), to_np(gb[k]), rtol=1e-5, atol=1e-7)
    # mask with an ignore_index too: both count
    c = fl.linear_cross_entropy(**dict(args, targets=t_ignored), mask=mx.ones(30, mx.bool_),
                                ignore_index=-100)
    assert np.allclose(to_np(c), to_np(b), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_and_all_ignored(rng, reduction):
    empty = make_inputs(rng, 0, 8, 10, bias=True)
    loss, grads = fused_loss_and_grads(empty, reduction=reduction)
    assert loss.shape == (() if reduction != "none" else (0,))
    if reduction != "none":
        assert loss.item() == 0.0
    assert grads["hidden"].shape == (0, 8)
    assert not np.any(to_np(grads["weight"])) and not np.any(to_np(grads["bias"]))
    args = make_inputs(rng, 6, 8, 10, bias=True)
    args["targets"] = mx.full((6,), -100, mx.int32)
    loss, grads = fused_loss_and_grads(args, reduction=reduction, ignore_index=-100)
    assert not np.any(to_np(loss))  # 0, not NaN
    for g in grads.values():
        assert not np.any(to_np(g))


def test_batch_shape_and_large_vocab(rng):
    """[B, T, H] hidden and a GPT-2-sized vocabulary V = 50257 (H = 1000 is
    in test_fp32_shapes: the float64 reference would dominate the time)."""
    args = make_inputs(rng, 6, 16, 50257, batch=(2, 3))
    check_against_reference(args, mx.float32, reduction="mean")
    check_against_reference(args, mx.float32, reduction="none",
                            cotangent=mx.array(rng.uniform(-1, 1, (2, 3)).astype(np.float32)))


def test_out_of_range_target_is_nan(rng):
    args = make_inputs(rng, 4, 8, 10)
    args["targets"] = mx.array([1, 10, 2, -1])
    loss = to_np(fl.linear_cross_entropy(**args, reduction="none"))
    assert np.isnan(loss[1]) and np.isnan(loss[3]) and np.isfinite(loss[[0, 2]]).all()


def test_fused_and_recomputing_backward_agree(rng):
    """The gradients formed in the forward pass (sum/mean under a gradient
    transform) and those of the backward primitive that recomputes the logits."""
    args = make_inputs(rng, 30, 16, 100, bias=True)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, sum_rows=True, chunk_bytes=4000)

    def loss(fuse):
        def f(h, w, b):
            return _ext.linear_cross_entropy(h, w, args["targets"], b, fuse_grads=fuse, **opts)[0]
        return mx.grad(f, argnums=(0, 1, 2))(args["hidden"], args["weight"], args["bias"])

    for a, b in zip(loss(True), loss(False)):
        np.testing.assert_allclose(to_np(a), to_np(b), rtol=2e-5, atol=1e-6)


def test_only_requested_gradients(rng):
    """grad w.r.t. hidden alone must not form the [V, H] weight gradient."""
    n, h, v = 16, 64, 200_000
    args = make_inputs(rng, n, h, v, peaked=False)
    mx.eval(args)
    g = mx.grad(lambda x: fl.linear_cross_entropy(x, args["weight"], args["targets"]))
    mx.eval(g(args["hidden"]))  # warm-up
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(g(args["hidden"]))
    extra = mx.get_peak_memory() - base
    weight_grad_bytes = v * h * 4
    assert extra < weight_grad_bytes / 2, (extra, weight_grad_bytes)


# ---------------------------------------------------------------------------
# statistics

def test_stats(rng):
    args = make_inputs(rng, 25, 16, 77, bias=True)
    t = np.array(args["targets"])
    t[4] = -100
    args["targets"] = mx.array(t)
    loss, stats = fl.linear_cross_entropy(**args, ignore_index=-100, logit_softcap=4.0,
                                          return_stats=True, chunk_bytes=999)
    r = reference(args, ignore_index=-100, logit_softcap=4.0)
    z = r["logits"]
    lse = ref.logsumexp(z)
    p = np.exp(z - lse[:, None])
    entropy = -(p * np.log(p)).sum(-1)
    correct = (z.argmax(-1) == t)
    correct[4] = False
    assert set(stats) == {"lse", "correct", "entropy", "argmax"}
    assert np.array_equal(np.array(stats["argmax"]), z.argmax(-1))
    assert_close(stats["lse"], lse, mx.float32, scale=logit_scale(args), what="lse")
    assert_close(stats["entropy"], entropy, mx.float32, scale=logit_scale(args), what="entropy")
    assert stats["correct"].dtype == mx.bool_
    assert np.array_equal(np.array(stats["correct"]), correct)
    assert correct.sum() >= 5  # peaked rows: the statistic is not trivially False
    # the statistics are constants for autodiff
    g = mx.grad(lambda x: fl.linear_cross_entropy(x, args["weight"], args["targets"], args["bias"],
                                                  return_stats=True)[1]["lse"].sum())(args["hidden"])
    assert not np.any(to_np(g))


# ---------------------------------------------------------------------------
# quantized heads

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_head(rng, bits, group_size):
    h, v = 128, 300
    args = make_inputs(rng, 18, h, v, bias=True)
    w_q, scales, biases = mx.quantize(args["weight"], group_size=group_size, bits=bits)
    dense = dict(args, weight=mx.dequantize(w_q, scales, biases, group_size=group_size, bits=bits))
    q = dict(hidden=args["hidden"], weight=w_q, targets=args["targets"], bias=args["bias"])
    qopts = dict(scales=scales, biases=biases, group_size=group_size, bits=bits)
    for reduction in ("mean", "none"):
        cot = mx.array(rng.uniform(-1, 1, 18).astype(np.float32)) if reduction == "none" else None
        check_against_reference(dense, mx.float32, cotangent=cot, fused_args=q, argnames=("hidden", "bias"),
                                reduction=reduction, chunk_bytes=100_000, **qopts)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
def test_quantized_16bit_scales(rng, dtype):
    args = make_inputs(rng, 10, 64, 70, dtype=dtype)
    w_q, scales, biases = mx.quantize(args["weight"], group_size=64, bits=4)
    assert scales.dtype == dtype
    # Reference from the same scales in float32 (our dequantisation is float32).
    w = mx.dequantize(w_q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=4)
    r = reference(dict(args, weight=w), reduction="sum")
    loss = fl.linear_cross_entropy(args["hidden"], w_q, args["targets"], scales=scales, biases=biases,
                                   reduction="sum", dtype=mx.float32)
    assert_close(loss, r["loss"], mx.float32, scale=logit_scale(dict(args, weight=w)).sum())


@pytest.mark.parametrize("scale_dt,bias_dt", [(mx.float32, mx.float16), (mx.bfloat16, mx.float32),
                                               (mx.float16, mx.bfloat16)], ids=str)
def test_quantized_scales_and_biases_of_different_dtypes(rng, scale_dt, bias_dt):
    """Biases in another dtype than the scales are promoted with them (exactly;
    they used to be read as the scales' dtype: garbage). The reference takes
    both in float32 (mx.dequantize of mixed dtypes computes in the scales')."""
    args = make_inputs(rng, 10, 64, 70)
    w_q, scales, biases = mx.quantize(args["weight"], group_size=32, bits=4)
    scales, biases = scales.astype(scale_dt), biases.astype(bias_dt)
    w = mx.dequantize(w_q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32,
                      bits=4)
    r = reference(dict(args, weight=w), reduction="sum")
    loss = fl.linear_cross_entropy(args["hidden"], w_q, args["targets"], scales=scales, biases=biases,
                                   group_size=32, reduction="sum", dtype=mx.float32)
    assert_close(loss, r["loss"], mx.float32, scale=logit_scale(dict(args, weight=w)).sum())


def test_quantized_weight_gradient_raises(rng):
    args = make_inputs(rng, 4, 64, 20)
    w_q, scales, biases = mx.quantize(args["weight"], group_size=64, bits=4)

    def f(w):
        return fl.linear_cross_entropy(args["hidden"], w, args["targets"], scales=scales, biases=biases)

    with pytest.raises(ValueError, match="quantized"):
        mx.eval(mx.grad(f)(w_q))


def test_quantized_never_dequantizes_whole_matrix(rng):
    n, h, v = 8, 256, 50_000
    args = make_inputs(rng, n, h, v, peaked=False)
    w_q, scales, biases = mx.quantize(args["weight"], group_size=64, bits=4)
    mx.eval(w_q, scales, biases)
    del args["weight"]
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fl.linear_cross_entropy(args["hidden"], w_q, args["targets"], scales=scales,
                                    biases=biases, chunk_bytes=4 << 20))
    extra = mx.get_peak_memory() - base
    # The working memory is the plan's (a logits chunk plus one dequantised
    # weight tile per thread: it grows with FL_NUM_THREADS), plus O(rows) outputs;
    # a whole float32 copy of the weight would be v*h*4.
    plan_bytes = _ext.linear_cross_entropy_plan(n, h, v, True, False, _ext.num_threads(), 4 << 20)["bytes"]
    assert extra <= plan_bytes + (1 << 20), (extra, plan_bytes)
    assert extra < v * h * 4 / 2, extra


# ---------------------------------------------------------------------------
# transforms

def test_grad_value_and_grad_compile(rng):
    args = make_inputs(rng, 12, 16, 40, bias=True)

    def f(h, w, b):
        return fl.linear_cross_entropy(h, w, args["targets"], b, label_smoothing=0.1)

    prim = (args["hidden"], args["weight"], args["bias"])
    g_plain = mx.grad(f, argnums=(0, 1, 2))(*prim)
    val, g_vg = mx.value_and_grad(f, argnums=(0, 1, 2))(*prim)
    g_comp = mx.compile(mx.grad(f, argnums=(0, 1, 2)))(*prim)
    r = reference(args, label_smoothing=0.1)
    assert abs(val.item() - float(r["loss"])) < 1e-5
    for gs in (g_vg, g_comp):
        for a, b in zip(g_plain, gs):
            np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-5, atol=1e-7)
    loss_only = mx.compile(f)(*prim)
    assert abs(loss_only.item() - float(r["loss"])) < 1e-5


def test_compile_shapeless(rng):
    w = make_inputs(rng, 1, 16, 30, bias=True)

    def step(h, t):
        return mx.value_and_grad(
            lambda x: fl.linear_cross_entropy(x, w["weight"], t, w["bias"], reduction="sum"))(h)

    compiled = mx.compile(step, shapeless=True)
    for n in (5, 9, 1):
        a = make_inputs(rng, n, 16, 30)
        loss, g = compiled(a["hidden"], a["targets"])
        r = reference(dict(a, weight=w["weight"], bias=w["bias"]), reduction="sum")
        assert loss.shape == ()
        assert abs(loss.item() - float(r["loss"])) < 1e-4 * max(1.0, abs(float(r["loss"])))
        np.testing.assert_allclose(to_np(g), r["hidden"], rtol=1e-4, atol=1e-6)


def test_vmap(rng):
    B, n, h, v = 3, 5, 8, 20
    args = make_inputs(rng, B * n, h, v, batch=(B, n))

    def f(x, t):
        return fl.linear_cross_entropy(x, args["weight"], t, reduction="mean")

    out = mx.vmap(f)(args["hidden"], args["targets"])
    for b in range(B):
        r = reference(dict(args, hidden=args["hidden"][b], targets=args["targets"][b]))
        assert abs(out[b].item() - float(r["loss"])) < 1e-5
    # vmap of a gradient: per-batch hidden gradients, weight gradient per batch element
    gw = mx.vmap(mx.grad(lambda w, x, t: fl.linear_cross_entropy(x, w, t, reduction="sum")),
                 in_axes=(None, 0, 0))(args["weight"], args["hidden"], args["targets"])
    assert gw.shape == (B, v, h)
    for b in range(B):
        r = reference(dict(args, hidden=args["hidden"][b], targets=args["targets"][b]), reduction="sum")
        np.testing.assert_allclose(to_np(gw[b]), r["weight"], rtol=1e-4, atol=1e-6)


def test_module(rng):
    args = make_inputs(rng, 10, 8, 12, bias=True)
    crit = fl.nn.LinearCrossEntropyLoss(label_smoothing=0.1, logit_softcap=5.0)
    a = crit(args["hidden"], args["weight"], args["targets"], args["bias"])
    b = fl.linear_cross_entropy(**args, label_smoothing=0.1, logit_softcap=5.0)
    assert a.item() == b.item()
    loss, stats = crit(args["hidden"], args["weight"], args["targets"], return_stats=True)
    assert stats["lse"].shape == (10,)


# ---------------------------------------------------------------------------
# memory: no N x V array, forward or backward

def test_memory_bounded_by_chunk_bytes(rng):
    n, h, v = 256, 32, 60_000  # the logits would be 61 MB
    args = make_inputs(rng, n, h, v, peaked=False)
    mx.eval(args)
    chunk = 2 << 20
    logits_bytes = n * v * 4

    def run(fn):
        mx.eval(fn())  # warm-up (graph, pool)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    fwd = run(lambda: fl.linear_cross_entropy(**args, chunk_bytes=chunk))
    assert fwd < chunk + 4 * 1024 * n, fwd
    grads = mx.grad(lambda x, w: fl.linear_cross_entropy(x, w, args["targets"], chunk_bytes=chunk),
                    argnums=(0, 1))
    bwd = run(lambda: grads(args["hidden"], args["weight"]))
    # float32: the gradients formed in the forward are scaled by the cotangent
    # in place (a copy would add another [V, H] array).
    grad_bytes = (n * h + v * h) * 4
    assert bwd < grad_bytes + chunk + 4 * 1024 * n, (bwd, grad_bytes, logits_bytes)
    assert bwd < logits_bytes / 2
    none_grad = mx.grad(lambda x: (fl.linear_cross_entropy(x, args["weight"], args["targets"],
                                                           reduction="none", chunk_bytes=chunk)
                                   * mx.arange(n)).sum())
    nb = run(lambda: none_grad(args["hidden"]))
    assert nb < logits_bytes / 2, nb


# ---------------------------------------------------------------------------
# the chunk plan, at its thresholds

def test_plan_thresholds():
    def plan(*args):
        p = _ext.linear_cross_entropy_plan(*args)
        return p["rows"], p["vocab_tile"], p["bytes"]

    def dense_rows(h, v):
        # a dense float32 weight's tile (and dW's): at most DENSE_TILE_BYTES of
        # rows, at least MIN_DENSE_TILES tiles (rows a multiple of 16)
        by_bytes = min(v, max(1, _ext.LINEAR_CE_DENSE_TILE_BYTES // (4 * h)))
        return min(by_bytes, math.ceil(math.ceil(v / _ext.LINEAR_CE_MIN_DENSE_TILES) / 16) * 16)

    N, H, V = 100, 64, 1000
    per_row = 4 * V
    dr = dense_rows(H, V)
    assert dr == 128
    # float32 in place: rows = chunk_bytes // (4 V), at least 1, at most N
    assert plan(N, H, V, True, True, 2, per_row * 3 - 1) == (2, dr, per_row * 2)
    assert plan(N, H, V, True, True, 2, per_row * 3) == (3, dr, per_row * 3)
    assert plan(N, H, V, True, True, 2, per_row * 3 + 1) == (3, dr, per_row * 3)
    assert plan(N, H, V, True, True, 2, per_row - 1)[0] == 1
    assert plan(N, H, V, True, True, 2, 1)[0] == 1
    assert plan(N, H, V, True, True, 2, per_row * N + per_row)[0] == N
    # 16-bit hidden: a float32 copy of the chunk's rows counts too; a 16-bit
    # weight: one float32 tile per thread on top. Nothing else depends on the
    # thread count (the chunking decides how dW is summed).
    per_row16 = 4 * V + 4 * H
    tile_rows = min(V, _ext.LINEAR_CE_WEIGHT_TILE_BYTES // (4 * H))
    for threads in (1, 2, 3, 7):
        tiles = threads * tile_rows * 4 * H
        assert plan(N, H, V, False, False, threads, per_row16 * 5) == (5, tile_rows, tiles + per_row16 * 5)
        assert plan(N, H, V, False, False, threads, per_row16 * 5 - 1)[0] == 4
        assert plan(N, H, V, False, True, threads, per_row16 * 5) == (5, dr, per_row16 * 5)
    # weight tile: clamp(tile bytes / 4H, 1, V) rows, at each edge +-1
    h_edge = _ext.LINEAR_CE_WEIGHT_TILE_BYTES // 4  # one weight row fills the tile budget
    assert plan(1, h_edge, 10, True, False, 2, 1)[1] == 1
    assert plan(1, h_edge + 1, 10, True, False, 2, 1)[1] == 1
    assert plan(1, h_edge - 1, 10, True, False, 2, 1)[1] == 1
    assert plan(1, h_edge // 2, 10, True, False, 2, 1)[1] == 2
    v_edge = _ext.LINEAR_CE_WEIGHT_TILE_BYTES // (4 * H)
    assert plan(1, H, v_edge - 1, True, False, 2, 1)[1] == v_edge - 1
    assert plan(1, H, v_edge, True, False, 2, 1)[1] == v_edge
    assert plan(1, H, v_edge + 1, True, False, 2, 1)[1] == v_edge
    # dense float32 weight (read in place) and dW tiles, at each edge of both
    # limits: the byte budget (in H) and the tile count (in V)
    assert (dense_rows(1024, 32000), dense_rows(1024, 151936), dense_rows(64, 31)) == (4000, 4096, 16)
    d_h = _ext.LINEAR_CE_DENSE_TILE_BYTES // 4  # one row fills the budget
    m16 = 16 * _ext.LINEAR_CE_MIN_DENSE_TILES
    cases = [(h, 10) for h in (d_h - 1, d_h, d_h + 1, d_h // 2)]
    cases += [(1024, v) for v in (1, 15, 16, 17, m16 - 1, m16, m16 + 1, 32640, 32641, 32768, 32769, 10**6)]
    for h, v in cases:
        for dense in (True, False):
            p = _ext.linear_cross_entropy_plan(1, h, v, True, dense, 2, 1)
            assert p["dw_tile"] == dense_rows(h, v), (h, v, p)
            if dense:
                assert p["vocab_tile"] == dense_rows(h, v), (h, v, p)
    # dH tiles: min(H, LINEAR_CE_HIDDEN_TILE) columns
    ht = _ext.LINEAR_CE_HIDDEN_TILE
    assert ht % 128 == 0  # column blocks of a quantized weight start on group boundaries
    for h, cols in [(1, 1), (ht - 1, ht - 1), (ht, ht), (ht + 1, ht), (10 * ht, ht)]:
        assert _ext.linear_cross_entropy_plan(1, h, 10, True, True, 2, None)["hidden_tile"] == cols
    assert plan(0, H, V, True, True, 2, None)[0] == 1
    assert _ext.LINEAR_CE_DEFAULT_CHUNK_BYTES == plan(10**9, H, 1, True, True, 2, None)[0] * 4


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_results_at_chunk_threshold(rng, delta):
    """The result must not depend on where the rows are cut (the budget at a
    row boundary +-1 byte), with a 16-bit weight converted tile by tile."""
    n, h, v = 7, 16, 50
    args = make_inputs(rng, n, h, v, dtype=mx.bfloat16, bias=True)
    budget = 3 * (4 * v + 4 * h) + delta
    check_against_reference(args, mx.bfloat16, reduction="sum", chunk_bytes=budget)


# ---------------------------------------------------------------------------
# bad input: a clear exception naming the argument, before any kernel runs

def test_bad_input(rng):
    a = make_inputs(rng, 4, 8, 10, bias=True)
    h, w, t, b = a["hidden"], a["weight"], a["targets"], a["bias"]
    lce = fl.linear_cross_entropy
    assert_raises_naming(ValueError, "weight", lce, h, w[:, :7], t)
    assert_raises_naming(ValueError, "weight", lce, h, w.reshape(-1), t)
    assert_raises_naming(ValueError, "targets", lce, h, w, t[:3])
    assert_raises_naming(TypeError, "targets", lce, h, w, t.astype(mx.float32))
    assert_raises_naming(ValueError, "bias", lce, h, w, t, b[:9])
    assert_raises_naming(TypeError, "hidden", lce, h.astype(mx.int32), w, t)
    assert_raises_naming(ValueError, "hidden", lce, mx.array(1.0), w, t)
    assert_raises_naming(ValueError, "reduction", lce, h, w, t, reduction="avg")
    assert_raises_naming(ValueError, "label_smoothing", lce, h, w, t, label_smoothing=1.0)
    assert_raises_naming(ValueError, "label_smoothing_mode", lce, h, w, t, label_smoothing_mode="x")
    assert_raises_naming(ValueError, "z_loss", lce, h, w, t, z_loss=-1.0)
    assert_raises_naming(ValueError, "logit_softcap", lce, h, w, t, logit_softcap=0.0)
    assert_raises_naming(ValueError, "chunk_bytes", lce, h, w, t, chunk_bytes=0)
    assert_raises_naming(TypeError, "mask", lce, h, w, t, mask=mx.ones(4))
    assert_raises_naming(ValueError, "mask", lce, h, w, t, mask=mx.ones(3, mx.bool_))
    assert_raises_naming(TypeError, "dtype", lce, h, w, t, dtype=mx.int32)
    assert_raises_naming(ValueError, "weight", lce, h, mx.zeros((0, 8)), t)
    # quantized heads
    hq = mx.ones((4, 128))
    w_q, s, qb = mx.quantize(mx.ones((10, 128)), group_size=64, bits=4)
    assert_raises_naming(ValueError, "bits", lce, hq, w_q, t, scales=s, biases=qb, bits=3)
    assert_raises_naming(ValueError, "group_size", lce, hq, w_q, t, scales=s, biases=qb, group_size=16)
    assert_raises_naming(ValueError, ["scales", "group_size"], lce, hq, w_q, t, scales=s, biases=qb,
                         group_size=32)
    assert_raises_naming(ValueError, ["H", "columns"], lce, hq, w_q, t, scales=s, biases=qb, bits=8)
    assert_raises_naming(ValueError, ["hidden", "H"], lce, mx.ones((4, 64)), w_q, t, scales=s, biases=qb)
    assert_raises_naming(ValueError, "biases", lce, hq, w_q, t, scales=s)
    assert_raises_naming(ValueError, "scales", lce, hq, w_q, t, biases=qb)
    assert_raises_naming(TypeError, "uint32", lce, hq, mx.ones((10, 16)), t, scales=s, biases=qb)
    assert_raises_naming(ValueError, "biases", lce, hq, w_q, t, scales=s, biases=qb[:5])


# ---- per-token weights= ------------------------------------------------------
GRAD_TOL = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("v", [1, 31, 33, 4097])
def test_token_weights(rng, v, dtype, reduction):
    """Per-token weights multiply each row's loss (cross_entropy's weights=):
    loss and gradients w.r.t. hidden, weight, bias and the weights against
    float64, with ignored rows and a non-uniform cotangent for "none"."""
    n, h = 11, 7
    args = make_inputs(rng, n, h, v, dtype=dtype, bias=True)
    t = np.array(args["targets"]).astype(np.int64)
    t[::4] = -100
    args["targets"] = mx.array(t.astype(np.int32))
    tw64 = rng.uniform(0.2, 2.0, n)
    tw = mx.array(tw64.astype(np.float32)).astype(dtype)
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=6.0,
                reduction=reduction)
    cot64 = rng.uniform(0.5, 1.5, n) if reduction == "none" else np.array(1.0)
    np_args = {k: to_np(x) for k, x in args.items()}
    want = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                    np_args["bias"], weights=to_np(tw), cotangent=cot64, **opts)
    # d loss / d weights_r = the row's unweighted loss times its cotangent
    rows = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                    np_args["bias"], **dict(opts, reduction="none"))["loss"]
    kept = max(int((t != -100).sum()), 1)
    dw_want = rows * (cot64 if reduction == "none" else 1.0) / (kept if reduction == "mean" else 1.0)

    def f(hid, w, b, tok):
        return fl.linear_cross_entropy(hid, w, args["targets"], b, weights=tok, dtype=mx.float32,
                                       **opts)

    primals = [args["hidden"], args["weight"], args["bias"], tw]
    (loss,), grads = mx.vjp(lambda *p: [f(*p)], primals, [mx.array(cot64.astype(np.float32))])
    np.testing.assert_allclose(to_np(loss), want["loss"], rtol=2e-5,
                               atol=2e-5 * max(1.0, np.abs(want["loss"]).max()))
    tol = GRAD_TOL[dtype]
    # (absolute floor: one row's share of the loss, the size of the terms that
    # cancel in a sum over rows, as in the bias gradient at V = 1)
    floor = 1.0 / kept if reduction == "mean" else 1.0
    for got, exp, name in zip(grads, (want["hidden"], want["weight"], want["bias"], dw_want),
                              ("hidden", "weight", "bias", "weights")):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(to_np(got), exp, rtol=tol,
                                   atol=tol * max(floor, np.abs(exp).max()), err_msg=name)


def test_token_weights_rejected(rng):
    args = make_inputs(rng, 4, 3, 5)
    with pytest.raises(ValueError, match=r"weights \(per-token\) must have targets' shape"):
        fl.linear_cross_entropy(**args, weights=mx.ones((5,)))
    with pytest.raises(TypeError, match=r"weights \(per-token\) must be floating"):
        fl.linear_cross_entropy(**args, weights=mx.ones((4,), mx.int32))


# ---- Apple Cut Cross-Entropy's forward cases (tests/test_cce_loss_forward.py) --
# As our tests: their shapes (N, V, D), inputs (e ~ N(0, 1/D), c ~ N(0, 1),
# half of c's first rows copied from e: peaked rows; bias * 0.01), 20% of the
# targets ignored, soft-cap None or 20, reduction "none", and their bound:
# |truth - ours| <= |truth - plain| + error_tol, truth the float64 loss of
# the rounded inputs, "plain" the loss of the logits rounded to the dtype
# (their torch reference). Without shift= (not an option here). The loss
# runs through the fused linear CE and through cross_entropy on the logits.
CCE_TOL = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 1e-2}


@pytest.mark.parametrize("shape", [(256, 512, 128), (252, 507, 128), (252, 507, 123)], ids=str)
@pytest.mark.parametrize("invalids", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cce_forward_cases(dtype, softcap, has_bias, invalids, shape):
    N, V, D = shape
    rng = np.random.default_rng(0)
    e = rng.standard_normal((N, D)) / D ** 0.5
    c = rng.standard_normal((V, D))
    c[: min(N, V) // 2] = e[: min(N, V) // 2]
    e, c = (mx.array(a.astype(np.float32)).astype(dtype) for a in (e, c))
    bias = mx.array((rng.standard_normal(V) * 0.01).astype(np.float32)).astype(dtype) if has_bias else None
    t = rng.integers(0, V, N)
    if invalids:
        t[rng.permutation(N)[: int(0.2 * N)]] = -100
    e64, c64 = to_np(e), to_np(c)
    z64 = e64 @ c64.T + (to_np(bias) if has_bias else 0.0)
    truth = ref.cross_entropy(ref.softcap(z64, softcap), t, ignore_index=-100)
    logits = mx.array(z64.astype(np.float32)).astype(dtype)  # what a model in dtype would hold
    plain = ref.cross_entropy(ref.softcap(to_np(logits), softcap), t, ignore_index=-100)
    bound = np.abs(truth - plain) + CCE_TOL[dtype]
    opts = dict(ignore_index=-100, logit_softcap=softcap, reduction="none", dtype=mx.float32)
    fused = to_np(fl.linear_cross_entropy(e.reshape(4, -1, D), c, mx.array(t).reshape(4, -1), bias,
                                          **opts)).reshape(-1)
    assert np.all(np.abs(truth - fused) <= CCE_TOL[dtype]), np.abs(truth - fused).max()
    on_logits = to_np(fl.cross_entropy(logits, mx.array(t), **opts))
    assert np.all(np.abs(truth - on_logits) <= bound), (np.abs(truth - on_logits) - bound).max()


# ---- argmax in return_stats, token_scaling, shift= ------------------------------
@pytest.mark.parametrize("v", [1, 33, 2049, 4097])
def test_stats_argmax(rng, v):
    """stats["argmax"]: mx.argmax of the (capped) logits, int64: ties between
    duplicated weight rows across the CPU's 2048-column blocks (the first
    wins), a -inf bias column, ignored rows; the [B, T] shape."""
    n, h = 12, 16
    args = make_inputs(rng, n, h, v, bias=True, batch=(3, 4))
    w = np.array(args["weight"])
    if v > 3:
        w[v - 1] = w[v // 2] = w[1] * 3.0  # the same logit at three columns: v // 2 wins over v - 1
        w[1] = w[v // 2]
    b = np.array(args["bias"])
    if v > 3:
        b[[1, v // 2, v - 1]] = 5.0
        b[2] = -np.inf
    args["weight"], args["bias"] = mx.array(w), mx.array(b)
    t = np.array(args["targets"]).astype(np.int64)
    t[0, 1] = -100
    args["targets"] = mx.array(t)
    for cap in (None, 4.0):
        _, stats = fl.linear_cross_entropy(**args, ignore_index=-100, logit_softcap=cap,
                                           return_stats=True, reduction="none")
        z = args["hidden"] @ args["weight"].T + args["bias"]
        if cap is not None:
            z = cap * mx.tanh(z / cap)
        assert stats["argmax"].dtype == mx.int64 and stats["argmax"].shape == (3, 4)
        want = np.array(mx.argmax(z, axis=-1)).astype(np.int64)
        got = np.array(stats["argmax"])
        # (rows whose top two logits are closer than the GEMMs' rounding may differ)
        zs = np.sort(to_np(z), -1)
        clear = (zs[..., -1] - zs[..., -2] > 1e-4) if v > 1 else np.ones((3, 4), bool)
        ties = (to_np(z) == zs[..., -1:]).sum(-1) > 1
        np.testing.assert_array_equal(got[clear | ties], want[clear | ties])
        if v > 3 and cap is None:
            tied_rows = np.where(ties)
            assert np.all(got[tied_rows] <= v // 2) and len(tied_rows[0]) >= 1


def _token_scale_f64(np_args, opts):
    z = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                 np_args.get("bias"), logit_softcap=opts.get("logit_softcap"),
                                 reduction="none")["logits"]
    p = np.exp(z - ref.logsumexp(z)[:, None])
    t = np.asarray(np_args["targets"], np.int64).reshape(-1)
    V = z.shape[-1]
    kept = (t >= 0) & (t < V) & (t != opts.get("ignore_index", -100))
    return np.where(kept, p[np.arange(len(t)), np.clip(t, 0, V - 1)], 0.0).reshape(
        np.shape(np_args["targets"]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("v", [1, 33, 4097])
def test_token_scaling(rng, v, dtype, reduction):
    """token_scaling: each row's loss times its target's probability,
    detached: the float64 loss with per-token weights p_t (and the given
    weights), and its gradients; ignored rows; equal to cross_entropy's
    token_scaling on the logits."""
    n, h = 11, 7
    args = make_inputs(rng, n, h, v, dtype=dtype, bias=True)
    t = np.array(args["targets"]).astype(np.int64)
    t[::4] = -100
    args["targets"] = mx.array(t.astype(np.int32))
    tw64 = rng.uniform(0.5, 1.5, n)
    tw = mx.array(tw64.astype(np.float32))
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=6.0,
                reduction=reduction)
    np_args = {k: to_np(x) for k, x in args.items()}
    p64 = _token_scale_f64(np_args, opts)
    cot64 = rng.uniform(0.5, 1.5, n) if reduction == "none" else np.array(1.0)
    want = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                    np_args["bias"], weights=tw64 * p64, cotangent=cot64, **opts)

    def f(hid, w, b):
        return fl.linear_cross_entropy(hid, w, args["targets"], b, weights=tw, token_scaling=True,
                                       dtype=mx.float32, **opts)

    (loss,), grads = mx.vjp(lambda *p: [f(*p)], [args["hidden"], args["weight"], args["bias"]],
                            [mx.array(cot64.astype(np.float32))])
    np.testing.assert_allclose(to_np(loss), want["loss"], rtol=2e-5,
                               atol=2e-5 * max(1.0, np.abs(want["loss"]).max()))
    tol = GRAD_TOL[dtype]
    for got, name in zip(grads, GRAD_NAMES):
        np.testing.assert_allclose(to_np(got), want[name], rtol=tol,
                                   atol=tol * max(1.0 / n, np.abs(want[name]).max()), err_msg=name)
    if dtype == mx.float32:
        z = args["hidden"] @ args["weight"].T + args["bias"]
        on_logits = fl.cross_entropy(z, args["targets"], tw, token_scaling=True, **opts)
        np.testing.assert_allclose(to_np(loss), to_np(on_logits), rtol=2e-5, atol=2e-6)


def test_token_scaling_liger_case(rng):
    """Liger-Kernel's test_correctness_token_scaling (B*T = 8, H = 8, V = 16,
    bias, reduction "none") with its tolerances (1e-4) against float64."""
    h64, W64, b64 = rng.normal(size=(8, 8)), rng.normal(size=(16, 8)), rng.normal(size=16)
    t64 = rng.integers(0, 16, 8)
    args = dict(hidden=mx.array(h64.astype(np.float32)), weight=mx.array(W64.astype(np.float32)),
                targets=mx.array(t64), bias=mx.array(b64.astype(np.float32)))
    np_args = {k: to_np(x) for k, x in args.items()}
    p64 = _token_scale_f64(np_args, {})
    want = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], t64, np_args["bias"],
                                    weights=p64, reduction="none", ignore_index=-100)
    loss, grads = mx.value_and_grad(lambda hid: fl.linear_cross_entropy(
        hid, args["weight"], args["targets"], args["bias"], ignore_index=-100, reduction="none",
        token_scaling=True).sum())(args["hidden"])
    np.testing.assert_allclose(to_np(loss), want["loss"].sum(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(to_np(grads), want["hidden"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [1, 3, True])
def test_shift(rng, shift, reduction):
    """shift=s (Cut Cross-Entropy's): equal to the loss of hidden[..., :-s, :]
    against targets[..., s:] (loss, stats and every gradient, hidden's for
    the last s rows 0), with ignored targets, a mask and per-token weights
    that follow the targets; "none" has shape [..., T - s]."""
    s = int(shift)
    B, T, h, v = 2, 7, 8, 37
    args = make_inputs(rng, B * T, h, v, bias=True, batch=(B, T))
    t = np.array(args["targets"]).astype(np.int64)
    t[0, 4] = -100
    args["targets"] = mx.array(t)
    mask = mx.array(rng.uniform(size=(B, T)) < 0.8)
    tw = mx.array(rng.uniform(0.5, 1.5, (B, T)).astype(np.float32))
    opts = dict(ignore_index=-100, label_smoothing=0.1, reduction=reduction, return_stats=True)

    def shifted(hid, w, b):
        return fl.linear_cross_entropy(hid, w, args["targets"], b, shift=shift, mask=mask,
                                       weights=tw, **opts)

    def sliced(hid, w, b):
        return fl.linear_cross_entropy(hid[:, : T - s], w, args["targets"][:, s:], b,
                                       mask=mask[:, s:], weights=tw[:, s:], **opts)

    primals = [args["hidden"], args["weight"], args["bias"]]
    (a, sa), (b, sb) = shifted(*primals), sliced(*primals)
    assert a.shape == b.shape and (reduction != "none" or a.shape == (B, T - s))
    np.testing.assert_allclose(to_np(a), to_np(b), rtol=1e-6, atol=1e-6)
    for k in sa:
        assert sa[k].shape == sb[k].shape == (B, T - s), k
        np.testing.assert_allclose(to_np(sa[k]), to_np(sb[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    ga = mx.grad(lambda *p: shifted(*p)[0].sum(), argnums=(0, 1, 2))(*primals)
    gb = mx.grad(lambda *p: sliced(*p)[0].sum(), argnums=(0, 1, 2))(*primals)
    for x, y, name in zip(ga, gb, GRAD_NAMES):
        np.testing.assert_allclose(to_np(x), to_np(y), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.any(to_np(ga[0])[:, T - s:])


def test_shift_token_scaling_rejected(rng):
    args = make_inputs(rng, 6, 4, 5, batch=(2, 3))
    for bad in (3, -1, 7):
        with pytest.raises(ValueError, match=r"shift must be in \[0, T\)"):
            fl.linear_cross_entropy(**args, shift=bad)
    with pytest.raises(TypeError, match="shift must be an int"):
        fl.linear_cross_entropy(**args, shift=1.5)
    with pytest.raises(TypeError, match="token_scaling must be a bool"):
        fl.linear_cross_entropy(**args, token_scaling="yes")


# ---- class_weights= and probability targets ------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [1, 33, 4097])
@pytest.mark.parametrize("opts", [
    dict(),  # the fused kernel alone (per-token weights w_t)
    dict(logit_softcap=5.0),
    dict(label_smoothing=0.1, z_loss=1e-3),  # + the row statistics' lse and the linear sums
    dict(label_smoothing=0.2, label_smoothing_mode="others"),
], ids=["plain", "cap", "smooth_z", "others"])
def test_class_weights(rng, v, opts, reduction):
    """class_weights= as cross_entropy's (PyTorch's weighted mean, the z term
    over kept rows): loss and gradients (hidden, weight, bias) against
    float64, with ignored rows and per-token weights; scale-invariant mean."""
    n, h = 11, 7
    args = make_inputs(rng, n, h, v, bias=True)
    t = np.array(args["targets"]).astype(np.int64)
    t[::4] = -100
    args["targets"] = mx.array(t.astype(np.int32))
    cw64 = rng.uniform(0.2, 2.0, v)
    cw = mx.array(cw64.astype(np.float32))
    tw64 = rng.uniform(0.5, 1.5, n)
    tw = mx.array(tw64.astype(np.float32))
    kw = dict(ignore_index=-100, reduction=reduction, **opts)
    np_args = {k: to_np(x) for k, x in args.items()}
    cot64 = rng.uniform(0.5, 1.5, n) if reduction == "none" else np.array(1.0)
    want = ref.linear_cross_entropy(np_args["hidden"], np_args["weight"], np_args["targets"],
                                    np_args["bias"], weights=tw64, class_weights=to_np(cw),
                                    cotangent=cot64, **kw)

    def f(hid, w, b, scale=1.0):
        return fl.linear_cross_entropy(hid, w, args["targets"], b, weights=tw,
                                       class_weights=cw * scale, dtype=mx.float32, **kw)

    primals = [args["hidden"], args["weight"], args["bias"]]
    (loss,), grads = mx.vjp(lambda *p: [f(*p)], primals, [mx.array(cot64.astype(np.float32))])
    np.testing.assert_allclose(to_np(loss), want["loss"], rtol=3e-5,
                               atol=3e-5 * max(1.0, np.abs(want["loss"]).max()))
    for got, name in zip(grads, GRAD_NAMES):
        np.testing.assert_allclose(to_np(got), want[name], rtol=1e-4,
                                   atol=1e-4 * max(1.0 / n, np.abs(want[name]).max()), err_msg=name)
    if reduction == "mean":
        np.testing.assert_allclose(to_np(f(*primals, scale=10.0)), to_np(loss), rtol=1e-5)
    if v > 1:  # the same numbers as cross_entropy on the logits
        z = args["hidden"] @ args["weight"].T + args["bias"]  # (cross_entropy applies the cap)
        on_logits = fl.cross_entropy(z, args["targets"], tw, class_weights=cw, **kw)
        np.testing.assert_allclose(to_np(loss), to_np(on_logits), rtol=3e-5, atol=3e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [1, 33, 4097])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(rng, v, weighted, reduction):
    """Targets [..., V] of probabilities (PyTorch's LinearCrossEntropyLoss),
    with label smoothing and z-loss, optionally class-weighted: loss and the
    gradients w.r.t. hidden, weight, bias and the targets against float64."""
    n, h = 9, 7
    args = make_inputs(rng, n, h, v, bias=True, batch=(3, 3))
    q64 = rng.dirichlet(np.ones(v), (3, 3)) if v > 1 else np.ones((3, 3, 1))
    q = mx.array(q64.astype(np.float32))
    cw = mx.array(rng.uniform(0.2, 2.0, v).astype(np.float32)) if weighted else None
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    np_args = {k: to_np(x) for k, x in args.items()}
    h64, W64, b64 = np_args["hidden"].reshape(-1, h), np_args["weight"], np_args["bias"]
    z64 = h64 @ W64.T + b64
    tq = to_np(q).reshape(-1, v)
    cot64 = rng.uniform(0.5, 1.5, (3, 3)) if reduction == "none" else np.array(1.0)
    ref_kw = dict(kw, class_weights=None if cw is None else to_np(cw))
    want = ref.cross_entropy(z64, tq, **ref_kw)
    dz = ref.cross_entropy_grad(z64, tq, cotangent=None if reduction != "none" else cot64.reshape(-1),
                                **ref_kw)

    def f(hid, w, b, p):
        return fl.linear_cross_entropy(hid, w, p, b, class_weights=cw, dtype=mx.float32, **kw)

    primals = [args["hidden"], args["weight"], args["bias"], q]
    (loss,), grads = mx.vjp(lambda *p: [f(*p)], primals, [mx.array(cot64.astype(np.float32))])
    want_loss = want.reshape(3, 3) if reduction == "none" else want
    np.testing.assert_allclose(to_np(loss), want_loss, rtol=3e-5, atol=3e-5 * max(1.0, np.abs(want).max()))
    exp = dict(hidden=(dz @ W64).reshape(3, 3, h), weight=dz.T @ h64, bias=dz.sum(0))
    for got, name in zip(grads, GRAD_NAMES):
        np.testing.assert_allclose(to_np(got), exp[name], rtol=1e-4,
                                   atol=1e-4 * max(1.0 / n, np.abs(exp[name]).max()), err_msg=name)
    on_logits = fl.cross_entropy(args["hidden"] @ args["weight"].T + args["bias"], q, class_weights=cw, **kw)
    np.testing.assert_allclose(to_np(loss), to_np(on_logits), rtol=3e-5, atol=3e-6)
    # d loss / d q_j = c_target w_j (lse - z_j) times the cotangent
    g_q = ref.cross_entropy_grad_targets(z64, tq, cotangent=None if reduction != "none" else cot64.reshape(-1),
                                         **ref_kw)
    np.testing.assert_allclose(to_np(grads[3]).reshape(-1, v), g_q, rtol=1e-4,
                               atol=1e-4 * max(1.0, np.abs(g_q).max()))


def test_class_weights_and_probabilities_rejected(rng):
    args = make_inputs(rng, 4, 3, 5, bias=True)
    cw = mx.ones((5,))
    with pytest.raises(ValueError, match=r"class_weights must have shape \(5,\)"):
        fl.linear_cross_entropy(**args, class_weights=mx.ones((4,)))
    with pytest.raises(ValueError, match="class_weights must not hold NaN"):
        fl.linear_cross_entropy(**args, class_weights=cw * float("nan"))
    with pytest.raises(ValueError, match="dense head without logit_softcap"):
        fl.linear_cross_entropy(**args, class_weights=cw, label_smoothing=0.1, logit_softcap=3.0)
    p = mx.softmax(mx.ones((4, 5)), axis=-1)
    with pytest.raises(ValueError, match="dense head without logit_softcap"):
        fl.linear_cross_entropy(args["hidden"], args["weight"], p, logit_softcap=3.0)
    with pytest.raises(ValueError, match=r"probability targets must have shape \(4, 5\)"):
        fl.linear_cross_entropy(args["hidden"], args["weight"], mx.ones((4, 6)))
    with pytest.raises(ValueError, match="ignore_index=0 applies to class-index targets"):
        fl.linear_cross_entropy(args["hidden"], args["weight"], p, ignore_index=0)
    with pytest.raises(TypeError, match="integer dtype"):
        fl.linear_cross_entropy(args["hidden"], args["weight"], mx.ones((4,)))


# ---- Apple Cut Cross-Entropy's backward cases (tests/test_cce_loss_backward.py) --
# As our tests: their shapes, inputs (e ~ N(0, 1/D) viewed as [4, N/4, D],
# c ~ N(0, 1) with its first rows copied from e, bias ~ N(0, 0.02^2)), 20% of
# the targets ignored, soft-cap None or 20, shift False/True, reductions, and
# their objective: the loss ("sum" divided by the kept rows) averaged, plus
# with z_loss the mean over kept rows of lse^2 (here z_loss = 1 on the kept
# rows' mean: N'/kept for "none", whose mean runs over every row). Their
# bound on each gradient element: |truth - ours| <= |truth - plain| +
# error_tol, truth the float64 gradient of the rounded inputs, "plain" the
# gradient of logits computed and held in the dtype (their torch reference),
# emulated here in float64 with the dtype's roundings. (Their three
# implementations are one here.)
CCE_BWD_TOL = {mx.float32: 5e-4, mx.float16: 1e-3, mx.bfloat16: 1e-2}


def _round(a, dtype):
    return to_np(mx.array(np.asarray(a, np.float32)).astype(dtype))


def _cce_softmax64(e, c, b, cap, dtype=None):
    """(z, dz/dy, lse, p) of the float64 logits of the rounded inputs; with
    dtype: the logits and their soft-cap rounded to it as a model in that
    dtype holds them (the plain reference)."""
    rd = (lambda a: _round(a, dtype)) if dtype is not None else (lambda a: a)
    y = rd(e @ c.T)
    if b is not None:
        y = rd(y + b)
    if cap is not None:
        th = np.tanh(y / cap)
        z, dzdy = rd(cap * th), 1.0 - th * th
    else:
        z, dzdy = y, 1.0
    lse = ref.logsumexp(z)
    return z, dzdy, lse, np.exp(z - lse[:, None])


def _cce_grads64(e, c, b, t, softmax, row_cot, z_cot, dtype=None):
    """d objective / d (e, c, b) in float64 from _cce_softmax64's parts; with
    dtype, dZ and the GEMMs' results rounded to it too."""
    rd = (lambda a: _round(a, dtype)) if dtype is not None else (lambda a: a)
    _, dzdy, lse, p = softmax
    kept = t != -100
    dz = row_cot[:, None] * p * kept[:, None] + (z_cot * 2 * lse)[:, None] * p
    dz[np.arange(len(t))[kept], t[kept]] -= row_cot[kept]
    dz = rd(dz * dzdy)
    out = [rd(dz @ c), rd(dz.T @ e)]
    if b is not None:
        out.append(rd(dz.sum(0)))
    return out


_CCE_INPUTS = {}


def _cce_case_inputs(dtype, softcap, has_bias, shift, invalids, shape):
    """The case's inputs and both softmaxes, shared by its 6 (reduction, z_loss) variants."""
    key = (str(dtype), softcap, has_bias, shift, invalids, shape)
    if key not in _CCE_INPUTS:
        if len(_CCE_INPUTS) > 8:
            _CCE_INPUTS.clear()
        N, V, D = shape
        rng = np.random.default_rng(0)
        e = rng.standard_normal((N, D)) / D ** 0.5
        c = rng.standard_normal((V, D))
        c[: min(N, V) // 2] = e[: min(N, V) // 2]
        t = rng.integers(0, V, N)
        if invalids:
            t[rng.permutation(N)[: int(0.2 * N)]] = -100
        e, c = (mx.array(a.astype(np.float32)).astype(dtype) for a in (e, c))
        bias = (mx.array((rng.standard_normal(V) * 0.02).astype(np.float32)).astype(dtype)
                if has_bias else None)
        e3, t2 = e.reshape(4, -1, D), mx.array(t).reshape(4, -1)
        s = int(shift)  # the rows the objective sees: hidden t against target t + shift
        e64 = to_np(e3)[:, : e3.shape[1] - s].reshape(-1, D)
        t64 = np.array(t2)[:, s:].reshape(-1)
        c64, b64 = to_np(c), (to_np(bias) if has_bias else None)
        _CCE_INPUTS[key] = (e3, c, bias, t2, e64, c64, b64, t64,
                            _cce_softmax64(e64, c64, b64, softcap),
                            _cce_softmax64(e64, c64, b64, softcap, dtype))
    return _CCE_INPUTS[key]


@pytest.mark.parametrize("shape", [(256, 512, 128), (252, 507, 128), (252, 507, 123)], ids=str)
@pytest.mark.parametrize("z_loss", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("invalids", [False, True])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cce_backward_cases(dtype, softcap, has_bias, shift, invalids, reduction, z_loss, shape):
    D = shape[2]
    e3, c, bias, t2, e64, c64, b64, t64, soft_truth, soft_plain = _cce_case_inputs(
        dtype, softcap, has_bias, shift, invalids, shape)
    s = int(shift)
    n_rows, kept = len(t64), max(int((t64 != -100).sum()), 1)
    row_cot = np.full(n_rows, 1.0 / (n_rows if reduction == "none" else kept))
    z_cot = np.where(t64 != -100, 1.0 / kept, 0.0) if z_loss else np.zeros(n_rows)
    truth = _cce_grads64(e64, c64, b64, t64, soft_truth, row_cot, z_cot)
    plain = _cce_grads64(e64, c64, b64, t64, soft_plain, row_cot, z_cot, dtype)

    def objective(*p):
        hid, w = p[0], p[1]
        b = p[2] if has_bias else None
        z = float(z_loss) * (n_rows / kept if reduction == "none" else 1.0)
        loss = fl.linear_cross_entropy(hid, w, t2, b, ignore_index=-100, logit_softcap=softcap,
                                       shift=shift, reduction=reduction, z_loss=z, dtype=mx.float32)
        return loss / kept if reduction == "sum" else loss.mean()

    primals = [e3, c] + ([bias] if has_bias else [])
    grads = [to_np(g) for g in mx.grad(objective, argnums=tuple(range(len(primals))))(*primals)]
    assert not np.any(grads[0][:, e3.shape[1] - s:])  # the shifted-out rows get no gradient
    grads[0] = grads[0][:, : e3.shape[1] - s].reshape(-1, D)
    for i, (ours, gt, pl) in enumerate(zip(grads, truth, plain)):
        bound = np.abs(gt - pl) + CCE_BWD_TOL[dtype]
        err = np.abs(gt - ours)
        assert np.all(err <= bound), (i, float((err - bound).max()))
