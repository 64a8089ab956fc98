"""What gets benchmarked: each loss, how its inputs are built, and its sweeps.

Every loss takes a ``reduction`` keyword.  The benchmark uses "mean" so the
forward output is O(1) and ``mx.value_and_grad`` can differentiate it
directly; the value check uses the reference's "none" output (see runner).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn.losses as mlx_losses

import mlx_fused_losses as fl
from . import alignment, linear, log_probs

LABEL_SMOOTHING = 0.1
SMOOTH_L1_BETA = 1.0
HUBER_DELTA = 1.0
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0

MiB_ELEMENTS = 2**20

# Row-wise losses: (rows, classes).  Flat losses: number of elements.
ROW_SWEEPS = {
    "full": [(4096, v) for v in (1024, 8192, 32768, 131072)],
    "quick": [(1024, 1024), (1024, 8192)],
    "smoke": [(64, 128), (64, 512)],
}
FLAT_SWEEPS = {
    "full": [n * MiB_ELEMENTS for n in (1, 4, 16, 64, 128)],
    "quick": [MiB_ELEMENTS // 4, MiB_ELEMENTS],
    "smoke": [4096, 16384],
}

# Linear cross-entropy: (tokens N, hidden H, vocabulary V). The full sweep has
# the two headline shapes (MLX's composed baseline alone takes minutes there on
# 2 CPU cores: its float32 matmul runs on a reference BLAS).
LINEAR_SWEEPS = {
    "full": [(2048, 1024, 32000), (1024, 1024, 151936)],
    "quick": [(256, 256, 8192)],
    "smoke": [(32, 16, 100)],
}

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEFAULT_DTYPES = ["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    rowwise: bool  # True: inputs are (rows, classes) logits + int targets
    ours: Callable[..., mx.array]  # (*inputs, reduction="mean")
    reference: Callable[..., mx.array]  # (*inputs, reduction="mean")
    reference_name: str
    make_inputs: Callable[[Tuple[int, ...], mx.Dtype], list]
    # Optional, for losses that are not "one array in, its gradient out":
    sweeps: Optional[Dict[str, List[Tuple[int, ...]]]] = None  # instead of ROW/FLAT_SWEEPS
    dtype_names: Optional[Tuple[str, ...]] = None  # the only dtypes it runs in
    grad_argnums: Tuple[int, ...] = (0,)  # inputs differentiated in fwd+bwd
    # (inputs, backward) -> thunk timed in the "roofline" column instead of
    # the memory roofline, and the flop count of a pass (GFLOP/s in the plot)
    roofline: Optional[Callable[[list, bool], Callable[[], object]]] = None
    flops: Optional[Callable[[Tuple[int, ...], bool], int]] = None
    # (inputs, backward) -> {name: (thunk, counts MLX memory)}: more baselines
    extras: Optional[Callable[[list, bool], Dict[str, tuple]]] = None
    # PyTorch's version, (*torch tensors) -> mean loss; None where torch has none.
    torch: Optional[Callable] = None
    # More references for the small-shape table, {name: fn like ``reference``}
    # (hard-target cross-entropy: mlx.nn.losses besides mx.fast.cross_entropy).
    small_shape_references: Optional[Dict[str, Callable[..., mx.array]]] = None


@dataclass(frozen=True)
class Case:
    spec: LossSpec
    dtype_name: str
    shape: Tuple[int, ...]

    @property
    def size_label(self) -> str:
        if self.spec.rowwise:
            return "x".join(str(d) for d in self.shape)
        n = self.shape[0]
        return f"{n // MiB_ELEMENTS}M" if n % MiB_ELEMENTS == 0 else str(n)

    @property
    def elements(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count


# ---- input builders -------------------------------------------------------

def _logits_and_class_targets(shape, dtype):
    logits = mx.random.normal(shape).astype(dtype)
    targets = mx.random.randint(0, shape[-1], shape[:-1]).astype(mx.int32)
    return [logits, targets]


def _predictions_and_targets(shape, dtype):
    return [mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype)]


def _logits_and_binary_targets(shape, dtype):
    logits = mx.random.normal(shape).astype(dtype)
    targets = mx.random.bernoulli(0.1, shape).astype(dtype)  # detection-like: mostly negatives
    return [logits, targets]


# ---- reference formulas where MLX has no such loss ---------------------------

def _reduce(loss, reduction):
    return {"mean": mx.mean, "sum": mx.sum, "none": lambda x: x}[reduction](loss)


def composed_sigmoid_focal(inputs, targets, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss written with MLX ops."""
    p = mx.sigmoid(inputs)
    ce = mx.logaddexp(0.0, inputs) - inputs * targets  # BCE with logits
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = FOCAL_ALPHA * targets + (1 - FOCAL_ALPHA) * (1 - targets)
    return _reduce(alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA, reduction)


