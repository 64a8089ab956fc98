"""The fused linear distillation losses' Metal kernels on the CPU harness
(tests/metal_host): linear_distillation_loss (a student and a teacher head)
and linear_topk_distillation_loss (a student head, an offline top-k teacher),
through the launch plans and the dispatch sequence eval_gpu uses
(csrc/metal/linear_distillation.cpp, replayed by
tests/metal_kernels/ld_adaptor.cpp: ld_run / ltk_run): per chunk of rows,
metal/linear_distillation.metal's ld_logits for each head, the logits form's
row kernels (metal/distillation.metal) or the top-k rows, the linear CE's dH /
dW. Compared with the CPU primitive (mx.cpu) on the same rounded inputs and
with the float64 definitions on the materialised logits (tests/reference.py):
the per-row loss, and dH / dW for a different cotangent per row. Every kind,
temperature (and T^2), beta, alpha with hard labels, ignore_index and an
out-of-range class, top-k with k = 1 and k = V, dense and quantized heads of
every format for the student and the teacher, float16 / bfloat16 operands,
V = 1 / 31 / 33 / 4097, several chunks; planted bugs must fail."""

from __future__ import annotations

import numpy as np
import pytest

import metal_host as mh
import reference as R
from conftest import CLANG_MISSING, needs_libclang

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402

from metal_host.kernel_names import kernel_names  # noqa: E402
from test_linear_distillation import _topk_reference  # noqa: E402
from test_metal_kernels import DT_CODE, MX_DT, SENTINEL, as_device  # noqa: E402
from test_metal_linear_cross_entropy import BM, BN, DTYPES, FAST, REPO, QUANT_MODE_CODE  # noqa: E402
from test_metal_row_stats import quantized_heads  # noqa: E402

METAL = ["metal/linear_cross_entropy.metal", "metal/pointwise_loss.metal", "metal/distillation.metal",
         "metal/linear_distillation.metal"]
ADAPTOR = "tests/metal_kernels/ld_adaptor.cpp"
USED: set[str] = set()
ONE = (mh.Schedule("forward"),)


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


@pytest.fixture
def device_class(lib):
    def set_class(c):
        lib.run("lce_set_device_class", np.int32(ord(c)), schedules=ONE)
    yield set_class
    set_class("s")


@needs_libclang
def test_static_address_spaces():
    from metal_host import static_check

    r = static_check.check("metal/linear_distillation.metal")
    assert r.ok, r.diagnostics


# ---- heads --------------------------------------------------------------------------------


class Head:
    """One head: the kernels' buffers and spec, the CPU primitive's arguments,
    and the float64 operands the kernels see (hidden rounded to its dtype,
    the weight rounded or dequantised)."""

    def __init__(self, rng, n, h, v, hdt="float32", wdt="float32", quant=None, scale=1.0, peak=None):
        hid = rng.standard_normal((n, h)).astype(np.float32)
        w = (rng.standard_normal((v, h)) * scale / np.sqrt(max(h, 1))).astype(np.float32)
        if peak is not None:  # a few peaked rows: the softmax is not flat
            for r, cls in peak:
                w[cls] += 8 * hid[r] / max(float(hid[r] @ hid[r]), 1e-6)
        self.hdt, self.h, self.n, self.v = hdt, h, n, v
        self.hd, hr = as_device(hid, hdt)
        self.hidden = mx.array(hr).astype(MX_DT[hdt])
        self.h64 = hr.astype(np.float64)
        self.quant = quant
        if quant is None:
            self.wdt = wdt
            wd, wr = as_device(w, wdt)
            self.bufs = (self.hd, wd, wd, wd)
            self.weight = mx.array(wr).astype(MX_DT[wdt])
            self.kw = {}
            self.w64 = wr.astype(np.float64)
            spec = [DT_CODE[hdt], DT_CODE[wdt], h, 0, 0, 0, 0, 0]
            self.name = f"w{wdt}"
        else:
            name, bits, group, mode, has_global, sdt = quant
            self.wdt = "float32"
            wm = mx.array(w).astype(MX_DT[sdt])
            gs = mx.array(np.float32(2.0)) if has_global else None
            if mode == "affine":
                w_q, scales, biases = mx.quantize(wm, group_size=group, bits=bits)
                s_dev = as_device(np.array(scales.astype(mx.float32)), sdt)[0]
                b_dev = as_device(np.array(biases.astype(mx.float32)), sdt)[0]
            else:
                w_q, scales = mx.quantize(wm, mode=mode, global_scale=gs)
                biases = None
                s_dev = b_dev = np.array(scales)
                if gs is not None:
                    b_dev = np.array(gs.astype(mx.float32)).reshape(1)
            self.bufs = (self.hd, np.array(w_q), s_dev, b_dev)
            self.weight = w_q
            self.kw = dict(scales=scales, biases=biases, group_size=group, bits=bits, mode=mode,
                           global_scale=gs)
            self.w64 = np.array(mx.dequantize(w_q, scales, biases, group_size=group, bits=bits, mode=mode,
                                              global_scale=gs, dtype=mx.float32)).astype(np.float64)
            spec = [DT_CODE[hdt], 0, h, bits, group, QUANT_MODE_CODE[mode], int(has_global),
                    DT_CODE.get(sdt, 0)]
            self.name = name
        self.spec = np.array(spec, np.int32)

    def cpu_kwargs(self, who):
        return {f"{who}_{k}": v for k, v in self.kw.items()}

    def logits64(self):
        return self.h64 @ self.w64.T


