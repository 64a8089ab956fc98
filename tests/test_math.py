"""Accuracy of the shared float32 math (csrc/math/transcendental.h) and of the
CPU kernels' half/bfloat16 converters, against float64 / NumPy, over dense
sweeps of the float32 range. The probe is compiled here from
tests/math_probe/probe.cpp with the C++ compiler and loaded with ctypes."""

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "math_probe" / "probe.cpp"
# The bounds documented in csrc/math/transcendental.h.
MAX_ULP = {"exp": 2.0, "log": 2.0, "log1p": 2.5}


def _compiler():
    for name in ("g++", "clang++-19", "c++"):
        if shutil.which(name):
            return name
    pytest.skip("no C++ compiler to build the math probe")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    sources = [PROBE] + sorted((ROOT / "csrc" / "math").glob("*.h")) + [
        ROOT / "csrc/cpu" / name for name in ("dtype.h", "convert.h", "convert.cpp", "vectorize.h")]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out = tmp_path_factory.mktemp("math_probe") / f"probe_{digest}.so"
    mlx_include = pathlib.Path(mx.__file__).parent / "include"
    cmd = [
        _compiler(), "-O2", "-std=c++20", "-shared", "-fPIC",
        "-fno-fast-math", "-fno-trapping-math",
        f"-I{ROOT / 'csrc'}", f"-I{mlx_include}", str(PROBE), "-o", str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    return lib


def _call(fn, x, *extra):
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    args = [ptr(x)] + [ctypes.c_float(e) for e in extra] + [ptr(y), ctypes.c_int64(x.size)]
    fn(*args)
    return y


def _ulp_error(got, want64):
    """|got - want| in units of the float32 spacing at want (finite wants)."""
    want32 = want64.astype(np.float32)
    spacing = np.spacing(np.abs(want32)).astype(np.float64)
    spacing = np.maximum(spacing, np.float64(np.finfo(np.float32).smallest_subnormal))
    return np.abs(got.astype(np.float64) - want64) / spacing


def _all_positive_floats(count, rng):
    """Random float32 bit patterns covering every exponent, subnormals included."""
    bits = rng.integers(1, 0x7F800000, size=count, dtype=np.uint32)
    return bits.view(np.float32)


def test_exp_accuracy(probe):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(-104.0, 89.0, 400_001, dtype=np.float32),
        rng.uniform(-1, 1, 100_000).astype(np.float32),
        np.float32([-87.3, -88.0, -100.0, -103.9, 88.72, 0.0, -0.0, 1e-30, -1e-30]),
    ])
    got = _call(probe.probe_exp, x)
    want = np.exp(x.astype(np.float64))
    finite = want < np.finfo(np.float32).max
    assert _ulp_error(got[finite], want[finite]).max() <= MAX_ULP["exp"]
    assert np.all(np.isinf(got[~finite]))


def test_exp_special_values(probe):
    x = np.float32([np.inf, -np.inf, np.nan, 89.0, 1000.0, -1000.0])
    got = _call(probe.probe_exp, x)
    assert got[0] == np.inf and got[1] == 0.0 and np.isnan(got[2])
    assert got[3] == np.inf and got[4] == np.inf and got[5] == 0.0


def test_exp_nonpos_accuracy(probe):
    """The softmax-term exp: same accuracy down to FLT_MIN, flushes below it."""
    x = np.concatenate([
        np.linspace(-87.3, 0.0, 400_001, dtype=np.float32),
        np.float32([-0.0, -1e-30, -87.33]),
    ])
    got = _call(probe.probe_exp_nonpos, x)
    assert _ulp_error(got, np.exp(x.astype(np.float64))).max() <= MAX_ULP["exp"]
    below = _call(probe.probe_exp_nonpos, np.float32([-87.34, -100.0, -np.inf]))
    assert np.all(below == 0.0)
    assert np.isnan(_call(probe.probe_exp_nonpos, np.float32([np.nan]))[0])


