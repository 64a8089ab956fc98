"""Fused linear cross-entropy: the loss of ``cross_entropy(hidden @ weight.T +
bias, targets)`` without materialising the N x V logits.

The kernel (``csrc/cpu/linear_cross_entropy.cpp``) walks the rows in chunks of
at most ``chunk_bytes`` of float32 logits; see ``csrc/ops/linear_cross_entropy.h``
for the contract and the gradient derivation.
"""

from typing import Dict, Literal, Optional, Tuple, Union

import mlx.core as mx

from . import _ext
from .losses import (
    _as_array,
    _check_reduction,
    _finish,
    _float_option,
    _ignore_index_for,
    _index_option,
    _int_option,
    _kept_rows,
    _masked_targets,
    _result_dtype,
)


def _linear_cross_entropy_options(label_smoothing, reduction, label_smoothing_mode, ignore_index,
                                  z_loss, logit_softcap, chunk_bytes, dtype):
    """The options of linear_cross_entropy that need no inputs, checked as
    the op checks them; shared with nn.LinearCrossEntropyLoss (which runs
    them at construction)."""
    _check_reduction(reduction)
    label_smoothing = _float_option(label_smoothing, "label_smoothing")
    z_loss = _float_option(z_loss, "z_loss")
    if logit_softcap is not None:
        logit_softcap = _float_option(logit_softcap, "logit_softcap")
    if chunk_bytes is not None:
        chunk_bytes = _int_option(chunk_bytes, "chunk_bytes")
    ignore_index = _index_option(ignore_index)
    _ext.check_linear_cross_entropy_options(
        label_smoothing, label_smoothing_mode, z_loss, logit_softcap, chunk_bytes
    )
    _result_dtype(dtype, mx.float32)
    return label_smoothing, ignore_index, z_loss, logit_softcap, chunk_bytes


# mx.quantize's default (group_size, bits) per mode (mlx 0.32.4).
_QUANT_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}


def _quantization_params(mode, group_size, bits) -> Tuple[int, int]:
    """(group_size, bits) as ints, None filled in with ``mode``'s defaults as
    ``mx.quantize`` does; the op checks the values against the mode."""
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str (a mode of mx.quantize), got {type(mode).__name__}")
    if mode not in _QUANT_DEFAULTS:
        raise ValueError(f"mode={mode!r} is not a quantization mode of mx.quantize: "
                         f"{', '.join(map(repr, _QUANT_DEFAULTS))}")
    default_group_size, default_bits = _QUANT_DEFAULTS[mode]
    group_size = default_group_size if group_size is None else _int_option(group_size, "group_size")
    bits = default_bits if bits is None else _int_option(bits, "bits")
    return group_size, bits


