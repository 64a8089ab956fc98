"""The chunked-head driver (csrc/cpu/chunked_head.h) on its own, through the
test hook _ext.chunked_head_probe: no loss epilogue, so what is checked is the
driver's part alone. Per chunk the probe copies Z = H W^T (and a second head's
Z2) out and writes a given dZ over Z; the driver's dH = dZ W, dW = dZ^T H and
dbias = column sums of dZ are compared with float64 matmuls. One head or two
(the distillation layout: another H, dtype or quantized format, no gradient),
at chunk sizes from one row to the whole batch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import to_np

fl = pytest.importorskip("mlx_fused_losses")
from mlx_fused_losses import _ext  # noqa: E402


def f64(a):
    return to_np(a).astype(np.float64)


def check_gemm(got, want, a_abs, b_abs, k, extra=0.0):
    """got vs the float64 product: within k float32 roundings of |A| |B| (+ extra)."""
    bound = 2 * (k + 2) * np.finfo(np.float32).eps * (a_abs @ b_abs) + extra + 1e-30
    err = np.abs(to_np(got).astype(np.float64) - want)
    assert np.all(err <= bound), f"max err {err.max()} vs bound {bound.max()}"


def head(rng, n, h, v, dtype=mx.float32):
    x = mx.array(rng.standard_normal((n, h)).astype(np.float32)).astype(dtype)
    w = mx.array((rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)).astype(dtype)
    return x, w


@pytest.fixture(params=["sgemm", "bf16_gemm"])
def gemm_path(request):
    """Both GEMM paths of a bfloat16 head: widened to float32 for sgemm, or
    oneDNN's bf16 GEMM (csrc/cpu/bf16_gemm.cpp) where this CPU and install have it."""
    if request.param == "bf16_gemm" and not _ext.bf16_gemm_status()["active"]:
        pytest.skip(f"no bf16 GEMM here: {_ext.bf16_gemm_status()['reason']}")
    _ext._set_bf16_gemm_enabled(request.param == "bf16_gemm")
    yield request.param
    _ext._set_bf16_gemm_enabled(True)