def test_exp_neg_is_exp_bit_for_bit(probe):
    """exp_neg_f32 (the sigmoid losses' e^-|x| and pow_unit's exp) scales by
    2^(n+64) * 2^-64 instead of exp_f32's two data-dependent factors: the same
    bits for every x <= 0, through the subnormal results down to 0, and NaN."""
    rng = np.random.default_rng(5)
    neg_bits = rng.integers(0x80000000, 0xC2D00000, size=400_000, dtype=np.uint32)  # -0 .. -104
    x = np.concatenate([
        np.linspace(-110.0, 0.0, 400_001, dtype=np.float32),
        neg_bits.view(np.float32),
        np.float32([-0.0, 0.0, -87.33654, -87.34, -103.97, -103.98, -104.0, -1e4, -np.inf]),
    ])
    got, want = _call(probe.probe_exp_neg, x), _call(probe.probe_exp, x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert (got[(x > -103.2) & (x < -87.4)] > 0).all()  # subnormal results are kept
    assert np.isnan(_call(probe.probe_exp_neg, np.float32([np.nan]))[0])


def test_log_accuracy(probe):
    rng = np.random.default_rng(1)
    x = np.concatenate([
        _all_positive_floats(500_000, rng),
        np.linspace(0.5, 2.0, 200_001, dtype=np.float32),
        np.float32([1.0, np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).max]),
    ])
    got = _call(probe.probe_log, x)
    want = np.log(x.astype(np.float64))
    assert _ulp_error(got, want).max() <= MAX_ULP["log"]


def test_log_special_values(probe):
    got = _call(probe.probe_log, np.float32([0.0, -0.0, -1.0, np.inf, np.nan, -np.inf]))
    assert got[0] == -np.inf and got[1] == -np.inf
    assert np.isnan(got[2]) and got[3] == np.inf and np.isnan(got[4]) and np.isnan(got[5])


def test_log1p_accuracy(probe):
    rng = np.random.default_rng(2)
    tiny = _all_positive_floats(200_000, rng)
    x = np.concatenate([
        tiny[tiny < 1e6],
        -tiny[tiny < 0.999],
        np.linspace(-0.999, 10.0, 200_001, dtype=np.float32),
    ])
    got = _call(probe.probe_log1p, x)
    want = np.log1p(x.astype(np.float64))
    assert _ulp_error(got, want).max() <= MAX_ULP["log1p"]


def test_log1p_unit_accuracy(probe):
    """log1p on [0, 1] (softplus's log1p(exp(-|x|))) by one reduction step."""
    rng = np.random.default_rng(4)
    tiny = _all_positive_floats(200_000, rng)
    x = np.concatenate([tiny[tiny <= 1.0], np.linspace(0, 1, 200_001, dtype=np.float32)])
    got = _call(probe.probe_log1p_unit, x)
    want = np.log1p(x.astype(np.float64))
    assert _ulp_error(got, want).max() <= MAX_ULP["log"]


def test_log1p_special_values(probe):
    got = _call(probe.probe_log1p, np.float32([-1.0, np.inf, np.nan, -2.0, 0.0, 3e38]))
    assert got[0] == -np.inf and got[1] == np.inf and np.isnan(got[2]) and np.isnan(got[3])
    assert got[4] == 0.0 and abs(got[5] - np.log(3e38)) < 1e-4


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0, 3.5])
def test_pow_unit(probe, gamma):
    base = np.concatenate([np.linspace(0, 1, 10_001, dtype=np.float32), np.float32([1e-30, 1e-45])])
    got = _call(probe.probe_pow_unit, base, gamma)
    want = np.power(base.astype(np.float64), gamma)
    if gamma == 0.0:
        assert np.all(got == 1.0)  # 0**0 = 1: focal with gamma=0 is exactly cross-entropy
    # exp(gamma * log(b)): relative error grows with |gamma log b| (~ 1e-6 here).
    np.testing.assert_allclose(got, want, rtol=4e-6, atol=1e-37)


@pytest.mark.parametrize(
    "kind, np_type", [("half", np.float16), ("bfloat", None)]
)
def test_16bit_converters_round_to_nearest_even(probe, kind, np_type):
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 1000,
        _all_positive_floats(100_000, rng),
        -_all_positive_floats(100_000, rng),
        np.float32([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 6e-8, 3e-8, 1e-8]),
    ])
    fn = probe.probe_half_roundtrip if kind == "half" else probe.probe_bfloat_roundtrip
    bits = np.empty(x.size, np.uint16)
    back = np.empty_like(x)
    fn(*(a.ctypes.data_as(ctypes.c_void_p) for a in (x, bits, back)), ctypes.c_int64(x.size))
    if np_type is not None:
        with np.errstate(over="ignore"):  # values past 65504 become inf, as intended
            want = x.astype(np_type)
    else:
        # bfloat16 reference: MLX's own conversion (round to nearest even).
        want = np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_array_equal(back, want.astype(np.float32))
    nan = _call(probe.probe_exp, np.float32([np.nan]))  # a NaN to convert
    fn(nan.ctypes.data_as(ctypes.c_void_p), bits[:1].ctypes.data_as(ctypes.c_void_p),
       back[:1].ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(1))
    assert np.isnan(back[0])