def linear_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    bias: Optional[mx.array] = None,
    *,
    label_smoothing: float = 0.0,
    label_smoothing_mode: Literal["uniform", "others"] = "uniform",
    ignore_index: Optional[int] = None,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    reduction: Literal["none", "mean", "sum"] = "mean",
    mask: Optional[mx.array] = None,
    weights: Optional[mx.array] = None,
    chunk_bytes: Optional[int] = None,
    scales: Optional[mx.array] = None,
    biases: Optional[mx.array] = None,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: Literal["affine", "mxfp4", "mxfp8", "nvfp4"] = "affine",
    global_scale: Optional[mx.array] = None,
    return_stats: bool = False,
    vocab_start: Optional[int] = None,
    group: Optional["mx.distributed.Group"] = None,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, Dict[str, mx.array]]]:
    """Cross-entropy of the logits ``hidden @ weight.T + bias``, fused.

    Equal to ``cross_entropy(softcap(hidden @ weight.T + bias), targets, ...)``
    with this package's :func:`cross_entropy` options, but the ``[..., V]``
    logits never exist: working memory is bounded by ``chunk_bytes``.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16 features.
        weight: ``[V, H]`` (an ``nn.Linear`` weight or a tied embedding table),
            or the packed ``uint32`` matrix of a quantized one, with
            ``scales`` (and ``biases`` in ``"affine"`` mode), ``group_size``,
            ``bits`` and ``mode`` as ``mx.quantize`` takes and returns them:
            affine with 1, 2, 3, 4, 5, 6 or 8 bits and group size 32, 64 or
            128, ``"mxfp4"``, ``"mxfp8"``, ``"nvfp4"`` (with the
            ``global_scale`` given to ``mx.quantize``, if any).
            ``group_size``/``bits`` default to the mode's defaults, as in
            ``mx.quantize``. Its gradient is not available.
        targets: class indices, ``hidden``'s shape without ``H``.
        bias: optional ``[V]`` output bias.
        label_smoothing, label_smoothing_mode, ignore_index, z_loss: as
            :func:`mlx_fused_losses.cross_entropy`.
        logit_softcap: ``c``: the logits become ``c * tanh(z / c)`` before the
            softmax (Gemma 2). ``None``: no cap.
        reduction: ``"mean"`` (over kept rows), ``"sum"`` or ``"none"``.
        mask: optional bool ``[...]``: rows to count (as mlx-lm passes it);
            masked rows behave as ``ignore_index`` rows. An unmasked row
            whose index is out of range is NaN, as without a mask.
        weights: optional float ``[...]`` (``targets``' shape): per-token
            weights multiplying each row's loss, as
            :func:`mlx_fused_losses.cross_entropy`'s ``weights`` (MLX's
            per-sample weights): ``"mean"`` still divides by the kept rows,
            and the loss is differentiable w.r.t. them. With them a summed or
            averaged loss takes the recomputing backward (per-row
            cotangents), not the gradients formed in the forward pass.
        chunk_bytes: working-memory budget (default 64 MiB): the float32
            logits of ``chunk_bytes // (4 V)`` rows at a time (at least one).
        return_stats: also return per-row statistics (see below).
        vocab_start, group: a head sharded over the vocabulary across the
            ranks of ``group`` (``mx.distributed``; None: MLX's world group):
            ``weight`` and ``bias`` hold this rank's rows ``[vocab_start,
            vocab_start + V_r)`` and the loss is the full head's, computed by
            :func:`mlx_fused_losses.distributed.vocab_parallel_linear_cross_entropy`
            (see there; it also takes ``validate``). ``group`` needs
            ``vocab_start``.
        dtype: dtype of the returned loss. ``None``: ``hidden``'s dtype;
            ``mx.float32`` keeps the float32 the kernel accumulates in (a
            bf16 model's mean loss otherwise rounds to bf16).

    Returns:
        The loss, or ``(loss, stats)`` with ``return_stats=True``, where stats
        holds float32/bool arrays of ``targets``' shape, computed in the same
        pass and not differentiable: ``"lse"`` (log-sum-exp of the row's
        logits), ``"correct"`` (the target's logit is the row's maximum: token
        accuracy; False for ignored/masked rows) and ``"entropy"`` (of the
        softmax). They are computed for ignored rows too (except "correct").

    No ``ignore_index`` by default (as :func:`mlx_fused_losses.cross_entropy`;
    :class:`mlx_fused_losses.nn.LinearCrossEntropyLoss` defaults to -100, as
    PyTorch's modules): a class index outside ``[0, V)`` that is neither
    ``ignore_index`` nor masked gives NaN for its row's loss, and poisons
    the gradients (every row shares ``weight``).
    """
    if vocab_start is not None or group is not None:
        if vocab_start is None:
            raise TypeError("group= shards the head over the vocabulary: pass vocab_start= too (the global "
                            "index of this rank's first row of the head)")
        from .distributed import vocab_parallel_linear_cross_entropy  # (it imports this module)

        return vocab_parallel_linear_cross_entropy(
            hidden, weight, targets, bias, vocab_start=vocab_start, group=group, label_smoothing=label_smoothing,
            label_smoothing_mode=label_smoothing_mode, ignore_index=ignore_index, z_loss=z_loss,
            logit_softcap=logit_softcap, reduction=reduction, mask=mask, weights=weights, chunk_bytes=chunk_bytes,
            scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode, global_scale=global_scale,
            return_stats=return_stats, dtype=dtype, stream=stream)
    hidden = _as_array(hidden, "hidden")
    weight = _as_array(weight, "weight")
    targets = _as_array(targets, "targets")
    label_smoothing, ignore_index, z_loss, logit_softcap, chunk_bytes = (
        _linear_cross_entropy_options(label_smoothing, reduction, label_smoothing_mode,
                                      ignore_index, z_loss, logit_softcap, chunk_bytes, dtype)
    )
    group_size, bits = _quantization_params(mode, group_size, bits)
    bias, scales, biases, mask, global_scale = (
        None if value is None else _as_array(value, name)
        for value, name in ((bias, "bias"), (scales, "scales"), (biases, "biases"), (mask, "mask"),
                            (global_scale, "global_scale"))
    )
    result_dtype = _result_dtype(dtype, hidden.dtype)
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"targets holds class indices and must have an integer dtype, got {targets.dtype}")
    ignore_index = _ignore_index_for(targets, ignore_index)
    if mask is not None:
        if mask.dtype != mx.bool_:
            raise TypeError(f"mask must be a bool array (rows to count), got {mask.dtype}")
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have targets' shape {targets.shape}, got {mask.shape}")
        targets, ignore_index = _masked_targets(targets, mask, ignore_index)
    if weights is not None:
        weights = _as_array(weights, "weights")
        if not mx.issubdtype(weights.dtype, mx.floating):
            raise TypeError(f"weights (per-token) must be floating, got {weights.dtype}")
        if weights.shape != targets.shape:
            raise ValueError(
                f"weights (per-token) must have targets' shape {targets.shape}, got {weights.shape}"
            )
    outputs = _ext.linear_cross_entropy(
        hidden,
        weight,
        targets,
        bias,
        scales=scales,
        biases=biases,
        group_size=group_size,
        bits=bits,
        mode=mode,
        global_scale=global_scale,
        label_smoothing=label_smoothing,
        label_smoothing_mode=label_smoothing_mode,
        ignore_index=ignore_index,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        # Weighted rows are summed here (after the weights), so the kernel
        # returns them one by one.
        sum_rows=reduction != "none" and weights is None,
        chunk_bytes=chunk_bytes,
        stream=stream,
    )
    rows = outputs[0] if weights is None else outputs[0] * weights.astype(mx.float32)
    count = _kept_rows(targets, ignore_index) if reduction == "mean" else None
    loss = _finish(rows, reduction, result_dtype, count)
    if not return_stats:
        return loss
    lse, correct, entropy = (mx.stop_gradient(outputs[k]) for k in (1, 3, 4))
    stats = {"lse": lse, "correct": correct, "entropy": entropy}
    return loss, stats
