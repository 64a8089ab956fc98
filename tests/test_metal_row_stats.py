"""The row statistics' Metal kernels (metal/linear_cross_entropy.metal: the
linear CE's forward tiles with the row statistics' arguments, fl_rs_fwd_finish,
rs_dz, then the linear CE's dbias / dH / dW) on the CPU harness
(tests/metal_host), through the launch plans and dispatch sequence eval_gpu
uses (csrc/metal/row_stats.cpp, replayed by tests/metal_kernels/lce_adaptor.cpp:
rs_forward_run / rs_backward_run), compared with the CPU primitive
(_ext.linear_row_stats on mx.cpu) on the same rounded inputs: every statistic,
and dH / dW / dbias for a different cotangent per row on each differentiable
statistic. Shapes at the tile edges, temperature, soft-cap, bias, ignored rows,
out-of-range targets, a vocabulary shard (vocab_start), no targets."""

from __future__ import annotations

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)]

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402

from test_metal_kernels import DT_CODE, MX_DT, SENTINEL, as_device, device_empty, from_device  # noqa: E402
from test_metal_linear_cross_entropy import (  # noqa: E402,F401  (device_class: a fixture)
    ADAPTOR, BM, BN, DTYPES, FAST, METAL, QUANTIZED_HEADS, REPO, device_class, host_names, plan_info, tile_name)
from metal_host.kernel_names import kernel_names  # noqa: E402

STATS = ["lse", "lse_lo", "target", "logit_sum", "expected", "expected_lo", "max"]
DIFF = ["lse", "target", "logit_sum", "expected"]
COT_BIT = {"lse": 1, "target": 2, "logit_sum": 4, "expected": 8}
USED: set[str] = set()


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


CASES = {
    "plain": dict(T=1.0, cap=None, bias=False, ignore=None, start=None, targets=True),
    "temp_cap_bias_ignore": dict(T=0.7, cap=4.0, bias=True, ignore=-100, start=None, targets=True),
    "shard": dict(T=2.0, cap=None, bias=True, ignore=-100, start=40, targets=True),
    "no_targets": dict(T=1.0, cap=3.0, bias=False, ignore=None, start=None, targets=False),
}


def make(rng, n, h, v, hdt, wdt, case, bad_rows=True):
    hid = rng.standard_normal((n, h)).astype(np.float32)
    w = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    start = case["start"] or 0
    t = (start + rng.integers(0, v, n)).astype(np.int64)
    for r in range(min(n, 4)):  # peaked rows
        w[t[r] - start] += 12 * hid[r] / max(float(hid[r] @ hid[r]), 1e-6)
    if case["ignore"] is not None and n > 2:
        t[2::5] = case["ignore"]
    if bad_rows and n > 4:
        t[3] = start + v  # out of range (another shard's when sharded): a NaN gradient row
    if bad_rows and case["start"] is not None and n > 6:
        t[6] = start - 1
    bias = (rng.standard_normal(v) if case["bias"] else np.zeros(1)).astype(np.float32)
    hd, hr = as_device(hid, hdt)
    wd, wr = as_device(w, wdt)
    return dict(hd=hd, hr=hr, wd=wd, wr=wr, t=t, bias=bias, n=n, h=h, v=v, hdt=hdt, wdt=wdt)


def flags(d, case):
    has_ig = case["ignore"] is not None
    return (np.int32(has_ig), np.int64(case["ignore"] if has_ig else -100), np.float32(case["cap"] or 0.0),
            np.int32(case["bias"]), np.float32(case["T"]), np.int32(case["start"] is not None),
            np.int64(case["start"] or 0), np.int32(case["targets"]))


def forward_buffers(lib, n, v, h, chunk_bytes):
    """The finish's scratch and outputs, SENTINEL-filled (argmax: -1)."""
    p = plan_info(lib, n, v, h, chunk_bytes)
    # room for the most splits any forward tile can take (kLceMaxSplits = 64)
    splits = max(p["splits"], 64)
    partials = np.full(max(splits * n * 4, 4), SENTINEL, np.float32)
    target_logit = np.full(max(n, 1), SENTINEL, np.float32)
    argmax_partials = np.full(max(splits * n * 2, 2), 0xDEADBEEF, np.uint32)
    outs = {k: np.full(max(n, 1), SENTINEL, np.float32) for k in STATS}
    outs["argmax"] = np.full(max(n, 1), -1, np.int64)
    return p, (partials, target_logit, argmax_partials, *(outs[k] for k in STATS + ["argmax"])), outs


