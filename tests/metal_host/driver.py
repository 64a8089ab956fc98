"""Runs an adaptor's entry point from Python under several schedules.

Each run gets fresh copies of the argument arrays inside guarded buffers, so the
runs are independent; afterwards the guards are checked (out-of-bounds writes) and
the final contents of every buffer are compared bit for bit across runs (races and
reads of uninitialised threadgroup memory). The first run's results are copied back
into the caller's arrays.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ORDERS = {"forward": 0, "reverse": 1, "random": 2}


@dataclass(frozen=True)
class Schedule:
    """Order in which ready GPU threads are resumed, and the byte that poisons
    threadgroup memory at every group start (0xFF: NaN in float/half/bfloat;
    0x7F: 3.4e38 in float and bfloat, NaN in half)."""

    order: str = "forward"
    seed: int = 0
    poison: int = 0xFF

    def __post_init__(self):
        if self.order not in _ORDERS:
            raise ValueError(f"order must be one of {sorted(_ORDERS)}, got {self.order!r}")

    def __str__(self):
        seed = f", seed {self.seed}" if self.order == "random" else ""
        return f"{self.order} order{seed}, poison 0x{self.poison:02X}"


# Reverse against forward exposes missing barriers (a reader resumed before or after
# its writers); the second poison byte exposes uninitialised reads that survive the
# first (max() drops a NaN, but not 3.4e38); the random order mixes SIMD-groups.
DEFAULT_SCHEDULES = (
    Schedule("forward"),
    Schedule("reverse"),
    Schedule("forward", poison=0x7F),
    Schedule("random", seed=1),
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


def _likely_cause(a: Schedule, b: Schedule) -> str:
    if a.poison != b.poison and a.order == b.order and a.seed == b.seed:
        return "Only the poison byte differs: the kernel reads uninitialised threadgroup memory."
    if a.poison == b.poison:
        return "Only the thread order differs: a race (missing threadgroup_barrier?)."
    return "The result depends on thread order or on uninitialised threadgroup memory."


class Library:
    """A built harness library (see metal_host.build)."""

    def __init__(self, path: Path, compiler_output: str = ""):
        self.path = path
        self.compiler_output = compiler_output
        self._dll = ctypes.CDLL(str(path))
        self._dll.mh_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_int]
        self._dll.mh_set_schedule.restype = None
        self._dll.mh_last_error.restype = ctypes.c_char_p

    def run(self, entry: str, *args, schedules=DEFAULT_SCHEDULES) -> None:
        """Calls `extern "C" int entry(...)` once per schedule.

        Arrays are passed as device pointers (copied in and, after all checks, the
        first run's contents copied back into them, so output arrays are filled in
        place). Scalars must be NumPy scalars (np.uint32(n), np.float32(x)) so that
        their C type is explicit. Raises KernelError, OutOfBounds or
        ScheduleDependent.
        """
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
            self._dll.mh_set_schedule(_ORDERS[schedule.order], schedule.seed, schedule.poison)
            buffers = {i: _GuardedBuffer(a) for i, a in enumerate(args) if isinstance(a, np.ndarray)}
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

        base_schedule, base = runs[0]
        for schedule, contents in runs[1:]:
            for i, data in contents.items():
                if not np.array_equal(data, base[i]):
                    raise ScheduleDependent(
                        f"{entry}: argument {i} differs between [{base_schedule}] and "
                        f"[{schedule}]: {_describe_difference(base[i], data, args[i])}. "
                        + _likely_cause(base_schedule, schedule)
                    )
        for i, data in base.items():
            args[i].reshape(-1).view(np.uint8)[:] = data