def tile_name(lib, head, n, v):
    """The forward tile eval_gpu's plan takes for this head (under lce_set_device_class)."""
    out = np.zeros(64, np.uint8)
    lib.run("lce_tile_name", np.int32(DT_CODE[head.hdt]), np.frombuffer(head.name.encode() + b"\0", np.uint8).copy(),
            np.int64(n), np.int32(v), np.int32(head.h), out, np.int32(out.size), schedules=ONE)
    return bytes(out).split(b"\0")[0].decode()


def mark_used(lib, head, n, v):
    USED.add(f"fl_ld_logits_{head.hdt}_{head.name}_{tile_name(lib, head, n, v)}")


def chunk_rows(lib, n, v, hs, ht, chunk_bytes):
    out = np.zeros(3, np.int64)
    lib.run("ld_plan_info", np.int64(n), np.int32(v), np.int32(hs), np.int32(ht), np.int64(chunk_bytes),
            np.int32(1), np.int32(1), np.int32(1), out, schedules=ONE)
    return int(out[0])


# ---- options, as the op's distill_params derives the kernels' --------------------------------


class Options:
    def __init__(self, kind="kl", beta=0.5, T=1.0, alpha=0.0, t2=False, ignore=None, targets=False):
        self.kind, self.beta, self.T, self.alpha, self.t2 = kind, beta, T, alpha, t2
        self.ignore, self.targets = ignore, targets or alpha != 0.0 or ignore is not None

    def kernel_args(self):
        code = {"kl": 0, "reverse_kl": 1}.get(self.kind)
        if code is None:
            code = 0 if self.beta == 0.0 else 1 if self.beta == 1.0 else 2
        T = np.float32(self.T)
        d_scale = (np.float32(1.0) - np.float32(self.alpha)) * (T * T if self.t2 else np.float32(1.0))
        has_ig = self.ignore is not None
        return (np.int32(code), np.int32(has_ig), np.int64(self.ignore if has_ig else -100),
                np.float32(np.float32(1.0) / T), np.float32(self.beta), np.float32(d_scale),
                np.float32(self.alpha))

    def cpu(self):
        return dict(kind=self.kind, beta=self.beta, temperature=self.T, alpha=self.alpha,
                    scale_by_temperature_squared=self.t2, ignore_index=self.ignore)

    def ref(self):
        return dict(kind=self.kind, beta=self.beta, temperature=self.T, alpha=self.alpha, t2=self.t2,
                    ignore_index=self.ignore)


def make_targets(rng, n, v, o, bad_row=True):
    t = rng.integers(0, v, n).astype(np.int64)
    if o.ignore is not None and n > 2:
        t[2::5] = o.ignore
    if bad_row and n > 4:
        t[3] = v  # out of range: a NaN row, forward and backward
    return t


# ---- the runs -----------------------------------------------------------------------------------


