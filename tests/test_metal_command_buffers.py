"""Command buffers of the Metal linear cross-entropy: the plan's work bound.

MLX commits a stream's command buffer only between primitives, so the linear
CE's eval_gpu commits its own at the segment boundaries of the plan
(csrc/metal/launch_plan.h: lce_plan's forward_rows and chunk_rows caps,
lce_schedule's segments; csrc/metal/host.h: gpu::CommandBuffers). Here, on any
machine, through the harness build of launch_plan.cpp: the rules at their
thresholds (+-1), every segment within the bound at the 7B head shape (N 8192,
H 4096, V 151936: ~31 TFLOP of backward, one command buffer of ~12 s on a base
M1 before) and at larger ones, and the kernels run in bounded launches (several
forward launches from row0, capped chunks) still agree with the CPU primitive.
What only a Mac can show (the commits themselves, the watchdog) is in
docs/metal.md.
"""

from __future__ import annotations

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)]

from test_metal_linear_cross_entropy import BM, BN, FAST, check_case, check_fused, plan_info  # noqa: E402

BOUND = 2**40  # kLceMaxBufferFlops
KERNELS = ["forward", "finish", "sum", "dz", "dbias", "dh", "dw", "logits", "rows"]  # LceKernel
GEMMS = {"forward", "dz", "logits", "dh", "dw"}


@pytest.fixture(scope="module")
def lib():
    return mh.build(["metal/linear_cross_entropy.metal", "metal/pointwise_loss.metal"],
                    "tests/metal_kernels/lce_adaptor.cpp", include_dirs=("csrc",))


def schedule(lib, rows, vocab, hidden, chunk_bytes=64 << 20, bound=BOUND, forward=True,
             sum_rows=False, dh=True, dw=True, dbias=False):
    cap = 1 << 16
    plan = np.zeros(3, np.int64)
    out = np.zeros(5 * cap, np.int64)
    count = np.zeros(1, np.int64)
    lib.run("lce_schedule_info", np.int64(rows), np.int32(vocab), np.int32(hidden),
            np.int64(chunk_bytes), np.int64(bound), np.int32(forward), np.int32(sum_rows),
            np.int32(dh), np.int32(dw), np.int32(dbias), plan, out, np.int64(cap), count,
            schedules=(mh.Schedule(),))
    launches = [dict(kernel=KERNELS[k], row0=int(r0), rows=int(n), flops=int(f), segment=int(s))
                for k, r0, n, f, s in out[: 5 * int(count[0])].reshape(-1, 5)]
    return dict(zip(["forward_rows", "chunk_rows", "splits"], map(int, plan))), launches


def expected_flops(kernel, rows, vocab, hidden, splits):
    """The work lce_launch_flops counts, written out independently."""
    if kernel in GEMMS:
        return rows * vocab * (2 * hidden + 1)
    return rows * {"dbias": vocab, "rows": vocab, "finish": splits, "sum": 1}[kernel]


def segments(launches):
    out = {}
    for l in launches:
        out.setdefault(l["segment"], []).append(l)
    assert list(out) == list(range(len(out))), "segments are numbered in order"
    return list(out.values())


def check_segments(launches, bound):
    """Greedy and bounded: a segment is within the bound or is one launch, and the
    next segment's first launch would have taken it past the bound."""
    segs = segments(launches)
    for i, seg in enumerate(segs):
        work = sum(l["flops"] for l in seg)
        assert work <= bound or len(seg) == 1, (i, work)
        if i + 1 < len(segs):
            assert work + segs[i + 1][0]["flops"] > bound
    return segs


# ---- lce_plan: rows per launch at the bound's thresholds --------------------------------

V, H = 777, 16
ROW = V * (2 * H + 1)  # work of one row of a GEMM launch


