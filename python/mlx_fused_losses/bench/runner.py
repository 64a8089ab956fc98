"""Runs one case: ours vs MLX (vs torch) vs the rooflines, forward and forward+backward."""

import os

import mlx.core as mx
import numpy as np

from . import roofline, torch_column
from .cases import DTYPES, Case
from .timing import RepeatPolicy, measure, measure_interleaved

PASSES = ("fwd", "fwd+bwd")
MB = 1e6
# Forward values must agree with the float32 reference to this relative tolerance
# (bfloat16 outputs alone carry ~4e-3 relative rounding, float16 ~5e-4).
VALUE_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}
# Peak memory of torch's fwd+bwd, in units of the first input (log-softmax,
# its gradient and ours): used only to skip it where it would not fit.
TORCH_PEAK_PER_INPUT = 4


def _memory_budget_bytes(limit_gib=None) -> int:
    """What one case may use: MLX's limit, capped by the machine's physical RAM
    (and by --memory-budget where given)."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = int(0.8 * min(mx.get_memory_limit(), physical))
    return budget if limit_gib is None else min(budget, int(limit_gib * 2**30))


class MemoryGuard:
    """Skips measurements whose peak memory would not fit.

    Peak memory is linear in the problem size, so the peak per element measured
    on the previous (smaller) size of the same loss, dtype and implementation
    predicts the next. Ours and the reference are guarded separately: MLX's
    composed cross-entropy needs ~4x the logits, ours ~2x.
    """

    def __init__(self, limit_gib=None):
        self.budget = _memory_budget_bytes(limit_gib)
        self._peak_per_element = {}

    def _key(self, case: Case, impl: str):
        return case.spec.name, case.dtype_name, impl

    def skip_reason(self, case: Case, impl: str, predicted=None):
        if predicted is None:
            predicted = int(self._peak_per_element.get(self._key(case, impl), 0.0) * case.elements)
        if predicted > self.budget:
            return f"needs ~{predicted / 2**30:.1f} GiB, budget {self.budget / 2**30:.1f} GiB"
        return None

    def record(self, case: Case, impl: str, peak_bytes: int):
        key = self._key(case, impl)
        per_element = peak_bytes / case.elements
        self._peak_per_element[key] = max(self._peak_per_element.get(key, 0.0), per_element)


def _mlx_thunks(case: Case, inputs, use_compile: bool):
    """{pass: {"ours": thunk, "mlx": thunk}}; each thunk returns arrays to eval."""
    ours, reference, argnums = case.spec.ours, case.spec.reference, case.spec.grad_argnums
    fns = {
        "fwd": (ours, reference),
        "fwd+bwd": (mx.value_and_grad(ours, argnums=argnums), mx.value_and_grad(reference, argnums=argnums)),
    }
    thunks = {}
    for pass_name, (ours_fn, ref_fn) in fns.items():
        if use_compile:
            ours_fn, ref_fn = mx.compile(ours_fn), mx.compile(ref_fn)
        thunks[pass_name] = {
            "ours": lambda f=ours_fn: f(*inputs),
            "mlx": lambda f=ref_fn: f(*inputs),
        }
    return thunks


def _measure_extras(case: Case, inputs, pass_name: str, policy: RepeatPolicy):
    """More baselines of a loss (e.g. torch): timing, peak MLX memory where it
    means something, and throughput."""
    if case.spec.extras is None:
        return None
    backward = pass_name == "fwd+bwd"
    flops = case.spec.flops(case.shape, backward) if case.spec.flops else None
    extras = {}
    for name, (thunk, counts_mlx_memory) in case.spec.extras(inputs, backward).items():
        timing, peak = measure(thunk, policy)
        extras[name] = {**timing.to_dict(), "peak_mb": peak / MB if counts_mlx_memory else None}
        if flops:
            extras[name]["gflops"] = flops / timing.median_ms / 1e6
    return extras


def _upcast(a: mx.array) -> mx.array:
    return a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a


def _relative_difference(case: Case, inputs) -> float:
    """Our mean-reduced forward value vs an accurate reference mean.

    The reference runs in float32 on the same (upcast) inputs, so bfloat16
    cases check our accuracy rather than the reference's bfloat16 rounding.
    Its per-element output is averaged in float64 by numpy: MLX's own float32
    mean of 1M elements is already off by ~5e-4 relative on the CPU, which
    would mask (or fake) errors in ours.
    """
    ours = case.spec.ours(*inputs).astype(mx.float32).item()
    per_element = case.spec.reference(*[_upcast(a) for a in inputs], reduction="none")
    reference = float(np.array(per_element, dtype=np.float64).mean())
    return abs(ours - reference) / max(abs(reference), 1e-12)


def _base_record(case: Case, pass_name: str):
    return {
        "loss": case.spec.name,
        "dtype": case.dtype_name,
        "size": case.size_label,
        "shape": list(case.shape),
        "elements": case.elements,
        "pass": pass_name,
        "reference": case.spec.reference_name,
    }


def skipped_records(case: Case, reason: str):
    return [{**_base_record(case, p), "skipped": reason} for p in PASSES]


def _entry(timing, peak, nbytes, with_peak=True):
    entry = {**timing.to_dict(), "gbps": nbytes / timing.median_ms / MB}
    if with_peak:
        entry["peak_mb"] = peak / MB
    return entry


def _roofline_thunks(cpu_roof, inputs, pass_name, case):
    """{(kind, threads): thunk} of the yardsticks of a pass; kind "roofline"
    is what "x roofline" divides by, "roofline_warm" the warm one beside it.

    CPU: forward = warm read-only; forward+backward = with a fresh gradient
    (the caller keeps the logits, so the gradient is a new array), and the warm
    one beside it; each on one thread and on the kernels' threads (the faster
    counts). GPU: MLX's streaming kernels. A loss with its own yardstick
    (linear cross-entropy: its GEMMs) has that instead.
    """
    if case.spec.roofline is not None:
        return {("roofline", None): case.spec.roofline(inputs, pass_name == "fwd+bwd")}
    if cpu_roof is None:
        fn = roofline.gpu_forward if pass_name == "fwd" else roofline.gpu_forward_backward
        return {("roofline", None): lambda: fn(inputs)}
    by_kind = cpu_roof.thunks(pass_name)
    kinds = {"roofline": "warm"} if pass_name == "fwd" else {"roofline_warm": "warm", "roofline": "fresh"}
    return {(key, threads): thunk for key, kind in kinds.items() for threads, thunk in by_kind[kind].items()}


def run_case(case: Case, policy: RepeatPolicy, use_compile: bool, guard: MemoryGuard):
    reason = guard.skip_reason(case, "ours")
    if reason:
        return skipped_records(case, reason)

    mx.random.seed(0)
    inputs = case.spec.make_inputs(case.shape, DTYPES[case.dtype_name])
    mx.eval(inputs)
    rel_diff = _relative_difference(case, inputs) if not guard.skip_reason(case, "mlx") else None
    output_nbytes = inputs[0].dtype.size  # scalar ("mean") loss
    cpu_roof = roofline.CpuRoofline(inputs) if roofline.on_cpu() and case.spec.roofline is None else None
    torch_thunks = None
    if not guard.skip_reason(case, "torch", TORCH_PEAK_PER_INPUT * inputs[0].nbytes):
        torch_thunks = torch_column.thunks(case.spec, inputs)

    records = []
    for pass_name, thunks in _mlx_thunks(case, inputs, use_compile).items():
        record = _base_record(case, pass_name)
        nbytes = record["bytes"] = roofline.bytes_moved(inputs, output_nbytes, backward=pass_name == "fwd+bwd")
        if case.spec.flops is not None:
            record["flops"] = case.spec.flops(case.shape, pass_name == "fwd+bwd")
        # Everything of the pass is timed in one interleaved measurement, so
        # that its ratios (speedups, x roofline) come from the same moments.
        timed = {}
        for impl, thunk in thunks.items():
            skip = guard.skip_reason(case, impl)
            if skip:
                record[impl] = {"skipped": skip}
            else:
                timed[impl] = thunk
        if torch_thunks:
            timed["torch"] = torch_thunks[pass_name]
        roofs = _roofline_thunks(cpu_roof, inputs, pass_name, case)
        timed.update(roofs)
        results = measure_interleaved(timed, policy)
        for impl in ("ours", "mlx"):
            if impl in results:
                timing, peak = results[impl]
                record[impl] = _entry(timing, peak, nbytes)
                if pass_name == "fwd+bwd":
                    guard.record(case, impl, peak)
        if "torch" in results:
            record["torch"] = _entry(*results["torch"], nbytes, with_peak=False)
            record["speedup_vs_torch"] = record["torch"]["median_ms"] / record["ours"]["median_ms"]
        for key, threads in roofs:
            entry = {**_entry(*results[(key, threads)], nbytes, with_peak=False), "threads": threads}
            if key not in record or entry["median_ms"] < record[key]["median_ms"]:
                record[key] = entry  # the fastest thread count
        if record.get("flops"):
            for impl in ("ours", "mlx", "roofline"):
                if "median_ms" in record[impl]:
                    record[impl]["gflops"] = record["flops"] / record[impl]["median_ms"] / 1e6
        extras = _measure_extras(case, inputs, pass_name, policy)
        if extras is not None:
            record["extras"] = extras
        if "roofline_warm" in record:
            record["ratio_to_warm_roofline"] = record["ours"]["median_ms"] / record["roofline_warm"]["median_ms"]
        if "median_ms" in record["mlx"]:
            record["speedup_vs_mlx"] = record["mlx"]["median_ms"] / record["ours"]["median_ms"]
        record["ratio_to_roofline"] = record["ours"]["median_ms"] / record["roofline"]["median_ms"]
        record["forward_rel_diff"] = rel_diff
        record["values_match"] = None if rel_diff is None else rel_diff <= VALUE_TOLERANCE[case.dtype_name]
        records.append(record)

    del inputs, thunks, cpu_roof, torch_thunks
    mx.clear_cache()  # hand freed buffers back so the next, larger case has room
    return records
