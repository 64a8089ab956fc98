"""The real Metal kernels on an Apple GPU, against the CPU primitives.

Skipped unless MLX has Metal; with FL_REQUIRE_GPU=1 (the self-hosted GPU job of
.github/workflows/macos.yml) a missing Metal device is an error instead.
Every loss runs forward and backward on mx.gpu and on mx.cpu with the same
inputs; block (K <= 4096) and looped (K > 4096) row kernels, every dtype and
the main options are covered. The CPU harness (tests/test_metal_kernels.py)
checks the same kernels exhaustively on Linux; this file checks what only real
hardware can: that the metallib builds and loads, that eval_gpu binds the
buffers the kernels expect, and that Metal's compiler and SIMD hardware give
the same numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import reference as ref

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses as fl  # noqa: E402  (missing: a failure, not a skip)
import mlx_fused_losses._ext as ext  # noqa: E402

# The tolerances, the comparison (which lets flushed float32 subnormals pass: Apple
# GPUs flush them) and the kernel-name check are those of the self-check command.
from mlx_fused_losses import check_gpu  # noqa: E402
from mlx_fused_losses.check_gpu import FLUSH_ATOL, TOL  # noqa: E402, F401  (test_metal_subnormals)

HAVE_METAL = hasattr(mx, "metal") and mx.metal.is_available()
if os.environ.get("FL_REQUIRE_GPU") == "1" and not HAVE_METAL:
    raise RuntimeError("FL_REQUIRE_GPU=1 but MLX finds no Metal device: the GPU tests cannot run")
# The device under test: tests/test_gpu.py can be dry-run on the CPU against itself
# (FL_GPU_TESTS_ON_CPU=1) to check the test code where no Mac is at hand.
ON_CPU = os.environ.get("FL_GPU_TESTS_ON_CPU") == "1"
GPU = mx.cpu if ON_CPU else mx.gpu
pytestmark = [
    pytest.mark.skipif(not (HAVE_METAL or ON_CPU), reason="no Metal GPU"),
    # The float64 references compute -inf - -inf and NaN rows on purpose.
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# TOL (relative tolerance of a value stored in the dtype) and FLUSH_ATOL come from
# check_gpu. Apple GPUs flush float32 and bfloat16 subnormals to zero (operands and
# results), the CPU keeps them: a flushed value is off by less than FLT_MIN, whatever
# the array's scale (an all-subnormal expected array would otherwise need exact
# agreement). tests/test_metal_subnormals.py runs the kernels flushed against these
# tolerances.


@pytest.mark.skipif(ON_CPU, reason="the metallib is only loaded on a Metal device")
def test_metallib_defines_every_kernel_the_plans_ask_for():
    """Every name of _ext.launch_plan_kernels() (every plan the host can build) is a
    function of the loaded metallib: a misspelt name fails here, not in a user's
    first call ("Unable to load kernel")."""
    names = check_gpu.compare_names(ext.metallib_function_names(), ext.launch_plan_kernels())
    assert names.ok, "\n".join(f"{n}: asked for by {p[0]}" for n, p in names.missing.items())
    assert names.planned > 200


def both(fn, *arrays):
    """fn(*arrays, stream) evaluated on the GPU and on the CPU, as float64."""
    out = []
    for dev in (GPU, mx.cpu):
        r = fn(*arrays, stream=dev)
        out.append(np.array(r.astype(mx.float32), dtype=np.float64))
    return out


def close(gpu, cpu, rtol):
    """check_gpu.disagreement: NaN/inf patterns equal, finite values within rtol
    of themselves and of the largest |cpu|, or below the smallest normal float32."""
    why = check_gpu.disagreement(gpu, cpu, rtol)
    assert why is None, why


def grads(loss_fn, x, cot):
    """d/dx of sum(cot * loss) on GPU and CPU."""
    out = []
    for dev in (GPU, mx.cpu):
        _, (g,) = mx.vjp(lambda a: loss_fn(a, dev), [x], [cot])
        out.append(np.array(g.astype(mx.float32), dtype=np.float64))
    return out


@pytest.mark.parametrize("K", [1, 33, 1000, 4096, 5000, 50257])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3, weighted=True),
        dict(label_smoothing=0.2, label_smoothing_mode="others", soft=True),
        dict(logit_softcap=2.5, ignore_index=-100, z_loss=1e-3, weighted=True),
        dict(logit_softcap=4.0, soft=True),
    ],
    ids=["plain", "smooth_ignore_weights_z", "soft_others", "softcap_ignore_weights_z", "softcap_soft"],
)
def test_cross_entropy_gpu_vs_cpu(K, dtype, opts):
    opts = dict(opts)
    soft = opts.pop("soft", False)
    weighted = opts.pop("weighted", False)
    rng = np.random.default_rng(K)
    rows = 8 if K < 5000 else 3
    x = mx.array((rng.standard_normal((rows, K)) * 3).astype(np.float32)).astype(DTYPES[dtype])
    if soft:
        p = rng.random((rows, K)).astype(np.float32)
        t = mx.array(p / p.sum(-1, keepdims=True))
    else:
        ti = rng.integers(0, K, rows)
        ti[-1] = K  # out of range -> NaN row
        if opts.get("ignore_index") is not None and rows > 2:
            ti[-2] = opts["ignore_index"]
        t = mx.array(ti)
    if weighted:
        opts["class_weights"] = mx.array((0.5 + rng.random(K)).astype(np.float32))

    def loss(a, stream):
        return ext.cross_entropy(a, t, stream=stream, **opts)

    g, c = both(loss, x)
    close(g, c, 1e-5 * max(1.0, np.log2(K)))
    cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
    gg, cg = grads(loss, x, cot)
    close(gg, cg, TOL[dtype] + 1e-5)


@pytest.mark.parametrize("K", [2, 1000, 50257])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_gpu_vs_cpu(K, dtype, gamma):
    rng = np.random.default_rng(K + 1)
    rows = 6
    x = mx.array((rng.standard_normal((rows, K)) * 3).astype(np.float32)).astype(DTYPES[dtype])
    ti = rng.integers(0, K, rows)
    ti[-1] = -1  # ignored
    ti[-2] = K  # out of range -> NaN
    t = mx.array(ti)
    alpha = mx.array((0.1 + 0.8 * rng.random(K)).astype(np.float32))

    def loss(a, stream):
        return ext.softmax_focal_loss(a, t, gamma=gamma, class_alpha=alpha, ignore_index=-1,
                                      stream=stream)

    g, c = both(loss, x)
    close(g, c, 2e-5 * max(1.0, np.log2(K)))
    cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
    gg, cg = grads(loss, x, cot)
    close(gg, cg, TOL[dtype] + 2e-5)


@pytest.mark.parametrize("K", [1, 1000, 50257])
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float32")],
                         ids="-".join)
@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_distill_gpu_vs_cpu(K, dtypes, kind, beta):
    """kl_div / jsd (metal/distillation.metal): student and teacher dtypes,
    targets with an ignored and an out-of-range row, the CE mixed in at T != 1;
    the teacher's gradient is zeros on both devices."""
    rng = np.random.default_rng(K + 7)
    rows = 6
    s = mx.array((rng.standard_normal((rows, K)) * 3).astype(np.float32)).astype(DTYPES[dtypes[0]])
    t = mx.array((rng.standard_normal((rows, K)) * 3).astype(np.float32)).astype(DTYPES[dtypes[1]])
    ti = rng.integers(0, K, rows)
    ti[-1] = -100  # ignored
    ti[-2] = K  # out of range -> NaN
    y = mx.array(ti)

    def loss(a, stream):
        return ext.distill_loss(a, t, y, kind=kind, beta=beta, temperature=1.5, alpha=0.25,
                                scale_by_temperature_squared=True, ignore_index=-100, stream=stream)

    g, c = both(loss, s)
    close(g, c, 2e-5 * max(1.0, np.log2(K)))
    cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
    gg, cg = grads(loss, s, cot)
    close(gg, cg, TOL[dtypes[0]] + 2e-5)
    for dev in (GPU, mx.cpu):
        _, (gt,) = mx.vjp(lambda b: ext.distill_loss(s, b, y, kind=kind, stream=dev), [t], [cot])
        assert not np.any(np.array(gt.astype(mx.float32)))