# ---- native 16-bit converters (csrc/cpu/convert.h) -----------------------------------------


def _float_cases():
    """float32 inputs that exercise every rounding decision of both 16-bit
    formats: the three patterns around each tie (below, at, above) for every
    upper-bit pattern, NaNs with payloads (quiet and signalling, both signs),
    infinities, overflow thresholds, zeros and float32 subnormals, plus random
    bits; the length is not a multiple of 16 (vector tails)."""
    hi13 = np.arange(1 << 19, dtype=np.uint32) << 13  # half: 13 dropped bits
    hi16 = np.arange(1 << 16, dtype=np.uint32) << 16  # bfloat16: 16 dropped bits
    near = lambda hi, half_bit: np.concatenate([hi | (half_bit - 1), hi | half_bit, hi | (half_bit + 1)])
    rng = np.random.default_rng(5)
    special = np.uint32([
        0x7F800000, 0xFF800000, 0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FBFFFFF,
        0x7FFFE000, 0xFFFFFFFF, 0x7FA00000, 0x00000000, 0x80000000, 0x00000001, 0x807FFFFF,
        0x00400000, 0x477FF000, 0x477FEFFF, 0x477FF001, 0x33000000, 0x33000001, 0x387FE000,
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
    ])
    # Blocks of 16 where one subnormal sits among normal values (the
    # native bfloat16 path falls back for such a block).
    mixed = rng.integers(0x3F000000, 0x40000000, size=16 * 64, dtype=np.uint32)
    mixed[::37] = rng.integers(1, 0x00800000, size=mixed[::37].size, dtype=np.uint32)
    bits = np.concatenate([
        near(hi13, 0x1000), near(hi16, 0x8000), special, mixed,
        rng.integers(0, 1 << 32, size=1_000_000, dtype=np.uint64).astype(np.uint32),
    ])
    return bits[: bits.size - (bits.size % 16) + 7].view(np.float32).copy()


def _run_pair(fn, x, out_dtype):
    native = np.zeros(x.size, out_dtype)
    portable = np.zeros(x.size, out_dtype)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    ran = fn(ptr(x), ptr(native), ptr(portable), ctypes.c_int64(x.size))
    return ran, native, portable


@pytest.mark.parametrize("fmt", ["half", "bfloat"])
def test_native_narrowing_is_bit_exact(probe, fmt):
    """float32 -> 16 bits: the CPU's native instruction (vcvtps2ph,
    vcvtneps2bf16) gives the portable converter's bits on every case."""
    fn = probe.probe_narrow_half if fmt == "half" else probe.probe_narrow_bfloat
    x = _float_cases()
    ran, native, portable = _run_pair(fn, x, np.uint16)
    probe.probe_convert_kind.restype = ctypes.c_char_p
    kind = probe.probe_convert_kind(int(fmt == "half"), 1).decode()
    if not ran:
        pytest.skip(f"no native float32 -> {fmt} converter on this CPU ({kind})")
    diff = np.nonzero(native != portable)[0]
    assert diff.size == 0, (
        f"{kind}: {diff.size} differences, e.g. {x.view(np.uint32)[diff[:4]]} -> "
        f"{native[diff[:4]]} vs portable {portable[diff[:4]]}")
    # Spot-check the portable bits themselves: NaN stays NaN (quiet, with the
    # top of its payload), ties go to even.
    if fmt == "half":
        finite = np.isfinite(x) & (np.abs(x) < 65520)
        with np.errstate(over="ignore"):
            want = x[finite].astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(portable[finite], want)
        nan = np.isnan(x)
        assert np.all((portable[nan] & 0x7E00) == 0x7E00)


