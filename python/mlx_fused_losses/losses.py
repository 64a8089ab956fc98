"""The public losses: argument checks and reductions around the primitives of
the compiled module ``_ext``. Signatures follow ``mlx.nn.losses``; options that
PyTorch users expect (``ignore_index``, class weights) are keyword-only.

Every loss is computed in float32 inside the kernels and returned in the dtype
of its main input; sums and means of per-row losses accumulate in double (CPU)
or with compensation (Metal): a mean is as accurate as its rows.
"""

import math
import numbers
import operator
import struct
from typing import Dict, Literal, Optional, Tuple, Union

import mlx.core as mx

from . import _ext

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )


# Scalar options: their types are checked here (a str, a float where an int
# is meant, or an int outside int64 would otherwise be converted silently or
# refused by nanobind's generic message); their values by the C++ op, whose
# checks the Module classes also call at construction (_ext.check_*_options).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLT_MAX = 3.4028234663852886e38


def _float_option(value, name: str) -> float:
    """``value`` as the float the kernels compute with (float32). TypeError
    for a non-number (a str, a bool, None); ValueError for a value float32
    turns into something else: a nonzero number that rounds to 0 (the C++
    check would report "got 0") or a finite one that overflows to inf."""
    if type(value) is not float:
        if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__float__"):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float64
            raise ValueError(f"{name}={value} overflows float32, the precision the kernels compute in") from None
    magnitude = abs(value)
    if 0.0 < magnitude < 1e-37 and struct.unpack("f", struct.pack("f", value))[0] == 0.0:
        raise ValueError(
            f"{name}={value!r} rounds to 0 in float32, the precision the kernels compute in"
        )
    if _FLT_MAX < magnitude < math.inf:
        raise ValueError(f"{name}={value!r} overflows float32, the precision the kernels compute in")
    return value


