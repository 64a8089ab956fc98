"""The fused linear cross-entropy against its physical yardstick: the GEMMs of
an unfused step, timed with NumPy's OpenBLAS in the same run .

    python -m mlx_fused_losses.bench.linear_ce_targets [--repeats 3] [--shapes 2048x1024x32000 ...]

For each (N, H, V), float32, interleaved repeats of:
  np 1 GEMM    Z = H @ W.T                      (the forward's GEMM)
  ours fwd     linear_cross_entropy (loss only, reduction="mean")
  np 3 GEMMs   Z = H @ W.T, dH = Z @ W, dW = Z.T @ H
  ours f+b     value_and_grad w.r.t. hidden and weight
Ratios are of the minima (the machine is shared: compare within one run only).
Targets: fwd <= 1.1 x one GEMM, fwd+bwd <= 1.25 x three GEMMs. Also the peak
memory of ours above inputs + gradients (must stay <= chunk_bytes + O(N)).

With --scorer, also the per-token paths, each token with its own cotangent:
  LCE none f+b   linear_cross_entropy(reduction="none"), recomputing backward
  scorer f+b     linear_log_probs (log p), the row-statistics primitive
Targets: scorer f+b <= 1.25 x three GEMMs (as the LCE; a per-token backward
recomputes the logits, a fourth GEMM: 1.33 is its floor) and <= LCE none f+b.

On machines that force OPENBLAS_CORETYPE (an older kernel for NumPy), unset it
(and OPENBLAS_L2_SIZE) for this command; the script prints the kernel NumPy runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

import mlx_fused_losses as fl
from mlx_fused_losses import _ext


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    rows = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
            f"threads={i.get('num_threads')} ({i.get('prefix')})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(rows)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_shape(n: int, h: int, v: int, repeats: int, scorer: bool = False) -> dict:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    weight = rng.standard_normal((v, h), dtype=np.float32) / np.float32(np.sqrt(h))
    targets = rng.integers(0, v, n)
    hm, wm, tm = mx.array(hidden), mx.array(weight), mx.array(targets)
    mx.eval(hm, wm, tm)
    step = mx.value_and_grad(lambda a, b: fl.linear_cross_entropy(a, b, tm), argnums=(0, 1))

    def np_one():
        hidden @ weight.T

    def np_three():
        z = hidden @ weight.T
        z @ weight
        z.T @ hidden

    def ours_fwd():
        mx.eval(fl.linear_cross_entropy(hm, wm, tm))

    def ours_fb():
        mx.eval(step(hm, wm))

    cases = {"np 1 GEMM": np_one, "ours fwd": ours_fwd, "np 3 GEMMs": np_three, "ours f+b": ours_fb}
    if scorer:
        cot = mx.array(rng.standard_normal(n).astype(np.float32))
        lce_none = mx.value_and_grad(
            lambda a, b: (fl.linear_cross_entropy(a, b, tm, reduction="none") * cot).sum(), argnums=(0, 1))
        logp = mx.value_and_grad(lambda a, b: (fl.linear_log_probs(a, b, tm) * cot).sum(), argnums=(0, 1))
        cases["LCE none f+b"] = lambda: mx.eval(lce_none(hm, wm))
        cases["scorer f+b"] = lambda: mx.eval(logp(hm, wm))
    times = {k: [] for k in cases}
    ours_fb()  # warm-up (pool, allocator)
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    # Peak memory of one step above what was allocated before it (inputs) minus
    # the gradients it returns.
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = step(hm, wm)
    mx.eval(out)
    grads_bytes = sum(g.nbytes for g in out[1])
    extra = mx.get_peak_memory() - base - grads_bytes
    del out
    best = {k: min(t) for k, t in times.items()}
    out = dict(shape=(n, h, v), times=times, best=best,
               fwd_ratio=best["ours fwd"] / best["np 1 GEMM"],
               fb_ratio=best["ours f+b"] / best["np 3 GEMMs"],
               extra_bytes=extra, logits_bytes=n * v * 4)
    if scorer:
        out["scorer_ratio"] = best["scorer f+b"] / best["np 3 GEMMs"]
        out["scorer_vs_lce_none"] = best["scorer f+b"] / best["LCE none f+b"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats per shape; ratios are of the minima (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=["2048x1024x32000", "1024x1024x151936"], metavar="NxHxV",
                        help="tokens x hidden x vocabulary, float32 (default: %(default)s)")
    parser.add_argument("--scorer", action="store_true",
                        help="also time the per-token paths: linear_log_probs and the LCE's reduction='none'")
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"NumPy BLAS: {blas_info()}")
    print(f"our threads: {_ext.num_threads()}, chunk_bytes default "
          f"{_ext.LINEAR_CE_DEFAULT_CHUNK_BYTES >> 20} MiB")
    for spec in args.shapes:
        n, h, v = (int(x) for x in spec.split("x"))
        r = run_shape(n, h, v, args.repeats, args.scorer)
        gflop = 2 * n * h * v / 1e9
        print(f"\n(N, H, V) = {r['shape']}  ({gflop:.0f} GFLOP per GEMM)")
        for name, ts in r["times"].items():
            print(f"  {name:11s} min {min(ts):7.3f} s  median {statistics.median(ts):7.3f} s  "
                  f"all {' '.join(f'{t:.3f}' for t in ts)}")
        print(f"  fwd / 1 GEMM   = {r['fwd_ratio']:.2f}  (target <= 1.10)")
        print(f"  f+b / 3 GEMMs  = {r['fb_ratio']:.2f}  (target <= 1.25)")
        if args.scorer:
            print(f"  scorer f+b / 3 GEMMs = {r['scorer_ratio']:.2f}  (target <= 1.25; 4 GEMMs of work)")
            print(f"  scorer f+b / LCE none f+b = {r['scorer_vs_lce_none']:.2f}  (target <= 1.00)")
        print(f"  peak above inputs + gradients: {r['extra_bytes'] / 2**20:.1f} MiB "
              f"(logits would be {r['logits_bytes'] / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