def test_native_half_widening_is_bit_exact(probe):
    """All 65536 half patterns -> float32: vcvtph2ps gives the portable bits
    (NaN payloads kept, signalling NaNs made quiet)."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = np.concatenate([h, h[:7]])  # a vector tail
    ran, native, portable = _run_pair(probe.probe_widen_half, h, np.float32)
    finite = (h & 0x7C00) != 0x7C00
    np.testing.assert_array_equal(portable[finite], h[finite].view(np.float16).astype(np.float32))
    nan = ((h & 0x7C00) == 0x7C00) & ((h & 0x3FF) != 0)
    assert np.all(np.isnan(portable[nan]))
    if not ran:
        pytest.skip("no native half -> float32 converter on this CPU")
    np.testing.assert_array_equal(native.view(np.uint32), portable.view(np.uint32))


UB_PROGRAM = r"""
#include <cstdio>
#include <limits>
#include "cpu/row_reduce.h"
namespace fl::cpu {
struct Phantom {};
inline void widen(const Phantom*, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = 0.0f;
}
}
int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  volatile float specials[] = {inf, nan, -inf, -1e30f, -88.0f, 0.0f, 88.0f};
  for (float x : specials) std::printf("%g ", flm::exp_nonpos_f32(x));
  // A row holding +inf and NaN in the same SIMD lane, through the real chunk loop.
  float row[40];
  for (int i = 0; i < 40; ++i) row[i] = float(i % 7);
  row[3] = inf;
  row[19] = nan;
  // (3 and 19 share a lane at 8 or 16 lanes; the lane max is then taken over
  // NaN, which drops the inf, and x - max = +inf reaches the exp.)
  flm::LseState st = fl::cpu::online_row(row, 40, [&](const float* xv, int64_t, int n,
                                                      flm::MaxMove mv, const float* next,
                                                      float& next_max, auto fuse) {
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += flm::exp_nonpos_f32(xv[i] - mv.shift);
    if constexpr (decltype(fuse)::value) {
      for (int i = 0; i < n; ++i) next_max = flm::fmax(next_max, next[i]);
    }
    return s;
  });
  std::printf("| %g %g |", st.max, st.sum);
  // The chunk walk of online_row over rows of K elements near 2^31 that are
  // never stored (Phantom: no storage, converts to 0): chunks, sum of their
  // lengths, the end of the last, and whether any was out of order.
  for (int K : {2047, 2048, 2049, 2147481599, 2147481600, 2147481601, 2147483647}) {
    static fl::cpu::Phantom none[1];
    long long chunks = 0, total = 0, end = 0, bad = 0;
    fl::cpu::online_row(none, K, [&](const float*, int64_t c0, int n, flm::MaxMove, const float*,
                                     float&, auto) {
      bad += (c0 != end || n <= 0 || c0 + n > K) ? 1 : 0;
      ++chunks;
      total += n;
      end = c0 + n;
      return 0.0f;
    });
    std::printf(" %lld,%lld,%lld,%lld", chunks, total, end, bad);
  }
  std::printf("\n");
  return 0;
}
"""
WALK_K = [2047, 2048, 2049, 2**31 - 2049, 2**31 - 2048, 2**31 - 2047, 2**31 - 1]


def test_row_loop_no_undefined_behaviour(tmp_path):
    """Built with -fsanitize=float-cast-overflow,signed-integer-overflow and no
    recovery, the CPU kernels' math and row loop must run clean:
    - exp_nonpos_f32(+inf) once converted n = inf to an integer (clang's UBSan
      flagged it, reached by a row with +inf and NaN in one SIMD lane), as did
      -inf and NaN later; now no float-to-int conversion happens there;
    - online_row's chunk offset was an int: rows of K > 2^31 - 2048 overflowed
      it (SIGSEGV in the CE forward at K = 2^31 - 1). The walk must cover
      [0, K) in order (rows near 2^31 that are never allocated)."""
    if not shutil.which("g++"):
        pytest.skip("g++ is needed for the sanitizer build")
    src = tmp_path / "ub.cpp"
    src.write_text(UB_PROGRAM)
    exe = tmp_path / "ub"
    mlx_include = pathlib.Path(mx.__file__).parent / "include"
    subprocess.run(["g++", "-O2", "-std=c++20", "-fopenmp-simd", "-fno-trapping-math",
                    "-fsanitize=float-cast-overflow,signed-integer-overflow",
                    "-fno-sanitize-recover=all",
                    f"-I{ROOT / 'csrc'}", f"-I{mlx_include}", str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    exps, _, walks = run.stdout.split("|")
    # +inf is outside the valid range (x <= 88) and only reachable from a row
    # that also holds a NaN: NaN, like the row.
    got = np.array([float(v) for v in exps.split()])
    want = np.array([np.nan, np.nan, 0.0, 0.0, 0.0, 1.0, np.exp(88.0)])
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=run.stdout)
    for K, walk in zip(WALK_K, walks.split()):
        assert [int(v) for v in walk.split(",")] == [-(-K // 2048), K, K, 0], (K, walk)
