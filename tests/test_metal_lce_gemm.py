"""The shared tile GEMM of the Metal linear CE (metal/lce_gemm.h), executed by the CPU
harness through MLX's own steel headers from the mlx-metal wheel (BlockLoader: device
-> threadgroup staging, vector copies and load_safe at the edges; BlockMMA: 8x8
simdgroup_matrix fragments, float accumulators), for every tile shape MLX's
matmul.cpp picks for the linear CE's GEMMs (tests/metal_kernels/lce_gemm_tile.metal)
and every layout they use (nt: logits and dZ, nn: dH, tn: dW), against float64.

The operands are staged in their own dtype (float16/bfloat16 stay 16-bit) or, for a
mixed pair, converted to float; shapes at every tile edge +-1 and odd K exercise
steel's load_safe and our masked stores.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import metal_host as mh
from conftest import CLANG_MISSING
from metal_host.kernel_names import kernel_names
from test_metal_kernels import DT_CODE, as_device

pytestmark = [pytest.mark.skipif(mh.find_clang() is None, reason=CLANG_MISSING)]

METAL = ["tests/metal_kernels/lce_gemm_tile.metal"]
ADAPTOR = "tests/metal_kernels/lce_gemm_adaptor.cpp"
NAME = re.compile(r"gemm_(nt|nn|tn)_(\w+?)_(\w+?)_bm(\d+)_bn(\d+)_bk(\d+)_wm(\d+)_wn(\d+)$")


@pytest.fixture(scope="module")
def lib():
    return mh.build(METAL, ADAPTOR, include_dirs=("csrc",))


def kernels():
    return sorted(kernel_names(METAL, include_dirs=("csrc",)))


def operands(rng, layout, m, n, k, adt, bdt):
    a = rng.standard_normal((k, m) if layout == "tn" else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if layout == "nt" else (k, n)).astype(np.float32)
    (a_dev, a_val), (b_dev, b_val) = as_device(a, adt), as_device(b, bdt)
    a64 = a_val.astype(np.float64)
    b64 = b_val.astype(np.float64)
    want = (a64.T if layout == "tn" else a64) @ (b64.T if layout == "nt" else b64)
    return a_dev, b_dev, want


def run(lib, name, layout, adt, bdt, m, n, k, seed, accumulate=False, schedules=None):
    rng = np.random.default_rng(seed)
    a, b, want = operands(rng, layout, m, n, k, adt, bdt)
    c0 = rng.standard_normal((m, n)).astype(np.float32) if accumulate else np.full((m, n), np.nan, np.float32)
    c = c0.copy()
    kw = {} if schedules is None else {"schedules": schedules}
    lib.run("gemm_tile_run", np.frombuffer(name.encode() + b"\0", np.uint8).copy(), np.int32(DT_CODE[adt]),
            np.int32(DT_CODE[bdt]), a, b, c, np.int32(m), np.int32(n), np.int32(k),
            np.int32(accumulate), **kw)
    if accumulate:
        want = want + c0.astype(np.float64)
    # float32 accumulation of K products of exactly represented operands
    tol = 1e-5 * (k + 1) * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(c, want, rtol=0, atol=tol, err_msg=name)


def test_every_shape_layout_and_dtype(lib):
    names = kernels()
    assert len(names) == 5 * 3 * 4
    for i, name in enumerate(names):
        layout, adt, bdt, bm, bn, bk, _, _ = NAME.match(name).groups()
        bm, bn, bk = int(bm), int(bn), int(bk)
        # one full tile plus a ragged edge in every dimension, K not a multiple of BK
        run(lib, name, layout, adt, bdt, bm + 3, bn + 5, 2 * bk + 7, seed=i,
            schedules=(mh.Schedule("forward"), mh.Schedule("ahead", memory="strict")))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (63, 65, 16), (64, 64, 32), (65, 31, 0), (7, 130, 33)])
def test_tile_edges_all_schedules(lib, m, n, k):
    """The default tile (64 x 64 x 16, 2 x 2) at its edges under every schedule
    (a missing barrier or a restaged tile would make them differ); K = 0 runs no
    step at all."""
    for layout in ("nt", "nn", "tn"):
        run(lib, f"gemm_{layout}_bfloat16_bfloat16_bm64_bn64_bk16_wm2_wn2", layout, "bfloat16",
            "bfloat16", m, n, k, seed=m + n + k)


def test_accumulate(lib):
    run(lib, "gemm_tn_float32_float32_bm64_bn64_bk16_wm2_wn2", "tn", "float32", "float32",
        70, 33, 21, seed=3, accumulate=True)


def test_the_headers_executed_are_mlx_steel():
    """The harness compiles MLX's own loader and MMA from the mlx-metal wheel (not a
    copy, not a stand-in): clang's dependency list of the kernel source."""
    import subprocess

    from metal_host.build import CXX_FLAGS, INCLUDE, MLX_STANDINS, REPO, find_clang, mlx_flags
    from metal_host.mlx_headers import mlx_metal_include

    cmd = [find_clang(), *CXX_FLAGS, f"-I{INCLUDE}", *mlx_flags(harness=True), f"-I{REPO / 'csrc'}",
           "-M", "-x", "c++", str(REPO / METAL[0])]
    deps = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    steel = mlx_metal_include() / "mlx/backend/metal/kernels/steel/gemm"
    for header in ("loader.h", "mma.h"):
        assert str(steel / header) in deps, header
    standins = [d for d in deps if d.startswith(str(MLX_STANDINS))]
    assert sorted(Path(d).name for d in standins) == ["complex.h", "type_traits.h"], standins
