"""``mlx.nn.Module`` wrappers: configure a loss once, call it on (inputs, targets).

Each class takes the options of its function in :mod:`mlx_fused_losses.losses`
(same names and meanings) and shows them in its repr. Two defaults differ from
the functions', as PyTorch's modules differ from MLX's functions:
``reduction="mean"`` and, for the losses over class indices,
``ignore_index=-100`` (PyTorch's padding label). The constructor checks every
option with the function's own checks, so a bad option fails there, with the
function's message, not at the first call. Array options (class weights,
per-class alpha) are frozen: they are settings, not trainable parameters.
"""

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from . import losses
from .linear_cross_entropy import _filter_eps_option, _linear_cross_entropy_options, linear_cross_entropy


def _option_repr(value) -> str:
    if isinstance(value, mx.array):
        return f"array(shape={tuple(value.shape)}, dtype={value.dtype})"
    return repr(value)


class _LossModule(nn.Module):
    """Holds a loss's options in ``self._options`` and shows them in repr."""

    def __init__(self, **options):
        super().__init__()
        self._options = options
        # Keep array options (class weights, alpha) out of the trainable parameters.
        self.freeze()

    def _extra_repr(self) -> str:
        return ", ".join(f"{k}={_option_repr(v)}" for k, v in self._options.items())

    def __getattr__(self, name):
        # The options read as attributes too: CrossEntropyLoss().ignore_index.
        options = self.get("_options")
        if options is not None and name in options:
            return options[name]
        return super().__getattr__(name)