POINTWISE = {
    "smooth_l1": lambda a, b, r, s: ext.smooth_l1_loss(a, b, beta=1.0, reduction=r, stream=s),
    "huber": lambda a, b, r, s: ext.huber_loss(a, b, delta=1.5, reduction=r, stream=s),
    "sigmoid_focal": lambda a, b, r, s: ext.sigmoid_focal_loss(
        a, b, alpha=0.25, gamma=2.0, reduction=r, stream=s),
    "sigmoid_focal_g05": lambda a, b, r, s: ext.sigmoid_focal_loss(
        a, b, alpha=-1.0, gamma=0.5, reduction=r, stream=s),
}


@pytest.mark.parametrize("n", [1, 1025, 100_003])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_gpu_vs_cpu(name, reduction, dtype, n):
    rng = np.random.default_rng(n)
    f = POINTWISE[name]
    x = mx.array((rng.standard_normal(n) * 3).astype(np.float32)).astype(DTYPES[dtype])
    if name.startswith("sigmoid"):
        tv = (rng.random(n) < 0.3).astype(np.float32)
    else:
        tv = (rng.standard_normal(n) * 2).astype(np.float32)
    t = mx.array(tv).astype(DTYPES[dtype])

    def loss(a, stream):
        return f(a, t, reduction, stream)

    g, c = both(loss, x)
    close(g, c, 1e-5 if reduction == "none" else 2e-5)
    if reduction != "none":
        # The fused sum is deterministic: fixed partition, fixed order.
        again = np.array(loss(x, GPU))
        assert np.array_equal(again, np.array(loss(x, GPU)))
    cot = mx.array((0.5 + rng.random(n)).astype(np.float32)) if reduction == "none" else mx.array(1.7)
    gg, cg = grads(loss, x, cot)
    close(gg, cg, TOL[dtype] + 2e-6)