def gpu_forward(lib, d, case, chunk_bytes, schedules):
    n, v, h = d["n"], d["v"], d["h"]
    _, bufs, outs = forward_buffers(lib, n, v, h, chunk_bytes)
    lib.run("rs_forward_run", np.int32(DT_CODE[d["hdt"]]), np.int32(DT_CODE[d["wdt"]]), d["hd"], d["wd"],
            d["t"], d["bias"], *bufs, np.int64(n), np.int32(v), np.int32(h), np.int64(chunk_bytes),
            *flags(d, case), schedules=schedules)
    USED.update({f"fl_lce_fwd_{d['hdt']}_w{d['wdt']}_{tile_name(lib, d)}", "fl_rs_fwd_finish"})
    return {k: a[:n] for k, a in outs.items()}


def gpu_backward(lib, d, case, fwd, g, chunk_bytes, schedules):
    n, v, h = d["n"], d["v"], d["h"]
    p = plan_info(lib, n, v, h, chunk_bytes)
    dz = np.full(max(p["chunk_rows"] * v, 1), SENTINEL, np.float32)
    dh = np.full((max(n, 1), h), SENTINEL, np.float32)
    dw = np.full((v, h), SENTINEL, np.float32)
    db = np.full(v, SENTINEL, np.float32)
    cot = sum(COT_BIT[k] for k in g)
    gs = [g.get(k, np.zeros(1, np.float32)) for k in DIFF]
    lib.run("rs_backward_run", np.int32(DT_CODE[d["hdt"]]), np.int32(DT_CODE[d["wdt"]]), d["hd"], d["wd"],
            d["t"], d["bias"], fwd["lse"], fwd["lse_lo"], fwd["expected"], fwd["expected_lo"], *gs,
            np.int32(cot), dz, dh, dw, db, np.int32(1), np.int32(1), np.int32(case["bias"]), np.int64(n),
            np.int32(v), np.int32(h), np.int64(chunk_bytes), *flags(d, case), schedules=schedules)
    USED.add(f"fl_rs_dz_{d['hdt']}_w{d['wdt']}_{tile_name(lib, d)}")
    return dict(hidden=dh[:n], weight=dw, bias=db)


def cpu(d, case, g):
    hm = mx.array(d["hr"]).astype(MX_DT[d["hdt"]])
    wm = mx.array(d["wr"]).astype(MX_DT[d["wdt"]])
    tm = mx.array(d["t"]) if case["targets"] else None
    bm = mx.array(d["bias"]) if case["bias"] else None
    names = (STATS if case["targets"] else [k for k in STATS if k != "target"]) + ["argmax"]
    kw = dict(temperature=case["T"], logit_softcap=case["cap"], ignore_index=case["ignore"],
              vocab_start=case["start"], stream=mx.cpu)
    outs = ext.linear_row_stats(hm, wm, tm, bm, stats=names, **kw)
    res = {k: np.array(o) for k, o in zip(names, outs)}
    diff = [k for k in DIFF if k in g]
    primals = [hm, wm] + ([bm] if case["bias"] else [])

    def f(*p):
        return ext.linear_row_stats(p[0], p[1], tm, p[2] if case["bias"] else None, stats=diff, **kw)

    _, grads = mx.vjp(f, primals, [mx.array(g[k]) for k in diff])
    return res, dict(zip(["hidden", "weight", "bias"], (np.array(x.astype(mx.float32)) for x in grads)))


