"""Fused loss kernels for MLX: cross-entropy, smooth-L1/Huber and focal losses
as custom primitives, one pass over the inputs forward and one backward.

    import mlx_fused_losses as fl
    loss = fl.cross_entropy(logits, targets, label_smoothing=0.1, reduction="mean")
"""

import mlx.core  # noqa: F401  (load libmlx and its nanobind types before _ext)

from . import nn
from .losses import (
    cross_entropy,
    huber_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "smooth_l1_loss",
    "huber_loss",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "nn",
]
