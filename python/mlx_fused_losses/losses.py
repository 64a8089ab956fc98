"""The public losses: argument checks and reductions around the primitives of
the compiled module ``_ext``. Signatures follow ``mlx.nn.losses``; options that
PyTorch users expect (``ignore_index``, class weights) are keyword-only.

Every loss is computed in float32 inside the kernels and returned in the dtype
of its main input; reductions accumulate in float32.
"""

from typing import Literal, Optional, Union

import mlx.core as mx

from . import _ext

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )


def _as_array(value, name: str) -> mx.array:
    """``value`` as an mx.array: NumPy arrays and (nested) Python lists or
    tuples are converted, as MLX's own ops convert them; anything else is a
    TypeError naming the argument."""
    if isinstance(value, mx.array):
        return value
    if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
        try:
            return mx.array(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} could not be converted to an mlx.core.array: {err}") from err
    raise TypeError(
        f"{name} must be an mlx.core.array, a NumPy array or a list, got {type(value).__name__}"
    )


def _check_nonnegative_values(a: mx.array, name: str) -> None:
    """ValueError if an array of per-class factors holds a NaN or a negative
    value. Skipped while mx.compile or mx.vmap traces the call (the values
    are not known then); the Module classes check at construction."""
    bad = mx.any(mx.isnan(a) | (a < 0))
    try:
        bad = bad.item()
    except ValueError as err:
        if "function transformations" in str(err):
            return
        raise
    if bad:
        raise ValueError(f"{name} must hold values >= 0 (no NaN), got {a}")


def _elementwise(ext_fn, first_name: str, first, targets, reduction: str, stream, *params: float):
    """Shared path of the element-wise losses: checks, the fused kernel (which
    also reduces), and the cast back to the input's dtype. ``params`` are the
    loss's float options in the order of ``ext_fn``'s signature (passed by
    position: at 320 elements the call's overhead is what gets measured)."""
    first = _as_array(first, first_name)
    targets = _as_array(targets, "targets")
    _check_reduction(reduction)
    loss = ext_fn(first, targets, *params, reduction, stream=stream)
    return loss.astype(first.dtype)


def _finish(loss: mx.array, reduction: str, dtype: mx.Dtype, count=None) -> mx.array:
    """Reduce a float32 per-element/per-row loss and cast it to ``dtype``.

    ``count`` replaces the number of elements as the denominator of "mean"
    (rows kept after ignore_index, or their summed class weights).
    """
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        # One rule for every loss: a mean over nothing is 0, not NaN (an
        # empty batch, every row ignored, or kept rows whose class weights add
        # up to 0), so that one such batch cannot poison a training run. It
        # is the sum times 0: a NaN row (an out-of-range index) still shows.
        if count is None:
            loss = loss.mean() if loss.size > 0 else mx.zeros((), mx.float32)
        else:
            empty = count == 0
            safe = mx.where(empty, mx.array(1.0, mx.float32), count)
            total = loss.sum()
            loss = mx.where(empty, total * 0.0, total / safe)
    return loss.astype(dtype)


def _result_dtype(dtype, input_dtype: mx.Dtype) -> mx.Dtype:
    """The dtype a loss is returned in: the input's unless ``dtype`` asks for
    another floating type (float32 keeps a bf16 model's summed loss from
    being rounded to 8 bits of mantissa)."""
    if dtype is None:
        return input_dtype
    if not isinstance(dtype, mx.Dtype) or not mx.issubdtype(dtype, mx.floating):
        raise TypeError(f"dtype must be None or a floating mlx.core.Dtype, got {dtype!r}")
    return dtype


def _ignore_index_for(targets: mx.array, ignore_index: Optional[int]) -> Optional[int]:
    """An index compares in its own dtype: an ignore_index the targets' dtype
    cannot hold (-100 for uint8 or uint64 targets) matches no row, exactly as
    if none was given (csrc/ops/common.cpp applies the same rule)."""
    if ignore_index is not None and mx.issubdtype(targets.dtype, mx.integer):
        info = mx.iinfo(targets.dtype)
        if not info.min <= ignore_index <= info.max:
            return None
    return ignore_index


