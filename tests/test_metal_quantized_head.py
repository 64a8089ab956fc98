"""The quantized-head tile stagers (metal/quantized_head.h) on the Metal harness.

A test kernel (tests/metal_kernels/quantized_head_tile.metal) stages tiles of
mx.quantize's packed weight, dequantised, into threadgroup memory and copies
them out. Affine heads (bits 1, 2, 3, 4, 5, 6, 8; 3/5/6 straddle words) are
checked against the float64 dequantisation of the same packed data (the fma
is correctly rounded: within half a float32 ulp, then rounded to the tile
type) and against mx.dequantize (within one float32 ulp: it rounds scale * q
before adding the bias); the floating-point modes (mxfp4, mxfp8, nvfp4)
against mx.dequantize(..., dtype=mx.float32) exactly (their products are
exact), for group sizes 32/64/128 (16 for nvfp4), every scale and tile type,
row-major and transposed tiles, odd V and tiles that overhang V and H (zeros
there), under the harness's schedules. A subprocess repeats a sweep with the
inputs against inaccessible pages, so that any read out of bounds, even one
whose value is discarded, fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING, needs_libclang
from metal_host.kernel_names import kernel_names

pytestmark = pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)

mx = pytest.importorskip("mlx.core")

REPO = Path(__file__).resolve().parents[1]
METAL = ["tests/metal_kernels/quantized_head_tile.metal"]
ADAPTOR = "tests/metal_kernels/quantized_head_adaptor.cpp"
TILES = {"32x32": (32, 32), "8x16": (8, 16), "16x64": (16, 64)}
MX_DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# (scale dtype, tile dtype) pairs instantiated by the test kernel.
PAIRS = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
         ("float16", "float32"), ("bfloat16", "float32"), ("float32", "float16"),
         ("float32", "bfloat16")]
AFFINE_BITS = [1, 2, 3, 4, 5, 6, 8]
# mode -> (group_size, bits): the only ones mx.quantize accepts for it.
FP_MODES = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}


def head_of(bits, sdt, mode="affine", global_scale=None):
    """The head name of the launch plans (launch_plan.cpp: lce_quantized_head)."""
    if mode == "affine":
        return f"q{bits}_{sdt}"
    return mode + ("_global" if global_scale is not None else "")


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bits(d: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (d.astype(np.uint32) << 16).view(np.float32)
    return d.astype(np.float32)


def round_to(a32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (to nearest even) to dtype, back as float32."""
    if dtype == "float32":
        return a32
    if dtype == "float16":
        return a32.astype(np.float16).astype(np.float32)
    return from_bits(to_bf16_bits(a32), "bfloat16")


def spacing_in(a: np.ndarray, dtype: str) -> np.ndarray:
    """The ulp of dtype at |a| (float64 result)."""
    a32 = np.abs(a).astype(np.float32)
    if dtype == "float16":
        return np.spacing(a32.astype(np.float16)).astype(np.float64)
    ulp = np.spacing(a32).astype(np.float64)
    return ulp * 65536.0 if dtype == "bfloat16" else ulp


def device_array(a, dtype: str) -> np.ndarray:
    """An mx array of dtype as the NumPy array the harness passes (bf16 as bits)."""
    if dtype == "bfloat16":
        return np.array(a.view(mx.uint16))
    return np.array(a)