def close(got, want, what, rtol=1e-4, atol=1e-4):
    """The GPU tiles add in another order than BLAS: a few float32 roundings of
    the row's magnitudes apart."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN positions differ"
    with np.errstate(invalid="ignore"):  # (equal infinities are equal)
        ok = np.isnan(want) | (got == want) | (np.abs(got - want) <= atol + rtol * np.abs(want))
    assert ok.all(), f"{what}: {int((~ok).sum())} of {ok.size} off, max err {np.nanmax(np.abs(got - want)):.3g}"



@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("n,h,v", [(BM + 1, 7, BN + 1), (9, 33, 2 * BN - 1)])
def test_forward_and_backward_vs_cpu(lib, case_name, n, h, v):
    case = CASES[case_name]
    seed = sum(map(ord, case_name)) + 1000 * n + v
    chunk = 3 * 4 * v  # several backward chunks
    for bad_rows in (True, False):  # the gradients' NaN row poisons all of dW: both ways
        d = make(np.random.default_rng(seed), n, h, v, "float32", "float32", case, bad_rows)
        rng = np.random.default_rng(seed + 1)
        g = {k: rng.standard_normal(n).astype(np.float32) for k in DIFF if case["targets"] or k != "target"}
        want, want_g = cpu(d, case, g)
        got = gpu_forward(lib, d, case, chunk, FAST)
        scale = np.maximum(1.0, np.abs(want["max"]))
        for k in want:
            if k in ("lse_lo", "expected_lo"):
                continue  # the pairs are compared through their sums below
            if k == "argmax":
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{case_name} argmax")
                continue
            close(got[k], want[k], f"{case_name} {k}", atol=1e-5 * scale * (v if k == "logit_sum" else 1))
        for k in ("lse", "expected"):
            close(got[k].astype(np.float64) + got[k + "_lo"], want[k].astype(np.float64) + want[k + "_lo"],
                  f"{k} pair", atol=1e-5 * scale)
        grads = gpu_backward(lib, d, case, got, g, chunk, FAST)
        for k, w in want_g.items():
            finite = np.isfinite(w)
            mag = np.abs(w[finite]).max() if finite.any() else 1.0
            close(grads[k], w, f"{case_name} d{k}", rtol=1e-3, atol=1e-4 * max(mag, 1.0))
        if bad_rows and case["start"] is not None:
            assert got["target"][3] == 0 and got["target"][6] == 0  # another shard's targets
        elif bad_rows and case["targets"]:
            assert np.isnan(got["target"][3]) and np.isnan(grads["hidden"][3]).all()  # out of range


@pytest.mark.parametrize("dc", ["s", "g", "d"])
@pytest.mark.parametrize("hdt", DTYPES)
@pytest.mark.parametrize("wdt", DTYPES)
def test_dtypes(lib, device_class, dc, hdt, wdt):
    """16-bit hidden and weight: the statistics in float32; the gradients are
    float32 from the kernels, rounded to the primal's dtype by the op (as the
    CPU primitive's)."""
    case = CASES["temp_cap_bias_ignore"]
    d = make(np.random.default_rng(7), 21, 40, BN + 3, hdt, wdt, case, bad_rows=False)
    rng = np.random.default_rng(8)
    g = {k: rng.standard_normal(21).astype(np.float32) for k in DIFF}
    want, want_g = cpu(d, case, g)
    device_class(dc)  # the forward tile of that device class (launch_plan.h lce_forward_tile)
    if hdt == wdt == "float32" and dc == "s":
        return  # the cases above
    got = gpu_forward(lib, d, case, 64 << 20, FAST[:1])
    close(got["lse"], want["lse"], "lse", atol=1e-4)
    close(got["expected"], want["expected"], "expected", atol=1e-4)
    grads = gpu_backward(lib, d, case, got, g, 64 << 20, FAST[:1])
    for k, dt in (("hidden", hdt), ("weight", wdt)):
        rounded = as_device(grads[k], dt)[1]
        mag = np.abs(want_g[k]).max()
        close(rounded, want_g[k], f"d{k}", rtol=1.6e-2, atol=1e-3 * mag)


QMODE = {"affine": 0, "mxfp4": 1, "mxfp8": 2, "nvfp4": 3}  # flm::kQuant*


def quantized_heads():
    """(head name, bits, group size, mode, global scale?, scale dtype) of every
    quantized head the .metal file instantiates (QUANTIZED_HEADS)."""
    for name in QUANTIZED_HEADS:
        if name.startswith("q"):
            bits, sdt = name[1:].split("_", 1)
            yield name, int(bits), 64 if int(bits) % 2 == 0 else 32, "affine", False, sdt
        else:
            mode = name.split("_")[0]
            yield name, 4 if mode != "mxfp8" else 8, 16 if mode == "nvfp4" else 32, mode, name.endswith(
                "_global"), "float32"


