"""Runs an adaptor's entry point from Python under several schedules.

Each run gets fresh copies of the argument arrays inside guarded buffers, so the
runs are independent; afterwards the guards are checked (out-of-bounds writes) and
the final contents of every buffer are compared bit for bit across runs (races and
reads of uninitialised threadgroup memory). The first run's results are copied back
into the caller's arrays.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ORDERS = {"forward": 0, "reverse": 1, "random": 2, "ahead": 3, "ahead_reverse": 4}
_MEMORY = {"coherent": 0, "strict": 1}

# Threadgroup-memory poison patterns (16 bits, repeated). NaN alone is not
# enough: max() and min() drop a NaN, so a reduction over unwritten slots looks
# right. The two finite patterns are large numbers of either sign in every type.
POISON_NAN = 0xFFFF  # NaN in float, half and bfloat; -1 in signed integers
POISON_HUGE = 0x7BFF  # half +65504, float/bfloat +2.7e36, int32 +2080341503
POISON_HUGE_NEGATIVE = 0xFBFF  # half -65504, float/bfloat -2.7e36, int32 -67109889


@dataclass(frozen=True)
class Schedule:
    """How one run of a launch executes (see include/metal_host.h, Schedule).

    order: "forward", "reverse", "random" (lock-step rounds of all fibers in that
      order) or "ahead", "ahead_reverse" (one SIMD-group runs as far as it can
      before the next moves; reverse: SIMD-groups and lanes in reverse order).
    poison: 16-bit pattern filling threadgroup memory at every group start and
      the values of SIMD lanes that do not exist.
    memory: "coherent", or "strict": writes stay invisible to other SIMD-groups
      until a threadgroup_barrier with the matching mem_flags (needs an ahead order).
    """

    order: str = "forward"
    seed: int = 0
    poison: int = POISON_NAN
    memory: str = "coherent"

    def __post_init__(self):
        if self.order not in _ORDERS:
            raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {self.order!r}")
        if self.memory not in _MEMORY:
            raise ValueError(f"memory must be one of {sorted(_MEMORY)}, got {self.memory!r}")
        if self.memory == "strict" and not self.order.startswith("ahead"):
            raise ValueError("memory='strict' needs order 'ahead' or 'ahead_reverse'")
        if not 0 <= self.poison <= 0xFFFF:
            raise ValueError(f"poison must be a 16-bit pattern, got {self.poison:#x}")

    def __str__(self):
        seed = f", seed {self.seed}" if self.order == "random" else ""
        memory = ", strict memory" if self.memory == "strict" else ""
        return f"{self.order} order{seed}, poison 0x{self.poison:04X}{memory}"


# Each schedule after the first differs from an earlier one in one respect, so
# that a difference in the outputs names its cause:
#   reverse order: a missing barrier (a reader resumed before or after its
#     writers) within lock-step rounds;
#   ahead / ahead_reverse: a SIMD-group running ahead of the others reuses
#     threadgroup scratch before they read it (write-after-read across SIMD
#     functions, which lock-step rounds never show);
#   strict memory: a read that depends on writes no barrier with the right
#     mem_flags published;
#   the finite poisons: uninitialised threadgroup memory hidden from NaN by max()
#     or min().
DEFAULT_SCHEDULES = (
    Schedule("forward"),
    Schedule("reverse"),
    Schedule("ahead"),
    Schedule("ahead_reverse"),
    Schedule("ahead", memory="strict"),
    Schedule("forward", poison=POISON_HUGE),
    Schedule("forward", poison=POISON_HUGE_NEGATIVE),
)


class HarnessError(Exception):
    """Base of the errors the harness reports about a kernel."""


class KernelError(HarnessError):
    """The runtime stopped the kernel: divergent barrier or SIMD function, misuse
    of a Metal function, threadgroup memory overrun, bad dispatch parameters."""


class OutOfBounds(HarnessError):
    """The kernel wrote outside an argument buffer (guard bytes changed)."""


class ScheduleDependent(HarnessError):
    """Runs under different schedules left different bytes in some buffer."""


_GUARD = 4096  # bytes of canary on each side of a buffer
_CANARY = 0xFE  # f32 -1.7e38, f16 NaN, bf16 -1.7e38: garbage if read out of bounds
_ALIGN = 256  # Metal buffers are at least this aligned

_SCALARS = {
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.int8): ctypes.c_int8,
    np.dtype(np.uint8): ctypes.c_uint8,
    np.dtype(np.int16): ctypes.c_int16,
    np.dtype(np.uint16): ctypes.c_uint16,
    np.dtype(np.int32): ctypes.c_int32,
    np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64,
    np.dtype(np.uint64): ctypes.c_uint64,
}


class _GuardedBuffer:
    def __init__(self, array: np.ndarray):
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.nbytes = data.size
        self.raw = np.full(self.nbytes + 2 * _GUARD + _ALIGN, _CANARY, np.uint8)
        self.start = _GUARD + (-(self.raw.ctypes.data + _GUARD)) % _ALIGN
        self.raw[self.start : self.start + self.nbytes] = data
        self.pointer = ctypes.c_void_p(self.raw.ctypes.data + self.start)

    def contents(self) -> np.ndarray:
        return self.raw[self.start : self.start + self.nbytes].copy()

    def overrun(self) -> str | None:
        before = np.flatnonzero(self.raw[: self.start] != _CANARY)
        after = np.flatnonzero(self.raw[self.start + self.nbytes :] != _CANARY)
        if before.size:
            return f"wrote {self.start - before[0]} bytes before its start"
        if after.size:
            return (
                f"wrote past the end of its {self.nbytes} bytes (byte offsets "
                f"{self.nbytes + after[0]} to {self.nbytes + after[-1]})"
            )
        return None


def _describe_difference(a: np.ndarray, b: np.ndarray, like: np.ndarray) -> str:
    x = a.view(like.dtype).reshape(like.shape)
    y = b.view(like.dtype).reshape(like.shape)
    differ = np.flatnonzero(a.view(like.dtype) != b.view(like.dtype))
    if differ.size == 0:  # same values, different bits (e.g. NaN payloads, -0.0)
        differ = np.flatnonzero(a != b) // like.dtype.itemsize
    first = np.unravel_index(differ[0], like.shape) if like.ndim else ()
    return (
        f"{differ.size} of {like.size} elements differ; first at index {tuple(map(int, first))}: "
        f"{x[first]!r} vs {y[first]!r}"
    )


def _differences(a: Schedule, b: Schedule) -> set[str]:
    out = set()
    if a.order != b.order or (a.order == "random" and a.seed != b.seed):
        out.add("order")
    if a.poison != b.poison:
        out.add("poison")
    if a.memory != b.memory:
        out.add("memory")
    return out


def _likely_cause(a: Schedule, b: Schedule) -> str:
    differ = _differences(a, b)
    if differ == {"poison"}:
        return "Only the poison differs: the kernel reads uninitialised threadgroup memory."
    if differ == {"memory"}:
        return (
            "Only the memory model differs: a read depends on writes that no barrier with "
            "the right mem_flags made visible (mem_threadgroup for threadgroup memory, "
            "mem_device for device memory written by other threads of the group)."
        )
    if differ == {"order"}:
        if {a.order, b.order} & {"ahead", "ahead_reverse"}:
            return (
                "Only the thread order differs: a race, e.g. a SIMD-group that runs ahead "
                "overwrites threadgroup memory another has not read yet (missing "
                "threadgroup_barrier before reusing scratch?)."
            )
        return "Only the thread order differs: a race (missing threadgroup_barrier?)."
    return "The result depends on thread order or on uninitialised threadgroup memory."


def _reference_run(runs: list, schedule: Schedule):
    """The earlier run that differs from `schedule` in the fewest respects."""
    return min(runs, key=lambda run: len(_differences(run[0], schedule)))


FLUSH_SUBNORMALS_ENV = "MH_FLUSH_SUBNORMALS"


def flush_subnormals_default() -> bool:
    """MH_FLUSH_SUBNORMALS=1 runs every kernel launch like an Apple GPU: float32
    subnormals flushed to zero (the kernel suites then compare with the GPU tests'
    tolerances; see tests/test_metal_subnormals.py)."""
    return os.environ.get(FLUSH_SUBNORMALS_ENV, "0") not in ("", "0")


class Library:
    """A built harness library (see metal_host.build)."""

    def __init__(self, path: Path, compiler_output: str = ""):
        self.path = path
        self.compiler_output = compiler_output
        self._dll = ctypes.CDLL(str(path))
        self._dll.mh_set_schedule.argtypes = [
            ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
        self._dll.mh_set_schedule.restype = None
        self._dll.mh_set_device_buffers.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
        self._dll.mh_set_device_buffers.restype = None
        self._dll.mh_last_error.restype = ctypes.c_char_p
        self._dll.mh_set_flush_subnormals.argtypes = [ctypes.c_int]
        self._dll.mh_set_flush_subnormals.restype = None

    def run(self, entry: str, *args, schedules=DEFAULT_SCHEDULES,
            flush_subnormals: bool | None = None) -> None:
        """Calls `extern "C" int entry(...)` once per schedule.

        Arrays are passed as device pointers (copied in and, after all checks, the
        first run's contents copied back into them, so output arrays are filled in
        place). Scalars must be NumPy scalars (np.uint32(n), np.float32(x)) so that
        their C type is explicit. Raises KernelError, OutOfBounds or
        ScheduleDependent.

        flush_subnormals: float32 subnormals read and written as zero while the
        kernels run, as Apple GPUs do (runtime.cpp). None: flush_subnormals_default().
        """
        if flush_subnormals is None:
            flush_subnormals = flush_subnormals_default()
        fn = getattr(self._dll, entry)
        fn.restype = ctypes.c_int
        for a in args:
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous or not a.flags.writeable:
                    raise TypeError(f"{entry}: array arguments must be C-contiguous and writeable")
            elif not (isinstance(a, np.generic) and a.dtype in _SCALARS):
                raise TypeError(
                    f"{entry}: argument {a!r} must be an ndarray or a NumPy scalar such as "
                    "np.uint32(n), so that its C type is explicit"
                )
        runs = []
        for schedule in schedules:
            self._dll.mh_set_schedule(_ORDERS[schedule.order], schedule.seed, schedule.poison,
                                      _MEMORY[schedule.memory])
            self._dll.mh_set_flush_subnormals(int(flush_subnormals))
            buffers = {i: _GuardedBuffer(a) for i, a in enumerate(args) if isinstance(a, np.ndarray)}
            # The device buffers, for the strict memory model.
            pointers = (ctypes.c_void_p * len(buffers))(*(b.pointer.value for b in buffers.values()))
            sizes = (ctypes.c_size_t * len(buffers))(*(b.nbytes for b in buffers.values()))
            self._dll.mh_set_device_buffers(pointers, sizes, len(buffers))
            cargs = [
                buffers[i].pointer if i in buffers else _SCALARS[a.dtype](a.item())
                for i, a in enumerate(args)
            ]
            if fn(*cargs) != 0:
                raise KernelError(f"{entry} ({schedule}): {self._dll.mh_last_error().decode()}")
            for i, buf in buffers.items():
                problem = buf.overrun()
                if problem:
                    raise OutOfBounds(
                        f"{entry} ({schedule}): argument {i} "
                        f"({args[i].dtype}{list(args[i].shape)}): {problem}"
                    )
            runs.append((schedule, {i: buf.contents() for i, buf in buffers.items()}))

        for k in range(1, len(runs)):
            schedule, contents = runs[k]
            ref_schedule, ref = _reference_run(runs[:k], schedule)
            for i, data in contents.items():
                if not np.array_equal(data, ref[i]):
                    raise ScheduleDependent(
                        f"{entry}: argument {i} differs between [{ref_schedule}] and "
                        f"[{schedule}]: {_describe_difference(ref[i], data, args[i])}. "
                        + _likely_cause(ref_schedule, schedule)
                    )
        base = runs[0][1]
        for i, data in base.items():
            args[i].reshape(-1).view(np.uint8)[:] = data