def _kept_rows(targets: mx.array, ignore_index: Optional[int], row_weight=None):
    """Denominator of a "mean" over rows: kept rows, weighted if asked."""
    keep = mx.ones(targets.shape, mx.bool_) if ignore_index is None else targets != ignore_index
    if row_weight is None:
        return keep.astype(mx.float32).sum()
    return mx.where(keep, row_weight, 0.0).sum()


def cross_entropy(
    logits: mx.array,
    targets: mx.array,
    weights: Optional[mx.array] = None,
    axis: int = -1,
    label_smoothing: float = 0.0,
    reduction: Reduction = "none",
    *,
    label_smoothing_mode: Literal["uniform", "others"] = "uniform",
    ignore_index: Optional[int] = None,
    class_weights: Optional[mx.array] = None,
    z_loss: float = 0.0,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Fused log-softmax + (label-smoothed) cross-entropy.

    A drop-in for :func:`mlx.nn.losses.cross_entropy` with PyTorch's options.

    Args:
        logits: unnormalised scores, float32/float16/bfloat16.
        targets: class indices (any integer dtype, ``logits``' shape without
            ``axis``) or probabilities (``logits``' shape).
        weights: per-sample weights multiplying the loss (MLX semantics).
        axis: the class axis.
        label_smoothing: ``eps`` in [0, 1).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        label_smoothing_mode: ``"uniform"`` (MLX/PyTorch: eps/K on every class)
            or ``"others"`` (1 - eps on the true class, eps/(K-1) on the
            others; not PyTorch's convention).
        ignore_index: rows whose target equals it give loss 0 and gradient 0,
            and are left out of the ``"mean"`` denominator.
        class_weights: shape ``[K]``, as PyTorch's ``weight``: the loss of a
            row is ``sum_j w_j q_j (lse - x_j)`` and ``"mean"`` divides by the
            summed weights of the kept rows' target classes.
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per row (PaLM).
        dtype: the result's dtype; ``None`` keeps the logits' dtype (MLX).
            ``mx.float32`` returns the float32 loss the kernel and the
            reduction computed, without rounding it to float16/bfloat16.
            The gradient is in the logits' dtype either way.

    A class index outside ``[0, K)`` that is not ``ignore_index`` gives NaN
    for its row (and its gradient); it never reads out of bounds.
    """
    logits = _as_array(logits, "logits")
    targets = _as_array(targets, "targets")
    _check_reduction(reduction)
    result_dtype = _result_dtype(dtype, logits.dtype)
    ignore_index = _ignore_index_for(targets, ignore_index)
    if class_weights is not None:
        class_weights = _as_array(class_weights, "class_weights")
    loss = _ext.cross_entropy(
        logits,
        targets,
        axis=axis,
        label_smoothing=float(label_smoothing),
        label_smoothing_mode=label_smoothing_mode,
        ignore_index=ignore_index,
        class_weights=class_weights,
        z_loss=float(z_loss),
        stream=stream,
    )
    if weights is not None:
        weights = _as_array(weights, "weights")
        if weights.shape != loss.shape:
            raise ValueError(
                f"weights must have the loss's shape {loss.shape}, got {weights.shape}"
            )
        loss = loss * weights.astype(mx.float32)
    count = None
    soft = targets.ndim == logits.ndim
    if reduction == "mean" and not soft and (ignore_index is not None or class_weights is not None):
        row_weight = None
        if class_weights is not None:
            k = class_weights.shape[0]
            # An out-of-range index (a NaN row) has no class weight to add;
            # a uint64 index above 2^63 turns negative here, out of range too.
            index = targets.astype(mx.int64)
            in_range = (index >= 0) & (index < k)
            row_weight = mx.where(
                in_range, class_weights.astype(mx.float32)[mx.clip(index, 0, k - 1)], 0.0
            )
        count = _kept_rows(targets, ignore_index, row_weight)
    return _finish(loss, reduction, result_dtype, count)


def smooth_l1_loss(
    predictions: mx.array,
    targets: mx.array,
    beta: float = 1.0,
    reduction: Reduction = "mean",
    *,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Smooth-L1 loss, as :func:`mlx.nn.losses.smooth_l1_loss`.

    ``0.5 d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``, with
    ``d = predictions - targets``. ``beta=0`` is plain L1 (MLX divides by zero
    there). A summed or averaged loss is reduced inside the kernel.
    """
    return _elementwise(
        _ext.smooth_l1_loss, "predictions", predictions, targets, reduction, stream, float(beta)
    )


def huber_loss(
    inputs: mx.array,
    targets: mx.array,
    delta: float = 1.0,
    reduction: Reduction = "none",
    *,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Huber loss, as :func:`mlx.nn.losses.huber_loss`.

    ``0.5 d**2`` where ``|d| <= delta``, else ``delta (|d| - 0.5 delta)``.
    """
    return _elementwise(
        _ext.huber_loss, "inputs", inputs, targets, reduction, stream, float(delta)
    )


def sigmoid_focal_loss(
    inputs: mx.array,
    targets: mx.array,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "none",
    *,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Sigmoid focal loss with torchvision's semantics (RetinaNet).

    ``alpha_t * BCE_with_logits(x, t) * (1 - p_t)**gamma`` with
    ``p = sigmoid(x)``, ``p_t = p t + (1 - p)(1 - t)`` and
    ``alpha_t = alpha t + (1 - alpha)(1 - t)``; ``alpha < 0`` disables
    ``alpha_t``. Targets are in [0, 1]. With ``gamma=0`` and ``alpha<0`` this is
    exactly binary cross-entropy with logits. ``"mean"`` averages over all
    elements. Gradients w.r.t. ``inputs`` only.
    """
    return _elementwise(
        _ext.sigmoid_focal_loss,
        "inputs",
        inputs,
        targets,
        reduction,
        stream,
        float(alpha),
        float(gamma),
    )


def softmax_focal_loss(
    logits: mx.array,
    targets: mx.array,
    alpha: Union[None, float, mx.array] = None,
    gamma: float = 2.0,
    axis: int = -1,
    reduction: Reduction = "none",
    *,
    ignore_index: Optional[int] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> mx.array:
    """Multi-class focal loss: ``-alpha_t (1 - p_t)**gamma log p_t``.

    ``p_t`` is the softmax probability of the target class. ``alpha`` is
    ``None`` (1), a scalar, or an array of shape ``[K]`` (per class). With
    ``gamma=0`` and ``alpha=None`` this equals :func:`cross_entropy`.
    ``ignore_index`` rows give 0 and leave the ``"mean"`` denominator, which
    counts kept rows.
    """
    logits = _as_array(logits, "logits")
    targets = _as_array(targets, "targets")
    _check_reduction(reduction)
    ignore_index = _ignore_index_for(targets, ignore_index)
    if alpha is not None and not isinstance(alpha, (int, float)):
        alpha = _as_array(alpha, "alpha")
        _check_nonnegative_values(alpha, "alpha")
    # A 1-D array is per class (read by the kernel); a 0-d array scales the
    # loss afterwards (the loss is linear in it, and no .item() is needed, which
    # mx.compile could not trace); a Python number goes to the kernel.
    scalar_alpha, class_alpha, alpha_scale = None, None, None
    if isinstance(alpha, mx.array) and alpha.ndim == 0:
        alpha_scale = alpha.astype(mx.float32)
    elif isinstance(alpha, mx.array):
        class_alpha = alpha
    elif alpha is not None:
        scalar_alpha = float(alpha)
    loss = _ext.softmax_focal_loss(
        logits,
        targets,
        axis=axis,
        gamma=float(gamma),
        alpha=scalar_alpha,
        class_alpha=class_alpha,
        ignore_index=ignore_index,
        stream=stream,
    )
    if alpha_scale is not None:
        loss = loss * alpha_scale
    count = None
    if reduction == "mean" and ignore_index is not None:
        count = _kept_rows(targets, ignore_index)
    return _finish(loss, reduction, logits.dtype, count)
