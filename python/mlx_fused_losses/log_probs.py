"""Per-token log-probabilities and entropy (the scorer of preference and RL
losses), fused: ``log_softmax(z)[target]`` and ``-sum p log p`` of
``z = softcap(logits) / temperature`` per row, where the logits are given
(:func:`log_probs`) or are ``hidden @ weight.T + bias`` and never exist
(:func:`linear_log_probs`, working memory bounded by ``chunk_bytes``).

Both are thin code over the row-statistics primitive (``csrc/ops/row_stats.h``):
``log p = target - lse`` and ``entropy = lse - expected`` (``expected`` =
``E_p[z]``), each statistic with its own per-row cotangent in the backward.
"""

from typing import Literal, Optional, Tuple, Union

import mlx.core as mx

from . import _ext
from .linear_cross_entropy import _quantization_params
from .losses import _as_array, _float_option, _ignore_index_for, _index_option, _int_option


def _scorer_options(temperature, logit_softcap, ignore_index, chunk_bytes=None):
    temperature = _float_option(temperature, "temperature")
    if logit_softcap is not None:
        logit_softcap = _float_option(logit_softcap, "logit_softcap")
    if chunk_bytes is not None:
        chunk_bytes = _int_option(chunk_bytes, "chunk_bytes")
    _ext.check_row_stats_options(temperature, logit_softcap, chunk_bytes)
    return temperature, logit_softcap, _index_option(ignore_index), chunk_bytes


def _check_targets(targets: mx.array) -> None:
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"targets holds class indices and must have an integer dtype, got {targets.dtype}")


def _finish(stats, targets, ignore_index, return_entropy):
    """log p (and entropy) from the statistics _stats names, 0 on ignored
    rows. lse and expected are float32 pairs (hi + lo): subtracting the his
    first (exact where they are close) keeps float32 accuracy for logits
    far from 0 (1e4: a single float32 is 5e-4 off)."""
    lse, lse_lo, target = stats[0], stats[1], stats[2]
    logp = (target - lse) - lse_lo
    entropy = (lse - stats[3]) + (lse_lo - stats[4]) if return_entropy else None
    if ignore_index is not None:
        kept = targets != ignore_index
        logp = mx.where(kept, logp, 0.0)
        if return_entropy:
            entropy = mx.where(kept, entropy, 0.0)
    return (logp, entropy) if return_entropy else logp


def _stats(return_entropy):
    names = ["lse", "lse_lo", "target"]
    return names + ["expected", "expected_lo"] if return_entropy else names


def linear_log_probs(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    bias: Optional[mx.array] = None,
    *,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    ignore_index: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
    scales: Optional[mx.array] = None,
    biases: Optional[mx.array] = None,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: Literal["affine", "mxfp4", "mxfp8", "nvfp4"] = "affine",
    global_scale: Optional[mx.array] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Per-token ``log p(target)`` of the logits ``hidden @ weight.T + bias``,
    fused: the ``[..., V]`` logits never exist.

    Equal to ``mx.take_along_axis(log_softmax(z), targets)`` with
    ``z = softcap(hidden @ weight.T + bias) / temperature`` (float32), computed
    chunk by chunk as :func:`linear_cross_entropy` does, forward and backward.
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` through both
    outputs, with every token's own cotangent (a preference or RL loss weighs
    tokens differently).

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16 features.
        weight: ``[V, H]``, or a quantized head with ``scales``, ``biases``,
            ``group_size``, ``bits``, ``mode`` and ``global_scale`` exactly as
            :func:`linear_cross_entropy` takes them (no gradient for it).
        targets: class indices, ``hidden``'s shape without ``H``.
        bias: optional ``[V]`` output bias.
        temperature: ``T > 0``: the logits are divided by it (after the cap),
            as samplers and GRPO trainers do.
        logit_softcap: ``c``: the logits become ``c * tanh(y / c)`` first
            (Gemma 2). ``None``: no cap.
        return_entropy: also return the entropy ``-sum_j p_j log p_j`` of
            each row's softmax.
        ignore_index: rows whose target equals it get 0 (log p and entropy)
            and no gradient. Any other target outside ``[0, V)`` gives NaN.
        chunk_bytes: working-memory budget (default 64 MiB), as
            :func:`linear_cross_entropy`.

    Returns:
        float32 ``log p`` of ``targets``' shape, or ``(log p, entropy)``.
    """
    hidden = _as_array(hidden, "hidden")
    weight = _as_array(weight, "weight")
    targets = _as_array(targets, "targets")
    temperature, logit_softcap, ignore_index, chunk_bytes = _scorer_options(
        temperature, logit_softcap, ignore_index, chunk_bytes)
    group_size, bits = _quantization_params(mode, group_size, bits)
    bias, scales, biases, global_scale = (
        None if value is None else _as_array(value, name)
        for value, name in ((bias, "bias"), (scales, "scales"), (biases, "biases"),
                            (global_scale, "global_scale"))
    )
    _check_targets(targets)
    ignore_index = _ignore_index_for(targets, ignore_index)
    stats = _ext.linear_row_stats(
        hidden, weight, targets, bias, stats=_stats(return_entropy), scales=scales, biases=biases,
        group_size=group_size, bits=bits, mode=mode, global_scale=global_scale, temperature=temperature,
        logit_softcap=logit_softcap, ignore_index=ignore_index, chunk_bytes=chunk_bytes, stream=stream)
    return _finish(stats, targets, ignore_index, return_entropy)


def log_probs(
    logits: mx.array,
    targets: mx.array,
    *,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    ignore_index: Optional[int] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Per-token ``log p(target)`` of ``logits`` (class axis last), fused: one
    pass forward, one backward, no ``[..., V]`` temporary beyond the input and
    its gradient.

    ``z = softcap(logits) / temperature``; options and results as
    :func:`linear_log_probs`. Differentiable w.r.t. ``logits`` (gradient in
    their dtype) through both outputs.
    """
    logits = _as_array(logits, "logits")
    targets = _as_array(targets, "targets")
    temperature, logit_softcap, ignore_index, _ = _scorer_options(temperature, logit_softcap, ignore_index)
    _check_targets(targets)
    ignore_index = _ignore_index_for(targets, ignore_index)
    stats = _ext.row_stats(logits, targets, stats=_stats(return_entropy), temperature=temperature,
                           logit_softcap=logit_softcap, ignore_index=ignore_index, stream=stream)
    return _finish(stats, targets, ignore_index, return_entropy)