def composed_softmax_focal(logits, targets, reduction="mean"):
    """Multi-class focal loss, -(1 - p_t)^gamma * log p_t, no alpha."""
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    log_p_t = mx.take_along_axis(log_probs, targets[:, None], axis=-1).squeeze(-1)
    return _reduce(-((1 - mx.exp(log_p_t)) ** FOCAL_GAMMA) * log_p_t, reduction)


# mlx-lm's CPU path (composed MLX ops) takes ~11 s forward at 1024 x 32768 on 2
# cores, so the distillation sweeps stop there.
DISTILL_SWEEPS = {"full": [(256, 32768), (1024, 32768)], "quick": [(256, 8192)], "smoke": [(64, 512)]}


def _student_and_teacher(shape, dtype):
    return [mx.random.normal(shape).astype(dtype) * 2, mx.random.normal(shape).astype(dtype) * 2]


def _mlx_lm_losses():
    """mlx_lm.tuner.losses (the distillation baseline) when mlx-lm is installed."""
    try:
        from mlx_lm.tuner import losses
    except ImportError:
        return None
    return losses


def composed_kl_div(student, teacher, reduction="mean"):
    """KL(teacher || student) per row: mlx_lm's kl_div_loss(student, teacher)
    where mlx-lm is installed, else its CPU formula (mlx.nn.losses.kl_div_loss
    on the two log-softmaxes)."""
    losses = _mlx_lm_losses()
    if losses is not None:
        return _reduce(losses.kl_div_loss(student, teacher), reduction)
    lq = student - mx.logsumexp(student, axis=-1, keepdims=True)
    lp = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    return _reduce(mlx_losses.kl_div_loss(lq, lp, axis=-1, reduction="none"), reduction)


def composed_jsd(student, teacher, reduction="mean"):
    """The symmetric JSD per row: mlx_lm's js_div_loss where installed, else
    the same formula with MLX ops."""
    losses = _mlx_lm_losses()
    if losses is not None:
        return _reduce(losses.js_div_loss(student, teacher), reduction)
    lq = student - mx.logsumexp(student, axis=-1, keepdims=True)
    lp = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    lm = mx.logaddexp(lq, lp) - mx.log(mx.array(2.0, lq.dtype))
    kl = lambda a: mlx_losses.kl_div_loss(lm, a, axis=-1, reduction="none")  # noqa: E731
    return _reduce(0.5 * (kl(lp) + kl(lq)), reduction)


def _fast_cross_entropy(logits, targets, reduction="mean"):
    """mx.fast.cross_entropy (hard targets, no options; unfused on the CPU)."""
    return _reduce(mx.fast.cross_entropy(logits, targets), reduction)


# PyTorch equivalents (torch is optional: bench/torch_column.py imports it).
def _torch_cross_entropy(x, t, label_smoothing=0.0):
    import torch.nn.functional as F
    return F.cross_entropy(x, t, label_smoothing=label_smoothing)


def _torch_smooth_l1(p, t):
    import torch.nn.functional as F
    return F.smooth_l1_loss(p, t, beta=SMOOTH_L1_BETA)


def _torch_huber(p, t):
    import torch.nn.functional as F
    return F.huber_loss(p, t, delta=HUBER_DELTA)


