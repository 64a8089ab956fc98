"""The real Metal kernels on an Apple GPU, against the CPU primitives.

Skipped unless MLX has Metal (the macOS CI job, .github/workflows/macos.yml).
Every loss runs forward and backward on mx.gpu and on mx.cpu with the same
inputs; block (K <= 4096) and looped (K > 4096) row kernels, every dtype and
the main options are covered. The CPU harness (tests/test_metal_kernels.py)
checks the same kernels exhaustively on Linux; this file checks what only real
hardware can: that the metallib builds and loads, that eval_gpu binds the
buffers the kernels expect, and that Metal's compiler and SIMD hardware give
the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses as fl  # noqa: E402  (missing: a failure, not a skip)
import mlx_fused_losses._ext as ext  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (hasattr(mx, "metal") and mx.metal.is_available()), reason="no Metal GPU"
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Relative tolerance of a stored value (outputs and gradients in the dtype).
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def both(fn, *arrays):
    """fn(*arrays, stream) evaluated on the GPU and on the CPU, as float64."""
    out = []
    for dev in (mx.gpu, mx.cpu):
        r = fn(*arrays, stream=dev)
        out.append(np.array(r.astype(mx.float32), dtype=np.float64))
    return out


def close(gpu, cpu, rtol, atol_scale=None):
    np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu))
    fin = ~np.isnan(cpu)
    scale = np.abs(cpu[fin]).max() if fin.any() else 1.0
    atol = rtol * (scale if atol_scale is None else atol_scale)
    np.testing.assert_allclose(gpu[fin], cpu[fin], rtol=rtol, atol=atol)


def grads(loss_fn, x, cot):
    """d/dx of sum(cot * loss) on GPU and CPU."""
    out = []
    for dev in (mx.gpu, mx.cpu):
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
    ],
    ids=["plain", "smooth_ignore_weights_z", "soft_others"],
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
        again = np.array(loss(x, mx.gpu))
        assert np.array_equal(again, np.array(loss(x, mx.gpu)))
    cot = mx.array((0.5 + rng.random(n)).astype(np.float32)) if reduction == "none" else mx.array(1.7)
    gg, cg = grads(loss, x, cot)
    close(gg, cg, TOL[dtype] + 2e-6)


def test_public_api_on_gpu():
    """The Python wrappers pick the GPU primitive under the default device."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((4, 10)).astype(np.float32))
    t = mx.array(rng.integers(0, 10, 4))
    with mx.stream(mx.gpu):
        g = fl.cross_entropy(x, t, reduction="mean")
    c = fl.cross_entropy(x, t, reduction="mean", stream=mx.cpu)
    np.testing.assert_allclose(np.array(g), np.array(c), rtol=1e-5)