def test_public_api_on_gpu():
    """The Python wrappers pick the GPU primitive under the default device."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((4, 10)).astype(np.float32))
    t = mx.array(rng.integers(0, 10, 4))
    with mx.stream(GPU):
        g = fl.cross_entropy(x, t, reduction="mean")
    c = fl.cross_entropy(x, t, reduction="mean", stream=mx.cpu)
    np.testing.assert_allclose(np.array(g), np.array(c), rtol=1e-5)


# ---- awkward inputs: what only real hardware (Metal's compiler, SIMD units) can judge ----

ODD_K = [1, 31, 33, 4097, 50257]
# Per dtype: a huge logit (|x| far beyond any softmax range but finite) and a
# subnormal one.
HUGE = {"float32": 1e30, "float16": 3e4, "bfloat16": 1e30}
SUBNORMAL = {"float32": 1e-40, "float16": 1e-6, "bfloat16": 1e-39}


def stored(a: np.ndarray, dtype: str) -> mx.array:
    return mx.array(a.astype(np.float32)).astype(DTYPES[dtype])


def as_f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def agree(actual, expected, rtol, what, scale=None):
    """Same NaN and infinity pattern; finite values within rtol of the finite scale
    (check_gpu.disagreement, which also lets flushed float32 subnormals pass)."""
    why = check_gpu.disagreement(actual, expected, rtol, scale)
    assert why is None, f"{what}: {why}"


def awkward_rows(K, dtype, rng, ignore_index):
    """Logits and class indices, one awkward case per row (see the comments)."""
    x = rng.standard_normal((10, K)) * 3
    t = rng.integers(0, K, 10)
    x[1, ::3] = -np.inf  # some -inf classes (target moved off them where K > 1)
    t[1] = min(1, K - 1)
    x[2, :] = -np.inf  # a row of -inf: NaN
    x[3, t[3]] = -np.inf  # -inf at the target: +inf loss
    x[4, K // 2] = np.nan  # a NaN logit: NaN row
    x[5] = rng.standard_normal(K) * SUBNORMAL[dtype]  # subnormal logits
    x[6] = rng.choice([-1.0, 1.0], K) * HUGE[dtype]  # huge logits of both signs
    x[6, t[6]] = HUGE[dtype]
    t[7] = ignore_index if ignore_index is not None else t[7]  # ignored row
    t[8] = K  # out of range: NaN
    t[9] = -3 if ignore_index != -3 else -4  # negative, out of range
    return x, t


# Rows of awkward_rows that the float64 references judge too. The others are judged
# GPU against CPU only: the references wrap negative indices, know no NaN policy, and
# lose a huge row's log-sum-exp offset (lse - x_t rounds to 0 in float64 at 1e30).
REF_ROWS = np.array([0, 1, 3, 5, 7])


CE_OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "others_weights": dict(label_smoothing=0.2, label_smoothing_mode="others", weighted=True),
    "z_ignore": dict(z_loss=1e-4, ignore_index=-100),
    "all": dict(label_smoothing=0.1, z_loss=1e-4, ignore_index=-100, weighted=True),
}


@pytest.mark.parametrize("K", ODD_K)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("option", list(CE_OPTIONS))
def test_cross_entropy_awkward_rows_gpu(option, dtype, K):
    opts = dict(CE_OPTIONS[option])
    rng = np.random.default_rng(K * 7 + len(option))
    x, t = awkward_rows(K, dtype, rng, opts.get("ignore_index"))
    weights = (0.5 + rng.random(K)) if opts.pop("weighted", False) else None
    xs = stored(x, dtype)
    xr = as_f64(xs)
    ts = mx.array(t)
    kw = dict(opts, class_weights=None if weights is None else mx.array(weights.astype(np.float32)))

    def loss(a, stream):
        return fl.cross_entropy(a, ts, stream=stream, **kw)

    g, c = both(loss, xs)
    agree(g, c, 2e-5 * max(1.0, np.log2(K)), "loss GPU vs CPU")
    expected = ref.cross_entropy(xr, t, class_weights=weights, **opts)
    agree(g[REF_ROWS], expected[REF_ROWS], TOL[dtype] + 1e-4 * max(1.0, np.log2(K)),
          "loss vs float64")
    cot = mx.array((0.5 + rng.random(10)).astype(np.float32))
    gg, cg = grads(loss, xs, cot)
    agree(gg, cg, TOL[dtype] + 1e-5, "gradient GPU vs CPU")
    exp_grad = ref.cross_entropy_grad(xr, t, class_weights=weights, cotangent=np.array(cot), **opts)
    # Judged against the gradient's natural size, |cot| x the largest class weight:
    # at K = 1 every exact gradient is 0 and a float32 rounding of 2^-24 * |cot| in
    # the kernel is no error.
    grad_scale = float(np.abs(np.array(cot)).max()) * (1.0 if weights is None else float(weights.max()))
    agree(gg[REF_ROWS], exp_grad[REF_ROWS], TOL[dtype] + 1e-4, "gradient vs float64", grad_scale)


@pytest.mark.parametrize("K", ODD_K)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_soft_targets_with_minus_inf_classes_gpu(dtype, K):
    rng = np.random.default_rng(K + 5)
    x = rng.standard_normal((4, K)) * 3
    p = rng.random((4, K))
    x[1, ::3] = -np.inf
    p[1, ::3] = 0.0  # no mass on the -inf classes: finite loss
    x[2, :] = -np.inf  # all -inf: NaN
    x[3, 0] = -np.inf  # mass on a -inf class: +inf loss
    p = p / p.sum(-1, keepdims=True)
    xs, ps = stored(x, dtype), stored(p, dtype)

    def loss(a, stream):
        return fl.cross_entropy(a, ps, label_smoothing=0.1, stream=stream)

    g, c = both(loss, xs)
    agree(g, c, 2e-5 * max(1.0, np.log2(K)), "loss GPU vs CPU")
    gg, cg = grads(loss, xs, mx.ones((4,)))
    agree(gg, cg, TOL[dtype] + 1e-5, "gradient GPU vs CPU")


@pytest.mark.parametrize("K", ODD_K)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_softmax_focal_awkward_rows_gpu(gamma, dtype, K):
    rng = np.random.default_rng(K * 3 + int(gamma * 2))
    x, t = awkward_rows(K, dtype, rng, -1)
    xs = stored(x, dtype)
    ts = mx.array(t)
    alpha = mx.array((0.1 + 0.8 * rng.random(K)).astype(np.float32))

    def loss(a, stream):
        return fl.softmax_focal_loss(a, ts, alpha=alpha, gamma=gamma, ignore_index=-1,
                                     stream=stream)

    g, c = both(loss, xs)
    agree(g, c, 4e-5 * max(1.0, np.log2(K)), "loss GPU vs CPU")
    expected = ref.softmax_focal(as_f64(xs), np.clip(t, -1, K - 1), alpha=np.array(alpha),
                                 gamma=gamma, ignore_index=-1)
    agree(g[REF_ROWS], expected[REF_ROWS], TOL[dtype] + 1e-4 * max(1.0, np.log2(K)),
          "loss vs float64")
    gg, cg = grads(loss, xs, mx.array((0.5 + rng.random(10)).astype(np.float32)))
    agree(gg, cg, TOL[dtype] + 2e-5, "gradient GPU vs CPU")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_awkward_values_gpu(name, reduction, dtype):
    n = 4097
    rng = np.random.default_rng(n + len(name))
    x = rng.standard_normal(n) * 3
    x[:6] = [np.nan, np.inf, -np.inf, HUGE[dtype], -HUGE[dtype], SUBNORMAL[dtype]]
    if name.startswith("sigmoid"):
        tv = (rng.random(n) < 0.3).astype(np.float64)
        tv[::7] = rng.random(tv[::7].size)
    else:
        tv = rng.standard_normal(n) * 2
    xs, ts = stored(x, dtype), stored(tv, dtype)

    def loss(a, stream):
        return POINTWISE[name](a, ts, reduction, stream)

    g, c = both(loss, xs)
    agree(g, c, 1e-5 if reduction == "none" else 2e-5, "loss GPU vs CPU")
    # Without the NaN and infinities, against float64 too.
    keep = slice(3, None)
    xk, tk = stored(x[keep], dtype), stored(tv[keep], dtype)
    gk = np.array(POINTWISE[name](xk, tk, reduction, GPU).astype(mx.float32), np.float64)
    xr, tr = as_f64(xk), as_f64(tk)
    if name == "smooth_l1":
        expected = ref.smooth_l1(xr, tr, beta=1.0, reduction=reduction)
    elif name == "huber":
        expected = ref.huber(xr, tr, delta=1.5, reduction=reduction)
    elif name == "sigmoid_focal":
        expected = ref.sigmoid_focal(xr, tr, alpha=0.25, gamma=2.0, reduction=reduction)
    else:
        expected = ref.sigmoid_focal(xr, tr, alpha=-1.0, gamma=0.5, reduction=reduction)
    if np.all(np.isfinite(expected)):
        agree(gk, expected, TOL[dtype] + (1e-5 if reduction == "none" else 1e-4), "loss vs float64")
    cot = mx.array((0.5 + rng.random(n)).astype(np.float32)) if reduction == "none" else mx.array(1.7)
    gg, cg = grads(loss, xs, cot)
    agree(gg, cg, TOL[dtype] + 2e-6, "gradient GPU vs CPU")


# ---- fused linear cross-entropy (metal/linear_cross_entropy.metal) --------------------------

# (N, H, V): tile edges (BM = BN = 64, BK = 16: MLX's steel tile), H = 7 < BK, several row
# chunks and vocabulary splits, a GPT-2-sized vocabulary.
LCE_SHAPES = [(1, 7, 33), (65, 48, 97), (300, 130, 4097), (64, 256, 50257)]
LCE_OPTIONS = {
    "none": dict(reduction="none"),
    "mean_smooth_ignore_z_bias": dict(reduction="mean", label_smoothing=0.1, ignore_index=-100,
                                      z_loss=1e-3, bias=True),
    "sum_others_cap_bias": dict(reduction="sum", label_smoothing=0.2, label_smoothing_mode="others",
                                logit_softcap=5.0, bias=True),
}


def lce_inputs(n, h, v, hdt, wdt, rng, bias, ignore_index=None):
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    t = rng.integers(0, v, n)
    for r in range(min(n, 8)):  # peaked rows: the softmax is not flat
        w[t[r]] += 20 * hid[r] / max(float(hid[r] @ hid[r]), 1e-6)
    if ignore_index is not None:
        t[1::7] = ignore_index
    args = [stored(hid, hdt), stored(w, wdt), mx.array(t)]
    if bias:
        args.append(stored(rng.standard_normal(v).astype(np.float32), wdt))
    return args


def lce_on(dev, args, opts, chunk_bytes, return_stats=False):
    kw = {k: v for k, v in opts.items() if k != "bias"}
    bias = args[3] if len(args) > 3 else None
    return fl.linear_cross_entropy(args[0], args[1], args[2], bias, chunk_bytes=chunk_bytes,
                                   return_stats=return_stats, dtype=mx.float32, stream=dev, **kw)


@pytest.mark.parametrize("n,h,v", LCE_SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in LCE_SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("option", list(LCE_OPTIONS))
def test_linear_cross_entropy_gpu_vs_cpu(option, dtype, n, h, v):
    """Loss, statistics and the gradients w.r.t. hidden, weight and bias on the GPU
    against the CPU primitive; chunk_bytes forces several row chunks."""
    opts = LCE_OPTIONS[option]
    rng = np.random.default_rng(n + h + v)
    args = lce_inputs(n, h, v, dtype, dtype, rng, opts.get("bias", False), opts.get("ignore_index"))
    chunk = 4 * v * 40
    names = [i for i in range(len(args)) if i != 2]  # hidden, weight, [bias]
    cot = (mx.array(rng.uniform(-1, 1, n).astype(np.float32)) if opts["reduction"] == "none"
           else mx.array(1.3))
    out = []
    for dev in (GPU, mx.cpu):
        loss, stats = lce_on(dev, args, opts, chunk, return_stats=True)

        def f(*p):
            full = list(args)
            for i, a in zip(names, p):
                full[i] = a
            return lce_on(dev, full, opts, chunk)

        _, g = mx.vjp(lambda *p: [f(*p)], [args[i] for i in names], [cot])
        out.append([as_f64(loss), as_f64(stats["lse"]), as_f64(stats["entropy"]),
                    np.array(stats["correct"])] + [as_f64(x) for x in g])
    gpu, cpu = out
    rtol = 2e-5 * max(1.0, np.sqrt(h / 16))
    agree(gpu[0], cpu[0], rtol, "loss")
    agree(gpu[1], cpu[1], rtol, "lse")
    agree(gpu[2], cpu[2], 5 * rtol, "entropy")
    assert (gpu[3] == cpu[3]).mean() > 0.9 and gpu[3][:8].sum() >= 1
    for k, (a, b) in enumerate(zip(gpu[4:], cpu[4:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("option", ["none", "mean_smooth_ignore_z_bias"])
def test_linear_cross_entropy_differentiable_lse_gpu_vs_cpu(option, dtype):
    """stats["lse"] with its gradient (differentiable_lse: the lse's cotangents
    in lce_dz, ignored rows included) beside the loss's, GPU vs CPU."""
    n, h, v = 65, 48, 97
    opts = LCE_OPTIONS[option]
    rng = np.random.default_rng(7)
    args = lce_inputs(n, h, v, dtype, dtype, rng, opts.get("bias", False), opts.get("ignore_index"))
    names = [i for i in range(len(args)) if i != 2]
    c = mx.array(rng.uniform(-1, 1, n).astype(np.float32))
    out = []
    for dev in (GPU, mx.cpu):
        def f(*p):
            full = list(args)
            for i, a in zip(names, p):
                full[i] = a
            kw = {k: x for k, x in opts.items() if k != "bias"}
            loss, stats = fl.linear_cross_entropy(full[0], full[1], full[2], full[3] if len(full) > 3 else None,
                                                  chunk_bytes=4 * v * 40, return_stats=True,
                                                  differentiable_lse=True, dtype=mx.float32, stream=dev, **kw)
            return (loss * c).sum() + (stats["lse"] * c).sum() if loss.ndim else loss + (stats["lse"] * c).sum()

        _, g = mx.value_and_grad(f, argnums=tuple(range(len(names))))(*[args[i] for i in names])
        out.append([as_f64(x) for x in g])
    for k, (a, b) in enumerate(zip(*out)):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


