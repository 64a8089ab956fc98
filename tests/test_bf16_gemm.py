"""The bf16 GEMM of bfloat16 linear heads (csrc/cpu/bf16_gemm.cpp): oneDNN's
dnnl_gemm_bf16bf16f32, loaded at run time where the CPU has AVX512-BF16 or
AMX-BF16 units, never required. Checked: the run-time choice and its
fallbacks (in subprocesses, as the choice is made once per process), and the
fused linear cross-entropy on that path against float64 and against the
float32 sgemm path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from conftest import to_np

fl = pytest.importorskip("mlx_fused_losses")
from mlx_fused_losses import _ext  # noqa: E402

STATUS = _ext.bf16_gemm_status()
needs_bf16_gemm = pytest.mark.skipif(not STATUS["active"], reason=f"no bf16 GEMM here: {STATUS['reason']}")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def status_in_subprocess(**env):
    code = "import mlx_fused_losses, json; from mlx_fused_losses import _ext; print(json.dumps(_ext.bf16_gemm_status()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_status_names_the_cpu_units_and_why():
    flags = cpu_flags()
    expected = "amx_bf16" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else "")
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert STATUS["cpu_units"] == expected
    assert STATUS["active"] == bool(STATUS["library"])
    assert STATUS["active"] or STATUS["reason"]
    if not expected:
        assert not STATUS["active"]


def test_switched_off_by_environment():
    s = status_in_subprocess(FL_BF16_GEMM="0")
    assert not s["active"] and s["library"] == ""
    if STATUS["cpu_units"]:
        assert s["reason"] == "FL_BF16_GEMM=0"


@pytest.mark.skipif(not STATUS["cpu_units"], reason="the CPU has no bf16 units: the library is never looked for")
def test_missing_library_is_no_error(tmp_path):
    """A CPU with bf16 units but no libdnnl: the status says so and bfloat16
    heads run on the float32 path."""
    code = textwrap.dedent("""
        import mlx.core as mx, mlx_fused_losses as fl
        from mlx_fused_losses import _ext
        h = mx.ones((4, 8), dtype=mx.bfloat16); w = mx.ones((5, 8), dtype=mx.bfloat16)
        t = mx.array([0, 1, 2, 3])
        print(fl.linear_cross_entropy(h, w, t).item(), _ext.bf16_gemm_status()["active"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FL_ONEDNN_LIBRARY": str(tmp_path / "libdnnl.so.3")})
    loss, active = out.stdout.split()
    assert active == "False"
    assert float(loss) == pytest.approx(np.log(5.0), rel=1e-2)
    s = status_in_subprocess(FL_ONEDNN_LIBRARY=str(tmp_path / "libdnnl.so.3"))
    assert "no libdnnl" in s["reason"]


def lce_inputs(rng, n, h, v):
    x = mx.array(rng.standard_normal((n, h)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)).astype(mx.bfloat16)
    t = rng.integers(0, v, n).astype(np.int32)
    t[3::7] = -100
    return x, w, mx.array(t)


def float64_lce(x, w, t):
    X = to_np(x.astype(mx.float32)).astype(np.float64)
    W = to_np(w.astype(mx.float32)).astype(np.float64)
    t = to_np(t)
    keep = t != -100
    Z = X @ W.T
    m = Z.max(1, keepdims=True)
    P = np.exp(Z - m)
    s = P.sum(1, keepdims=True)
    P /= s
    rows = np.arange(len(t))
    nll = (np.log(s[:, 0]) + m[:, 0] - Z[rows, np.where(keep, t, 0)]) * keep
    G = P * keep[:, None]
    G[rows[keep], t[keep]] -= 1
    G /= keep.sum()
    return nll.sum() / keep.sum(), G @ W, G.T @ X


def run_lce(x, w, t, bf16_gemm, **kwargs):
    _ext._set_bf16_gemm_enabled(bf16_gemm)
    try:
        f = lambda a, b: fl.linear_cross_entropy(a, b, t, ignore_index=-100, **kwargs)  # noqa: E731
        loss, (dh, dw) = mx.value_and_grad(f, argnums=(0, 1))(x, w)
        mx.eval(loss, dh, dw)
    finally:
        _ext._set_bf16_gemm_enabled(True)
    return [to_np(a.astype(mx.float32)).astype(np.float64) for a in (loss, dh, dw)]


@needs_bf16_gemm
@pytest.mark.parametrize("n,h,v", [(1, 16, 3), (37, 96, 1000), (200, 64, 4097)])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_linear_cross_entropy_on_the_bf16_gemm(rng, n, h, v, chunk_rows):
    """Loss and gradients on the bf16 GEMM vs float64: the loss within the
    float32 path's error (the logits are exact products accumulated in
    float32), the gradients within a few bfloat16 roundings of their size (the
    outputs are bfloat16), and no worse than twice the float32 path's largest
    error."""
    x, w, t = lce_inputs(rng, n, h, v)
    kwargs = {} if chunk_rows is None else dict(chunk_bytes=chunk_rows * 4 * v)
    fast, slow = run_lce(x, w, t, True, **kwargs), run_lce(x, w, t, False, **kwargs)
    want = float64_lce(x, w, t)
    ulp = 2.0**-8  # bfloat16 outputs: one rounding is up to 2^-9 relative
    for name, got, ref, want_i in zip(("loss", "dH", "dW"), fast, slow, want):
        scale = np.abs(want_i).max() + 1e-30
        err = np.abs(got - want_i).max() / scale
        assert err <= 2 * ulp, f"{name}: {err} of its largest value"
        assert err <= 2 * np.abs(ref - want_i).max() / scale + ulp / 4, name


@needs_bf16_gemm
def test_gradient_with_cancellation():
    """dH = sum_j dZ_j W_j where the weight rows share a large common part: the
    sum cancels to far below sum_j |dZ_j W_j|. dZ rounded to bfloat16 once (8
    bits) leaves an error of ~2^-10 of that sum (found by test_log_probs'
    bf16 case); as hi + lo (16 bits) the error stays far below 2^-15 of it,
    float32-class, and dH matches float64 to its bfloat16 rounding."""
    rng = np.random.default_rng(5)
    n, h, v = 16, 64, 1000
    common = rng.standard_normal(h)
    w64 = common + 1e-3 * rng.standard_normal((v, h))
    x = mx.array(rng.standard_normal((n, h)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(w64.astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.integers(0, v, n).astype(np.int32))
    X = to_np(x.astype(mx.float32)).astype(np.float64)
    W = to_np(w.astype(mx.float32)).astype(np.float64)
    Z = X @ W.T
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    G = P.copy()
    G[np.arange(n), to_np(t)] -= 1
    G /= n
    want = G @ W
    scale = np.abs(G) @ np.abs(W)
    assert np.median(scale / np.abs(want)) > 100  # the cancellation is real
    dh = mx.grad(lambda a: fl.linear_cross_entropy(a, w, t))(x)
    err = np.abs(to_np(dh.astype(mx.float32)) - want)
    bound = 2.0**-8 * np.abs(want) + 2.0**-15 * scale
    assert np.all(err <= bound), f"worst err / bound {np.max(err / bound):.1f}"


@needs_bf16_gemm
@pytest.mark.parametrize("chunk_rows", [None, 200])
def test_weight_gradient_with_cancellation(chunk_rows):
    """dW_j = sum_i dZ_ij X_i where the hidden rows share a large common part
    and each class is the target of as many rows as its probability mass
    (near-uniform probabilities): sum_i dZ_ij is far below sum_i |dZ_ij|, so
    the common part cancels. hi = bf16(dZ) alone leaves ~2^-9 of
    sum_i |dZ_ij X_i|; the column sums of lo times the chunk's mean row (one
    more K row of the dW GEMM) take it out: float32-class, as dH above."""
    rng = np.random.default_rng(6)
    n, h, v = 1024, 64, 512
    common = 4.0 * rng.standard_normal(h)
    x64 = common + 1e-3 * rng.standard_normal((n, h))
    x = mx.array(x64.astype(np.float32)).astype(mx.bfloat16)
    w64 = 1e-2 * rng.standard_normal((v, h))
    w64 -= np.outer(w64 @ common, common) / (common @ common)  # logits ~ 0: p ~ 1/v
    w = mx.array(w64.astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(np.repeat(np.arange(v), n // v).astype(np.int32))
    X = to_np(x.astype(mx.float32)).astype(np.float64)
    W = to_np(w.astype(mx.float32)).astype(np.float64)
    Z = X @ W.T
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    G = P.copy()
    G[np.arange(n), to_np(t)] -= 1
    G /= n
    want = G.T @ X
    scale = np.abs(G).T @ np.abs(X)
    assert np.median(scale / np.abs(want)) > 100  # the cancellation is real
    kwargs = {} if chunk_rows is None else dict(chunk_bytes=chunk_rows * 4 * (v + h))
    dw = mx.grad(lambda b: fl.linear_cross_entropy(x, b, t, **kwargs))(w)
    err = np.abs(to_np(dw.astype(mx.float32)) - want)
    bound = 2.0**-8 * np.abs(want) + 2.0**-15 * scale
    assert np.all(err <= bound), f"worst err / bound {np.max(err / bound):.1f}"


@needs_bf16_gemm
def test_same_bits_whatever_the_thread_count(tmp_path):
    """The bf16 GEMMs run as fixed tiles, one single-threaded oneDNN call each:
    the results do not depend on FL_NUM_THREADS."""
    code = textwrap.dedent("""
        import hashlib, numpy as np, mlx.core as mx, mlx_fused_losses as fl
        rng = np.random.default_rng(3)
        x = mx.array(rng.standard_normal((70, 96)).astype(np.float32)).astype(mx.bfloat16)
        w = mx.array(rng.standard_normal((3000, 96)).astype(np.float32) * 0.1).astype(mx.bfloat16)
        t = mx.array(rng.integers(0, 3000, 70).astype(np.int32))
        f = lambda a, b: fl.linear_cross_entropy(a, b, t, chunk_bytes=16 * 4 * 3000)
        loss, (dh, dw) = mx.value_and_grad(f, argnums=(0, 1))(x, w)
        outs = [o.view(mx.uint16) for o in (loss, dh, dw)]
        mx.eval(outs)
        print(hashlib.sha256(b"".join(np.array(o).tobytes() for o in outs)).hexdigest())
    """)
    digests = set()
    for threads in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "FL_NUM_THREADS": threads})
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1