@pytest.mark.parametrize("dc", ["s", "g"])
@pytest.mark.parametrize("hdt", DTYPES)
def test_quantized_heads(lib, device_class, dc, hdt):
    """rs_dz of every quantized head (the forward tiles are the linear CE's,
    checked with these heads in test_metal_quantized_head.py): the statistics and
    dH / dbias against the CPU primitive on the same packed weight."""
    device_class(dc)  # both tiles a quantized head is instantiated in
    case = CASES["temp_cap_bias_ignore"]
    n, h, v = 11, 64, BN + 5
    for k, (name, bits, group, mode, has_global, sdt) in enumerate(quantized_heads()):
        d = make(np.random.default_rng(k), n, h, v, hdt, "float32", case, bad_rows=False)
        w = mx.array(d["wr"]).astype(MX_DT[sdt])
        gs = mx.array(np.float32(2.0)) if has_global else None
        if mode == "affine":
            w_q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
            s_dev = np.array(scales.astype(mx.float32)).astype(np.float32)
            s_dev, _ = as_device(s_dev, sdt)
            b_dev, _ = as_device(np.array(biases.astype(mx.float32)), sdt)
        else:
            w_q, scales = mx.quantize(w, mode=mode, global_scale=gs)
            biases = None
            s_dev = b_dev = np.array(scales)
            if gs is not None:
                b_dev = np.array(gs.astype(mx.float32)).reshape(1)
        rng = np.random.default_rng(100 + k)
        g = {kk: rng.standard_normal(n).astype(np.float32) for kk in DIFF}
        hm = mx.array(d["hr"]).astype(MX_DT[hdt])
        tm, bm = mx.array(d["t"]), mx.array(d["bias"])
        kw = dict(scales=scales, biases=biases, group_size=group, bits=bits, mode=mode, global_scale=gs,
                  temperature=case["T"], logit_softcap=case["cap"], ignore_index=case["ignore"], stream=mx.cpu)
        want = dict(zip(STATS, (np.array(o) for o in ext.linear_row_stats(hm, w_q, tm, bm, stats=STATS, **kw))))
        _, (wh, wb) = mx.vjp(lambda x, b: ext.linear_row_stats(x, w_q, tm, b, stats=DIFF, **kw), [hm, bm],
                             [mx.array(g[kk]) for kk in DIFF])
        head = (np.int32(DT_CODE[hdt]), np.int32(QMODE[mode]), np.int32(has_global), np.int32(bits),
                np.int32(group), np.int32(DT_CODE[sdt]), d["hd"], np.array(w_q), s_dev, b_dev)
        p, bufs, got = forward_buffers(lib, n, v, h, 64 << 20)
        lib.run("rs_forward_run_q", *head, d["t"], d["bias"], *bufs, np.int64(n), np.int32(v), np.int32(h),
                np.int64(64 << 20), *flags(d, case), schedules=FAST[:1])
        for kk in ("lse", "target", "expected", "max"):
            close(got[kk], want[kk], f"{name} {hdt} {kk}", atol=1e-4)
        np.testing.assert_array_equal(got["argmax"], np.array(ext.linear_row_stats(hm, w_q, tm, bm, stats=["argmax"],
                                                                                    **kw)[0]))
        dz = np.full(p["chunk_rows"] * v, SENTINEL, np.float32)
        dh = np.full((n, h), SENTINEL, np.float32)
        db = np.full(v, SENTINEL, np.float32)
        lib.run("rs_backward_run_q", *head, d["t"], d["bias"], got["lse"], got["lse_lo"], got["expected"],
                got["expected_lo"], *(g[kk] for kk in DIFF), np.int32(15), dz, dh, np.zeros(1, np.float32), db,
                np.int32(1), np.int32(0), np.int32(1), np.int64(n), np.int32(v), np.int32(h), np.int64(64 << 20),
                *flags(d, case), schedules=FAST[:1])
        qd = dict(hdt=hdt, n=n, v=v, h=h, q=dict(mode=mode, bits=bits, sdt=sdt, global_scale=gs))
        USED.add(f"fl_rs_dz_{hdt}_{name}_{tile_name(lib, qd)}")
        rounded = as_device(dh, hdt)[1]
        mag = np.abs(np.array(wh.astype(mx.float32))).max()
        close(rounded, np.array(wh.astype(mx.float32)), f"{name} {hdt} dH", rtol=1.6e-2, atol=1e-3 * mag)
        close(db, np.array(wb), f"{name} {hdt} dbias", rtol=1e-3, atol=1e-4 * np.abs(np.array(wb)).max())