# The steel tile (metal/lce_gemm.h: MLX's BlockLoader and BlockMMA, 64 x 64 x 16, 2 x 2
# SIMD-groups of 32 x 32) at its edges on Apple's GPU, 16-bit operands staged as 16-bit:
# rows and classes at 63/64/65 (the loader's load_safe path and the masked stores), K at
# 15/16/17 and a long K (many staged steps), a vocabulary whose last tile leaves the second
# SIMD-group column without a class (the row-state merge of an empty piece).
STEEL_EDGES = [(63, 15, 64), (64, 16, 65), (65, 17, 63), (129, 33, 64 * 3 + 5), (64, 1040, 130)]


@pytest.mark.parametrize("n,h,v", STEEL_EDGES, ids=[f"{n}x{h}x{v}" for n, h, v in STEEL_EDGES])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_linear_cross_entropy_gpu_steel_tile_edges(dtype, n, h, v):
    rng = np.random.default_rng(n * 7 + h + v)
    args = lce_inputs(n, h, v, dtype, dtype, rng, True, -100)
    opts = dict(reduction="sum", label_smoothing=0.1, ignore_index=-100, bias=True)
    res = []
    for dev in (GPU, mx.cpu):
        vg = mx.value_and_grad(lambda a, b, c: lce_on(dev, [a, b, args[2], c], opts, 4 * v * 70),
                               argnums=(0, 1, 2))
        loss, grads = vg(args[0], args[1], args[3])
        _, stats = lce_on(dev, args, opts, 4 * v * 70, return_stats=True)
        res.append([as_f64(loss), as_f64(stats["lse"]), as_f64(stats["entropy"])]
                   + [as_f64(g) for g in grads])
    gpu, cpu = res
    rtol = 2e-5 * max(1.0, np.sqrt(h / 16))
    agree(gpu[0], cpu[0], rtol, "loss")
    agree(gpu[1], cpu[1], rtol, "lse")
    agree(gpu[2], cpu[2], 5 * rtol, "entropy")
    for k, (a, b) in enumerate(zip(gpu[3:], cpu[3:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


def test_linear_cross_entropy_gpu_mixed_dtypes_and_fused_grads():
    """bfloat16 hidden with a float16 weight; value_and_grad of the mean (the forward
    forms the gradients, LceScaleGrad scales them) equals the recomputing backward."""
    rng = np.random.default_rng(3)
    args = lce_inputs(70, 40, 1000, "bfloat16", "float16", rng, True)
    opts = dict(reduction="mean", label_smoothing=0.1, bias=True)
    res = []
    for dev in (GPU, mx.cpu):
        vg = mx.value_and_grad(lambda h, w, b: lce_on(dev, [h, w, args[2], b], opts, 1 << 16),
                               argnums=(0, 1, 2))
        loss, grads = vg(args[0], args[1], args[3])
        res.append([as_f64(loss)] + [as_f64(g) for g in grads])
    for a, b in zip(*res):
        agree(a, b, 2e-2, "mixed dtypes")


def test_linear_cross_entropy_gpu_across_command_buffers():
    """A step of ~8.8 TFLOP: more than the plan's 2^40 FLOPs per command buffer
    (csrc/metal/launch_plan.h), so eval_gpu splits the forward into launches of
    2016 rows (row0 = 0, 2016, 4032) and commits between them and between the
    backward's chunks (docs/metal_linear_cross_entropy.md, Command buffers).
    Against the same maths composed from MLX's own ops on the GPU (float32
    logits: 128 MB at this V). Run with MTL_DEBUG_LAYER=1 to have Metal check
    the commits (a completion handler added after commit is an error there)."""
    n, h, v = 4096, 32768, 8192
    assert v * (2 * h + 1) * 2048 > 2**40  # fewer than 2048 rows per launch
    rng = np.random.default_rng(11)
    hid = stored((rng.standard_normal((n, h)) / 8).astype(np.float32), "bfloat16")
    w = stored((rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32), "bfloat16")
    t = mx.array(rng.integers(0, v, n))

    def fused(a, b):
        return fl.linear_cross_entropy(a, b, t, reduction="mean", dtype=mx.float32, stream=GPU)

    def composed(a, b):
        z = mx.matmul(a.astype(mx.float32), b.astype(mx.float32).T, stream=GPU)
        lse = mx.logsumexp(z, axis=-1, stream=GPU)
        zt = mx.take_along_axis(z, t[:, None], axis=-1, stream=GPU)[:, 0]
        return mx.mean(lse - zt, stream=GPU)

    res = []
    for f in (fused, composed):
        loss, (gh, gw) = mx.value_and_grad(f, argnums=(0, 1))(hid, w)
        res.append([as_f64(loss), as_f64(gh), as_f64(gw)])
    for (a, b), what in zip(zip(*res), ("loss", "dH", "dW")):
        agree(a, b, 1e-3, f"{what} across command buffers")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_cross_entropy_gpu_stored_z_path(dtype):
    """A training step (value_and_grad of the mean: the forward forms the gradients)
    takes the stored-Z path (launch_plan.h lce_schedule: logits GEMM, fl_lce_rows, dH,
    dW per chunk). Its loss, statistics and gradients against the GPU's other path (the
    forward tiles, then the backward that recomputes Z: reduction "none") and against
    the CPU; V > 4 x 256 (each row kernel thread several steps), three row chunks."""
    n, h, v = 150, 96, 3001
    rng = np.random.default_rng(21)
    args = lce_inputs(n, h, v, dtype, dtype, rng, True, -100)
    chunk = 4 * v * 64
    kw = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3, logit_softcap=8.0,
              chunk_bytes=chunk, dtype=mx.float32)
    res = {}
    for name, dev, reduction in (("stored_z", GPU, "mean"), ("recompute", GPU, "none"),
                                 ("cpu", mx.cpu, "mean")):
        def f(a, b, c):
            out = fl.linear_cross_entropy(a, b, args[2], c, reduction=reduction, return_stats=True,
                                          stream=dev, **kw)
            loss = out[0] if reduction == "mean" else mx.sum(out[0]) / mx.sum(args[2] != -100)
            return [loss, out[1]["lse"], out[1]["entropy"]]

        outs, grads = mx.vjp(f, [args[0], args[1], args[3]],
                             [mx.array(1.0), mx.zeros((n,)), mx.zeros((n,))])
        res[name] = [as_f64(o) for o in outs] + [as_f64(g) for g in grads]
    for other in ("recompute", "cpu"):
        for k, what in enumerate(["loss", "lse", "entropy", "dH", "dW", "dbias"]):
            tol = 1e-4 if k < 3 else TOL[dtype] + 1e-4
            agree(res["stored_z"][k], res[other][k], tol, f"{what}: stored Z vs {other}")


@pytest.mark.skipif(ON_CPU, reason="the GPU's default chunk; 0.5 TFLOP, too slow for the CPU dry run")
def test_linear_cross_entropy_gpu_default_chunk_bounds_memory():
    """The GPU's default chunk (512 MiB, ops/linear_cross_entropy.h) bounds the
    training step's working memory: at V = 151936 the float32 logits of 2048 rows would
    be 1.24 GB; the step's peak above its inputs and gradients stays within the chunk
    (832 rows of float32 Z, 505 MB) and a little more."""
    n, h, v = 2048, 256, 151936
    rng = np.random.default_rng(2)
    hid = stored(rng.standard_normal((n, h)).astype(np.float32), "bfloat16")
    w = stored((rng.standard_normal((v, h)) / 16).astype(np.float32), "bfloat16")
    t = mx.array(rng.integers(0, v, n))
    mx.eval(hid, w, t)
    vg = mx.value_and_grad(lambda a, b: fl.linear_cross_entropy(a, b, t, stream=GPU), argnums=(0, 1))
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loss, (gh, gw) = vg(hid, w)
    mx.eval(loss, gh, gw)
    grads = (4 + 2) * (n * h + v * h)  # the float32 gradients and their bfloat16 casts
    extra = mx.get_peak_memory() - base - grads
    assert extra < 1.2 * ext.LINEAR_CE_GPU_DEFAULT_CHUNK_BYTES, extra
    assert np.isfinite(as_f64(loss)).all()


# ---- fused linear cross-entropy, quantized heads (metal/quantized_head.h) --------------------


def lce_quantized(args, bits, group_size, scale_dtype=None, mode="affine", global_scale=None):
    """args with the weight replaced by mx.quantize's packed head (scales in the
    weight's dtype, or scale_dtype; uint8 and no biases for the floating-point
    modes): (args, scales, biases)."""
    w = args[1] if scale_dtype is None else args[1].astype(DTYPES[scale_dtype])
    if mode != "affine":
        w_q, scales = mx.quantize(w, mode=mode, global_scale=global_scale)
        biases = None
    else:
        w_q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    mx.eval(w_q, scales, biases)
    return [args[0], w_q, *args[2:]], scales, biases


def lce_quantized_both(args, scales, biases, opts, chunk, bits, group_size, cot, mode="affine",
                       global_scale=None):
    """Loss, lse, entropy, correct and the gradients w.r.t. hidden and bias on the GPU
    and on the CPU (the packed weight, its scales and biases are constants)."""
    kw = {k: v for k, v in opts.items() if k != "bias"}
    kw.update(scales=scales, biases=biases, group_size=group_size, bits=bits, chunk_bytes=chunk,
              dtype=mx.float32, mode=mode, global_scale=global_scale)
    has_bias = len(args) > 3
    out = []
    for dev in (GPU, mx.cpu):
        def f(h, *b):
            return fl.linear_cross_entropy(h, args[1], args[2], b[0] if b else None, stream=dev, **kw)

        loss, stats = fl.linear_cross_entropy(args[0], args[1], args[2], args[3] if has_bias else None,
                                              return_stats=True, stream=dev, **kw)
        primals = [args[0]] + ([args[3]] if has_bias else [])
        _, g = mx.vjp(lambda *p: [f(*p)], primals, [cot])
        out.append([as_f64(loss), as_f64(stats["lse"]), as_f64(stats["entropy"]),
                    np.array(stats["correct"])] + [as_f64(x) for x in g])
    return out


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_cross_entropy_quantized_gpu_vs_cpu(dtype, bits, group_size):
    """mx.quantize's packed head (scales in the model's dtype) on the GPU against the
    CPU primitive on the same packed arrays: loss, statistics and the gradients
    w.r.t. hidden and bias (a quantized weight has none). N and V off the 32-tiles,
    H a multiple of the group size (mx.quantize requires it), several row chunks."""
    option = list(LCE_OPTIONS)[(bits // 4 + group_size // 64) % len(LCE_OPTIONS)]
    opts = LCE_OPTIONS[option]
    n, h, v = 67, 2 * group_size + (128 if group_size < 128 else 0), 1000 + bits
    rng = np.random.default_rng(bits * 1000 + group_size)
    dense = lce_inputs(n, h, v, dtype, dtype, rng, opts.get("bias", False), opts.get("ignore_index"))
    args, scales, biases = lce_quantized(dense, bits, group_size)
    cot = (mx.array(rng.uniform(-1, 1, n).astype(np.float32)) if opts["reduction"] == "none"
           else mx.array(1.3))
    gpu, cpu = lce_quantized_both(args, scales, biases, opts, 4 * v * 40, bits, group_size, cot)
    rtol = 2e-5 * max(1.0, np.sqrt(h / 16))
    agree(gpu[0], cpu[0], rtol, "loss")
    agree(gpu[1], cpu[1], rtol, "lse")
    agree(gpu[2], cpu[2], 5 * rtol, "entropy")
    assert (gpu[3] == cpu[3]).mean() > 0.9
    for k, (a, b) in enumerate(zip(gpu[4:], cpu[4:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4", "nvfp4_global"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_cross_entropy_fp_quantized_gpu_vs_cpu(dtype, mode):
    """MLX's floating-point modes (uint8 E8M0/E4M3 scales, no biases; nvfp4 also
    with mx.quantize's global scale) on the GPU against the CPU primitive on the
    same packed arrays. The weights' scales stay far from float32 subnormals,
    which an Apple GPU flushes."""
    global_scale = mx.array(0.37, mx.float32) if mode == "nvfp4_global" else None
    mode = mode.replace("_global", "")
    group_size, bits = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
    opts = LCE_OPTIONS[list(LCE_OPTIONS)[len(mode) % len(LCE_OPTIONS)]]
    n, h, v = 67, 192, 1003
    rng = np.random.default_rng(len(mode) * 100 + bits)
    dense = lce_inputs(n, h, v, dtype, dtype, rng, opts.get("bias", False), opts.get("ignore_index"))
    args, scales, _ = lce_quantized(dense, bits, group_size, mode=mode, global_scale=global_scale)
    cot = (mx.array(rng.uniform(-1, 1, n).astype(np.float32)) if opts["reduction"] == "none"
           else mx.array(1.3))
    gpu, cpu = lce_quantized_both(args, scales, None, opts, 4 * v * 40, bits, group_size, cot,
                                  mode=mode, global_scale=global_scale)
    rtol = 2e-5 * max(1.0, np.sqrt(h / 16))
    agree(gpu[0], cpu[0], rtol, "loss")
    agree(gpu[1], cpu[1], rtol, "lse")
    agree(gpu[2], cpu[2], 5 * rtol, "entropy")
    assert (gpu[3] == cpu[3]).mean() > 0.9
    for k, (a, b) in enumerate(zip(gpu[4:], cpu[4:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("scale_dtype,bias_dtype", [("float32", "float32"), ("float16", "bfloat16")])
def test_linear_cross_entropy_quantized_gpu_other_scale_dtypes(scale_dtype, bias_dtype):
    """bfloat16 hidden with float32 scales (head q4_float32 under a bfloat16 kernel),
    and scales and biases of two 16-bit dtypes (promoted together by the op), at a
    GPT-2-sized vocabulary (several vocabulary splits)."""
    rng = np.random.default_rng(11)
    dense = lce_inputs(40, 128, 50257, "bfloat16", "float32", rng, True)
    args, scales, biases = lce_quantized(dense, 4, 64, scale_dtype)
    biases = biases.astype(DTYPES[bias_dtype])
    opts = dict(reduction="none", label_smoothing=0.1, bias=True)
    cot = mx.array(rng.uniform(-1, 1, 40).astype(np.float32))
    gpu, cpu = lce_quantized_both(args, scales, biases, opts, 1 << 22, 4, 64, cot)
    agree(gpu[0], cpu[0], 1e-4, "loss")
    agree(gpu[1], cpu[1], 1e-4, "lse")
    for k, (a, b) in enumerate(zip(gpu[4:], cpu[4:])):
        agree(a, b, TOL["bfloat16"] + 1e-4, f"gradient {k}")


def test_linear_cross_entropy_quantized_gpu_fused_grads():
    """value_and_grad of the mean: the forward forms dH (and dbias) for a unit
    cotangent, LceScaleGrad scales them; equals the CPU's."""
    rng = np.random.default_rng(5)
    dense = lce_inputs(70, 64, 777, "float16", "float16", rng, True)
    args, scales, biases = lce_quantized(dense, 8, 32)
    res = []
    for dev in (GPU, mx.cpu):
        vg = mx.value_and_grad(
            lambda h, b: fl.linear_cross_entropy(h, args[1], args[2], b, scales=scales, biases=biases,
                                                 group_size=32, bits=8, label_smoothing=0.1,
                                                 dtype=mx.float32, stream=dev), argnums=(0, 1))
        loss, grads = vg(args[0], args[3])
        res.append([as_f64(loss)] + [as_f64(g) for g in grads])
    for a, b in zip(*res):
        agree(a, b, 2e-2, "quantized fused gradients")


# ---- the scorer (ops/row_stats.h): linear_log_probs, log_probs, _ext.(linear_)row_stats -------
# Linear form: the linear CE's tiles with the row statistics' finish and rs_dz
# (metal/linear_cross_entropy.metal); logits form: metal/row_stats.metal.

SCORER_STATS = ["lse", "lse_lo", "target", "logit_sum", "expected", "expected_lo", "max", "argmax"]


def scorer_grads(fn, primals, cots, dev):
    """Outputs of fn(*primals, dev) (a tuple) and their vjp with a different
    cotangent per token on each output (Liger #968: never one scalar)."""
    outs, g = mx.vjp(lambda *p: list(fn(*p, dev)), list(primals), cots)
    return [as_f64(o) for o in outs] + [as_f64(x) for x in g]


@pytest.mark.parametrize("n,h,v", LCE_SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in LCE_SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_log_probs_gpu_vs_cpu(dtype, n, h, v):
    """log p and entropy (temperature, soft-cap, bias, ignored rows, several row
    chunks) and their gradients w.r.t. hidden, weight and bias, per-token
    cotangents on both outputs, GPU against the CPU primitive."""
    rng = np.random.default_rng(n + 3 * h + v)
    args = lce_inputs(n, h, v, dtype, dtype, rng, True, -100)
    kw = dict(temperature=0.7, logit_softcap=8.0, ignore_index=-100, return_entropy=True, chunk_bytes=4 * v * 40)
    cots = [mx.array(rng.uniform(-1, 1, n).astype(np.float32)) for _ in range(2)]

    def f(a, b, c, dev):
        return fl.linear_log_probs(a, b, args[2], c, stream=dev, **kw)

    gpu, cpu = (scorer_grads(f, [args[0], args[1], args[3]], cots, dev) for dev in (GPU, mx.cpu))
    rtol = 2e-5 * max(1.0, np.sqrt(h / 16))
    agree(gpu[0], cpu[0], rtol, "log p", scale=np.abs(cpu[0]).max() + 1.0)
    agree(gpu[1], cpu[1], 5 * rtol, "entropy", scale=np.abs(cpu[1]).max() + 1.0)
    for k, (a, b) in enumerate(zip(gpu[2:], cpu[2:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_row_stats_every_statistic_gpu(dtype):
    """Every statistic of the linear form on the GPU (argmax from the tiles'
    per-split argmaxes, a sharded head's global index) against the CPU."""
    rng = np.random.default_rng(17)
    n, h, v = 70, 40, 5000
    args = lce_inputs(n, h, v, dtype, dtype, rng, True)
    t = mx.array(40 + rng.integers(0, v, n))
    res = []
    for dev in (GPU, mx.cpu):
        outs = ext.linear_row_stats(args[0], args[1], t, args[3].astype(mx.float32), stats=SCORER_STATS,
                                    temperature=1.5, vocab_start=40, stream=dev)
        res.append(outs)
    for name, a, b in zip(SCORER_STATS, *res):
        if name == "argmax":
            assert (np.array(a) == np.array(b)).mean() > 0.98, "argmax"  # near-ties may differ in the last bit
        else:
            agree(as_f64(a), as_f64(b), 5e-5 if name != "logit_sum" else 1e-4, name,
                  scale=None if name.endswith("_lo") else np.abs(as_f64(b)).max() + 1.0)


@pytest.mark.parametrize("bits,mode", [(4, "affine"), (8, "affine"), (4, "mxfp4")])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_linear_log_probs_quantized_gpu_vs_cpu(dtype, bits, mode):
    """A quantized head (mx.quantize's packed arrays): log p, entropy and the
    gradients w.r.t. hidden and bias (the packed weight has none)."""
    group_size = 64 if mode == "affine" else 32
    rng = np.random.default_rng(bits + len(mode))
    n, h, v = 67, 128, 1003
    dense = lce_inputs(n, h, v, dtype, dtype, rng, True, -100)
    args, scales, biases = lce_quantized(dense, bits, group_size, mode=mode)
    kw = dict(scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode, ignore_index=-100,
              return_entropy=True, chunk_bytes=4 * v * 40)
    cots = [mx.array(rng.uniform(-1, 1, n).astype(np.float32)) for _ in range(2)]

    def f(a, c, dev):
        return fl.linear_log_probs(a, args[1], args[2], c, stream=dev, **kw)

    gpu, cpu = (scorer_grads(f, [args[0], args[3]], cots, dev) for dev in (GPU, mx.cpu))
    agree(gpu[0], cpu[0], 1e-4, "log p", scale=np.abs(cpu[0]).max() + 1.0)
    agree(gpu[1], cpu[1], 5e-4, "entropy", scale=np.abs(cpu[1]).max() + 1.0)
    for k, (a, b) in enumerate(zip(gpu[2:], cpu[2:])):
        agree(a, b, TOL[dtype] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("K", [1, 33, 4097, 50257])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_log_probs_gpu_vs_cpu(dtype, K):
    """The logits form (metal/row_stats.metal): log p and entropy with
    temperature and soft-cap, an ignored row, -inf classes, an all -inf row and
    a NaN row, and the gradient for per-token cotangents on both outputs."""
    rng = np.random.default_rng(K)
    rows = 9
    x = rng.standard_normal((rows, K)) * 3
    t = rng.integers(0, K, rows)
    t[1] = -100
    if K > 2:
        x[2, ::3] = -np.inf
        t[2] = 1
        x[3] = -np.inf
        x[4, K // 2] = np.nan
    xs = stored(x, dtype)
    cots = [mx.array(rng.uniform(-1, 1, rows).astype(np.float32)) for _ in range(2)]

    def f(a, dev):
        return fl.log_probs(a, mx.array(t), temperature=1.3, logit_softcap=20.0, ignore_index=-100,
                            return_entropy=True, stream=dev)

    gpu, cpu = (scorer_grads(f, [xs], cots, dev) for dev in (GPU, mx.cpu))
    agree(gpu[0], cpu[0], loss_rtol_of(K), "log p", scale=np.abs(cpu[0][np.isfinite(cpu[0])]).max() + 1.0)
    agree(gpu[1], cpu[1], 5 * loss_rtol_of(K), "entropy", scale=np.abs(cpu[1][np.isfinite(cpu[1])]).max() + 1.0)
    agree(gpu[2], cpu[2], TOL[dtype] + 2e-5, "gradient")
    for dev in (GPU, mx.cpu):  # argmax and max as mx.argmax / mx.max (a NaN row: its first NaN)
        am, mm = ext.row_stats(xs, None, stats=["argmax", "max"], stream=dev)
        np.testing.assert_array_equal(np.array(am), np.array(mx.argmax(xs, axis=-1, stream=mx.cpu)))
        fin = ~np.isnan(x).any(-1)
        np.testing.assert_array_equal(as_f64(mm)[fin], as_f64(mx.max(xs, axis=-1, stream=mx.cpu))[fin])


def loss_rtol_of(K):
    return check_gpu.loss_rtol(K)


# ---- broadcast targets, read in place by the _bcast kernels ------------------------------------

def _transposed_middle(rng, shape):
    # (N, 1, K) from the transpose of a (K, N) array: a non-contiguous view
    n, _, k = shape
    return mx.array(rng.standard_normal((k, n)).astype(np.float32)).T[:, None, :]


BCAST_TARGETS = {
    "scalar": ((37, 41), lambda rng, s: mx.array(np.float32(rng.standard_normal()))),
    "row_1xK": ((70, 131), lambda rng, s: mx.array(rng.standard_normal((1, s[1])).astype(np.float32))),
    "column_Nx1": ((129, 67), lambda rng, s: mx.array(rng.standard_normal((s[0], 1)).astype(np.float32))),
    "middle_axis": ((5, 9, 203), lambda rng, s: mx.array(
        rng.standard_normal((s[0], 1, s[2])).astype(np.float32))),
    "transposed_middle": ((6, 5, 77), _transposed_middle),
    "leading_axes": ((3, 4, 1000), lambda rng, s: mx.array(rng.standard_normal(s[2]).astype(np.float32))),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("target", list(BCAST_TARGETS))
def test_pointwise_broadcast_target_gpu_vs_cpu(target, reduction, dtype):
    pshape, make = BCAST_TARGETS[target]
    rng = np.random.default_rng(len(target))
    x = mx.array((rng.standard_normal(pshape) * 3).astype(np.float32)).astype(DTYPES[dtype])
    t = make(rng, pshape)
    for name, f in POINTWISE.items():
        tt = mx.sigmoid(3 * t) if name.startswith("sigmoid") else t

        def loss(a, stream):
            return f(a, tt, reduction, stream)

        g, c = both(loss, x)
        close(g, c, 1e-5 if reduction == "none" else 2e-5)
        cot = (mx.array((0.5 + rng.random(pshape)).astype(np.float32)) if reduction == "none"
               else mx.array(1.7))
        gg, cg = grads(loss, x, cot)
        close(gg, cg, TOL[dtype] + 2e-6)


@pytest.mark.parametrize("tshape", [(4096,), (2048, 1), ()], ids=str)
def test_broadcast_targets_make_no_full_size_copy_gpu(tshape):
    # 8M float32 predictions (32 MiB) on the GPU: a full-size copy of the
    # target (the Metal path before the _bcast kernels) would add 32 MiB to
    # the peak; reading it in place adds nothing of that size.
    p = mx.random.normal((2048, 4096), stream=GPU)
    t = mx.random.uniform(shape=tshape, stream=GPU)
    mx.eval(p, t)
    full = p.nbytes
    for name, f in POINTWISE.items():
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(f(p, t, "mean", GPU))
        assert mx.get_peak_memory() - base < full // 8, (name, "mean")
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = f(p, t, "none", GPU)
        mx.eval(out)
        assert mx.get_peak_memory() - base < full + full // 8, (name, "none")
        del out
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        g = mx.grad(lambda a: f(a, t, "mean", GPU))(p)
        mx.eval(g)
        assert mx.get_peak_memory() - base < full + full // 8, (name, "grad")
        del g


# ---- fused linear distillation (metal/linear_distillation.metal) ---------------------------------
# Per chunk of rows, each head's logits on the linear CE's tiles, the logits
# form's row kernels (or the top-k rows) and the linear CE's dH / dW; the
# harness (tests/test_metal_linear_distillation.py) checks every kernel on
# Linux. Here: the metallib's instantiations, eval_gpu's bindings (the per-row
# buffers at each chunk's byte offset, dZ in place), both gradient paths (the
# forward's, for a mean; the backward primitive's, for per-row cotangents).

LD_SHAPES = [(5, 24, 40, 1), (67, 64, 32, 1003), (33, 128, 96, 50257)]


def ld_heads(n, hs, ht, v, sdt, tdt, rng):
    """Student and teacher hiddens and dense weights (the teacher sharper)."""
    def arr(shape, scale, dt):
        return stored(rng.standard_normal(shape).astype(np.float32) * scale, dt)
    return (arr((n, hs), 1.0, sdt), arr((v, hs), 1 / np.sqrt(hs), sdt), arr((n, ht), 1.0, tdt),
            arr((v, ht), 3 / np.sqrt(ht), tdt))


def ld_targets(n, v, rng):
    t = rng.integers(0, v, n)
    t[1::5] = -100
    return mx.array(t)


@pytest.mark.parametrize("n,hs,ht,v", LD_SHAPES, ids=[f"{n}x{hs}x{ht}x{v}" for n, hs, ht, v in LD_SHAPES])
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float16"), ("float16", "bfloat16")],
                         ids="-".join)
@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_linear_distillation_gpu_vs_cpu(kind, beta, dtypes, n, hs, ht, v):
    """Per-row losses and the gradients of sum(cot * rows) (the backward
    primitive), and value_and_grad of the mean (gradients in the forward), on
    the GPU against the CPU primitive; several row chunks."""
    rng = np.random.default_rng(n + v)
    sh, sw, th, tw = ld_heads(n, hs, ht, v, *dtypes, rng)
    y = ld_targets(n, v, rng)
    kw = dict(kind=kind, beta=beta, temperature=1.4, alpha=0.2, ignore_index=-100,
              chunk_bytes=8 * v * 16, dtype=mx.float32)
    cot = mx.array(rng.uniform(0.5, 1.5, n).astype(np.float32))
    res = []
    for dev in (GPU, mx.cpu):
        rows = fl.linear_distillation_loss(sh, sw, th, tw, y, reduction="none", stream=dev, **kw)
        _, g_rows = mx.vjp(lambda a, b: fl.linear_distillation_loss(a, b, th, tw, y, reduction="none",
                                                                     stream=dev, **kw), [sh, sw], [cot])
        mean, g_mean = mx.value_and_grad(lambda a, b: fl.linear_distillation_loss(
            a, b, th, tw, y, reduction="mean", stream=dev, **kw), argnums=(0, 1))(sh, sw)
        res.append([as_f64(rows), as_f64(mean)] + [as_f64(g) for g in (*g_rows, *g_mean)])
    rtol = 2e-5 * max(1.0, np.sqrt(max(hs, ht) / 16))
    agree(res[0][0], res[1][0], rtol, "rows")
    agree(res[0][1], res[1][1], rtol, "mean")
    for k, (a, b) in enumerate(zip(res[0][2:], res[1][2:])):
        agree(a, b, TOL[dtypes[0]] + 1e-4, f"gradient {k}")


@pytest.mark.parametrize("mode", ["affine4", "affine8_bf16_scales", "mxfp4", "nvfp4_global"])
def test_linear_distillation_quantized_gpu_vs_cpu(mode):
    """A quantized teacher (every family of mx.quantize's formats) against a
    dense student, and a quantized student (dH only) against a dense teacher."""
    rng = np.random.default_rng(len(mode))
    n, h, v = 37, 128, 1001
    sh, sw, th, tw = ld_heads(n, h, h, v, "bfloat16", "float32", rng)
    gs = mx.array(0.5, mx.float32) if mode == "nvfp4_global" else None
    if mode.startswith("affine"):
        bits = int(mode[6])
        w = tw.astype(mx.bfloat16) if "bf16" in mode else tw
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        quant = dict(scales=s, biases=b, group_size=64, bits=bits, mode="affine")
    else:
        m = mode.replace("_global", "")
        q, s = mx.quantize(tw, mode=m, global_scale=gs)
        quant = dict(scales=s, group_size={"mxfp4": 32, "nvfp4": 16}[m], bits=4, mode=m, global_scale=gs)
    y = ld_targets(n, v, rng)
    cot = mx.array(rng.uniform(0.5, 1.5, n).astype(np.float32))
    kw = dict(kind="jsd", beta=0.4, temperature=1.2, alpha=0.1, ignore_index=-100, chunk_bytes=8 * v * 8,
              reduction="none", dtype=mx.float32)
    teacher_q = {f"teacher_{k}": val for k, val in quant.items()}
    student_q = {f"student_{k}": val for k, val in quant.items()}
    res = []
    for dev in (GPU, mx.cpu):
        (rows,), g1 = mx.vjp(lambda a, b: fl.linear_distillation_loss(a, b, th, q, y, stream=dev, **teacher_q, **kw),
                          [sh, sw], [cot])
        (rows2,), g2 = mx.vjp(lambda a: fl.linear_distillation_loss(a, q, th, tw, y, stream=dev, **student_q, **kw),
                           [sh], [cot])
        res.append([as_f64(rows), as_f64(rows2)] + [as_f64(g) for g in (*g1, *g2)])
    for k, (a, b) in enumerate(zip(*res)):
        agree(a, b, 1e-4 if k < 2 else TOL["bfloat16"] + 1e-4, f"output {k}")


@pytest.mark.parametrize("k", [1, 20, "V"])
@pytest.mark.parametrize("v", [33, 4097, 50257])
@pytest.mark.parametrize("renormalize", [False, True])
def test_linear_topk_distillation_gpu_vs_cpu(renormalize, v, k):
    """An offline teacher's top-k (k = 1, a few, every class), stored or
    renormalised, the CE mixed in with an ignored row and a bad id (NaN row):
    per-row losses and gradients, and value_and_grad of the sum."""
    rng = np.random.default_rng(v + (k if k != "V" else 0))
    n, h = 29, 64
    kk = v if k == "V" else k
    if kk * n > 4_000_000:
        n = 9
    sh, sw, _, _ = ld_heads(n, h, 8, v, "float16", "float16", rng)
    teacher = rng.standard_normal((n, v)) * 2
    lp = teacher - ref.logsumexp(teacher, keepdims=True)
    ids = np.argsort(-teacher, -1)[:, :kk]
    vals = np.take_along_axis(lp, ids, -1).astype(np.float32)
    ids[2, 0] = v  # a bad id: a NaN row
    ids_m, vals_m, y = mx.array(ids), mx.array(vals), ld_targets(n, v, rng)
    kw = dict(temperature=1.3, renormalize=renormalize, alpha=0.3, ignore_index=-100, chunk_bytes=4 * v * 8,
              dtype=mx.float32)
    cot = mx.array(rng.uniform(0.5, 1.5, n).astype(np.float32))
    res = []
    for dev in (GPU, mx.cpu):
        (rows,), g1 = mx.vjp(lambda a, b: fl.linear_topk_distillation_loss(a, b, ids_m, vals_m, y, reduction="none",
                                                                         stream=dev, **kw), [sh, sw], [cot])
        res.append([as_f64(rows)] + [as_f64(g) for g in g1])
    agree(res[0][0], res[1][0], 1e-4, "rows")
    for i, (a, b) in enumerate(zip(res[0][1:], res[1][1:])):
        agree(a, b, TOL["float16"] + 1e-4, f"gradient {i}")
    ids[2, 0] = 0  # the sum (its gradients in the forward) without the NaN row
    ids_m = mx.array(ids)
    res = []
    for dev in (GPU, mx.cpu):
        loss, g = mx.value_and_grad(lambda a, b: fl.linear_topk_distillation_loss(
            a, b, ids_m, vals_m, y, reduction="sum", stream=dev, **kw), argnums=(0, 1))(sh, sw)
        res.append([as_f64(loss)] + [as_f64(x) for x in g])
    agree(res[0][0], res[1][0], 1e-4, "sum")
    for i, (a, b) in enumerate(zip(res[0][1:], res[1][1:])):
        agree(a, b, TOL["float16"] + 1e-4, f"gradient {i} of the sum")


def test_linear_distillation_gpu_across_command_buffers():
    """A call whose work exceeds one command buffer's bound (launch_plan.h
    kLceMaxBufferFlops = 2^40 FLOPs): the schedule commits between chunks."""
    rng = np.random.default_rng(3)
    n, hs, ht, v = 2048, 1024, 1024, 151936 // 2  # ~1.3e12 FLOPs in all: two buffers at least
    sh, sw, th, tw = ld_heads(n, hs, ht, v, "bfloat16", "bfloat16", rng)
    res = []
    for dev in (GPU, mx.cpu):
        loss, g = mx.value_and_grad(lambda a: fl.linear_distillation_loss(
            a, sw, th, tw, temperature=2.0, chunk_bytes=1 << 28, stream=dev))(sh)
        res.append([as_f64(loss), as_f64(g)])
    agree(res[0][0], res[1][0], 1e-4, "loss")
    agree(res[0][1], res[1][1], TOL["bfloat16"] + 1e-4, "gradient")
