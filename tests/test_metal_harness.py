"""Self-tests of the Metal-on-CPU harness (tests/metal_host).

Correct kernels must pass under every schedule; each deliberately broken kernel in
tests/metal_host/selftest/ must be caught, with a message that names the fault and
its place in the .metal source. Then the static address-space check: it must accept
valid kernels (ours and the project's metal/*.metal) and reject invalid ones.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING, needs_libclang
from metal_host import static_check

pytestmark = pytest.mark.skipif(
    mh.find_clang() is None, reason=CLANG_MISSING
)

SELFTEST = Path(mh.__file__).parent / "selftest"
REPO = SELFTEST.parents[2]
DYNAMIC_SOURCES = sorted(p for p in SELFTEST.glob("*.metal") if not p.name.startswith("static_"))
PROJECT_KERNELS = sorted((REPO / "metal").glob("*.metal"))


@pytest.fixture(scope="module")
def lib():
    return mh.build(DYNAMIC_SOURCES, SELFTEST / "adaptor.cpp")


def site(filename: str, snippet: str) -> str:
    """'tests/metal_host/selftest/<file>:<line>' of the line containing snippet."""
    lines = (SELFTEST / filename).read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if snippet in text)
    return f"tests/metal_host/selftest/{filename}:{line}:"


def u32(n):
    return np.uint32(n)


# ---- correct kernels --------------------------------------------------------------


@pytest.mark.parametrize("threads", [32, 33, 100, 1024])
def test_two_level_reduction(lib, threads):
    # simd_sum inside `if (sg == 0)` only involves SIMD-group 0; 33 and 100 threads
    # leave a partial last SIMD-group; 1024 fills all 32 partial slots.
    rows, n = 3, 1000
    x = np.random.default_rng(threads).standard_normal((rows, n)).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    lib.run("row_sum_f32", x, out, u32(rows), u32(n), u32(threads))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(axis=1), rtol=0, atol=2e-4)


def test_two_level_reduction_half_input(lib):
    rows, n = 2, 300
    x = np.random.default_rng(1).standard_normal((rows, n)).astype(np.float16)
    out = np.full(rows, np.nan, np.float32)
    lib.run("row_sum_f16", x, out, u32(rows), u32(n), u32(64))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(axis=1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("threads", [33, 1024])
def test_function_scope_threadgroup_array(lib, threads):
    rows, n = 4, 777
    x = np.random.default_rng(2).standard_normal((rows, n)).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    lib.run("row_max_f32", x, out, u32(rows), u32(n), u32(threads))
    np.testing.assert_array_equal(out, x.max(axis=1))


@pytest.mark.parametrize("threads", [32, 48])
def test_simd_functions_per_lane(lib, threads):
    # dispatchThreads(70): the edge group has 70 % threads threads, and its last
    # SIMD-group fewer than 32 lanes.
    n = 70
    x = np.random.default_rng(3).integers(-50, 50, n).astype(np.float32)
    out = np.full((n, 4), np.nan, np.float32)
    sizes = np.zeros(n, np.uint32)
    lib.run("simd_ops_f32", x, out, sizes, u32(n), u32(threads))

    expected = np.full((n, 4), np.nan, np.float32)
    expected_sizes = np.zeros(n, np.uint32)
    for g0 in range(0, n, threads):
        group = min(threads, n - g0)
        expected_sizes[g0 : g0 + group] = group
        for s0 in range(g0, g0 + group, 32):
            v = x[s0 : min(s0 + 32, g0 + group)]
            rows = expected[s0 : s0 + v.size]
            rows[:, 0] = np.concatenate([[0], np.cumsum(v)[:-1]])
            rows[:, 1] = v.max()
            partner = np.arange(v.size) ^ 1
            # A lane whose partner does not exist reads poison (NaN), as Metal
            # leaves that value undefined.
            rows[:, 2] = np.where(partner < v.size, v[np.minimum(partner, v.size - 1)], np.nan)
            rows[:, 3] = v[0]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(sizes, expected_sizes)


def test_shim_values(lib):
    out = np.full(20, np.nan, np.float32)
    lib.run("shim_values_f32", out)
    expected = [
        10.0, np.float16(0.1), 65504.0, 1.0, 1.015625, 65504.0, -3.3895314e38, 1.0, 128.0,
        2.0, -1.0, 5.0, 1.5, -3.0, 0.75, np.e, 0.0, 1e-10, 1.0, 2048.0,
    ]
    np.testing.assert_allclose(out, np.array(expected, np.float32), rtol=1e-6, atol=0)


# ---- broken kernels: each must be caught ------------------------------------------


def test_missing_barrier_is_schedule_dependent(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.full(1, np.nan, np.float32)
    with pytest.raises(mh.ScheduleDependent, match="Only the thread order differs"):
        lib.run("sum_no_barrier_f32", x, out, u32(64))


def test_uninitialised_read_reaches_output_as_poison(lib):
    x = np.ones(64, np.float32)
    out = np.zeros(1, np.float32)
    lib.run("sum_uninit_f32", x, out, u32(64), schedules=[mh.Schedule()])
    assert np.isnan(out[0])
    with pytest.raises(mh.ScheduleDependent, match="uninitialised threadgroup memory"):
        lib.run("sum_uninit_f32", x, out, u32(64))


def test_uninitialised_read_hidden_by_max_is_caught_by_second_poison(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(1, np.float32)
    # max() discards the NaN poison, so one schedule alone sees a plausible result...
    lib.run("max_uninit_f32", x, out, u32(64), schedules=[mh.Schedule()])
    assert out[0] == 63.0
    # ...which is why the default schedules also poison with finite +-2.7e36.
    with pytest.raises(mh.ScheduleDependent, match="uninitialised threadgroup memory"):
        lib.run("max_uninit_f32", x, out, u32(64))


def test_barrier_skipped_by_some_threads_is_reported(lib):
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError) as err:
        lib.run("barrier_in_branch_f32", out, u32(64))
    msg = str(err.value)
    assert "not reached by every thread" in msg
    assert site("bad_divergent_barrier.metal", "threadgroup_barrier") in msg
    assert "threads 0-15 wait" in msg and "threads 16-63 have returned" in msg


def test_different_barriers_are_reported(lib):
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError, match="threads reached different barriers") as err:
        lib.run("barrier_per_branch_f32", out, u32(64))
    lines = (SELFTEST / "bad_divergent_barrier.metal").read_text().splitlines()
    barrier_lines = [i for i, t in enumerate(lines, 1) if "threadgroup_barrier(" in t][-2:]
    for line in barrier_lines:
        assert f"bad_divergent_barrier.metal:{line}:" in str(err.value)


def test_simd_functions_at_different_call_sites_are_reported(lib):
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError, match="different SIMD-group functions") as err:
        lib.run("simd_if_else_f32", x, out, u32(64))
    msg = str(err.value)
    assert "simd_sum at " + site("bad_divergent_simd.metal", "v = simd_sum(v)") in msg
    assert "simd_max at " + site("bad_divergent_simd.metal", "v = simd_max(v)") in msg


def test_simd_function_after_lanes_returned_is_reported(lib):
    n = 40  # the second SIMD-group has 8 lanes in range, 24 returned
    x = np.ones(n, np.float32)
    out = np.zeros(n, np.float32)
    with pytest.raises(mh.KernelError, match="reached after some lanes returned") as err:
        lib.run("simd_after_return_f32", x, out, u32(n), u32(64))
    assert "SIMD-group 1" in str(err.value)


def test_simd_function_against_barrier_is_a_reported_deadlock(lib):
    out = np.zeros(32, np.float32)
    with pytest.raises(mh.KernelError, match="deadlock") as err:
        lib.run("simd_or_barrier_f32", out, u32(32))
    msg = str(err.value)
    assert "threads 0-15 wait in simd_sum" in msg
    assert "threads 16-31 wait in threadgroup_barrier" in msg


def test_non_uniform_shuffle_delta_is_reported(lib):
    x = np.ones(32, np.float32)
    out = np.zeros(32, np.float32)
    with pytest.raises(mh.KernelError, match="must be the same in all lanes") as err:
        lib.run("shuffle_nonuniform_delta_f32", x, out, u32(32))
    msg = str(err.value)
    assert "simd_shuffle_down at " + site("bad_divergent_simd.metal", "simd_shuffle_down(") in msg
    assert "thread 0 (SIMD-group 0, lane 0)" in msg


def test_out_of_bounds_device_write_is_reported(lib):
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.OutOfBounds, match=r"argument 1 \(float32\[64\]\): wrote past the end"):
        lib.run("shift_right_f32", x, out, u32(64))


def test_out_of_bounds_threadgroup_write_is_reported(lib):
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError, match="write outside threadgroup buffer 0 .* offset 256"):
        lib.run("threadgroup_overrun_f32", x, out, u32(64))


@pytest.mark.parametrize(
    "threads, tg_bytes, message",
    [
        (1025, 0, "Metal allows 1 to 1024"),
        (32, 20, "multiple of 16"),
        (32, 32 * 1024 + 16, "Metal allows 32768"),
    ],
)
def test_dispatch_limits_are_enforced(lib, threads, tg_bytes, message):
    with pytest.raises(mh.KernelError, match=message):
        lib.run("empty_dispatch", u32(threads), u32(tg_bytes))


def test_scalars_must_have_explicit_c_types(lib):
    with pytest.raises(TypeError, match="np.uint32"):
        lib.run("empty_dispatch", 32, u32(0))


# ---- each newer check: the broken kernel is reported, its twin passes ------------

LOCKSTEP = [mh.Schedule(order) for order in ("forward", "reverse")] + [mh.Schedule("random", seed=1)]


def test_scratch_reuse_across_simd_functions_needs_run_ahead_schedules(lib):
    x = np.random.default_rng(5).standard_normal(64).astype(np.float32)
    out = np.full(2, np.nan, np.float32)
    # Lock-step rounds never let a SIMD-group get ahead: the race stays hidden...
    lib.run("scratch_reuse", x, out, u32(64), u32(0), schedules=LOCKSTEP)
    # ...while SIMD-group 1 running ahead overwrites the partial SIMD-group 0 reads.
    with pytest.raises(mh.ScheduleDependent, match="SIMD-group that runs ahead") as err:
        lib.run("scratch_reuse", x, out, u32(64), u32(0))
    assert "ahead_reverse" in str(err.value)
    out[:] = np.nan
    lib.run("scratch_reuse", x, out, u32(64), u32(1))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out, [x64.sum(), (x64 * x64).sum()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [64, 96])
def test_threadgroup_memory_published_by_mem_none_is_reported(lib, threads):
    x = np.arange(threads, dtype=np.float32)
    out = np.full(threads, np.nan, np.float32)
    coherent = [s for s in mh.DEFAULT_SCHEDULES if s.memory == "coherent"]
    lib.run("exchange_tg", x, out, u32(threads), u32(0), schedules=coherent)
    with pytest.raises(mh.ScheduleDependent, match="Only the memory model differs"):
        lib.run("exchange_tg", x, out, u32(threads), u32(0))
    out[:] = np.nan
    lib.run("exchange_tg", x, out, u32(threads), u32(1))
    np.testing.assert_array_equal(out, x[::-1])


def test_device_memory_published_by_mem_threadgroup_is_reported(lib):
    n = 64
    x = np.arange(n, dtype=np.float32)
    staged = np.zeros(n, np.float32)
    out = np.full(n, np.nan, np.float32)
    with pytest.raises(mh.ScheduleDependent, match="Only the memory model differs"):
        lib.run("exchange_dev", x, staged, out, u32(n), u32(0))
    lib.run("exchange_dev", x, staged, out, u32(n), u32(1))
    np.testing.assert_array_equal(out, 2 * x[::-1])


def test_strict_memory_needs_an_ahead_order():
    with pytest.raises(ValueError, match="needs order"):
        mh.Schedule("forward", memory="strict")


@pytest.mark.parametrize(
    "entry, dtype, old_poisons",
    [
        # min() drops NaN and ignores +huge: only the negative poison shows it.
        ("extremum_f32", np.float32, (0xFFFF, 0x7F7F)),
        # half: 0x7F7F is NaN too, dropped by max(): only +65504 shows it.
        ("extremum_f16", np.float16, (0xFFFF, 0x7F7F)),
        # int32: all-ones is -1, which max() ignores.
        ("extremum_i32", np.int32, (0xFFFF,)),
    ],
)
def test_min_and_max_over_unwritten_slots_are_reported(lib, entry, dtype, old_poisons):
    threads = 64  # 2 of the 32 partial slots written
    x = (np.random.default_rng(7).integers(1, 1000, threads)).astype(dtype)
    out = np.zeros(1, dtype)
    lib.run(entry, x, out, u32(threads), u32(0),
            schedules=[mh.Schedule(poison=p) for p in old_poisons])
    with pytest.raises(mh.ScheduleDependent, match="uninitialised threadgroup memory"):
        lib.run(entry, x, out, u32(threads), u32(0))
    out[:] = 0
    lib.run(entry, x, out, u32(threads), u32(1))
    assert out[0] == (x.min() if entry == "extremum_f32" else x.max())


def test_simd_function_in_a_helper_called_from_divergent_branches_is_reported(lib):
    x = np.ones(32, np.float32)
    out = np.zeros(32, np.float32)
    with pytest.raises(mh.KernelError, match="through different call paths") as err:
        lib.run("helper_simd", x, out, u32(32), u32(0))
    msg = str(err.value)
    assert "simd_sum at " + site("bad_divergent_simd.metal", "return simd_sum(v);") in msg
    assert "threads 0-15 wait" in msg and "threads 16-31 wait" in msg and " via " in msg
    # The twin: one call by all lanes.
    lib.run("helper_simd", x, out, u32(32), u32(1))
    np.testing.assert_array_equal(out, np.full(32, 16 * 1.0 + 16 * 2.0, np.float32))


def test_barrier_in_a_helper_called_from_divergent_branches_is_reported(lib):
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError, match="one barrier in a helper called from divergent"):
        lib.run("helper_barrier", out, u32(64))


def test_function_scope_threadgroup_arrays_count_toward_32_kib(lib):
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(mh.KernelError, match=r"threadgroup arrays \(32768 bytes\) plus "
                       r"\[\[threadgroup\(n\)\]\] buffers \(16 bytes\) exceed"):
        lib.run("staging_array", x, out, u32(64), u32(0))
    lib.run("staging_array", x, out, u32(64), u32(1))
    np.testing.assert_array_equal(out, np.full(64, 2.0, np.float32))


def test_msl_subset_twin_runs(lib):
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    out = np.zeros(32, np.float32)
    lib.run("msl_subset_f32", x, out)
    staged = np.exp(x.astype(np.float64)) * np.array([0.5, 1, 2, 4])[np.arange(32) % 4]
    np.testing.assert_allclose(out, staged[::-1] ** 3, rtol=1e-5)


def test_overlapping_scratch_slots_in_the_real_block_kernel_are_reported(tmp_path):
    """The cross-entropy block kernel keeps its max pass in scratch slots apart from
    the merge's; built with the max slots on the exp-sum slots (a real race: a
    SIMD-group that runs ahead writes its exp-sum over a max another has not read
    yet), it passes every lock-step schedule. The ahead schedules report it."""
    import re as _re

    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    (tmp_path / "metal").mkdir()
    for source in [*PROJECT_KERNELS, *(REPO / "metal").glob("*.h")]:  # kernels and headers
        (tmp_path / "metal" / source.name).write_text(source.read_text())
    common = (REPO / "metal" / "fl_common.h").read_text()
    overlapping, count = _re.subn(r"#define FLK_SCRATCH_MAX \d+", "#define FLK_SCRATCH_MAX FLK_SCRATCH_S",
                              common)
    assert count == 1, "fl_common.h no longer defines FLK_SCRATCH_MAX"
    (tmp_path / "metal" / "fl_common.h").write_text(overlapping)
    lib = mh.build(sorted((tmp_path / "metal").glob("*.metal")),
                   "tests/metal_kernels/adaptor.cpp", include_dirs=("csrc",))

    rows, K = 3, 300  # block variant: 96 threads, 3 SIMD-groups
    # Logits near 0: a SIMD-group's exp-sum (~ its element count) exceeds the row max,
    # so an exp-sum read as a max changes the result.
    x = (0.1 * np.random.default_rng(11).standard_normal((rows, K))).astype(np.float32)
    index = np.array([0, 7, 299], np.int64)
    loss, lse, lse_lo, asum = (np.full(rows, np.nan, np.float32) for _ in range(4))
    # tests/metal_kernels/adaptor.cpp: ce_forward_run(dtype, soft, weighted, max_threads,
    # logits, index, probs, weights, loss, lse, lse_lo, a_sum, rows, K, smoothing, mode,
    # has_ignore, ignore_index, z_loss, softcap, stats, stat_lse, entropy, argmax, correct)
    args = (np.int32(0), np.int32(0), np.int32(0), np.int32(1024), x, index, x,
            np.ones(1, np.float32), loss, lse, lse_lo, asum, np.int64(rows), np.int32(K),
            np.float32(0), np.int32(0), np.int32(0), np.int64(-100), np.float32(0), np.float32(0),
            np.int32(0), np.zeros(1, np.float32), np.zeros(1, np.float32), np.zeros(1, np.int64),
            np.zeros(1, np.uint8))
    lib.run("ce_forward_run", *args, schedules=LOCKSTEP)
    x64 = x.astype(np.float64)
    expected = np.log(np.exp(x64).sum(1)) - x64[np.arange(rows), index]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)  # the call itself is right
    with pytest.raises(mh.ScheduleDependent, match="SIMD-group that runs ahead"):
        lib.run("ce_forward_run", *args)


# ---- SIMD-group matrices (ok_simdgroup_matrix.metal, bad_simdgroup_matrix.metal) ---

# Unit roundoff of each element type, and how the kernels get and give its values.
_UNIT_ROUNDOFF = {"f32": 2.0**-24, "f16": 2.0**-11, "bf16": 2.0**-8}


def to_device(x: np.ndarray, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(the array a kernel reads, its values as float64) for element type `tag`."""
    if tag == "f32":
        d = x.astype(np.float32)
        return d, d.astype(np.float64)
    if tag == "f16":
        d = x.astype(np.float16)
        return d, d.astype(np.float64)
    bits = np.array(mx.array(x.astype(np.float32)).astype(mx.bfloat16).view(mx.uint16))
    return bits, from_device(bits, "bf16")


