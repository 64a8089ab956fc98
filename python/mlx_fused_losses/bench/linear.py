"""Linear cross-entropy: the loss of a language-model head, hidden [N, H] and
weight [V, H] in, without the N x V logits.

Baselines, all on the same arrays:

* ``mlx``            - MLX composed: ``mlx.nn.losses.cross_entropy(h @ W.T, t)``;
* ``fl CE on logits`` - our fused ``cross_entropy`` on materialised logits
                        (``h @ W.T`` by MLX);
* ``torch``           - PyTorch when importable: ``F.linear_cross_entropy``
                        where it exists (2.13+), else ``F.cross_entropy(h @ W.T)``;
* ``roofline`` column - the GEMMs an unfused step needs, by NumPy's BLAS
  (OpenBLAS in NumPy's wheels): forward ``h @ W.T``; forward+backward also
  ``G @ W`` and ``G.T @ h`` with an N x V ``G``. "x roofline" is the
  yardstick: time / (those GEMMs).

fwd+bwd differentiates w.r.t. hidden and weight (the weight gradient is the
third GEMM of a training step).
"""

import mlx.core as mx
import mlx.nn.losses as mlx_losses
import numpy as np

import mlx_fused_losses as fl


def make_inputs(shape, dtype):
    tokens, hidden, vocab = shape
    # Scaled so the logits have unit variance, like a trained head's.
    h = (mx.random.normal((tokens, hidden)) / hidden**0.25).astype(dtype)
    w = (mx.random.normal((vocab, hidden)) / hidden**0.25).astype(dtype)
    t = mx.random.randint(0, vocab, (tokens,)).astype(mx.int32)
    return [h, w, t]


def ours(h, w, t, reduction="mean"):
    return fl.linear_cross_entropy(h, w, t, reduction=reduction)


def composed(h, w, t, reduction="mean"):
    return mlx_losses.cross_entropy(h @ w.T, t, reduction=reduction)


def ours_on_logits(h, w, t, reduction="mean"):
    return fl.cross_entropy(h @ w.T, t, reduction=reduction)


def flops(shape, backward: bool) -> int:
    tokens, hidden, vocab = shape
    return (6 if backward else 2) * tokens * hidden * vocab


def gemm_yardstick(inputs, backward: bool):
    """A thunk running the unfused step's GEMMs in NumPy (float32)."""
    h, w = (np.array(a.astype(mx.float32)) for a in inputs[:2])

    def run():
        logits = h @ w.T
        if backward:  # the logits stand in for the N x V gradient G
            _ = logits @ w
            _ = logits.T @ h
        return []

    return run


def _torch_thunk(inputs, backward: bool):
    import torch
    import torch.nn.functional as F

    h, w = (torch.from_numpy(np.array(a.astype(mx.float32))) for a in inputs[:2])
    t = torch.from_numpy(np.array(inputs[2]).astype(np.int64))
    fused = getattr(F, "linear_cross_entropy", None)

    def loss(hh, ww):
        if fused is not None:
            return fused(hh, ww, t)
        return F.cross_entropy(hh @ ww.T, t)

    def run():
        if backward:
            hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss(hh, ww).backward()
        else:
            with torch.no_grad():
                loss(h, w)
        return []

    return run


def extra_baselines(inputs, backward: bool):
    """{name: (thunk, counts MLX memory)}: our CE on MLX's logits, and torch
    when it is installed (its memory is not MLX's: no peak reported)."""
    argnums = (0, 1)
    on_logits = mx.value_and_grad(ours_on_logits, argnums=argnums) if backward else ours_on_logits
    extras = {"fl CE on logits": (lambda: on_logits(*inputs), True)}
    try:
        import torch  # noqa: F401
    except ImportError:
        return extras
    import torch.nn.functional as F

    name = "torch F.linear_cross_entropy" if hasattr(F, "linear_cross_entropy") else "torch composed"
    extras[name] = (_torch_thunk(inputs, backward), False)
    return extras
