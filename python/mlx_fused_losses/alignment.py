"""Preference and RL losses over per-token log-probabilities: DPO (sigmoid,
robust / label-smoothed, hinge, IPO, reference-free), ORPO, SimPO, CPO, KTO
and the GRPO family (GRPO, BNPO, Dr. GRPO, DAPO aggregation; token- or
sequence-level (GSPO) importance sampling; k3 KL to a reference).

What a trainer has is the policy's per-token log-probabilities ``[B, T]`` of
the tokens it scores, their masks (1 for a completion token, 0 for prompt and
padding) and the reference model's log-probabilities. These functions are the
small formulas on top; the log-probabilities themselves come from
:func:`mlx_fused_losses.linear_log_probs` (or ``log_probs`` on logits) without
an ``N x V`` array, or from wherever the trainer computes them.

The formulas follow the published definitions, with TRL's names for the
options and the logged metrics:

- DPO: Rafailov et al. 2023; cDPO / robust DPO (Chowdhury et al. 2024); IPO
  (Azar et al. 2023); the hinge (SLiC) form.
- ORPO: Hong et al. 2024.  SimPO: Meng et al. 2024.  CPO: Xu et al. 2024.
- KTO: Ethayarajh et al. 2024.
- GRPO: Shao et al. 2024; DAPO (Yu et al. 2025), Dr. GRPO (Liu et al. 2025),
  GSPO (Zheng et al. 2025); the k3 KL estimator (Schulman, "Approximating KL
  divergence").

Every function returns ``(loss, metrics)``: the scalar loss (differentiable
with respect to the policy's log-probabilities) and a dict of scalar metrics,
computed under ``mx.stop_gradient``. Reference and old-policy log-probabilities
are always treated as constants.

Masked positions never reach the arithmetic: they are replaced by 0 before any
formula, so padding that holds ``-inf`` or NaN (a padded row's log-prob is
often garbage) changes neither the loss nor the gradient.
"""

import functools
import inspect
import math
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx

from .losses import _as_array, _float_option, _int_option

Metrics = Dict[str, mx.array]

_DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
_PAIR_LOSS_TYPES = ("sigmoid", "hinge")  # SimPO and CPO
_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_IMPORTANCE_LEVELS = ("token", "sequence")


