"""Knowledge-distillation losses: :func:`kl_div` and :func:`jsd` on logits
(one fused primitive, csrc/ops/distillation.h), and
:func:`linear_distillation_loss` on two linear heads without their logits
(csrc/ops/linear_distillation.h). Gradient w.r.t. the student only. The
maths and its gradient: csrc/math/distillation.h.
"""

from typing import Literal, Optional, Union

import mlx.core as mx

from . import _ext
from .losses import (
    Reduction,
    _as_array,
    _int_option,
    _check_reduction,
    _finish,
    _float_option,
    _ignore_index_for,
    _index_option,
    _kept_rows,
    _result_dtype,
)

_DIRECTIONS = {"forward": "kl", "reverse": "reverse_kl"}


def _options(kind, beta, temperature, alpha, ignore_index, scale_by_temperature_squared,
             reduction, targets):
    """The checked scalar options (values checked again by the op)."""
    _check_reduction(reduction)
    beta = _float_option(beta, "beta")
    temperature = _float_option(temperature, "temperature")
    alpha = _float_option(alpha, "alpha")
    ignore_index = _index_option(ignore_index)
    if not isinstance(scale_by_temperature_squared, bool):
        raise TypeError(
            "scale_by_temperature_squared must be a bool, got "
            f"{type(scale_by_temperature_squared).__name__}"
        )
    if targets is not None:
        targets = _as_array(targets, "targets")
    # Values checked before anything is traced (the op checks them again).
    _ext.check_distill_options(kind, beta, temperature, alpha, targets is not None, ignore_index)
    if targets is not None:
        ignore_index = _ignore_index_for(targets, ignore_index)
    return beta, temperature, alpha, ignore_index, targets


def _reduce_rows(loss, reduction, weights, targets, ignore_index, result_dtype):
    """Per-row float32 losses: weighted, reduced (mean over kept rows), cast."""
    if weights is not None:
        weights = _as_array(weights, "weights")
        if weights.shape != loss.shape:
            raise ValueError(
                f"weights must have the rows' shape {loss.shape} (the logits' shape without "
                f"the last axis), got {weights.shape}"
            )
        loss = loss * weights.astype(mx.float32)
    count = None
    if reduction == "mean" and ignore_index is not None:
        count = _kept_rows(targets, ignore_index)
    return _finish(loss, reduction, result_dtype, count)


def _reduce_summed(total, reduction, per_row, targets, ignore_index, result_dtype):
    """The float32 sum over rows that a fused linear loss returned with
    ``sum_rows=True`` (its gradients then formed in the forward): "sum" as
    is, "mean" over the kept rows (``per_row``: an array [..., X] with one
    entry of X per row; counted when the graph runs, so that a shapeless
    compile freezes no size), cast."""
    count = None
    if reduction == "mean":
        count = (_kept_rows(targets, ignore_index) if targets is not None
                 else _ext.element_count(per_row, axes=list(range(per_row.ndim - 1))))
    return _finish(total, reduction, result_dtype, count)


def _distill(kind, student_logits, teacher_logits, beta, temperature, reduction, ignore_index,
             targets, weights, alpha, scale_by_temperature_squared, dtype, stream):
    student_logits = _as_array(student_logits, "student_logits")
    teacher_logits = _as_array(teacher_logits, "teacher_logits")
    beta, temperature, alpha, ignore_index, targets = _options(
        kind, beta, temperature, alpha, ignore_index, scale_by_temperature_squared, reduction, targets)
    result_dtype = _result_dtype(dtype, student_logits.dtype)
    # A sum or mean without per-row weights: the kernel adds the rows, times
    # the mean's 1 / count (row_scale), and on the CPU forms the student's
    # gradient in its one visit of each row (csrc/ops/distillation.h).
    summed = reduction != "none" and weights is None
    row_scale = None
    if summed and reduction == "mean":
        # (counted when the graph runs: a shapeless compile freezes no size;
        # a mean over nothing is 0, as _finish's)
        count = (_kept_rows(targets, ignore_index) if ignore_index is not None else
                 _ext.element_count(student_logits, axes=list(range(student_logits.ndim - 1))))
        row_scale = mx.where(count == 0, 0.0, 1.0 / mx.maximum(count, 1.0))
    loss = _ext.distill_loss(
        student_logits,
        teacher_logits,
        targets,
        kind=kind,
        beta=beta,
        temperature=temperature,
        alpha=alpha,
        scale_by_temperature_squared=scale_by_temperature_squared,
        ignore_index=ignore_index,
        sum_rows=summed,
        row_scale=row_scale,
        stream=stream,
    )
    if summed:
        return loss.astype(result_dtype)
    return _reduce_rows(loss, reduction, weights, targets, ignore_index, result_dtype)