def from_device(d: np.ndarray, tag: str) -> np.ndarray:
    if tag == "bf16":
        return np.array(mx.array(d).view(mx.bfloat16).astype(mx.float32)).astype(np.float64)
    return d.astype(np.float64)


def empty(shape, tag: str) -> np.ndarray:
    """An output that shows unwritten elements (NaN in every type)."""
    if tag == "bf16":
        return np.full(shape, 0x7FC0, np.uint16)
    return np.full(shape, np.nan, np.float16 if tag == "f16" else np.float32)


def assert_product_close(got, a64, b64, c64, acc: str):
    """|got - (a b + c)| within the rounding bound of a K-term sum accumulated in
    `acc` (gamma_{K+1} (|a| |b| + |c|)), computed from the inputs as rounded."""
    k = a64.shape[1]
    u = _UNIT_ROUNDOFF[acc]
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    bound = gamma * (np.abs(a64) @ np.abs(b64) + np.abs(c64))
    err = np.abs(got - (a64 @ b64 + c64))
    assert np.all(err <= bound), f"max error {err.max():.3g}, at {np.unravel_index(np.argmax(err - bound), err.shape)}"


@pytest.mark.parametrize("operand, acc", [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"),
                                          ("f16", "f32"), ("bf16", "f32")])
@pytest.mark.parametrize("transpose_b", [0, 1])
def test_simdgroup_multiply_accumulate_8x8(lib, operand, acc, transpose_b):
    rng = np.random.default_rng(20)
    a, a64 = to_device(rng.standard_normal((8, 8)), operand)
    b, b64 = to_device(rng.standard_normal((8, 8)), operand)
    c, c64 = to_device(rng.standard_normal((8, 8)), acc)
    d = empty((8, 8), acc)
    entry = f"mma_8x8_{operand}" + ("" if operand == acc else f"_{acc}")
    lib.run(entry, a, np.ascontiguousarray(b.T) if transpose_b else b, c, d, u32(transpose_b))
    assert_product_close(from_device(d, acc), a64, b64, c64, acc)