def _on_stream(fn):
    """Runs ``fn`` with its keyword ``stream`` (a stream or device, like MLX
    ops take) as the default stream: every op of the formula runs there."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        stream = kwargs.get("stream")
        if stream is None:
            return fn(*args, **kwargs)
        with mx.stream(stream):
            return fn(*args, **kwargs)
    return call


# --- argument checks (all before any arithmetic) ----------------------------


def _compute_dtype(*arrays) -> mx.Dtype:
    """float64 when any input is float64 (the tests' precision), else float32:
    half-precision log-probabilities are summed over a sequence in float32."""
    return mx.float64 if any(a is not None and a.dtype == mx.float64 for a in arrays) else mx.float32


def _log_probs(value, name: str, ndim: int = 2) -> mx.array:
    a = _as_array(value, name)
    if not mx.issubdtype(a.dtype, mx.floating):
        raise TypeError(f"{name} must be a floating-point array of log-probabilities, got {a.dtype}")
    if a.ndim != ndim:
        shape = "[B, T]" if ndim == 2 else "[B]"
        raise ValueError(f"{name} must be {shape} (per-token log-probabilities), got shape {tuple(a.shape)}")
    return a


def _mask(value, name: str, like: mx.array, like_name: str) -> mx.array:
    m = _as_array(value, name)
    if tuple(m.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the shape of {like_name}, {tuple(like.shape)}, got {tuple(m.shape)}")
    if m.dtype != mx.bool_ and not (mx.issubdtype(m.dtype, mx.floating) or mx.issubdtype(m.dtype, mx.integer)):
        raise TypeError(f"{name} must be bool or numeric (1 = scored token), got {m.dtype}")
    return m


def _reference(value, name: str, like: mx.array, like_name: str) -> Optional[mx.array]:
    """A reference (or old-policy) log-prob input: ``like``'s ``[B, T]`` shape
    (per token, reduced with the policy's mask) or ``[B]`` (already per
    sequence). None stays None."""
    if value is None:
        return None
    a = _as_array(value, name)
    if not mx.issubdtype(a.dtype, mx.floating):
        raise TypeError(f"{name} must be a floating-point array of log-probabilities, got {a.dtype}")
    if tuple(a.shape) not in (tuple(like.shape), tuple(like.shape[:1])):
        raise ValueError(f"{name} must have the shape of {like_name}, {tuple(like.shape)} (per token) or "
                         f"{tuple(like.shape[:1])} (per sequence), got {tuple(a.shape)}")
    return a


def _choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _positive(value, name: str) -> float:
    value = _float_option(value, name)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _nonnegative(value, name: str) -> float:
    value = _float_option(value, name)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _label_smoothing(value, loss_type: str) -> float:
    value = _float_option(value, "label_smoothing")
    if loss_type == "robust" and not 0.0 <= value < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {value}")
    if loss_type == "sigmoid" and not 0.0 <= value <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for loss_type='sigmoid', got {value}")
    if loss_type in ("hinge", "ipo") and value != 0.0:
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' and 'robust', not {loss_type!r} "
                         f"(got {value})")
    return value


def _same_batch(a: mx.array, a_name: str, b: mx.array, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} and {b_name} must hold the same number of sequences (pairs): "
                         f"shapes {tuple(a.shape)} and {tuple(b.shape)}")


# --- the shared pieces --------------------------------------------------------


def _masked(log_probs: mx.array, mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """The log-probs with every masked position set to 0: whatever padding
    holds (-inf, NaN) is gone before any formula, also from the gradient."""
    return mx.where(mask.astype(mx.bool_), log_probs.astype(dtype), mx.array(0, dtype))


_SUM_BLOCK = 64


def _row_sum(x: mx.array) -> mx.array:
    """The sum over the last axis, in blocks of 64: MLX's float32 sum over an
    axis adds in order, and 2048 log-probs of ~ -12 drift by ~3e-2 that way
    (the result's own spacing is 2e-3); block sums, then their sum, stay
    within about one rounding of the result (measured: 3e-3)."""
    length = x.shape[-1]
    if length <= _SUM_BLOCK:
        return x.sum(-1)
    pad = -length % _SUM_BLOCK
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, _SUM_BLOCK).sum(-1).sum(-1)


def _counts(mask: mx.array, dtype: mx.Dtype) -> mx.array:
    return mask.astype(mx.bool_).astype(dtype).sum(-1)  # integers: exact up to 2^24 tokens


def _sequence(log_probs: mx.array, mask: mx.array, dtype: mx.Dtype, average: bool) -> mx.array:
    """Per-sequence log-probability ``[B]``: the sum over the mask, or the
    mean (a sequence without tokens gives 0, not NaN)."""
    total = _row_sum(_masked(log_probs, mask, dtype))
    return total / mx.maximum(_counts(mask, dtype), 1) if average else total


def _log_ratio(policy, ref, mask, dtype, average: bool) -> mx.array:
    """Per-sequence ``log pi(y) - log pi_ref(y)`` ``[B]``, the reference a
    constant. A per-token reference is subtracted token by token before the
    sum: both sums are large (~ -12 per token) and nearly equal, so
    subtracting them would leave float32's rounding of each (2e-3 at T = 2048)
    in the ratio."""
    if ref.ndim == 1:  # already per sequence
        return _sequence(policy, mask, dtype, average) - mx.stop_gradient(ref.astype(dtype))
    difference = _masked(policy, mask, dtype) - mx.stop_gradient(_masked(ref, mask, dtype))
    return _sequence(difference, mask, dtype, average)


def _mean(x: mx.array) -> mx.array:
    """The mean over the batch; 0 (and gradient 0) for an empty batch, as
    every loss of the package."""
    return x.sum() / max(x.size, 1)


def _softplus(x: mx.array) -> mx.array:
    """log(1 + e^x) = -log_sigmoid(-x), without overflow."""
    return mx.logaddexp(mx.zeros_like(x), x)


def _log1m_exp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0 (Maechler's split: expm1 near 0, log1p below
    -log 2, each where it keeps its digits)."""
    near_zero = x > -math.log(2.0)
    safe_near = mx.where(near_zero, x, -1.0)  # neither branch sees the other's inputs (no NaN gradient)
    safe_far = mx.where(near_zero, -1.0, x)
    return mx.where(near_zero, mx.log(-mx.expm1(safe_near)), mx.log1p(-mx.exp(safe_far)))


def _nll(log_probs: mx.array, mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """The chosen completions' negative log-likelihood, a mean over all their
    tokens (the NLL term of ORPO and CPO: cross-entropy over the batch)."""
    return -_row_sum(_masked(log_probs, mask, dtype).reshape(-1)) / mx.maximum(_counts(mask, dtype).sum(), 1)


def _sigmoid_preference(logits: mx.array, label_smoothing: float) -> mx.array:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x): the logistic loss with a
    fraction e of the labels assumed flipped (cDPO)."""
    losses = _softplus(-logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * _softplus(logits)
    return losses


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, dtype) -> Metrics:
    chosen_rewards = mx.stop_gradient(chosen_rewards)
    rejected_rewards = mx.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(dtype)),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(mx.stop_gradient(chosen_logps)),
        "logps/rejected": _mean(mx.stop_gradient(rejected_logps)),
    }


def _pair_inputs(chosen_log_probs, rejected_log_probs, chosen_mask, rejected_mask):
    chosen = _log_probs(chosen_log_probs, "chosen_log_probs")
    rejected = _log_probs(rejected_log_probs, "rejected_log_probs")
    _same_batch(chosen, "chosen_log_probs", rejected, "rejected_log_probs")
    chosen_mask = _mask(chosen_mask, "chosen_mask", chosen, "chosen_log_probs")
    rejected_mask = _mask(rejected_mask, "rejected_mask", rejected, "rejected_log_probs")
    return chosen, rejected, chosen_mask, rejected_mask


# --- pairwise preference losses -------------------------------------------------


@_on_stream
def dpo_loss(
    chosen_log_probs: mx.array,
    rejected_log_probs: mx.array,
    chosen_mask: mx.array,
    rejected_mask: mx.array,
    ref_chosen_log_probs: Optional[mx.array] = None,
    ref_rejected_log_probs: Optional[mx.array] = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_probs: Optional[bool] = None,
    reference_free: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """Direct Preference Optimization, the mean over the pairs.

    With per-sequence log-probabilities ``c, r`` (policy, chosen / rejected)
    and ``c0, r0`` (reference), ``h = (c - c0) - (r - r0)``:

    - ``"sigmoid"``: ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``
      (``e = label_smoothing``: cDPO, labels flipped with probability e).
    - ``"robust"``: robust DPO, ``(-(1 - e) log sigmoid(beta h) + e log
      sigmoid(-beta h)) / (1 - 2e)``, ``0 <= e < 0.5``.
    - ``"hinge"``: ``max(0, 1 - beta h)`` (SLiC).
    - ``"ipo"``: ``(h - 1 / (2 beta))^2`` on length-averaged log-probs.

    Args:
        chosen_log_probs, rejected_log_probs: the policy's ``[B, T]``
            per-token log-probabilities (``T`` may differ between the two).
        chosen_mask, rejected_mask: ``[B, T]`` bool or 0/1: the completion
            tokens to count (prompt and padding 0).
        ref_chosen_log_probs, ref_rejected_log_probs: the reference model's,
            per token (``[B, T]``, reduced with the same masks) or per
            sequence (``[B]``, already reduced as ``average_log_probs`` says);
            constants (``mx.stop_gradient``). Required unless
            ``reference_free``.
        beta: the inverse temperature of the implicit reward, > 0.
        loss_type: ``"sigmoid"``, ``"robust"``, ``"hinge"`` or ``"ipo"``.
        label_smoothing: ``e`` for ``"sigmoid"`` (cDPO, ``[0, 0.5]``) and
            ``"robust"`` (``[0, 0.5)``).
        average_log_probs: sequence log-prob as the mean over its tokens
            instead of the sum. Default: True for ``"ipo"``, else False.
        reference_free: the reference is a uniform policy (``c0 = r0 = 0``).

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` (``beta (c - c0)``, mean),
        ``rewards/rejected``, ``rewards/accuracies`` (fraction of pairs with
        chosen reward > rejected), ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected``.
    """
    chosen, rejected, chosen_mask, rejected_mask = _pair_inputs(
        chosen_log_probs, rejected_log_probs, chosen_mask, rejected_mask)
    ref_chosen = _reference(ref_chosen_log_probs, "ref_chosen_log_probs", chosen, "chosen_log_probs")
    ref_rejected = _reference(ref_rejected_log_probs, "ref_rejected_log_probs", rejected, "rejected_log_probs")
    loss_type = _choice(loss_type, "loss_type", _DPO_LOSS_TYPES)
    beta = _positive(beta, "beta")
    label_smoothing = _label_smoothing(label_smoothing, loss_type)
    if not isinstance(reference_free, bool):
        raise TypeError(f"reference_free must be a bool, got {type(reference_free).__name__}")
    if reference_free:
        if ref_chosen is not None or ref_rejected is not None:
            raise ValueError("reference_free=True takes no reference log-probabilities")
    elif ref_chosen is None or ref_rejected is None:
        raise ValueError("dpo_loss needs ref_chosen_log_probs and ref_rejected_log_probs "
                         "(or reference_free=True)")
    average = loss_type == "ipo" if average_log_probs is None else bool(average_log_probs)

    dtype = _compute_dtype(chosen, rejected, ref_chosen, ref_rejected)
    c = _sequence(chosen, chosen_mask, dtype, average)
    r = _sequence(rejected, rejected_mask, dtype, average)
    if reference_free:
        c_ratio, r_ratio = c, r
    else:
        c_ratio = _log_ratio(chosen, ref_chosen, chosen_mask, dtype, average)
        r_ratio = _log_ratio(rejected, ref_rejected, rejected_mask, dtype, average)
    h = c_ratio - r_ratio
    if loss_type == "sigmoid":
        losses = _sigmoid_preference(beta * h, label_smoothing)
    elif loss_type == "robust":
        losses = ((1.0 - label_smoothing) * _softplus(-beta * h)
                  - label_smoothing * _softplus(beta * h)) / (1.0 - 2.0 * label_smoothing)
    elif loss_type == "hinge":
        losses = mx.maximum(1.0 - beta * h, 0.0)
    else:  # ipo
        losses = mx.square(h - 1.0 / (2.0 * beta))
    return _mean(losses), _pair_metrics(beta * c_ratio, beta * r_ratio, c, r, dtype)


@_on_stream
def orpo_loss(
    chosen_log_probs: mx.array,
    rejected_log_probs: mx.array,
    chosen_mask: mx.array,
    rejected_mask: mx.array,
    *,
    beta: float = 0.1,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """Odds Ratio Preference Optimization: ``NLL(chosen) - beta mean(log
    sigmoid(log odds(c) - log odds(r)))``, with ``c, r`` the length-averaged
    log-probs, ``log odds(p) = p - log(1 - e^p)`` and the NLL the mean over all
    chosen tokens. No reference model.

    Returns:
        ``(loss, metrics)``: the pair rewards (``beta c``, ``beta r``) as in
        :func:`dpo_loss`, ``nll_loss``, ``log_odds_ratio`` (mean of ``log
        sigmoid(log odds ratio)``) and ``log_odds_chosen`` (mean log odds ratio).
    """
    chosen, rejected, chosen_mask, rejected_mask = _pair_inputs(
        chosen_log_probs, rejected_log_probs, chosen_mask, rejected_mask)
    beta = _positive(beta, "beta")
    dtype = _compute_dtype(chosen, rejected)
    c = _sequence(chosen, chosen_mask, dtype, True)
    r = _sequence(rejected, rejected_mask, dtype, True)
    log_odds = (c - r) - (_log1m_exp(c) - _log1m_exp(r))
    ratio = -_softplus(-log_odds)  # log sigmoid
    nll = _nll(chosen, chosen_mask, dtype)
    loss = nll - beta * _mean(ratio)
    metrics = _pair_metrics(beta * c, beta * r, c, r, dtype)
    metrics.update({"nll_loss": mx.stop_gradient(nll), "log_odds_ratio": _mean(mx.stop_gradient(ratio)),
                    "log_odds_chosen": _mean(mx.stop_gradient(log_odds))})
    return loss, metrics


def _reference_free_pair(chosen, rejected, chosen_mask, rejected_mask, beta, margin, loss_type,
                         label_smoothing, average):
    """The losses of SimPO and CPO: ``beta (c - r) - margin`` through the
    logistic or hinge loss, per pair; also returns ``c, r``."""
    dtype = _compute_dtype(chosen, rejected)
    c = _sequence(chosen, chosen_mask, dtype, average)
    r = _sequence(rejected, rejected_mask, dtype, average)
    logits = beta * (c - r) - margin
    if loss_type == "sigmoid":
        losses = _sigmoid_preference(logits, label_smoothing)
    else:
        losses = mx.maximum(1.0 - logits, 0.0)
    return losses, c, r, dtype


@_on_stream
def simpo_loss(
    chosen_log_probs: mx.array,
    rejected_log_probs: mx.array,
    chosen_mask: mx.array,
    rejected_mask: mx.array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """Simple Preference Optimization: ``-log sigmoid(beta (c - r) - gamma)``
    on length-averaged log-probs ``c, r``, no reference (``"hinge"``:
    ``max(0, 1 - (beta (c - r) - gamma))``). ``label_smoothing`` as in
    :func:`dpo_loss`'s ``"sigmoid"``. Mean over the pairs.

    Returns:
        ``(loss, metrics)``: the pair metrics of :func:`dpo_loss` with rewards
        ``beta c`` and ``beta r``.
    """
    chosen, rejected, chosen_mask, rejected_mask = _pair_inputs(
        chosen_log_probs, rejected_log_probs, chosen_mask, rejected_mask)
    beta = _positive(beta, "beta")
    gamma = _float_option(gamma, "gamma")
    loss_type = _choice(loss_type, "loss_type", _PAIR_LOSS_TYPES)
    label_smoothing = _label_smoothing(label_smoothing, loss_type)
    losses, c, r, dtype = _reference_free_pair(chosen, rejected, chosen_mask, rejected_mask, beta, gamma,
                                               loss_type, label_smoothing, True)
    return _mean(losses), _pair_metrics(beta * c, beta * r, c, r, dtype)


@_on_stream
def cpo_loss(
    chosen_log_probs: mx.array,
    rejected_log_probs: mx.array,
    chosen_mask: mx.array,
    rejected_mask: mx.array,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_probs: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """Contrastive Preference Optimization: ``mean(-log sigmoid(beta (c -
    r))) + alpha NLL(chosen)``, ``c, r`` summed log-probs (or averaged with
    ``average_log_probs``), the NLL the mean over all chosen tokens;
    ``"hinge"``: ``max(0, 1 - beta (c - r))``. No reference.

    Returns:
        ``(loss, metrics)``: the pair metrics of :func:`dpo_loss` with rewards
        ``beta c`` and ``beta r``, and ``nll_loss``.
    """
    chosen, rejected, chosen_mask, rejected_mask = _pair_inputs(
        chosen_log_probs, rejected_log_probs, chosen_mask, rejected_mask)
    beta = _positive(beta, "beta")
    alpha = _nonnegative(alpha, "alpha")
    loss_type = _choice(loss_type, "loss_type", _PAIR_LOSS_TYPES)
    label_smoothing = _label_smoothing(label_smoothing, loss_type)
    losses, c, r, dtype = _reference_free_pair(chosen, rejected, chosen_mask, rejected_mask, beta, 0.0,
                                               loss_type, label_smoothing, bool(average_log_probs))
    nll = _nll(chosen, chosen_mask, dtype)
    metrics = _pair_metrics(beta * c, beta * r, c, r, dtype)
    metrics["nll_loss"] = mx.stop_gradient(nll)
    return _mean(losses) + alpha * nll, metrics


# --- unpaired preference --------------------------------------------------------


@_on_stream
def kto_loss(
    log_probs: mx.array,
    mask: mx.array,
    desirable: mx.array,
    ref_log_probs: mx.array,
    *,
    beta: float = 0.1,
    kl: Union[float, mx.array] = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """Kahneman-Tversky Optimization on unpaired completions, the mean over
    them: with ``h = s - s0`` (policy minus reference summed log-prob),
    a desirable completion costs ``desirable_weight (1 - sigmoid(beta (h -
    kl)))``, an undesirable one ``undesirable_weight (1 - sigmoid(beta (kl -
    h)))``.

    Args:
        log_probs, mask: the policy's ``[B, T]`` log-probs and their mask.
        desirable: ``[B]`` bool: which completions are desirable.
        ref_log_probs: the reference's, ``[B, T]`` or ``[B]`` (a constant).
        kl: the reference point ``z0``, an estimate of KL(policy || reference)
            (KTO estimates it from mismatched prompt/completion pairs; TRL
            clamps it at 0), a constant; 0 by default.

    Returns:
        ``(loss, metrics)``: ``rewards/chosen`` and ``rewards/rejected`` (mean
        ``beta h`` over the desirable / undesirable completions; 0 when there
        are none), ``kl``.
    """
    lp = _log_probs(log_probs, "log_probs")
    m = _mask(mask, "mask", lp, "log_probs")
    ref = _reference(ref_log_probs, "ref_log_probs", lp, "log_probs")
    if ref is None:
        raise ValueError("kto_loss needs ref_log_probs")
    good = _as_array(desirable, "desirable")
    if good.dtype != mx.bool_:
        raise TypeError(f"desirable must be a bool array, got {good.dtype}")
    if tuple(good.shape) != tuple(lp.shape[:1]):
        raise ValueError(f"desirable must be [B] = {tuple(lp.shape[:1])} (one flag per completion), "
                         f"got {tuple(good.shape)}")
    beta = _positive(beta, "beta")
    desirable_weight = _nonnegative(desirable_weight, "desirable_weight")
    undesirable_weight = _nonnegative(undesirable_weight, "undesirable_weight")
    if not isinstance(kl, mx.array):
        kl = _float_option(kl, "kl")
    elif kl.size != 1:
        raise ValueError(f"kl must be a scalar, got shape {tuple(kl.shape)}")

    dtype = _compute_dtype(lp, ref)
    kl = mx.stop_gradient(mx.array(kl, dtype).reshape(()) if not isinstance(kl, mx.array)
                          else kl.astype(dtype).reshape(()))
    h = _log_ratio(lp, ref, m, dtype, False)
    losses = mx.where(good, desirable_weight * (1.0 - mx.sigmoid(beta * (h - kl))),
                      undesirable_weight * (1.0 - mx.sigmoid(beta * (kl - h))))
    rewards = mx.stop_gradient(beta * h)
    n_good = good.astype(dtype).sum()
    n_bad = good.size - n_good
    metrics = {
        "rewards/chosen": mx.where(good, rewards, 0).sum() / mx.maximum(n_good, 1),
        "rewards/rejected": mx.where(good, 0, rewards).sum() / mx.maximum(n_bad, 1),
        "kl": kl,
    }
    return _mean(losses), metrics


# --- the GRPO family --------------------------------------------------------------


@_on_stream
def grpo_loss(
    log_probs: mx.array,
    mask: mx.array,
    advantages: mx.array,
    old_log_probs: Optional[mx.array] = None,
    ref_log_probs: Optional[mx.array] = None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[int] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Tuple[mx.array, Metrics]:
    """The clipped policy-gradient loss of GRPO and its variants.

    Per token: ``w = exp(lp - old)`` (``"token"``), or for GSPO
    (``"sequence"``) one ``w`` per completion, ``exp`` of the mask-mean of
    ``lp - old``; ``L = -min(w A, clip(w, 1 - epsilon_low, 1 + epsilon_high)
    A) + beta k3``, ``k3 = exp(ref - lp) - (ref - lp) - 1`` (an unbiased
    estimate of KL(policy || reference)). Aggregation over the masked tokens:

    - ``"grpo"``: each completion's token mean, then the mean over completions.
    - ``"bnpo"``: the mean over all tokens of the batch.
    - ``"dr_grpo"``: the sum over ``B * max_completion_length`` (default ``T``).
    - ``"dapo"``: the sum over ``num_items_in_batch`` (the token count of the
      whole generation batch, across gradient-accumulation steps; default
      this batch's count, then equal to ``"bnpo"``).

    Args:
        log_probs, mask: the policy's ``[B, T]`` log-probs and their mask.
        advantages: ``[B]`` (one per completion) or ``[B, T]``.
        old_log_probs: the sampling policy's ``[B, T]`` log-probs (a
            constant); None: on-policy (``old = stop_gradient(lp)``, ``w = 1``).
        ref_log_probs: the reference's ``[B, T]`` log-probs, needed when
            ``beta > 0``.
        beta: the KL coefficient (>= 0; TRL's default 0).
        epsilon_low, epsilon_high: the clipping range; ``epsilon_high``
            defaults to ``epsilon_low`` (DAPO's clip-higher: larger).

    Returns:
        ``(loss, metrics)``: ``clip_ratio/low_mean`` (tokens with ``w < 1 -
        epsilon_low`` and ``A < 0``), ``clip_ratio/high_mean`` (``w > 1 +
        epsilon_high`` and ``A > 0``), ``clip_ratio/region_mean`` (either),
        fractions of the masked tokens; ``kl`` (the masked token mean of
        ``k3``) when ``ref_log_probs`` is given.
    """
    lp = _log_probs(log_probs, "log_probs")
    m = _mask(mask, "mask", lp, "log_probs")
    adv = _as_array(advantages, "advantages")
    if not mx.issubdtype(adv.dtype, mx.floating):
        raise TypeError(f"advantages must be floating-point, got {adv.dtype}")
    if tuple(adv.shape) not in (tuple(lp.shape[:1]), tuple(lp.shape)):
        raise ValueError(f"advantages must be [B] = {tuple(lp.shape[:1])} or [B, T] = {tuple(lp.shape)}, "
                         f"got {tuple(adv.shape)}")
    old = None if old_log_probs is None else _log_probs(old_log_probs, "old_log_probs")
    ref = None if ref_log_probs is None else _log_probs(ref_log_probs, "ref_log_probs")
    for name, a in (("old_log_probs", old), ("ref_log_probs", ref)):
        if a is not None and tuple(a.shape) != tuple(lp.shape):
            raise ValueError(f"{name} must have the shape of log_probs, {tuple(lp.shape)}, got {tuple(a.shape)}")
    beta = _nonnegative(beta, "beta")
    if beta > 0 and ref is None:
        raise ValueError(f"beta={beta} > 0 needs ref_log_probs (the KL term's reference)")
    epsilon_low = _nonnegative(epsilon_low, "epsilon_low")
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low must be in [0, 1) (the lower clip bound 1 - epsilon_low > 0), "
                         f"got {epsilon_low}")
    epsilon_high = epsilon_low if epsilon_high is None else _nonnegative(epsilon_high, "epsilon_high")
    loss_type = _choice(loss_type, "loss_type", _GRPO_LOSS_TYPES)
    level = _choice(importance_sampling_level, "importance_sampling_level", _IMPORTANCE_LEVELS)
    if max_completion_length is not None:
        max_completion_length = _int_option(max_completion_length, "max_completion_length")
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")
        if loss_type != "dr_grpo":
            raise ValueError("max_completion_length applies to loss_type='dr_grpo' only")
    if num_items_in_batch is not None:
        num_items_in_batch = _int_option(num_items_in_batch, "num_items_in_batch")
        if num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
        if loss_type != "dapo":
            raise ValueError("num_items_in_batch applies to loss_type='dapo' only")

    dtype = _compute_dtype(lp, adv, old, ref)
    keep = m.astype(mx.bool_)
    weight = keep.astype(dtype)
    lp = _masked(lp, keep, dtype)
    old = mx.stop_gradient(lp) if old is None else mx.stop_gradient(_masked(old, keep, dtype))
    adv = adv.astype(dtype)
    if adv.ndim == 1:
        adv = adv[:, None]
    counts = weight.sum(-1)
    tokens = mx.maximum(counts.sum(), 1)

    log_ratio = lp - old
    if level == "sequence":  # GSPO: one ratio per completion, the geometric mean of its tokens'
        log_ratio = (_row_sum(log_ratio) / mx.maximum(counts, 1))[:, None]
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref is not None:
        delta = mx.stop_gradient(_masked(ref, keep, dtype)) - lp
        kl = mx.exp(delta) - delta - 1.0
        if beta > 0:
            per_token = per_token + beta * kl
    per_token = per_token * weight  # also broadcasts a sequence-level term over its tokens

    sums = _row_sum(per_token)
    if loss_type == "grpo":
        loss = _mean(sums / mx.maximum(counts, 1))
    elif loss_type == "bnpo":
        loss = sums.sum() / tokens
    elif loss_type == "dr_grpo":
        length = lp.shape[1] if max_completion_length is None else max_completion_length
        loss = sums.sum() / max(lp.shape[0] * length, 1)
    else:  # dapo
        loss = sums.sum() / (tokens if num_items_in_batch is None else num_items_in_batch)

    ratio = mx.stop_gradient(ratio)
    low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).astype(dtype) * weight
    high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).astype(dtype) * weight
    metrics = {
        "clip_ratio/low_mean": low.sum() / tokens,
        "clip_ratio/high_mean": high.sum() / tokens,
        "clip_ratio/region_mean": (low + high).sum() / tokens,
    }
    if kl is not None:
        metrics["kl"] = mx.stop_gradient(kl * weight).sum() / tokens
    return loss, metrics


# --- linear forms: hidden states and the output head, no logits ----------------------
#
# Each scores its tokens with linear_log_probs (one chunk of logits alive at a
# time, forward and backward) and hands the log-probs to the loss above. The
# head's options (temperature, logit_softcap, chunk_bytes and the quantized
# head's scales/biases/group_size/bits/mode/global_scale) are passed through to
# the scorer by name; they are checked against its signature here, so a
# misspelt loss option is reported as this function's.


def _head_options(head: dict, fn_name: str) -> dict:
    from . import linear_log_probs

    allowed = set(inspect.signature(linear_log_probs).parameters) - {
        "hidden", "weight", "targets", "bias", "return_entropy", "ignore_index", "stream"}
    unknown = sorted(set(head) - allowed)
    if unknown:
        raise TypeError(f"{fn_name}() got unexpected keyword argument(s) {', '.join(unknown)} (its head options "
                        f"are those of linear_log_probs: {', '.join(sorted(allowed))})")
    return head


def _token_mask(targets, mask, ignore_index, targets_name: str, mask_name: str) -> mx.array:
    """The tokens to count: ``mask`` (and not ``ignore_index``) when given,
    else the targets that are not ``ignore_index`` (all of them without one)."""
    targets = _as_array(targets, targets_name)
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"{targets_name} must be integer token ids, got {targets.dtype}")
    if targets.ndim != 2:
        raise ValueError(f"{targets_name} must be [B, T] token ids, got shape {tuple(targets.shape)}")
    kept = None if ignore_index is None else targets != ignore_index
    if mask is None:
        return mx.ones(targets.shape, mx.bool_) if kept is None else kept
    mask = _mask(mask, mask_name, targets, targets_name).astype(mx.bool_)
    return mask if kept is None else mask & kept


def _check_hidden(hidden, targets, hidden_name: str, targets_name: str) -> mx.array:
    hidden = _as_array(hidden, hidden_name)
    targets = _as_array(targets, targets_name)
    if hidden.ndim != 3 or tuple(hidden.shape[:2]) != tuple(targets.shape):
        raise ValueError(f"{hidden_name} must be [B, T, H] with {targets_name}'s [B, T] = {tuple(targets.shape)}, "
                         f"got {tuple(hidden.shape)}")
    return hidden


def _score(hidden, weight, targets, bias, ignore_index, head) -> mx.array:
    from . import linear_log_probs

    return linear_log_probs(hidden, weight, targets, bias, ignore_index=ignore_index, **head)


def _reference_scores(given, ref_hidden, targets, weight, bias, ref_weight, ref_bias, ignore_index, head,
                      given_name: str, hidden_name: str, targets_name: str):
    """The reference log-probs: given (``[B, T]`` or ``[B]``), or scored from
    the reference model's hidden states with its head (default: the policy's,
    as a frozen or LoRA-adapted head is shared) under ``mx.stop_gradient``."""
    if given is not None and ref_hidden is not None:
        raise ValueError(f"give {given_name} or {hidden_name}, not both")
    if ref_hidden is None:
        return given
    ref_hidden = _check_hidden(ref_hidden, targets, hidden_name, targets_name)
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    elif any(head.get(k) is not None for k in ("scales", "biases", "global_scale")):
        raise ValueError("ref_weight with a quantized policy head is not supported: the quantization arguments "
                         "describe one head (leave ref_weight out to score the reference with the policy's head)")
    return mx.stop_gradient(_score(ref_hidden, ref_weight, targets, ref_bias, ignore_index, head))


def _pair_scores(chosen_hidden, rejected_hidden, weight, chosen_targets, rejected_targets, bias, chosen_mask,
                 rejected_mask, ignore_index, head, fn_name):
    """The policy's per-token log-probs and masks of a pair batch (checked
    before the scorer runs)."""
    head = _head_options(head, fn_name)
    ignore_index = None if ignore_index is None else _int_option(ignore_index, "ignore_index")
    cm = _token_mask(chosen_targets, chosen_mask, ignore_index, "chosen_targets", "chosen_mask")
    rm = _token_mask(rejected_targets, rejected_mask, ignore_index, "rejected_targets", "rejected_mask")
    _same_batch(cm, "chosen_targets", rm, "rejected_targets")
    ch = _check_hidden(chosen_hidden, chosen_targets, "chosen_hidden", "chosen_targets")
    rh = _check_hidden(rejected_hidden, rejected_targets, "rejected_hidden", "rejected_targets")
    return ch, rh, cm, rm, ignore_index, head


@_on_stream
def linear_dpo_loss(
    chosen_hidden: mx.array,
    rejected_hidden: mx.array,
    weight: mx.array,
    chosen_targets: mx.array,
    rejected_targets: mx.array,
    bias: Optional[mx.array] = None,
    *,
    chosen_mask: Optional[mx.array] = None,
    rejected_mask: Optional[mx.array] = None,
    ignore_index: Optional[int] = None,
    ref_chosen_log_probs: Optional[mx.array] = None,
    ref_rejected_log_probs: Optional[mx.array] = None,
    ref_chosen_hidden: Optional[mx.array] = None,
    ref_rejected_hidden: Optional[mx.array] = None,
    ref_weight: Optional[mx.array] = None,
    ref_bias: Optional[mx.array] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_log_probs: Optional[bool] = None,
    reference_free: bool = False,
    stream: Union[None, mx.Stream, mx.Device] = None,
    **head,
) -> Tuple[mx.array, Metrics]:
    """:func:`dpo_loss` on the policy's hidden states ``[B, T, H]`` and output
    head (``weight``, ``bias`` and the head options of
    :func:`mlx_fused_losses.linear_log_probs` as keywords: ``temperature``,
    ``logit_softcap``, ``chunk_bytes``, the quantized head's arguments),
    scored by ``linear_log_probs`` without the logits.

    Masks: ``chosen_mask`` / ``rejected_mask`` (``[B, T]``), and targets equal
    to ``ignore_index`` do not count; without masks every token that is not
    ``ignore_index`` counts. The reference: its log-probs
    (``ref_*_log_probs``, as in :func:`dpo_loss`), or its hidden states
    (``ref_*_hidden``) scored under ``mx.stop_gradient`` with ``ref_weight``
    / ``ref_bias`` (default: the policy's head, with the same options), or
    ``reference_free=True``.
    """
    ch, rh, cm, rm, ignore_index, head = _pair_scores(
        chosen_hidden, rejected_hidden, weight, chosen_targets, rejected_targets, bias, chosen_mask,
        rejected_mask, ignore_index, head, "linear_dpo_loss")
    ref_c = _reference_scores(ref_chosen_log_probs, ref_chosen_hidden, chosen_targets, weight, bias, ref_weight,
                              ref_bias, ignore_index, head, "ref_chosen_log_probs", "ref_chosen_hidden",
                              "chosen_targets")
    ref_r = _reference_scores(ref_rejected_log_probs, ref_rejected_hidden, rejected_targets, weight, bias,
                              ref_weight, ref_bias, ignore_index, head, "ref_rejected_log_probs",
                              "ref_rejected_hidden", "rejected_targets")
    c = _score(ch, weight, chosen_targets, bias, ignore_index, head)
    r = _score(rh, weight, rejected_targets, bias, ignore_index, head)
    return dpo_loss(c, r, cm, rm, ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                    average_log_probs=average_log_probs, reference_free=reference_free)


def _linear_reference_free_pair(loss_fn, fn_name):
    """The linear form of a pair loss without a reference (ORPO, SimPO, CPO)."""

    @_on_stream
    def linear_form(chosen_hidden, rejected_hidden, weight, chosen_targets, rejected_targets, bias=None, *,
                    chosen_mask=None, rejected_mask=None, ignore_index=None, stream=None, **options):
        loss_options = {k: options.pop(k) for k in list(options)
                        if k in inspect.signature(loss_fn).parameters and k != "stream"}
        ch, rh, cm, rm, ignore_index, head = _pair_scores(
            chosen_hidden, rejected_hidden, weight, chosen_targets, rejected_targets, bias, chosen_mask,
            rejected_mask, ignore_index, options, fn_name)
        c = _score(ch, weight, chosen_targets, bias, ignore_index, head)
        r = _score(rh, weight, rejected_targets, bias, ignore_index, head)
        return loss_fn(c, r, cm, rm, **loss_options)

    linear_form.__name__ = linear_form.__qualname__ = fn_name
    linear_form.__doc__ = (
        f":func:`{loss_fn.__name__}` on the policy's hidden states ``[B, T, H]`` and output head,\n"
        f"scored by :func:`mlx_fused_losses.linear_log_probs` without the logits:\n\n"
        f"    {fn_name}(chosen_hidden, rejected_hidden, weight, chosen_targets, rejected_targets,\n"
        f"        bias=None, *, chosen_mask=None, rejected_mask=None, ignore_index=None,\n"
        f"        <{loss_fn.__name__}'s options>, stream=None, <head options>)\n\n"
        f"Masks and head options as :func:`linear_dpo_loss`.")
    return linear_form


linear_orpo_loss = _linear_reference_free_pair(orpo_loss, "linear_orpo_loss")
linear_simpo_loss = _linear_reference_free_pair(simpo_loss, "linear_simpo_loss")
linear_cpo_loss = _linear_reference_free_pair(cpo_loss, "linear_cpo_loss")


@_on_stream
def linear_kto_loss(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    desirable: mx.array,
    bias: Optional[mx.array] = None,
    *,
    mask: Optional[mx.array] = None,
    ignore_index: Optional[int] = None,
    ref_log_probs: Optional[mx.array] = None,
    ref_hidden: Optional[mx.array] = None,
    ref_weight: Optional[mx.array] = None,
    ref_bias: Optional[mx.array] = None,
    beta: float = 0.1,
    kl: Union[float, mx.array] = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    stream: Union[None, mx.Stream, mx.Device] = None,
    **head,
) -> Tuple[mx.array, Metrics]:
    """:func:`kto_loss` on hidden states ``[B, T, H]`` and the output head,
    scored by :func:`mlx_fused_losses.linear_log_probs`; masks, reference and
    head options as :func:`linear_dpo_loss`."""
    head = _head_options(head, "linear_kto_loss")
    ignore_index = None if ignore_index is None else _int_option(ignore_index, "ignore_index")
    m = _token_mask(targets, mask, ignore_index, "targets", "mask")
    h = _check_hidden(hidden, targets, "hidden", "targets")
    ref = _reference_scores(ref_log_probs, ref_hidden, targets, weight, bias, ref_weight, ref_bias, ignore_index,
                            head, "ref_log_probs", "ref_hidden", "targets")
    if ref is None:
        raise ValueError("linear_kto_loss needs ref_log_probs or ref_hidden")
    lp = _score(h, weight, targets, bias, ignore_index, head)
    return kto_loss(lp, m, desirable, ref, beta=beta, kl=kl, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)


@_on_stream
def linear_grpo_loss(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    advantages: mx.array,
    bias: Optional[mx.array] = None,
    *,
    mask: Optional[mx.array] = None,
    ignore_index: Optional[int] = None,
    old_log_probs: Optional[mx.array] = None,
    ref_log_probs: Optional[mx.array] = None,
    ref_hidden: Optional[mx.array] = None,
    ref_weight: Optional[mx.array] = None,
    ref_bias: Optional[mx.array] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[int] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
    **head,
) -> Tuple[mx.array, Metrics]:
    """:func:`grpo_loss` on the completions' hidden states ``[B, T, H]`` and
    the output head, scored by :func:`mlx_fused_losses.linear_log_probs`
    without the logits. ``old_log_probs`` as in :func:`grpo_loss` (the
    sampling policy's, ``[B, T]``; None: on-policy); the reference (needed
    when ``beta > 0``), masks and head options as :func:`linear_dpo_loss`.
    """
    head = _head_options(head, "linear_grpo_loss")
    ignore_index = None if ignore_index is None else _int_option(ignore_index, "ignore_index")
    m = _token_mask(targets, mask, ignore_index, "targets", "mask")
    h = _check_hidden(hidden, targets, "hidden", "targets")
    ref = _reference_scores(ref_log_probs, ref_hidden, targets, weight, bias, ref_weight, ref_bias, ignore_index,
                            head, "ref_log_probs", "ref_hidden", "targets")
    lp = _score(h, weight, targets, bias, ignore_index, head)
    return grpo_loss(lp, m, advantages, old_log_probs, ref, beta=beta, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                     max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
