"""Memory rooflines: the time it takes to move a loss's bytes, and nothing more.

A fused loss cannot beat streaming its operands through memory once. We time
that lower bound on the same arrays, in the same run, rather than quoting a
datasheet bandwidth, so cache effects and the machine's real bandwidth count.

* forward = read every input once (the output is O(rows) or a scalar);
* forward+backward = the forward's reads, plus reading the inputs again and
  writing the gradient (shaped like the first input) once.

On the CPU the bytes are moved by NumPy, not by anything of ours, so the
yardstick shares no overhead with what it measures. Each pass is timed on one
thread and on as many threads as our kernels use (each thread a contiguous
slice; NumPy releases the GIL), and the faster counts. The gradient's write
comes in two physical flavours, both measured:

* **warm**: into memory that is already mapped (a buffer written before);
* **fresh**: into a new array as NumPy allocates it: NumPy advises huge pages
  for large arrays, so this includes the OS's zero-fill of fresh 2 MB pages,
  which no kernel that returns a new gradient can avoid.

A third, **fresh 4 KB**, is the same write with NumPy's huge-page advice off:
what a fresh buffer costs when every 4 KB page faults on first touch, as every
large output of MLX's CPU allocator does under its default cache limit.
``page_fault_table`` reports it per gradient size.

On a GPU the roofline is MLX's own streaming kernels, which are
bandwidth-bound there: an integer sum over each input's raw bits for a read,
and a bitwise OR of the gradient-shaped inputs for the read-again-and-write.
"""

import resource
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from mlx_fused_losses import _ext

try:  # NumPy >= 2
    from numpy._core.multiarray import _get_madvise_hugepage, _set_madvise_hugepage
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _get_madvise_hugepage, _set_madvise_hugepage


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


# ---- CPU: NumPy -----------------------------------------------------------------

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, _ext.num_threads()))
    return _POOL


def _raw(a: mx.array) -> np.ndarray:
    """The array's bytes as unsigned integers of its width, without a copy."""
    flat = _bits(a.reshape(-1))
    mx.eval(flat)
    return np.asarray(flat)


def _words(a: np.ndarray) -> np.ndarray:
    """The widest unsigned view of a flat array (a trailing remainder is dropped)."""
    usable = a.nbytes - a.nbytes % 8
    return a.view(np.uint8)[:usable].view(np.uint64)