def ld_gpu(lib, s, t, targets, o, chunk_bytes, g, schedules=FAST, want_dw=True, fused=False):
    """ld_run's forward, then its backward from the forward's stats (as the vjp
    does): per-row loss, dH, dW (None for a quantized student). fused: the
    forward with its gradients (a unit cotangent; g unused) and the summed
    loss: (per-row loss, sum, dH, dW)."""
    n, v = s.n, s.v
    R_ = chunk_rows(lib, n, v, s.h, t.h, chunk_bytes)
    tg = targets if targets is not None else np.zeros(1, np.int64)
    want_dw = want_dw and s.quant is None

    def run(forward, stats_in, gg, want_grads, sum_rows):
        zs = np.full(max(R_ * v, 1), SENTINEL, np.float32)
        zt = np.full(max(R_ * v, 1), SENTINEL, np.float32)
        loss = np.full(max(n, 1), SENTINEL, np.float32)
        loss_sum = np.full(1, SENTINEL, np.float32)
        stats = np.full(max(n, 1) * 6, SENTINEL, np.float32)
        dh = np.full((max(n, 1), s.h), SENTINEL, np.float32)
        dw = np.full((v, s.h), SENTINEL, np.float32)
        lib.run("ld_run", s.spec, *s.bufs, t.spec, *t.bufs, tg, np.int32(targets is not None), zs, zt, loss,
                loss_sum, stats, stats_in, gg, dh, dw, np.int32(forward), np.int32(sum_rows),
                np.int32(want_grads), np.int32(want_grads and want_dw), np.int64(n), np.int32(v),
                np.int64(chunk_bytes), *o.kernel_args(), schedules=schedules)
        return loss[:n], loss_sum[0], stats, dh[:n], (dw if want_dw else None)

    none = np.zeros(1, np.float32)
    mark_used(lib, s, n, v)
    mark_used(lib, t, n, v)
    if fused:
        loss, total, _, dh, dw = run(True, none, none, True, True)
        return loss, total, dh, dw
    loss, _, stats, _, _ = run(True, none, none, False, False)
    _, _, _, dh, dw = run(False, stats, g, True, False)
    return loss, dh, dw


def ld_cpu(s, t, targets, o, chunk_bytes, g):
    tm = mx.array(targets) if targets is not None else None
    kw = dict(chunk_bytes=chunk_bytes, stream=mx.cpu, **o.cpu(), **s.cpu_kwargs("student"),
              **t.cpu_kwargs("teacher"))
    loss = np.array(ext.linear_distill_loss(s.hidden, s.weight, t.hidden, t.weight, tm, **kw))
    primals = [s.hidden] + ([s.weight] if s.quant is None else [])

    def f(*p):
        return ext.linear_distill_loss(p[0], p[1] if s.quant is None else s.weight, t.hidden, t.weight, tm, **kw)

    _, grads = mx.vjp(f, primals, [mx.array(g)])
    grads = [np.array(x.astype(mx.float32)) for x in grads]
    return loss, grads[0], (grads[1] if s.quant is None else None)


def close(got, want, what, rtol=1e-4, atol=1e-5):
    """The tiles add in another order than BLAS and the float64 reference: a
    few float32 roundings of the magnitudes involved apart."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN positions differ"
    ok = np.isnan(want) | (np.abs(got - want) <= atol + rtol * np.abs(want))
    assert ok.all(), f"{what}: {int((~ok).sum())} of {ok.size} off, max err {np.nanmax(np.abs(got - want)):.3g}"


# Two roundings to the gradient's dtype apart (the kernels' float32 sum and the
# CPU's each rounded once).
ROUNDING = {"float32": 0.0, "float16": 2 ** -10, "bfloat16": 2 ** -7}


def grad_atol(dz, operand):
    """A bound for dZ @ operand's float32 error, per output element."""
    return 1e-5 * max(float(np.nanmax(np.abs(dz))) if np.isfinite(dz).any() else 1.0, 1e-3) * \
        max(float(np.abs(operand).max()), 1.0) * np.sqrt(dz.shape[-1])


def check_ld(lib, s, t, targets, o, chunk_bytes, seed, schedules=FAST, vs64=True, tol=1e-4):
    n = s.n
    g = np.random.default_rng(seed).uniform(-1.0, 2.0, n).astype(np.float32)
    loss, dh, dw = ld_gpu(lib, s, t, targets, o, chunk_bytes, g, schedules)
    c_loss, c_dh, c_dw = ld_cpu(s, t, targets, o, chunk_bytes, g)
    scale = max(1.0, float(np.nanmax(np.abs(c_loss))) if np.isfinite(c_loss).any() else 1.0)
    close(loss, c_loss, "loss vs CPU", rtol=tol, atol=tol * scale)
    finite = np.isfinite(c_dh)
    mag = float(np.abs(c_dh[finite]).max()) if finite.any() else 1.0
    # The op rounds the kernels' float32 gradients to the primals' dtypes (as the CPU's).
    close(as_device(dh, s.hdt)[1], c_dh, "dH vs CPU", rtol=max(10 * tol, ROUNDING[s.hdt]),
          atol=max(tol, ROUNDING[s.hdt]) * max(mag, 1e-3))
    if dw is not None:
        finite = np.isfinite(c_dw)
        mag = float(np.abs(c_dw[finite]).max()) if finite.any() else 1.0
        close(as_device(dw, s.wdt)[1], c_dw, "dW vs CPU", rtol=max(10 * tol, ROUNDING[s.wdt]),
              atol=max(tol, ROUNDING[s.wdt]) * max(mag, 1e-3))
    if vs64:
        zs, zt = s.logits64(), t.logits64()
        rows = R.distill_rows(zs, zt, targets=targets, **o.ref())
        close(loss, rows, "loss vs float64", rtol=tol, atol=tol * scale)
        dz = R.distill_grad(zs, zt, targets=targets, cotangent=g, **o.ref())
        close(dh, dz @ s.w64, "dH vs float64", rtol=10 * tol, atol=grad_atol(dz, s.w64))
        if dw is not None and np.isfinite(dz).all():
            close(dw, dz.T @ s.h64, "dW vs float64", rtol=10 * tol, atol=grad_atol(dz.T, s.h64))
    return loss, dh, dw