def _int_option(value, name: str) -> int:
    """``value`` as an int64: an int or a NumPy integer, never a float, a str
    or a bool (``bits=4.7`` was truncated to 4, ``group_size="32"`` parsed)."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        value = operator.index(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name}={value} does not fit in a 64-bit integer")
    return value


def _index_option(value, name: str = "ignore_index") -> Optional[int]:
    """A class index option (``ignore_index``): None or an int64."""
    return None if value is None else _int_option(value, name)


def _reject_pytorch_weight(weight) -> None:
    """``weight=`` is PyTorch's name for per-class weights; here it is
    ``class_weights=`` (``weights`` is MLX's per-sample weights)."""
    if weight is not None:
        raise TypeError(
            "weight= is PyTorch's name for per-class weights: pass class_weights= "
            "(shape [K]) here; weights= (MLX's name) multiplies each sample's loss"
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


def _check_nonnegative_values(a: mx.array, name: str, negative_ok: bool = False) -> None:
    """ValueError if an array of per-class factors holds a NaN or (unless
    ``negative_ok``) a negative value. Skipped while mx.compile or mx.vmap
    traces the call (the values are not known then); the Module classes
    check at construction."""
    bad = mx.any(mx.isnan(a) if negative_ok else mx.isnan(a) | (a < 0))
    try:
        bad = bad.item()
    except ValueError as err:
        if "function transformations" in str(err):
            return
        raise
    if bad:
        rule = "must not hold NaN" if negative_ok else "must hold values >= 0 (no NaN)"
        raise ValueError(f"{name} {rule}, got {a}")


def _elementwise(ext_fn, first_name: str, first, targets, reduction: str, stream, params):
    """Shared path of the element-wise losses: the fused kernel (which also
    reduces) and the cast back to the input's dtype. ``params`` are the
    loss's checked float options (its ``_*_options``) in the order of
    ``ext_fn``'s signature (passed by position: at 320 elements the call's
    overhead is what gets measured)."""
    first = _as_array(first, first_name)
    targets = _as_array(targets, "targets")
    loss = ext_fn(first, targets, *params, reduction, stream=stream)
    return loss.astype(first.dtype)


def _finish(loss: mx.array, reduction: str, dtype: mx.Dtype, count=None, weight_mass=None) -> mx.array:
    """Reduce a float32 per-element/per-row loss and cast it to ``dtype``.

    ``count`` replaces the number of elements as the denominator of "mean"
    (rows kept after ignore_index, or their summed class weights);
    ``weight_mass``, with class weights, their summed absolute values (0:
    nothing kept, the mean over nothing; see ``_reduce``).
    """
    return _reduce(loss, reduction, count, weight_mass).astype(dtype)


def _reduce(loss: mx.array, reduction: str, count=None, weight_mass=None) -> mx.array:
    """``_finish`` without the cast: the float32 sum or mean."""
    if reduction == "sum":
        loss = _sum(loss)
    elif reduction == "mean":
        # One rule for every loss: a mean over nothing is 0, not NaN (an
        # empty batch, every row ignored, or kept rows whose class weights are
        # all 0), so that one such batch cannot poison a training run. It
        # is the sum times 0: a NaN row (an out-of-range index) still shows.
        # Sizes are counted when the graph runs (_ext.mean_factor,
        # _ext.element_count), never read from .size or .shape here: a
        # shapeless mx.compile runs the graph traced at one size at others.
        if count is None:
            # (the sum times 1 / size, as loss.mean(), which gives NaN for 0)
            loss = _sum(loss) * _ext.mean_factor(loss)
        else:
            # weight_mass (class weights: the kept rows' summed |weights|)
            # says whether anything was kept; kept rows whose weights (some
            # negative) cancel to a count of 0 divide by it, as PyTorch:
            # +-inf, or NaN for a total of 0.
            empty = (count if weight_mass is None else weight_mass) == 0
            safe = mx.where(empty, mx.array(1.0, mx.float32), count)
            total = _sum(loss)
            loss = mx.where(empty, total * 0.0, total / safe)
    return loss


def _sum(values: mx.array) -> mx.array:
    """The float32 sum of per-row values, accumulated beyond float32 (double
    on the CPU, compensated on Metal: csrc/ops/accurate_sum.h), so that a
    mean is as accurate as its rows. A scalar (a sum the kernel already
    took) is its own sum."""
    return values if values.ndim == 0 else _ext.accurate_sum(values)


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


# The ignore index a `mask` turns masked rows into when no ignore_index is
# given: no class index can equal it (classes are >= 0).
_MASKED_ROW = -(2**63)


def _masked_targets(targets: mx.array, mask: mx.array, ignore_index: Optional[int]):
    """(int64 targets, ignore_index) where the rows ``mask`` leaves out are
    ignored rows. One rule with or without a mask: a row is left out when it
    is masked or its index equals ``ignore_index``; any other index outside
    the classes is a NaN row. So without an ignore_index, an unmasked index
    equal to the masked rows' marker (an int64 -2^63, or a uint64 2^63, which
    int64 reads as -2^63) becomes -1: out of range too, not ignored."""
    targets = targets.astype(mx.int64)
    if ignore_index is None:
        ignore_index = _MASKED_ROW
        targets = mx.where(targets == _MASKED_ROW, mx.array(-1, mx.int64), targets)
    return mx.where(mask, targets, mx.array(ignore_index, mx.int64)), ignore_index


def _kept_rows(targets: mx.array, ignore_index: Optional[int], row_weight=None):
    """Denominator of a "mean" over rows: kept rows, weighted if asked.
    (Counted when the graph runs: no shape is frozen into a shapeless trace.)"""
    # (A count of rows is exact in float32 up to 2^24 rows; summed weights
    # are added with _sum, as accurately as the losses.)
    if ignore_index is None:
        return _ext.element_count(targets) if row_weight is None else _sum(row_weight)
    keep = targets != ignore_index
    if row_weight is None:
        return keep.astype(mx.float32).sum()
    return _sum(mx.where(keep, row_weight, 0.0))


# -- the options of each loss, checked once for the function and the Module ---
# Each returns the options as the op takes them; the C++ checks of their
# values (_ext.check_*_options) are the ones the op itself runs.

def _cross_entropy_options(label_smoothing, reduction, label_smoothing_mode, ignore_index,
                           class_weights, z_loss, dtype, weight=None, logit_softcap=None):
    _reject_pytorch_weight(weight)
    _check_reduction(reduction)
    label_smoothing = _float_option(label_smoothing, "label_smoothing")
    z_loss = _float_option(z_loss, "z_loss")
    if logit_softcap is not None:
        logit_softcap = _float_option(logit_softcap, "logit_softcap")
    ignore_index = _index_option(ignore_index)
    if class_weights is not None:
        class_weights = _as_array(class_weights, "class_weights")
    _ext.check_cross_entropy_options(label_smoothing, label_smoothing_mode, z_loss, class_weights,
                                     logit_softcap)
    if class_weights is not None:
        _check_nonnegative_values(class_weights, "class_weights", negative_ok=True)
    _result_dtype(dtype, mx.float32)
    return label_smoothing, ignore_index, class_weights, z_loss, logit_softcap


def _smooth_l1_options(beta, reduction):
    _check_reduction(reduction)
    beta = _float_option(beta, "beta")
    _ext.check_smooth_l1_options(beta)
    return (beta,)


def _huber_options(delta, reduction):
    _check_reduction(reduction)
    delta = _float_option(delta, "delta")
    _ext.check_huber_options(delta)
    return (delta,)


def _sigmoid_focal_options(alpha, gamma, reduction):
    _check_reduction(reduction)
    alpha, gamma = _float_option(alpha, "alpha"), _float_option(gamma, "gamma")
    _ext.check_sigmoid_focal_options(alpha, gamma)
    return alpha, gamma


def _softmax_focal_options(alpha, gamma, reduction, ignore_index):
    """(gamma, alpha as a float, None or an mx.array, ignore_index)."""
    _check_reduction(reduction)
    gamma = _float_option(gamma, "gamma")
    ignore_index = _index_option(ignore_index)
    if isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        alpha = _float_option(alpha, "alpha")
    elif alpha is not None:
        alpha = _as_array(alpha, "alpha")
        _check_nonnegative_values(alpha, "alpha")
    _ext.check_softmax_focal_options(gamma, alpha if isinstance(alpha, float) else None)
    return gamma, alpha, ignore_index


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
    logit_softcap: Optional[float] = None,
    token_scaling: bool = False,
    return_stats: bool = False,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
    weight: None = None,
) -> Union[mx.array, Tuple[mx.array, Dict[str, mx.array]]]:
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
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per row (PaLM). Not
            weighted by ``class_weights``: with them, ``"mean"`` divides the
            cross-entropy by the summed class weights and the z term by the
            number of kept rows (as Liger), so scaling every class weight
            by the same factor leaves the loss unchanged.
        logit_softcap: ``c > 0``: the loss (and its lse and z term) is that
            of ``c * tanh(logits / c)`` (Gemma 2's final-logit soft-cap), as
            :func:`linear_cross_entropy`'s ``logit_softcap``; the gradient
            is w.r.t. the raw logits. ``None``: no cap.
        token_scaling: multiply each row's loss (its z term included) by
            the softmax probability of its target class, detached from the
            gradient (Liger-Kernel's ``use_token_scaling``, the DFT loss);
            ignored rows stay 0 and ``"mean"`` keeps its denominator.
            Class-index targets only.
        return_stats: also return per-row statistics, as
            :func:`linear_cross_entropy`: ``(loss, stats)`` with float32/bool
            arrays of the rows' shape (``logits`` without ``axis``), not
            differentiable, of the (capped) logits: ``"lse"``, ``"entropy"``
            (of the softmax), ``"correct"`` (the target's logit is the row's
            maximum: token accuracy; False for ignored and out-of-range rows;
            for probability targets the most probable class is the target)
            and ``"argmax"`` (int64, the first class of maximal logit, as
            ``mx.argmax``: the predicted token). lse, entropy and argmax are
            computed for ignored rows too; entropy is NaN for a row whose
            logits are all -inf. They come from the loss's own pass over the
            logits (a few per-element operations more, no extra pass).
        dtype: the result's dtype; ``None`` keeps the logits' dtype (MLX).
            ``mx.float32`` returns the float32 loss the kernel and the
            reduction computed, without rounding it to float16/bfloat16.
            The gradient is in the logits' dtype either way.
        weight: PyTorch's name for ``class_weights``; passing it is a
            TypeError that says so (``weights`` is MLX's per-sample weights).

    No ``ignore_index`` by default (MLX's behaviour): a class index outside
    ``[0, K)`` that is not ``ignore_index`` -- PyTorch's -100 padding
    included -- gives NaN for its row (and its gradient); it never reads out
    of bounds. (:class:`mlx_fused_losses.nn.CrossEntropyLoss` defaults to
    ``ignore_index=-100``, as PyTorch's.) With probability targets a
    negative ``ignore_index`` matches no row and one >= 0 is a ValueError,
    as in PyTorch. ``class_weights`` may be negative, as PyTorch's: the
    weighted mean divides by the kept rows' summed weights whatever their
    sign; weights that cancel to 0 give PyTorch's +-inf (NaN for a total of
    0), while kept rows whose weights are all 0 are the mean over nothing
    (0). A NaN weight is a ValueError
    (checked when the call is not traced by ``mx.compile``/``mx.vmap``; the
    Module checks once).
    """
    logits = _as_array(logits, "logits")
    targets = _as_array(targets, "targets")
    label_smoothing, ignore_index, class_weights, z_loss, logit_softcap = _cross_entropy_options(
        label_smoothing, reduction, label_smoothing_mode, ignore_index, class_weights, z_loss,
        dtype, weight, logit_softcap,
    )
    result_dtype = _result_dtype(dtype, logits.dtype)
    ignore_index = _ignore_index_for(targets, ignore_index)
    soft = targets.ndim == logits.ndim
    token_scaling = _bool_option(token_scaling, "token_scaling")
    if token_scaling and soft:
        raise ValueError(
            "token_scaling weights each row by its target class's probability: it needs class-index "
            f"targets (logits' shape without axis), got probabilities of shape {targets.shape}"
        )
    # The mean of a class-weighted loss divides the cross-entropy by the kept
    # rows' summed class weights (PyTorch) and the z term by the number of
    # kept rows (Liger): the z term is not weighted per row, and dividing it
    # by the weights would make the loss depend on their scale. So the
    # kernel leaves z out and it is added here from the row's lse (which is
    # differentiable, and 0 on ignored rows).
    split_z = reduction == "mean" and not soft and class_weights is not None and z_loss != 0.0
    outputs = _ext.cross_entropy_outputs(
        logits,
        targets,
        axis=axis,
        label_smoothing=label_smoothing,
        label_smoothing_mode=label_smoothing_mode,
        ignore_index=ignore_index,
        class_weights=class_weights,
        z_loss=0.0 if split_z else z_loss,
        logit_softcap=logit_softcap,
        stream=stream,
        return_stats=bool(return_stats),
    )
    loss, lse = outputs[0], outputs[1]
    z_rows = lse * lse * z_loss if split_z else None
    if token_scaling:
        scale = _target_probability(logits, targets, lse, axis, ignore_index, logit_softcap)
        loss = loss * scale
        if z_rows is not None:
            z_rows = z_rows * scale
    if weights is not None:
        weights = _as_array(weights, "weights")
        if weights.shape != loss.shape:
            raise ValueError(
                f"weights must have the loss's shape {loss.shape}, got {weights.shape}"
            )
        weights = weights.astype(mx.float32)
        loss = loss * weights
        if z_rows is not None:
            z_rows = z_rows * weights
    count = mass = None
    if reduction == "mean" and not soft and (ignore_index is not None or class_weights is not None):
        row_weight = None
        if class_weights is not None:
            # (K as an array counted when the graph runs: a shapeless trace
            # may run at another number of classes)
            k = _ext.element_count(class_weights, mx.int64)
            # An out-of-range index (a NaN row) has no class weight to add;
            # a uint64 index above 2^63 turns negative here, out of range too.
            index = targets.astype(mx.int64)
            in_range = (index >= 0) & (index < k)
            row_weight = mx.where(
                in_range, class_weights.astype(mx.float32)[mx.clip(index, 0, k - 1)], 0.0
            )
        count = _kept_rows(targets, ignore_index, row_weight)
        if row_weight is not None:
            mass = _kept_rows(targets, ignore_index, mx.abs(row_weight))
    if z_rows is not None:
        mean = _reduce(loss, reduction, count, mass) + _reduce(z_rows, reduction,
                                                               _kept_rows(targets, ignore_index))
        loss = mean.astype(result_dtype)
    else:
        loss = _finish(loss, reduction, result_dtype, count, mass)
    if not return_stats:
        return loss
    # From the loss's own pass (csrc/ops/cross_entropy.h: CrossEntropy's
    # outputs 4-7); their cotangents are ignored, stop_gradient says so.
    stats = dict(zip(("lse", "entropy", "argmax", "correct"), map(mx.stop_gradient, outputs[2:])))
    return loss, stats


def _target_probability(logits, targets, lse, axis, ignore_index, logit_softcap) -> mx.array:
    """Token scaling's factor: exp(z_t - lse) of each row's target class t
    (z the capped logits), detached; 0 on ignored rows (whose lse is 0 and
    whose exp could overflow), NaN-free there. (K is counted when the graph
    runs: no shape is frozen into a shapeless trace.)"""
    z = mx.moveaxis(mx.stop_gradient(logits), axis, -1)
    k = _ext.element_count(z, mx.int64) // mx.maximum(_ext.element_count(lse, mx.int64), 1)
    index = targets.astype(mx.int64)
    kept = (index >= 0) & (index < k)
    if ignore_index is not None:
        kept = kept & (index != ignore_index)
    cls = mx.clip(index, 0, mx.maximum(k - 1, 0))
    z_t = mx.take_along_axis(z, cls[..., None], axis=-1).squeeze(-1).astype(mx.float32)
    if logit_softcap is not None:
        z_t = logit_softcap * mx.tanh(z_t / logit_softcap)
    return mx.where(kept, mx.exp(z_t - mx.stop_gradient(lse)), 0.0)


def _bool_option(value, name: str) -> bool:
    """A flag: a bool (or a NumPy bool), never a number or a str that Python
    would read as true."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


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
        _ext.smooth_l1_loss, "predictions", predictions, targets, reduction, stream,
        _smooth_l1_options(beta, reduction),
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
    ``delta`` must be > 0 (as PyTorch; MLX's ``delta=0`` is the zero loss:
    nothing would train).
    """
    return _elementwise(
        _ext.huber_loss, "inputs", inputs, targets, reduction, stream,
        _huber_options(delta, reduction),
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
    ``alpha_t``. Targets are in [0, 1] (soft targets allowed); an element
    whose target is outside [0, 1] gets a NaN loss and gradient (the formula
    is no loss there: it can go negative), found by the kernel itself, with
    no check that would read the targets on the host. With ``gamma=0`` and
    ``alpha<0`` this is exactly binary cross-entropy with logits.
    ``"mean"`` averages over all elements. Gradients w.r.t. ``inputs`` only.
    """
    return _elementwise(
        _ext.sigmoid_focal_loss, "inputs", inputs, targets, reduction, stream,
        _sigmoid_focal_options(alpha, gamma, reduction),
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
    gamma, alpha, ignore_index = _softmax_focal_options(alpha, gamma, reduction, ignore_index)
    ignore_index = _ignore_index_for(targets, ignore_index)
    # A 1-D array is per class (read by the kernel); a 0-d array scales the
    # loss afterwards (the loss is linear in it, and no .item() is needed, which
    # mx.compile could not trace); a Python number goes to the kernel.
    scalar_alpha, class_alpha, alpha_scale = None, None, None
    if isinstance(alpha, mx.array) and alpha.ndim == 0:
        alpha_scale = alpha.astype(mx.float32)
    elif isinstance(alpha, mx.array):
        class_alpha = alpha
    elif alpha is not None:
        scalar_alpha = alpha
    loss = _ext.softmax_focal_loss(
        logits,
        targets,
        axis=axis,
        gamma=gamma,
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
