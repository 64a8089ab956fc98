"""Quantized heads on the CPU: every format mx.quantize produces in mlx 0.32.4
(affine with 1, 2, 3, 4, 5, 6 and 8 bits at group sizes 32, 64 and 128;
mxfp4, mxfp8, nvfp4 with and without its global_scale).

- The unpacking (csrc/cpu/quantized_head.cpp, through the test hook
  _ext.dequantize_head) equals mx.dequantize bit for bit: on mx.quantize's
  output for each format, scale dtype and group size, and on crafted words
  holding every element code and every scale code of the floating-point modes.
- The linear cross-entropy with each format equals the dense linear
  cross-entropy on the dequantised weight (loss, statistics, dH; a quantized
  head gets no dW) and the float64 reference.
- Bad formats are refused naming the argument.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, assert_raises_naming, dtype_id, to_np
from test_linear_cross_entropy import check_against_reference, logit_scale, make_inputs

fl = pytest.importorskip("mlx_fused_losses")
from mlx_fused_losses import _ext  # noqa: E402

AFFINE_BITS = [1, 2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
# mode -> (group_size, bits): the only ones mx.quantize accepts for it.
FP_MODES = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
SCALE_DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def spread_weight(rng, v, h, dtype=mx.float32):
    """Rows over five magnitudes (1e-2 .. 1e2), one constant group (scale 0)."""
    w = rng.standard_normal((v, h)) * (10.0 ** (np.arange(v) % 5 - 2))[:, None]
    w[0, :32] = 0.25
    return mx.array(w.astype(np.float32)).astype(dtype)


def assert_same_bits(ours, ref, what):
    ours, ref = np.array(ours), np.array(ref)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape, what
    # NaN (E4M3's 0x7F/0xFF codes) only needs to be NaN: its payload is no value.
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    bad = np.argwhere(~same)
    assert bad.size == 0, (f"{what}: {len(bad)} values differ from mx.dequantize, first at "
                           f"{tuple(bad[0])}: {ours[tuple(bad[0])]!r} vs {ref[tuple(bad[0])]!r}")


# ---------------------------------------------------------------------------
# the unpacking, bit for bit

@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_affine_unpacking_equals_mx_dequantize(rng, bits, group_size, dtype):
    # H = 3 * 128: several groups per row at every group size, and (3, 5, 6
    # bits) values straddling words in every group.
    w_q, scales, biases = mx.quantize(spread_weight(rng, 9, 384, dtype), group_size, bits)
    assert scales.dtype == dtype
    ours = _ext.dequantize_head(w_q, scales, biases, group_size, bits)
    # Our dequantisation is float32 (16-bit scales and biases converted
    # exactly): mx.dequantize of the same scales in float32.
    ref = mx.dequantize(w_q, scales.astype(mx.float32), biases.astype(mx.float32), group_size,
                        bits)
    assert_same_bits(ours, ref, f"affine bits={bits} group_size={group_size}")


@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_unpacking_equals_mx_dequantize(rng, mode, dtype):
    group_size, bits = FP_MODES[mode]
    w_q, scales = mx.quantize(spread_weight(rng, 11, 256, dtype), mode=mode)
    assert scales.dtype == mx.uint8
    ours = _ext.dequantize_head(w_q, scales, None, group_size, bits, mode)
    assert_same_bits(ours, mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32), mode)


@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_unpacking_of_every_code(mode):
    """Every byte value as packed element codes (both nibbles of fp4) and as
    a scale code (E8M0 0 and 255, E4M3 subnormals and NaN included), each
    element code under many scale codes."""
    group_size, bits = FP_MODES[mode]
    v, h = 256, 8 * group_size
    codes = (np.arange(v * h * bits // 8) * 7 % 256).astype(np.uint8)  # 7: coprime to 256
    w_q = mx.array(codes.view(np.uint32).reshape(v, -1))
    scales = mx.array((np.arange(v * (h // group_size)) % 256).astype(np.uint8)
                      .reshape(v, h // group_size))
    ours = _ext.dequantize_head(w_q, scales, None, group_size, bits, mode)
    assert_same_bits(ours, mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32), mode)
    # the edges ran: E8M0 255 is inf (mx modes), E4M3 0x7F/0xFF NaN (nvfp4 scales)
    assert not np.isfinite(np.array(ours)).all()


@pytest.mark.parametrize("dtype", SCALE_DTYPES, ids=dtype_id)
def test_nvfp4_global_scale_unpacking_equals_mx_dequantize(rng, dtype):
    """nvfp4 with mx.quantize's global_scale: every group scale times
    global / (448 * 6), rounded where mx.dequantize rounds (not exact)."""
    w = spread_weight(rng, 11, 256, dtype)
    for g in (mx.abs(w).max().astype(mx.float32), mx.array(0.37, mx.float32)):
        w_q, scales = mx.quantize(w, mode="nvfp4", global_scale=g)
        ours = _ext.dequantize_head(w_q, scales, None, 16, 4, "nvfp4", global_scale=g)
        ref = mx.dequantize(w_q, scales, mode="nvfp4", global_scale=g, dtype=mx.float32)
        assert_same_bits(ours, ref, f"nvfp4 global_scale={g.item()}")
        # the global scale is read: without it the values differ
        assert not np.array_equal(np.array(ours), np.array(
            _ext.dequantize_head(w_q, scales, None, 16, 4, "nvfp4")))
    # every element and scale code under an awkward global scale
    v, h = 256, 128
    codes = (np.arange(v * h // 2) * 7 % 256).astype(np.uint8)
    w_q = mx.array(codes.view(np.uint32).reshape(v, -1))
    scales = mx.array((np.arange(v * h // 16) % 256).astype(np.uint8).reshape(v, -1))
    g = mx.array(3.3e-3, mx.float32)
    assert_same_bits(_ext.dequantize_head(w_q, scales, None, 16, 4, "nvfp4", global_scale=g),
                     mx.dequantize(w_q, scales, mode="nvfp4", global_scale=g, dtype=mx.float32),
                     "nvfp4 every code, global scale")


def test_affine_unpacking_of_every_code(rng):
    """Random words (every value of every width) with random scales/biases."""
    for bits in AFFINE_BITS:
        v, h, gs = 5, 256, 32
        w_q = mx.array(rng.integers(0, 2**32, (v, h * bits // 32), dtype=np.uint64)
                       .astype(np.uint32))
        scales = mx.array(rng.standard_normal((v, h // gs)).astype(np.float32))
        biases = mx.array(rng.standard_normal((v, h // gs)).astype(np.float32))
        ours = _ext.dequantize_head(w_q, scales, biases, gs, bits)
        assert_same_bits(ours, mx.dequantize(w_q, scales, biases, gs, bits), f"bits={bits}")


# ---------------------------------------------------------------------------
# the linear cross-entropy on every format

def quantize(weight, fmt):
    """(packed weight, keyword arguments of linear_cross_entropy, the
    dequantised weight its kernels multiply by)."""
    mode, group_size, bits = fmt
    if mode == "affine":
        w_q, scales, biases = mx.quantize(weight, group_size, bits)
        w = mx.dequantize(w_q, scales.astype(mx.float32), biases.astype(mx.float32), group_size,
                          bits)
        return w_q, dict(scales=scales, biases=biases, group_size=group_size, bits=bits), w
    w_q, scales = mx.quantize(weight, mode=mode)
    w = mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32)
    return w_q, dict(scales=scales, mode=mode), w


FORMATS = ([("affine", gs, b) for b in AFFINE_BITS for gs in GROUP_SIZES]
           + [(m, *FP_MODES[m]) for m in FP_MODES])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
def test_linear_ce_every_format(rng, fmt):
    """Loss (mean and per row with a non-uniform cotangent), dH and dbias vs
    float64 on the dequantised weight; several chunks of rows and vocabulary
    tiles (chunk_bytes); the statistics and dH equal the dense kernel's on
    the dequantised weight."""
    n, h, v = 13, 128, 97
    args = make_inputs(rng, n, h, v, bias=True)
    w_q, qopts, w = quantize(args["weight"], fmt)
    dense = dict(args, weight=w)
    q = dict(args, weight=w_q)
    for reduction in ("mean", "none"):
        cot = mx.array(rng.uniform(-1, 1, n).astype(np.float32)) if reduction == "none" else None
        check_against_reference(dense, mx.float32, cotangent=cot, fused_args=q,
                                argnames=("hidden", "bias"), reduction=reduction,
                                chunk_bytes=3 * 4 * v + 7, **qopts)
    # The same kernels on the dense float32 dequantised weight: the statistics
    # agree to float32 rounding (another GEMM blocking), dH too.
    loss_q, st_q = fl.linear_cross_entropy(args["hidden"], w_q, args["targets"], args["bias"],
                                           reduction="none", return_stats=True, **qopts)
    loss_d, st_d = fl.linear_cross_entropy(args["hidden"], w, args["targets"], args["bias"],
                                           reduction="none", return_stats=True)
    scale = logit_scale(dense)
    assert_close(loss_q, to_np(loss_d), mx.float32, scale=scale, what="loss vs dense")
    assert_close(st_q["lse"], to_np(st_d["lse"]), mx.float32, scale=scale, what="lse vs dense")
    assert_close(st_q["entropy"], to_np(st_d["entropy"]), mx.float32, scale=scale,
                 what="entropy vs dense")
    assert np.array_equal(np.array(st_q["correct"]), np.array(st_d["correct"]))
    g_q = mx.grad(lambda x: fl.linear_cross_entropy(x, w_q, args["targets"], args["bias"],
                                                    **qopts))(args["hidden"])
    g_d = mx.grad(lambda x: fl.linear_cross_entropy(x, w, args["targets"], args["bias"]))(
        args["hidden"])
    np.testing.assert_allclose(np.array(g_q), np.array(g_d), rtol=0,
                               atol=1e-5 * np.abs(np.array(g_d)).max())


def test_linear_ce_nvfp4_global_scale(rng):
    n, h, v = 13, 128, 97
    args = make_inputs(rng, n, h, v, bias=True)
    g = mx.abs(args["weight"]).max()
    w_q, scales = mx.quantize(args["weight"], mode="nvfp4", global_scale=g)
    w = mx.dequantize(w_q, scales, mode="nvfp4", global_scale=g, dtype=mx.float32)
    qopts = dict(scales=scales, mode="nvfp4", global_scale=g)
    for reduction in ("mean", "none"):
        cot = mx.array(rng.uniform(-1, 1, n).astype(np.float32)) if reduction == "none" else None
        check_against_reference(dict(args, weight=w), mx.float32, cotangent=cot,
                                fused_args=dict(args, weight=w_q), argnames=("hidden", "bias"),
                                reduction=reduction, chunk_bytes=3 * 4 * v + 7, **qopts)


@pytest.mark.parametrize("mode", list(FP_MODES))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=dtype_id)
def test_linear_ce_fp_modes_16bit_hidden(rng, mode, dtype):
    args = make_inputs(rng, 10, 64, 70, dtype=dtype)
    w_q, qopts, w = quantize(args["weight"], (mode, *FP_MODES[mode]))
    assert mx.array_equal(w.astype(dtype).astype(mx.float32), w)  # exact in 16 bits
    check_against_reference(dict(args, weight=w.astype(dtype)), dtype,
                            fused_args=dict(args, weight=w_q), argnames=("hidden",),
                            reduction="sum", **qopts)


def test_quantized_fp_weight_gradient_raises(rng):
    args = make_inputs(rng, 4, 64, 20)
    w_q, scales = mx.quantize(args["weight"], mode="mxfp4")
    with pytest.raises(ValueError, match="quantized"):
        mx.eval(mx.grad(lambda w: fl.linear_cross_entropy(args["hidden"], w, args["targets"],
                                                          scales=scales, mode="mxfp4"))(w_q))


def test_modes_under_compile_with_two_formats(rng):
    """One compiled function, two quantized heads of different formats: each
    call gets its own primitive (the mode and bits are part of is_equivalent),
    and a second call at another size (shapeless) stays right."""
    args = make_inputs(rng, 6, 64, 40)
    a_q, a_opts, a_w = quantize(args["weight"], ("affine", 32, 3))
    m_q, m_opts, m_w = quantize(args["weight"], ("mxfp4", 32, 4))

    def f(h, t):
        return (fl.linear_cross_entropy(h, a_q, t, **a_opts)
                + 10 * fl.linear_cross_entropy(h, m_q, t, **m_opts))

    def dense(h, t):
        return (fl.linear_cross_entropy(h, a_w, t) + 10 * fl.linear_cross_entropy(h, m_w, t))

    cf = mx.compile(f, shapeless=True)
    for rows in (6, 3):
        h, t = args["hidden"][:rows], args["targets"][:rows]
        np.testing.assert_allclose(cf(h, t).item(), dense(h, t).item(), rtol=1e-6)


# ---------------------------------------------------------------------------
# bad formats

def test_bad_formats_are_refused_naming_the_argument(rng):
    lce = fl.linear_cross_entropy
    h = mx.zeros((3, 64))
    t = mx.zeros((3,), mx.int32)
    w = mx.array(rng.standard_normal((10, 64)).astype(np.float32))
    w_q, s, b = mx.quantize(w, 32, 3)
    f_q, f_s = mx.quantize(w, mode="mxfp4")
    assert_raises_naming(ValueError, "mode", lce, h, w_q, t, scales=s, biases=b, bits=3,
                         group_size=32, mode="fp4")
    assert_raises_naming(TypeError, "mode", lce, h, w_q, t, scales=s, biases=b, mode=4)
    assert_raises_naming(ValueError, "bits", lce, h, w_q, t, scales=s, biases=b, bits=7,
                         group_size=32)
    assert_raises_naming(ValueError, "group_size", lce, h, w_q, t, scales=s, biases=b, bits=3,
                         group_size=16)
    # floating-point modes: fixed bits and group size, no biases, uint8 scales
    assert_raises_naming(ValueError, "bits", lce, h, f_q, t, scales=f_s, mode="mxfp4", bits=8)
    assert_raises_naming(ValueError, "group_size", lce, h, f_q, t, scales=f_s, mode="mxfp4",
                         group_size=16)
    assert_raises_naming(ValueError, "biases", lce, h, f_q, t, scales=f_s, biases=f_s,
                         mode="mxfp4")
    assert_raises_naming(TypeError, "scales", lce, h, f_q, t, scales=f_s.astype(mx.float32),
                         mode="mxfp4")
    assert_raises_naming(ValueError, "biases", lce, h, w_q, t, scales=s, bits=3, group_size=32)
    assert_raises_naming(ValueError, "scales", lce, h, w, t, mode="nvfp4")
    # global_scale: nvfp4 only, one value
    n_q, n_s = mx.quantize(w, mode="nvfp4")
    assert_raises_naming(ValueError, "global_scale", lce, h, f_q, t, scales=f_s, mode="mxfp4",
                         global_scale=mx.array(1.0))
    assert_raises_naming(ValueError, "global_scale", lce, h, n_q, t, scales=n_s, mode="nvfp4",
                         global_scale=mx.ones((2,)))
    assert_raises_naming(TypeError, "global_scale", lce, h, n_q, t, scales=n_s, mode="nvfp4",
                         global_scale=mx.array(1, mx.int32))
    # an fp head read as affine: the scales are uint8 codes, not floats
    assert_raises_naming(TypeError, "scales", lce, h, f_q, t, scales=f_s, biases=f_s, bits=4,
                         group_size=32)
