"""Fused loss kernels for MLX: cross-entropy, smooth-L1/Huber and focal losses
as custom primitives, one pass over the inputs forward and one backward.

    import mlx_fused_losses as fl
    loss = fl.cross_entropy(logits, targets, label_smoothing=0.1, reduction="mean")
"""

import importlib.metadata as _metadata

# First of all, before mlx.core or _ext is loaded: the installed mlx must be the
# release _ext was compiled against (see _mlx_guard.py).
from ._build_info import MLX_VERSION as _BUILT_WITH_MLX
from ._mlx_guard import check_mlx_version as _check_mlx_version

_check_mlx_version(_BUILT_WITH_MLX)

import mlx.core  # noqa: E402, F401  (load libmlx and its nanobind types before _ext)

from . import distributed, nn  # noqa: E402
from .alignment import (  # noqa: E402
    cpo_loss,
    dpo_loss,
    grpo_loss,
    kto_loss,
    linear_cpo_loss,
    linear_dpo_loss,
    linear_grpo_loss,
    linear_kto_loss,
    linear_orpo_loss,
    linear_simpo_loss,
    orpo_loss,
    simpo_loss,
)
from .distillation import jsd, kl_div, linear_distillation_loss, linear_topk_distillation_loss  # noqa: E402
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402
from .log_probs import linear_log_probs, log_probs  # noqa: E402
from .losses import (  # noqa: E402
    cross_entropy,
    huber_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    softmax_focal_loss,
)

# One source of truth: the version in pyproject.toml, via the installed metadata.
__version__ = _metadata.version("mlx-fused-losses")

__all__ = [
    "cross_entropy",
    "smooth_l1_loss",
    "huber_loss",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "linear_cross_entropy",
    "linear_log_probs",
    "log_probs",
    "dpo_loss",
    "orpo_loss",
    "simpo_loss",
    "cpo_loss",
    "kto_loss",
    "grpo_loss",
    "linear_dpo_loss",
    "linear_orpo_loss",
    "linear_simpo_loss",
    "linear_cpo_loss",
    "linear_kto_loss",
    "linear_grpo_loss",
    "kl_div",
    "jsd",
    "linear_distillation_loss",
    "linear_topk_distillation_loss",
    "nn",
    "distributed",
]