def quantized_weight(V, H, group_size, bits, dtype, seed, mode="affine", global_scale=None):
    """mx.quantize of a weight whose rows span several magnitudes: (w_q,
    scales, biases), biases None for the floating-point modes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((V, H)) * (10.0 ** (np.arange(V) % 5 - 2))[:, None]
    w[0, : min(H, group_size)] = 0.25  # a constant group: scale 0
    w = mx.array(w.astype(np.float32)).astype(MX_DT[dtype])
    if mode != "affine":
        return (*mx.quantize(w, mode=mode, global_scale=global_scale), None)
    return mx.quantize(w, group_size=group_size, bits=bits)


def unpack(w_q: np.ndarray, bits: int) -> np.ndarray:
    """The values of each row's little-endian bit stream (a value may straddle
    two words)."""
    stream = (w_q[:, :, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    fields = stream.reshape(w_q.shape[0], -1, bits).astype(np.uint32)
    return (fields << np.arange(bits, dtype=np.uint32)).sum(-1)


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


def run_tiles(lib, V, H, group_size, bits, sdt, tdt, tile, transposed, threads, seed,
              fence=0, schedules=mh.DEFAULT_SCHEDULES, mode="affine", global_scale=None):
    """(staged weight as float32 [V, H], the padded output, the quantized arrays).
    sdt: the dtype of the weight mx.quantize gets (the scales' for affine)."""
    w_q, scales, biases = quantized_weight(V, H, group_size, bits, sdt, seed, mode, global_scale)
    R, C = TILES[tile]
    rows, cols = -(-V // R) * R, -(-H // C) * C
    sentinel = np.float32(-7777.0)
    if tdt == "float32":
        out = np.full((rows, cols), sentinel, np.float32)
    elif tdt == "float16":
        out = np.full((rows, cols), sentinel, np.float16)
    else:
        out = np.full((rows, cols), to_bf16_bits(np.array([sentinel]))[0], np.uint16)
    name = f"qh_tile_{head_of(bits, sdt, mode, global_scale)}_{tdt}_{tile}".encode() + b"\0"
    if mode == "affine":
        s_dev, b_dev = device_array(scales, sdt), device_array(biases, sdt)
        scale_bytes = 4 if sdt == "float32" else 2
    else:  # uint8 codes, no biases (the kernel gets the scales twice, as eval_gpu binds them,
        # or the scales and the global scale)
        s_dev = b_dev = np.array(scales)
        if global_scale is not None:
            b_dev = np.array(global_scale.astype(mx.float32)).reshape(1)
        scale_bytes = 1
    lib.run("qh_tile_run", np.frombuffer(name, np.uint8).copy(), np.array(w_q), s_dev, b_dev,
            out, np.int32(V), np.int32(H), np.int32(group_size), np.int32(transposed),
            np.int32(threads), np.int32(scale_bytes), np.int32(fence), schedules=schedules)
    return from_bits(out, tdt), (w_q, scales, biases)


def check_fp_tiles(staged, quantized, V, H, mode, tdt, global_scale=None):
    """Floating-point modes: float32 products as mx.dequantize(dtype=float32)
    forms them (exact; with nvfp4's global scale, rounded where it rounds),
    rounded to the tile type; zeros past V and H."""
    w_q, scales, _ = quantized
    assert np.all(staged[V:, :] == 0) and np.all(staged[:, H:] == 0), "tile overhang not zero"
    exact = np.array(mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32,
                                   global_scale=global_scale))
    expected = round_to(exact, tdt)
    inside = staged[:V, :H]
    mismatch = np.argwhere(inside != expected)
    assert mismatch.size == 0, (
        f"{len(mismatch)} elements differ from mx.dequantize, first at {tuple(mismatch[0])}: "
        f"{inside[tuple(mismatch[0])]!r} vs {expected[tuple(mismatch[0])]!r}")


def check_tiles(staged, quantized, V, H, group_size, bits, sdt, tdt):
    w_q, scales, biases = quantized
    q = unpack(np.array(w_q), bits).astype(np.float64)
    s = np.array(scales.astype(mx.float32)).astype(np.float64).repeat(group_size, 1)
    b = np.array(biases.astype(mx.float32)).astype(np.float64).repeat(group_size, 1)
    exact = s * q + b  # s * q is exact in float64 (24 + 8 bits); one rounding in the sum
    inside = staged[:V, :H]
    # Past V and H: zeros, not poison, not the sentinel.
    assert np.all(staged[V:, :] == 0) and np.all(staged[:, H:] == 0), "tile overhang not zero"
    # fma(scale, q, bias) rounded once to float32, then to the tile's type.
    expected = round_to(exact.astype(np.float32), tdt)
    mismatch = np.argwhere(inside != expected)
    assert mismatch.size == 0, (
        f"{len(mismatch)} elements differ from the float64 dequantisation, first at "
        f"{tuple(mismatch[0])}: {inside[tuple(mismatch[0])]!r} vs {expected[tuple(mismatch[0])]!r}")
    # mx.dequantize computes in the scales' dtype and rounds scale * q before
    # adding the bias: it is within half an ulp of that product plus half an
    # ulp of the result of the exact value (where the sum cancels, the
    # product's ulp dominates); ours within half a float32 ulp, then the tile's.
    mlx_dq = np.array(mx.dequantize(w_q, scales, biases, group_size=group_size, bits=bits)
                      .astype(mx.float32)).astype(np.float64)
    bound = (0.5 * spacing_in(np.abs(s * q), sdt) + 0.5 * spacing_in(np.abs(mlx_dq), sdt)
             + 0.5 * spacing_in(np.abs(exact), "float32") + 0.5 * spacing_in(np.abs(exact), tdt))
    assert np.all(np.abs(inside - mlx_dq) <= bound)


@needs_libclang
def test_static_address_spaces():
    from metal_host import static_check

    r = static_check.check(METAL[0])
    assert r.ok, r.diagnostics


def test_kernel_table_is_the_sources_names(lib):
    # The harness's table (generated from the source) holds the tile kernels the
    # tests below run, every pair (scale dtype, tile dtype) x bits x tile shape.
    buf = np.zeros(1 << 16, np.uint8)
    lib.run("mh_kernel_names", buf, np.uint32(buf.size), schedules=(mh.Schedule(),))
    names = set(bytes(buf).split(b"\0")[0].decode().split())
    assert names == kernel_names(METAL)
    text = (REPO / METAL[0]).read_text()
    fp_tiles = re.findall(r"^QH_INST_FP\((\w+), \w+\)$", text, re.MULTILINE)
    assert sorted(fp_tiles) == sorted(MX_DT)
    expected = {f"qh_tile_q{bits}_{s}_{t}_{tile}" for s, t in PAIRS for bits in AFFINE_BITS
                for tile in TILES}
    expected |= {f"qh_tile_{m}_{t}_{tile}" for m in [*FP_MODES, "nvfp4_global"]
                 for t in fp_tiles for tile in TILES}
    assert names == expected


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_every_bits_and_group_size(lib, bits, group_size):
    # V = 37: two row tiles, the second mostly past V; H = 3 groups: the last
    # column tile past H.
    V, H = 37, 3 * group_size
    staged, qz = run_tiles(lib, V, H, group_size, bits, "float32", "float32", "32x32",
                           transposed=0, threads=96, seed=bits * 1000 + group_size)
    check_tiles(staged, qz, V, H, group_size, bits, "float32", "float32")


@pytest.mark.parametrize("sdt,tdt", PAIRS)
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_every_scale_and_tile_dtype(lib, bits, sdt, tdt):
    k = PAIRS.index((sdt, tdt)) + bits
    tile = list(TILES)[k % 3]
    V, H, group_size = 19, 128, 64
    staged, qz = run_tiles(lib, V, H, group_size, bits, sdt, tdt, tile, transposed=k % 2,
                           threads=(32, 64, 256)[k % 3], seed=k)
    check_tiles(staged, qz, V, H, group_size, bits, sdt, tdt)


@pytest.mark.parametrize("tdt", list(MX_DT))
@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_modes_every_tile(lib, mode, tdt):
    """Each floating-point head, tile type and tile shape, row-major and
    transposed; weights of each dtype mx.quantize takes."""
    group_size, bits = FP_MODES[mode]
    for k, tile in enumerate(TILES):
        V, H = 37, 3 * 32
        wdt = list(MX_DT)[(k + list(MX_DT).index(tdt)) % 3]
        staged, qz = run_tiles(lib, V, H, group_size, bits, wdt, tdt, tile, transposed=k % 2,
                               threads=(32, 96, 256)[k], seed=k, mode=mode)
        check_fp_tiles(staged, qz, V, H, mode, tdt)


@pytest.mark.parametrize("tdt", list(MX_DT))
def test_nvfp4_global_scale_every_tile(lib, tdt):
    """nvfp4 with mx.quantize's global scale (bound in the biases slot)."""
    for k, tile in enumerate(TILES):
        V, H = 37, 3 * 32
        g = mx.array([0.37, 11.0, 2.5e-3][k], mx.float32)
        staged, qz = run_tiles(lib, V, H, 16, 4, list(MX_DT)[k], tdt, tile, transposed=k % 2,
                               threads=(32, 96, 256)[k], seed=k, mode="nvfp4", global_scale=g)
        check_fp_tiles(staged, qz, V, H, "nvfp4", tdt, global_scale=g)


def test_fp_modes_every_code(lib):
    """Every element code under many scale codes (E8M0 and E4M3; products
    that stay normal float32, as an Apple GPU flushes subnormals)."""
    for mode, (group_size, bits) in FP_MODES.items():
        V, H = 64, 4 * group_size
        codes = (np.arange(V * H * bits // 8) * 7 % 256).astype(np.uint8)
        w_q = mx.array(codes.view(np.uint32).reshape(V, -1))
        lo, hi = (112, 140) if mode != "nvfp4" else (40, 120)  # E8M0 2^-15..2^13 / E4M3 normals
        s = lo + np.arange(V * (H // group_size)) % (hi - lo)
        scales = mx.array(s.astype(np.uint8).reshape(V, H // group_size))
        R, C = TILES["32x32"]
        out = np.full((-(-V // R) * R, -(-H // C) * C), -7777.0, np.float32)
        name = f"qh_tile_{mode}_float32_32x32".encode() + b"\0"
        lib.run("qh_tile_run", np.frombuffer(name, np.uint8).copy(), np.array(w_q),
                np.array(scales), np.array(scales), out, np.int32(V), np.int32(H),
                np.int32(group_size), np.int32(0), np.int32(64), np.int32(1), np.int32(0),
                schedules=(mh.Schedule(),))
        expected = np.array(mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32))
        same = (out[:V, :H] == expected) | (np.isnan(out[:V, :H]) & np.isnan(expected))
        assert same.all(), (mode, np.argwhere(~same)[:3])


@pytest.mark.parametrize("transposed", [0, 1])
@pytest.mark.parametrize("tile", list(TILES))
def test_tile_shapes_and_layouts(lib, tile, transposed):
    for V, H in [(1, 32), (33, 96), (8, 64)]:
        staged, qz = run_tiles(lib, V, H, 32, 4, "float16", "float16", tile, transposed,
                               threads=64, seed=V + H)
        check_tiles(staged, qz, V, H, 32, 4, "float16", "float16")


def test_a_missing_barrier_would_be_seen(lib):
    """The copy-out reads other threads' staged elements (reverse order): with
    one thread per group, nothing is shared, and the result must not depend on
    the thread count either."""
    a, _ = run_tiles(lib, 21, 64, 32, 8, "float32", "float32", "16x64", 0, threads=1, seed=5)
    b, _ = run_tiles(lib, 21, 64, 32, 8, "float32", "float32", "16x64", 0, threads=160, seed=5)
    np.testing.assert_array_equal(a, b)


FENCED_SWEEP = r"""
import sys
sys.path.insert(0, {tests!r})
import metal_host as mh
import test_metal_quantized_head as t
lib = mh.build(t.METAL, t.ADAPTOR, include_dirs=("csrc",))
one = (mh.Schedule(),)
for fence in (1, 2):
    for bits in t.AFFINE_BITS:
        for gs in (32, 64, 128):
            for sdt, tdt in (("float32", "float32"), ("bfloat16", "bfloat16")):
                V, H = 13, 2 * gs
                staged, qz = t.run_tiles(lib, V, H, gs, bits, sdt, tdt, "32x32", fence - 1, 64,
                                         seed=gs + bits, fence=fence, schedules=one)
                t.check_tiles(staged, qz, V, H, gs, bits, sdt, tdt)
    for mode, (gs, bits) in t.FP_MODES.items():
        V, H = 13, 4 * gs
        staged, qz = t.run_tiles(lib, V, H, gs, bits, "bfloat16", "float32", "8x16", fence - 1,
                                 64, seed=gs, fence=fence, schedules=one, mode=mode)
        t.check_fp_tiles(staged, qz, V, H, mode, "float32")
    g = t.mx.array(0.37, t.mx.float32)
    staged, qz = t.run_tiles(lib, 13, 64, 16, 4, "float32", "float32", "8x16", fence - 1, 64,
                             seed=3, fence=fence, schedules=one, mode="nvfp4", global_scale=g)
    t.check_fp_tiles(staged, qz, 13, 64, "nvfp4", "float32", global_scale=g)
print("fenced sweep ok")
"""


def test_no_read_out_of_bounds_against_inaccessible_pages(lib):
    # A read past the end of w_q, scales or biases (or before their start)
    # faults; run in a subprocess so that such a bug fails this test only.
    code = FENCED_SWEEP.format(tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "fenced sweep ok" in proc.stdout, (
        f"rc {proc.returncode} (-11: a read hit an inaccessible page)\n{proc.stderr[-3000:]}")


# ---- the linear cross-entropy kernels with a quantized head -------------------------------
# Every quantized instantiation of metal/linear_cross_entropy.metal (forward tiles
# and dZ for each hidden dtype, dH; heads q<bits>_<scale dtype>) through eval_gpu's
# dispatch sequence (tests/metal_kernels/lce_adaptor.cpp, lce_*_run_q), checked by
# test_metal_linear_cross_entropy.check_case against the CPU primitive with the
# same packed weight and the float64 reference on the weight the kernel multiplies
# by (the fma dequantisation, exact in float64). Gradients: hidden (and bias).

import test_metal_linear_cross_entropy as lce  # noqa: E402

DT_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


@pytest.fixture(scope="module")
def lce_lib():
    return mh.build(lce.METAL, lce.ADAPTOR, include_dirs=("csrc",))


def dequantize64(w_q, scales, biases, group_size, bits) -> np.ndarray:
    """scale * q + bias in float64 (exact products, one rounding in the sum)."""
    q = unpack(np.array(w_q), bits).astype(np.float64)
    s = np.array(scales.astype(mx.float32)).astype(np.float64).repeat(group_size, 1)
    b = np.array(biases.astype(mx.float32)).astype(np.float64).repeat(group_size, 1)
    return s * q + b


def quantized_maker(bits, group_size, mode="affine", global_scale=None):
    """A make_case for check_case: the dense case's weight quantized with
    mx.quantize in check_case's `wdt` (the scale dtype of an affine head; the
    floating-point modes' scales are uint8 whatever it is)."""

    def make(rng, n, h, v, hdt, sdt, case):
        d = lce.make_case(rng, n, h, v, hdt, "float32", case)
        w = mx.array(d["wr"]).astype(MX_DT[sdt])
        if mode == "affine":
            w_q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
            # The weight the kernels multiply by: fma(scale, q, bias) rounded to float32.
            d["wr"] = dequantize64(w_q, scales, biases, group_size, bits).astype(np.float32)
            s_dev, b_dev = device_array(scales, sdt), device_array(biases, sdt)
        else:
            w_q, scales = mx.quantize(w, mode=mode, global_scale=global_scale)
            biases = None
            # Exact products (none subnormal at these magnitudes); with a global
            # scale, rounded as the kernels round them.
            d["wr"] = np.array(mx.dequantize(w_q, scales, mode=mode, dtype=mx.float32,
                                             global_scale=global_scale))
            s_dev = b_dev = np.array(scales)
            if global_scale is not None:  # bound in the biases slot
                b_dev = np.array(global_scale.astype(mx.float32)).reshape(1)
        d["wd"] = None
        d["q"] = dict(mode=mode, bits=bits, group_size=group_size, sdt=sdt, w_q=np.array(w_q),
                      scales=s_dev, biases=b_dev, mx=(w_q, scales, biases),
                      global_scale=global_scale)
        return d

    return make


QMODE = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}  # flm::kQuant*


def test_quantized_head_names(lce_lib):
    name = np.zeros(64, np.uint8)

    def head(mode, bits, sdt, global_scale=0):
        lce_lib.run("lce_quantized_head_name", np.int32(QMODE[mode]), np.int32(bits),
                    np.int32(DT_CODE[sdt]), np.int32(global_scale), name,
                    schedules=(mh.Schedule(),))
        return bytes(name).split(b"\0")[0].decode()

    for bits in AFFINE_BITS:
        for sdt in DT_CODE:
            assert head("affine", bits, sdt) == f"q{bits}_{sdt}"
    for mode, (_, bits) in FP_MODES.items():
        assert head(mode, bits, "float32") == mode == head(mode, bits, "bfloat16")
    assert head("nvfp4", 4, "float32", global_scale=1) == "nvfp4_global"
    for bad in (0, 7, 9):
        with pytest.raises(mh.HarnessError, match="affine bits must be 1-6 or 8"):
            head("affine", bad, "float32")
    with pytest.raises(mh.HarnessError, match="nvfp4's only"):
        head("mxfp4", 4, "float32", global_scale=1)


# (N, H, V): N and V around the 32-row / 32-class tiles, H a multiple of the
# group size (mx.quantize requires it) with BK = 16 steps, the last tile of V
# mostly past its end.
Q_SHAPES = {32: (33, 96, 65), 64: (31, 64, 33), 128: (1, 128, 97)}


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_every_bits_and_group_size_all_schedules(lce_lib, bits, group_size):
    n, h, v = Q_SHAPES[group_size]
    case = "others_z_cap" if bits != 4 else "smooth_ignore_bias_sum"
    # chunk_bytes: two row chunks when N > 32
    lce.check_case(lce_lib, case, n, h, v, "float32", "float32", 4 * v * 32,
                   mh.DEFAULT_SCHEDULES, seed=bits * 100 + group_size,
                   make=quantized_maker(bits, group_size))


@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_modes_all_schedules(lce_lib, mode):
    group_size, bits = FP_MODES[mode]
    n, h, v = 33, 96, 65
    lce.check_case(lce_lib, "smooth_ignore_bias_sum", n, h, v, "float32", "bfloat16", 4 * v * 32,
                   mh.DEFAULT_SCHEDULES, seed=group_size + bits,
                   make=quantized_maker(bits, group_size, mode))


def test_nvfp4_global_scale_all_schedules(lce_lib):
    lce.check_case(lce_lib, "others_z_cap", 33, 96, 65, "float32", "float32", 4 * 65 * 32,
                   mh.DEFAULT_SCHEDULES, seed=5,
                   make=quantized_maker(4, 16, "nvfp4", mx.array(0.37, mx.float32)))


def small_device_case(lce_lib, case, hdt, sdt, seed, make):
    """The same head in the small devices' forward tile (64 x 32 x 32, MLX's choice for
    'g'/'p' GPUs: launch_plan.h lce_forward_tile), on a smaller shape."""
    lce_lib.run("lce_set_device_class", np.int32(ord("g")), schedules=(mh.Schedule(),))
    try:
        lce.check_case(lce_lib, case, 9, 64, 40, hdt, sdt, 4 * 40 * 9, lce.FAST, seed=seed + 100,
                       make=make)
    finally:
        lce_lib.run("lce_set_device_class", np.int32(ord("s")), schedules=(mh.Schedule(),))


@pytest.mark.parametrize("hdt", ["float32", "float16", "bfloat16"])
def test_every_nvfp4_global_instantiation(lce_lib, hdt):
    k = DT_CODE[hdt]
    lce.check_case(lce_lib, list(lce.CASES)[k], 37, 64, 70, hdt, list(DT_CODE)[2 - k],
                   4 * 70 * 33, lce.FAST, seed=k + 20,
                   make=quantized_maker(4, 16, "nvfp4", mx.array([3.0, 0.05, 1.7][k], mx.float32)))
    small_device_case(lce_lib, list(lce.CASES)[k], hdt, list(DT_CODE)[2 - k], k + 20,
                      quantized_maker(4, 16, "nvfp4", mx.array([3.0, 0.05, 1.7][k], mx.float32)))


@pytest.mark.parametrize("hdt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", list(FP_MODES))
def test_every_fp_instantiation(lce_lib, mode, hdt):
    """Each floating-point head with each hidden dtype (forward tiles, dZ, dH),
    options rotating, weights quantized from each dtype."""
    group_size, bits = FP_MODES[mode]
    k = list(FP_MODES).index(mode) + DT_CODE[hdt] * 3
    lce.check_case(lce_lib, list(lce.CASES)[k % 4], 37, 64, 70, hdt, list(DT_CODE)[k % 3],
                   4 * 70 * 33, lce.FAST, seed=k, make=quantized_maker(bits, group_size, mode))
    small_device_case(lce_lib, list(lce.CASES)[k % 4], hdt, list(DT_CODE)[k % 3], k,
                      quantized_maker(bits, group_size, mode))


@pytest.mark.parametrize("sdt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("hdt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bits", AFFINE_BITS)
def test_every_instantiation(lce_lib, bits, hdt, sdt):
    """Each quantized head (bits, scale dtype) with each hidden dtype, options
    and group size rotating, under two schedules (the tile code is the one the
    cases above run under all seven)."""
    k = bits + DT_CODE[hdt] * 3 + DT_CODE[sdt]
    case = list(lce.CASES)[k % 4]
    if bits == 1 and case == "cap_z_sum":
        # A 1-bit head under cap_z_sum's 2.0 soft-cap leaves no row whose top
        # two logits differ by more than the float32 GEMM's error, so
        # check_case's accuracy statistic would be vacuous there (it refuses
        # that). 1 bit with a cap (4.0) runs in others_z_cap.
        case = "others_z_cap"
    lce.check_case(lce_lib, case, 37, 64, 70, hdt, sdt, 4 * 70 * 33, lce.FAST,
                   seed=k, make=quantized_maker(bits, (32, 64)[k % 2]))
    small_device_case(lce_lib, case, hdt, sdt, k, quantized_maker(bits, (32, 64)[k % 2]))


@pytest.mark.parametrize("fmt", [f"q{b}" for b in AFFINE_BITS] + list(FP_MODES) + ["nvfp4_global"])
def test_every_format_stored_z_path(lce_lib, fmt):
    """The training step's stored-Z path (lce_dz with logits_only, fl_lce_rows, dH) with
    every quantization format mx.quantize has (affine bits with group sizes, hidden and
    scale dtypes rotating; the floating-point modes; nvfp4 with a global scale) against
    the CPU primitive and float64. (Its logits GEMM is the dZ kernel each instantiation
    test above runs; logits_only is a runtime branch of its epilogue.)"""
    k = ([f"q{b}" for b in AFFINE_BITS] + list(FP_MODES) + ["nvfp4_global"]).index(fmt)
    hdt, sdt = list(DT_CODE)[k % 3], list(DT_CODE)[(k + 1) % 3]
    if fmt.startswith("q"):
        group_size = (32, 64, 128)[k % 3]
        make = quantized_maker(int(fmt[1:]), group_size)
        n, h, v = 37, 2 * group_size, 70
    else:
        mode = fmt.replace("_global", "")
        group_size, bits = FP_MODES[mode]
        make = quantized_maker(bits, group_size, mode,
                               mx.array(0.37, mx.float32) if fmt.endswith("_global") else None)
        n, h, v = 37, 64, 70
    case = "others_z_cap" if fmt == "q1" else list(lce.CASES)[k % 4]
    lce.check_fused(lce_lib, case, n, h, v, hdt, sdt, 4 * v * 20, lce.FAST, seed=k + 300, make=make)


def test_zz_every_quantized_instantiation_ran():
    """Runs after the tests above (file order): every quantized kernel the .metal
    file defines was launched."""
    # (the row statistics' quantized kernels: tests/test_metal_row_stats.py)
    quantized = {n for n in lce.host_names() if lce.is_quantized_kernel(n) and not n.startswith("fl_rs_")}
    if not quantized & lce.USED:
        pytest.skip("run with the kernel tests")
    missing = quantized - lce.USED
    assert not missing, sorted(missing)


def test_quantized_weight_has_no_dw_kernel(lce_lib):
    case = lce.CASES["plain"]
    d = quantized_maker(4, 32)(np.random.default_rng(3), 5, 32, 20, "float32", "float32", case)
    out = lce.gpu_forward(lce_lib, d, case, 1 << 20, lce.FAST)
    with pytest.raises(mh.HarnessError, match="no gradient"):
        lce.gpu_backward(lce_lib, d, case, out["lse"].copy(), out["lse_lo"].copy(),
                         np.ones(5, np.float32), 1 << 20, ("hidden", "weight"), lce.FAST)


FENCED_KERNELS = r"""
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import metal_host as mh
import test_metal_quantized_head as t
lib = mh.build(t.lce.METAL, t.lce.ADAPTOR, include_dirs=("csrc",))
one = (mh.Schedule(),)
for fence in (1, 2):
    lib.run("lce_set_fence", np.int32(fence), schedules=one)
    for bits in t.AFFINE_BITS:
        for gs, sdt in ((32, "float32"), (64, "bfloat16"), (128, "float16")):
            n, h, v = t.Q_SHAPES[gs]
            t.lce.check_case(lib, "smooth_ignore_bias_sum", n, h, v, "float16", sdt, 4 * v * 32, one,
                             seed=bits + gs, make=t.quantized_maker(bits, gs))
    for mode, (gs, bits) in t.FP_MODES.items():
        n, h, v = t.Q_SHAPES[32]
        t.lce.check_case(lib, "smooth_ignore_bias_sum", n, h, v, "float16", "float32", 4 * v * 32,
                         one, seed=gs, make=t.quantized_maker(bits, gs, mode))
    n, h, v = t.Q_SHAPES[32]
    t.lce.check_case(lib, "smooth_ignore_bias_sum", n, h, v, "float16", "float32", 4 * v * 32,
                     one, seed=9, make=t.quantized_maker(4, 16, "nvfp4", t.mx.array(0.37)))
print("fenced kernels ok")
"""


def test_quantized_kernels_read_nothing_out_of_bounds():
    """The forward, dZ and dH kernels of every format, with w_q, scales and
    biases against inaccessible pages after their end and before their start
    (lce_set_fence): a read one byte out of bounds faults. In a subprocess."""
    code = FENCED_KERNELS.format(tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "fenced kernels ok" in proc.stdout, (
        f"rc {proc.returncode} (-11: a read hit an inaccessible page)\n{proc.stderr[-3000:]}")