# ---- the logits form: metal/row_stats.metal -------------------------------------------
#
# rs_logits_forward / rs_logits_backward through the plans eval_gpu uses
# (tests/metal_kernels/row_stats_adaptor.cpp), against the CPU primitive
# (_ext.row_stats on mx.cpu, the same rounded logits) and the float64
# reference of tests/test_log_probs.py, on awkward V, -inf / NaN / huge rows,
# ignored and out-of-range targets, a shard, no targets, every dtype.

LOGITS_METAL = ["metal/row_stats.metal"]
LOGITS_ADAPTOR = "tests/metal_kernels/row_stats_adaptor.cpp"
BIT = {"lse": 1, "target": 2, "logit_sum": 4, "expected": 8, "max": 16, "argmax": 32}
ALL_STATS = STATS + ["argmax"]
LOGIT_CASES = {
    "plain": dict(T=1.0, cap=None, ignore=-100, start=None, targets=True),
    "temp_cap": dict(T=0.7, cap=4.0, ignore=-100, start=None, targets=True),
    "shard": dict(T=2.0, cap=None, ignore=-100, start=40, targets=True),
    "no_targets": dict(T=1.3, cap=3.0, ignore=None, start=None, targets=False),
}


@pytest.fixture(scope="module")
def llib():
    return mh.build(LOGITS_METAL, LOGITS_ADAPTOR, include_dirs=("csrc",))