def test_half_accumulator_rounds_after_every_step(lib):
    """The documented model of a half accumulator: 2048 + 1 rounds back to 2048 in
    half, so eight unit products vanish one by one; a sum kept in float and rounded
    once would give 2056 (representable in half)."""
    ones = np.ones((8, 8), np.float16)
    c = np.full((8, 8), 2048, np.float16)
    d = np.full((8, 8), np.nan, np.float16)
    lib.run("mma_8x8_f16", ones, ones, c, d, u32(0))
    np.testing.assert_array_equal(d, c)
    d32 = np.full((8, 8), np.nan, np.float32)
    lib.run("mma_8x8_f16_f32", ones, ones, c.astype(np.float32), d32, u32(0))
    np.testing.assert_array_equal(d32, np.full((8, 8), 2056, np.float32))


def test_simdgroup_matrix_constructors_and_operators(lib):
    a = np.random.default_rng(21).standard_normal((8, 8)).astype(np.float32)
    out = np.full((4, 8, 8), np.nan, np.float32)
    lib.run("matrix_forms_f32", a, out)
    a64 = a.astype(np.float64)
    np.testing.assert_array_equal(out[0], 2 * a)  # diagonal 2 I times a: exact
    assert_product_close(out[1].astype(np.float64), a64, a64, np.zeros((8, 8)), "f32")
    np.testing.assert_array_equal(out[2], a + 1)
    np.testing.assert_array_equal(out[3], a.T)