class CrossEntropyLoss(_LossModule):
    """Cross-entropy over class indices or probabilities, as a Module.

    ``CrossEntropyLoss(...)(logits, targets, weights=None)`` equals
    ``cross_entropy(logits, targets, weights, **options)``.

    Args:
        label_smoothing: ``eps`` in [0, 1); 0 disables smoothing.
        reduction: ``"mean"`` (default, as PyTorch), ``"sum"`` or ``"none"``.
            ``"mean"`` of an empty batch, of an all-ignored batch or of kept
            rows whose class weights are all 0 is 0.
        axis: the class axis of the logits.
        label_smoothing_mode: ``"uniform"`` (eps/K on every class, as
            MLX/PyTorch) or ``"others"`` (1 - eps on the target, eps/(K-1) on
            the rest).
        ignore_index: rows whose target equals it give 0 and leave the mean's
            denominator; a value the targets' dtype cannot hold matches no row.
            Default -100, PyTorch's padding label (``None``: no row ignored,
            an out-of-range index is a NaN row). With probability targets a
            negative value matches no row.
        class_weights: shape ``[K]``, PyTorch's ``weight`` (negative values
            too; no NaN).
        z_loss: coefficient of ``logsumexp(logits)**2`` added per row.
        logit_softcap: ``c``: the logits become ``c * tanh(logits / c)``
            before the softmax (Gemma 2); ``None``: no cap.
        token_scaling: each row's loss times its target's probability,
            detached (Liger's ``use_token_scaling``, DFT).
        dtype: the result's dtype (``None``: the logits' dtype).
        weight: PyTorch's name for ``class_weights``: a TypeError that says so.
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        reduction: losses.Reduction = "mean",
        *,
        axis: int = -1,
        label_smoothing_mode: str = "uniform",
        ignore_index: Optional[int] = -100,
        class_weights: Optional[mx.array] = None,
        z_loss: float = 0.0,
        logit_softcap: Optional[float] = None,
        token_scaling: bool = False,
        dtype: Optional[mx.Dtype] = None,
        weight: None = None,
    ):
        _, _, class_weights, _, _ = losses._cross_entropy_options(
            label_smoothing, reduction, label_smoothing_mode, ignore_index, class_weights, z_loss,
            dtype, weight, logit_softcap,
        )
        losses._bool_option(token_scaling, "token_scaling")
        super().__init__(
            label_smoothing=label_smoothing,
            reduction=reduction,
            axis=axis,
            label_smoothing_mode=label_smoothing_mode,
            ignore_index=ignore_index,
            class_weights=class_weights,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            token_scaling=token_scaling,
            dtype=dtype,
        )

    def __call__(self, logits: mx.array, targets: mx.array, weights: Optional[mx.array] = None):
        return losses.cross_entropy(logits, targets, weights, **self._options)


class SmoothL1Loss(_LossModule):
    """Smooth-L1 loss, as a Module: ``SmoothL1Loss(beta, reduction)(predictions, targets)``.

    Args:
        beta: the threshold between the quadratic and the linear part (>= 0;
            0 is plain L1).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``; the mean of
            an empty input is 0.
    """

    def __init__(self, beta: float = 1.0, reduction: losses.Reduction = "mean"):
        losses._smooth_l1_options(beta, reduction)
        super().__init__(beta=beta, reduction=reduction)

    def __call__(self, predictions: mx.array, targets: mx.array):
        return losses.smooth_l1_loss(predictions, targets, **self._options)


class HuberLoss(_LossModule):
    """Huber loss, as a Module: ``HuberLoss(delta, reduction)(inputs, targets)``.

    Args:
        delta: the threshold between the quadratic and the linear part (> 0,
            as PyTorch's; 0 would make the loss 0 everywhere).
        reduction: ``"mean"`` (default here, as PyTorch's ``HuberLoss``),
            ``"sum"`` or ``"none"``; the mean of an empty input is 0.
    """

    def __init__(self, delta: float = 1.0, reduction: losses.Reduction = "mean"):
        losses._huber_options(delta, reduction)
        super().__init__(delta=delta, reduction=reduction)

    def __call__(self, inputs: mx.array, targets: mx.array):
        return losses.huber_loss(inputs, targets, **self._options)


class SigmoidFocalLoss(_LossModule):
    """Sigmoid focal loss (torchvision/RetinaNet), as a Module:
    ``SigmoidFocalLoss(alpha, gamma, reduction)(inputs, targets)``.

    Args:
        alpha: weight of the positive class in [0, 1]; a negative value
            disables the alpha weighting. NaN is a ValueError.
        gamma: focusing exponent (>= 0; 0 is plain BCE-with-logits).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``; the mean of
            an empty input is 0.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: losses.Reduction = "mean"):
        losses._sigmoid_focal_options(alpha, gamma, reduction)
        super().__init__(alpha=alpha, gamma=gamma, reduction=reduction)

    def __call__(self, inputs: mx.array, targets: mx.array):
        return losses.sigmoid_focal_loss(inputs, targets, **self._options)


class SoftmaxFocalLoss(_LossModule):
    """Multi-class (softmax) focal loss, as a Module:
    ``SoftmaxFocalLoss(alpha, gamma, reduction)(logits, targets)``.

    Args:
        alpha: ``None`` (1), a scalar >= 0, or an array of shape ``[K]`` of
            per-class factors >= 0 (checked here, once). NaN or a negative
            value is a ValueError.
        gamma: focusing exponent (>= 0; with 0 and ``alpha=None`` this is
            cross-entropy).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``; the mean of
            an empty or all-ignored batch is 0.
        axis: the class axis of the logits.
        ignore_index: rows whose target equals it give 0 and leave the mean's
            denominator; a value the targets' dtype cannot hold matches no row.
            Default -100, as :class:`CrossEntropyLoss` (``None``: no row
            ignored).
    """

    def __init__(
        self,
        alpha: Union[None, float, mx.array] = None,
        gamma: float = 2.0,
        reduction: losses.Reduction = "mean",
        *,
        axis: int = -1,
        ignore_index: Optional[int] = -100,
    ):
        _, alpha, _ = losses._softmax_focal_options(alpha, gamma, reduction, ignore_index)
        super().__init__(
            alpha=alpha, gamma=gamma, reduction=reduction, axis=axis, ignore_index=ignore_index
        )

    def __call__(self, logits: mx.array, targets: mx.array):
        return losses.softmax_focal_loss(logits, targets, **self._options)


# The name users of torchvision/RetinaNet code look for.
FocalLoss = SigmoidFocalLoss


class LinearCrossEntropyLoss(_LossModule):
    """Module form of :func:`mlx_fused_losses.linear_cross_entropy`: the loss of
    ``hidden @ weight.T + bias`` without the logits. Called as
    ``criterion(hidden, weight, targets, bias=None, *, mask=None, scales=None,
    biases=None, group_size=None, bits=None, mode="affine", return_stats=False)`` (the weight
    is the model's head, so it is an argument, not a member).

    Args:
        label_smoothing: ``eps`` in [0, 1); 0 disables smoothing.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        label_smoothing_mode: ``"uniform"`` or ``"others"``, as for
            :class:`CrossEntropyLoss`.
        ignore_index: rows whose target equals it give 0 and leave the mean's
            denominator. Default -100, PyTorch's padding label (``None``: no
            row ignored, an out-of-range index is a NaN row).
        z_loss: coefficient of ``logsumexp(logits)**2`` added per row.
        logit_softcap: ``c``: the logits become ``c * tanh(z / c)``; ``None``
            disables it.
        chunk_bytes: working-memory budget of the float32 logits of one chunk
            of rows (``None``: the function's default).
        filter_eps: gradient filtering (``None``: exact; a float or
            ``"auto"``), as :func:`mlx_fused_losses.linear_cross_entropy`.
        dtype: the result's dtype (``None``: ``hidden``'s dtype).
    """

    def __init__(
        self,
        label_smoothing: float = 0.0,
        reduction: losses.Reduction = "mean",
        *,
        label_smoothing_mode: str = "uniform",
        ignore_index: Optional[int] = -100,
        z_loss: float = 0.0,
        logit_softcap: Optional[float] = None,
        chunk_bytes: Optional[int] = None,
        filter_eps: Union[None, float, str] = None,
        dtype: Optional[mx.Dtype] = None,
    ):
        _linear_cross_entropy_options(label_smoothing, reduction, label_smoothing_mode,
                                      ignore_index, z_loss, logit_softcap, chunk_bytes, dtype)
        _filter_eps_option(filter_eps, mx.float32)
        super().__init__(
            label_smoothing=label_smoothing,
            reduction=reduction,
            label_smoothing_mode=label_smoothing_mode,
            ignore_index=ignore_index,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            chunk_bytes=chunk_bytes,
            filter_eps=filter_eps,
            dtype=dtype,
        )

    def __call__(self, hidden: mx.array, weight: mx.array, targets: mx.array,
                 bias: Optional[mx.array] = None, **kwargs):
        return linear_cross_entropy(hidden, weight, targets, bias, **self._options, **kwargs)