def logits_rows(rng, rows, v, case, special=True):
    """rows x v logits (float32) and targets: random rows, a peaked one and,
    with `special`, an all -inf row, a row with -inf entries, a NaN row (NaN
    after its largest number), huge logits near 1e4, an ignored and an
    out-of-range target (another shard's when sharded)."""
    y = (rng.standard_normal((rows, v)) * 3).astype(np.float32)
    start = case["start"] or 0
    t = (start + rng.integers(0, v, rows)).astype(np.int64)
    y[0, t[0] - start] += 12.0
    if special:
        y[1] = -np.inf
        y[2, ::3] = -np.inf
        y[3, v // 2] = np.nan
        y[4] += 1e4
        if case["ignore"] is not None:
            t[5] = case["ignore"]
        t[6] = start + v  # out of range (another shard's when sharded)
    return y, t


def logits_forward(llib, yd, dt, t, case, stats=63, max_threads=1024, schedules=FAST):
    rows, v = yd.shape
    outs = {k: np.full(rows, SENTINEL, np.float32) for k in STATS}
    outs["argmax"] = np.full(rows, -1, np.int64)
    llib.run("rs_logits_forward_run", np.int32(DT_CODE[dt]), np.int32(max_threads), yd, t,
             *(outs[k] for k in ALL_STATS), np.int64(rows), np.int32(v), *logit_flags(case), np.int32(stats),
             schedules=schedules)
    USED.add(f"fl_rs_logits_fwd_{dt}")
    return outs


def logit_flags(case):
    has_ig = case["ignore"] is not None
    return (np.int32(case["targets"]), np.int32(has_ig), np.int64(case["ignore"] if has_ig else -100),
            np.int32(case["start"] is not None), np.int64(case["start"] or 0), np.float32(case["cap"] or 0.0),
            np.float32(case["T"]))


def logits_backward(llib, yd, dt, t, case, fwd, g, max_threads=1024, schedules=FAST):
    rows, v = yd.shape
    cot = sum(BIT[k] for k in g)
    gs = [g.get(k, np.zeros(1, np.float32)) for k in DIFF]
    grad = device_empty(yd.shape, dt)
    llib.run("rs_logits_backward_run", np.int32(DT_CODE[dt]), np.int32(max_threads), yd, t, fwd["lse"],
             fwd["lse_lo"], fwd["expected"], fwd["expected_lo"], *gs, np.int32(cot), grad, np.int64(rows),
             np.int32(v), *logit_flags(case), schedules=schedules)
    USED.add(f"fl_rs_logits_bwd_{dt}")
    return from_device(grad, dt)


def logits_cpu(y, dt, t, case, g):
    ym = mx.array(y).astype(MX_DT[dt])
    tm = mx.array(t) if case["targets"] else None
    kw = dict(temperature=case["T"], logit_softcap=case["cap"], ignore_index=case["ignore"],
              vocab_start=case["start"], stream=mx.cpu)
    names = [k for k in ALL_STATS if case["targets"] or k != "target"]
    want = dict(zip(names, (np.array(o) for o in ext.row_stats(ym, tm, stats=names, **kw))))
    diff = [k for k in DIFF if k in g]
    _, (gy,) = mx.vjp(lambda a: ext.row_stats(a, tm, stats=diff, **kw), [ym], [mx.array(g[k]) for k in diff])
    return want, np.array(gy.astype(mx.float32))


def check_logits(llib, v, dt, case_name, *, rows=9, max_threads=1024, schedules=FAST, special=True, seed=0):
    from test_log_probs import ref_grad_y, ref_stats

    case = LOGIT_CASES[case_name]
    rng = np.random.default_rng(seed + v * 31 + DT_CODE[dt])
    y32, t = logits_rows(rng, rows, v, case, special)
    yd, y = as_device(y32, dt)
    g = {k: rng.standard_normal(rows).astype(np.float32) for k in DIFF if case["targets"] or k != "target"}
    tt = t if case["targets"] else np.zeros(1, np.int64)
    got = logits_forward(llib, yd, dt, tt, case, max_threads=max_threads, schedules=schedules)
    want, want_g = logits_cpu(y, dt, t, case, g)
    nan_row = np.isnan(y).any(-1)
    ok = ~nan_row
    r = ref_stats(y[ok], t[ok], case["T"], case["cap"], case["ignore"], case["start"])
    zabs = np.abs(np.where(np.isfinite(r["z"]), r["z"], 0.0))
    scale = np.maximum(1.0, zabs.max(-1))
    tol = 8e-6 * max(1.0, np.log2(v))
    for k in want:
        if k in ("lse_lo", "expected_lo"):
            continue
        if k == "argmax":
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{case_name} {dt} V={v} argmax")
            if case["cap"] is None and case["T"] in (1.0, 2.0):  # z = y / T keeps y's order and ties
                np.testing.assert_array_equal(got[k], (case["start"] or 0) + np.array(
                    mx.argmax(mx.array(y).astype(MX_DT[dt]), axis=-1)), err_msg="argmax vs mx.argmax")
            continue
        g_k, w_k = got[k].astype(np.float64), want[k].astype(np.float64)
        if k in ("lse", "expected"):
            g_k, w_k = g_k + got[k + "_lo"], w_k + want[k + "_lo"]
        atol = tol * scale * (zabs.sum(-1) / scale + v if k == "logit_sum" else 1.0)
        if k != "max":  # (the CPU's max of a row with a NaN depends on its position)
            assert np.array_equal(np.isnan(g_k), np.isnan(w_k)), f"{case_name} {dt} V={v} {k}: NaN rows differ"
        close(g_k[ok], w_k[ok], f"{case_name} {dt} V={v} {k} vs CPU", rtol=tol, atol=atol)
        with np.errstate(invalid="ignore"):
            close(g_k[ok], r[k], f"{case_name} {dt} V={v} {k} vs float64", rtol=tol, atol=atol)
    grad = logits_backward(llib, yd, dt, tt, case, got, g, max_threads=max_threads, schedules=schedules)
    assert not np.any(grad == SENTINEL)
    rnd = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dt]
    assert np.array_equal(np.isnan(grad), np.isnan(want_g)), f"{case_name} {dt} V={v}: NaN gradients differ"
    gok = grad[ok]
    mag = ref_grad_y(y[ok], t[ok], {k: g[k][ok] for k in g}, case["T"], case["cap"], case["ignore"],
                     case["start"], magnitude=True)
    want64 = ref_grad_y(y[ok], t[ok], {k: g[k][ok] for k in g}, case["T"], case["cap"], case["ignore"],
                        case["start"])
    # + the soft-cap's chain factor 1 - (c / cap)^2 in float32 near saturation
    # (0 in float64, a few eps in float32): eps times the row's unchained terms
    unchained = sum(np.abs(g[k][ok])[:, None] for k in g) * (2.0 + 2.0 * scale[:, None]) / case["T"]
    bound = rnd * np.abs(want64) + 64 * tol * mag + (8 * 1.2e-7 * unchained if case["cap"] else 0.0) + 1e-30
    for what, ref in (("CPU", want_g[ok]), ("float64", want64)):
        fin = ~np.isnan(ref) & ~np.isnan(want_g[ok])  # (the out-of-range row: NaN, checked above)
        with np.errstate(invalid="ignore"):
            err = np.where(gok == ref, 0.0, np.abs(gok - ref))
        assert (err[fin] <= bound[fin]).all(), \
            f"{case_name} {dt} V={v} dlogits vs {what}: max err/bound {np.max(err[fin] / bound[fin]):.3g}"
    if special and case["targets"] and case["start"] is None:
        assert np.isnan(got["target"][6]) and np.isnan(grad[6]).all()  # out of range: NaN
    if special and case["start"] is not None:
        assert got["target"][6] == 0 and not np.isnan(grad[6]).any()  # another shard's
    return got


