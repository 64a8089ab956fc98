"""Per-call cost at tiny shapes (32 x 10 logits, 320 elements), where the
kernels do almost nothing and what counts is the Python wrapper, graph
building, evaluation and the thread pool: ours must never be slower than the
MLX reference there, eager or compiled."""

import statistics
import time

import mlx.core as mx

from .cases import LOSSES

ROW_SHAPE = (32, 10)
FLAT_SHAPE = (320,)


def _per_call_us(fn, inputs, calls):
    start = time.perf_counter()
    for _ in range(calls):
        mx.eval(fn(*inputs))
    return 1e6 * (time.perf_counter() - start) / calls


def run_small_shapes(loss_names, samples=45, calls=40):
    """One record per loss x (eager, compiled) x pass.

    Ours and each reference alternate sample by sample, and the samples are
    short (``calls`` calls each), so that a burst of load from other processes
    hits every implementation alike; the minimum over many samples is what
    counts (at a few microseconds per call, load only ever adds time, and it
    adds the most to medians).
    """
    records = []
    for name in loss_names:
        spec = LOSSES[name]
        if spec.roofline is not None:  # not a one-array-in loss (linear cross-entropy)
            continue
        shape = ROW_SHAPE if spec.rowwise else FLAT_SHAPE
        mx.random.seed(0)
        inputs = spec.make_inputs(shape, mx.float32)
        mx.eval(inputs)
        others = spec.small_shape_references or {}
        for compiled in (False, True):
            for pass_name in ("fwd", "fwd+bwd"):
                fns = {"ours": spec.ours, "mlx": spec.reference, **others}
                if pass_name == "fwd+bwd":
                    fns = {k: mx.value_and_grad(f) for k, f in fns.items()}
                if compiled:
                    fns = {k: mx.compile(f) for k, f in fns.items()}
                times = {k: [] for k in fns}
                for f in fns.values():
                    _per_call_us(f, inputs, 10)  # warm up (and compile)
                for _ in range(samples):
                    for k, f in fns.items():
                        times[k].append(_per_call_us(f, inputs, calls))
                ours, ref = min(times["ours"]), min(times["mlx"])
                records.append({
                    "loss": name, "shape": list(shape), "compiled": compiled, "pass": pass_name,
                    "reference": spec.reference_name,
                    "ours_us": ours, "mlx_us": ref, "speedup_vs_mlx": ref / ours,
                    "ours_us_median": statistics.median(times["ours"]),
                    "mlx_us_median": statistics.median(times["mlx"]),
                    "others": {k: {"us": min(times[k]), "speedup": min(times[k]) / ours} for k in others},
                })
    return records
