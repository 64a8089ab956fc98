"""``mlx.nn.Module`` wrappers: configure a loss once, call it on (inputs, targets)."""

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from . import losses


class CrossEntropyLoss(nn.Module):
    """Module form of :func:`mlx_fused_losses.cross_entropy`."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        reduction: losses.Reduction = "mean",
        *,
        axis: int = -1,
        label_smoothing_mode: str = "uniform",
        ignore_index: Optional[int] = None,
        class_weights: Optional[mx.array] = None,
        z_loss: float = 0.0,
        dtype: Optional[mx.Dtype] = None,
    ):
        super().__init__()
        self._options = dict(
            axis=axis,
            label_smoothing=label_smoothing,
            reduction=reduction,
            label_smoothing_mode=label_smoothing_mode,
            ignore_index=ignore_index,
            class_weights=class_weights,
            z_loss=z_loss,
            dtype=dtype,
        )
        # Keep class weights out of the trainable parameters.
        self.freeze()

    def __call__(self, logits: mx.array, targets: mx.array, weights: Optional[mx.array] = None):
        return losses.cross_entropy(logits, targets, weights, **self._options)


class SmoothL1Loss(nn.Module):
    """Module form of :func:`mlx_fused_losses.smooth_l1_loss`."""

    def __init__(self, beta: float = 1.0, reduction: losses.Reduction = "mean"):
        super().__init__()
        self.beta, self.reduction = beta, reduction

    def __call__(self, predictions: mx.array, targets: mx.array):
        return losses.smooth_l1_loss(predictions, targets, self.beta, self.reduction)


class HuberLoss(nn.Module):
    """Module form of :func:`mlx_fused_losses.huber_loss`."""

    def __init__(self, delta: float = 1.0, reduction: losses.Reduction = "mean"):
        super().__init__()
        self.delta, self.reduction = delta, reduction

    def __call__(self, inputs: mx.array, targets: mx.array):
        return losses.huber_loss(inputs, targets, self.delta, self.reduction)


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`mlx_fused_losses.sigmoid_focal_loss`."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: losses.Reduction = "mean"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def __call__(self, inputs: mx.array, targets: mx.array):
        return losses.sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)


class SoftmaxFocalLoss(nn.Module):
    """Module form of :func:`mlx_fused_losses.softmax_focal_loss`."""

    def __init__(
        self,
        alpha: Union[None, float, mx.array] = None,
        gamma: float = 2.0,
        reduction: losses.Reduction = "mean",
        *,
        axis: int = -1,
        ignore_index: Optional[int] = None,
    ):
        super().__init__()
        self._options = dict(
            alpha=alpha, gamma=gamma, axis=axis, reduction=reduction, ignore_index=ignore_index
        )
        self.freeze()

    def __call__(self, logits: mx.array, targets: mx.array):
        return losses.softmax_focal_loss(logits, targets, **self._options)


# The name users of torchvision/RetinaNet code look for.
FocalLoss = SigmoidFocalLoss