LOSSES = {
    spec.name: spec
    for spec in [
        LossSpec(
            name="cross_entropy",
            rowwise=True,
            ours=lambda x, t, reduction="mean": fl.cross_entropy(
                x, t, label_smoothing=LABEL_SMOOTHING, reduction=reduction
            ),
            reference=lambda x, t, reduction="mean": mlx_losses.cross_entropy(
                x, t, label_smoothing=LABEL_SMOOTHING, reduction=reduction
            ),
            reference_name="mlx.nn.losses.cross_entropy(label_smoothing=0.1)",
            make_inputs=_logits_and_class_targets,
            torch=lambda x, t: _torch_cross_entropy(x, t, label_smoothing=LABEL_SMOOTHING),
        ),
        LossSpec(
            name="cross_entropy_hard",
            rowwise=True,
            ours=lambda x, t, reduction="mean": fl.cross_entropy(x, t, reduction=reduction),
            reference=_fast_cross_entropy,
            reference_name="mx.fast.cross_entropy (hard targets)",
            make_inputs=_logits_and_class_targets,
            torch=_torch_cross_entropy,
            sweeps={"full": [(4096, 32768)], "quick": [(1024, 8192)], "smoke": [(64, 512)]},
            small_shape_references={
                "mlx.nn.losses": lambda x, t, reduction="mean": mlx_losses.cross_entropy(x, t, reduction=reduction),
            },
        ),
        LossSpec(
            name="smooth_l1",
            rowwise=False,
            ours=lambda p, t, reduction="mean": fl.smooth_l1_loss(p, t, beta=SMOOTH_L1_BETA, reduction=reduction),
            reference=lambda p, t, reduction="mean": mlx_losses.smooth_l1_loss(
                p, t, beta=SMOOTH_L1_BETA, reduction=reduction
            ),
            reference_name="mlx.nn.losses.smooth_l1_loss",
            make_inputs=_predictions_and_targets,
            torch=_torch_smooth_l1,
        ),
        LossSpec(
            name="huber",
            rowwise=False,
            ours=lambda p, t, reduction="mean": fl.huber_loss(p, t, delta=HUBER_DELTA, reduction=reduction),
            reference=lambda p, t, reduction="mean": mlx_losses.huber_loss(
                p, t, delta=HUBER_DELTA, reduction=reduction
            ),
            reference_name="mlx.nn.losses.huber_loss",
            make_inputs=_predictions_and_targets,
            torch=_torch_huber,
        ),
        LossSpec(
            name="sigmoid_focal",
            rowwise=False,
            ours=lambda x, t, reduction="mean": fl.sigmoid_focal_loss(
                x, t, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction=reduction
            ),
            reference=composed_sigmoid_focal,
            reference_name="composed MLX formula (torchvision semantics)",
            make_inputs=_logits_and_binary_targets,
        ),
        LossSpec(
            name="softmax_focal",
            rowwise=True,
            ours=lambda x, t, reduction="mean": fl.softmax_focal_loss(
                x, t, gamma=FOCAL_GAMMA, reduction=reduction
            ),
            reference=composed_softmax_focal,
            reference_name="composed MLX formula",
            make_inputs=_logits_and_class_targets,
        ),
        LossSpec(
            name="kl_div",
            rowwise=True,
            ours=lambda s, t, reduction="mean": fl.kl_div(s, t, reduction=reduction),
            reference=composed_kl_div,
            reference_name="mlx_lm.tuner.losses.kl_div_loss",
            make_inputs=_student_and_teacher,
            sweeps=DISTILL_SWEEPS,
        ),
        LossSpec(
            name="jsd",
            rowwise=True,
            ours=lambda s, t, reduction="mean": fl.jsd(s, t, reduction=reduction),
            reference=composed_jsd,
            reference_name="mlx_lm.tuner.losses.js_div_loss",
            make_inputs=_student_and_teacher,
            sweeps=DISTILL_SWEEPS,
        ),
        LossSpec(
            name="linear_cross_entropy",
            rowwise=True,
            ours=linear.ours,
            reference=linear.composed,
            reference_name="mlx.nn.losses.cross_entropy(h @ W.T, t) (composed)",
            make_inputs=linear.make_inputs,
            sweeps=LINEAR_SWEEPS,
            dtype_names=("float32",),
            grad_argnums=(0, 1),
            roofline=linear.gemm_yardstick,
            flops=linear.flops,
            extras=linear.extra_baselines,
        ),
        LossSpec(
            name="linear_log_probs",
            rowwise=True,
            ours=log_probs.ours,
            reference=log_probs.composed,
            reference_name="take_along_axis(log_softmax(h @ W.T), t) (composed)",
            make_inputs=linear.make_inputs,
            sweeps=LINEAR_SWEEPS,
            dtype_names=("float32",),
            grad_argnums=(0, 1),
            roofline=linear.gemm_yardstick,
            flops=linear.flops,
            extras=log_probs.extra_baselines,
        ),
        LossSpec(
            name="linear_dpo",
            rowwise=True,
            ours=alignment.dpo_ours,
            reference=alignment.dpo_composed,
            reference_name="DPO on log_softmax(h @ W.T) (composed), reference model scored too",
            make_inputs=alignment.make_inputs,
            sweeps=LINEAR_SWEEPS,
            dtype_names=("float32",),
            grad_argnums=(0, 1),
            roofline=alignment.gemm_yardstick,
            flops=alignment.flops,
        ),
        LossSpec(
            name="linear_grpo",
            rowwise=True,
            ours=alignment.grpo_ours,
            reference=alignment.grpo_composed,
            reference_name="GRPO (bnpo, k3 KL) on log_softmax(h @ W.T) (composed), reference model scored too",
            make_inputs=alignment.make_inputs,
            sweeps=LINEAR_SWEEPS,
            dtype_names=("float32",),
            grad_argnums=(0, 1),
            roofline=alignment.gemm_yardstick,
            flops=alignment.flops,
        ),
    ]
}

DEFAULT_LOSSES = ["cross_entropy", "cross_entropy_hard", "softmax_focal", "smooth_l1", "huber", "sigmoid_focal",
                  "kl_div", "jsd", "linear_cross_entropy"]


def build_cases(loss_names: Sequence[str], dtype_names: Sequence[str], sweep: str):
    """Cases ordered loss -> dtype -> increasing size (the memory guard relies on it)."""
    cases = []
    for name in loss_names:
        spec = LOSSES[name]
        if spec.sweeps is not None:
            shapes = spec.sweeps[sweep]
        else:
            shapes = ROW_SWEEPS[sweep] if spec.rowwise else [(n,) for n in FLAT_SWEEPS[sweep]]
        for dtype_name in dtype_names:
            if spec.dtype_names is not None and dtype_name not in spec.dtype_names:
                continue
            cases.extend(Case(spec, dtype_name, shape) for shape in shapes)
    return cases