def kl_div(
    student_logits: mx.array,
    teacher_logits: mx.array,
    *,
    temperature: float = 1.0,
    direction: Literal["forward", "reverse"] = "forward",
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    targets: Optional[mx.array] = None,
    weights: Optional[mx.array] = None,
    alpha: float = 0.0,
    scale_by_temperature_squared: bool = False,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Fused KL divergence between a teacher's and a student's softmax, per row
    of logits (the last axis is the vocabulary).

    ``direction="forward"``: ``KL(teacher || student) = sum_j p_j (log p_j -
    log q_j)`` (what :func:`mlx_lm.tuner.losses.kl_div_loss(student, teacher)`
    computes, and PyTorch's ``F.kl_div(log q, log p, log_target=True)``);
    ``"reverse"``: ``KL(student || teacher)``. ``p = softmax(teacher /
    temperature)``, ``q = softmax(student / temperature)``, both computed in
    float32 whatever the inputs' dtypes (which may differ).

    The gradient flows to the student only: the teacher is frozen, and its
    gradient, if asked for, is zeros (as mlx_lm's kernel returns).

    Args:
        student_logits, teacher_logits: same shape ``[..., V]``, float32,
            float16 or bfloat16.
        temperature: divides both logits (> 0).
        reduction: ``"none"`` (per row, float32 computed), ``"sum"`` or
            ``"mean"`` (over the kept rows; PyTorch's ``"batchmean"`` for 2-D
            logits).
        ignore_index: rows whose class index in ``targets`` equals it give 0
            (and gradient 0) and leave the ``"mean"`` denominator.
        targets: class indices ``[...]`` (any integer dtype): required for
            ``alpha > 0`` and for ``ignore_index``. An index outside ``[0, V)``
            that is not ``ignore_index`` makes its row NaN.
        weights: per-row factors ``[...]`` multiplying each row's loss
            (``"mean"`` still divides by the number of kept rows).
        alpha: mixes in the hard-label cross-entropy at temperature 1 in the
            same pass: ``(1 - alpha) * D + alpha * CE(student_logits, targets)``.
        scale_by_temperature_squared: multiply the divergence term by
            ``temperature**2`` (Hinton et al.: keeps its gradient's scale
            independent of the temperature). Off by default.
        dtype: the result's dtype; ``None``: the student's.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return _distill(_DIRECTIONS[direction], student_logits, teacher_logits, 0.5, temperature,
                    reduction, ignore_index, targets, weights, alpha,
                    scale_by_temperature_squared, dtype, stream)


def jsd(
    student_logits: mx.array,
    teacher_logits: mx.array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    targets: Optional[mx.array] = None,
    weights: Optional[mx.array] = None,
    alpha: float = 0.0,
    scale_by_temperature_squared: bool = False,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Fused generalised Jensen-Shannon divergence per row of logits:
    ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``,
    with ``p`` the teacher's and ``q`` the student's softmax at
    ``temperature``. The convention of TRL's GKD trainer and Liger's
    ``LigerJSD``: ``beta=0`` is the forward KL ``KL(teacher || student)`` and
    ``beta=1`` the reverse KL ``KL(student || teacher)`` (where the mixture
    formula itself would give 0). ``beta=0.5`` is the symmetric JSD, what
    :func:`mlx_lm.tuner.losses.js_div_loss` computes.

    The other arguments are those of :func:`kl_div`; the teacher gets no
    gradient.
    """
    return _distill("jsd", student_logits, teacher_logits, beta, temperature, reduction,
                    ignore_index, targets, weights, alpha, scale_by_temperature_squared, dtype,
                    stream)


_KINDS = ("kl", "reverse_kl", "jsd")


def linear_distillation_loss(
    student_hidden: mx.array,
    student_weight: mx.array,
    teacher_hidden: mx.array,
    teacher_weight: mx.array,
    targets: Optional[mx.array] = None,
    *,
    kind: Literal["kl", "reverse_kl", "jsd"] = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
    scale_by_temperature_squared: bool = False,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    weights: Optional[mx.array] = None,
    chunk_bytes: Optional[int] = None,
    student_scales: Optional[mx.array] = None,
    student_biases: Optional[mx.array] = None,
    student_group_size: int = 64,
    student_bits: int = 4,
    student_mode: str = "affine",
    student_global_scale: Optional[mx.array] = None,
    teacher_scales: Optional[mx.array] = None,
    teacher_biases: Optional[mx.array] = None,
    teacher_group_size: int = 64,
    teacher_bits: int = 4,
    teacher_mode: str = "affine",
    teacher_global_scale: Optional[mx.array] = None,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """The distillation loss of :func:`kl_div` / :func:`jsd` between
    ``student_hidden @ student_weight.T`` and ``teacher_hidden @
    teacher_weight.T`` without either ``[N, V]`` logits matrix: both heads'
    logits exist one chunk of rows at a time (at most ``chunk_bytes``, default
    64 MiB, of float32 logits of both heads), as in
    :func:`linear_cross_entropy`.

    ``kind``: ``"kl"`` (``KL(teacher || student)``), ``"reverse_kl"`` or
    ``"jsd"`` (with ``beta``: 0 and 1 are the two KLs). ``temperature``,
    ``alpha`` (the hard-label CE on the student's logits, needs ``targets``),
    ``scale_by_temperature_squared``, ``ignore_index``, ``weights`` and
    ``reduction`` as :func:`kl_div`.

    The hiddens have the same leading shape (one row per token) and each its
    own hidden size and dtype; the weights are ``[V, H]`` dense float
    matrices, or quantized ones as ``mx.quantize`` returns them: pass the
    packed matrix as the weight and ``*_scales`` (and ``*_biases`` in affine
    mode, ``*_global_scale`` for nvfp4) with ``*_group_size``, ``*_bits`` and
    ``*_mode``. Gradients reach ``student_hidden`` and a dense
    ``student_weight``; the teacher's inputs get zeros (the teacher is frozen).
    Runs on the stream given (Metal kernels on a Mac's GPU: the linear CE's
    tiles for both heads' logits, the logits form's row kernels per chunk).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    arrays = {}
    for name, value in (("student_hidden", student_hidden), ("student_weight", student_weight),
                        ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        arrays[name] = _as_array(value, name)
    beta, temperature, alpha, ignore_index, targets = _options(
        kind, beta, temperature, alpha, ignore_index, scale_by_temperature_squared, reduction, targets)
    if chunk_bytes is not None:
        chunk_bytes = _int_option(chunk_bytes, "chunk_bytes")
    result_dtype = _result_dtype(dtype, arrays["student_hidden"].dtype)
    # A loss reduced to a scalar without per-row weights has one cotangent for
    # every row: the kernel sums the rows and forms the gradients in the
    # forward (both heads' logits once per chunk).
    sum_rows = reduction != "none" and weights is None
    loss = _ext.linear_distill_loss(
        arrays["student_hidden"], arrays["student_weight"], arrays["teacher_hidden"],
        arrays["teacher_weight"], targets, kind=kind, beta=beta, temperature=temperature,
        alpha=alpha, scale_by_temperature_squared=scale_by_temperature_squared,
        ignore_index=ignore_index, chunk_bytes=chunk_bytes,
        student_scales=student_scales, student_biases=student_biases,
        student_group_size=_int_option(student_group_size, "student_group_size"),
        student_bits=_int_option(student_bits, "student_bits"), student_mode=student_mode,
        student_global_scale=student_global_scale,
        teacher_scales=teacher_scales, teacher_biases=teacher_biases,
        teacher_group_size=_int_option(teacher_group_size, "teacher_group_size"),
        teacher_bits=_int_option(teacher_bits, "teacher_bits"), teacher_mode=teacher_mode,
        teacher_global_scale=teacher_global_scale, sum_rows=sum_rows, stream=stream,
    )
    if sum_rows:
        return _reduce_summed(loss, reduction, arrays["student_hidden"], targets, ignore_index,
                              result_dtype)
    return _reduce_rows(loss, reduction, weights, targets, ignore_index, result_dtype)


def linear_topk_distillation_loss(
    student_hidden: mx.array,
    student_weight: mx.array,
    teacher_ids: mx.array,
    teacher_logprobs: mx.array,
    targets: Optional[mx.array] = None,
    *,
    temperature: float = 1.0,
    renormalize: bool = False,
    alpha: float = 0.0,
    scale_by_temperature_squared: bool = False,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    weights: Optional[mx.array] = None,
    chunk_bytes: Optional[int] = None,
    student_scales: Optional[mx.array] = None,
    student_biases: Optional[mx.array] = None,
    student_group_size: int = 64,
    student_bits: int = 4,
    student_mode: str = "affine",
    student_global_scale: Optional[mx.array] = None,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Distillation from an offline teacher stored as its top-k classes per
    token: ``teacher_ids`` (integer, ``[..., k]``) and ``teacher_logprobs``
    (their log-probabilities, ``[..., k]``), against the student's full
    softmax of ``student_hidden @ student_weight.T / temperature``, without the
    student's ``[N, V]`` logits (one chunk of rows at a time, as
    :func:`linear_cross_entropy`).

    Per row, the forward KL over the teacher's top-k:
    ``sum_i p_i (log p_i - log q[id_i])`` with ``log p_i`` the stored value
    (``renormalize=False``: the teacher's own probabilities, whose mass may be
    below 1; the rest of its distribution is unknown and left out) or the
    softmax of ``teacher_logprobs / temperature`` over the k
    (``renormalize=True``; with k = V and the teacher's full log-softmax this is
    :func:`kl_div`). ``temperature`` always divides the student's logits.
    ``alpha``, ``targets``, ``ignore_index``, ``weights``,
    ``scale_by_temperature_squared`` and ``reduction`` as :func:`kl_div`; the
    student's head may be quantized (``student_*`` as in
    :func:`linear_distillation_loss`). An id outside ``[0, V)`` makes its row
    NaN. Gradients reach ``student_hidden`` and a dense ``student_weight``.
    Runs on the stream given (Metal kernels on a Mac's GPU).
    """
    student_hidden = _as_array(student_hidden, "student_hidden")
    student_weight = _as_array(student_weight, "student_weight")
    teacher_ids = _as_array(teacher_ids, "teacher_ids")
    teacher_logprobs = _as_array(teacher_logprobs, "teacher_logprobs")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    _, temperature, alpha, ignore_index, targets = _options(
        "kl", 0.5, temperature, alpha, ignore_index, scale_by_temperature_squared, reduction, targets)
    if chunk_bytes is not None:
        chunk_bytes = _int_option(chunk_bytes, "chunk_bytes")
    result_dtype = _result_dtype(dtype, student_hidden.dtype)
    sum_rows = reduction != "none" and weights is None  # as linear_distillation_loss
    loss = _ext.linear_topk_distill_loss(
        student_hidden, student_weight, teacher_ids, teacher_logprobs, targets,
        temperature=temperature, renormalize=renormalize, alpha=alpha,
        scale_by_temperature_squared=scale_by_temperature_squared, ignore_index=ignore_index,
        chunk_bytes=chunk_bytes, student_scales=student_scales, student_biases=student_biases,
        student_group_size=_int_option(student_group_size, "student_group_size"),
        student_bits=_int_option(student_bits, "student_bits"), student_mode=student_mode,
        student_global_scale=student_global_scale, sum_rows=sum_rows, stream=stream,
    )
    if sum_rows:
        return _reduce_summed(loss, reduction, teacher_ids, targets, ignore_index, result_dtype)
    return _reduce_rows(loss, reduction, weights, targets, ignore_index, result_dtype)
