"""The fused linear cross-entropy's Metal kernels (metal/linear_cross_entropy.metal)
on the CPU harness (tests/metal_host).

Every instantiation (hidden dtype x dense weight dtype; forward tiles, finish,
dZ, dH, dW, dbias, scale) runs through the launch plans eval_gpu uses
(csrc/metal/launch_plan.cpp, via tests/metal_kernels/lce_adaptor.cpp, which
replays eval_gpu's dispatch sequence) on small odd shapes at the tile edges
(BM x BN rows / classes, BK hidden: csrc/metal/kernel_args.h), and is compared with the
package's CPU primitive (mlx_fused_losses._ext on mx.cpu) and with the float64
composed formula (tests/reference.py). Each launch runs under the harness's
schedules and its outputs and temporaries must agree bit for bit.

Harness time: each GPU thread is a fiber; the cases under all seven default
schedules are the option cases at float32 and one mixed-dtype case (the
schedules check the tile code, which is the same for every dtype); the other
dtype pairs run under two schedules (forward order and the strict memory model).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import metal_host as mh
import reference as ref
from conftest import CLANG_MISSING, EPS32, SCALE_ULPS, assert_close

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)]

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402

from test_linear_cross_entropy import gradient_bounds, logit_scale  # noqa: E402
from metal_host.kernel_names import kernel_names  # noqa: E402
from test_metal_kernels import DT_CODE, MX_DT, SENTINEL, as_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METAL = ["metal/linear_cross_entropy.metal", "metal/pointwise_loss.metal"]
ADAPTOR = "tests/metal_kernels/lce_adaptor.cpp"
DTYPES = ["float32", "float16", "bfloat16"]


def _tile_constant(name: str) -> int:
    """A tile constant as csrc/metal/kernel_args.h defines it (the plans and kernels use it)."""
    text = (REPO / "csrc" / "metal" / "kernel_args.h").read_text()
    return int(re.search(rf"#define {name} (\d+)", text).group(1))


BM, BN, BK, THREADS = (_tile_constant(f"FL_LCE_{n}") for n in ("BM", "BN", "BK", "THREADS"))
FAST = (mh.Schedule("forward"), mh.Schedule("ahead", memory="strict"))
USED: set[str] = set()
# Every format of mx.quantize (metal/quantized_head.h): affine q<bits>_<scale
# dtype>, and the floating-point modes (uint8 scales, one head each).
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
FP_MODES = ("mxfp4", "mxfp8", "nvfp4")
QUANTIZED_HEADS = ([f"q{bits}_{d}" for bits in AFFINE_BITS for d in DTYPES] + list(FP_MODES)
                   + ["nvfp4_global"])


def is_quantized_kernel(name: str) -> bool:
    """A kernel of a quantized head: fl_lce_dh_<head>, fl_lce_<fwd|dz>_<hidden>_<head>_<tile>."""
    return name.split("_bm")[0].endswith(tuple(QUANTIZED_HEADS))


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


# ---- plans -------------------------------------------------------------------------------


def plan_info(lib, rows, vocab, hidden, chunk_bytes=64 << 20):
    out = np.zeros(5, np.int64)
    lib.run("lce_plan_info", np.int64(rows), np.int32(vocab), np.int32(hidden),
            np.int64(chunk_bytes), out, schedules=(mh.Schedule(),))
    return dict(zip(["row_blocks", "vocab_tiles", "splits", "vocab_per_split", "chunk_rows"],
                    map(int, out)))


def launch_info(lib, which, rows=1, vocab=1, hidden=1, hdt="float32", wdt="float32",
                chunk_bytes=64 << 20, chunk_rows=1, max_threads=1024):
    out = np.zeros(8, np.uint32)
    name = np.zeros(512, np.uint8)
    lib.run("lce_launch_info", np.int32(which), np.int32(DT_CODE[hdt]), np.int32(DT_CODE[wdt]),
            np.int64(rows), np.int32(vocab), np.int32(hidden), np.int64(chunk_bytes),
            np.int64(chunk_rows), np.int32(max_threads), out, name, schedules=(mh.Schedule(),))
    kernel, *buffers = bytes(name).split(b"\0")[0].decode().split(",")
    info = dict(zip(["gx", "gy", "gz", "tx", "ty", "tz", "tg_bytes", "nbuf"], map(int, out)))
    info.update(name=kernel, buffers=buffers)
    return info


def host_names() -> set[str]:
    """The kernel names the .metal files define (derived from the sources after
    preprocessing: metal_host/kernel_names.py)."""
    return kernel_names(METAL[:1])


def test_kernel_table_is_the_sources_names(lib):
    buf = np.zeros(1 << 16, np.uint8)
    lib.run("mh_kernel_names", buf, np.uint32(buf.size), schedules=(mh.Schedule(),))
    assert set(bytes(buf).split(b"\0")[0].decode().split()) == kernel_names(METAL)


def expected_forward_rows(rows, vocab, hidden, bound=2**40):
    """Rows of one forward tile launch (launch_plan.h, work per launch)."""
    per_row = vocab * (2 * hidden + 1)
    fit = bound // per_row if per_row else rows
    fwd = max(BM, fit // BM * BM)
    return min(fwd, rows) if rows else 1


def expected_splits(rows, vocab, hidden=64):
    """lce_plan's rule (launch_plan.h), written out independently."""
    blocks = -(-expected_forward_rows(rows, vocab, hidden) // BM) if rows else 0
    tiles = max(-(-vocab // BN), 1)
    want = -(-512 // blocks) if blocks else 1
    s = min(max(want, 1), min(tiles, 64))
    per = -(-tiles // s) * BN
    return -(-vocab // per), per


# Thresholds of the rules: row blocks where ceil(512 / B) crosses the vocabulary's
# tile count or the 64-split cap (B = 8 -> 64, B = 9 -> 57), the vocabulary's tile
# edges, and the chunk rows at the BM rounding and at N. At 10**6 rows and V =
# 151936 the forward runs in launches of 56096 rows (2^40 / (V (2 64 + 1))): S
# counts their row blocks (test_metal_command_buffers.py has that rule's edges).
@pytest.mark.parametrize("rows", [0, 1, BM * 8 - 1, BM * 8, BM * 8 + 1, BM * 9, BM * 16 + 1, BM * 512,
                                  BM * 512 + 1, 10**6])
@pytest.mark.parametrize("vocab", [1, BN - 1, BN, BN + 1, BN * 57, BN * 64 - 1, BN * 64, BN * 64 + 1,
                                   151936])
def test_plan_split_rules(lib, rows, vocab):
    p = plan_info(lib, rows, vocab, 64)
    splits, per = expected_splits(rows, vocab)
    assert (p["splits"], p["vocab_per_split"]) == (splits, per)
    assert p["vocab_per_split"] % BN == 0 and 1 <= p["splits"] <= 64
    assert (p["splits"] - 1) * p["vocab_per_split"] < vocab <= p["splits"] * p["vocab_per_split"]
    fwd = launch_info(lib, 0, rows, vocab, 64)
    assert (fwd["gx"], fwd["gy"], fwd["tx"]) == (splits if rows else 0, -(-rows // BM), THREADS)


@pytest.mark.parametrize("fit", [1, 2, BM - 1, BM, BM + 1, 2 * BM - 1, 2 * BM, 2 * BM + 1, 1000])
@pytest.mark.parametrize("rows", [1, BM - 1, BM, BM + 1, 2 * BM, 2 * BM + 1, 5000])
def test_plan_chunk_rules(lib, fit, rows):
    vocab = 777
    for extra in (0, 4 * vocab - 1):  # chunk_bytes // (4 V) == fit either way
        p = plan_info(lib, rows, vocab, 16, chunk_bytes=fit * 4 * vocab + extra)
        r = min(fit, rows)
        assert p["chunk_rows"] == (r // BM * BM if r > BM else r)
    assert plan_info(lib, rows, vocab, 16, chunk_bytes=4 * vocab - 1)["chunk_rows"] == 1


def test_plan_buffer_orders_and_grids(lib):
    assert launch_info(lib, 0)["buffers"] == ["hidden", "weight", "scales", "qbiases", "targets",
                                              "bias", "partials", "target_logit", "args",
                                              "argmax_partials"]
    assert launch_info(lib, 1)["buffers"] == ["partials", "target_logit", "targets", "loss", "lse",
                                              "lse_lo", "correct", "entropy", "args",
                                              "argmax_partials", "argmax", "target_out"]
    assert launch_info(lib, 2)["buffers"] == ["hidden", "weight", "scales", "qbiases", "targets",
                                              "bias", "lse", "lse_lo", "g", "dz", "args"]
    assert launch_info(lib, 3)["buffers"] == ["dz", "weight", "scales", "qbiases", "dh", "args"]
    assert launch_info(lib, 4)["buffers"] == ["dz", "hidden", "dw", "args"]
    assert launch_info(lib, 5)["buffers"] == ["dz", "dbias", "args"]
    assert launch_info(lib, 6)["buffers"] == ["g", "src", "out", "args"]
    dz = launch_info(lib, 2, rows=100, vocab=2 * BN + 1, hidden=7, chunk_rows=BM + 1)
    assert (dz["gx"], dz["gy"], dz["tx"], dz["name"]) == (  # row blocks first
        2, 3, THREADS, f"fl_lce_dz_float32_wfloat32_bm{BM}_bn{BN}_bk{BK}_wm2_wn2")
    dh = launch_info(lib, 3, rows=100, vocab=65, hidden=BN + 1, chunk_rows=BM, wdt="bfloat16")
    assert (dh["gx"], dh["gy"], dh["name"]) == (2, 1, "fl_lce_dh_wbfloat16")
    dw = launch_info(lib, 4, rows=100, vocab=2 * BM + 1, hidden=BN + 1, hdt="float16")
    assert (dw["gx"], dw["gy"], dw["name"]) == (2, 3, "fl_lce_dw_float16")
    fin = launch_info(lib, 1, rows=300)
    assert fin["gx"] * fin["tx"] >= 300 and fin["tx"] == 256
    db = launch_info(lib, 5, vocab=33)
    assert (db["gx"], db["tx"]) == (1, 64)


# MLX's tile per device class for the logits GEMM (mlx/backend/metal/matmul.cpp,
# GEMM_TPARAM_MACRO; launch_plan.h lce_forward_tile), written out here independently.
def mlx_nt_tile(device_class, hdt, wdt, rows, vocab, hidden):
    sixteen = hdt == wdt != "float32"
    if device_class in "gp":
        return "bm64_bn32_bk32_wm2_wn2"
    if device_class == "d" and sixteen:
        return "bm64_bn64_bk16_wm1_wn2" if 2 * max(rows, vocab) > hidden else "bm64_bn32_bk32_wm2_wn2"
    return "bm64_bn64_bk16_wm2_wn2"


@pytest.fixture
def device_class(lib):
    def set_class(c):
        lib.run("lce_set_device_class", np.int32(ord(c)), schedules=(mh.Schedule(),))
    yield set_class
    set_class("s")


@pytest.mark.parametrize("dc", ["p", "g", "s", "d"])
@pytest.mark.parametrize("hdt", DTYPES)
@pytest.mark.parametrize("wdt", DTYPES)
def test_forward_tile_per_device_class(lib, device_class, dc, hdt, wdt):
    device_class(dc)
    for rows, vocab, hidden in ((100, 1000, 64), (8192, 151936, 4096), (4, 8, 4096)):
        d = dict(hdt=hdt, wdt=wdt, n=rows, v=vocab, h=hidden)
        assert tile_name(lib, d) == mlx_nt_tile(dc, hdt, wdt, rows, vocab, hidden), (rows, vocab, hidden)


@pytest.mark.parametrize("dc", ["g", "d"])
@pytest.mark.parametrize("hdt,wdt", [(a, b) for a in DTYPES for b in DTYPES])
def test_every_device_class_tile_matches_the_cpu(lib, device_class, dc, hdt, wdt):
    """The forward and dZ kernels in the small devices' 64 x 32 x 32 tile and the largest
    devices' 16-bit 64 x 64 x 16 tile of 1 x 2 SIMD-groups (64 threads) against the CPU
    primitive and float64 (the default tile: the cases above)."""
    device_class(dc)
    case = "others_z_cap" if DT_CODE[hdt] <= DT_CODE[wdt] else "smooth_ignore_bias_sum"
    check_case(lib, case, 67, 37, 70, hdt, wdt, 4 * 70 * 33, FAST, seed=DT_CODE[hdt] * 3 + DT_CODE[wdt] + ord(dc))


@pytest.mark.parametrize("limit", [127, 128, 129, 256, 640])
def test_plans_under_the_pipeline_limit(lib, limit):
    """Every GEMM group is 128 threads: a pipeline limit below it is refused
    (127 rounds down to 96 usable threads); element-wise plans fit any limit."""
    for which in range(7):
        if limit < 128 and which in (0, 2, 3, 4):
            with pytest.raises(mh.HarnessError, match="128 threads"):
                launch_info(lib, which, rows=40, vocab=70, hidden=20, chunk_rows=40,
                            max_threads=limit)
            continue
        p = launch_info(lib, which, rows=4000, vocab=7000, hidden=20, chunk_rows=40,
                        max_threads=limit)
        assert p["tx"] * p["ty"] * p["tz"] <= limit // 32 * 32


# ---- the kernels ----------------------------------------------------------------------------

CASES = {  # reduction "none" unless sum: per-row losses; sum: the fused sum over rows
    "plain": dict(ls=0.0, mode="uniform", ignore=None, z=0.0, cap=None, bias=False, sum=False),
    "smooth_ignore_bias_sum": dict(ls=0.1, mode="uniform", ignore=-100, z=0.0, cap=None, bias=True,
                                   sum=True),
    "others_z_cap": dict(ls=0.2, mode="others", ignore=3, z=1e-3, cap=4.0, bias=True, sum=False),
    "cap_z_sum": dict(ls=0.0, mode="uniform", ignore=None, z=1e-2, cap=2.0, bias=False, sum=True),
}


def make_case(rng, n, h, v, hdt, wdt, case, bad_rows=True):
    """Rounded inputs (device arrays and float32 values) with awkward rows."""
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(max(h, 1))).astype(np.float32)
    t = rng.integers(0, v, n).astype(np.int64)
    for r in range(min(n, 6)):  # peaked rows: the target's logit (and another) x20
        norm = max(float(hid[r] @ hid[r]), 1e-6)
        w[t[r]] += 20 * hid[r] / norm
        w[(t[r] + 1) % v] += 10 * hid[r] / norm
    if case["ignore"] is not None and n > 2:
        t[2::5] = case["ignore"]
    if bad_rows and n > 4:
        t[3] = v  # out of range: NaN row
        t[-1] = -7 if case["ignore"] != -7 else -8
    bias = (rng.standard_normal(v) if case["bias"] else np.zeros(1)).astype(np.float32)
    hd, hr = as_device(hid, hdt)
    wd, wr = as_device(w, wdt)
    return dict(hd=hd, hr=hr, wd=wd, wr=wr, t=t, bias=bias, n=n, h=h, v=v, hdt=hdt, wdt=wdt)


def options(case):
    mode = 0 if case["mode"] == "uniform" else 1
    has_ig = case["ignore"] is not None
    return (np.float32(case["ls"]), np.int32(mode), np.int32(has_ig),
            np.int64(case["ignore"] if has_ig else -100), np.float32(case["z"]),
            np.float32(case["cap"] or 0.0), np.int32(case["bias"]))


def head_name(d):
    """The head eval_gpu picks: w<dtype>, or q<bits>_<scale dtype> / the mode
    for a quantized weight (d["q"], made by tests/test_metal_quantized_head.py)."""
    q = d.get("q")
    if not q:
        return f"w{d['wdt']}"
    if q["mode"] == "affine":
        return f"q{q['bits']}_{q['sdt']}"
    return q["mode"] + ("_global" if q.get("global_scale") is not None else "")


def head_run_args(d):
    """(entry suffix, leading arguments) of lce_forward_run / lce_backward_run, or
    of their _q forms, which take the packed weight, its scales and biases."""
    q = d.get("q")
    if q is None:
        return "", (np.int32(DT_CODE[d["hdt"]]), np.int32(DT_CODE[d["wdt"]]), d["hd"], d["wd"])
    return "_q", (np.int32(DT_CODE[d["hdt"]]), np.int32(QUANT_MODE_CODE[q["mode"]]),
                  np.int32(q.get("global_scale") is not None), np.int32(q["bits"]), np.int32(q["group_size"]),
                  np.int32(DT_CODE.get(q["sdt"], 0)), d["hd"], q["w_q"], q["scales"], q["biases"])


# flm::kQuant* (csrc/math/quantized.h)
QUANT_MODE_CODE = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}


def tile_name(lib, d):
    """The forward tile eval_gpu's plan takes for this case (under lce_set_device_class)."""
    out = np.zeros(64, np.uint8)
    lib.run("lce_tile_name", np.int32(DT_CODE[d["hdt"]]),
            np.frombuffer(head_name(d).encode() + b"\0", np.uint8).copy(), np.int64(d["n"]),
            np.int32(d["v"]), np.int32(d["h"]), out, np.int32(out.size), schedules=(mh.Schedule(),))
    return bytes(out).split(b"\0")[0].decode()


def gpu_forward(lib, d, case, chunk_bytes, schedules):
    n, v, h = d["n"], d["v"], d["h"]
    p = plan_info(lib, n, v, h, chunk_bytes)
    # room for the most splits any forward tile can take (kLceMaxSplits = 64)
    partials = np.full(max(max(p["splits"], 64) * n * 4, 4), SENTINEL, np.float32)
    target_logit = np.full(max(n, 1), SENTINEL, np.float32)
    row_loss = np.full(max(n, 1), SENTINEL, np.float32)
    loss = np.full(1 if case["sum"] else max(n, 1), SENTINEL, np.float32)
    lse, lse_lo, entropy = (np.full(max(n, 1), SENTINEL, np.float32) for _ in range(3))
    correct = np.full(max(n, 1), 7, np.uint8)
    argmax_partials = np.full(max(max(p["splits"], 64) * n * 2, 2), 0xDEADBEEF, np.uint32)
    argmax = np.full(max(n, 1), -7, np.int64)
    target_out = np.full(max(n, 1), SENTINEL, np.float32)
    suffix, head = head_run_args(d)
    lib.run("lce_forward_run" + suffix, *head, d["t"], d["bias"], partials, target_logit, row_loss,
            loss, lse, lse_lo, correct, entropy, np.int64(n), np.int32(v), np.int32(h),
            np.int64(chunk_bytes), np.int32(case["sum"]), *options(case), argmax_partials, argmax,
            target_out, schedules=schedules)
    USED.add(f"fl_lce_fwd_{d['hdt']}_{head_name(d)}_{tile_name(lib, d)}")
    USED.add("fl_lce_fwd_finish")
    k = slice(0, n)
    return dict(loss=loss if case["sum"] else loss[k], lse=lse[k], lse_lo=lse_lo[k],
                correct=correct[k], entropy=entropy[k], argmax=argmax[k], target_logit=target_out[k])


def gpu_backward(lib, d, case, lse, lse_lo, g, chunk_bytes, want, schedules):
    n, v, h = d["n"], d["v"], d["h"]
    p = plan_info(lib, n, v, h, chunk_bytes)
    dz = np.full(max(p["chunk_rows"] * v, 1), SENTINEL, np.float32)
    dh = np.full((max(n, 1), max(h, 1)), SENTINEL, np.float32)
    dw = np.full((v, max(h, 1)), SENTINEL, np.float32)
    db = np.full(v, SENTINEL, np.float32)
    unit = g is None
    suffix, head = head_run_args(d)
    lib.run("lce_backward_run" + suffix, *head, d["t"], d["bias"], lse, lse_lo,
            np.ones(1, np.float32) if unit else g,
            np.int32(unit), dz, dh, dw, db, np.int32("hidden" in want), np.int32("weight" in want),
            np.int32("bias" in want), np.int64(n), np.int32(v), np.int32(h), np.int64(chunk_bytes),
            *options(case), schedules=schedules)
    USED.add(f"fl_lce_dz_{d['hdt']}_{head_name(d)}_{tile_name(lib, d)}")
    if "hidden" in want:
        USED.add(f"fl_lce_dh_{head_name(d)}")
    if "weight" in want:
        USED.add(f"fl_lce_dw_{d['hdt']}")
    if "bias" in want:
        USED.add("fl_lce_dbias")
    return dict(hidden=dh[:n, :h], weight=dw[:, :h], bias=db)


def cpu_primitive(d, case, g=None):
    """The CPU primitive on the same rounded inputs: outputs, and the gradients
    for the per-row cotangent g (None: forward only)."""
    hm = mx.array(d["hr"]).astype(MX_DT[d["hdt"]])
    q = d.get("q")
    wm = q["mx"][0] if q else mx.array(d["wr"]).astype(MX_DT[d["wdt"]])
    tm = mx.array(d["t"])
    bm = mx.array(d["bias"]) if case["bias"] else None
    kw = dict(label_smoothing=case["ls"], label_smoothing_mode=case["mode"],
              ignore_index=case["ignore"], z_loss=case["z"], logit_softcap=case["cap"],
              sum_rows=case["sum"], stream=mx.cpu)
    if q:  # the packed weight is a constant: no gradient
        kw.update(scales=q["mx"][1], biases=q["mx"][2], group_size=q["group_size"], bits=q["bits"],
                  mode=q["mode"], global_scale=q.get("global_scale"))
    outs = ext.linear_cross_entropy(hm, wm, tm, bm, **kw)
    mx.eval(outs)
    res = [np.array(o.astype(mx.float32)) if o.dtype != mx.bool_ else np.array(o) for o in outs]
    if g is None:
        return res, None
    names = ["hidden"] + ([] if q else ["weight"]) + (["bias"] if case["bias"] else [])
    primals = [{"hidden": hm, "weight": wm, "bias": bm}[k] for k in names]

    def f(*p):
        x = dict(zip(names, p))
        return ext.linear_cross_entropy(x["hidden"], x.get("weight", wm), tm, x.get("bias"),
                                        **dict(kw, sum_rows=False))[0]

    _, grads = mx.vjp(f, primals, [mx.array(g)])
    return res, {k: np.array(v.astype(mx.float32)) for k, v in zip(names, grads)}


def reference64(d, case, g):
    bias = d["bias"] if case["bias"] else None
    t = d["t"]
    # The reference knows no out-of-range index: those rows are checked separately.
    oob = ((t < 0) | (t >= d["v"])) & (t != (case["ignore"] if case["ignore"] is not None else -10**9))
    r = ref.linear_cross_entropy(d["hr"], d["wr"], np.where(oob, 0, t), bias,
                                 logit_softcap=case["cap"], reduction="none", cotangent=g,
                                 label_smoothing=case["ls"], label_smoothing_mode=case["mode"],
                                 ignore_index=case["ignore"], z_loss=case["z"])
    return r, oob


def mx_args(d, case):
    a = dict(hidden=mx.array(d["hr"]), weight=mx.array(d["wr"]), targets=mx.array(d["t"]))
    if case["bias"]:
        a["bias"] = mx.array(d["bias"])
    return a


def check_case(lib, case_name, n, h, v, hdt, wdt, chunk_bytes, schedules, seed, make=make_case):
    """make: builds the inputs (test_metal_quantized_head.py passes a quantized head's)."""
    case = CASES[case_name]
    rng = np.random.default_rng(seed)
    d = make(rng, n, h, v, hdt, wdt, case)
    out = gpu_forward(lib, d, case, chunk_bytes, schedules)
    oob = check_forward_outputs(d, case, out)

    # backward with a non-uniform cotangent per row; NaN rows make dW all NaN, so
    # the gradients are checked on the targets without out-of-range rows
    d["t"] = np.where(oob, 0, d["t"])
    g = rng.uniform(-2, 2, n).astype(np.float32)
    lse_in = out["lse"].copy()
    lse_lo_in = out["lse_lo"].copy()
    want = ("hidden",) + (() if d.get("q") else ("weight",)) + (("bias",) if case["bias"] else ())
    grads = gpu_backward(lib, d, case, lse_in, lse_lo_in, g, chunk_bytes, want, schedules)
    check_gradients(d, case, g, grads, want)
    return d, out


def check_forward_outputs(d, case, out):
    """The forward's per-row outputs (loss, lse, entropy, correct, argmax, target
    logit) against float64 and the CPU primitive; returns the out-of-range rows."""
    n, v = d["n"], d["v"]
    cpu, _ = cpu_primitive(d, case)
    r, oob = reference64(d, case, None)
    args = mx_args(d, case)
    scale = logit_scale(args)
    zf = 1 + 2 * case["z"] * 50
    # per-row values: vs float64 (bounds of test_linear_cross_entropy) and vs the CPU
    lse_ref = ref.logsumexp(r["logits"])
    row_loss = np.where(oob, np.nan, r["loss"])
    if case["sum"]:
        assert_close(out["loss"][0], np.nansum(row_loss) if not oob.any() else np.nan, mx.float32,
                     scale=scale.sum() * zf, what="summed loss vs float64")
        assert_close(out["loss"][0], cpu[0], mx.float32, scale=scale.sum() * zf, what="summed loss vs CPU")
    else:
        assert_close(out["loss"], row_loss, mx.float32, scale=scale * zf, what="loss vs float64")
        assert_close(out["loss"], cpu[0], mx.float32, scale=scale * zf, what="loss vs CPU")
    assert_close(out["lse"], lse_ref, mx.float32, scale=scale, what="lse vs float64")
    assert_close(out["lse"] + out["lse_lo"].astype(np.float64), cpu[1] + cpu[2].astype(np.float64),
                 mx.float32, scale=scale, what="lse + lse_lo vs CPU")
    p = np.exp(r["logits"] - lse_ref[:, None])
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
    assert_close(out["entropy"], entropy, mx.float32, scale=scale, what="entropy vs float64")
    assert_close(out["entropy"], cpu[4], mx.float32, scale=scale, what="entropy vs CPU")
    # correct: the target's logit is the row's max; rows whose top two logits are
    # closer than the float32 GEMM's error may differ between summation orders
    z = np.sort(r["logits"], -1)
    clear = (z[:, -1] - z[:, -2] > 64 * EPS32 * scale) if v > 1 else np.ones(n, bool)
    assert set(np.unique(out["correct"])) <= {0, 1}
    np.testing.assert_array_equal(out["correct"][clear].astype(bool), cpu[3][clear])
    assert out["correct"][:6][clear[:6]].sum() >= 1 or n < 6 or v == 1
    # argmax (first maximal logit, as mx.argmax) on the same clear rows; the
    # target's logit (0 on ignored / out-of-range rows)
    np.testing.assert_array_equal(out["argmax"][clear], cpu[5][clear])
    np.testing.assert_array_equal(out["argmax"][clear], r["logits"].argmax(-1)[clear])
    kept = (d["t"] >= 0) & (d["t"] < v) & ~oob
    if case["ignore"] is not None:
        kept &= d["t"] != case["ignore"]
    z_t = np.take_along_axis(r["logits"], np.clip(d["t"], 0, v - 1)[:, None], -1)[:, 0]
    assert_close(out["target_logit"], np.where(kept, z_t, 0.0), mx.float32, scale=scale,
                 what="target logit vs float64")
    assert_close(out["target_logit"], cpu[6], mx.float32, scale=scale, what="target logit vs CPU")
    return oob


def check_gradients(d, case, g, grads, want):
    """Gradients for the per-row cotangent g against float64 and the CPU primitive
    (targets without out-of-range rows)."""
    hdt, wdt = d["hdt"], d["wdt"]
    _, cpu_grads = cpu_primitive(d, case, g)
    r, _ = reference64(d, case, g.astype(np.float64))
    args = mx_args(d, case)
    mags, logit_err = gradient_bounds(args, r, "none", mx.array(g), case["ignore"], case["z"])
    for name in want:
        assert_close(grads[name], r[name], mx.float32, scale=logit_err[name], mag=mags[name],
                     what=f"d{name} vs float64 ({hdt}/{wdt})")
        # The CPU's gradient comes in the primal's dtype; eval_gpu's float32 one is
        # converted to it the same way (ops/linear_cross_entropy.cpp, vjp).
        dt = {"hidden": hdt, "weight": wdt, "bias": "float32"}[name]
        assert_close(as_device(grads[name], dt)[1], cpu_grads[name], MX_DT[dt],
                     scale=logit_err[name], mag=mags[name], what=f"d{name} vs CPU ({hdt}/{wdt})")


def gpu_fused(lib, d, case, chunk_bytes, want, schedules):
    """eval_gpu's forward with fused gradients (the stored-Z path): the forward's
    outputs and the gradients for a unit cotangent per row."""
    n, v, h = d["n"], d["v"], d["h"]
    p = plan_info(lib, n, v, h, chunk_bytes)
    row_loss = np.full(max(n, 1), SENTINEL, np.float32)
    loss = np.full(1 if case["sum"] else max(n, 1), SENTINEL, np.float32)
    lse, lse_lo, entropy, target_out = (np.full(max(n, 1), SENTINEL, np.float32) for _ in range(4))
    correct = np.full(max(n, 1), 7, np.uint8)
    argmax = np.full(max(n, 1), -7, np.int64)
    dz = np.full(max(p["chunk_rows"] * v, 1), SENTINEL, np.float32)
    dh = np.full((max(n, 1), max(h, 1)), SENTINEL, np.float32)
    dw = np.full((v, max(h, 1)), SENTINEL, np.float32)
    db = np.full(v, SENTINEL, np.float32)
    suffix, head = head_run_args(d)
    lib.run("lce_fused_run" + suffix, *head, d["t"], d["bias"], row_loss, loss, lse, lse_lo, correct,
            entropy, argmax, target_out, dz, dh, dw, db, np.int32("hidden" in want),
            np.int32("weight" in want), np.int32("bias" in want), np.int64(n), np.int32(v),
            np.int32(h), np.int64(chunk_bytes), np.int32(case["sum"]), *options(case),
            schedules=schedules)
    USED.update({f"fl_lce_dz_{d['hdt']}_{head_name(d)}_{tile_name(lib, d)}", "fl_lce_rows"})
    names = {"hidden": f"fl_lce_dh_{head_name(d)}", "weight": f"fl_lce_dw_{d['hdt']}",
             "bias": "fl_lce_dbias"}
    USED.update(names[k] for k in want)
    k = slice(0, n)
    out = dict(loss=loss if case["sum"] else loss[k], lse=lse[k], lse_lo=lse_lo[k],
               correct=correct[k], entropy=entropy[k], argmax=argmax[k], target_logit=target_out[k])
    return out, dict(hidden=dh[:n, :h], weight=dw[:, :h], bias=db)


def check_fused(lib, case_name, n, h, v, hdt, wdt, chunk_bytes, schedules, seed, make=make_case):
    """The stored-Z path against the CPU primitive and float64: the forward's
    outputs and the gradients of every input (a unit cotangent per row). Targets
    without out-of-range rows (they make dW all NaN: test_fused_out_of_range_rows)."""
    case = CASES[case_name]
    rng = np.random.default_rng(seed)
    d = make(rng, n, h, v, hdt, wdt, case)
    _, oob = reference64(d, case, None)
    d["t"] = np.where(oob, 0, d["t"])
    want = ("hidden",) + (() if d.get("q") else ("weight",)) + (("bias",) if case["bias"] else ())
    out, grads = gpu_fused(lib, d, case, chunk_bytes, want, schedules)
    check_forward_outputs(d, case, out)
    check_gradients(d, case, np.ones(n, np.float32), grads, want)
    return d, out, grads


# Shapes at the tile edges: N around BM, V around BN, H around BK (and H = 7 < BK).
SHAPES = [(1, 7, 33), (33, 16, 31), (31, 17, 65), (65, 48, 97)]


@pytest.mark.parametrize("n,h,v", SHAPES, ids=[f"{n}x{h}x{v}" for n, h, v in SHAPES])
@pytest.mark.parametrize("case_name", list(CASES))
def test_float32_cases_all_schedules(lib, case_name, n, h, v):
    # chunk_bytes: two chunks of rows for the larger shapes
    check_case(lib, case_name, n, h, v, "float32", "float32", 4 * v * 32, mh.DEFAULT_SCHEDULES,
               seed=n * 1000 + h * 10 + v)


@pytest.mark.parametrize("hdt", DTYPES)
@pytest.mark.parametrize("wdt", DTYPES)
def test_dtype_pairs(lib, hdt, wdt):
    if hdt == wdt == "float32":
        pytest.skip("test_float32_cases_all_schedules")
    schedules = mh.DEFAULT_SCHEDULES if (hdt, wdt) == ("bfloat16", "float16") else FAST
    case = "others_z_cap" if DT_CODE[hdt] <= DT_CODE[wdt] else "smooth_ignore_bias_sum"
    check_case(lib, case, 37, 23, 70, hdt, wdt, 4 * 70 * 33, schedules, seed=DT_CODE[hdt] * 3 + DT_CODE[wdt])


def test_a_few_hundred(lib):
    """N, H, V of a few hundred, off every tile edge: 5 row blocks, 9 vocabulary
    tiles in splits of one, 9 reduction steps, 3 row chunks."""
    check_case(lib, "others_z_cap", 129, 131, 257, "bfloat16", "float32", 4 * 257 * 64, FAST,
               seed=129)


def test_unit_cotangent_and_only_requested_gradients(lib):
    """The forward's fused gradients: unit cotangent (the g buffer is not read);
    a gradient not asked for is never written (its sentinel stays)."""
    case = CASES["smooth_ignore_bias_sum"]
    rng = np.random.default_rng(5)
    d = make_case(rng, 20, 9, 40, "float32", "float32", case, bad_rows=False)
    out = gpu_forward(lib, d, case, 1 << 20, FAST)
    g1 = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(), None, 1 << 20,
                      ("weight",), FAST)
    ones = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(),
                        np.ones(20, np.float32), 1 << 20, ("hidden", "weight", "bias"), FAST)
    np.testing.assert_array_equal(g1["weight"], ones["weight"])
    assert np.all(g1["hidden"] == SENTINEL) and np.all(g1["bias"] == SENTINEL)


def test_no_rows(lib):
    """N = 0: no tile runs; the summed loss is 0 and dW, dbias are written as 0."""
    case = CASES["smooth_ignore_bias_sum"]
    d = make_case(np.random.default_rng(0), 0, 8, 10, "float32", "float32", case)
    out = gpu_forward(lib, d, case, 1 << 20, FAST)
    assert out["loss"][0] == 0.0
    g = gpu_backward(lib, d, case, np.zeros(1, np.float32), np.zeros(1, np.float32),
                     np.zeros(1, np.float32), 1 << 20, ("hidden", "weight", "bias"), FAST)
    assert not np.any(g["weight"]) and not np.any(g["bias"])


def test_out_of_range_rows_are_nan(lib):
    """An index outside [0, V) gives a NaN row (loss, dZ), never a memory access."""
    case = CASES["plain"]
    rng = np.random.default_rng(9)
    d = make_case(rng, 9, 7, 33, "float32", "float32", case)
    out = gpu_forward(lib, d, case, 1 << 20, FAST)
    bad = (d["t"] < 0) | (d["t"] >= 33)
    assert bad.sum() == 2
    np.testing.assert_array_equal(np.isnan(out["loss"]), bad)
    assert np.isfinite(out["lse"]).all() and not out["correct"][bad].any()
    g = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(),
                     np.ones(9, np.float32), 1 << 20, ("hidden",), FAST)
    np.testing.assert_array_equal(np.isnan(g["hidden"]).all(-1), bad)
    assert np.isfinite(g["hidden"][~bad]).all()


def test_hidden_size_zero(lib):
    """H = 0: no reduction steps at all (gemm_k_loop runs no barrier); the logits
    are the bias, as on the CPU."""
    case = CASES["smooth_ignore_bias_sum"]
    v = 66 * BN - 12  # 66 tiles: two per split at the 64-split cap
    d = make_case(np.random.default_rng(4), 5, 0, v, "float32", "float32", case, bad_rows=False)
    assert plan_info(lib, 5, v, 0)["vocab_per_split"] == 2 * BN  # two tiles per split
    out = gpu_forward(lib, d, case, 1 << 20, FAST)
    cpu, _ = cpu_primitive(d, case)
    assert_close(out["loss"][0], cpu[0], mx.float32, scale=5 * float(np.abs(d["bias"]).max()),
                 what="loss")
    assert_close(out["entropy"], cpu[4], mx.float32, scale=float(np.abs(d["bias"]).max()),
                 what="entropy")
    g = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(),
                     np.ones(5, np.float32), 1 << 20, ("hidden", "weight", "bias"), FAST)
    _, cpu_g = cpu_primitive(d, case, np.ones(5, np.float32))
    assert g["hidden"].shape == (5, 0) and g["weight"].shape == (v, 0)
    assert_close(g["bias"], cpu_g["bias"], mx.float32, scale=1.0, what="dbias")


# Bugs planted in the real kernel files (the tile GEMM is metal/lce_gemm.h): the
# harness must report each.
PLANTED = {
    # staging the next BK step while another SIMD-group still multiplies the last
    "restage_before_all_loaded": ("metal/lce_gemm.h",
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n    a.load(k_valid, m_valid);",
        "    a.load(k_valid, m_valid);", mh.ScheduleDependent),
    # multiplying a tile before every thread has staged it
    "load_before_staged": ("metal/lce_gemm.h",
        "    b.load(k_valid, n_valid);\n    threadgroup_barrier(mem_flags::mem_threadgroup);",
        "    b.load(k_valid, n_valid);", mh.ScheduleDependent),
    # the weight's rows read with a wrong leading dimension: wrong numbers
    "wrong_stride": ("metal/lce_gemm.h",
        "    return type(src + n0 * ld, int(ld), Bs, sg, lane);",
        "    return type(src + n0 * ld, int(ld) - 1, Bs, sg, lane);", AssertionError),
    # the row states of the SIMD-groups sharing a row merged before all are written
    "merge_before_written": ("metal/linear_cross_entropy.metal",
        "      xw[at] = st[i].ce.all.weight;\n    }\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
        "      xw[at] = st[i].ce.all.weight;\n    }\n  }", mh.ScheduleDependent),
    # a row reduced over 2 of the 4 lanes that hold it (Apple's fragment layout)
    "half_row_sum": ("metal/lce_gemm.h",
        "  x += simd_shuffle_xor(x, ushort(1));\n  return x + simd_shuffle_xor(x, ushort(8));",
        "  return x + simd_shuffle_xor(x, ushort(1));", AssertionError),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bugs_in_the_real_kernels_are_reported(tmp_path, bug):
    where, right, wrong, error = PLANTED[bug]
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    (tmp_path / "metal").mkdir()
    for source in (REPO / "metal").iterdir():  # the kernels and the headers they include
        (tmp_path / "metal" / source.name).write_text(source.read_text())
    planted = tmp_path / where
    text = planted.read_text()
    assert text.count(right) == 1, bug
    planted.write_text(text.replace(right, wrong))
    broken = mh.build([tmp_path / m for m in METAL], ADAPTOR, include_dirs=("csrc",))
    with pytest.raises(error):
        check_case(broken, "plain", 33, 24, 40, "float32", "float32", 1 << 20,
                   mh.DEFAULT_SCHEDULES[:5], seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad(lib, dtype):
    n = 1000
    src = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    g = np.array([-1.75], np.float32)
    out = np.full(n, SENTINEL, np.float32) if dtype == "float32" else as_device(
        np.full(n, SENTINEL, np.float32), dtype)[0]
    lib.run("lce_scale_run", np.int32(DT_CODE[dtype]), g, src, out, np.uint64(n), schedules=FAST)
    USED.add(f"fl_lce_scale_{dtype}")
    want, _ = as_device(src * g[0], dtype)
    np.testing.assert_array_equal(out, want)


# ---- the stored-Z path: the forward that forms its gradients -------------------------------


@pytest.mark.parametrize("n,h,v", SHAPES[1:], ids=[f"{n}x{h}x{v}" for n, h, v in SHAPES[1:]])
@pytest.mark.parametrize("case_name", list(CASES))
def test_fused_float32_cases(lib, case_name, n, h, v):
    """The stored-Z path (lce_schedule's forward with gradients) against the CPU
    primitive and float64: two chunks of rows for the larger shapes."""
    schedules = mh.DEFAULT_SCHEDULES if (n, h, v) == SHAPES[1] else FAST
    check_fused(lib, case_name, n, h, v, "float32", "float32", 4 * v * 32, schedules,
                seed=n * 1000 + h * 10 + v + 1)


@pytest.mark.parametrize("hdt", DTYPES)
@pytest.mark.parametrize("wdt", DTYPES)
def test_fused_dtype_pairs(lib, hdt, wdt):
    case = "smooth_ignore_bias_sum" if DT_CODE[hdt] <= DT_CODE[wdt] else "others_z_cap"
    check_fused(lib, case, 37, 23, 70, hdt, wdt, 4 * 70 * 20, FAST,
                seed=DT_CODE[hdt] * 3 + DT_CODE[wdt] + 50)


@pytest.mark.parametrize("dc", ["g", "d"])
def test_fused_every_device_class_tile(lib, device_class, dc):
    """The logits GEMM of the stored-Z path takes the class's forward tile (lce_dz's)."""
    device_class(dc)
    check_fused(lib, "cap_z_sum", 67, 37, 70, "bfloat16", "bfloat16", 4 * 70 * 33, FAST,
                seed=ord(dc))


def test_fused_a_few_hundred(lib):
    """Rows longer than the row kernel's group (V > 4 x 256: each thread several
    steps), 3 chunks."""
    check_fused(lib, "others_z_cap", 67, 40, 1500, "bfloat16", "float32", 4 * 1500 * 32, FAST,
                seed=7)


def test_fused_matches_the_recomputing_backward(lib):
    """The same gradients as the forward tiles + the backward that recomputes Z
    (unit cotangent), to float32 rounding: one formula, two orders of summation."""
    case = CASES["smooth_ignore_bias_sum"]
    d = make_case(np.random.default_rng(11), 40, 19, 90, "float32", "float32", case, bad_rows=False)
    want = ("hidden", "weight", "bias")
    out, fused = gpu_fused(lib, d, case, 4 * 90 * 16, want, FAST)
    fwd = gpu_forward(lib, d, case, 4 * 90 * 16, FAST)
    again = gpu_backward(lib, d, case, fwd["lse"].copy(), fwd["lse_lo"].copy(), None, 4 * 90 * 16,
                         want, FAST)
    for k in want:
        np.testing.assert_allclose(fused[k], again[k], rtol=1e-5, atol=1e-6 * np.abs(again[k]).max())
    np.testing.assert_allclose(out["loss"], fwd["loss"], rtol=1e-6)
    np.testing.assert_array_equal(out["argmax"], fwd["argmax"])


def test_fused_out_of_range_rows(lib):
    """An index outside [0, V): a NaN loss and a NaN dZ row (so NaN dH row), lse
    still the row's; ignored rows: loss 0, dH row 0."""
    case = CASES["smooth_ignore_bias_sum"]
    rng = np.random.default_rng(9)
    d = make_case(rng, 12, 7, 33, "float32", "float32", case)
    bad = (d["t"] < 0) | (d["t"] >= 33)
    bad &= d["t"] != -100
    assert bad.sum() == 2
    case = dict(case, sum=False)
    out, g = gpu_fused(lib, d, case, 1 << 20, ("hidden",), FAST)
    np.testing.assert_array_equal(np.isnan(out["loss"]), bad)
    np.testing.assert_array_equal(np.isnan(g["hidden"]).all(-1), bad)
    assert np.isfinite(g["hidden"][~bad]).all() and np.isfinite(out["lse"]).all()
    assert not out["correct"][bad].any() and not out["target_logit"][bad].any()
    ignored = d["t"] == -100
    assert ignored.any() and not out["loss"][ignored].any() and not g["hidden"][ignored].any()
    cpu, _ = cpu_primitive(d, case)
    assert_close(out["lse"], cpu[1], mx.float32, scale=10.0, what="lse")


def test_fused_no_rows(lib):
    """N = 0: the summed loss is 0 and dW, dbias are written as 0."""
    case = CASES["smooth_ignore_bias_sum"]
    d = make_case(np.random.default_rng(0), 0, 8, 10, "float32", "float32", case)
    out, g = gpu_fused(lib, d, case, 1 << 20, ("hidden", "weight", "bias"), FAST)
    assert out["loss"][0] == 0.0
    assert not np.any(g["weight"]) and not np.any(g["bias"])


@pytest.mark.parametrize("vocab", [1, 4 * 32, 4 * 32 + 1, 4 * 256 - 4, 4 * 256, 4 * 256 + 1, 151936])
@pytest.mark.parametrize("limit", [1024, 256, 96, 32])
def test_rows_plan(lib, vocab, limit):
    """fl_lce_rows: one group per row of min(256, ceil(V / 4) rounded up to 32, the
    usable pipeline limit) threads."""
    info = launch_info(lib, 7, rows=100, vocab=vocab, hidden=8, chunk_rows=33, max_threads=limit)
    want = min(256, -(-(-(-vocab // 4)) // 32) * 32, limit // 32 * 32)
    assert (info["gx"], info["gy"], info["tx"], info["name"]) == (33, 1, want, "fl_lce_rows")
    assert info["buffers"] == ["z", "targets", "loss", "lse", "lse_lo", "correct", "entropy",
                               "argmax", "target_out", "args"]


# Bugs planted in the stored-Z path's row kernel: the harness must report each.
PLANTED_FUSED = {
    # the dZ pass started before thread 0 has read the target's logit and written the lse
    "dz_before_the_row_is_finished": (
        "    xl[1] = stats.lse_lo;\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);",
        "    xl[1] = stats.lse_lo;\n  }", mh.ScheduleDependent),
    # a merge step that reads the states of threads past the group (never written)
    "merge_past_the_group": ("    if (tid < stride && tid + stride < tpg) {",
                             "    if (tid < stride) {", AssertionError),
    # the tree's levels merged without a barrier between them
    "merge_without_barrier": (
        "      xa[tid] = uint2(ba.key, uint(ba.index));\n    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);",
        "      xa[tid] = uint2(ba.key, uint(ba.index));\n    }", mh.ScheduleDependent),
}


@pytest.mark.parametrize("bug", list(PLANTED_FUSED))
def test_planted_bugs_in_the_row_kernel_are_reported(tmp_path, bug):
    right, wrong, error = PLANTED_FUSED[bug]
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    (tmp_path / "metal").mkdir()
    for source in (REPO / "metal").iterdir():
        (tmp_path / "metal" / source.name).write_text(source.read_text())
    planted = tmp_path / "metal" / "linear_cross_entropy.metal"
    text = planted.read_text()
    assert text.count(right) == 1, bug
    planted.write_text(text.replace(right, wrong))
    broken = mh.build([tmp_path / m for m in METAL], ADAPTOR, include_dirs=("csrc",))
    with pytest.raises(error):
        check_fused(broken, "smooth_ignore_bias_sum", 33, 24, 40, "float32", "float32", 1 << 20,
                    mh.DEFAULT_SCHEDULES[:5], seed=1)


def test_zz_every_instantiation_ran():
    """Runs last (file order): every kernel the .metal file defines was launched above."""
    if not USED:
        pytest.skip("run with the kernel tests")
    quantized = {n for n in host_names() if is_quantized_kernel(n)}
    # The row statistics' epilogue kernels in the same file: tests/test_metal_row_stats.py.
    row_stats = {n for n in host_names() if n.startswith("fl_rs_")}
    missing = host_names() - quantized - row_stats - USED
    assert not missing, sorted(missing)