@pytest.mark.parametrize("fit", [1, BM - 1, BM, BM + 1, 2 * BM - 1, 2 * BM, 2 * BM + 1, 1000])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_rows_per_launch_at_the_bound(lib, fit, extra):
    bound = fit * ROW + extra  # floor(bound / ROW) = fit, or fit - 1 just below
    f = bound // ROW
    rows = 5000
    p, _ = schedule(lib, rows, V, H, chunk_bytes=1 << 40, bound=bound)
    assert p["forward_rows"] == max(BM, f // BM * BM)
    # the chunk: the work cap binds (chunk_bytes is huge), then the BM rounding
    assert p["chunk_rows"] == (f // BM * BM if f > BM else max(f, 1))
    # the bytes cap still binds when it is the smaller
    p, _ = schedule(lib, rows, V, H, chunk_bytes=4 * V * 40, bound=bound)
    r = min(40, max(f, 1))
    assert p["chunk_rows"] == (r // BM * BM if r > BM else r)


def test_rows_per_launch_never_exceed_n(lib):
    # F = 10 rows: a forward launch is one row block (BM rows) or N if fewer
    for rows, fwd in ((1, [1]), (BM - 1, [BM - 1]), (BM, [BM]), (BM + 1, [BM, 1])):
        p, launches = schedule(lib, rows, V, H, bound=10 * ROW, dh=False, dw=False)
        assert p["forward_rows"] == min(rows, BM) and p["chunk_rows"] == min(rows, 10)
        assert [l["rows"] for l in launches if l["kernel"] == "forward"] == fwd


def test_forward_launches_cover_the_rows_in_order(lib):
    rows = 1000
    p, launches = schedule(lib, rows, V, H, bound=100 * ROW, dh=False, dw=False)
    launch_rows = 100 // BM * BM
    assert p["forward_rows"] == launch_rows
    fwd = [l for l in launches if l["kernel"] == "forward"]
    assert [l["row0"] for l in fwd] == list(range(0, rows, launch_rows))
    assert sum(l["rows"] for l in fwd) == rows and all(l["row0"] % BM == 0 for l in fwd)
    assert [l["kernel"] for l in launches[len(fwd):]] == ["finish"]
    # S counts the row blocks of one launch, not of all N rows: ceil(512 / blocks)
    # wanted, capped by the vocabulary's tiles
    blocks, tiles = -(-launch_rows // BM), -(-V // BN)
    assert p["splits"] == min(-(-512 // blocks), tiles, 64)


def test_splits_follow_the_launch_rows(lib):
    # 64 row blocks in all; in launches of 2 blocks S = min(ceil(512 / 2), tiles, 64)
    rows, vocab = 64 * BM, 4096
    row = vocab * (2 * H + 1)
    p_one, _ = schedule(lib, rows, vocab, H, bound=rows * row)
    p_two, _ = schedule(lib, rows, vocab, H, bound=2 * BM * row)
    assert p_one["forward_rows"] == rows and p_one["splits"] == 8  # ceil(512 / 64)
    assert p_two["forward_rows"] == 2 * BM and p_two["splits"] == 64


# ---- lce_schedule: segments at their thresholds ------------------------------------------


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_segments_at_the_bound(lib, extra):
    # Backward only, dW: per chunk dZ and dW of R rows each, 2 R ROW of work.
    rows, R = 4 * 64, 64
    pair = 2 * R * ROW
    p, launches = schedule(lib, rows, V, H, chunk_bytes=4 * V * R, bound=pair + extra,
                           forward=False, dh=False)
    assert p["chunk_rows"] == R
    assert [l["kernel"] for l in launches] == ["dz", "dw"] * 4
    assert all(l["flops"] == R * ROW for l in launches)
    segs = check_segments(launches, pair + extra)
    # at the bound or above: one chunk per buffer; one below: one launch per buffer
    assert [len(s) for s in segs] == ([1] * 8 if extra < 0 else [2] * 4)


def test_segments_hold_whole_runs_up_to_the_bound(lib):
    rows, R = 10 * 64, 64
    launch = R * ROW
    for k in range(1, 7):  # k launches fit exactly, k + 1 do not
        _, launches = schedule(lib, rows, V, H, chunk_bytes=4 * V * R, bound=k * launch,
                               forward=False, dh=False)
        segs = check_segments(launches, k * launch)
        assert [len(s) for s in segs[:-1]] == [k] * (len(segs) - 1)


def test_schedule_order_and_work(lib):
    p, launches = schedule(lib, 100, V, H, chunk_bytes=4 * V * 40, bound=BOUND, sum_rows=True,
                           dbias=True)
    r = 40 // BM * BM if 40 > BM else 40
    assert p["chunk_rows"] == r
    kinds = [l["kernel"] for l in launches]
    # a forward with gradients: the stored-Z path, no forward tiles, no Z recomputed
    assert kinds == ["logits", "rows", "dbias", "dh", "dw"] * -(-100 // r) + ["sum"]
    assert [l["row0"] for l in launches if l["kernel"] == "logits"] == list(range(0, 100, r))
    assert [l["rows"] for l in launches if l["kernel"] == "rows"] == [min(r, 100 - r0) for r0 in range(0, 100, r)]
    for l in launches:
        assert l["flops"] == expected_flops(l["kernel"], l["rows"], V, H, p["splits"])
    assert {l["segment"] for l in launches} == {0}  # tiny: one buffer, as before
    # the forward alone, and the backward alone (called later: Z recomputed)
    _, fwd = schedule(lib, 100, V, H, chunk_bytes=4 * V * 40, sum_rows=True, dh=False, dw=False)
    assert [l["kernel"] for l in fwd] == ["forward", "finish", "sum"]
    _, bwd = schedule(lib, 100, V, H, chunk_bytes=4 * V * 40, forward=False, dbias=True)
    assert [l["kernel"] for l in bwd] == ["dz", "dbias", "dh", "dw"] * -(-100 // r)
    assert [l["row0"] for l in bwd if l["kernel"] == "dz"] == list(range(0, 100, r))
    for l in fwd + bwd:
        assert l["flops"] == expected_flops(l["kernel"], l["rows"], V, H, p["splits"])


def test_no_rows(lib):
    _, launches = schedule(lib, 0, V, H, sum_rows=True, dbias=True)
    assert [l["kernel"] for l in launches] == ["logits", "rows", "dbias", "dh", "dw", "sum"]
    assert all(l["rows"] == 0 and l["segment"] == 0 for l in launches)


# ---- the 7B head's shape and larger: every buffer within the bound --------------------------


@pytest.mark.parametrize("rows,hidden,vocab,chunk_bytes", [
    (8192, 4096, 151936, 64 << 20),  # the 7B head at the default chunk
    (8192, 4096, 151936, 1 << 30),  # the GPU's recommended larger chunk
    (65536, 8192, 256000, 4 << 30),
    (10**6, 2048, 32000, 64 << 20),
])
def test_every_command_buffer_is_bounded(lib, rows, hidden, vocab, chunk_bytes):
    p, launches = schedule(lib, rows, vocab, hidden, chunk_bytes=chunk_bytes, sum_rows=True,
                           dbias=True)
    segs = check_segments(launches, BOUND)
    work = [sum(l["flops"] for l in s) for s in segs]
    assert max(work) <= BOUND  # no single launch is above it at these shapes
    total = sum(work)
    # the stored-Z step: logits, dH, dW: 6 NVH (+ the per-logit epilogues counted with them)
    nvh = rows * vocab * hidden
    assert 6 * nvh < total < 6 * nvh * 1.01
    assert len(segs) >= total / BOUND
    # greedy packing: fewer than twice the minimum number of buffers
    assert len(segs) < 2 * total / BOUND + 1
    if (rows, hidden, vocab) == (8192, 4096, 151936):
        # once one command buffer of 8 NVH = 41 TFLOP (~16 s at a base M1's 2.6 TFLOP/s);
        # the step is now 6 NVH = 31 TFLOP
        assert p["forward_rows"] == BOUND // (vocab * (2 * hidden + 1)) // BM * BM
        assert total > 27 * BOUND
        assert not [l for l in launches if l["kernel"] == "forward"]
        _, fwd = schedule(lib, rows, vocab, hidden, chunk_bytes=chunk_bytes, dh=False, dw=False)
        assert len([l for l in fwd if l["kernel"] == "forward"]) == 10


def test_a_row_block_above_the_bound_is_alone(lib):
    # V H > 2^34: one forward row block (BM rows) is more than 2^40 of work; the
    # bound cannot hold for it, and it is the only launch of its buffer.
    rows, hidden, vocab = 2 * BM, 1 << 15, 1 << 20
    p, launches = schedule(lib, rows, vocab, hidden, dh=False, dw=False)
    assert p["forward_rows"] == BM
    fwd = [l for l in launches if l["kernel"] == "forward"]
    assert len(fwd) == 2 and all(l["flops"] > BOUND for l in fwd)
    segs = check_segments(launches, BOUND)
    assert [len(s) for s in segs] == [1, 1, 1]  # a buffer already past the bound takes no more


# ---- the kernels in bounded launches ---------------------------------------------------


@pytest.fixture
def small_bound(lib):
    """A bound of a few rows of work: several forward launches (from row0), and
    chunks capped below chunk_bytes, at the harness's small shapes."""
    def set_bound(rows_of_work, vocab, hidden):
        lib.run("lce_set_max_buffer_flops", np.int64(rows_of_work * vocab * (2 * hidden + 1)),
                schedules=(mh.Schedule(),))
    yield set_bound
    lib.run("lce_set_max_buffer_flops", np.int64(BOUND), schedules=(mh.Schedule(),))


@pytest.mark.parametrize("case_name", ["plain", "smooth_ignore_bias_sum", "others_z_cap"])
def test_kernels_in_bounded_launches_match_the_cpu(lib, small_bound, case_name):
    n, h, v = 129, 23, 70
    small_bound(40, v, h)  # forward launches of max(BM, 40 // BM * BM) rows, chunks of <= 40
    p = plan_info(lib, n, v, h, 1 << 30)
    assert p["chunk_rows"] == (40 // BM * BM if 40 > BM else 40)
    _, launches = schedule(lib, n, v, h, chunk_bytes=1 << 30, bound=40 * v * (2 * h + 1), dh=False,
                           dw=False)
    launch_rows = max(BM, 40 // BM * BM)
    assert [l["row0"] for l in launches if l["kernel"] == "forward"] == list(range(0, n, launch_rows))
    check_case(lib, case_name, n, h, v, "float32", "float32", 1 << 30, FAST, seed=17)
    check_fused(lib, case_name, n, h, v, "float32", "float32", 1 << 30, FAST, seed=18)