def _slices(n: int, parts: int):
    step = -(-n // parts)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)] or [slice(0, 0)]


def _read(words: np.ndarray) -> int:
    # A (wrapping) sum of 64-bit words: the cheapest NumPy read we measured,
    # and its result depends on every word, so nothing can be skipped.
    return int(words.sum()) if words.size else 0


def _on_threads(parts, jobs):
    """Run jobs (callables) on `parts` threads (1: inline)."""
    if parts == 1:
        for job in jobs:
            job()
        return
    for future in [_pool().submit(job) for job in jobs]:
        future.result()


class CpuRoofline:
    """The NumPy streaming passes of one case, over the case's own arrays."""

    def __init__(self, inputs):
        self.arrays = [_raw(a) for a in inputs]
        self.words = [_words(a) for a in self.arrays]
        self.first = self.arrays[0]
        self.warm_gradient = np.empty_like(self.first)
        self.warm_gradient[...] = 0  # mapped once, here, so later writes are warm

    def _reads(self, parts, words):
        return [lambda w=w[s]: _read(w) for w in words for s in _slices(w.size, parts)]

    def _write_gradient(self, parts, out):
        return [lambda s=s: np.copyto(out[s], self.first[s]) for s in _slices(self.first.size, parts)]

    def forward(self, parts):
        _on_threads(parts, self._reads(parts, self.words))

    def forward_backward(self, parts, output):
        """output: "warm" | "fresh" | "fresh4k" (see the module docstring)."""
        jobs = self._reads(parts, self.words) + self._reads(parts, self.words[1:])
        if output == "warm":
            out = self.warm_gradient
        else:
            advise = _get_madvise_hugepage()
            _set_madvise_hugepage(output == "fresh")
            try:
                out = np.empty_like(self.first)
            finally:
                _set_madvise_hugepage(advise)
        _on_threads(parts, jobs + self._write_gradient(parts, out))
        return out

    def thunks(self, pass_name):
        """{threads: thunk} for a pass; each thunk returns arrays to evaluate (none)."""
        threads = sorted({1, max(1, _ext.num_threads())})
        if pass_name == "fwd":
            return {"warm": {p: (lambda p=p: self.forward(p) or []) for p in threads}}
        return {
            kind: {p: (lambda p=p, kind=kind: self.forward_backward(p, kind) is None and []) for p in threads}
            for kind in ("warm", "fresh")
        }


def _fresh_copy(src: np.ndarray, huge_pages: bool, parts: int):
    advise = _get_madvise_hugepage()
    _set_madvise_hugepage(huge_pages)
    try:
        out = np.empty_like(src)
    finally:
        _set_madvise_hugepage(advise)
    _on_threads(parts, [lambda s=s: np.copyto(out[s], src[s]) for s in _slices(src.size, parts)])
    return out


def page_fault_row(nbytes: int, repeats: int = 5):
    """Copying `nbytes` into warm, fresh (huge-page) and fresh 4 KB-paged memory.

    Minimum over repeats of the faster of one thread and the kernels' threads;
    minor page faults of one fresh copy of each kind.
    """
    src = np.ones(nbytes // 4, dtype=np.float32)
    warm = np.empty_like(src)
    warm[...] = 0
    threads = sorted({1, max(1, _ext.num_threads())})

    def best_ms(fn):
        times = []
        for _ in range(repeats):
            for p in threads:
                start = time.perf_counter()
                fn(p)
                times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    def faults(fn):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn(threads[-1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def copy_warm(p):
        _on_threads(p, [lambda s=s: np.copyto(warm[s], src[s]) for s in _slices(src.size, p)])

    row = {"bytes": int(src.nbytes)}
    for name, fn in [("warm", copy_warm),
                     ("fresh", lambda p: _fresh_copy(src, True, p)),
                     ("fresh_4k", lambda p: _fresh_copy(src, False, p))]:
        row[f"{name}_ms"] = best_ms(fn)
        row[f"{name}_faults"] = faults(fn)
    row["page_fault_tax_ms"] = row["fresh_4k_ms"] - row["fresh_ms"]
    return row


# ---- GPU: MLX's streaming kernels ------------------------------------------------

def _bits(a: mx.array) -> mx.array:
    return a.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size])


def _read_once(a: mx.array) -> mx.array:
    return mx.sum(_bits(a), axis=-1)


def gpu_forward(inputs):
    return [_read_once(a) for a in inputs]


def gpu_forward_backward(inputs):
    grad = inputs[0]

    def is_gradient_shaped(a):
        return a.shape == grad.shape and a.dtype.size == grad.dtype.size

    gradient_shaped = [_bits(a) for a in inputs if is_gradient_shaped(a)]
    # OR-ing with 0 when there is a single operand forces a real read+write.
    gradient_sized = gradient_shaped[0] | (gradient_shaped[1] if len(gradient_shaped) > 1 else 0)
    for extra in gradient_shaped[2:]:
        gradient_sized = gradient_sized | extra
    rest = [_read_once(a) for a in inputs if not is_gradient_shaped(a)]
    return gpu_forward(inputs) + [gradient_sized, *rest]


def bytes_moved(inputs, output_nbytes: int, backward: bool) -> int:
    """Bytes the loss must move at minimum; used for the GB/s figures."""
    input_bytes = sum(a.nbytes for a in inputs)
    forward = input_bytes + output_nbytes
    if not backward:
        return forward
    return forward + input_bytes + inputs[0].nbytes
