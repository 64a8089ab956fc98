"""The one timing helper and the peak-memory probe used by every measurement."""

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Tuple

import mlx.core as mx


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int

    def to_dict(self):
        return asdict(self)


@dataclass
class RepeatPolicy:
    """How many timed calls to make after the warmup call.

    Fast calls get as many samples as fit in ``budget_s``.  Slow calls get
    ``min_repeats`` only while those fit in ``slow_budget_s``, down to a single
    sample: MLX's composed cross-entropy at 4096x131072 takes 20-30 s per
    forward+backward on 2 CPU cores, and the full sweep must stay near 15 min.
    """

    max_repeats: int = 20
    min_repeats: int = 3
    budget_s: float = 1.0
    slow_budget_s: float = 10.0

    def repeats_for(self, warmup_s: float) -> int:
        warmup_s = max(warmup_s, 1e-6)
        fitting_budget = int(self.budget_s / warmup_s)
        if fitting_budget >= self.min_repeats:
            return min(fitting_budget, self.max_repeats)
        fitting_slow_budget = int(self.slow_budget_s / warmup_s)
        return max(1, min(self.min_repeats, fitting_slow_budget, self.max_repeats))


def _run_once(fn: Callable) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()  # eval waits for CPU work; synchronize also drains GPU queues
    return time.perf_counter() - start


def _timing(samples_ms) -> Timing:
    samples = sorted(samples_ms)
    if len(samples) >= 2:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0]
    return Timing(median_ms=statistics.median(samples), min_ms=samples[0], max_ms=samples[-1],
                  q1_ms=q1, q3_ms=q3, repeats=len(samples))


def measure(fn: Callable, policy: RepeatPolicy):
    """Time ``fn`` (which returns arrays) -> (Timing, peak memory in bytes).

    The warmup call doubles as the peak-memory probe: the peak is reset right
    before it and read right after, so it covers exactly one call, including the
    inputs that are already resident.
    """
    return measure_interleaved({"fn": fn}, policy)["fn"]


def measure_interleaved(fns: Dict[str, Callable], policy: RepeatPolicy) -> Dict[str, Tuple[Timing, int]]:
    """Time several thunks against each other -> {name: (Timing, peak bytes)}.

    Each gets its warmup call (the peak-memory probe, as in ``measure``) and
    its own number of repeats from the policy, but the timed calls go round
    robin, one of each per round: on a machine that others load too, a burst
    of their work then slows every implementation of a round alike, instead
    of all the repeats of whichever was being timed, and the ratios between
    them (x roofline, speedups) keep their meaning.
    """
    warmups = {}
    for name, fn in fns.items():
        mx.synchronize()
        mx.reset_peak_memory()
        warmup_s = _run_once(fn)
        warmups[name] = (warmup_s, mx.get_peak_memory())
    remaining = {name: policy.repeats_for(warmup_s) for name, (warmup_s, _) in warmups.items()}
    samples = {name: [] for name in fns}
    while any(remaining.values()):
        for name, fn in fns.items():
            if remaining[name]:
                samples[name].append(_run_once(fn) * 1e3)
                remaining[name] -= 1
    return {name: (_timing(samples[name]), warmups[name][1]) for name in fns}