def test_simdgroup_matrix_fragment_layout(lib):
    """Lane l holds row (l/4 & 4) + (l/2) % 4, columns (l/4 & 2) * 2 + (l % 2) * 2 and
    the next: Apple's layout, which MLX's steel GEMM assumes. Written here as the
    table metal-flash-attention documents, not as the formula."""
    x = np.arange(64, dtype=np.float32)
    lanes = np.full((32, 2), np.nan, np.float32)
    out = np.full(64, np.nan, np.float32)
    lib.run("fragment_layout_f32", x, lanes, out)
    owner = np.array([  # owner[r][c // 2]: the lane holding (r, c) and (r, c + 1)
        [0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15],
        [16, 17, 24, 25], [18, 19, 26, 27], [20, 21, 28, 29], [22, 23, 30, 31]])
    expected = np.full((32, 2), np.nan, np.float32)
    for r in range(8):
        for pair in range(4):
            expected[owner[r][pair]] = [8 * r + 2 * pair, 8 * r + 2 * pair + 1]
    np.testing.assert_array_equal(lanes, expected)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("operand, acc", [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"),
                                          ("f16", "f32")])
def test_tiled_gemm_through_threadgroup_tiles(lib, operand, acc):
    # 2 x 3 threadgroups of 4 SIMD-groups; K = 40: five staged tiles.
    m, n, k = 64, 96, 40
    rng = np.random.default_rng(22)
    a, a64 = to_device(rng.standard_normal((m, k)), operand)
    b, b64 = to_device(rng.standard_normal((k, n)), operand)
    c = empty((m, n), acc)
    lib.run(f"tiled_gemm_{operand}" + ("" if operand == acc else f"_{acc}"), a, b, c,
            u32(m), u32(n), u32(k))
    assert_product_close(from_device(c, acc), a64, b64, np.zeros((m, n)), acc)


