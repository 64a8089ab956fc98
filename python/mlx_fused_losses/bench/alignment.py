"""Preference and RL losses on a language-model head: a DPO and a GRPO step
from hidden states, the reference model's too, without the logits.

Shapes are the linear cross-entropy's (tokens N, hidden H, vocabulary V): the
N policy tokens are sequences of ``T = min(64, N // 2)`` tokens (DPO: half
chosen, half rejected), every token counted; the reference model's hidden
states are another N x H array, scored forward only.

* ``ours``  - ``linear_dpo_loss`` (sigmoid, beta 0.1) / ``linear_grpo_loss``
  (on-policy, ``loss_type="bnpo"``, beta 0.04 to the reference) with the
  reference from its hidden states;
* ``mlx``   - the same step composed the usual way: the materialised logits,
  ``log_softmax``, the loss formula (``reduction="none"`` gives the per-pair /
  per-token losses whose mean is the loss, for the value check).

fwd+bwd differentiates w.r.t. the policy's hidden states and the head. The
yardstick is the unfused step's GEMMs (linear.py's) plus the reference's
forward GEMM.
"""

import mlx.core as mx
import mlx.nn as nn

import mlx_fused_losses as fl
from . import linear

DPO_BETA = 0.1
GRPO_BETA = 0.04


def _sequences(tokens):
    length = min(64, max(1, tokens // 2))
    return tokens // length, length


def make_inputs(shape, dtype):
    """[hidden [B, T, H], weight [V, H], targets [B, T], reference hidden [B, T, H],
    advantages [B]]: the policy's and the reference's hidden states (nearby)."""
    tokens, hidden, vocab = shape
    rows, length = _sequences(tokens)
    h, w, _ = linear.make_inputs((rows * length, hidden, vocab), dtype)
    h = h.reshape(rows, length, hidden)
    h_ref = (h.astype(mx.float32) + 0.1 * mx.random.normal(h.shape) / hidden**0.25).astype(dtype)
    t = mx.random.randint(0, vocab, (rows, length)).astype(mx.int32)
    advantages = mx.random.normal((rows,))
    return [h, w, t, h_ref, advantages]


def _materialised_log_probs(h, w, t):
    logits = (h @ w.T).astype(mx.float32)
    return mx.take_along_axis(nn.log_softmax(logits, axis=-1), t[..., None], axis=-1)[..., 0]


def _reduce(losses, reduction):
    return losses.mean() if reduction == "mean" else losses.reshape(-1)


def dpo_ours(h, w, t, h_ref, advantages, reduction="mean"):
    pairs = h.shape[0] // 2
    loss, _ = fl.linear_dpo_loss(h[:pairs], h[pairs:], w, t[:pairs], t[pairs:], ref_chosen_hidden=h_ref[:pairs],
                                 ref_rejected_hidden=h_ref[pairs:], beta=DPO_BETA)
    return loss


def dpo_composed(h, w, t, h_ref, advantages, reduction="mean"):
    pairs = h.shape[0] // 2
    scores = _materialised_log_probs(h, w, t).sum(-1)
    ref_scores = mx.stop_gradient(_materialised_log_probs(h_ref, w, t).sum(-1))
    margin = (scores[:pairs] - ref_scores[:pairs]) - (scores[pairs:] - ref_scores[pairs:])
    return _reduce(-nn.log_sigmoid(DPO_BETA * margin), reduction)


def grpo_ours(h, w, t, h_ref, advantages, reduction="mean"):
    loss, _ = fl.linear_grpo_loss(h, w, t, advantages, ref_hidden=h_ref, beta=GRPO_BETA, loss_type="bnpo")
    return loss


def grpo_composed(h, w, t, h_ref, advantages, reduction="mean"):
    log_probs = _materialised_log_probs(h, w, t)
    ref = mx.stop_gradient(_materialised_log_probs(h_ref, w, t))
    ratio = mx.exp(log_probs - mx.stop_gradient(log_probs))
    a = advantages[:, None]
    per_token = -mx.minimum(ratio * a, mx.clip(ratio, 0.8, 1.2) * a)
    delta = ref - log_probs
    return _reduce(per_token + GRPO_BETA * (mx.exp(delta) - delta - 1), reduction)


def flops(shape, backward: bool) -> int:
    tokens, hidden, vocab = shape
    return linear.flops(shape, backward) + 2 * tokens * hidden * vocab  # + the reference's forward


def gemm_yardstick(inputs, backward: bool):
    """The unfused step's GEMMs: the policy's (linear.gemm_yardstick) and the
    reference's forward."""
    h, w, _, h_ref = inputs[:4]
    policy = linear.gemm_yardstick([h.reshape(-1, h.shape[-1]), w], backward)
    reference = linear.gemm_yardstick([h_ref.reshape(-1, h_ref.shape[-1]), w], False)

    def run():
        policy()
        reference()
        return []

    return run