# ---- two heads ----------------------------------------------------------------------------------

KINDS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
OPTIONS = {
    "plain": dict(),
    "temperature_t2": dict(T=1.7, t2=True),
    "alpha_ignore": dict(T=0.8, alpha=0.4, ignore=-100),
    "alpha_t2": dict(T=2.0, alpha=0.25, t2=True, ignore=-1),
}


@pytest.mark.parametrize("kind,beta", KINDS, ids=["kl", "rkl", "jsd.3", "jsd0", "jsd1"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_two_heads_vs_cpu_and_float64(lib, kind, beta, opt):
    """Every kind and option; the student's and the teacher's own H; rows over
    a tile edge (BM + 1) in chunks of 8 rows (both heads' logits: 8 V bytes
    a row), so the per-row buffers are bound at 9 chunk offsets. Two
    schedules for the plain options, one for the others."""
    o = Options(kind, beta, **OPTIONS[opt])
    n, hs, ht, v = BM + 1, 7, 12, BN // 2 + 1
    rng = np.random.default_rng(sum(map(ord, kind + opt)) + int(10 * beta))
    targets = make_targets(rng, n, v, o) if o.targets else None
    peak = [(r, int(targets[r]) if targets is not None and 0 <= targets[r] < v else r % v) for r in (0, 1, 5)]
    s = Head(rng, n, hs, v, peak=peak)
    t = Head(rng, n, ht, v, scale=2.0)
    loss, dh, _ = check_ld(lib, s, t, targets, o, 8 * 8 * v, seed=1, schedules=FAST if opt == "plain" else ONE)
    if targets is not None:
        assert np.isnan(loss[3]) and np.isnan(dh[3]).all()  # the out-of-range class
        if o.ignore is not None:
            assert loss[2] == 0.0 and not dh[2].any()


@pytest.mark.parametrize("v", [1, 31, 33, 4097])
def test_awkward_vocabularies(lib, v):
    """V around the tiles (1, BN / 2 -+ 1) and past 64 tiles with a partial
    last one (4097), JSD with the CE mixed in at a temperature (the CE's own
    sum at temperature 1)."""
    o = Options("jsd", 0.3, T=1.3, alpha=0.3, ignore=-100)
    n = 5
    rng = np.random.default_rng(v)
    targets = make_targets(rng, n, v, o, bad_row=False)
    s = Head(rng, n, 6, v, peak=[(0, int(targets[0]))])
    t = Head(rng, n, 4, v)
    check_ld(lib, s, t, targets, o, 64 << 20, seed=v, schedules=FAST[:1])


@pytest.mark.parametrize("chunk_bytes,n", [(1, 7), (8 * 4 * BM, BM + 3), (8 * 4 * (BM + 1), BM + 3),
                                           (64 << 20, BM + 3)])
def test_chunking(lib, chunk_bytes, n):
    """One row per chunk (chunk_bytes smaller than a row), BM rows, the BM
    rounding of BM + 1 rows, and of all N rows (lce_plan's rule: a whole
    number of BM when more than BM): the same results."""
    o = Options("reverse_kl", T=0.9, alpha=0.2, targets=True)
    v = 4
    rng = np.random.default_rng(5)
    targets = make_targets(rng, n, v, o, bad_row=False)
    s = Head(rng, n, 5, v)
    t = Head(rng, n, 9, v)
    r = chunk_rows(lib, n, v, 5, 9, chunk_bytes)
    assert r == {1: 1, 8 * 4 * BM: BM, 8 * 4 * (BM + 1): BM, 64 << 20: BM}[chunk_bytes]
    check_ld(lib, s, t, targets, o, chunk_bytes, seed=2, schedules=FAST[:1])


def test_no_rows(lib):
    """N = 0: one empty chunk, so dW is written (zeros) and the summed loss is 0."""
    o = Options("jsd", 0.3, T=1.5)
    rng = np.random.default_rng(13)
    s = Head(rng, 0, 6, 9)
    t = Head(rng, 0, 4, 9)
    rows, total, dh, dw = ld_gpu(lib, s, t, None, o, 64 << 20, np.zeros(1, np.float32), fused=True)
    assert rows.size == 0 and dh.size == 0 and total == 0.0
    np.testing.assert_array_equal(dw, np.zeros_like(dw))


DENSE_PAIRS = [(h, w) for h in DTYPES for w in DTYPES]


@pytest.mark.parametrize("dc", ["s", "g", "d"])
def test_dtypes_and_device_tiles(lib, device_class, dc):
    """Every dense (hidden, weight) dtype pair for the student and the teacher,
    in the forward tile of each device class (launch_plan.h lce_forward_tile:
    the Ultra's 16-bit tile for a weight of the hidden's 16-bit dtype); the
    16-bit gradients rounded as the op rounds them."""
    device_class(dc)
    o = Options("kl", T=1.5, alpha=0.2, ignore=-100)
    n, v = 7, BN + 3
    for i, (hdt, wdt) in enumerate(DENSE_PAIRS):
        thdt, twdt = DENSE_PAIRS[(i + 4) % len(DENSE_PAIRS)]
        rng = np.random.default_rng(100 + i)
        targets = make_targets(rng, n, v, o, bad_row=False)
        s = Head(rng, n, 40, v, hdt, wdt)
        t = Head(rng, n, 24, v, thdt, twdt)
        tol = 1e-4 if "float16" not in (hdt, wdt, thdt, twdt) and "bfloat16" not in (hdt, wdt, thdt, twdt) else 3e-4
        check_ld(lib, s, t, targets, o, 64 << 20, seed=i, schedules=ONE, tol=tol)


@pytest.mark.parametrize("dc", ["s", "g"])
@pytest.mark.parametrize("hdt", DTYPES)
def test_quantized_heads(lib, device_class, dc, hdt):
    """Every quantized format as the student's head and as the teacher's (one
    call each pair, so every format of this hidden dtype in the tile of each
    device class that a quantized head has), against the CPU primitive on the
    same packed weights."""
    device_class(dc)
    o = Options("jsd", 0.4, T=1.2, alpha=0.3, ignore=-100)
    heads = list(quantized_heads())
    n, h, v = 5, 64, BN + 5
    for k in range(0, len(heads), 2):
        rng = np.random.default_rng(200 + k)
        targets = make_targets(rng, n, v, o, bad_row=False)
        s = Head(rng, n, h, v, hdt, quant=heads[k])
        t = Head(rng, n, h, v, hdt, quant=heads[(k + 1) % len(heads)])
        check_ld(lib, s, t, targets, o, 64 << 20, seed=k, schedules=ONE, vs64=False, tol=3e-4)


def test_quantized_student_no_dw_dense_teacher_float64(lib):
    """A quantized student (dH only) against a dense bfloat16 teacher, several
    chunks, also against float64 on the dequantised weight."""
    o = Options("reverse_kl", T=1.4)
    n, v = 11, 40
    rng = np.random.default_rng(9)
    s = Head(rng, n, 64, v, "float32", quant=("q4_float32", 4, 64, "affine", False, "float32"))
    t = Head(rng, n, 16, v, "bfloat16", "bfloat16")
    check_ld(lib, s, t, None, o, 8 * v * 3, seed=3, schedules=FAST[:1])


# ---- an offline top-k teacher ----------------------------------------------------------------


def ltk_gpu(lib, s, ids, vals, targets, o, renorm, chunk_bytes, g, schedules=FAST, fused=False):
    """ltk_run, as ld_gpu."""
    n, v, k = s.n, s.v, ids.shape[-1]
    R_ = chunk_rows(lib, n, v, s.h, -1, chunk_bytes)
    tg = targets if targets is not None else np.zeros(1, np.int64)
    has_ig = o.ignore is not None
    kargs = o.kernel_args()
    want_dw = s.quant is None

    def run(forward, stats_in, gg, want_grads, sum_rows):
        zs = np.full(max(R_ * v, 1), SENTINEL, np.float32)
        loss = np.full(max(n, 1), SENTINEL, np.float32)
        loss_sum = np.full(1, SENTINEL, np.float32)
        stats = np.full(max(n, 1) * 6, SENTINEL, np.float32)
        dh = np.full((max(n, 1), s.h), SENTINEL, np.float32)
        dw = np.full((v, s.h), SENTINEL, np.float32)
        lib.run("ltk_run", s.spec, *s.bufs, ids, vals, np.int32(k), np.int32(renorm), tg,
                np.int32(targets is not None), zs, loss, loss_sum, stats, stats_in, gg, dh, dw, np.int32(forward),
                np.int32(sum_rows), np.int32(want_grads), np.int32(want_grads and want_dw), np.int64(n),
                np.int32(v), np.int64(chunk_bytes), np.int32(has_ig), np.int64(o.ignore if has_ig else -100),
                kargs[3], kargs[5], kargs[6], schedules=schedules)
        return loss[:n], loss_sum[0], stats, dh[:n], (dw if want_dw else None)

    none = np.zeros(1, np.float32)
    mark_used(lib, s, n, v)
    USED.update({"fl_ltk_fwd", "fl_ltk_bwd"})
    if fused:
        loss, total, _, dh, dw = run(True, none, none, True, True)
        return loss, total, dh, dw
    loss, _, stats, _, _ = run(True, none, none, False, False)
    _, _, _, dh, dw = run(False, stats, g, True, False)
    return loss, dh, dw


def ltk_cpu(s, ids, vals, targets, o, renorm, chunk_bytes, g):
    tm = mx.array(targets) if targets is not None else None
    kw = dict(temperature=o.T, renormalize=renorm, alpha=o.alpha, scale_by_temperature_squared=o.t2,
              ignore_index=o.ignore, chunk_bytes=chunk_bytes, stream=mx.cpu, **s.cpu_kwargs("student"))
    idm, vm = mx.array(ids), mx.array(vals)
    loss = np.array(ext.linear_topk_distill_loss(s.hidden, s.weight, idm, vm, tm, **kw))
    primals = [s.hidden] + ([s.weight] if s.quant is None else [])

    def f(*p):
        return ext.linear_topk_distill_loss(p[0], p[1] if s.quant is None else s.weight, idm, vm, tm, **kw)

    _, grads = mx.vjp(f, primals, [mx.array(g)])
    grads = [np.array(x.astype(mx.float32)) for x in grads]
    return loss, grads[0], (grads[1] if s.quant is None else None)


def teacher_topk(rng, n, v, k):
    """A teacher's top-k (ids by decreasing probability, log-probabilities), as a data set stores them."""
    teacher = rng.normal(size=(n, v)) * 2
    lp = teacher - R.logsumexp(teacher, keepdims=True)
    ids = np.argsort(-teacher, -1)[:, :k].astype(np.int64)
    return np.ascontiguousarray(ids), np.take_along_axis(lp, ids, -1).astype(np.float32)


def check_ltk(lib, s, ids, vals, targets, o, renorm, chunk_bytes, seed, schedules=FAST, tol=1e-4, vs64=True):
    n = s.n
    g = np.random.default_rng(seed).uniform(-1.0, 2.0, n).astype(np.float32)
    loss, dh, dw = ltk_gpu(lib, s, ids, vals, targets, o, renorm, chunk_bytes, g, schedules)
    c_loss, c_dh, c_dw = ltk_cpu(s, ids, vals, targets, o, renorm, chunk_bytes, g)
    scale = max(1.0, float(np.nanmax(np.abs(c_loss))) if np.isfinite(c_loss).any() else 1.0)
    close(loss, c_loss, "loss vs CPU", rtol=tol, atol=tol * scale)
    finite = np.isfinite(c_dh)
    mag = float(np.abs(c_dh[finite]).max()) if finite.any() else 1.0
    # The op rounds the kernels' float32 gradients to the primals' dtypes (as the CPU's).
    close(as_device(dh, s.hdt)[1], c_dh, "dH vs CPU", rtol=max(10 * tol, ROUNDING[s.hdt]),
          atol=max(tol, ROUNDING[s.hdt]) * max(mag, 1e-3))
    if dw is not None:
        finite = np.isfinite(c_dw)
        mag = float(np.abs(c_dw[finite]).max()) if finite.any() else 1.0
        close(as_device(dw, s.wdt)[1], c_dw, "dW vs CPU", rtol=max(10 * tol, ROUNDING[s.wdt]),
              atol=max(tol, ROUNDING[s.wdt]) * max(mag, 1e-3))
    if vs64 and (targets is None or ((targets >= 0) & (targets < s.v) | (targets == o.ignore)).all()):
        y = targets if targets is not None else np.zeros(n, np.int64)
        rows, dz = _topk_reference(s.logits64(), ids, vals.astype(np.float64), o.T, renorm, o.alpha, o.t2, y,
                                   o.ignore, g.astype(np.float64))
        close(loss, rows, "loss vs float64", rtol=tol, atol=tol * scale)
        close(dh, dz @ s.w64, "dH vs float64", rtol=10 * tol, atol=grad_atol(dz, s.w64))
        if dw is not None:
            close(dw, dz.T @ s.h64, "dW vs float64", rtol=10 * tol, atol=grad_atol(dz.T, s.h64))
    return loss, dh, dw


@pytest.mark.parametrize("k", [1, 5, "V"])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("opt", ["plain", "temperature_t2", "alpha_ignore"])
def test_topk_vs_cpu_and_float64(lib, k, renorm, opt):
    """k = 1, a few, and every class; stored or renormalised teacher
    log-probabilities; temperature (T^2), the CE with ignored rows; chunks of
    8 rows over a tile edge."""
    o = Options("kl", **OPTIONS[opt])
    n, h, v = BM + 1, 9, 33
    kk = v if k == "V" else k
    rng = np.random.default_rng(kk * 7 + renorm + len(opt))
    ids, vals = teacher_topk(rng, n, v, kk)
    targets = make_targets(rng, n, v, o, bad_row=False) if o.targets else None
    s = Head(rng, n, h, v, peak=[(0, int(ids[0, 0])), (1, 3)])
    check_ltk(lib, s, ids, vals, targets, o, renorm, 8 * 4 * v, seed=kk, schedules=FAST if opt == "plain" else ONE)


def test_topk_every_class_is_the_two_head_kl(lib):
    """k = V, renormalised, with the teacher's full log-softmax: the forward KL
    of the two-head form with that teacher's logits (same kernels' float32
    rounding apart)."""
    o = Options("kl", T=1.6)
    n, v = 6, 33
    rng = np.random.default_rng(4)
    s = Head(rng, n, 8, v)
    t = Head(rng, n, 5, v, scale=2.0)
    zt = (t.h64 @ t.w64.T).astype(np.float32)
    lp = (zt - R.logsumexp(zt.astype(np.float64), keepdims=True)).astype(np.float32)
    ids = np.ascontiguousarray(np.broadcast_to(np.arange(v, dtype=np.int64), (n, v)))
    g = np.ones(n, np.float32)
    a = ltk_gpu(lib, s, ids, lp, None, o, True, 64 << 20, g, ONE)
    b = ld_gpu(lib, s, t, None, o, 64 << 20, g, ONE)
    close(a[0], b[0], "loss", rtol=1e-4, atol=1e-6)
    close(a[1], b[1], "dH", rtol=1e-3, atol=1e-5 * np.abs(b[1]).max())


def test_topk_bad_ids_duplicates_and_ignored(lib):
    """An id outside [0, V) makes its row NaN (even with an ignored class, as
    the CPU); repeated ids each count (dZ's pairs are subtracted in order);
    ignored rows are zeros."""
    o = Options("kl", T=1.0, alpha=0.5, ignore=-100)
    n, h, v = 6, 8, 10
    rng = np.random.default_rng(6)
    s = Head(rng, n, h, v)
    ids = rng.integers(0, v, (n, 3)).astype(np.int64)
    ids[1] = [4, 4, 7]  # a repeated id
    ids[2, 1] = v  # out of range
    ids[4, 0] = -1  # out of range, on an ignored row
    vals = np.log(rng.dirichlet(np.ones(3), n) * 0.9).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int64)
    targets[[0, 4]] = -100
    loss, dh, _ = check_ltk(lib, s, ids, vals, targets, o, False, 64 << 20, seed=6, vs64=False)
    assert np.isnan(loss[2]) and np.isnan(dh[2]).all() and np.isnan(loss[4])
    assert loss[0] == 0.0 and not dh[0].any() and np.isfinite(loss[1])


@pytest.mark.parametrize("hdt", ["float16", "bfloat16"])
def test_topk_16bit_and_quantized_student(lib, hdt):
    """16-bit operands, and a quantized student (dH only)."""
    o = Options("kl", T=1.3, alpha=0.2, ignore=-100)
    n, v = 9, BN + 1
    rng = np.random.default_rng(len(hdt))
    ids, vals = teacher_topk(rng, n, v, 4)
    targets = make_targets(rng, n, v, o, bad_row=False)
    check_ltk(lib, Head(rng, n, 24, v, hdt, hdt), ids, vals, targets, o, True, 64 << 20, seed=1,
              schedules=ONE, tol=3e-4)
    q = Head(rng, n, 64, v, hdt, quant=("q8_bfloat16", 8, 64, "affine", False, "bfloat16"))
    check_ltk(lib, q, ids, vals, targets, o, False, 4 * v * 2, seed=2, schedules=ONE, tol=3e-4, vs64=False)


# ---- gradients in the forward (ops/student_head_grads.h) ------------------------------------


@pytest.mark.parametrize("kind,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)], ids=["kl", "rkl", "jsd"])
def test_gradients_in_the_forward(lib, kind, beta):
    """A loss summed over rows: the forward forms dZ for a unit cotangent
    right after each chunk's rows (the stats it has just written), then dH /
    dW, and the summed loss (fl_pw_sum_finish, a fixed order): the same as
    the CPU's sum and the gradients of the sum, and as the recomputing
    backward with g = 1."""
    o = Options(kind, beta, T=1.3, alpha=0.2, ignore=-100)
    n, v = BM + 2, 21
    rng = np.random.default_rng(11)
    targets = make_targets(rng, n, v, o, bad_row=False)
    s = Head(rng, n, 10, v, peak=[(0, int(targets[0]))])
    t = Head(rng, n, 6, v, scale=2.0)
    ones = np.ones(n, np.float32)
    rows, total, dh, dw = ld_gpu(lib, s, t, targets, o, 8 * v * 5, ones, fused=True)
    c_loss, c_dh, c_dw = ld_cpu(s, t, targets, o, 8 * v * 5, ones)
    close(rows, c_loss, "rows", rtol=1e-4, atol=1e-5)
    close(total, c_loss.astype(np.float64).sum(), "sum", rtol=1e-5, atol=1e-5)
    close(dh, c_dh, "dH", rtol=1e-3, atol=1e-4 * np.abs(c_dh).max())
    close(dw, c_dw, "dW", rtol=1e-3, atol=1e-4 * np.abs(c_dw).max())
    _, r_dh, r_dw = ld_gpu(lib, s, t, targets, o, 8 * v * 5, ones, schedules=ONE)
    np.testing.assert_array_equal(dh, r_dh)  # the same kernels on the same stats
    np.testing.assert_array_equal(dw, r_dw)


def test_topk_gradients_in_the_forward(lib):
    o = Options("kl", T=0.9, alpha=0.3, ignore=-100)
    n, v = 13, 40
    rng = np.random.default_rng(12)
    ids, vals = teacher_topk(rng, n, v, 6)
    targets = make_targets(rng, n, v, o, bad_row=False)
    s = Head(rng, n, 12, v)
    ones = np.ones(n, np.float32)
    rows, total, dh, dw = ltk_gpu(lib, s, ids, vals, targets, o, True, 4 * v * 4, ones, fused=True)
    c_loss, c_dh, c_dw = ltk_cpu(s, ids, vals, targets, o, True, 4 * v * 4, ones)
    close(rows, c_loss, "rows", rtol=1e-4, atol=1e-5)
    close(total, c_loss.astype(np.float64).sum(), "sum", rtol=1e-5, atol=1e-5)
    close(dh, c_dh, "dH", rtol=1e-3, atol=1e-4 * np.abs(c_dh).max())
    close(dw, c_dw, "dW", rtol=1e-3, atol=1e-4 * np.abs(c_dw).max())


# ---- planted bugs --------------------------------------------------------------------------------

PLANTED = {
    # the pairs subtracted before every thread has written its part of the row
    "pairs_before_row_written": ("metal/linear_distillation.metal",
        "  threadgroup_barrier(mem_flags::mem_device);\n  if (tid == 0) {",
        "  if (tid == 0) {", mh.ScheduleDependent),
    # a chunk's logits read from the call's first rows (row0 dropped)
    "chunk_rows_from_row_0": ("metal/linear_distillation.metal",
        "lce::logits_tile<G>(mma, hidden, head, args.row0 + m0, v0,",
        "lce::logits_tile<G>(mma, hidden, head, m0, v0,", AssertionError),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bugs_are_reported(tmp_path, bug):
    where, right, wrong, error = PLANTED[bug]
    (tmp_path / "csrc").symlink_to(REPO / "csrc")
    (tmp_path / "metal").mkdir()
    for source in (REPO / "metal").iterdir():
        (tmp_path / "metal" / source.name).write_text(source.read_text())
    planted = tmp_path / where
    text = planted.read_text()
    assert text.count(right) == 1, bug
    planted.write_text(text.replace(right, wrong))
    broken = mh.build([tmp_path / m for m in METAL], ADAPTOR, include_dirs=("csrc",))
    o = Options("kl", T=1.2, alpha=0.3, ignore=-100)
    n, v = 21, 12
    rng = np.random.default_rng(8)
    ids, vals = teacher_topk(rng, n, v, 3)
    ids[5] = [2, 2, 9]
    targets = make_targets(rng, n, v, o, bad_row=False)
    s = Head(rng, n, 6, v)
    with pytest.raises(error):
        check_ltk(broken, s, ids, vals, targets, o, True, 4 * v * 5, seed=1, schedules=mh.DEFAULT_SCHEDULES[:5])


def test_zz_every_instantiation_ran():
    """Runs last (file order): every kernel metal/linear_distillation.metal
    defines was launched above."""
    if not USED:
        pytest.skip("run with the kernel tests")
    ours = kernel_names(["metal/linear_distillation.metal"])
    assert ours, "no kernels found in metal/linear_distillation.metal"
    assert not ours - USED, sorted(ours - USED)