# Each broken use of SIMD-group matrices is reported; its twin passes.

GEMM_FAULTS = {"no_stage_barrier": 0, "no_reuse_barrier": 1, "a_stride_9": 2, "b_stride_16": 3}


def run_broken_gemm(lib, fault: str, **kwargs):
    m, n, k = 32, 64, 24
    rng = np.random.default_rng(23)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    lib.run("tiled_gemm_broken_f32", u32(GEMM_FAULTS[fault]), a, b, c, u32(m), u32(n), u32(k),
            **kwargs)
    return a, b, c


def test_tile_loaded_before_it_is_staged_is_reported(lib):
    # Lock-step rounds let every thread stage before any SIMD-group's load happens
    # (a load waits for its whole SIMD-group): the race needs a run-ahead schedule...
    run_broken_gemm(lib, "no_stage_barrier", schedules=LOCKSTEP)
    # ...where the unstaged part of the tile reaches the result as poison...
    _, _, c = run_broken_gemm(lib, "no_stage_barrier", schedules=[mh.Schedule("ahead")])
    assert np.isnan(c).any()
    with pytest.raises(mh.ScheduleDependent, match="SIMD-group that runs ahead"):
        run_broken_gemm(lib, "no_stage_barrier")
    # ...and the strict memory model alone sees the missing publication too.
    with pytest.raises(mh.ScheduleDependent, match="Only the memory model differs"):
        run_broken_gemm(lib, "no_stage_barrier",
                        schedules=[mh.Schedule("ahead"), mh.Schedule("ahead", memory="strict")])


