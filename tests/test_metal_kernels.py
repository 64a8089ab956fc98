"""The Metal kernels (metal/*.metal) run on the CPU harness (tests/metal_host).

Every instantiation (float32, float16, bfloat16; block and looped; forward and
backward; every loss and option) is dispatched through the launch plan that
eval_gpu uses (csrc/metal/launch_plan.cpp, via tests/metal_kernels/adaptor.cpp)
and compared with the package's CPU primitive (mlx_fused_losses._ext on
mx.cpu) and with the float64 reference (tests/reference.py). Each launch runs
under the harness's schedules (forward / reverse fiber order, two poison
bytes, random order): their outputs must agree bit for bit, no guard byte may
change, and outputs are pre-filled with a sentinel so that an unwritten or
poisoned element fails the comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING, needs_libclang
from metal_host.kernel_names import kernel_names
import reference as ref

pytestmark = [
    pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING),
    # Rows of all -inf make the float64 reference compute -inf - -inf on purpose
    # (the expected result there is NaN).
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402  (missing: a failure, not a skip)

REPO = Path(__file__).resolve().parents[1]
METAL = ["metal/cross_entropy.metal", "metal/softmax_focal.metal", "metal/pointwise_loss.metal"]
ADAPTOR = "tests/metal_kernels/adaptor.cpp"

V_LIST = [1, 31, 32, 33, 1023, 1024, 1025, 4095, 4097, 50257]
DTYPES = ["float32", "float16", "bfloat16"]
DT_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}
MX_DT = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Relative tolerance of a value stored in the dtype (a few ulps).
DT_TOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
SENTINEL = np.float32(-7777.0)  # outputs start here: an unwritten element shows

USED_KERNELS: set[str] = set()


# ---- helpers -----------------------------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), r)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def as_device(a: np.ndarray, dtype: str):
    """(array to pass to the kernel, the same values as float32)."""
    a = np.asarray(a, np.float32)
    if dtype == "float32":
        d = a.copy()
        return d, d.copy()
    if dtype == "float16":
        d = a.astype(np.float16)
        return d, d.astype(np.float32)
    d = to_bf16_bits(a)
    return d, from_bf16_bits(d)


def from_device(d: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return from_bf16_bits(d)
    return d.astype(np.float32)


def device_empty(shape, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.full(shape, SENTINEL, np.float32)
    if dtype == "float16":
        return np.full(shape, SENTINEL, np.float16)
    return np.full(shape, to_bf16_bits(np.array([SENTINEL]))[0], np.uint16)


def mx_array(a32: np.ndarray, dtype: str):
    return mx.array(a32).astype(MX_DT[dtype])


def np_of(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def assert_close(actual, expected, rtol, atol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    fin = ~np.isnan(expected)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol, err_msg=what)


def plan(lib, which, dt="float32", rows=1, n=1, a=0, b=0, max_threads=1024):
    out = np.zeros(10, np.uint32)
    name = np.zeros(512, np.uint8)
    lib.run("plan_info", np.int32(which), np.int32(DT_CODE[dt]), np.int64(rows), np.int64(n),
            np.int32(a), np.int32(b), np.int32(max_threads), out, name,
            schedules=(mh.Schedule(),))
    text = bytes(name).split(b"\0")[0].decode()
    kernel, *buffers = text.split(",")
    keys = ["looped", "gx", "gy", "gz", "tx", "ty", "tz", "tg_bytes", "elems", "nbuf"]
    info = dict(zip(keys, map(int, out)))
    info["name"] = kernel
    info["buffers"] = buffers
    return info


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


def host_names() -> set[str]:
    """Every kernel name the .metal files define (derived from the sources after
    preprocessing: metal_host/kernel_names.py)."""
    return kernel_names(METAL)


# ---- static checks and plans ------------------------------------------------------------


@needs_libclang
@pytest.mark.parametrize("path", METAL)
def test_static_address_spaces(path):
    from metal_host import static_check

    r = static_check.check(path)
    assert r.ok, r.diagnostics


def test_kernel_table_is_the_sources_names(lib):
    # The harness finds a plan's kernel in a table build.py generates from the
    # sources: it holds every name they define, and no other.
    buf = np.zeros(1 << 16, np.uint8)
    lib.run("mh_kernel_names", buf, np.uint32(buf.size), schedules=(mh.Schedule(),))
    names = bytes(buf).split(b"\0")[0].decode().split()
    assert len(names) == len(set(names))
    assert set(names) == host_names()


@pytest.mark.parametrize("max_threads", [1024, 512, 992])
@pytest.mark.parametrize("K", V_LIST + [4096, 4100, 2048, 2049, 1 << 20])
def test_row_plan_rules(lib, K, max_threads):
    usable = max_threads // 32 * 32
    for which, a in ((0, 0), (0, 1), (2, 0)):
        p = plan(lib, which, rows=5, n=K, a=a, b=a, max_threads=max_threads)
        looped = K > usable * 4
        assert p["looped"] == looped
        assert p["name"].startswith(("fl_ce_fwd_looped" if looped else "fl_ce_fwd_block") if which == 0
                                    else ("fl_sf_fwd_looped" if looped else "fl_sf_fwd_block"))
        assert (p["gx"], p["gy"], p["gz"]) == (5, 1, 1)
        assert p["tx"] % 32 == 0 and 32 <= p["tx"] <= usable and p["ty"] == p["tz"] == 1
        if not looped:
            assert p["tx"] * 4 >= K and (p["tx"] == 32 or (p["tx"] - 32) * 4 < K)
        assert p["tg_bytes"] == 1024 and p["elems"] == 4
        assert p["nbuf"] == (13 if which == 0 else 8) == len(p["buffers"])
    for which in (1, 3):
        p = plan(lib, which, rows=5, n=K)
        assert p["gy"] == 5 and p["tx"] % 32 == 0 and p["tx"] <= 256
        assert p["gx"] * p["tx"] * 4 >= K > (p["gx"] - 1) * p["tx"] * 4
        assert p["tg_bytes"] == 0


def test_plan_buffer_orders(lib):
    assert plan(lib, 0)["buffers"] == ["logits", "class_index", "target_probs", "class_weights",
                                       "loss", "lse", "lse_lo", "a_sum", "args", "stat_lse",
                                       "entropy", "argmax", "correct"]
    assert plan(lib, 1)["buffers"] == ["logits", "class_index", "target_probs", "class_weights",
                                       "lse", "lse_lo", "a_sum", "g_loss", "g_lse", "grad", "args"]
    assert plan(lib, 2)["buffers"] == ["logits", "class_index", "class_alpha", "loss", "lse",
                                       "lse_lo", "coef", "args"]
    assert plan(lib, 3)["buffers"] == ["logits", "class_index", "lse", "lse_lo", "coef", "g_loss",
                                       "grad", "args"]
    assert plan(lib, 4, n=10)["buffers"] == ["pred", "target", "loss", "args", "target_layout"]
    assert plan(lib, 4, n=10, b=1)["buffers"] == ["pred", "target", "partials", "args",
                                                  "target_layout"]
    assert plan(lib, 5, n=10)["buffers"] == ["pred", "target", "cotan", "grad", "args",
                                             "target_layout"]
    assert plan(lib, 6, n=3)["buffers"] == ["partials", "out", "args"]
    # Fixed partition of the fused sum: 8192 elements per group, whatever n.
    p = plan(lib, 4, n=100_000, b=2)
    assert (p["gx"], p["tx"], p["tg_bytes"]) == (13, 256, 128)
    assert plan(lib, 6, n=13)["tx"] == 32 and plan(lib, 6, n=5000)["tx"] == 1024
    assert plan(lib, 0, rows=0, n=10)["gx"] == 0  # nothing to launch


# ---- cross-entropy --------------------------------------------------------------------

CE_CASES = {
    "plain": dict(soft=False, weighted=False, ls=0.0, mode="uniform", ignore=None, z=0.0),
    "smooth_w_z_ignore": dict(soft=False, weighted=True, ls=0.1, mode="uniform", ignore=-100, z=1e-3),
    "others_ignore": dict(soft=False, weighted=False, ls=0.2, mode="others", ignore=2, z=0.0),
    "soft": dict(soft=True, weighted=False, ls=0.0, mode="uniform", ignore=None, z=0.0),
    "soft_w_others_z": dict(soft=True, weighted=True, ls=0.1, mode="others", ignore=None, z=1e-4),
    # logit_softcap: the kernels cap every logit they read (csrc/math/softcap.h)
    "cap_w_z_ignore": dict(soft=False, weighted=True, ls=0.1, mode="uniform", ignore=-100, z=1e-3,
                           cap=2.5),
    "soft_cap": dict(soft=True, weighted=False, ls=0.0, mode="uniform", ignore=None, z=0.0, cap=4.0),
    # class weights < 0 (PyTorch takes them): nothing in the kernels assumes w >= 0 (one
    # case: the soft path sums the same weighted gaps, and each case costs ~30 s here)
    "neg_w_smooth_z_ignore": dict(soft=False, weighted=True, ls=0.1, mode="uniform", ignore=-100,
                                  z=1e-3, negative_weights=True),
}


def ce_inputs(K, case, rng):
    """Logits with awkward rows, targets, class weights (float32 values)."""
    big = K >= 4095
    n_plain = 2 if big else 5
    x = (rng.standard_normal((n_plain + 4, K)) * 3).astype(np.float32)
    x[1, ::3] = -np.inf  # some -inf logits (the target is moved off them)
    x[-1, :] = -np.inf  # a row of -inf
    if case["soft"]:
        t = rng.random((x.shape[0], K)).astype(np.float32)
        if K > 1:
            t[1, ::3] = 0.0  # no mass on the -inf logits
        t /= t.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, K, x.shape[0]).astype(np.int64)
        t[1] = min(1, K - 1)  # off the -inf columns 0, 3, 6, ... (when K > 1)
        t[-2] = K  # out of range
        t[-3] = -5 if case["ignore"] != -5 else -6  # negative, out of range
        if case["ignore"] is not None:
            t[-4] = case["ignore"]
    w = (0.5 + rng.random(K)).astype(np.float32)
    if case.get("negative_weights"):
        w = rng.uniform(-1.5, 1.5, K).astype(np.float32)
    return x, t, w


def ce_run(lib, dtype, K, case, rng, g_lse_scale=0.0, inputs=None, stats=False):
    """Forward and backward kernels on ce_inputs (or the given (x, t, w));
    stats: the forward with return_stats (its outputs under "stats")."""
    x32, t32, w = ce_inputs(K, case, rng) if inputs is None else inputs
    xd, xr = as_device(x32, dtype)
    rows = xd.shape[0]
    if case["soft"]:
        td, tr = as_device(t32, dtype)
        index = np.zeros(1, np.int64)
    else:
        td, tr, index = xd, t32, t32
    mode = 0 if case["mode"] == "uniform" else 1
    has_ig = case["ignore"] is not None
    ig = case["ignore"] if has_ig else -100
    weights = w if case["weighted"] else np.ones(1, np.float32)
    loss, lse, lse_lo, asum = (np.full(rows, SENTINEL, np.float32) for _ in range(4))
    code = np.int32(DT_CODE[dtype])
    common = (np.int64(rows), np.int32(K), np.float32(case["ls"]), np.int32(mode),
              np.int32(has_ig), np.int64(ig), np.float32(case["z"]), np.float32(case.get("cap", 0.0)))
    n_stat = rows if stats else 1  # (without stats: never touched)
    stat_out = dict(lse=np.full(n_stat, SENTINEL, np.float32),
                    entropy=np.full(n_stat, SENTINEL, np.float32),
                    argmax=np.full(n_stat, -7, np.int64), correct=np.full(n_stat, 7, np.uint8))
    lib.run("ce_forward_run", code, np.int32(case["soft"]), np.int32(case["weighted"]),
            np.int32(1024), xd, index, td, weights, loss, lse, lse_lo, asum, *common,
            np.int32(stats), *stat_out.values())
    USED_KERNELS.add(plan(lib, 0, dtype, rows, K, case["soft"], case["weighted"])["name"])

    g_loss = (0.5 + rng.random(rows)).astype(np.float32)
    g_lse = (g_lse_scale * rng.standard_normal(rows)).astype(np.float32)
    grad = device_empty(xd.shape, dtype)
    lib.run("ce_backward_run", code, np.int32(case["soft"]), np.int32(case["weighted"]),
            xd, index, td, weights, lse, lse_lo, asum, g_loss, g_lse, grad, *common)
    USED_KERNELS.add(plan(lib, 1, dtype, rows, K, case["soft"], case["weighted"])["name"])
    return dict(x=xr, t=tr, w=w, loss=loss, lse=lse, lse_lo=lse_lo, asum=asum, g_loss=g_loss,
                g_lse=g_lse, stats=stat_out if stats else None,
                grad=from_device(grad, dtype))


def ce_kwargs(case, w):
    return dict(label_smoothing=case["ls"], label_smoothing_mode=case["mode"],
                ignore_index=case["ignore"], z_loss=case["z"], logit_softcap=case.get("cap"))


@pytest.mark.parametrize("K", V_LIST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_name", list(CE_CASES))
def test_cross_entropy(lib, case_name, dtype, K):
    case = CE_CASES[case_name]
    rng = np.random.default_rng(K * 7 + DT_CODE[dtype])
    r = ce_run(lib, dtype, K, case, rng)
    x, t, w = r["x"], r["t"], r["w"]
    kw = ce_kwargs(case, w)
    cw = w if case["weighted"] else None

    # float64 reference
    exp_loss = ref.cross_entropy(x, t, class_weights=cw, **kw)
    scale = 1.0 + np.abs(np.nan_to_num(ref.logsumexp(x), posinf=0, neginf=0))
    tol = 3e-6 * max(1.0, np.log2(K))
    assert_close(r["loss"], exp_loss, rtol=tol, atol=tol * scale.max(), what="loss vs float64")
    valid = np.isfinite(exp_loss)
    if not case["soft"]:
        valid &= (t >= 0) & (t < K) & (t != case["ignore"])
    lse_ref = ref.logsumexp(ref.softcap(x, case.get("cap")))
    assert_close(r["lse"][valid], lse_ref[valid], rtol=tol, atol=tol, what="lse")
    if not case["soft"]:
        ign = (t == case["ignore"]) if case["ignore"] is not None else np.zeros(t.shape, bool)
        oob = ~ign & ((t < 0) | (t >= K))
        assert ign.any() == (case["ignore"] is not None) and oob.sum() >= 2
        assert np.all(r["loss"][ign] == 0) and np.all(r["lse"][ign] == 0)
        assert np.all(r["asum"][ign] == 0)
        assert np.all(np.isnan(r["loss"][oob])) and np.all(np.isnan(r["asum"][oob]))
        assert np.all(r["lse"][oob] == 0)

    # the CPU primitive on the same (rounded) inputs
    xm = mx_array(x, dtype)
    tm = mx_array(t, dtype) if case["soft"] else mx.array(t)
    cwm = mx.array(w) if case["weighted"] else None
    cpu_loss = ext.cross_entropy(xm, tm, class_weights=cwm, stream=mx.cpu, **kw)
    assert_close(r["loss"], np_of(cpu_loss), rtol=tol, atol=tol * scale.max(), what="loss vs CPU")

    # backward: g_loss per row, g_lse = 0 (what the CPU vjp of the loss gives)
    _, (cpu_grad,) = mx.vjp(
        lambda a: ext.cross_entropy(a, tm, class_weights=cwm, stream=mx.cpu, **kw),
        [xm], [mx.array(r["g_loss"])])
    cpu_grad = np_of(cpu_grad)
    exp_grad = ref.cross_entropy_grad(x, t, class_weights=cw, cotangent=r["g_loss"], **kw)
    gscale = np.nanmax(np.abs(np.where(np.isinf(exp_grad), np.nan, exp_grad))) if np.any(
        np.isfinite(exp_grad)) else 1.0
    # Terms of size g * w * q (~1 for the target) cancel in a gradient element.
    gscale = max(gscale, float(r["g_loss"].max()) * (float(w.max()) if case["weighted"] else 1.0))
    gtol = DT_TOL[dtype] + 4e-6
    assert_close(r["grad"], cpu_grad, rtol=gtol, atol=gtol * gscale, what="grad vs CPU")
    assert_close(r["grad"], exp_grad, rtol=gtol + 1e-5, atol=(gtol + 1e-5) * gscale,
                 what="grad vs float64")


@pytest.mark.parametrize("K", [33, 4097])
@pytest.mark.parametrize("case_name", ["plain", "soft_w_others_z"])
def test_cross_entropy_lse_cotangent(lib, case_name, K):
    """The g_lse input of the backward kernel: grad += g_lse * softmax(x)."""
    case = CE_CASES[case_name]
    rng = np.random.default_rng(K)
    r = ce_run(lib, "float32", K, case, rng, g_lse_scale=1.0)
    x, t, w = r["x"], r["t"], r["w"]
    cw = w if case["weighted"] else None
    exp = ref.cross_entropy_grad(x, t, class_weights=cw, cotangent=r["g_loss"], **ce_kwargs(case, w))
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(x.astype(np.float64) - ref.logsumexp(x)[:, None])
    exp = exp + r["g_lse"][:, None] * p
    if not case["soft"]:
        bad = (t < 0) | (t >= K)
        exp[bad] = np.nan
    assert_close(r["grad"], exp, rtol=2e-5, atol=2e-6, what="grad with g_lse")


@pytest.mark.parametrize("K", [1, 33, 1025, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_name", list(CE_CASES))
def test_cross_entropy_stats(lib, case_name, dtype, K):
    """return_stats (CeArgs.stats): the loss outputs are the bits the plain
    forward writes; lse, entropy, argmax and correct of every row (ignored,
    out-of-range and all -inf rows included) against float64 and equal to
    the CPU primitive's (argmax and correct: exactly; the same float32
    soft-cap formula on both). Block (K <= 4096) and looped variants; a
    row whose max appears twice, in different threads (the first wins)."""
    case = CE_CASES[case_name]
    rng = np.random.default_rng(K * 11 + DT_CODE[dtype])
    x, t, w = ce_inputs(K, case, rng)
    if K > 1:
        x[0, K // 2] = x[0, K - 1] = x[0].max() + 1.0  # a tie: index K // 2 wins
    plain = ce_run(lib, dtype, K, case, np.random.default_rng(0), inputs=(x, t, w))
    r = ce_run(lib, dtype, K, case, np.random.default_rng(0), inputs=(x, t, w), stats=True)
    for key in ("loss", "lse", "lse_lo", "asum", "grad"):
        np.testing.assert_array_equal(r[key], plain[key], err_msg=key)
    s = r["stats"]
    xr, tr = r["x"], r["t"]
    z64 = ref.softcap(xr, case.get("cap"))
    lse64 = ref.logsumexp(z64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.exp(z64 - lse64[:, None])
        ent64 = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    ent64[np.isneginf(lse64)] = np.nan  # a row of -inf has no softmax
    tol = 3e-6 * max(1.0, np.log2(K))
    assert_close(s["lse"], lse64, rtol=tol, atol=tol, what="stat lse")
    assert_close(s["entropy"], ent64, rtol=tol, atol=tol * (1.0 + np.log(K)), what="entropy")
    assert set(np.unique(s["correct"])) <= {0, 1}
    # the CPU primitive on the same (rounded) inputs
    xm = mx_array(xr, dtype)
    tm = mx_array(tr, dtype) if case["soft"] else mx.array(tr)
    cwm = mx.array(w) if case["weighted"] else None
    cpu = ext.cross_entropy_outputs(xm, tm, class_weights=cwm, stream=mx.cpu, return_stats=True,
                                    **ce_kwargs(case, w))
    np.testing.assert_array_equal(s["argmax"], np.array(cpu[4]))
    np.testing.assert_array_equal(s["correct"].astype(bool), np.array(cpu[5]))
    assert_close(s["lse"], np.array(cpu[2]), rtol=tol, atol=tol, what="lse vs CPU")
    assert_close(s["entropy"], np.array(cpu[3]), rtol=tol, atol=tol * (1.0 + np.log(K)),
                 what="entropy vs CPU")
    if case.get("cap") is None:  # (float64 capping cannot tie where float32 does)
        np.testing.assert_array_equal(s["argmax"], z64.argmax(-1))
        if K > 1:
            assert s["argmax"][0] == K // 2
        cls = tr.argmax(-1) if case["soft"] else np.clip(tr, 0, K - 1).astype(np.int64)
        kept = np.ones(len(tr), bool) if case["soft"] else (
            (tr >= 0) & (tr < K) & ((tr != case["ignore"]) if case["ignore"] is not None else True))
        want = kept & (z64[np.arange(len(tr)), cls] == z64.max(-1))
        np.testing.assert_array_equal(s["correct"].astype(bool), want)


# ---- softmax focal ------------------------------------------------------------------------

SF_CASES = {
    "gamma2": dict(gamma=2.0, alpha=None, class_alpha=False, ignore=None),
    "gamma_half_class_alpha_ignore": dict(gamma=0.5, alpha=None, class_alpha=True, ignore=-1),
    "gamma0_alpha": dict(gamma=0.0, alpha=0.25, class_alpha=False, ignore=None),
}


@pytest.mark.parametrize("K", V_LIST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case_name", list(SF_CASES))
def test_softmax_focal(lib, case_name, dtype, K):
    case = SF_CASES[case_name]
    rng = np.random.default_rng(K * 11 + DT_CODE[dtype])
    x32, t, _ = ce_inputs(K, dict(soft=False, ignore=case["ignore"]), rng)
    x32[0, t[0]] = 12.0  # a confident row: 1 - p_t tiny, exercises s_other
    xd, x = as_device(x32, dtype)
    rows = x.shape[0]
    alpha_arr = (0.1 + 0.8 * rng.random(K)).astype(np.float32)
    alpha_s = 1.0 if case["alpha"] is None else case["alpha"]
    has_ig = case["ignore"] is not None
    ig = case["ignore"] if has_ig else -100
    code = np.int32(DT_CODE[dtype])
    loss, lse, lse_lo, coef = (np.full(rows, SENTINEL, np.float32) for _ in range(4))
    params = (np.int64(rows), np.int32(K), np.float32(case["gamma"]), np.float32(alpha_s),
              np.int32(case["class_alpha"]), np.int32(has_ig), np.int64(ig))
    alpha_buf = alpha_arr if case["class_alpha"] else np.ones(1, np.float32)
    lib.run("sf_forward_run", code, np.int32(1024), xd, t, alpha_buf, loss, lse, lse_lo, coef,
            *params)
    USED_KERNELS.add(plan(lib, 2, dtype, rows, K)["name"])
    g_loss = (0.5 + rng.random(rows)).astype(np.float32)
    grad = device_empty(xd.shape, dtype)
    lib.run("sf_backward_run", code, xd, t, lse, lse_lo, coef, g_loss, grad, *params)
    USED_KERNELS.add(plan(lib, 3, dtype, rows, K)["name"])
    grad = from_device(grad, dtype)

    ref_alpha = alpha_arr if case["class_alpha"] else case["alpha"]
    # The reference knows no out-of-range index: those rows must be NaN here.
    oob = ((t < 0) | (t >= K)) & (t != case["ignore"])
    assert oob.sum() >= 2
    t_ref = np.where(oob, 0, t)
    exp = ref.softmax_focal(x, t_ref, alpha=ref_alpha, gamma=case["gamma"],
                            ignore_index=case["ignore"])
    exp[oob] = np.nan
    assert np.all(np.isnan(coef[oob])) and np.all(lse[oob] == 0)
    tol = 5e-6 * max(1.0, np.log2(K))
    assert_close(loss, exp, rtol=tol, atol=tol, what="focal loss vs float64")
    xm = mx_array(x, dtype)
    kw = dict(gamma=case["gamma"], alpha=case["alpha"],
              class_alpha=mx.array(alpha_arr) if case["class_alpha"] else None,
              ignore_index=case["ignore"])
    cpu = ext.softmax_focal_loss(xm, mx.array(t), stream=mx.cpu, **kw)
    assert_close(loss, np_of(cpu), rtol=tol, atol=tol, what="focal loss vs CPU")

    _, (cpu_grad,) = mx.vjp(lambda a: ext.softmax_focal_loss(a, mx.array(t), stream=mx.cpu, **kw),
                            [xm], [mx.array(g_loss)])
    exp_grad = ref.softmax_focal_grad(x, t_ref, alpha=ref_alpha, gamma=case["gamma"],
                                      ignore_index=case["ignore"], cotangent=g_loss)
    exp_grad[oob] = np.nan
    fin = np.isfinite(exp_grad)
    gscale = np.abs(exp_grad[fin]).max() if fin.any() else 1.0
    gtol = DT_TOL[dtype] + 1e-5
    assert_close(grad, np_of(cpu_grad), rtol=gtol, atol=gtol * gscale, what="focal grad vs CPU")
    assert_close(grad, exp_grad, rtol=gtol + 2e-5, atol=(gtol + 2e-5) * gscale,
                 what="focal grad vs float64")


# ---- element-wise losses ------------------------------------------------------------------

PW_CASES = {
    "smooth_l1": (0, 1.0, 0.0),
    "smooth_l1_beta0": (0, 0.0, 0.0),
    "huber": (1, 1.5, 0.0),
    "sigmoid_focal": (2, 0.25, 2.0),
    "sigmoid_focal_noalpha_g05": (2, -1.0, 0.5),
}
PW_N = [1, 33, 1023, 1025, 8193, 50257]
# The kernels' own kind for the sigmoid focal loss at gamma = 2 (kernel_args.h,
# FL_PW_KIND_FOCAL_GAMMA_TWO; launch_plan.cpp's pw_kernel_kind picks it).
KIND_FOCAL_GAMMA_TWO = 3


def kernel_kind(kind, gamma):
    return KIND_FOCAL_GAMMA_TWO if kind == 2 and gamma == 2.0 else kind
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def pw_reference(kind, p0, p1, x, t, reduction, cot):
    if kind == 0:
        return (ref.smooth_l1(x, t, beta=p0, reduction=reduction),
                ref.smooth_l1_grad(x, t, beta=p0, reduction=reduction, cotangent=cot))
    if kind == 1:
        return (ref.huber(x, t, delta=p0, reduction=reduction),
                ref.huber_grad(x, t, delta=p0, reduction=reduction, cotangent=cot))
    return (ref.sigmoid_focal(x, t, alpha=p0, gamma=p1, reduction=reduction),
            ref.sigmoid_focal_grad(x, t, alpha=p0, gamma=p1, reduction=reduction, cotangent=cot))


def pw_cpu(kind, p0, p1, xm, tm, reduction):
    if kind == 0:
        return ext.smooth_l1_loss(xm, tm, beta=p0, reduction=reduction, stream=mx.cpu)
    if kind == 1:
        return ext.huber_loss(xm, tm, delta=p0, reduction=reduction, stream=mx.cpu)
    return ext.sigmoid_focal_loss(xm, tm, alpha=p0, gamma=p1, reduction=reduction, stream=mx.cpu)


@pytest.mark.parametrize("n", PW_N)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("case_name", list(PW_CASES))
def test_pointwise(lib, case_name, reduction, dtype, n):
    kind, p0, p1 = PW_CASES[case_name]
    rng = np.random.default_rng(n + 3 * DT_CODE[dtype])
    x32 = (rng.standard_normal(n) * 3).astype(np.float32)
    if kind == 2:
        t32 = (rng.random(n) < 0.3).astype(np.float32)
        t32[::5] = rng.random(t32[::5].size)  # some soft targets
        x32[:3] = [30.0, -30.0, 0.0][: min(3, n)]
    else:
        t32 = (rng.standard_normal(n) * 2).astype(np.float32)
        t32[::7] = x32[::7]  # d = 0 exactly
    xd, x = as_device(x32, dtype)
    td, t = as_device(t32, dtype)
    red = REDUCTIONS[reduction]
    code = np.int32(DT_CODE[dtype])
    # The element-wise loss comes back in the predictions' dtype.
    out = device_empty(n, dtype) if red == 0 else np.full(1, SENTINEL, np.float32)
    partials = np.full(max(1, -(-n // 8192)), SENTINEL, np.float32)
    lib.run("pw_forward_run", code, np.int32(kind), np.int32(red), xd, td, out, partials,
            np.uint64(n), np.float32(p0), np.float32(p1))
    USED_KERNELS.add(plan(lib, 4, dtype, n=n, a=kernel_kind(kind, p1), b=red)["name"])
    if red:
        USED_KERNELS.add("fl_pw_sum_finish")
    out = from_device(out, dtype) if red == 0 else out
    # An element-wise cotangent comes in the loss's dtype (read as such by the
    # _cot16 kernels); a reduced loss's is a float32 scalar.
    cot16 = red == 0 and dtype != "float32"
    cot32 = (0.5 + rng.random(n)).astype(np.float32) if red == 0 else np.array([1.7], np.float32)
    cotd, cot = as_device(cot32, dtype) if cot16 else (cot32, cot32)
    grad = device_empty(n, dtype)
    lib.run("pw_backward_run", code, np.int32(kind), np.int32(red), xd, td, cotd, np.int32(cot16),
            grad, np.uint64(n), np.float32(p0), np.float32(p1))
    USED_KERNELS.add(plan(lib, 5, dtype, n=n, a=kernel_kind(kind, p1), b=int(cot16))["name"])
    grad = from_device(grad, dtype)
    if cot16:
        # The same cotangent values as float32 (the float32-cotangent kernel,
        # which vmap of a reduced loss uses): the same gradient bits.
        grad_f32cot = device_empty(n, dtype)
        lib.run("pw_backward_run", code, np.int32(kind), np.int32(red), xd, td, cot.copy(),
                np.int32(0), grad_f32cot, np.uint64(n), np.float32(p0), np.float32(p1))
        USED_KERNELS.add(plan(lib, 5, dtype, n=n, a=kernel_kind(kind, p1), b=0)["name"])
        np.testing.assert_array_equal(from_device(grad_f32cot, dtype), grad)

    exp, exp_grad = pw_reference(kind, p0, p1, x, t, reduction, cot if red == 0 else cot[0])
    exp = np.reshape(exp, out.shape)
    # Element-wise: float32 math rounded once to the dtype.
    tol = (2e-6 + (DT_TOL[dtype] if dtype != "float32" else 0.0)) if red == 0 else 1e-5
    assert_close(out, exp, rtol=tol, atol=tol, what="loss vs float64")
    xm, tm = mx_array(x, dtype), mx_array(t, dtype)
    cpu = np.reshape(np_of(pw_cpu(kind, p0, p1, xm, tm, reduction)), out.shape)
    assert_close(out, cpu, rtol=tol, atol=tol, what="loss vs CPU")

    cot_m = mx_array(cot, dtype) if cot16 else mx.array(cot if red == 0 else cot[0])
    _, (cpu_grad,) = mx.vjp(lambda a: pw_cpu(kind, p0, p1, a, tm, reduction), [xm], [cot_m])
    # A gradient element is a difference of terms of size ~ g * alpha (focal:
    # (p - t) m^gamma + focus term), so float32 rounding (and FMA contraction,
    # which the CPU build and Metal may apply differently) is absolute, relative
    # to the largest element; float16 results below 6.1e-5 are subnormal.
    gtol = DT_TOL[dtype] + 2e-6
    gscale = max(np.abs(exp_grad).max(), 1e-30)
    gatol = 3e-7 * gscale + (6e-8 if dtype == "float16" else 0.0)
    assert_close(grad, np_of(cpu_grad), rtol=gtol, atol=gatol, what="grad vs CPU")
    assert_close(grad, exp_grad, rtol=gtol + 1e-5, atol=gatol, what="grad vs float64")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_sigmoid_focal_gamma_two_is_the_cpu_instantiation(lib, dtype):
    """gamma = 2 runs the kernels' own instantiation (m * m, as the CPU's kernels),
    not exp(2 log m): loss and gradient equal the CPU's bit for bit, float32
    included since the shared formulas ask for their FMAs by name (flm::mul_add)
    and nothing else is contracted on either side (float32 used to differ in the
    last bits where GCC contracted the CPU clones' a * b + c); the generic pow
    path is further off."""
    n = 4099
    rng = np.random.default_rng(2)
    x32 = (rng.standard_normal(n) * 4).astype(np.float32)
    t32 = (rng.random(n) < 0.3).astype(np.float32)
    t32[::5] = rng.random(t32[::5].size)
    xd, x = as_device(x32, dtype)
    td, t = as_device(t32, dtype)
    xm, tm = mx_array(x, dtype), mx_array(t, dtype)
    code = np.int32(DT_CODE[dtype])
    # The cotangent in the predictions' dtype, as the loss it belongs to.
    cot16 = dtype != "float32"
    cotd, cot = as_device((0.5 + rng.random(n)).astype(np.float32), dtype)
    cpu_loss = np_of(pw_cpu(2, 0.25, 2.0, xm, tm, "none")).astype(np.float32)
    _, (cpu_grad,) = mx.vjp(lambda a: pw_cpu(2, 0.25, 2.0, a, tm, "none"), [xm],
                            [mx_array(cot, dtype)])
    cpu_grad = np_of(cpu_grad).astype(np.float32)
    single = (mh.Schedule(),)  # schedules are compared by test_pointwise
    differ = {}
    for gamma in (2.0, np.nextafter(np.float32(2), np.float32(3))):  # specialised, generic
        loss = device_empty(n, dtype)
        lib.run("pw_forward_run", code, np.int32(2), np.int32(0), xd, td, loss,
                np.zeros(1, np.float32), np.uint64(n), np.float32(0.25), np.float32(gamma),
                schedules=single)
        loss = from_device(loss, dtype)
        grad = device_empty(n, dtype)
        lib.run("pw_backward_run", code, np.int32(2), np.int32(0), xd, td, cotd,
                np.int32(cot16), grad, np.uint64(n), np.float32(0.25), np.float32(gamma),
                schedules=single)
        grad = from_device(grad, dtype)
        differ[float(gamma)] = (np.count_nonzero(loss.view(np.uint32) != cpu_loss.view(np.uint32)),
                                np.count_nonzero(grad.view(np.uint32) != cpu_grad.view(np.uint32)))
    specialised, generic = differ[2.0], differ[max(differ)]
    assert specialised == (0, 0), differ
    assert sum(specialised) < sum(generic), differ


def test_pointwise_empty(lib):
    """n = 0: no element kernel runs; the sum/mean finish still writes 0."""
    for red in (1, 2):
        out = np.full(1, SENTINEL, np.float32)
        partials = np.full(1, SENTINEL, np.float32)
        x = np.zeros(1, np.float32)
        lib.run("pw_forward_run", np.int32(0), np.int32(0), np.int32(red), x, x, out, partials,
                np.uint64(0), np.float32(1), np.float32(0))
        assert out[0] == 0.0 and partials[0] == SENTINEL


# ---- broadcast targets, read in place (the _bcast kernels) ------------------------------------

MAX_TARGET_GROUPS = 8  # kernel_args.h FL_PW_MAX_TARGET_GROUPS


def layout_info(lib, pshape, tshape, which=4, dt="float32", kind=0, b=0):
    out = np.zeros(3 + 2 * MAX_TARGET_GROUPS, np.int64)
    name = np.zeros(128, np.uint8)
    lib.run("pw_layout_info", np.array(pshape, np.int64), np.int32(len(pshape)),
            np.array(tshape, np.int64), np.int32(len(tshape)), np.int32(which),
            np.int32(DT_CODE[dt]), np.int32(kind), np.int32(b), out, name,
            schedules=(mh.Schedule(),))
    nd = int(out[2])
    groups = list(zip(out[3:3 + nd].tolist(), out[3 + MAX_TARGET_GROUPS:3 + MAX_TARGET_GROUPS + nd].tolist()))
    return dict(fits=bool(out[0]), identity=bool(out[1]), groups=groups,
                name=bytes(name).split(b"\0")[0].decode())


def layout_index(groups, n):
    """The target element each flat prediction index meets, from the layout."""
    i = np.arange(n, dtype=np.int64)
    off = np.zeros(n, np.int64)
    for size, stride in groups:
        off += (i % size) * stride
        i //= size
    return off


@pytest.mark.parametrize("pshape, tshape, groups", [
    ((6, 5), (6, 5), [(30, 1)]),  # same shape: one advancing group, the plain kernel
    ((6, 5), (5,), [(5, 1)]),  # row: the outer broadcast group is dropped
    ((6, 5), (1, 5), [(5, 1)]),
    ((6, 5), (6, 1), [(5, 0), (6, 1)]),  # column
    ((6, 5), (), []),  # scalar
    ((4, 3, 5), (4, 1, 5), [(5, 1), (3, 0), (4, 5)]),  # middle axis
    ((2, 1, 3), (2, 1, 1), [(3, 0), (2, 1)]),  # unit axes never form a group
    ((3, 4, 5, 6), (4, 1, 1), [(30, 0), (4, 1)]),  # neighbouring broadcast axes merge
    ((1,), (), []),
])
def test_target_layout_rules(lib, pshape, tshape, groups):
    info = layout_info(lib, pshape, tshape)
    n = int(np.prod(pshape))
    assert info["fits"] and info["groups"] == groups
    identity = int(np.prod(tshape)) == n
    assert info["identity"] == identity
    for which, b in ((4, 0), (4, 1), (5, 0), (5, 1)):
        name = layout_info(lib, pshape, tshape, which, "float16", 1, b)["name"]
        assert name.endswith("_bcast") != identity, name


def test_target_layout_group_limit(lib):
    """At most 8 groups after the outer broadcast ones are dropped; 9 do not fit
    (the op then passes the target at full size)."""
    alt9 = (2, 1, 2, 1, 2, 1, 2, 1, 2)  # 9 groups, the outermost advancing
    assert not layout_info(lib, (2,) * 9, alt9)["fits"]
    assert not layout_info(lib, (2,) * 10, (2,) + alt9)["fits"]
    # 9 groups, the outermost broadcast (dropped): 8, which fit
    eight = layout_info(lib, (2,) * 9, (1, 2, 1, 2, 1, 2, 1, 2, 1))
    assert eight["fits"] and len(eight["groups"]) == 8 and eight["name"].endswith("_bcast")
    assert len(layout_info(lib, (2,) * 8, alt9[1:])["groups"]) == 7  # its outer group dropped


def test_target_layout_reads_the_broadcast_element(lib):
    """For random shapes, the layout maps every flat index to the element that
    NumPy's broadcast puts there."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        nd = int(rng.integers(0, 6))
        pshape = tuple(int(v) for v in rng.integers(1, 5, nd))
        tnd = int(rng.integers(0, nd + 1))
        tshape = tuple(v if rng.random() < 0.5 else 1 for v in pshape[nd - tnd:])
        info = layout_info(lib, pshape, tshape)
        if not info["fits"]:
            continue
        n = int(np.prod(pshape))
        want = np.broadcast_to(np.arange(int(np.prod(tshape))).reshape(tshape), pshape).ravel()
        assert np.array_equal(layout_index(info["groups"], n), want), (pshape, tshape)


def _transposed_middle(rng, shape):
    # (N, 1, K) as the transpose of a (K, N) array: non-contiguous; the op
    # makes it row-contiguous at its own size (ops/common.h dense) first.
    n, _, k = shape
    return rng.standard_normal((k, n)).T[:, None, :]


# pred shape, target maker, loss case (each kernel kind appears).
BCAST_CASES = {
    "scalar": ((37, 41), lambda rng, s: rng.standard_normal(()), "smooth_l1"),
    "row_1xK": ((70, 131), lambda rng, s: rng.standard_normal((1, s[1])), "huber"),
    "column_Nx1": ((129, 67), lambda rng, s: rng.standard_normal((s[0], 1)), "sigmoid_focal"),
    "middle_axis": ((5, 9, 203), lambda rng, s: rng.standard_normal((s[0], 1, s[2])),
                    "sigmoid_focal_noalpha_g05"),
    "transposed_middle": ((6, 5, 77), _transposed_middle, "smooth_l1_beta0"),
    "leading_axes": ((3, 4, 1000), lambda rng, s: rng.standard_normal((s[2],)), "smooth_l1"),
}


def _pw_bcast(lib, dtype, kind, red, pshape, xd, td, tshape, p0, p1, cotd, cot16, fence=0,
              schedules=mh.DEFAULT_SCHEDULES):
    n = int(np.prod(pshape))
    out = device_empty(n, dtype) if red == 0 else np.full(1, SENTINEL, np.float32)
    partials = np.full(max(1, -(-n // 8192)), SENTINEL, np.float32)
    ps, ts = np.array(pshape, np.int64), np.array(tshape, np.int64)
    lib.run("pw_forward_bcast_run", np.int32(DT_CODE[dtype]), np.int32(kind), np.int32(red), xd,
            td, out, partials, np.float32(p0), np.float32(p1), ps, np.int32(len(pshape)), ts,
            np.int32(len(tshape)), np.int32(fence), schedules=schedules)
    grad = device_empty(n, dtype)
    lib.run("pw_backward_bcast_run", np.int32(DT_CODE[dtype]), np.int32(kind), np.int32(red), xd,
            td, cotd, np.int32(cot16), grad, np.float32(p0), np.float32(p1), ps,
            np.int32(len(pshape)), ts, np.int32(len(tshape)), np.int32(fence),
            schedules=schedules)
    return out, partials, grad


def _bcast_inputs(case, dtype):
    pshape, make_target, loss_case = BCAST_CASES[case]
    kind, p0, p1 = PW_CASES[loss_case]
    rng = np.random.default_rng(len(case) + 7 * DT_CODE[dtype])
    n = int(np.prod(pshape))
    x32 = (rng.standard_normal(pshape) * 3).astype(np.float32)
    t_view = make_target(rng, pshape)
    if kind == 2:
        t_view = 1.0 / (1.0 + np.exp(-3 * t_view))  # probabilities, some near 0 / 1
        t_view = np.where(t_view > 0.7, 1.0, np.where(t_view < 0.3, 0.0, t_view))
    tshape = np.shape(t_view)
    xd, x = as_device(x32.ravel(), dtype)
    td, t = as_device(np.ascontiguousarray(t_view, np.float32).ravel(), dtype)
    return pshape, tshape, kind, p0, p1, n, rng, xd, x, td, t


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(BCAST_CASES))
def test_pointwise_broadcast_target(lib, case, dtype, reduction):
    """The _bcast kernels read the target in place and give the plain kernels'
    results on its full-size copy bit for bit (loss, fused sum, gradient), and
    the CPU primitive's with its broadcast target."""
    pshape, tshape, kind, p0, p1, n, rng, xd, x, td, t = _bcast_inputs(case, dtype)
    red = REDUCTIONS[reduction]
    code = np.int32(DT_CODE[dtype])
    kk = kernel_kind(kind, p1)
    cot16 = red == 0 and dtype != "float32"
    cot32 = (0.5 + rng.random(n)).astype(np.float32) if red == 0 else np.array([1.7], np.float32)
    cotd, cot = as_device(cot32, dtype) if cot16 else (cot32, cot32)
    out, partials, grad = _pw_bcast(lib, dtype, kind, red, pshape, xd, td, tshape, p0, p1, cotd,
                                    cot16)
    fwd = layout_info(lib, pshape, tshape, 4, dtype, kk, red)["name"]
    bwd = layout_info(lib, pshape, tshape, 5, dtype, kk, int(cot16))["name"]
    assert fwd.endswith("_bcast") and bwd.endswith("_bcast")
    USED_KERNELS.update({fwd, bwd} | ({"fl_pw_sum_finish"} if red else set()))

    # The plain kernels on the materialised target.
    t_full = np.broadcast_to(t.reshape(tshape), pshape).ravel()
    tfd, _ = as_device(t_full, dtype)
    one = (mh.Schedule(),)
    out_f = device_empty(n, dtype) if red == 0 else np.full(1, SENTINEL, np.float32)
    part_f = np.full(partials.size, SENTINEL, np.float32)
    lib.run("pw_forward_run", code, np.int32(kind), np.int32(red), xd, tfd, out_f, part_f,
            np.uint64(n), np.float32(p0), np.float32(p1), schedules=one)
    grad_f = device_empty(n, dtype)
    lib.run("pw_backward_run", code, np.int32(kind), np.int32(red), xd, tfd, cotd, np.int32(cot16),
            grad_f, np.uint64(n), np.float32(p0), np.float32(p1), schedules=one)
    assert np.array_equal(out.view(np.uint8), out_f.view(np.uint8)), "loss vs full-size target"
    if red:
        assert np.array_equal(partials.view(np.uint32), part_f.view(np.uint32)), "partial sums"
    assert np.array_equal(grad.view(np.uint8), grad_f.view(np.uint8)), "grad vs full-size target"
    if cot16:
        # the float32-cotangent _bcast kernel (vmap of a reduced loss): same bits
        _, _, grad32 = _pw_bcast(lib, dtype, kind, red, pshape, xd, td, tshape, p0, p1,
                                 cot.copy(), 0, schedules=one)
        USED_KERNELS.add(layout_info(lib, pshape, tshape, 5, dtype, kk, 0)["name"])
        assert np.array_equal(grad32.view(np.uint8), grad.view(np.uint8))

    # The CPU primitive with the broadcast target (read in place there too).
    out = from_device(out, dtype) if red == 0 else out
    xm = mx_array(x, dtype).reshape(pshape)
    tm = mx_array(t, dtype).reshape(tshape)
    cpu = np.reshape(np_of(pw_cpu(kind, p0, p1, xm, tm, reduction)), out.shape)
    tol = (2e-6 + (DT_TOL[dtype] if dtype != "float32" else 0.0)) if red == 0 else 1e-5
    assert_close(out, cpu, rtol=tol, atol=tol, what="loss vs CPU")
    cot_m = mx_array(cot, dtype).reshape(pshape) if cot16 else (
        mx.array(cot).reshape(pshape) if red == 0 else mx.array(cot[0]))
    _, (cpu_grad,) = mx.vjp(lambda a: pw_cpu(kind, p0, p1, a, tm, reduction), [xm], [cot_m])
    cpu_grad = np_of(cpu_grad).ravel()
    gscale = max(np.abs(cpu_grad).max(), 1e-30)
    gatol = 3e-7 * gscale + (6e-8 if dtype == "float16" else 0.0)
    assert_close(from_device(grad, dtype), cpu_grad, rtol=DT_TOL[dtype] + 2e-6, atol=gatol,
                 what="grad vs CPU")
    if kk == KIND_FOCAL_GAMMA_TWO and red == 0:
        # gamma = 2: the CPU's own instantiation, bit for bit (as above)
        assert np.array_equal(out.astype(np.float32), cpu.astype(np.float32))
        assert np.array_equal(from_device(grad, dtype), cpu_grad.astype(np.float32))


FENCED_BCAST = r"""
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import metal_host as mh
import test_metal_kernels as t
lib = mh.build(t.METAL, t.ADAPTOR, include_dirs=("csrc",))
for case in t.BCAST_CASES:
    for red in (0, 2):
        pshape, tshape, kind, p0, p1, n, rng, xd, x, td, tv = t._bcast_inputs(case, "float16")
        cot = np.ones(n if red == 0 else 1, np.float32)
        for fence in (1, 2):
            t._pw_bcast(lib, "float16", kind, red, pshape, xd, td, tshape, p0, p1, cot, 0,
                        fence=fence, schedules=(mh.Schedule(),))
print("fenced broadcast ok")
"""


def test_broadcast_target_never_read_out_of_bounds(lib):
    """The target against an inaccessible page just past its end / before its
    start (16-bit: the last element ends at the page): a stray read faults.
    In a subprocess, so such a fault fails this test only."""
    import subprocess
    import sys

    code = FENCED_BCAST.format(tests=str(REPO / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "fenced broadcast ok" in proc.stdout, (
        f"rc {proc.returncode} (-11: a read hit an inaccessible page)\n{proc.stderr[-3000:]}")


# ---- numerics at large logits (issue 7 item 2, issue 10 backward accuracy) -----------------


def _rel_l2(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("K", [33, 4097])
@pytest.mark.parametrize("case_name", ["plain", "smooth_w_z_ignore", "soft", "soft_w_others_z"])
def test_cross_entropy_large_offset(lib, case_name, K, offset):
    """Logits offset + N(0, 1): the gaps are kept relative to the running max,
    so the float32 loss is within 1e-6 of float64 (a gap formed from raw sums,
    m * sum(w) - sum(w x), lost 2e-5 (smoothing) to 1.6e-3 (soft) here)."""
    case = dict(CE_CASES[case_name], ignore=None)
    rng = np.random.default_rng(int(offset) + K)
    rows = 6
    x = (offset + rng.standard_normal((rows, K))).astype(np.float32)
    if case["soft"]:
        t = rng.random((rows, K)).astype(np.float32)
        t /= t.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, K, rows).astype(np.int64)
    w = (0.5 + rng.random(K)).astype(np.float32)
    r = ce_run(lib, "float32", K, case, rng, inputs=(x, t, w))
    cw = w if case["weighted"] else None
    exp = ref.cross_entropy(r["x"], r["t"], class_weights=cw, **ce_kwargs(case, w))
    err = np.abs(r["loss"] - exp) / np.abs(exp)
    assert err.max() <= 1e-6, err.max()
    # lse + lse_lo is the exact float64 max + log(sum) to float32 accuracy of log(sum)
    lse64 = r["lse"].astype(np.float64) + r["lse_lo"]
    assert np.abs(lse64 - ref.logsumexp(r["x"])).max() <= 2e-6


@pytest.mark.parametrize("which", ["std50", "shift1000"])
def test_row_gradients_accurate_at_scale(lib, which):
    """p_j = exp((x_j - lse) - lse_lo): the gradient keeps float32 accuracy at
    logit std 50 and at an offset of 1000 (with exp(x - lse) from a float32 lse
    it was 2e-6 / 9e-7 relative L2 on the CPU)."""
    rng = np.random.default_rng(7)
    rows, K = 8, 1000
    if which == "std50":
        x = (50 * rng.standard_normal((rows, K))).astype(np.float32)
    else:
        x = (1000 + rng.standard_normal((rows, K))).astype(np.float32)
    t = rng.integers(0, K, rows).astype(np.int64)
    r = ce_run(lib, "float32", K, CE_CASES["plain"], rng, inputs=(x, t, np.ones(K, np.float32)))
    exp = ref.cross_entropy_grad(x, t, cotangent=r["g_loss"])
    assert _rel_l2(r["grad"], exp) <= 2e-7

    code = np.int32(0)
    loss, lse, lse_lo, coef = (np.full(rows, SENTINEL, np.float32) for _ in range(4))
    params = (np.int64(rows), np.int32(K), np.float32(2.0), np.float32(1.0), np.int32(0),
              np.int32(0), np.int64(-100))
    one = np.ones(1, np.float32)
    lib.run("sf_forward_run", code, np.int32(1024), x, t, one, loss, lse, lse_lo, coef, *params)
    grad = np.full(x.shape, SENTINEL, np.float32)
    g_loss = np.ones(rows, np.float32)
    lib.run("sf_backward_run", code, x, t, lse, lse_lo, coef, g_loss, grad, *params)
    exp = ref.softmax_focal_grad(x, t, alpha=None, gamma=2.0, cotangent=g_loss)
    assert _rel_l2(grad, exp) <= 3e-7


# ---- NaN, confident sigmoid predictions, "others" smoothing (issue 7 items 1, 3, 4) ----


NAN_AT = [0, 17, 36]  # vector body and tail positions


def pw_run(lib, kind, reduction, x32, t32, p0, p1, cot):
    """float32 forward (loss or reduced sum) and backward through the harness."""
    n = x32.size
    red = REDUCTIONS[reduction]
    out = np.full(n if red == 0 else 1, SENTINEL, np.float32)
    partials = np.full(max(1, -(-n // 8192)), SENTINEL, np.float32)
    lib.run("pw_forward_run", np.int32(0), np.int32(kind), np.int32(red), x32, t32, out,
            partials, np.uint64(n), np.float32(p0), np.float32(p1))
    grad = np.full(n, SENTINEL, np.float32)
    lib.run("pw_backward_run", np.int32(0), np.int32(kind), np.int32(red), x32, t32, cot,
            np.int32(0), grad, np.uint64(n), np.float32(p0), np.float32(p1))
    return out, grad


@pytest.mark.parametrize("where", ["pred", "target"])
@pytest.mark.parametrize("case_name", list(PW_CASES) + ["huber_delta0"])
def test_pointwise_nan_propagates(lib, case_name, where):
    """A NaN in either input: NaN in that element's loss and gradient only, and
    in the reduced loss (smooth-L1/Huber gave a finite gradient before)."""
    kind, p0, p1 = PW_CASES.get(case_name, (1, 0.0, 0.0))
    rng = np.random.default_rng(11)
    n = 37
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    t = (rng.random(n) if kind == 2 else rng.standard_normal(n)).astype(np.float32)
    (x if where == "pred" else t)[NAN_AT] = np.nan
    nan = np.zeros(n, bool)
    nan[NAN_AT] = True
    loss, grad = pw_run(lib, kind, "none", x, t, p0, p1, np.ones(n, np.float32))
    np.testing.assert_array_equal(np.isnan(loss), nan)
    np.testing.assert_array_equal(np.isnan(grad), nan)
    total, grad = pw_run(lib, kind, "mean", x, t, p0, p1, np.ones(1, np.float32))
    assert np.isnan(total[0])
    np.testing.assert_array_equal(np.isnan(grad), nan)



@pytest.mark.parametrize("case_name", ["plain", "smooth_w_z_ignore", "soft"])
@pytest.mark.parametrize("K", [37, 4097])
def test_row_nan_propagates(lib, case_name, K):
    """A NaN logit: its row's loss and whole gradient row are NaN, no other."""
    case = CE_CASES[case_name]
    rng = np.random.default_rng(K)
    x = rng.standard_normal((4, K)).astype(np.float32)
    x[2, K // 2] = np.nan
    if case["soft"]:
        t = rng.random((4, K)).astype(np.float32)
        t /= t.sum(-1, keepdims=True)
    else:
        t = rng.integers(0, K, 4).astype(np.int64)
    r = ce_run(lib, "float32", K, case, rng, inputs=(x, t, (0.5 + rng.random(K)).astype(np.float32)))
    row = np.arange(4) == 2
    np.testing.assert_array_equal(np.isnan(r["loss"]), row)
    np.testing.assert_array_equal(np.isnan(r["grad"]).all(-1), row)
    assert np.isfinite(r["grad"][~row]).all()


@pytest.mark.parametrize("kind,alpha,gamma", [(2, 0.25, 0.5), (KIND_FOCAL_GAMMA_TWO, 0.25, 2.0)])
def test_sigmoid_focal_target_outside_unit_interval_is_nan(lib, kind, alpha, gamma):
    """The Metal kernels mark a target outside [0, 1] as the CPU ones do
    (csrc/math/focal.h): NaN loss and gradient for that element only, and a
    NaN sum; the ends 0 and 1 are targets."""
    n = 37
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    t = rng.random(n).astype(np.float32)
    t[[0, 17, 36]] = [-0.5, 1.5, -1e-7]
    t[[1, 2]] = [0.0, 1.0]
    bad = np.zeros(n, bool)
    bad[[0, 17, 36]] = True
    loss, grad = pw_run(lib, kind, "none", x, t, alpha, gamma, np.ones(n, np.float32))
    np.testing.assert_array_equal(np.isnan(loss), bad)
    np.testing.assert_array_equal(np.isnan(grad), bad)
    total, _ = pw_run(lib, kind, "sum", x, t, alpha, gamma, np.ones(1, np.float32))
    assert np.isnan(total[0])


def test_sigmoid_focal_confident_predictions(lib):
    """BCE-with-logits without cancellation: x in [-100, 100], hard and soft
    targets, within 4 ulp of float64 (softplus(x) - x t gave 4.5776e-5 for
    4.5399e-5 at x = 10, and 0 at x = 16). The ulp below FLT_MIN is the subnormal
    spacing, or FLT_MIN itself when the harness flushes subnormals like an Apple GPU
    (MH_FLUSH_SUBNORMALS=1: e^-100 = 3.7e-44 is then 0)."""
    x = np.linspace(-100, 100, 4001).astype(np.float32)
    x64 = x.astype(np.float64)
    floor = float(np.finfo(np.float32).tiny if mh.flush_subnormals_default()
                  else np.finfo(np.float32).smallest_subnormal)
    for tv in (0.0, 1.0, 0.3):
        t = np.full(x.size, tv, np.float32)
        loss, grad = pw_run(lib, 2, "none", x, t, -1.0, 0.0, np.ones(x.size, np.float32))
        want = np.where(x64 >= 0, x64 * (1 - tv), -x64 * tv) + np.log1p(np.exp(-np.abs(x64)))
        spacing = np.maximum(np.spacing(np.abs(want.astype(np.float32))).astype(np.float64),
                             floor)
        assert (np.abs(loss - want) / spacing).max() <= 4, tv
        if tv != 0.3:
            e = np.exp(-np.abs(x64))
            p = np.where(x64 >= 0, 1 / (1 + e), e / (1 + e))
            q = np.where(x64 >= 0, e / (1 + e), 1 / (1 + e))
            gwant = p * (1 - tv) - q * tv  # p - t without float64 cancellation
            gspacing = np.maximum(np.spacing(np.abs(gwant.astype(np.float32))).astype(np.float64),
                                  floor)
            assert (np.abs(grad - gwant) / gspacing).max() <= 4, tv


def test_others_mode_large_eps_neg_inf_is_inf(lib):
    """"others" smoothing with eps = 0.9 > (K-1)/K: a -inf logit gives +inf
    (the one-hot coefficient is negative; -inf + inf was NaN)."""
    K = 3
    x = np.array([[-np.inf, 0.0, 1.0], [0.5, -np.inf, 1.0], [0.5, 0.0, 1.0]], np.float32)
    case = dict(soft=False, weighted=False, ls=0.9, mode="others", ignore=None, z=0.0)
    rng = np.random.default_rng(0)
    r = ce_run(lib, "float32", K, case, rng, inputs=(x, np.array([0, 0, 2]), np.ones(K, np.float32)))
    assert np.isposinf(r["loss"][:2]).all() and np.isfinite(r["loss"][2])
    probs = np.array([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], np.float32)
    r = ce_run(lib, "float32", K, dict(case, soft=True), rng,
               inputs=(x, probs, np.ones(K, np.float32)))
    assert np.isposinf(r["loss"][:2]).all() and np.isfinite(r["loss"][2])


# ---- every instantiation ran ------------------------------------------------------------------


# ---- a pipeline that allows fewer than 1024 threads per group -----------------------------
# maxTotalThreadsPerThreadgroup depends on the device and on a kernel's register use; eval_gpu
# plans every launch for the real limit (gpu::fit_plan), so no plan may exceed it.

PIPELINE_LIMITS = [256, 640]


@pytest.fixture
def pipeline_limit(lib):
    def set_limit(limit):
        lib.run("set_pipeline_limit", np.int32(limit), schedules=(mh.Schedule(),))

    yield set_limit
    set_limit(1024)


@pytest.mark.parametrize("limit", PIPELINE_LIMITS)
def test_every_plan_fits_the_pipeline_limit(lib, limit):
    usable = limit // 32 * 32
    for K in (1, 33, 1025, 4097, 50257):
        for which, a in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 0)):
            p = plan(lib, which, rows=3, n=K, a=a, b=a, max_threads=limit)
            assert p["tx"] * p["ty"] * p["tz"] <= usable, (which, K, p)
    for n in (1, 1000, 100_000, 10_000_000):
        for which, b in ((4, 0), (4, 1), (5, 0), (6, 0)):
            p = plan(lib, which, n=n, b=b, max_threads=limit)
            assert p["tx"] * p["ty"] * p["tz"] <= usable, (which, n, p)
    # The finish kernel of the fused sum asked for up to 1024 threads whatever the limit.
    assert plan(lib, 6, n=5000, max_threads=limit)["tx"] == usable
    # Row kernels turn looped where the limit no longer holds the row in registers.
    assert plan(lib, 0, rows=3, n=usable * 4 + 1, max_threads=limit)["looped"] == 1


@pytest.mark.parametrize("limit", PIPELINE_LIMITS)
def test_kernels_under_the_pipeline_limit(lib, pipeline_limit, limit):
    pipeline_limit(limit)
    # 1500 classes: looped at 256 threads, block at 640; 20000 elements: several partials.
    test_cross_entropy(lib, "smooth_w_z_ignore", "float32", 1500)
    test_softmax_focal(lib, "gamma2", "float16", 1500)
    test_pointwise(lib, "huber", "mean", "float32", 20000)
    # The finish kernel alone, over more partials than the group has threads.
    partials = np.random.default_rng(limit).standard_normal(1000).astype(np.float32)
    out = np.full(1, np.nan, np.float32)
    lib.run("pw_sum_finish_run", partials, out, np.uint64(1000), np.uint64(5000), np.int32(2))
    np.testing.assert_allclose(out[0], partials.astype(np.float64).sum() / 5000, rtol=1e-5,
                               atol=1e-6)


def test_sum_finish_accuracy(lib):
    """The finish kernel is also the Metal side of the means' accurate sum
    (csrc/ops/accurate_sum.h): each thread's strided run is compensated, so
    400,000 values in runs of ~390 per thread come within a few float32
    roundings of the float64 sum (an uncompensated run drifts by ~1e-6:
    checked by the assertion on the relative error); inf and NaN carry."""
    rng = np.random.default_rng(5)
    n = 400_000
    values = rng.uniform(0.0, 1.0, n).astype(np.float32)
    out = np.full(1, np.nan, np.float32)
    lib.run("pw_sum_finish_run", values, out, np.uint64(n), np.uint64(n), np.int32(1))
    want = values.astype(np.float64).sum()
    assert abs(out[0] - want) / want <= 2.0 ** -22, (out[0], want)
    for special, expect in ((np.inf, np.isposinf), (np.nan, np.isnan)):
        v = values[:5000].copy()
        v[1234] = special
        lib.run("pw_sum_finish_run", v, out, np.uint64(v.size), np.uint64(v.size), np.int32(1))
        assert expect(out[0]), (special, out[0])


def test_zz_every_instantiation_ran():
    """Runs last (file order): every kernel the .metal files define was launched above."""
    if not USED_KERNELS:
        pytest.skip("run with the kernel tests")
    missing = host_names() - USED_KERNELS
    assert not missing, sorted(missing)
