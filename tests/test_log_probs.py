"""The scorer: per-row statistics (_ext.linear_row_stats / _ext.row_stats) and
the public linear_log_probs / log_probs built on them, against float64 NumPy
on materialised logits: values, gradients with a different cotangent for
every token and every output (Liger #968: a summed weight gradient scaled by
one scalar is wrong for per-token losses), options, dtypes, quantized heads,
sharded heads (vocab_start), transforms, memory and bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import DTYPES, EPS32, SCALE_ULPS, assert_close, assert_raises_naming, dtype_id, to_np

fl = pytest.importorskip("mlx_fused_losses")
from mlx_fused_losses import _ext  # noqa: E402

DIFF = ("lse", "target", "logit_sum", "expected")
ALL = DIFF + ("max", "argmax")


# ---------------------------------------------------------------------------
# float64 reference on materialised logits

def ref_logits(y, temperature=1.0, cap=None):
    """z = softcap(y) / T in float64."""
    y = np.asarray(y, np.float64)
    return (cap * np.tanh(y / cap) if cap else y) / temperature


def ref_stats(y, targets, temperature=1.0, cap=None, ignore_index=None, vocab_start=None):
    """Every statistic of ops/row_stats.h, float64 (argmax int)."""
    z = ref_logits(y, temperature, cap)
    n, v = z.shape
    m = z.max(-1, initial=-np.inf)
    ref = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.exp(z - ref[:, None])
        s = e.sum(-1)
        lse = ref + np.log(s)
        p = e / s[:, None]
        expected = (np.where(p > 0, p * z, 0.0)).sum(-1) if v else np.zeros(n)
        expected = np.where(s > 0, expected, np.nan)
    t = np.asarray(targets, np.int64)
    start = 0 if vocab_start is None else vocab_start
    local = t - start
    ignored = (t == ignore_index) if ignore_index is not None else np.zeros(n, bool)
    inside = (local >= 0) & (local < v)
    target = np.where(inside & ~ignored, z[np.arange(n), np.clip(local, 0, v - 1)], 0.0)
    if vocab_start is None:
        target = np.where(~inside & ~ignored, np.nan, target)
    return dict(lse=lse, target=target, logit_sum=z.sum(-1), expected=expected, max=m,
                argmax=start + z.argmax(-1), z=z, p=p, local=local, kept=inside & ~ignored)


def ref_grad_y(y, targets, g, temperature=1.0, cap=None, ignore_index=None, vocab_start=None,
               magnitude=False):
    """dL/dy for L = sum_r sum_stat g[stat]_r stat_r (math/row_stats.h).
    magnitude=True: instead the size of the float32 rounding of each element,
    the sum of its terms' magnitudes times the row's largest |z| (p_j =
    exp(z_j - lse) carries ~|z| eps relative error; (1 + z_j) - expected
    cancels where p_j is near 1)."""
    r = ref_stats(y, targets, temperature, cap, ignore_index, vocab_start)
    z, p = r["z"], r["p"]
    n, v = z.shape
    zero = np.zeros(n)
    g_lse, g_t, g_sum, g_e = (np.asarray(g.get(k, zero), np.float64) for k in DIFF)
    with np.errstate(invalid="ignore"):
        if magnitude:
            coef = np.abs(g_lse)[:, None] + np.abs(g_e)[:, None] * (1.0 + np.abs(z) + np.abs(r["expected"])[:, None])
            zmag = np.maximum(1.0, np.abs(np.where(np.isfinite(z), z, 0)).max(-1, initial=0.0))[:, None]
            dz = np.where(p > 0, p * coef * zmag, 0.0) + np.abs(g_sum)[:, None]
        else:
            coef = g_lse[:, None] + g_e[:, None] * (1.0 + z - r["expected"][:, None])
            dz = np.where(p > 0, p * coef, 0.0) + g_sum[:, None]
    rows = np.nonzero(r["kept"])[0]
    dz[rows, r["local"][rows]] += np.abs(g_t[rows]) if magnitude else g_t[rows]
    chain = (1.0 - np.tanh(np.asarray(y, np.float64) / cap) ** 2 if cap else 1.0) / temperature
    return dz * (np.abs(chain) if magnitude else chain)


def test_reference_gradient_by_finite_differences():
    """The reference gradient itself, against central differences in
    float64, every statistic at once (so the kernels are judged against the
    derivative, not a copy of their own formula)."""
    rng = np.random.default_rng(0)
    y = rng.standard_normal((4, 9)) * 3
    t = np.array([0, 8, 3, -100])
    g = {k: rng.standard_normal(4) for k in DIFF}
    for temperature, cap in ((1.0, None), (0.7, 4.0)):
        def loss(yy):
            r = ref_stats(yy, t, temperature, cap, -100)
            return sum((g[k] * r[k]).sum() for k in DIFF)
        num = np.zeros_like(y)
        for idx in np.ndindex(*y.shape):
            d = np.zeros_like(y)
            d[idx] = 1e-6
            num[idx] = (loss(y + d) - loss(y - d)) / 2e-6
        np.testing.assert_allclose(ref_grad_y(y, t, g, temperature, cap, -100), num, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# inputs

def make_head(rng, n, h, v, dtype=mx.float32, bias=True, peaked=True):
    x = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    t = rng.integers(0, v, n)
    if peaked and n:
        for r in range(min(n, 4)):  # a few rows whose target logit stands out
            w[t[r]] += 8.0 * x[r] / max(float(x[r] @ x[r]), 1e-6)
    out = dict(hidden=mx.array(x).astype(dtype), weight=mx.array(w).astype(dtype), targets=mx.array(t))
    if bias:
        out["bias"] = mx.array(rng.standard_normal(v).astype(np.float32)).astype(dtype)
    return out


def logits64(args, w=None):
    x = to_np(args["hidden"])
    w = to_np(args["weight"]) if w is None else w
    y = x.reshape(-1, x.shape[-1]) @ w.T
    if "bias" in args:
        y = y + to_np(args["bias"])
    return y


def grad_scales(y, t, g, x, w, **options):
    """float32 rounding sizes (assert_close's scale) of dY, dH = dY W,
    dW = dY^T X and dbias = column sums of dY."""
    m = ref_grad_y(y, t, g, magnitude=True, **options) + 1e-30
    return dict(dy=m, dh=m @ np.abs(w), dw=m.T @ np.abs(x), db=m.sum(0))


SHAPES = [(5, 7, 1), (9, 7, 31), (13, 123, 33), (6, 16, 4097)]


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("temperature,cap", [(1.0, None), (0.7, None), (2.0, 5.0)])
def test_linear_log_probs_values_and_grads(rng, n, h, v, temperature, cap):
    """log p and entropy, and their vjp w.r.t. hidden, weight and bias with
    a different cotangent for every token of each output; ignored rows and
    several chunks."""
    args = make_head(rng, n, h, v)
    t = np.array(args["targets"])
    t[n // 2] = -100
    args["targets"] = mx.array(t)
    kw = dict(temperature=temperature, logit_softcap=cap, ignore_index=-100, chunk_bytes=3 * 4 * v)
    logp, ent = fl.linear_log_probs(**args, return_entropy=True, **kw)
    y = logits64(args)
    r = ref_stats(y, t, temperature, cap, -100)
    kept = t != -100
    want_logp = np.where(kept, r["target"] - r["lse"], 0.0)
    want_ent = np.where(kept, r["lse"] - r["expected"], 0.0)
    zmag = np.maximum(1.0, np.abs(r["z"]).max(-1))
    assert logp.dtype == mx.float32 and ent.dtype == mx.float32
    assert_close(logp, want_logp, mx.float32, scale=zmag, what="log p")
    assert_close(ent, want_ent, mx.float32, scale=zmag, what="entropy")

    c_lp = rng.standard_normal(n).astype(np.float32)
    c_ent = rng.standard_normal(n).astype(np.float32)

    def f(hid, w, b):
        lp, en = fl.linear_log_probs(hid, w, args["targets"], b, return_entropy=True, **kw)
        return lp, en

    _, grads = mx.vjp(f, [args["hidden"], args["weight"], args["bias"]], [mx.array(c_lp), mx.array(c_ent)])
    # log p = target - lse, entropy = lse - expected, both 0 on ignored rows
    g = {"lse": np.where(kept, c_ent - c_lp, 0.0), "target": np.where(kept, c_lp, 0.0),
         "expected": np.where(kept, -c_ent, 0.0)}
    dy = ref_grad_y(y, t, g, temperature, cap, -100)
    x, w = to_np(args["hidden"]), to_np(args["weight"])
    s = grad_scales(y, t, g, x, w, temperature=temperature, cap=cap, ignore_index=-100)
    assert_close(grads[0], dy @ w, mx.float32, scale=s["dh"], what="d hidden")
    assert_close(grads[1], dy.T @ x, mx.float32, scale=s["dw"], what="d weight")
    assert_close(grads[2], dy.sum(0), mx.float32, scale=s["db"], what="d bias")
    assert np.all(to_np(grads[0])[~kept] == 0), "an ignored row got a gradient"


@pytest.mark.parametrize("source", ["linear", "logits"])
def test_each_statistic_with_its_own_cotangents(rng, source):
    """All six statistics; the vjp with a random cotangent per row on each
    of the four differentiable ones (any one of them wrong shows)."""
    n, h, v = 11, 24, 37
    args = make_head(rng, n, h, v)
    t = np.array(args["targets"])
    t[3] = -100
    targets = mx.array(t)
    kw = dict(temperature=0.7, logit_softcap=6.0, ignore_index=-100)
    y = logits64(args)
    if source == "linear":
        call = lambda hid, w, b: _ext.linear_row_stats(hid, w, targets, b, stats=list(ALL), chunk_bytes=500, **kw)  # noqa: E731
        primals = [args["hidden"], args["weight"], args["bias"]]
    else:
        call = lambda lg: _ext.row_stats(lg, targets, stats=list(ALL), **kw)  # noqa: E731
        primals = [mx.array(y.astype(np.float32))]
    out = call(*primals)
    r = ref_stats(y, t, 0.7, 6.0, -100)
    zmag = np.maximum(1.0, np.abs(r["z"]).max(-1))
    for name, got in zip(ALL, out):
        if name == "argmax":
            assert got.dtype == mx.int64
            np.testing.assert_array_equal(np.array(got), r["argmax"])
        else:
            scale = zmag * v if name == "logit_sum" else zmag
            assert_close(got, r[name], mx.float32, scale=scale, what=name)
    cot = {k: rng.standard_normal(n).astype(np.float32) for k in ALL}

    def diff_only(*p):
        return call(*p)[:4]

    _, grads = mx.vjp(diff_only, primals, [mx.array(cot[k]) for k in DIFF])
    dy = ref_grad_y(y, t, cot, 0.7, 6.0, -100)
    s = grad_scales(y, t, cot, to_np(args["hidden"]), to_np(args["weight"]), temperature=0.7, cap=6.0,
                    ignore_index=-100)
    if source == "linear":
        w = to_np(args["weight"])
        assert_close(grads[0], dy @ w, mx.float32, scale=s["dh"], what="d hidden")
        assert_close(grads[1], dy.T @ to_np(args["hidden"]), mx.float32, scale=s["dw"], what="d weight")
        assert_close(grads[2], dy.sum(0), mx.float32, scale=s["db"], what="d bias")
    else:
        assert_close(grads[0], dy, mx.float32, scale=s["dy"], what="d logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes(rng, dtype):
    """16-bit hidden, weight, bias, logits: float32 statistics from the
    rounded inputs; gradients in the input dtype."""
    n, h, v = 10, 40, 301
    args = make_head(rng, n, h, v, dtype)
    t = np.array(args["targets"])
    lp, ent = fl.linear_log_probs(**args, return_entropy=True)
    y = logits64(args)
    r = ref_stats(y, t)
    zmag = np.maximum(1.0, np.abs(r["z"]).max(-1))
    assert_close(lp, r["target"] - r["lse"], mx.float32, scale=zmag, what="linear log p")
    assert_close(ent, r["lse"] - r["expected"], mx.float32, scale=zmag, what="linear entropy")
    logits = mx.array(y.astype(np.float32)).astype(dtype)
    y16 = to_np(logits)
    r16 = ref_stats(y16, t)
    lp2 = fl.log_probs(logits, args["targets"])
    assert_close(lp2, r16["target"] - r16["lse"], mx.float32, scale=zmag, what="log p")
    cot = rng.standard_normal(n).astype(np.float32)
    g_hidden = mx.grad(lambda x: (fl.linear_log_probs(x, args["weight"], args["targets"], args["bias"])
                                  * mx.array(cot)).sum())(args["hidden"])
    g_logits = mx.grad(lambda z: (fl.log_probs(z, args["targets"]) * mx.array(cot)).sum())(logits)
    assert g_hidden.dtype == dtype and g_logits.dtype == dtype
    g = {"lse": -cot, "target": cot}
    dy = ref_grad_y(y, t, g)
    w = to_np(args["weight"])
    s = grad_scales(y, t, g, to_np(args["hidden"]), w)
    assert_close(g_hidden, dy @ w, dtype, scale=s["dh"], what="d hidden")
    s16 = grad_scales(y16, t, g, to_np(args["hidden"]), w)
    assert_close(g_logits, ref_grad_y(y16, t, g), dtype, scale=s16["dy"], what="d logits")


QUANT = [("affine", 64, 4), ("affine", 32, 3), ("affine", 128, 8), ("mxfp4", 32, 4), ("nvfp4", 16, 4)]


@pytest.mark.parametrize("mode,group,bits", QUANT)
def test_quantized_heads(rng, mode, group, bits):
    """Every quantized format as linear_cross_entropy takes it: the same
    numbers as the dense head mx.dequantize gives, gradients w.r.t. hidden
    and bias; none for the packed weight."""
    n, h, v = 9, 128, 203
    args = make_head(rng, n, h, v)
    q = mx.quantize(args["weight"], group_size=group, bits=bits, mode=mode)
    w_q, scales = q[0], q[1]
    qb = q[2] if mode == "affine" else None
    w = to_np(_ext.dequantize_head(w_q, scales, qb, group_size=group, bits=bits, mode=mode))
    t = np.array(args["targets"])
    kw = dict(scales=scales, biases=qb, group_size=group, bits=bits, mode=mode, temperature=0.7,
              return_entropy=True)
    lp, ent = fl.linear_log_probs(args["hidden"], w_q, args["targets"], args["bias"], **kw)
    y = logits64(args, w)
    r = ref_stats(y, t, 0.7)
    zmag = np.maximum(1.0, np.abs(r["z"]).max(-1))
    assert_close(lp, r["target"] - r["lse"], mx.float32, scale=zmag, what="log p")
    assert_close(ent, r["lse"] - r["expected"], mx.float32, scale=zmag, what="entropy")
    c1, c2 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)

    def f(x, b):
        a, e = fl.linear_log_probs(x, w_q, args["targets"], b, **kw)
        return (a * mx.array(c1) + e * mx.array(c2)).sum()

    gx, gb = mx.grad(f, argnums=(0, 1))(args["hidden"], args["bias"])
    g = {"lse": c2 - c1, "target": c1, "expected": -c2}
    dy = ref_grad_y(y, t, g, 0.7)
    s = grad_scales(y, t, g, to_np(args["hidden"]), w, temperature=0.7)
    assert_close(gx, dy @ w, mx.float32, scale=s["dh"], what="d hidden")
    assert_close(gb, dy.sum(0), mx.float32, scale=s["db"], what="d bias")
    with pytest.raises(ValueError, match="quantized"):
        mx.eval(mx.grad(lambda wq: fl.linear_log_probs(args["hidden"], wq, args["targets"], **{
            k: kw[k] for k in ("scales", "biases", "group_size", "bits", "mode")}).sum())(w_q))


def test_vocab_start_shard(rng):
    """A head that is the shard [100, 100 + V) of a larger vocabulary: a
    target outside it is another shard's (target 0, no gradient through it),
    argmax is global; without vocab_start the same index is out of range
    (NaN target)."""
    n, h, v, start = 12, 16, 50, 100
    args = make_head(rng, n, h, v, peaked=False)
    t = rng.integers(0, 300, n)
    t[:3] = [start, start + v - 1, start + v]  # the shard's edges, and one past
    targets = mx.array(t)
    y = logits64(args)
    r = ref_stats(y, t, vocab_start=start)
    out = _ext.linear_row_stats(args["hidden"], args["weight"], targets, args["bias"], stats=list(ALL),
                                vocab_start=start)
    zmag = np.maximum(1.0, np.abs(r["z"]).max(-1))
    for name, got in zip(ALL, out):
        if name == "argmax":
            np.testing.assert_array_equal(np.array(got), r["argmax"])
        else:
            assert_close(got, r[name], mx.float32, scale=zmag * (v if name == "logit_sum" else 1), what=name)
    assert np.isnan(np.array(_ext.linear_row_stats(args["hidden"], args["weight"], targets, args["bias"],
                                                   stats=["target"])[0])[2])
    cot = {"target": rng.standard_normal(n).astype(np.float32), "lse": rng.standard_normal(n).astype(np.float32)}

    def f(x):
        lse, tgt = _ext.linear_row_stats(x, args["weight"], targets, args["bias"], stats=["lse", "target"],
                                         vocab_start=start)
        return (lse * mx.array(cot["lse"]) + tgt * mx.array(cot["target"])).sum()

    dy = ref_grad_y(y, t, cot, vocab_start=start)
    w = to_np(args["weight"])
    s = grad_scales(y, t, cot, to_np(args["hidden"]), w, vocab_start=start)
    assert_close(mx.grad(f)(args["hidden"]), dy @ w, mx.float32, scale=s["dh"], what="dH")
    logits = mx.array(y.astype(np.float32))
    out2 = _ext.row_stats(logits, targets, stats=["target", "argmax"], vocab_start=start)
    assert_close(out2[0], r["target"], mx.float32, scale=zmag, what="logits target")
    np.testing.assert_array_equal(np.array(out2[1]), r["argmax"])


def test_huge_and_infinite_logits():
    """Logits near 1e4 (their lse pair keeps p exact), -inf entries (p = 0,
    no NaN in expected or the gradient) and an all -inf row (lse -inf)."""
    y = np.array([[1e4, 1e4 - 1.0, 1e4 - 30.0, 1e4 + 0.5],
                  [0.0, -np.inf, 2.0, -np.inf],
                  [-np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    t = np.array([1, 2, 0])
    out = _ext.row_stats(mx.array(y), mx.array(t), stats=list(ALL))
    r = ref_stats(y, t)
    for name, got in zip(ALL, out):
        if name == "argmax":
            np.testing.assert_array_equal(np.array(got), r["argmax"])
        else:
            assert_close(got[:2], r[name][:2], mx.float32, scale=1e4, what=name)
    lse = np.array(out[0])
    assert lse[2] == -np.inf
    # log p and entropy to float32 accuracy although lse and expected are
    # 1e4 (a single float32 there is 5e-4 off: the pairs' lo halves)
    lp, ent = (np.array(a) for a in fl.log_probs(mx.array(y[:2]), mx.array(t[:2]), return_entropy=True))
    np.testing.assert_allclose(lp, r["target"][:2] - r["lse"][:2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent, r["lse"][:2] - r["expected"][:2], rtol=1e-6, atol=1e-6)
    cot = np.array([0.5, -2.0], np.float32)
    g = mx.grad(lambda z: (fl.log_probs(z, mx.array(t[:2]), return_entropy=True)[1] * mx.array(cot)).sum())(
        mx.array(y[:2]))
    want = ref_grad_y(y[:2], t[:2], {"lse": cot, "expected": -cot})
    assert np.all(np.isfinite(np.array(g)))
    np.testing.assert_allclose(np.array(g), want, rtol=1e-4, atol=1e-5)


def test_argmax_of_nan_rows_is_mx_argmax(rng):
    """argmax as mx.argmax, a NaN being larger than any number: a row with NaNs
    gives its first NaN (before or after the largest number), an all-NaN row 0,
    -0 equals +0, an all -inf row 0; the logits form in every dtype and the
    linear form (a NaN bias column: every row's argmax)."""
    y = np.array([[1.0, 5.0, np.nan, 2.0, np.nan],
                  [np.nan, 5.0, 7.0, 2.0, 1.0],
                  [1.0, 9.0, 3.0, 2.0, np.nan],
                  [np.nan] * 5,
                  [-0.0, 0.0, -1.0, -np.inf, -2.0],
                  [-np.inf] * 5,
                  [3.0, np.inf, np.inf, np.nan, 1.0]], np.float32)
    for dt in DTYPES:
        z = mx.array(y).astype(dt)
        for st in (["argmax"], ["argmax", "lse", "max"]):
            got = _ext.row_stats(z, None, stats=st)[0]
            np.testing.assert_array_equal(np.array(got), np.array(mx.argmax(z, axis=-1)), err_msg=f"{dt} {st}")
        np.testing.assert_array_equal(np.array(_ext.row_stats(z, None, stats=["argmax"], vocab_start=7)[0]),
                                      7 + np.array(mx.argmax(z, axis=-1)))
    a = make_head(rng, 6, 8, 13)
    b = np.array(a["bias"])
    b[[4, 9]] = np.nan
    got = _ext.linear_row_stats(a["hidden"], a["weight"], None, mx.array(b), stats=["argmax", "lse"])[0]
    want = mx.argmax(a["hidden"] @ a["weight"].T + mx.array(b), axis=-1)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert (np.array(got) == 4).all()


def test_lse_is_the_linear_cross_entropys(rng):
    """The same row sums as the linear CE: its lse statistic bit for bit."""
    args = make_head(rng, 20, 32, 999)
    _, st = fl.linear_cross_entropy(**args, reduction="none", return_stats=True, logit_softcap=7.0)
    (lse,) = _ext.linear_row_stats(args["hidden"], args["weight"], None, args["bias"], stats=["lse"],
                                   logit_softcap=7.0)
    assert np.array_equal(np.array(st["lse"]), np.array(lse))


# ---------------------------------------------------------------------------
# transforms

def test_compile_twice_and_different_outputs(rng):
    """In one compiled graph: the same call twice, and calls asking for log p
    alone and with entropy (different primitives); values and grads as
    eager."""
    args = make_head(rng, 8, 16, 40)
    c = mx.array(rng.standard_normal(8).astype(np.float32))

    def step(x, w, b):
        a = fl.linear_log_probs(x, w, args["targets"], b)
        a2 = fl.linear_log_probs(x, w, args["targets"], b)
        lp, ent = fl.linear_log_probs(x, w, args["targets"], b, return_entropy=True)
        return (a * c).sum() + 2 * (a2 * c * c).sum() + (ent * c).sum() - lp.sum()

    vg = mx.value_and_grad(step, argnums=(0, 1, 2))
    prim = (args["hidden"], args["weight"], args["bias"])
    got = mx.compile(vg)(*prim)
    want = vg(*prim)
    np.testing.assert_allclose(np.array(got[0]), np.array(want[0]), rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_shapeless_compile_other_sizes(rng):
    def loss(x, t, w):
        lp, ent = fl.linear_log_probs(x, w, t, return_entropy=True, ignore_index=-100)
        return (lp * lp).sum() + (ent * lp).sum()

    compiled = mx.compile(mx.value_and_grad(loss, argnums=(0, 2)), shapeless=True)
    logits_c = mx.compile(lambda z, t: fl.log_probs(z, t, temperature=0.5), shapeless=True)
    for n in (6, 3, 9):
        args = make_head(rng, n, 16, 30, bias=False)
        t = np.array(args["targets"])
        t[0] = -100
        t = mx.array(t)
        got, want = compiled(args["hidden"], t, args["weight"]), mx.value_and_grad(loss, argnums=(0, 2))(
            args["hidden"], t, args["weight"])
        np.testing.assert_allclose(np.array(got[0]), np.array(want[0]), rtol=1e-5)
        for a, b in zip(got[1], want[1]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
        z = mx.array(rng.standard_normal((n, 30)).astype(np.float32))
        np.testing.assert_allclose(np.array(logits_c(z, t)), np.array(fl.log_probs(z, t, temperature=0.5)),
                                   rtol=1e-6)


def test_vmap(rng):
    """vmap over a batch axis of hidden and targets (and of logits): each
    example as its own call, values and gradients."""
    b, n, h, v = 3, 5, 16, 21
    x = mx.array(rng.standard_normal((b, n, h)).astype(np.float32))
    w = mx.array((rng.standard_normal((v, h)) / 4).astype(np.float32))
    t = mx.array(rng.integers(0, v, (b, n)))
    f = lambda xx, tt: fl.linear_log_probs(xx, w, tt, return_entropy=True)  # noqa: E731
    got = mx.vmap(f)(x, t)
    gw = mx.vmap(mx.grad(lambda xx, tt, ww: (fl.linear_log_probs(xx, ww, tt) ** 2).sum(), argnums=2),
                 in_axes=(0, 0, None))(x, t, w)
    for i in range(b):
        want = f(x[i], t[i])
        for a, c in zip(got, want):
            np.testing.assert_allclose(np.array(a[i]), np.array(c), rtol=1e-6, atol=1e-6)
        want_gw = mx.grad(lambda ww: (fl.linear_log_probs(x[i], ww, t[i]) ** 2).sum())(w)
        np.testing.assert_allclose(np.array(gw[i]), np.array(want_gw), rtol=1e-5, atol=1e-6)
    z = mx.array(rng.standard_normal((b, n, v)).astype(np.float32))
    got = mx.vmap(lambda zz, tt: fl.log_probs(zz, tt))(z, t)
    for i in range(b):
        np.testing.assert_allclose(np.array(got[i]), np.array(fl.log_probs(z[i], t[i])), rtol=1e-6)


def graph_nodes(*outputs):
    """{node id: (primitive name, number of inputs)} of the graph of outputs
    (mx.export_to_dot)."""
    import io
    import re

    f = io.StringIO()
    mx.export_to_dot(f, *outputs)
    text = f.getvalue()
    nodes = {m.group(1): m.group(2) for m in re.finditer(r'\{ (\d+) \[label ="([^"]+)"', text)}
    count = {n: 0 for n in nodes}
    for m in re.finditer(r'"[^"]+" -> (\d+)', text):
        count[m.group(1)] += 1
    return {n: (nodes[n], count[n]) for n in nodes}


def test_vmap_folds_the_batch_into_the_rows(rng):
    """vmap over hidden / logits (the head shared) runs ONE primitive over the
    batch's rows, forward and backward (dH, dlogits); a weight gradient (a sum
    over each example's rows) stays one backward per example. Values as the
    per-example calls (test_vmap)."""
    b, n, h, v = 4, 3, 8, 11
    x = mx.array(rng.standard_normal((b, n, h)).astype(np.float32))
    w = mx.array(rng.standard_normal((v, h)).astype(np.float32))
    t = mx.array(rng.integers(0, v, (b, n)))
    z = mx.array(rng.standard_normal((n, b, v)).astype(np.float32))  # batch on axis 1
    fwd = mx.vmap(lambda xx, tt: fl.linear_log_probs(xx, w, tt, return_entropy=True))(x, t)
    gx = mx.vmap(mx.grad(lambda xx, tt: (fl.linear_log_probs(xx, w, tt) ** 2).sum()))(x, t)
    zf = mx.vmap(lambda zz: fl.log_probs(zz, t[0]), in_axes=1)(z)  # targets shared
    gz = mx.vmap(mx.grad(lambda zz: (fl.log_probs(zz, t[0]) * mx.arange(n)).sum()), in_axes=1)(z)
    gw = mx.vmap(mx.grad(lambda xx, tt, ww: fl.linear_log_probs(xx, ww, tt).sum(), argnums=2),
                 in_axes=(0, 0, None))(x, t, w)
    names = [name for name, _ in graph_nodes(*fwd, gx, zf, gz).values()]
    assert names.count("FusedLinearRowStats") == 2 and names.count("FusedRowStats") == 2, names
    assert names.count("FusedLinearRowStatsVJP") == 1 and names.count("FusedRowStatsVJP") == 1, names
    assert [nm for nm, _ in graph_nodes(gw).values()].count("FusedLinearRowStatsVJP") == b
    for i in range(b):
        want = fl.linear_log_probs(x[i], w, t[i], return_entropy=True)
        for a, c in zip(fwd, want):
            np.testing.assert_allclose(np.array(a[i]), np.array(c), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.array(gx[i]), np.array(
            mx.grad(lambda xx: (fl.linear_log_probs(xx, w, t[i]) ** 2).sum())(x[i])), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.array(zf[i]), np.array(fl.log_probs(z[:, i], t[0])), rtol=1e-6)
        np.testing.assert_allclose(np.array(gz[i]), np.array(
            mx.grad(lambda zz: (fl.log_probs(zz, t[0]) * mx.arange(n)).sum())(z[:, i])), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("source", ["linear", "logits"])
def test_an_unused_outputs_cotangent_adds_no_work(rng, source):
    """The cotangent mx.vjp gives an output the loss does not use is a known
    zero: the backward leaves its term out, and with it the saved pair it
    alone needs (entropy unused: no expected pair; only the target's: no lse,
    no exp pass). Same gradient as asking for the used output alone."""
    a = make_head(rng, 6, 8, 13)
    y = mx.array(rng.standard_normal((6, 13)).astype(np.float32))
    t = a["targets"]

    def scorer(p, **kw):
        if source == "linear":
            return fl.linear_log_probs(p, a["weight"], t, a["bias"], **kw)
        return fl.log_probs(p, t, **kw)

    p0 = a["hidden"] if source == "linear" else y
    vjp_name = "FusedLinearRowStatsVJP" if source == "linear" else "FusedRowStatsVJP"
    # base inputs of the backward: the primals ([hidden, weight, targets, bias] or [logits, targets])
    base = 4 if source == "linear" else 2
    cot = mx.array(rng.standard_normal(6).astype(np.float32))

    def backward_inputs(fn):
        _, (g,) = mx.vjp(fn, [p0], [cot])
        nodes = [k for k in graph_nodes(g).values() if k[0] == vjp_name]
        return g, nodes

    g_logp, nodes = backward_inputs(lambda p: [scorer(p, return_entropy=True)[0]])
    assert len(nodes) == 1 and nodes[0][1] == base + 2 + 2, nodes  # lse pair + cotangents of target, lse
    g_alone, _ = backward_inputs(lambda p: [scorer(p)])
    np.testing.assert_array_equal(np.array(g_logp), np.array(g_alone))
    g_ent, nodes = backward_inputs(lambda p: [scorer(p, return_entropy=True)[1]])
    assert nodes[0][1] == base + 4 + 2, nodes  # lse and expected pairs + cotangents of lse, expected
    # only the target's statistic: no pair at all
    def st(p):
        if source == "linear":
            return [_ext.linear_row_stats(p, a["weight"], t, a["bias"], stats=["lse", "target"])[1]]
        return [_ext.row_stats(p, t, stats=["lse", "target"])[1]]

    g_t, nodes = backward_inputs(st)
    assert nodes[0][1] == base + 1, nodes
    # every cotangent a known zero: no backward primitive, a zero gradient
    _, (gz,) = mx.vjp(lambda p: [scorer(p, return_entropy=True)[0]], [p0], [mx.zeros(6)])
    assert not [k for k in graph_nodes(gz).values() if k[0] == vjp_name]
    assert not np.array(gz).any()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rows_without_a_cotangent_are_skipped(rng, dtype):
    """Rows whose every cotangent is 0 (masked prompt tokens) are left out of
    the linear backward: dH rows 0, nothing added to dW / dbias, even from a
    non-finite hidden row (before: 0 * NaN poisoned all of dW); the live rows'
    gradients equal the float64 reference of the live rows alone. A row whose
    target is out of range stays live (NaN) while the target's cotangent is
    bound; all rows masked gives zeros (no rows at all)."""
    n, h, v = 12, 16, 37
    a = make_head(rng, n, h, v, dtype=dtype)
    x = np.array(a["hidden"].astype(mx.float32))
    x[2] = np.nan
    hid = mx.array(x).astype(dtype)
    mask = np.ones(n, np.float32)
    mask[[0, 2, 3, 7, 8]] = 0.0
    cot = mx.array(rng.standard_normal(n).astype(np.float32) * mask)  # evaluated: not a known zero

    def f(x_, w_, b_):
        logp, ent = fl.linear_log_probs(x_, w_, a["targets"], b_, return_entropy=True)
        return (logp * cot + ent * cot * 0.5).sum()

    gx, gw, gb = mx.grad(f, argnums=(0, 1, 2))(hid, a["weight"], a["bias"])
    gx, gw, gb = (np.array(g.astype(mx.float32)) for g in (gx, gw, gb))
    assert np.isfinite(gw).all() and np.isfinite(gb).all() and np.isfinite(gx).all()
    assert not gx[mask == 0].any()
    live = mask != 0
    x64 = to_np(hid)[live]
    w64, b64 = to_np(a["weight"]), to_np(a["bias"])
    y = x64 @ w64.T + b64
    t = np.array(a["targets"])[live]
    c = np.array(cot)[live]
    dy = ref_grad_y(y, t, {"target": c, "lse": -c + 0.5 * c, "expected": -0.5 * c})
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == mx.float32 else dict(rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(gx[live], dy @ w64, **tol)
    np.testing.assert_allclose(gw, dy.T @ x64, **tol)
    np.testing.assert_allclose(gb, dy.sum(0), **tol)
    # an out-of-range target with the target's cotangent bound but 0: its row is NaN
    tt = np.array(a["targets"])
    tt[5] = v
    _, (g5,) = mx.vjp(lambda x_: [fl.linear_log_probs(x_, a["weight"], mx.array(tt))], [a["hidden"]],
                      [mx.array(np.where(np.arange(n) == 5, 0.0, 1.0).astype(np.float32))])
    assert np.isnan(np.array(g5.astype(mx.float32))[5]).all()
    # every row masked (an evaluated zero cotangent): zeros
    z = mx.zeros(n)
    mx.eval(z)
    gx0, gw0 = mx.grad(lambda x_, w_: (fl.linear_log_probs(x_, w_, a["targets"]) * z).sum(), argnums=(0, 1))(
        a["hidden"], a["weight"])
    assert not to_np(gx0).any() and not to_np(gw0).any()


# ---------------------------------------------------------------------------
# memory

def test_memory_is_a_chunk(rng):
    """Forward + backward w.r.t. hidden at V = 200k: the working memory is
    the chunk plan's, never N x V logits nor the [V, H] weight gradient."""
    n, h, v = 64, 32, 200_000
    args = make_head(rng, n, h, v, bias=False, peaked=False)
    mx.eval(args)
    chunk = 4 << 20
    cot = mx.array(rng.standard_normal(n).astype(np.float32))
    g = mx.grad(lambda x: (fl.linear_log_probs(x, args["weight"], args["targets"], return_entropy=True,
                                               chunk_bytes=chunk)[0] * cot).sum())
    mx.eval(g(args["hidden"]))  # warm-up
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(g(args["hidden"]))
    extra = mx.get_peak_memory() - base
    plan = _ext.linear_cross_entropy_plan(n, h, v, True, True, _ext.num_threads(), chunk)["bytes"]
    assert extra <= plan + (1 << 20), (extra, plan)
    assert extra < n * v * 4 / 2, extra


# ---------------------------------------------------------------------------
# bad input

def test_bad_input(rng):
    args = make_head(rng, 4, 8, 10)
    x, w, t = args["hidden"], args["weight"], args["targets"]
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        assert_raises_naming(ValueError, "temperature", fl.linear_log_probs, x, w, t, temperature=temperature)
        assert_raises_naming(ValueError, "temperature", fl.log_probs, x, t, temperature=temperature)
    assert_raises_naming(TypeError, "temperature", fl.log_probs, x, t, temperature="1")
    assert_raises_naming(ValueError, "logit_softcap", fl.linear_log_probs, x, w, t, logit_softcap=0.0)
    assert_raises_naming(ValueError, "logit_softcap", fl.log_probs, x, t, logit_softcap=-2.0)
    assert_raises_naming(ValueError, "chunk_bytes", fl.linear_log_probs, x, w, t, chunk_bytes=0)
    assert_raises_naming(TypeError, "targets", fl.linear_log_probs, x, w, t.astype(mx.float32))
    assert_raises_naming(ValueError, "targets", fl.linear_log_probs, x, w, t[:3])
    assert_raises_naming(ValueError, "targets", fl.log_probs, x, t[:3])
    assert_raises_naming(ValueError, "weight", fl.linear_log_probs, x, w[:, :5], t)
    assert_raises_naming(ValueError, "bias", fl.linear_log_probs, x, w, t, mx.zeros((3,)))
    assert_raises_naming(TypeError, "logits", fl.log_probs, x.astype(mx.int32), t)
    assert_raises_naming(ValueError, "stats", _ext.linear_row_stats, x, w, t, stats=["lse", "nope"])
    assert_raises_naming(ValueError, "stats", _ext.row_stats, x, t, stats=[])
    assert_raises_naming(ValueError, "targets", _ext.row_stats, x, None, stats=["target"])
    assert_raises_naming(ValueError, "vocab_start", _ext.row_stats, x, t, stats=["target"], vocab_start=-1)