@pytest.mark.parametrize("n,h,v", [(1, 7, 1), (13, 123, 33), (40, 64, 4097), (5, 512, 31)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("chunk_rows", [1, 3, None])
def test_one_head_logits_and_gradients(rng, n, h, v, dtype, chunk_rows, gemm_path):
    """bfloat16 on both paths; float16 takes oneDNN's f16 GEMM for Z where the
    CPU has AVX512-FP16 (csrc/cpu/chunked_head.cpp), sgemm elsewhere."""
    if gemm_path == "bf16_gemm" and dtype == mx.float32:
        pytest.skip("the 16-bit GEMMs serve 16-bit heads only")
    x, w = head(rng, n, h, v, dtype)
    dz = mx.array(rng.standard_normal((n, v)).astype(np.float32))
    chunk = None if chunk_rows is None else chunk_rows * 4 * (v + (0 if dtype == mx.float32 else h))
    z, z2, dh, dw, db, chunks = _ext.chunked_head_probe(x, w, dz, chunk_bytes=chunk)
    X, W, G = f64(x), f64(w), f64(dz)
    assert z2.size == 0
    assert chunks.item() == (1 if chunk_rows is None else -(-n // chunk_rows))
    check_gemm(z, X @ W.T, np.abs(X), np.abs(W).T, h)
    np.testing.assert_allclose(to_np(db), G.sum(0), rtol=1e-5, atol=1e-5 * n)
    if gemm_path == "bf16_gemm" and dtype == mx.bfloat16:
        # The backward GEMMs take hi = bf16(dZ); lo = dZ - hi is made good
        # exactly for each row's large entries (|dZ_ij| > 2^-8 sum_j |dZ_ij|)
        # and along the mean weight row m (dH) and the chunk's mean hidden
        # row mu (dW) for the rest (csrc/cpu/chunked_head.cpp). What is left:
        # at most 2^-8 |dZ_ij| |W_j - m| (|X_i - mu|) for the small entries;
        # the slack covers m in float32 and mu and the column sums in bf16.
        small = np.abs(G) <= np.abs(G).sum(1, keepdims=True) * 2.0**-8
        E = 2.0**-8 * np.abs(G) * small
        m = W.mean(0)
        rows = n if chunk_rows is None else chunk_rows
        mu = np.concatenate([np.broadcast_to(X[i:i + rows].mean(0), X[i:i + rows].shape)
                             for i in range(0, n, rows)])
        check_gemm(dh, G @ W, np.abs(G), np.abs(W), v, E @ (np.abs(W - m) + 2.0**-7 * np.abs(m)))
        check_gemm(dw, G.T @ X, np.abs(G).T, np.abs(X), n, E.T @ (np.abs(X - mu) + 2.0**-7 * np.abs(mu)))
        return
    check_gemm(dh, G @ W, np.abs(G), np.abs(W), v)
    check_gemm(dw, G.T @ X, np.abs(G).T, np.abs(X), n)


@pytest.mark.parametrize("bits,mode,group", [(4, "affine", 64), (3, "affine", 32), (8, "mxfp8", 32)])
def test_two_heads_teacher_quantized(rng, bits, mode, group):
    """Student dense float32 with gradients, teacher quantized with another H:
    Z2 = H2 dequant(W2)^T per chunk, and the student's gradients unaffected by
    the teacher (the same as with one head)."""
    n, h, h2, v = 37, 96, 128, 1000
    x, w = head(rng, n, h, v)
    x2, w2f = head(rng, n, h2, v, mx.float16)
    q = mx.quantize(w2f, group_size=group, bits=bits, mode=mode)
    wq, sc = q[0], q[1]
    qb = q[2] if mode == "affine" else None
    w2 = _ext.dequantize_head(wq, sc, qb, group_size=group, bits=bits, mode=mode)
    dz = mx.array(rng.standard_normal((n, v)).astype(np.float32))
    chunk = 5 * 4 * (v + v + h2)  # 5 rows of both heads (the teacher's hidden is copied)
    z, z2, dh, dw, db, chunks = _ext.chunked_head_probe(
        x, w, dz, hidden2=x2, weight2=wq, scales2=sc, biases2=qb, group_size2=group, bits2=bits,
        mode2=mode, chunk_bytes=chunk)
    assert chunks.item() == -(-n // 5)
    X2, W2 = f64(x2), f64(w2)
    check_gemm(z2, X2 @ W2.T, np.abs(X2), np.abs(W2).T, h2)
    one = _ext.chunked_head_probe(x, w, dz, chunk_bytes=5 * 4 * v)
    for got, want in zip((z, dh, dw, db), (one[0], one[2], one[3], one[4])):
        assert np.array_equal(to_np(got), to_np(want))


def test_two_heads_chunk_plan(rng):
    """The rows per chunk count both heads' bytes; a 16-bit hidden's copy too."""
    n, h, h2, v, v2 = 20, 16, 24, 50, 70
    x, w = head(rng, n, h, v)
    x2, w2 = head(rng, n, h2, v2, mx.bfloat16)
    per_row = 4 * v + 4 * v2 + 4 * h2
    for rows in (1, 2, 3, 7, 20):
        for extra in (0, per_row - 1):
            out = _ext.chunked_head_probe(x, w, hidden2=x2, weight2=w2, chunk_bytes=rows * per_row + extra)
            assert out[-1].item() == -(-n // rows), (rows, extra)
    z2 = out[1]
    check_gemm(z2, f64(x2) @ f64(w2).T, np.abs(f64(x2)), np.abs(f64(w2)).T, h2)


def test_empty_rows_zero_weight_gradient(rng):
    x, w = head(rng, 0, 8, 5)
    z, z2, dh, dw, db, chunks = _ext.chunked_head_probe(x, w, mx.zeros((0, 5)))
    assert chunks.item() == 0 and dh.shape == (0, 8)
    assert np.all(to_np(dw) == 0) and np.all(to_np(db) == 0)
