"""Runs one case: ours vs MLX vs roofline, forward and forward+backward."""

import os

import mlx.core as mx
import numpy as np

from bench import roofline
from bench.cases import DTYPES, Case
from bench.timing import RepeatPolicy, measure

PASSES = ("fwd", "fwd+bwd")
MB = 1e6
# Forward values must agree with the float32 reference to this relative tolerance
# (bfloat16 outputs alone carry ~4e-3 relative rounding, float16 ~5e-4).
VALUE_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}


def _memory_budget_bytes() -> int:
    """What one case may use: MLX's limit, capped by the machine's physical RAM."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * min(mx.get_memory_limit(), physical))


class MemoryGuard:
    """Skips cases whose peak memory would not fit.

    Peak memory is linear in the problem size, so the peak per element measured
    on the previous (smaller) size of the same loss and dtype predicts the next.
    """

    def __init__(self):
        self.budget = _memory_budget_bytes()
        self._peak_per_element = {}

    def _key(self, case: Case):
        return case.spec.name, case.dtype_name

    def predicted_peak(self, case: Case) -> int:
        return int(self._peak_per_element.get(self._key(case), 0.0) * case.elements)

    def skip_reason(self, case: Case):
        predicted = self.predicted_peak(case)
        if predicted > self.budget:
            return f"needs ~{predicted / 2**30:.1f} GiB, budget {self.budget / 2**30:.1f} GiB"
        return None

    def record(self, case: Case, peak_bytes: int):
        key = self._key(case)
        per_element = peak_bytes / case.elements
        self._peak_per_element[key] = max(self._peak_per_element.get(key, 0.0), per_element)


def _callables(case: Case, inputs, use_compile: bool):
    """(ours, mlx, roofline) thunks for each pass; each thunk returns arrays to eval."""
    ours, reference, argnums = case.spec.ours, case.spec.reference, case.spec.grad_argnums
    fns = {
        "fwd": (ours, reference, roofline.forward_roofline),
        "fwd+bwd": (mx.value_and_grad(ours, argnums=argnums), mx.value_and_grad(reference, argnums=argnums),
                    roofline.forward_backward_roofline),
    }
    thunks = {}
    for pass_name, (ours_fn, ref_fn, roof_fn) in fns.items():
        if use_compile:  # the roofline stays eager: it is one kernel per operand already
            ours_fn, ref_fn = mx.compile(ours_fn), mx.compile(ref_fn)
        thunks[pass_name] = {
            "ours": lambda f=ours_fn: f(*inputs),
            "mlx": lambda f=ref_fn: f(*inputs),
            "roofline": lambda f=roof_fn: f(inputs),
        }
        if case.spec.roofline is not None:  # a loss-specific yardstick instead
            thunks[pass_name]["roofline"] = case.spec.roofline(inputs, pass_name == "fwd+bwd")
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


def run_case(case: Case, policy: RepeatPolicy, use_compile: bool, guard: MemoryGuard):
    reason = guard.skip_reason(case)
    if reason:
        return skipped_records(case, reason)

    mx.random.seed(0)
    inputs = case.spec.make_inputs(case.shape, DTYPES[case.dtype_name])
    mx.eval(inputs)
    rel_diff = _relative_difference(case, inputs)
    output_nbytes = inputs[0].dtype.size  # scalar ("mean") loss

    records = []
    for pass_name, thunks in _callables(case, inputs, use_compile).items():
        record = _base_record(case, pass_name)
        record["bytes"] = roofline.bytes_moved(inputs, output_nbytes, backward=pass_name == "fwd+bwd")
        if case.spec.flops is not None:
            record["flops"] = case.spec.flops(case.shape, pass_name == "fwd+bwd")
        for impl, thunk in thunks.items():
            timing, peak = measure(thunk, policy)
            record[impl] = {**timing.to_dict(), "peak_mb": peak / MB, "gbps": record["bytes"] / timing.median_ms / MB}
            if record.get("flops"):
                record[impl]["gflops"] = record["flops"] / timing.median_ms / 1e6
            if pass_name == "fwd+bwd" and impl != "roofline":
                guard.record(case, peak)
        extras = _measure_extras(case, inputs, pass_name, policy)
        if extras is not None:
            record["extras"] = extras
        record["speedup_vs_mlx"] = record["mlx"]["median_ms"] / record["ours"]["median_ms"]
        record["ratio_to_roofline"] = record["ours"]["median_ms"] / record["roofline"]["median_ms"]
        record["forward_rel_diff"] = rel_diff
        record["values_match"] = rel_diff <= VALUE_TOLERANCE[case.dtype_name]
        records.append(record)

    del inputs, thunks
    mx.clear_cache()  # hand freed buffers back so the next, larger case has room
    return records
