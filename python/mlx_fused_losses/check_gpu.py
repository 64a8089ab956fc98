"""Self-check of the Metal path on this Mac: ``python -m mlx_fused_losses.check_gpu``.

1. Kernel names: every kernel a launch plan can ask for (``_ext.launch_plan_kernels``,
   the plan functions called over every loss, dtype, option and head) must be a
   function of the loaded ``mlx_fused_losses.metallib`` (``_ext.metallib_function_names``).
2. Numbers: a small forward and backward of every loss, of the linear
   cross-entropy with a dense and a quantized weight, of the scorer
   (log_probs, linear_log_probs dense and 4-bit) and of the fused linear
   distillation (two heads with a 4-bit teacher; a top-k teacher), on the GPU against the CPU
   stream, within the tolerances of the GPU tests (tests/test_gpu.py imports them
   from here). Apple GPUs flush float32 subnormals to zero: every comparison
   allows an absolute difference below the smallest normal float32.
3. Speed: forward + backward of a few key shapes against MLX's own ops
   (``mlx.nn.losses``; ``mx.matmul`` + cross-entropy for the linear CE,
   ``mx.matmul`` + log-softmax for ``linear_log_probs``).

It prints a report to paste into an issue and exits 0 when everything passed, 1
when a check failed, 2 when there is no Metal device (or _ext was built without
Metal), saying so.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import numpy as np

import mlx.core as mx

from . import _ext
from .distillation import jsd, kl_div, linear_distillation_loss, linear_topk_distillation_loss
from .linear_cross_entropy import linear_cross_entropy
from .log_probs import linear_log_probs, log_probs
from .losses import (
    cross_entropy,
    huber_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)

# ---- tolerances (tests/test_gpu.py uses these) ----------------------------------------------

# Relative tolerance of a value stored in the dtype (outputs and gradients in the dtype).
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# Apple GPUs flush float32 (and bfloat16) subnormals to zero, inputs and results:
# a difference below the smallest normal float32 is a flushed subnormal, not an error.
FLUSH_ATOL = float(np.finfo(np.float32).tiny)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def loss_rtol(num_classes: int) -> float:
    """A row loss (float32) over K classes: the GPU's and the CPU's summation orders differ."""
    return 2e-5 * max(1.0, math.log2(max(num_classes, 1)))


def grad_rtol(dtype: str) -> float:
    """A gradient stored in the dtype."""
    return TOL[dtype] + 2e-5


def lce_rtol(dtype: str) -> float:
    """Linear CE outputs and gradients: GEMM sums of H terms in another order."""
    return TOL[dtype] + 1e-4


def disagreement(actual, expected, rtol: float, scale: Optional[float] = None) -> Optional[str]:
    """None if actual and expected agree: the same NaN and infinity pattern, finite
    values within rtol of themselves plus rtol of the scale (by default the largest
    finite |expected|; a caller passes the quantity's natural magnitude where the
    expected values can all be 0, e.g. a gradient's cotangent), and never closer
    than FLUSH_ATOL is asked. Else a one-line description."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return f"shape {a.shape} != {e.shape}"
    if not np.array_equal(np.isnan(a), np.isnan(e)):
        return f"NaN pattern differs ({int(np.isnan(a).sum())} vs {int(np.isnan(e).sum())} NaN)"
    if not np.array_equal(np.where(np.isinf(a), np.sign(a), 0), np.where(np.isinf(e), np.sign(e), 0)):
        return "infinity pattern differs"
    fin = np.isfinite(e)
    if not fin.any():
        return None
    if scale is None:
        scale = float(np.abs(e[fin]).max())
    atol = max(rtol * scale, FLUSH_ATOL)
    err = np.abs(a[fin] - e[fin])
    allowed = atol + rtol * np.abs(e[fin])
    bad = err > allowed
    if bad.any():
        i = int(np.argmax(err - allowed))
        return (f"{int(bad.sum())} of {err.size} values differ: worst {a[fin][i]:.9g} vs "
                f"{e[fin][i]:.9g} (allowed {allowed[i]:.3g})")
    return None


def max_error(actual, expected) -> float:
    """Largest |actual - expected| over the finite expected values, relative to their scale."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    fin = np.isfinite(e) & np.isfinite(a)
    if not fin.any():
        return 0.0
    scale = max(float(np.abs(e[fin]).max()), FLUSH_ATOL)
    return float(np.abs(a[fin] - e[fin]).max() / scale)


# ---- kernel names -----------------------------------------------------------------------------


@dataclass
class NameReport:
    metallib: int  # functions in the metallib
    planned: int  # distinct names the plans ask for
    missing: Dict[str, List[str]]  # name -> plan calls that ask for it, absent from the metallib
    unplanned: List[str]  # in the metallib, asked for by no plan

    @property
    def ok(self) -> bool:
        return not self.missing


def compare_names(metallib_names: Iterable[str],
                  plan_kernels: Iterable[Tuple[str, str]]) -> NameReport:
    lib = set(metallib_names)
    asked: Dict[str, List[str]] = {}
    for name, plan in plan_kernels:
        asked.setdefault(name, []).append(plan)
    missing = {n: asked[n] for n in sorted(set(asked) - lib)}
    return NameReport(len(lib), len(asked), missing, sorted(lib - set(asked)))


# ---- GPU vs CPU -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    problems: List[str] = field(default_factory=list)  # empty: passed
    worst: float = 0.0  # largest relative error seen

    @property
    def ok(self) -> bool:
        return not self.problems


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _stored(a: np.ndarray, dtype: str) -> mx.array:
    return mx.array(a.astype(np.float32)).astype(DTYPES[dtype])


def _compare(check: Check, what: str, gpu, cpu, rtol: float) -> None:
    why = disagreement(gpu, cpu, rtol)
    check.worst = max(check.worst, max_error(gpu, cpu))
    if why is not None:
        check.problems.append(f"{what}: {why} (rtol {rtol:.2g})")


def _forward_backward(fn: Callable, primals: Sequence[mx.array], cotangent: mx.array, stream):
    """fn(*primals, stream) and the vjp w.r.t. every primal, evaluated on `stream`."""
    outs, grads = mx.vjp(lambda *p: [fn(*p, stream=stream)], list(primals), [cotangent])
    mx.eval(outs, grads)
    return _np(outs[0]), [_np(g) for g in grads]


def _gpu_vs_cpu(check: Check, fn, primals, cotangent, gpu, cpu, loss_tol, grad_tol,
                names=("grad",)) -> None:
    g_loss, g_grads = _forward_backward(fn, primals, cotangent, gpu)
    c_loss, c_grads = _forward_backward(fn, primals, cotangent, cpu)
    _compare(check, "loss", g_loss, c_loss, loss_tol)
    for what, g, c in zip(names, g_grads, c_grads):
        _compare(check, what, g, c, grad_tol)


@dataclass
class Case:
    name: str
    run: Callable[[Check, object, object], None]  # (check, gpu stream, cpu stream)


def _cross_entropy_case(dtype: str, K: int, option: str) -> Case:
    def run(check, gpu, cpu):
        rng = np.random.default_rng(K)
        rows = 8
        x = _stored(rng.standard_normal((rows, K)) * 3, dtype)
        kw = {}
        if option == "soft_others":
            p = rng.random((rows, K))
            t = mx.array((p / p.sum(-1, keepdims=True)).astype(np.float32))
            kw = dict(label_smoothing=0.2, label_smoothing_mode="others")
        else:
            ti = rng.integers(0, K, rows)
            ti[-1] = K  # out of range: a NaN row on both
            if option == "smooth_ignore_weights_z":
                ti[-2] = -100
                kw = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-3,
                          class_weights=mx.array((0.5 + rng.random(K)).astype(np.float32)))
            t = mx.array(ti)
        cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
        _gpu_vs_cpu(check, lambda a, stream: cross_entropy(a, t, stream=stream, **kw), [x], cot,
                    gpu, cpu, loss_rtol(K), grad_rtol(dtype))

    return Case(f"cross_entropy {dtype} K={K} {option}", run)


def _softmax_focal_case(dtype: str, K: int) -> Case:
    def run(check, gpu, cpu):
        rng = np.random.default_rng(K + 1)
        rows = 6
        x = _stored(rng.standard_normal((rows, K)) * 3, dtype)
        ti = rng.integers(0, K, rows)
        ti[-1] = -1  # ignored
        t = mx.array(ti)
        cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
        _gpu_vs_cpu(check, lambda a, stream: softmax_focal_loss(
            a, t, gamma=2.0, alpha=0.25, ignore_index=-1, stream=stream), [x], cot, gpu, cpu,
            loss_rtol(K), grad_rtol(dtype))

    return Case(f"softmax_focal_loss {dtype} K={K}", run)


def _distill_case(dtype: str, K: int, kind: str) -> Case:
    """kl_div / jsd: student in `dtype`, a float32 teacher, targets with an
    ignored row, the CE mixed in at temperature 1.5 (the student's gradient;
    the teacher's is zeros by definition)."""
    def run(check, gpu, cpu):
        rng = np.random.default_rng(K + 2)
        rows = 6
        s = _stored(rng.standard_normal((rows, K)) * 3, dtype)
        t = mx.array((rng.standard_normal((rows, K)) * 3).astype(np.float32))
        ti = rng.integers(0, K, rows)
        ti[-1] = -100  # ignored
        y = mx.array(ti)
        kw = dict(targets=y, ignore_index=-100, temperature=1.5, alpha=0.25, reduction="none")
        fn = ((lambda a, stream: kl_div(a, t, stream=stream, **kw)) if kind == "kl_div"
              else (lambda a, stream: jsd(a, t, beta=0.3, stream=stream, **kw)))
        cot = mx.array((0.5 + rng.random(rows)).astype(np.float32))
        _gpu_vs_cpu(check, fn, [s], cot, gpu, cpu, loss_rtol(K), grad_rtol(dtype))

    return Case(f"{kind} {dtype} K={K}", run)


def _pointwise_case(loss: str, dtype: str, reduction: str, broadcast: bool) -> Case:
    fns = {
        "smooth_l1_loss": lambda p, t, r, s: smooth_l1_loss(p, t, beta=0.5, reduction=r, stream=s),
        "huber_loss": lambda p, t, r, s: huber_loss(p, t, delta=0.7, reduction=r, stream=s),
        "sigmoid_focal_loss": lambda p, t, r, s: sigmoid_focal_loss(p, t, reduction=r, stream=s),
        "sigmoid_focal_loss gamma=1.5": lambda p, t, r, s: sigmoid_focal_loss(
            p, t, gamma=1.5, reduction=r, stream=s),
    }

    def run(check, gpu, cpu):
        rng = np.random.default_rng(len(loss) + len(reduction))
        shape = (37, 129)
        p = _stored(rng.standard_normal(shape) * 2, dtype)
        tshape = (1, shape[1]) if broadcast else shape
        if loss.startswith("sigmoid"):
            t = _stored(rng.random(tshape) > 0.5, dtype)
        else:
            t = _stored(rng.standard_normal(tshape) * 2, dtype)
        cot = (mx.array(rng.uniform(0.5, 1.5, shape).astype(np.float32)).astype(DTYPES[dtype])
               if reduction == "none" else mx.array(1.3))
        _gpu_vs_cpu(check, lambda a, stream: fns[loss](a, t, reduction, stream), [p], cot, gpu,
                    cpu, 1e-5 if reduction == "none" else 2e-5, grad_rtol(dtype))

    target = " broadcast target" if broadcast else ""
    return Case(f"{loss} {dtype} {reduction}{target}", run)


def _lce_case(dtype: str, bits: Optional[int]) -> Case:
    def run(check, gpu, cpu):
        n, h, v = 70, 128, 300
        rng = np.random.default_rng(n + h + v + (bits or 0))
        hidden = _stored(rng.standard_normal((n, h)), dtype)
        w = rng.standard_normal((v, h)) / math.sqrt(h)
        t = rng.integers(0, v, n)
        t[::9] = -100
        targets = mx.array(t)
        kw = dict(label_smoothing=0.1, ignore_index=-100, z_loss=1e-4, reduction="none",
                  chunk_bytes=4 * v * 40, dtype=mx.float32)  # two row chunks
        cot = mx.array(rng.uniform(-1, 1, n).astype(np.float32))
        if bits is None:
            weight = _stored(w, dtype)
            bias = _stored(rng.standard_normal(v), dtype)
            fn = lambda a, b, c, stream: linear_cross_entropy(a, b, targets, c, stream=stream, **kw)  # noqa: E731
            _gpu_vs_cpu(check, fn, [hidden, weight, bias], cot, gpu, cpu, lce_rtol(dtype),
                        lce_rtol(dtype), names=("d hidden", "d weight", "d bias"))
        else:
            w_q, scales, biases = mx.quantize(_stored(w, dtype), group_size=64, bits=bits)
            fn = lambda a, stream: linear_cross_entropy(  # noqa: E731
                a, w_q, targets, scales=scales, biases=biases, group_size=64, bits=bits,
                stream=stream, **kw)
            _gpu_vs_cpu(check, fn, [hidden], cot, gpu, cpu, lce_rtol(dtype), lce_rtol(dtype),
                        names=("d hidden",))

    head = "dense" if bits is None else f"{bits}-bit quantized"
    return Case(f"linear_cross_entropy {dtype} {head}", run)


def _scorer_case(dtype: str, form: str) -> Case:
    """The scorer (log p and entropy, per-token cotangents on both): the linear
    form with a dense or a 4-bit head, or given logits."""
    def run(check, gpu, cpu):
        n, h, v = 70, 128, 300
        rng = np.random.default_rng(n + h + v + len(form))
        t = rng.integers(0, v, n)
        t[::9] = -100
        targets = mx.array(t)
        kw = dict(temperature=0.7, ignore_index=-100, return_entropy=True)
        cots = [mx.array(rng.uniform(-1, 1, n).astype(np.float32)) for _ in range(2)]
        if form == "logits":
            primals = [_stored(rng.standard_normal((n, v)) * 3, dtype)]
            fn = lambda z, stream: log_probs(z, targets, stream=stream, **kw)  # noqa: E731
            names = ("d logits",)
        else:
            hidden = _stored(rng.standard_normal((n, h)), dtype)
            w = _stored(rng.standard_normal((v, h)) / math.sqrt(h), dtype)
            kw.update(chunk_bytes=4 * v * 40)  # two row chunks
            if form == "dense":
                primals = [hidden, w]
                fn = lambda a, b, stream: linear_log_probs(a, b, targets, stream=stream, **kw)  # noqa: E731
                names = ("d hidden", "d weight")
            else:
                w_q, scales, biases = mx.quantize(w, group_size=64, bits=4)
                primals = [hidden]
                fn = lambda a, stream: linear_log_probs(  # noqa: E731
                    a, w_q, targets, scales=scales, biases=biases, group_size=64, bits=4, stream=stream, **kw)
                names = ("d hidden",)
        res = []
        for stream in (gpu, cpu):
            outs, grads = mx.vjp(lambda *p: list(fn(*p, stream=stream)), primals, cots)
            mx.eval(outs, grads)
            res.append(([_np(o) for o in outs], [_np(g) for g in grads]))
        (g_outs, g_grads), (c_outs, c_grads) = res
        tol = lce_rtol(dtype) if form != "logits" else loss_rtol(v)
        for what, a, b in zip(("log p", "entropy"), g_outs, c_outs):
            _compare(check, what, a, b, tol)
        for what, a, b in zip(names, g_grads, c_grads):
            _compare(check, what, a, b, lce_rtol(dtype) if form != "logits" else grad_rtol(dtype))

    head = {"logits": "log_probs", "dense": "linear_log_probs dense", "q4": "linear_log_probs 4-bit"}[form]
    return Case(f"{head} {dtype}", run)


def _linear_distill_case(dtype: str, form: str) -> Case:
    """linear_distillation_loss (JSD with the CE mixed in, a 4-bit teacher) and
    linear_topk_distillation_loss (k = 20, renormalised), per-row cotangents:
    each head's logits per chunk, the rows' kernels, dH / dW."""
    def run(check, gpu, cpu):
        n, h, v = 70, 128, 300
        rng = np.random.default_rng(n + h + v + len(form))
        t = rng.integers(0, v, n)
        t[::9] = -100
        targets = mx.array(t)
        hidden = _stored(rng.standard_normal((n, h)), dtype)
        w = _stored(rng.standard_normal((v, h)) / math.sqrt(h), dtype)
        cot = mx.array(rng.uniform(-1, 1, n).astype(np.float32))
        kw = dict(temperature=1.3, alpha=0.2, ignore_index=-100, reduction="none", dtype=mx.float32)
        if form == "two heads":
            th = _stored(rng.standard_normal((n, 64)), dtype)
            w_q, scales, biases = mx.quantize(_stored(rng.standard_normal((v, 64)) * 3 / 8, dtype),
                                              group_size=64, bits=4)
            fn = lambda a, b, stream: linear_distillation_loss(  # noqa: E731
                a, b, th, w_q, targets, kind="jsd", beta=0.3, teacher_scales=scales, teacher_biases=biases,
                teacher_group_size=64, teacher_bits=4, chunk_bytes=8 * v * 40, stream=stream, **kw)
        else:
            teacher = rng.standard_normal((n, v)) * 2
            ids = np.argsort(-teacher, -1)[:, :20]
            vals = np.take_along_axis(teacher, ids, -1).astype(np.float32)
            fn = lambda a, b, stream: linear_topk_distillation_loss(  # noqa: E731
                a, b, mx.array(ids), mx.array(vals), targets, renormalize=True, chunk_bytes=4 * v * 40,
                stream=stream, **kw)
        _gpu_vs_cpu(check, fn, [hidden, w], cot, gpu, cpu, lce_rtol(dtype), lce_rtol(dtype),
                    names=("d hidden", "d weight"))

    name = "linear_distillation_loss" if form == "two heads" else "linear_topk_distillation_loss"
    return Case(f"{name} {dtype}", run)


def default_cases() -> List[Case]:
    """Every loss forward and backward; the row losses at a block-kernel and a
    looped-kernel class count; every dtype."""
    cases: List[Case] = []
    for dtype in DTYPES:
        for K in (1000, 5000):
            for option in ("plain", "smooth_ignore_weights_z", "soft_others"):
                cases.append(_cross_entropy_case(dtype, K, option))
            cases.append(_softmax_focal_case(dtype, K))
            for kind in ("kl_div", "jsd"):
                cases.append(_distill_case(dtype, K, kind))
        for loss in ("smooth_l1_loss", "huber_loss", "sigmoid_focal_loss",
                     "sigmoid_focal_loss gamma=1.5"):
            for reduction in ("none", "mean"):
                cases.append(_pointwise_case(loss, dtype, reduction, broadcast=False))
            cases.append(_pointwise_case(loss, dtype, "sum", broadcast=True))
        cases.append(_lce_case(dtype, None))
        for bits in (2, 4, 8):
            cases.append(_lce_case(dtype, bits))
        for form in ("logits", "dense", "q4"):
            cases.append(_scorer_case(dtype, form))
        for form in ("two heads", "top-k"):
            cases.append(_linear_distill_case(dtype, form))
    return cases


def run_cases(cases: Iterable[Case], gpu, cpu) -> List[Check]:
    checks = []
    for case in cases:
        check = Check(case.name)
        try:
            case.run(check, gpu, cpu)
        except Exception as e:  # reported, not raised: the report lists every case
            check.problems.append(f"raised {type(e).__name__}: {e}")
        checks.append(check)
    return checks


# ---- timings ----------------------------------------------------------------------------------


@dataclass
class Timed:
    name: str
    fused_ms: float
    mlx_ms: float

    @property
    def speedup(self) -> float:
        return self.mlx_ms / self.fused_ms if self.fused_ms > 0 else float("nan")


@dataclass
class TimingShapes:
    ce: Tuple[int, int] = (8192, 32000)  # rows, classes (bfloat16)
    smooth_l1: int = 1 << 24  # elements (float32)
    lce: Tuple[int, int, int] = (4096, 2048, 32000)  # N, H, V (bfloat16)
    # The linear CE against MLX's GEMMs on the same shapes (docs/metal_linear_cross_entropy.md
    # models these): dense bfloat16 and 4-bit heads. --full adds the 7B head's shape.
    lce_gemm: Tuple[Tuple[int, int, int], ...] = ((4096, 2048, 32000),)


FULL_LCE_GEMM_SHAPES = ((4096, 2048, 32000), (8192, 4096, 151936))


def _grad_thunk(loss_fn, primals):
    vg = mx.value_and_grad(loss_fn, argnums=list(range(len(primals))))
    return lambda: vg(*primals)


def time_key_shapes(stream, shapes: TimingShapes = TimingShapes()) -> List[Timed]:
    """Forward + backward of the fused op and of MLX's own, interleaved."""
    from mlx import nn

    from .bench.timing import RepeatPolicy, measure_interleaved

    policy = RepeatPolicy(max_repeats=10, min_repeats=3, budget_s=1.0, slow_budget_s=5.0)
    rng = np.random.default_rng(0)
    out = []
    with mx.stream(stream):
        n, k = shapes.ce
        x = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(mx.bfloat16)
        t = mx.array(rng.integers(0, k, n))
        r = measure_interleaved({
            "fused": _grad_thunk(lambda a: cross_entropy(a, t, reduction="mean"), [x]),
            "mlx": _grad_thunk(lambda a: nn.losses.cross_entropy(a, t, reduction="mean"), [x]),
        }, policy)
        out.append(Timed(f"cross_entropy bfloat16 {n}x{k}", r["fused"][0].median_ms,
                         r["mlx"][0].median_ms))

        m = shapes.smooth_l1
        p = mx.array(rng.standard_normal(m).astype(np.float32))
        q = mx.array(rng.standard_normal(m).astype(np.float32))
        r = measure_interleaved({
            "fused": _grad_thunk(lambda a: smooth_l1_loss(a, q, reduction="mean"), [p]),
            "mlx": _grad_thunk(lambda a: nn.losses.smooth_l1_loss(a, q, reduction="mean"), [p]),
        }, policy)
        out.append(Timed(f"smooth_l1_loss float32 {m}", r["fused"][0].median_ms,
                         r["mlx"][0].median_ms))

        N, H, V = shapes.lce
        h = mx.array(rng.standard_normal((N, H)).astype(np.float32)).astype(mx.bfloat16)
        w = mx.array((rng.standard_normal((V, H)) / math.sqrt(H)).astype(np.float32)).astype(
            mx.bfloat16)
        tt = mx.array(rng.integers(0, V, N))
        r = measure_interleaved({
            "fused": _grad_thunk(lambda a, b: linear_cross_entropy(a, b, tt), [h, w]),
            "mlx": _grad_thunk(lambda a, b: nn.losses.cross_entropy(
                mx.matmul(a, b.T), tt, reduction="mean"), [h, w]),
        }, policy)
        out.append(Timed(f"linear_cross_entropy bfloat16 N={N} H={H} V={V}",
                         r["fused"][0].median_ms, r["mlx"][0].median_ms))
        for N, H, V in shapes.lce_gemm:
            out += time_lce_against_gemm(N, H, V, rng, policy)
        out += time_scorer_against_gemm(*shapes.lce, rng, policy)
    return out


def time_scorer_against_gemm(N: int, H: int, V: int, rng, policy) -> List["Timed"]:
    """linear_log_probs (log p and entropy, a cotangent per token on each) forward +
    backward against the unfused way on the same bfloat16 shape: ``mx.matmul(h, w.T)``,
    float32 log-softmax, the target's entry and the entropy, differentiated by MLX
    (the logits GEMM, then the dH and dW GEMMs)."""
    from .bench.timing import measure_interleaved

    h = mx.array(rng.standard_normal((N, H)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((rng.standard_normal((V, H)) / math.sqrt(H)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.integers(0, V, N))
    c1 = mx.array(rng.uniform(-1, 1, N).astype(np.float32))
    c2 = mx.array(rng.uniform(-1, 1, N).astype(np.float32))
    mx.eval(h, w, t, c1, c2)

    def fused(a, b):
        logp, ent = linear_log_probs(a, b, t, return_entropy=True)
        return (logp * c1 + ent * c2).sum()

    def unfused(a, b):
        z = mx.matmul(a, b.T).astype(mx.float32)
        lsm = z - mx.logsumexp(z, axis=-1, keepdims=True)
        logp = mx.take_along_axis(lsm, t[:, None], axis=-1)[:, 0]
        ent = -(mx.exp(lsm) * lsm).sum(-1)
        return (logp * c1 + ent * c2).sum()

    r = measure_interleaved({"fused": _grad_thunk(fused, [h, w]), "mlx": _grad_thunk(unfused, [h, w])}, policy)
    return [Timed(f"linear_log_probs + entropy forward + backward vs the unfused step, bfloat16 "
                  f"N={N} H={H} V={V}", r["fused"][0].median_ms, r["mlx"][0].median_ms)]


def time_lce_against_gemm(N: int, H: int, V: int, rng, policy) -> List["Timed"]:
    """The linear CE against MLX's GEMMs on its shape, bfloat16 and a 4-bit head (group 64):
    forward vs `mx.matmul(h, w.T)` (`mx.quantized_matmul` for the 4-bit head), and forward +
    backward vs mlx-lm's unfused step (the logits GEMM, cross-entropy, then the dH and dW
    GEMMs; dH only for the 4-bit head, whose weight has no gradient). MLX / fused is the
    fraction of MLX's rate the fused op reaches (the model's targets: >= 0.9 forward,
    >= 1 / 1.15 forward + backward)."""
    from mlx import nn

    from .bench.timing import measure_interleaved

    h = mx.array(rng.standard_normal((N, H)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((rng.standard_normal((V, H)) / math.sqrt(H)).astype(np.float32)).astype(mx.bfloat16)
    t = mx.array(rng.integers(0, V, N))
    wq, sq, bq = mx.quantize(w, group_size=64, bits=4)
    mx.eval(h, w, t, wq, sq, bq)
    shape = f"N={N} H={H} V={V}"

    def unfused(logits_fn):
        return lambda *a: nn.losses.cross_entropy(logits_fn(*a), t, reduction="mean")

    def qmm(a):
        return mx.quantized_matmul(a, wq, sq, bq, transpose=True, group_size=64, bits=4)

    out = []
    r = measure_interleaved({
        "fused": lambda: linear_cross_entropy(h, w, t, reduction="mean"),
        "mlx": lambda: mx.matmul(h, w.T),
    }, policy)
    out.append(Timed(f"linear CE forward vs mx.matmul, bfloat16 {shape}", r["fused"][0].median_ms,
                     r["mlx"][0].median_ms))
    r = measure_interleaved({
        "fused": _grad_thunk(lambda a, b: linear_cross_entropy(a, b, t, reduction="mean"), [h, w]),
        "mlx": _grad_thunk(unfused(lambda a, b: mx.matmul(a, b.T)), [h, w]),
    }, policy)
    out.append(Timed(f"linear CE forward + backward vs the unfused step, bfloat16 {shape}",
                     r["fused"][0].median_ms, r["mlx"][0].median_ms))
    # The same step at the CPU's 64 MiB chunk (the GPU default is larger: the model's
    # second rows), and the backward that recomputes Z (reduction "none", 8 N V H FLOPs:
    # the model's stored-Z table, third column).
    cpu_chunk = _ext.LINEAR_CE_DEFAULT_CHUNK_BYTES
    r = measure_interleaved({
        "fused": _grad_thunk(lambda a, b: linear_cross_entropy(a, b, t, reduction="mean",
                                                               chunk_bytes=cpu_chunk), [h, w]),
        "mlx": _grad_thunk(unfused(lambda a, b: mx.matmul(a, b.T)), [h, w]),
    }, policy)
    out.append(Timed(f"linear CE forward + backward at the CPU's chunk vs the unfused step, "
                     f"bfloat16 {shape}", r["fused"][0].median_ms, r["mlx"][0].median_ms))
    r = measure_interleaved({
        "fused": _grad_thunk(lambda a, b: mx.mean(linear_cross_entropy(a, b, t, reduction="none")),
                             [h, w]),
        "mlx": _grad_thunk(unfused(lambda a, b: mx.matmul(a, b.T)), [h, w]),
    }, policy)
    out.append(Timed(f"linear CE forward + recomputing backward (reduction none) vs the unfused "
                     f"step, bfloat16 {shape}", r["fused"][0].median_ms, r["mlx"][0].median_ms))
    r = measure_interleaved({
        "fused": lambda: linear_cross_entropy(h, wq, t, scales=sq, biases=bq, group_size=64, bits=4,
                                              reduction="mean"),
        "mlx": lambda: qmm(h),
    }, policy)
    out.append(Timed(f"linear CE forward vs mx.quantized_matmul, 4-bit {shape}",
                     r["fused"][0].median_ms, r["mlx"][0].median_ms))
    r = measure_interleaved({
        "fused": _grad_thunk(lambda a: linear_cross_entropy(a, wq, t, scales=sq, biases=bq,
                                                            group_size=64, bits=4,
                                                            reduction="mean"), [h]),
        "mlx": _grad_thunk(unfused(qmm), [h]),
    }, policy)
    out.append(Timed(f"linear CE forward + backward vs the unfused step, 4-bit {shape}",
                     r["fused"][0].median_ms, r["mlx"][0].median_ms))
    return out


# ---- report -----------------------------------------------------------------------------------


def environment() -> List[str]:
    import importlib.metadata as md

    lines = [f"mlx-fused-losses {md.version('mlx-fused-losses')}, mlx {md.version('mlx')}, "
             f"Python {platform.python_version()}, {platform.platform()}"]
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        keys = ("device_name", "architecture", "memory_size", "max_recommended_working_set_size")
        lines.append("device: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info))
    except Exception as e:  # the report still matters without it
        lines.append(f"device: unknown ({type(e).__name__}: {e})")
    return lines


def format_report(env: Sequence[str], names: Optional[NameReport], checks: Sequence[Check],
                  timings: Sequence[Timed], timing_error: Optional[str] = None) -> str:
    out = ["## mlx-fused-losses GPU self-check", ""]
    out += [f"- {line}" for line in env]
    out += ["", "### Kernel names"]
    if names is None:
        out.append("not compared (see above)")
    else:
        out.append(f"metallib functions: {names.metallib}; names the launch plans ask for: "
                   f"{names.planned}; missing from the metallib: {len(names.missing)}")
        for name, plans in names.missing.items():
            more = f" (+{len(plans) - 1} more)" if len(plans) > 1 else ""
            out.append(f"- MISSING {name}: asked for by {plans[0]}{more}")
        if names.unplanned:
            out.append(f"- in the metallib but asked for by no plan: {', '.join(names.unplanned)}")
    failed = [c for c in checks if not c.ok]
    out += ["", f"### GPU vs CPU: {len(checks) - len(failed)} of {len(checks)} passed"]
    for c in checks:
        status = "ok  " if c.ok else "FAIL"
        out.append(f"- {status} {c.name} (max rel. error {c.worst:.2g})")
        out += [f"    - {p}" for p in c.problems]
    out += ["", "### Forward + backward, median ms (MLX's own ops for comparison)"]
    if timing_error:
        out.append(f"not measured: {timing_error}")
    elif not timings:
        out.append("not measured (--no-timing)")
    else:
        out += ["| case | fused | MLX | MLX / fused |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {t.name} | {t.fused_ms:.2f} | {t.mlx_ms:.2f} | {t.speedup:.2f}x |"
                for t in timings]
    ok = (names is None or names.ok) and not failed
    out += ["", f"### Result: {'PASS' if ok else 'FAIL'}"]
    return "\n".join(out) + "\n"


NO_METAL = ("No Metal device: MLX reports no Metal GPU on this machine ({}). This check runs "
            "the package's Metal kernels and needs an Apple-silicon Mac with MLX's Metal build.")
NO_METAL_BUILD = ("mlx_fused_losses._ext was built without Metal (no metallib_function_names): "
                  "reinstall the package on a Mac where MLX has Metal.")


def run(gpu, cpu, metallib_names: Callable[[], Iterable[str]], *, cases=None,
        timing_shapes: Optional[TimingShapes] = TimingShapes(), out: TextIO = sys.stdout) -> int:
    """The check with `gpu` as the device under test; returns the exit status."""
    try:
        names = compare_names(metallib_names(), _ext.launch_plan_kernels())
    except Exception as e:
        names = NameReport(0, 0, {"(metallib)": [f"listing failed: {type(e).__name__}: {e}"]}, [])
    checks = run_cases(default_cases() if cases is None else cases, gpu, cpu)
    timings, timing_error = [], None
    if timing_shapes is not None:
        try:
            timings = time_key_shapes(gpu, timing_shapes)
        except Exception:
            timing_error = traceback.format_exc(limit=2).strip().splitlines()[-1]
    out.write(format_report(environment(), names, checks, timings, timing_error))
    return 0 if names.ok and all(c.ok for c in checks) and timing_error is None else 1


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_fused_losses.check_gpu",
        description="Check this package's Metal kernels on this Mac's GPU: kernel names in the "
                    "metallib, every loss against the CPU, timings against MLX's own ops. "
                    "Prints a report to paste into an issue; exit status 0 pass, 1 fail, "
                    "2 no Metal device.")
    parser.add_argument("--no-timing", action="store_true", help="skip the timings")
    parser.add_argument("--full", action="store_true",
                        help="also time the linear CE at the 7B head's shape (N 8192, H 4096, "
                             "V 151936; needs ~8 GB for MLX's unfused step)")
    args = parser.parse_args(argv)
    if not (hasattr(mx, "metal") and mx.metal.is_available()):
        out.write(NO_METAL.format(f"{platform.system()} {platform.machine()}") + "\n")
        return 2
    if not hasattr(_ext, "metallib_function_names"):
        out.write(NO_METAL_BUILD + "\n")
        return 2
    shapes = TimingShapes(lce_gemm=FULL_LCE_GEMM_SHAPES) if args.full else TimingShapes()
    return run(mx.gpu, mx.cpu, _ext.metallib_function_names,
               timing_shapes=None if args.no_timing else shapes, out=out)


if __name__ == "__main__":
    sys.exit(main())