def test_tile_restaged_before_every_simdgroup_loaded_it_is_reported(lib):
    run_broken_gemm(lib, "no_reuse_barrier", schedules=LOCKSTEP)
    with pytest.raises(mh.ScheduleDependent, match="SIMD-group that runs ahead"):
        run_broken_gemm(lib, "no_reuse_barrier")


def test_matrix_stored_to_threadgroup_memory_read_without_barrier_is_reported(lib):
    x = np.arange(128, dtype=np.float32)
    out = np.full(64, np.nan, np.float32)
    with pytest.raises(mh.ScheduleDependent, match="thread order differs"):
        lib.run("store_then_read_f32", x, out, u32(0))
    lib.run("store_then_read_f32", x, out, u32(1))
    np.testing.assert_array_equal(out, x[64:])


def test_tile_read_past_its_end_is_reported(lib):
    with pytest.raises(mh.KernelError) as err:
        run_broken_gemm(lib, "a_stride_9")
    msg = str(err.value)
    lines = (SELFTEST / "simdgroup_tiled_gemm.h").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "simdgroup_load(a_frag[i]" in text)
    assert f"simdgroup_load at {SELFTEST}/simdgroup_tiled_gemm.h:{line}:" in msg
    assert "of threadgroup buffer 0 (1024 bytes), outside it" in msg


def test_tile_read_with_a_wrong_row_length_gives_wrong_results(lib):
    a, b, c = run_broken_gemm(lib, "b_stride_16")  # in bounds and race-free...
    err = np.abs(c - a.astype(np.float64) @ b)
    assert err.max() > 1.0  # ...but not the product, which the twins match


