"""What bounds a row that misses its roofline goal: its arithmetic, measured.

For a goal judged on a row (loss, dtype, size, pass) against a memory roofline,
the same loss runs again on a cache-resident input: the same row length (row
losses) or element type, about ``RESIDENT_ELEMENTS`` elements, timed many
times. Memory cannot be the limit there, so its time per element is what the
arithmetic alone costs on this CPU with all the kernels' threads. Divided by
the roofline's time per element of the full-size row it gives
``compute_over_roofline``: the ratio no overlap of arithmetic and memory
traffic can go below. Where it is above the goal, the row is compute-bound and
the goal needs fewer instructions per element, not better memory access.

With hardware counters (Linux ``perf_event_open``: bare metal, or a VM with a
virtual PMU) the same run also counts the user-space instructions and cycles
of every thread of the process, per element; without them those fields are
None and ``counters`` says why. Every number is measured in the run that the
record belongs to; nothing here is typed in.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time
from typing import Dict, Optional

import mlx.core as mx

from .cases import DTYPES, Case

# Enough work per call that MLX's graph overhead (~10 us) is noise, little
# enough that inputs and outputs stay in the caches (a few MB).
RESIDENT_ELEMENTS = 1 << 20
REPEATS = 15

# ---- hardware counters (Linux x86-64 / arm64 perf_event_open) --------------
_SYSCALL = {"x86_64": 298, "aarch64": 241}
_PERF_TYPE_HARDWARE = 0
_CYCLES, _INSTRUCTIONS = 0, 1
_FLAG_EXCLUDE_KERNEL, _FLAG_EXCLUDE_HV = 1 << 5, 1 << 6


def _perf_event_open(config: int, tid: int) -> int:
    machine = os.uname().machine
    if machine not in _SYSCALL:
        raise OSError(errno.ENOSYS, f"perf_event_open: no syscall number for {machine}")
    # struct perf_event_attr (PERF_ATTR_SIZE_VER5, 112 bytes): type, size,
    # config, sample_period, sample_type, read_format, flags; the rest zero.
    attr = struct.pack("IIQQQQQ", _PERF_TYPE_HARDWARE, 112, config, 0, 0, 0,
                       _FLAG_EXCLUDE_KERNEL | _FLAG_EXCLUDE_HV).ljust(112, b"\0")
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(_SYSCALL[machine], buf, tid, -1, -1, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


class ThreadCounters:
    """User-space instructions and cycles of every thread this process has now
    (call after a warm-up, when the kernels' pools exist)."""

    def __init__(self):
        self.fds = []
        try:
            for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
                self.fds.append((_perf_event_open(_INSTRUCTIONS, tid), _perf_event_open(_CYCLES, tid)))
        except OSError:
            self.close()
            raise

    def read(self):
        totals = [0, 0]
        for pair in self.fds:
            for k, fd in enumerate(pair):
                totals[k] += struct.unpack("Q", os.read(fd, 8))[0]
        return totals

    def close(self):
        for pair in self.fds:
            for fd in pair:
                os.close(fd)
        self.fds = []


def counters_status() -> str:
    """'' where hardware counters work here, else why not."""
    try:
        ThreadCounters().close()
        return ""
    except OSError as err:
        return f"no hardware counters: perf_event_open failed ({err.strerror or err})"


# ---- the cache-resident run -----------------------------------------------

def resident_case(case: Case) -> Case:
    """The case at about RESIDENT_ELEMENTS elements: the row length kept."""
    if case.spec.rowwise:
        classes = case.shape[-1]
        return Case(case.spec, case.dtype_name, (max(1, RESIDENT_ELEMENTS // classes), classes))
    return Case(case.spec, case.dtype_name, (RESIDENT_ELEMENTS,))


def _thunk(case: Case, inputs, pass_name: str):
    if pass_name == "fwd":
        return lambda: mx.eval(case.spec.ours(*inputs))
    grad = mx.value_and_grad(case.spec.ours, argnums=case.spec.grad_argnums)
    return lambda: mx.eval(grad(*inputs))


def measure(case: Case, pass_name: str) -> Dict[str, Optional[float]]:
    """Compute-only ns per element of ``case``'s pass, and (with counters)
    instructions and cycles per element."""
    small = resident_case(case)
    mx.random.seed(0)
    inputs = small.spec.make_inputs(small.shape, DTYPES[small.dtype_name])
    mx.eval(inputs)
    run = _thunk(small, inputs, pass_name)
    for _ in range(3):  # warm-up: pools, caches, the output's pages
        run()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    out = {"resident_elements": small.elements, "compute_ns_per_element": best * 1e9 / small.elements,
           "instructions_per_element": None, "cycles_per_element": None}
    try:
        counters = ThreadCounters()
    except OSError:
        return out
    try:
        before = counters.read()
        for _ in range(REPEATS):
            run()
        after = counters.read()
    finally:
        counters.close()
    per = REPEATS * small.elements
    out["instructions_per_element"] = (after[0] - before[0]) / per
    out["cycles_per_element"] = (after[1] - before[1]) / per
    return out


def attach(verdicts, records, cases) -> None:
    """Adds ``bound`` to every missed verdict judged on a row against a
    roofline: the compute-only measurement and its ratio to that row's
    roofline time per element."""
    by_key = {(c.spec.name, c.dtype_name, c.size_label): c for c in cases}
    status = None
    for v in verdicts:
        row = v.get("row")
        if v["met"] is not False or not row or not v.get("roofline_key"):
            continue
        loss, dtype, size, pass_name = row
        record = next((r for r in records if (r["loss"], r["dtype"], r["size"], r["pass"]) == tuple(row)
                       and "skipped" not in r), None)
        case = by_key.get((loss, dtype, size))
        if record is None or case is None or v["roofline_key"] not in record:
            continue
        bound = measure(case, pass_name)
        roof_ns = record[v["roofline_key"]]["median_ms"] * 1e6 / case.elements
        bound["roofline_ns_per_element"] = roof_ns
        bound["compute_over_roofline"] = bound["compute_ns_per_element"] / roof_ns
        bound["compute_bound"] = bound["compute_over_roofline"] > v["limit"]
        if status is None:
            status = counters_status()
        bound["counters"] = status or "perf_event_open: user-space instructions and cycles, all threads"
        v["bound"] = bound


def describe(bound) -> str:
    """One line for the tables."""
    text = (f"measured bound: {bound['compute_ns_per_element']:.3g} ns/element on cache-resident data = "
            f"{bound['compute_over_roofline']:.2f}x the roofline's {bound['roofline_ns_per_element']:.3g} ns/element")
    if bound.get("instructions_per_element") is not None:
        text += (f"; {bound['instructions_per_element']:.1f} instructions, "
                 f"{bound['cycles_per_element']:.1f} cycles per element")
    return text
