"""The scorer: per-token log p of a language-model head (hidden [N, H], weight
[V, H]) without the N x V logits, ``fl.linear_log_probs``.

Baselines, all on the same arrays:

* ``mlx``             - MLX composed: ``take_along_axis(log_softmax(h @ W.T), t)``;
* ``fl LCE none``     - our ``linear_cross_entropy(reduction="none")``, the same
                        per-token work (its loss is -log p): the scorer should
                        cost no more;
* ``roofline`` column - the GEMMs an unfused step needs, by NumPy's BLAS (as for
  the linear cross-entropy: ``h @ W.T``; forward+backward also ``G @ W`` and
  ``G.T @ h``).

The scalar differentiated is the mean of the per-token values: each token's
cotangent is its own (1 / N), so the backward is the recomputing one, as for
any per-token loss (a preference or RL loss on top), and fwd+bwd is four GEMMs
of work against the yardstick's three.
"""

import mlx.core as mx

import mlx_fused_losses as fl


def ours(h, w, t, reduction="mean"):
    lp = fl.linear_log_probs(h, w, t)
    return lp.mean() if reduction == "mean" else lp


def composed(h, w, t, reduction="mean"):
    z = h @ w.T
    lp = mx.take_along_axis(z - mx.logsumexp(z, axis=-1, keepdims=True), t[:, None], axis=-1)[:, 0]
    return lp.mean() if reduction == "mean" else lp


def extra_baselines(inputs, backward: bool):
    """{name: (thunk, counts MLX memory)}: the linear CE's per-row path."""
    t = inputs[2]

    def lce_none(h, w):
        return fl.linear_cross_entropy(h, w, t, reduction="none").mean()

    fn = mx.value_and_grad(lce_none, argnums=(0, 1)) if backward else lce_none
    return {"fl LCE none": (lambda: fn(*inputs[:2]), True)}