def test_matrix_load_past_a_device_buffer_is_reported(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.full(64, np.nan, np.float32)
    with pytest.raises(mh.KernelError) as err:
        lib.run("strided_copy_f32", x, out, u32(9))
    msg = str(err.value)
    assert "simdgroup_load at " + site("bad_simdgroup_matrix.metal", "simdgroup_load(m, x, stride)") in msg
    assert "element (7, 1) of the 8x8 matrix is at byte offset 256 of device buffer 0" in msg
    lib.run("strided_copy_f32", x, out, u32(8))
    np.testing.assert_array_equal(out, x)


def test_lane_skipping_a_matrix_multiply_is_reported(lib):
    x = np.random.default_rng(24).standard_normal(64).astype(np.float32)
    out = np.full(64, np.nan, np.float32)
    with pytest.raises(mh.KernelError, match="different SIMD-group functions") as err:
        lib.run("lane_skips_f32", x, out, u32(64), u32(1))
    msg = str(err.value)
    assert "simdgroup_multiply_accumulate at " + site(
        "bad_simdgroup_matrix.metal", "simdgroup_multiply_accumulate(d, a, a, d)") in msg
    assert "threads 5 wait in simdgroup_store" in msg
    lib.run("lane_skips_f32", x, out, u32(64), u32(0))
    x64 = x.reshape(8, 8).astype(np.float64)
    assert_product_close(out.reshape(8, 8).astype(np.float64), x64, x64, np.ones((8, 8)), "f32")


@pytest.mark.parametrize(
    "entry, extra, error, message",
    [
        # 48 threads: SIMD-group 1 has 16 lanes.
        ("lane_skips_f32", (u32(48), u32(0)), mh.KernelError,
         r"SIMD-group 1, lane \d+\): simdgroup_load at .* need all 32 lanes"),
        # Even lanes pass x, odd lanes x + 64.
        ("nonuniform_pointer_f32", (), mh.KernelError, "must be the same in all lanes"),
        # Metal leaves a default-constructed matrix undefined; here it is poison.
        ("uninitialised_accumulator_f32", (), mh.ScheduleDependent, "Only the poison differs"),
    ],
    ids=["partial_simdgroup", "nonuniform_pointer", "uninitialised_accumulator"],
)
def test_matrix_misuse_is_reported(lib, entry, extra, error, message):
    x = np.ones(128, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(error, match=message):
        lib.run(entry, x, out, *extra)


def test_transposed_load_with_an_origin_is_refused(lib):
    x = np.arange(16 * 16, dtype=np.float32)
    out = np.full(64, np.nan, np.float32)
    with pytest.raises(mh.KernelError, match="does not define which layout the origin is in"):
        lib.run("transposed_origin_f32", x, out, u32(1))
    lib.run("transposed_origin_f32", x, out, u32(0))  # the pointer offset instead
    np.testing.assert_array_equal(out.reshape(8, 8), x.reshape(16, 16)[8:16, 0:8].T)


def test_fragments_written_with_a_wrong_layout_come_out_misplaced(lib):
    out = np.full(64, np.nan, np.float32)
    lib.run("fragment_wrong_layout_f32", out)
    assert not np.array_equal(out, np.arange(64, dtype=np.float32))  # fragment_layout's twin is


# ---- flushing float32 subnormals like an Apple GPU ------------------------------------


def test_flush_subnormals_mode_flushes_like_an_apple_gpu(lib):
    """Without the mode every probe gives the CPU's IEEE subnormal; with it, zero (float32
    and bfloat16 operands and results), while a half subnormal survives; and the mode
    ends with the launch (the Python process keeps IEEE subnormals)."""
    tiny = np.finfo(np.float32).tiny
    x = np.array([1e-20, 1e-40, -100.0, 1e-30, 2.0], np.float32)
    xb = np.array([0x0020], np.uint16)  # bfloat16 subnormal 2^-128
    xh = np.array([np.float16(2.0**-20)], np.float16)  # half subnormal
    assert 0 < x[1] < tiny and 0 < xh[0] < np.finfo(np.float16).tiny

    plain = np.full(8, np.nan, np.float32)
    lib.run("subnormal_probe_f32", x, xb, xh, plain, flush_subnormals=False)
    for i in (0, 1, 2, 4, 5):
        assert 0 < plain[i] < tiny, (i, plain)
    assert plain[3] == 0.0 and plain[6] == np.float32(2.0**-19) and plain[7] == 1.0, plain

    flushed = np.full(8, np.nan, np.float32)
    lib.run("subnormal_probe_f32", x, xb, xh, flushed, flush_subnormals=True)
    np.testing.assert_array_equal(flushed, [0, 0, 0, 0, 0, 0, np.float32(2.0**-19), 0])

    # Back to IEEE after the launch, in this thread.
    assert np.float32(1e-20) * np.float32(1e-20) > 0


def test_flush_subnormals_default_comes_from_the_environment(lib, monkeypatch):
    x = np.array([1e-20, 1e-40, -100.0, 1e-30, 2.0], np.float32)
    xb, xh = np.array([0x0020], np.uint16), np.array([np.float16(2.0**-20)], np.float16)
    out = np.full(8, np.nan, np.float32)
    monkeypatch.setenv(mh.FLUSH_SUBNORMALS_ENV, "1")
    lib.run("subnormal_probe_f32", x, xb, xh, out)
    assert out[0] == 0.0
    monkeypatch.setenv(mh.FLUSH_SUBNORMALS_ENV, "0")
    lib.run("subnormal_probe_f32", x, xb, xh, out)
    assert out[0] > 0.0


# ---- static address-space check ---------------------------------------------------


@needs_libclang
@pytest.mark.parametrize("path", DYNAMIC_SOURCES, ids=lambda p: p.name)
def test_static_check_accepts_valid_msl(path):
    result = static_check.check(path)
    assert result.ok, result.diagnostics


@needs_libclang
@pytest.mark.parametrize(
    "name, diagnostic",
    [
        (
            "static_reject_threadgroup_as_device.metal",
            "cannot pass pointer to address space '3' as a pointer to address space '1'",
        ),
        ("static_reject_constant_write.metal", "read-only variable is not assignable"),
        ("static_reject_double.metal", "double"),
        ("static_reject_exception.metal", "cannot use 'throw' with exceptions disabled"),
        ("static_reject_std_call.metal", "'std::': MSL has no C++ standard library"),
        ("static_reject_virtual.metal", "'virtual': MSL has no virtual functions"),
        ("static_reject_recursion.metal", "recursion (MSL has none): power(float, unsigned int)"),
        ("static_reject_mutable_global.metal", "mutable global 'calls_so_far'"),
        ("static_reject_simdgroup_load_constant.metal", "no matching function for call to 'simdgroup_load'"),
    ],
)
def test_static_check_rejects_what_msl_rejects(name, diagnostic):
    result = static_check.check(SELFTEST / name)
    assert not result.ok
    assert diagnostic in result.diagnostics
    assert f"selftest/{name}:" in result.diagnostics


def _marked_rules(name: str) -> list[tuple[int, str]]:
    """(line, message) of each `// REJECT: message` line of a self-test file."""
    lines = (SELFTEST / name).read_text().splitlines()
    return [(i, text.split("// REJECT: ", 1)[1].strip())
            for i, text in enumerate(lines, 1) if "// REJECT: " in text]


@needs_libclang
def test_static_check_rejects_each_msl_rule_a_cpp_compiler_accepts():
    """Every MSL rule of msl_rules.py (and the compiler flags standing in for the
    rest) on its own line of static_reject_msl_rules.metal: each line is reported,
    with its message, and nothing else is (the twins in ok_msl_rules.metal pass)."""
    name = "static_reject_msl_rules.metal"
    marked = _marked_rules(name)
    assert len(marked) >= 20
    result = static_check.check(SELFTEST / name)
    assert not result.ok
    prefix = f"tests/metal_host/selftest/{name}:"
    reported = [line for line in result.diagnostics.splitlines()
                if line.startswith(prefix) and ": error: " in line]
    for line, message in marked:
        at_line = [r for r in reported if r.startswith(f"{prefix}{line}:")]
        assert any(message in r for r in at_line), (line, message, at_line or result.diagnostics)
    marked_lines = {line for line, _ in marked}
    stray = [r for r in reported if int(r[len(prefix):].split(":")[0]) not in marked_lines]
    assert not stray, stray


@needs_libclang
def test_quantized_head_constants_live_in_constant_space(tmp_path):
    """The defect found by reading against the MSL specification: metal/quantized_head.h's
    static data members without
    `constant` (only reachable through an instantiation the IR never had). A copy of
    metal/ with the old declarations must fail the check; the real one passes
    (test_static_check_project_kernels)."""
    import shutil

    copy = tmp_path / "metal"
    shutil.copytree(REPO / "metal", copy)
    header = copy / "quantized_head.h"
    text = header.read_text()
    assert "static constexpr constant int kPerWord" in text
    header.write_text(text.replace("static constexpr constant", "static constexpr"))
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    result = static_check.check(copy / "linear_cross_entropy.metal", include_dirs=(tmp_path,))
    assert not result.ok
    assert "static data member 'kPerWord' not in the constant address space" in result.diagnostics
    assert "static data member 'kMask' not in the constant address space" in result.diagnostics


@needs_libclang
@pytest.mark.parametrize(
    "path",
    PROJECT_KERNELS or [pytest.param(None, marks=pytest.mark.skip(reason="no metal/*.metal yet"))],
    ids=lambda p: p.name if p else "none",
)
def test_static_check_project_kernels(path):
    result = static_check.check(path)
    assert result.ok, result.diagnostics


# ---- the metallib's compile options --------------------------------------------------


def test_metallib_options_are_explicit():
    """IEEE math, no FMA contraction (rounding like the CPU build's -ffp-contract=off)
    and Metal 3.1 are passed to mlx_build_metallib, not left to defaults."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    call = cmake[cmake.index("mlx_build_metallib(") :]
    call = call[: call.index(")\n")]
    options = call[call.index("COMPILE_OPTIONS") :].split("\n")[0].split()[1:]
    assert "-fno-fast-math" in options and "-std=metal3.1" in options, options
    assert "-ffp-contract=off" in options, options
    for path in PROJECT_KERNELS:  # bfloat16 kernels no longer depend on the version
        assert "__METAL_VERSION__ >= 310" not in path.read_text(), path


def test_kernels_refuse_a_metal_version_without_bfloat():
    with pytest.raises(mh.BuildError, match="need Metal 3.1"):
        mh.build(PROJECT_KERNELS, SELFTEST / "adaptor.cpp", defines=("__METAL_VERSION__=300",))