@pytest.mark.parametrize("case_name", list(LOGIT_CASES))
@pytest.mark.parametrize("v", [1, 31, 32, 33, 4097, 50257])
def test_logits_form_vs_cpu_and_float64(llib, case_name, v):
    if v < 8 and case_name != "plain":
        pytest.skip("tiny rows: the plain case")
    check_logits(llib, v, "float32", case_name, special=v >= 8)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("v", [33, 4097])
def test_logits_form_dtypes(llib, dt, v):
    if dt == "float32":
        pytest.skip("the cases above")
    check_logits(llib, v, dt, "temp_cap")
    check_logits(llib, v, dt, "shard", seed=1)


@pytest.mark.parametrize("max_threads", [64, 96])
def test_logits_form_small_groups_every_schedule(llib, max_threads):
    """A small pipeline limit (every thread strides over many pieces, few
    SIMD-groups merge) under every schedule of the harness."""
    check_logits(llib, 1000, "float32", "plain", max_threads=max_threads, schedules=mh.DEFAULT_SCHEDULES)


def test_logits_form_writes_only_what_is_asked(llib):
    """stats bits: the other outputs keep their sentinels (eval_gpu binds them
    to an asked one); backward with one cotangent reads no pair (none bound)."""
    case = LOGIT_CASES["plain"]
    y32, t = logits_rows(np.random.default_rng(3), 9, 70, case)
    for names in (["argmax"], ["target"], ["max", "logit_sum"], ["expected"]):
        bits = sum(BIT[k] for k in names) | (BIT["lse"] if "expected" in names else 0)
        got = logits_forward(llib, y32.copy(), "float32", t, case, stats=bits)
        want, _ = logits_cpu(y32, "float32", t, case, {"lse": np.ones(9, np.float32)})
        for k in ALL_STATS:
            asked = bits & BIT[k.replace("_lo", "")]
            if not asked:
                assert (got[k] == (-1 if k == "argmax" else SENTINEL)).all(), (names, k)
        for k in names:
            ok = ~np.isnan(y32).any(-1)
            np.testing.assert_allclose(got[k][ok], want[k][ok], rtol=1e-5, atol=1e-5, err_msg=str(names))
    g = {"target": np.random.default_rng(4).standard_normal(9).astype(np.float32)}
    nothing = {k: np.full(1, np.nan, np.float32) for k in STATS}  # never read
    grad = logits_backward(llib, y32.copy(), "float32", t, case, nothing, g)
    _, want_g = logits_cpu(y32, "float32", t, case, g)
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(want_g))
    np.testing.assert_allclose(grad[~np.isnan(want_g)], want_g[~np.isnan(want_g)], rtol=1e-6)


