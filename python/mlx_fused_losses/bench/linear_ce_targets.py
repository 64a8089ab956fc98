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
  scorer half    the same with half the tokens' cotangents 0 (a masked prompt):
                 the backward skips their rows
Targets: scorer f+b <= 1.25 x three GEMMs (as the LCE) and <= LCE none f+b.
The first is below the scorer's floor: with a cotangent per token, dW =
dZ^T H needs each token's cotangent inside dZ, so it cannot be formed in the
forward, and keeping Z (or P) for the backward is N x V memory; the backward
recomputes Z per chunk: 4 GEMMs of work (forward Z; backward Z, dH, dW), the
same 4 whichever way the work is split (forming P W in the forward for dH
still leaves Z and dW to the backward): the floor is 4/3 = 1.33 x three GEMMs.
The script prints the scorer against 4 GEMMs at the measured GEMM time (its
cost beyond the GEMMs it must do).

With --filter, Cut Cross-Entropy's gradient filtering (filter_eps="auto") on a
peaked softmax, float32 and bfloat16 inputs, interleaved with the exact step
on the same data:
  f+b exact      value_and_grad (hidden, weight), filter_eps=None
  f+b filtered   the same with filter_eps="auto" (finfo(dtype).eps / 32)
and the filtered gradients' error: max |filtered - exact| / max |exact| of dH
and dW, beside the blocks of vocabulary the filter kept (per chunk of the
plan, kept if any row's dZ exceeds eps |g|). The data: hidden and weight as
above, logits plus a unigram bias b_j = -2 log(1 + j / 64) (a Zipf-like prior:
the mass sits on the first classes, as in a trained model's frequent tokens;
the filter's gain depends on it: with the flat softmax of random logits no
block can be dropped).

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
        # half the tokens masked (a prompt): their rows are skipped in the backward
        half = mx.array(np.where(np.arange(n) < n // 2, 0.0, rng.standard_normal(n)).astype(np.float32))
        logp_half = mx.value_and_grad(lambda a, b: (fl.linear_log_probs(a, b, tm) * half).sum(), argnums=(0, 1))
        cases["LCE none f+b"] = lambda: mx.eval(lce_none(hm, wm))
        cases["scorer f+b"] = lambda: mx.eval(logp(hm, wm))
        cases["scorer half"] = lambda: mx.eval(logp_half(hm, wm))
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
        # the floor: 4 GEMMs of work (see the module's docstring), each GEMM at
        # the three GEMMs' measured mean
        gemm = best["np 3 GEMMs"] / 3
        out["scorer_gemm_s"] = gemm
        out["scorer_vs_4_gemms"] = best["scorer f+b"] / (4 * gemm)
        out["scorer_vs_lce_none"] = best["scorer f+b"] / best["LCE none f+b"]
        out["scorer_half_ratio"] = best["scorer half"] / best["scorer f+b"]
    return out


def run_filter(n: int, h: int, v: int, repeats: int, dtype) -> dict:
    """Exact vs filter_eps="auto" fwd+bwd on the peaked data (see the module
    docstring), interleaved; the filtered gradients' error and kept blocks."""
    rng = np.random.default_rng(1)
    hm = mx.array(rng.standard_normal((n, h), dtype=np.float32)).astype(dtype)
    wm = mx.array(rng.standard_normal((v, h), dtype=np.float32) / np.float32(np.sqrt(h))).astype(dtype)
    bias = mx.array((-2.0 * np.log1p(np.arange(v) / 64.0)).astype(np.float32)).astype(dtype)
    logits = (hm.astype(mx.float32) @ wm.astype(mx.float32).T) + bias.astype(mx.float32)
    # Targets drawn from the model's own softmax (a trained model's targets
    # are mostly likely classes).
    tm = mx.random.categorical(logits, key=mx.random.key(0))
    mx.eval(hm, wm, bias, tm)
    eps = float(mx.finfo(dtype).eps) / 32

    def step(filter_eps):
        return mx.value_and_grad(lambda a, b: fl.linear_cross_entropy(a, b, tm, bias, filter_eps=filter_eps),
                                 argnums=(0, 1))

    exact, filtered = step(None), step("auto")
    cases = {"f+b exact": lambda: mx.eval(exact(hm, wm)), "f+b filtered": lambda: mx.eval(filtered(hm, wm))}
    times = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    (_, g_exact), (_, g_filtered) = exact(hm, wm), filtered(hm, wm)
    errors = {}
    for name, a, b in zip(("dH", "dW"), g_exact, g_filtered):
        a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
        errors[name] = (mx.abs(a32 - b32).max() / mx.abs(a32).max()).item()
    # Kept blocks: per chunk of the plan's rows, a block is kept where some
    # row's |dZ| = |g (p - onehot)| exceeds eps |g| (g = 1/N for every row).
    plan = _ext.linear_cross_entropy_plan(n, h, v, dtype == mx.float32, dtype == mx.float32, _ext.num_threads())
    block = _ext.LINEAR_CE_FILTER_BLOCK
    d = mx.softmax(logits, axis=-1) - (mx.arange(v)[None, :] == tm[:, None]).astype(mx.float32)
    blocks = -(-v // block)
    kept = total = 0
    for r0 in range(0, n, plan["rows"]):
        live = mx.abs(d[r0:r0 + plan["rows"]]).max(axis=0) > eps
        pad = mx.concatenate([live, mx.zeros((blocks * block - v,), mx.bool_)])
        kept += int(pad.reshape(blocks, block).any(axis=1).sum().item())
        total += blocks
    del logits, d
    best = {k: min(t) for k, t in times.items()}
    return dict(shape=(n, h, v), dtype=dtype, eps=eps, times=times, best=best,
                speedup=best["f+b exact"] / best["f+b filtered"], errors=errors, kept=kept / total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats per shape; ratios are of the minima (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=["2048x1024x32000", "1024x1024x151936"], metavar="NxHxV",
                        help="tokens x hidden x vocabulary, float32 (default: %(default)s)")
    parser.add_argument("--scorer", action="store_true",
                        help="also time the per-token paths: linear_log_probs and the LCE's reduction='none'")
    parser.add_argument("--filter", action="store_true",
                        help="time filter_eps='auto' against the exact backward on a peaked softmax "
                        "(float32 and bfloat16), instead of the targets above")
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    print(f"NumPy BLAS: {blas_info()}")
    print(f"our threads: {_ext.num_threads()}, chunk_bytes default "
          f"{_ext.LINEAR_CE_DEFAULT_CHUNK_BYTES >> 20} MiB")
    if args.filter:
        for spec in args.shapes:
            n, h, v = (int(x) for x in spec.split("x"))
            for dtype in (mx.float32, mx.bfloat16):
                r = run_filter(n, h, v, args.repeats, dtype)
                print(f"\n(N, H, V) = {r['shape']} {dtype}, filter_eps='auto' = {r['eps']:.3g}")
                for name, ts in r["times"].items():
                    print(f"  {name:12s} min {min(ts):7.3f} s  median {statistics.median(ts):7.3f} s  "
                          f"all {' '.join(f'{t:.3f}' for t in ts)}")
                print(f"  speed-up {r['speedup']:.2f}x, vocabulary blocks kept {100 * r['kept']:.1f}%, "
                      f"error max|filtered - exact| / max|exact|: dH {r['errors']['dH']:.2g}, "
                      f"dW {r['errors']['dW']:.2g}")
        return 0
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
            print(f"  scorer f+b / 3 GEMMs = {r['scorer_ratio']:.2f}  (target <= 1.25, below its floor "
                  f"1.33: 4 GEMMs of work = 4 x {r['scorer_gemm_s']:.3f} s measured)")
            print(f"  scorer f+b / 4 GEMMs = {r['scorer_vs_4_gemms']:.2f}  (its cost beyond the GEMMs it must do)")
            print(f"  scorer f+b / LCE none f+b = {r['scorer_vs_lce_none']:.2f}  (target <= 1.00)")
            print(f"  scorer, half the tokens masked / all live = {r['scorer_half_ratio']:.2f}  "
                  f"(their rows skipped in the backward: 2.5 / 4 GEMMs of work = 0.62)")
        print(f"  peak above inputs + gradients: {r['extra_bytes'] / 2**20:.1f} MiB "
              f"(logits would be {r['logits_bytes'] / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
