"""The Metal linear CE's dZ with a differentiable lse (LceArgs::lse_cotangent:
the cotangent buffer holds [2, N], the rows' then their lse's), on the CPU
harness (tests/metal_host), replaying eval_gpu's backward
(tests/metal_kernels/lce_adaptor.cpp): dH, dW, dbias against the CPU
primitive (ext.linear_cross_entropy(lse_grad=True) under mx.vjp with both
cotangents) and float64, with ignored rows (only their lse's term), label
smoothing, z-loss, soft-cap and bias, several chunks."""

from __future__ import annotations

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING, assert_close

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)]

mx = pytest.importorskip("mlx.core")
import mlx_fused_losses._ext as ext  # noqa: E402

from test_linear_cross_entropy import gradient_bounds  # noqa: E402
from test_lce_differentiable_lse import reference64  # noqa: E402
from test_metal_linear_cross_entropy import (ADAPTOR, CASES, FAST, METAL, gpu_backward, gpu_forward,  # noqa: E402
                                             make_case, mx_args)


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


def cpu_grads(d, case, g, g_lse):
    hm, wm, tm = mx.array(d["hr"]), mx.array(d["wr"]), mx.array(d["t"])
    names = ["hidden", "weight"] + (["bias"] if case["bias"] else [])
    kw = dict(label_smoothing=case["ls"], label_smoothing_mode=case["mode"], ignore_index=case["ignore"],
              z_loss=case["z"], logit_softcap=case["cap"], lse_grad=True, stream=mx.cpu)

    def f(*p):
        x = dict(zip(names, p))
        out = ext.linear_cross_entropy(x["hidden"], x["weight"], tm, x.get("bias"), **kw)
        return [out[0], out[1]]

    primals = [hm, wm] + ([mx.array(d["bias"])] if case["bias"] else [])
    _, grads = mx.vjp(f, primals, [mx.array(g), mx.array(g_lse)])
    return {k: np.array(v) for k, v in zip(names, grads)}


@pytest.mark.parametrize("case_name", ["plain", "others_z_cap"])
@pytest.mark.parametrize("n,h,v", [(33, 16, 31), (70, 17, 97)])
def test_lse_cotangent_vs_cpu_and_float64(lib, case_name, n, h, v):
    case = dict(CASES[case_name], sum=False)
    rng = np.random.default_rng(n * 7 + v)
    d = make_case(rng, n, h, v, "float32", "float32", case, bad_rows=False)
    if case["ignore"] is not None:
        assert (d["t"] == case["ignore"]).any()  # ignored rows: their lse's term only
    chunk_bytes = 4 * v * 32  # several chunks at n = 70
    out = gpu_forward(lib, d, case, chunk_bytes, FAST)
    g = rng.uniform(-2, 2, n).astype(np.float32)
    g_lse = rng.uniform(-1, 1, n).astype(np.float32)
    want = ("hidden", "weight") + (("bias",) if case["bias"] else ())
    lib.run("lce_set_lse_cotangent", np.int32(1), schedules=(mh.Schedule(),))
    try:
        grads = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(),
                             np.concatenate([g, g_lse]), chunk_bytes, want, FAST)
    finally:
        lib.run("lce_set_lse_cotangent", np.int32(0), schedules=(mh.Schedule(),))
    cpu = cpu_grads(d, case, g, g_lse)
    args = mx_args(d, case)
    r = reference64(args, g.astype(np.float64), g_lse.astype(np.float64), "none", logit_softcap=case["cap"],
                    label_smoothing=case["ls"], label_smoothing_mode=case["mode"], ignore_index=case["ignore"],
                    z_loss=case["z"])
    mags, logit_err = gradient_bounds(args, r, "none", mx.array(g), case["ignore"], case["z"])
    for name in want:
        assert_close(grads[name], r[name], mx.float32, scale=logit_err[name], mag=mags[name],
                     what=f"d{name} vs float64")
        assert_close(grads[name], cpu[name], mx.float32, scale=logit_err[name], mag=mags[name],
                     what=f"d{name} vs CPU")
    # Without the flag the same buffer's second half is never read: the loss's gradient alone.
    plain = gpu_backward(lib, d, case, out["lse"].copy(), out["lse_lo"].copy(), np.concatenate([g, g_lse]),
                         chunk_bytes, ("hidden",), FAST)
    r0 = reference64(args, g.astype(np.float64), np.zeros(n), "none", logit_softcap=case["cap"],
                     label_smoothing=case["ls"], label_smoothing_mode=case["mode"], ignore_index=case["ignore"],
                     z_loss=case["z"])
    assert_close(plain["hidden"], r0["hidden"], mx.float32, scale=logit_err["hidden"], mag=mags["hidden"],
                 what="dH without lse_cotangent")
