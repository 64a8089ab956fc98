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
    _bool_option,
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
    class_weights: Optional[mx.array] = None,
    chunk_bytes: Optional[int] = None,
    scales: Optional[mx.array] = None,
    biases: Optional[mx.array] = None,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: Literal["affine", "mxfp4", "mxfp8", "nvfp4"] = "affine",
    global_scale: Optional[mx.array] = None,
    shift: Union[bool, int] = 0,
    token_scaling: bool = False,
    filter_eps: Union[None, float, Literal["auto"]] = None,
    return_stats: bool = False,
    differentiable_lse: bool = False,
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
        targets: class indices, ``hidden``'s shape without ``H``; or
            probabilities over the vocabulary, ``[..., V]`` floating (as
            PyTorch's ``LinearCrossEntropyLoss``; see ``class_weights`` for
            how they are computed).
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
        shift: ``s`` (Cut Cross-Entropy's ``shift``; ``True`` is 1): the loss
            of target ``t + s`` from hidden ``t`` along the sequence axis
            (``targets``' last axis, ``hidden``'s second to last), for
            next-token prediction without slicing and copying the hidden
            states: the targets (and ``mask`` / ``weights``, which follow
            them) move instead, and the last ``s`` hidden rows count as
            ignored. ``"none"`` returns ``[..., T - s]``, as Cut
            Cross-Entropy, and so do the statistics. ``0 <= s < T``.
        token_scaling: each row's loss (z term included) times its target's
            softmax probability, detached (Liger-Kernel's
            ``use_token_scaling``, DFT), from the same pass (the kernel's
            target logit and lse); it takes the recomputing backward, as
            ``weights``.
        class_weights: ``[V]`` per-class weights (PyTorch's ``weight``; negative
            ones too, as there; no NaN),
            Liger's ``ce_weight``), as :func:`mlx_fused_losses.cross_entropy`'s:
            row loss ``sum_j w_j q_j (lse - z_j)``, ``"mean"`` divides by
            the kept rows' summed target weights (the z term by the kept
            rows). Class-index targets without label smoothing run in the
            fused kernel (per-token weights ``w_t``); label smoothing, the z
            term and probability targets add terms built from the
            differentiable lse of ``_ext.linear_row_stats`` (one more pass
            over the head) and the linear sums ``hidden @ (w @ W)`` (and
            ``(w q) @ W`` for probability targets: a GEMM of the logits'
            size), so those need a dense head and no ``logit_softcap``
            (ValueError otherwise).
        filter_eps: gradient filtering (Cut Cross-Entropy's ``filter_eps``):
            ``None`` (default) computes the exact gradients; a float ``eps >=
            0``, or ``"auto"`` (``mx.finfo(hidden.dtype).eps / 32``, as Cut
            Cross-Entropy resolves it from its embeddings' dtype), lets the
            backward skip the ``dH = dZ W`` and ``dW = dZ^T H`` products of
            every block of vocabulary columns (256 on the CPU, a GEMM tile's
            width on Metal) in which every entry of the chunk's rows has
            ``|dZ_rj| <= eps |g_r|`` (``dZ = g (p - q)`` up to the smoothing,
            z-loss and soft-cap factors; ``g_r`` the row's cotangent): entries
            far below the softmax's mass, which a peaked softmax has in most
            blocks. A block with one entry above it (a target's ``p_t - 1``,
            say) is computed in full; a NaN row is never dropped. Error bound
            (each dropped entry is at most ``eps |g_r|``): ``|ddH_r| <= eps
            |g_r| sum_j |W_j|`` and ``|ddW_j| <= eps sum_r |g_r| |h_r|``
            (elementwise, over the dropped entries); the loss, the
            statistics and the bias gradient are exact. Not with probability
            targets or a sharded head (ValueError). The Metal backward
            does not filter yet (exact gradients on the GPU).
        chunk_bytes: working-memory budget (default 64 MiB): the float32
            logits of ``chunk_bytes // (4 V)`` rows at a time (at least one).
        return_stats: also return per-row statistics (see below).
        differentiable_lse: with ``return_stats``, ``stats["lse"]`` carries
            gradients w.r.t. ``hidden``, ``weight`` and ``bias`` (Cut
            Cross-Entropy's ``return_lse``: for a z-loss of your own, say):
            its cotangent joins the loss's in the same backward pass
            (``dZ_r += g_lse_r softmax_r``, no extra GEMM), which then always
            recomputes the logits (per-row cotangents: one more GEMM per
            chunk than the gradients formed in the forward). Ignored and
            masked rows' lse are differentiable too. Without it the
            statistics are constants.
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
        pass and not differentiable (but ``"lse"`` with ``differentiable_lse``): ``"lse"`` (log-sum-exp of the row's
        logits), ``"correct"`` (the target's logit is the row's maximum: token
        accuracy; False for ignored/masked rows), ``"entropy"`` (of the
        softmax) and ``"argmax"`` (int64: the predicted class, the first
        maximal logit as ``mx.argmax``). They are computed for ignored rows
        too (except "correct").

    No ``ignore_index`` by default (as :func:`mlx_fused_losses.cross_entropy`;
    :class:`mlx_fused_losses.nn.LinearCrossEntropyLoss` defaults to -100, as
    PyTorch's modules): a class index outside ``[0, V)`` that is neither
    ``ignore_index`` nor masked gives NaN for its row's loss, and poisons
    the gradients (every row shares ``weight``).

    PyTorch's K-dimensional form: ``weight [C, d1, ..., dK, H]`` (and
    ``bias [C, d1, ..., dK]``) gives the logits ``[..., C, d1, ..., dK]``,
    a slice of the head per position, with ``targets [..., d1, ..., dK]``
    (or probabilities ``[..., C, d1, ..., dK]``); ``mask``/``weights`` have
    the class-index targets' shape. One fused call per position (see
    ``linear_cross_entropy_kdim.py``), not with a quantized or sharded head
    or ``shift``.
    """
    if getattr(weight, "ndim", 2) > 2:
        arguments = dict(locals())  # (every argument: nothing else is local yet)
        from .linear_cross_entropy_kdim import linear_cross_entropy_kdim

        return linear_cross_entropy_kdim(linear_cross_entropy, **arguments)
    if vocab_start is not None or group is not None:
        if vocab_start is None:
            raise TypeError("group= shards the head over the vocabulary: pass vocab_start= too (the global "
                            "index of this rank's first row of the head)")
        unsharded = [name for name, value in (("shift", shift), ("token_scaling", token_scaling),
                                              ("class_weights", class_weights),
                                              ("filter_eps", filter_eps),
                                              ("differentiable_lse", differentiable_lse)) if value is not None
                     and value is not False and not (name == "shift" and value == 0)]
        if unsharded:
            raise ValueError(f"{', '.join(unsharded)}: not available with a head sharded over the "
                             "vocabulary (vocab_start=)")
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
    filter_eps = _filter_eps_option(filter_eps, hidden.dtype)
    differentiable_lse = _bool_option(differentiable_lse, "differentiable_lse")
    if differentiable_lse and not return_stats:
        raise ValueError("differentiable_lse=True makes stats['lse'] differentiable: it needs "
                         "return_stats=True")
    soft = mx.issubdtype(targets.dtype, mx.floating) and targets.ndim == hidden.ndim and hidden.ndim > 0
    if not soft and not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"targets holds class indices and must have an integer dtype (or be "
                        f"probabilities [..., V], floating), got {targets.dtype} of shape {targets.shape}")
    if class_weights is not None or soft:
        return _weighted_or_soft(
            hidden, weight, targets, bias, soft, class_weights, label_smoothing, label_smoothing_mode,
            ignore_index, z_loss, logit_softcap, reduction, mask, weights, chunk_bytes, scales, biases,
            group_size, bits, mode, global_scale, shift, token_scaling, return_stats, result_dtype,
            filter_eps, differentiable_lse, stream)
    token_scaling = _bool_option(token_scaling, "token_scaling")
    shift = _shift_option(shift, targets)
    ignore_index = _ignore_index_for(targets, ignore_index)
    if mask is not None:
        if mask.dtype != mx.bool_:
            raise TypeError(f"mask must be a bool array (rows to count), got {mask.dtype}")
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have targets' shape {targets.shape}, got {mask.shape}")
    if weights is not None:
        weights = _as_array(weights, "weights")
        if not mx.issubdtype(weights.dtype, mx.floating):
            raise TypeError(f"weights (per-token) must be floating, got {weights.dtype}")
        if weights.shape != targets.shape:
            raise ValueError(
                f"weights (per-token) must have targets' shape {targets.shape}, got {weights.shape}"
            )
    if shift:
        # Row t's target is targets[..., t + s]: the targets, mask and weights
        # move left by s (O(rows) copies; hidden is read in place) and the
        # last s rows are masked out.
        targets, mask, weights = (None if a is None else _shift_left(a, shift)
                                  for a in (targets, mask, weights))
        tail = _shift_left(mx.ones(targets.shape, mx.bool_), shift, fill=False)
        mask = tail if mask is None else mask & tail
    if mask is not None:
        targets, ignore_index = _masked_targets(targets, mask, ignore_index)
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
        # returns them one by one; so are the rows with a differentiable lse
        # (per-row cotangents anyway, and a broadcast scalar cotangent next to
        # the lse's would keep its first size under a shapeless mx.compile).
        sum_rows=reduction != "none" and weights is None and not token_scaling and not differentiable_lse,
        chunk_bytes=chunk_bytes,
        filter_eps=filter_eps,
        lse_grad=differentiable_lse,
        stream=stream,
    )
    rows = outputs[0] if weights is None else outputs[0] * weights.astype(mx.float32)
    if token_scaling:
        # p_t = exp(z_t - lse) with lse as its float32 pair (lse + lse_lo);
        # ignored rows: 0 (their loss is 0 and their exp could overflow).
        z_t, lse, lse_lo = (mx.stop_gradient(outputs[k]) for k in (6, 1, 2))
        p_t = mx.exp((z_t - lse) - lse_lo)
        if ignore_index is not None:
            p_t = mx.where(targets != ignore_index, p_t, 0.0)
        rows = rows * p_t
    count = _kept_rows(targets, ignore_index) if reduction == "mean" else None
    if shift and reduction == "none":
        rows = rows[..., : rows.shape[-1] - shift]
    loss = _finish(rows, reduction, result_dtype, count)
    if not return_stats:
        return loss
    correct, entropy, argmax = (mx.stop_gradient(outputs[k]) for k in (3, 4, 5))
    lse = outputs[1] if differentiable_lse else mx.stop_gradient(outputs[1])
    stats = {"lse": lse, "correct": correct, "entropy": entropy, "argmax": argmax}
    if shift:
        stats = {k: v[..., : v.shape[-1] - shift] for k, v in stats.items()}
    return loss, stats


def _filter_eps_option(filter_eps, dtype) -> float:
    """filter_eps as the float32 threshold the kernels take (0.0: off):
    None, "auto" (Cut Cross-Entropy's: the machine epsilon of ``dtype``, its
    embeddings' dtype, over 32) or a finite number >= 0."""
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, 'auto' or a number >= 0, got {filter_eps!r}")
        return float(mx.finfo(dtype).eps) / 32
    value = _float_option(filter_eps, "filter_eps")
    if not 0.0 <= value < float("inf"):
        raise ValueError(f"filter_eps must be finite and >= 0 (or None, or 'auto'), got {filter_eps!r}")
    return value


def _shift_option(shift, targets) -> int:
    """Cut Cross-Entropy's shift: a bool (True: 1) or an int in [0, T) with
    T the targets' last (sequence) axis."""
    if isinstance(shift, bool) or type(shift).__name__ == "bool_":
        shift = int(shift)
    else:
        shift = _int_option(shift, "shift")
    if shift == 0:
        return 0
    if targets.ndim == 0 or not 0 <= shift < targets.shape[-1]:
        length = targets.shape[-1] if targets.ndim else "none (0-d targets)"
        raise ValueError(
            f"shift must be in [0, T) with T the sequence axis (targets' last) of length {length}, "
            f"got {shift}"
        )
    return shift


def _shift_left(a: mx.array, shift: int, fill=None) -> mx.array:
    """a[..., t + shift] at t, the last ``shift`` places ``fill`` (None: the
    values that wrap around, which the caller masks)."""
    tail = a[..., :shift] if fill is None else mx.full(a.shape[:-1] + (shift,), fill, a.dtype)
    return mx.concatenate([a[..., shift:], tail], axis=-1)


def _smoothing(eps: float, mode: str, vocab: int) -> Tuple[float, float]:
    """(c_target, c_other) of q_j = c_other + c_target t_j: the values of
    csrc/math/cross_entropy.h's ce_smoothing (its tests pin both)."""
    if mode == "others":
        c_other = eps / (vocab - 1) if vocab > 1 else 0.0
        return (1.0 - eps - c_other if vocab > 1 else 1.0), c_other
    return 1.0 - eps, eps / vocab


def _weighted_or_soft(hidden, weight, targets, bias, soft, class_weights, label_smoothing,
                      label_smoothing_mode, ignore_index, z_loss, logit_softcap, reduction, mask,
                      weights, chunk_bytes, scales, biases, group_size, bits, mode, global_scale,
                      shift, token_scaling, return_stats, result_dtype, filter_eps, differentiable_lse,
                      stream):
    """class_weights and/or probability targets (see linear_cross_entropy's
    docstring). With q_j = c_other + c_target t_j and w the class weights,
        row = sum_j w_j q_j (lse - z_j) + z_loss lse^2
            = c_target sum_j w_j t_j (lse - z_j)              (1)
              + c_other (sum_j w_j lse - sum_j w_j z_j)       (2)
              + z_loss lse^2                                  (3)
    Class indices: (1) = c_target w_t (lse - z_t), the fused kernel's
    unsmoothed row with per-token weights c_target w_t (and its statistics);
    probabilities: (1) = c_target (A_t lse - h . ((w t) @ W) - (w t) . b).
    (2) and (3) take lse from _ext.linear_row_stats (differentiable) and
    sum_j w_j z_j = h . (w @ W) + w . b (z linear in h: no soft-cap)."""
    from .losses import _check_nonnegative_values, _reduce, _sum

    vocab = weight.shape[0]
    name = "probability targets" if soft else "class_weights"
    if class_weights is not None:
        class_weights = _as_array(class_weights, "class_weights")
        if class_weights.ndim != 1 or class_weights.shape[0] != vocab:
            raise ValueError(f"class_weights must have shape ({vocab},) (one weight per row of weight), "
                             f"got {class_weights.shape}")
        if not mx.issubdtype(class_weights.dtype, mx.floating):
            raise TypeError(f"class_weights must be floating, got {class_weights.dtype}")
        _check_nonnegative_values(class_weights, "class_weights", negative_ok=True)
    if token_scaling:
        raise ValueError(f"token_scaling is not available with {name} in linear_cross_entropy")
    if shift:
        raise ValueError(f"shift is not available with {name} in linear_cross_entropy")
    if mask is not None:
        raise ValueError(f"mask is not available with {name}: use ignore_index or weights")
    if soft and filter_eps:
        raise ValueError("filter_eps is not available with probability targets (their gradient "
                         "runs through the row statistics, not the filtered backward)")
    c_target, c_other = _smoothing(label_smoothing, label_smoothing_mode, vocab)
    needs_lse = soft or c_other != 0.0 or z_loss != 0.0
    if needs_lse and (logit_softcap is not None or scales is not None):
        raise ValueError(
            f"linear_cross_entropy with {name}"
            + ("" if soft else " and label_smoothing or z_loss")
            + " needs a dense head without logit_softcap (its terms are linear in the logits); "
            "got " + ("logit_softcap" if logit_softcap is not None else "a quantized head"))
    if soft:
        if targets.shape[:-1] != hidden.shape[:-1] or targets.shape[-1] != vocab:
            raise ValueError(f"probability targets must have shape {hidden.shape[:-1] + (vocab,)} "
                             f"(hidden's rows x V), got {targets.shape}")
        if ignore_index is not None and ignore_index >= 0:
            raise ValueError(f"ignore_index={ignore_index} applies to class-index targets, not to "
                             "probabilities")
        if return_stats:
            raise ValueError("return_stats is not available with probability targets in "
                             "linear_cross_entropy")
    user_w = None
    if weights is not None:
        user_w = _as_array(weights, "weights")
        rows_shape = hidden.shape[:-1]
        if user_w.shape != rows_shape or not mx.issubdtype(user_w.dtype, mx.floating):
            raise ValueError(f"weights (per-token) must be floating of shape {rows_shape}, "
                             f"got {user_w.dtype} {user_w.shape}")
        user_w = user_w.astype(mx.float32)
    w = None if class_weights is None else class_weights.astype(mx.float32)
    head = dict(scales=scales, biases=biases, group_size=group_size, bits=bits, mode=mode,
                global_scale=global_scale, chunk_bytes=chunk_bytes, stream=stream)
    lse = None
    if needs_lse:
        lse = _ext.linear_row_stats(hidden, weight, None, bias, stats=["lse"],
                                    logit_softcap=logit_softcap, **head)[0]
    wf = weight.astype(mx.float32)
    h32 = hidden.astype(mx.float32)
    b32 = None if bias is None else bias.astype(mx.float32)

    def linear_sum(v):  # sum_j v_j z_j per row, v [V] or [..., V]
        if v.ndim == 1:
            s = h32 @ (v @ wf)
            return s if b32 is None else s + (v * b32).sum()
        s = (h32 * (v @ wf)).sum(-1)
        return s if b32 is None else s + v @ b32

    stats = None
    count = mass = None
    z_count = None
    if soft:
        q = targets.astype(mx.float32)
        wq = q if w is None else q * w
        rows = c_target * (wq.sum(-1) * lse - linear_sum(wq))
        kept = None
    else:
        index = targets.astype(mx.int64)
        in_range = (index >= 0) & (index < vocab)
        kept = in_range if ignore_index is None else in_range & (index != ignore_index)
        ignored = mx.zeros(index.shape, mx.bool_) if ignore_index is None else index == ignore_index
        w_t = mx.ones(index.shape, mx.float32) if w is None else mx.where(
            in_range, w[mx.clip(index, 0, vocab - 1)], 0.0)
        out = linear_cross_entropy(
            hidden, weight, targets, bias, ignore_index=ignore_index, logit_softcap=logit_softcap,
            reduction="none", weights=c_target * w_t, return_stats=return_stats, dtype=mx.float32,
            filter_eps=filter_eps or None, differentiable_lse=differentiable_lse, **head)
        rows, stats = out if return_stats else (out, None)
        if reduction == "mean":
            count = _sum(mx.where(kept, w_t, 0.0))
            mass = _sum(mx.where(kept, mx.abs(w_t), 0.0))  # (0: nothing kept, whatever count)
            z_count = _sum(kept.astype(mx.float32))
    extra = 0.0
    if c_other != 0.0:
        total_w = w.sum() if w is not None else float(vocab)
        extra = c_other * (total_w * lse - linear_sum(w if w is not None else mx.ones((vocab,))))
    if not soft and c_other != 0.0:
        extra = mx.where(ignored, 0.0, extra)
    rows = rows + extra
    z_rows = None
    if z_loss != 0.0:
        z_rows = z_loss * lse * lse
        if not soft:
            z_rows = mx.where(ignored, 0.0, z_rows)
    if user_w is not None:
        rows = rows * user_w
        z_rows = None if z_rows is None else z_rows * user_w
    if soft or reduction != "mean":
        total = rows if z_rows is None else rows + z_rows
        loss = _reduce(total, reduction).astype(result_dtype)
    else:
        loss = _reduce(rows, reduction, count, mass)
        if z_rows is not None:
            loss = loss + _reduce(z_rows, reduction, z_count)
        loss = loss.astype(result_dtype)
    return (loss, stats) if return_stats else loss