def test_logits_form_plan_rules(llib):
    for v, limit in ((1, 1024), (128, 1024), (129, 1024), (4097, 1024), (50257, 96)):
        out = np.zeros(4, np.uint32)
        name = np.zeros(128, np.uint8)
        llib.run("rs_logits_plan_info", np.int32(2), np.int32(0), np.int64(5), np.int32(v), np.int32(limit), out,
                 name, schedules=(mh.Schedule(),))
        assert bytes(name).split(b"\0")[0].decode() == "fl_rs_logits_fwd_bfloat16"
        need = max(32, -(-(-(-v // 4)) // 32) * 32)
        assert out[0] == 5 and out[2] == min(need, limit // 32 * 32) and out[3] == 256 * 4
        llib.run("rs_logits_plan_info", np.int32(1), np.int32(1), np.int64(5), np.int32(v), np.int32(limit), out,
                 name, schedules=(mh.Schedule(),))
        assert bytes(name).split(b"\0")[0].decode() == "fl_rs_logits_bwd_float16"
        assert out[1] == 5 and out[0] * out[2] * 4 >= v > (out[0] - 1) * out[2] * 4


# Bugs planted in the logits-form kernels: the harness or the comparison must
# report each.
LOGITS_PLANTED = {
    # SIMD-group 0 reads the other groups' states before they are written
    "merge_before_written": ("    scratch[RS_SCRATCH_INDEX + sg] = as_type<float>(acc.best.index);\n  }\n"
                             "  threadgroup_barrier(mem_flags::mem_threadgroup);",
                             "    scratch[RS_SCRATCH_INDEX + sg] = as_type<float>(acc.best.index);\n  }\n",
                             (mh.ScheduleDependent, AssertionError)),
    # a butterfly that skips the last step: two half SIMD-groups never merge
    "half_simd_merge": ("for (ushort m = 1; m < 32; m <<= 1)", "for (ushort m = 1; m < 16; m <<= 1)",
                        AssertionError),
    # the target's extra gradient one class off
    "target_off_by_one": ("    if (long(j) == t) {\n      d += g.target;",
                          "    if (long(j) == t + 1) {\n      d += g.target;", AssertionError),
    # the argmax's first-index rule lost (the last maximal class wins)
    "argmax_last_index": ("        acc.best = flm::argmax_merge(acc.best, here);",
                          "        acc.best = here.key >= acc.best.key ? here : acc.best;", AssertionError),
}


@pytest.mark.parametrize("bug", list(LOGITS_PLANTED))
def test_planted_bugs_in_the_logits_kernels_are_reported(tmp_path, bug):
    right, wrong, error = LOGITS_PLANTED[bug]
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    (tmp_path / "metal").mkdir()
    for source in (REPO / "metal").iterdir():
        (tmp_path / "metal" / source.name).write_text(source.read_text())
    planted = tmp_path / LOGITS_METAL[0]
    text = planted.read_text()
    assert text.count(right) == 1, bug
    planted.write_text(text.replace(right, wrong))
    broken = mh.build([tmp_path / m for m in LOGITS_METAL], LOGITS_ADAPTOR, include_dirs=("csrc",))
    with pytest.raises(error):
        check_logits(broken, 1000, "float32", "plain", max_threads=128, schedules=mh.DEFAULT_SCHEDULES[:5])
        # ties on every row: the first maximal class
        y = np.zeros((3, 300), np.float32)
        y[:, 7::50] = 5.0
        got = logits_forward(broken, y, "float32", np.zeros(3, np.int64), LOGIT_CASES["plain"])
        np.testing.assert_array_equal(got["argmax"], 7)


def test_zz_every_instantiation_ran():
    """Runs last (file order): every row-statistics kernel the .metal file
    defines (every hidden dtype x dense and quantized head) was launched above."""
    if not USED:
        pytest.skip("run with the kernel tests")
    ours = {n for n in host_names() | kernel_names(LOGITS_METAL) if n.startswith("fl_rs_")}
    assert ours, "no row-statistics kernels found in the sources"
    assert not ours - USED, sorted(ours - USED)
