"""PyTorch's K-dimensional linear cross-entropy, on the fused 2-D one.

``linear_cross_entropy(hidden [..., H], weight [C, d1, ..., dK, H], targets
[..., d1, ..., dK])`` is PyTorch's ``F.linear_cross_entropy`` with a head of
rank > 2 (``nn.LinearCrossEntropyLoss(out_features=(d1, ..., dK))``): the
logits are ``[..., C, d1, ..., dK]``, and position ``d`` has its own slice of
the head: ``z[n, c, d] = hidden[n] . weight[c, d] + bias[c, d]``, the softmax
over ``c``. No reshape of the hidden states makes that one ordinary head (a
block-diagonal one would multiply the GEMM's work by D = d1 * ... * dK), so
each of the D positions is one call of the fused kernel on its slice
``weight[:, d]`` ([C, H]), with ``targets[..., d]``: working memory stays one
chunk of logits per call, and no ``[..., C, D]`` logits exist. The slices come
from ``weight`` ([C, D, H]) through one custom function whose gradient
stacks the positions' gradients (the gradients of D index slices would each
be a zero array of the whole head).

The positions are rows like any other: ``"mean"`` divides the summed rows by
the kept (n, d) positions (with ``class_weights``, by their summed target
weights: PyTorch's weighted mean); probability targets ``[..., C, d1, ...,
dK]`` (the class axis before the positions, as PyTorch's) by every position.
Each position's call reduces itself (``"sum"``; so an unweighted class-index
loss keeps the gradients formed in the forward pass) and the denominator is
counted over all positions here.

The number of calls is D, fixed by ``weight``'s shape. ``mx.compile`` works
(the same call again, other values); a shapeless one raises MLX's ValueError:
MLX's slices (as ``mx.split``) cannot infer their shapes (``mx.take`` with an
array index would trace, then read the wrong rows at another size, so it is
not used).
"""

import math

import mlx.core as mx

from .losses import (_as_array, _ignore_index_for, _kept_rows, _masked_targets, _reduce,
                     _result_dtype, _sum)


def _positions(a: mx.array, axis: int, count: int):
    """The ``count`` sub-arrays of ``a`` along ``axis`` (the positions d,
    flattened), each without that axis. Their gradients go back as one
    stack: the vjp of ``count`` slices (or of ``mx.split``) built a zero
    array of ``a``'s size per position (measured: 47 MiB instead of 10 for
    a 4 MiB head of 16 positions)."""
    assert a.shape[axis] == count

    @mx.custom_function
    def split(x):
        return [x[(slice(None),) * axis + (d,)] for d in range(count)]

    @split.vjp
    def split_vjp(primals, cotangents, outputs):
        return [mx.stack(cotangents, axis=axis)]

    return split(a)


def linear_cross_entropy_kdim(linear_cross_entropy, hidden, weight, targets, bias=None, *,
                              reduction="mean", mask=None, weights=None, class_weights=None,
                              z_loss=0.0, ignore_index=None, return_stats=False, dtype=None,
                              scales=None, biases=None, global_scale=None, shift=0,
                              vocab_start=None, group=None, **options):
    """``linear_cross_entropy`` (passed in: this module is imported by it)
    with ``weight`` of rank > 2; its other arguments as there. ``options``
    go to each position's call unchanged."""
    hidden = _as_array(hidden, "hidden")
    weight = _as_array(weight, "weight")
    targets = _as_array(targets, "targets")
    kdim = "a K-dimensional head (weight [C, d1, ..., dK, H])"
    if scales is not None or biases is not None or global_scale is not None:
        raise ValueError(f"{kdim} is dense: a quantized weight is a packed 2-D matrix, got "
                         f"weight {weight.shape} with scales")
    if vocab_start is not None or group is not None:
        raise ValueError(f"vocab_start/group: not available with {kdim}")
    if shift is not False and shift != 0:
        raise ValueError(f"shift is not available with {kdim}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    num_classes, out, dim = weight.shape[0], tuple(weight.shape[1:-1]), weight.shape[-1]
    if hidden.ndim < 1 or hidden.shape[-1] != dim:
        raise ValueError(f"hidden must be [..., H] with H = weight's last axis {dim}, "
                         f"got {hidden.shape}")
    lead = tuple(hidden.shape[:-1])
    nb = len(lead)
    count = math.prod(out)
    soft = mx.issubdtype(targets.dtype, mx.floating)
    want = lead + ((num_classes,) if soft else ()) + out
    if tuple(targets.shape) != want:
        raise ValueError(
            f"with {kdim} of weight {weight.shape}, targets must be class indices of shape "
            f"{lead + out} (hidden's rows x positions) or probabilities of shape "
            f"{lead + (num_classes,) + out} (classes before positions), got {targets.dtype} "
            f"{targets.shape}")
    if bias is not None:
        bias = _as_array(bias, "bias")
        if tuple(bias.shape) != (num_classes,) + out:
            raise ValueError(f"bias must have shape {(num_classes,) + out} (weight's without H), "
                             f"got {bias.shape}")
    for name, a in (("mask", mask), ("weights", weights)):
        if a is not None and tuple(_as_array(a, name).shape) != lead + out:
            raise ValueError(f"{name} must have the class-index targets' shape {lead + out}, "
                             f"got {_as_array(a, name).shape}")
    if (not soft and reduction == "mean" and class_weights is not None and z_loss != 0.0):
        # The 2-D mean divides the weighted CE by the summed target weights
        # and the z term by the kept rows: each position's sum holds both.
        raise ValueError(f"z_loss with class_weights and reduction='mean' is not available with "
                         f"{kdim}: use reduction='sum' and divide")
    result_dtype = _result_dtype(dtype, hidden.dtype)

    # Mask and ignore_index as one rule, once for every position.
    if not soft:
        ignore_index = _ignore_index_for(targets, ignore_index)
        if mask is not None:
            mask = _as_array(mask, "mask")
            if mask.dtype != mx.bool_:
                raise TypeError(f"mask must be a bool array (positions to count), got {mask.dtype}")
            targets, ignore_index = _masked_targets(targets, mask, ignore_index)
            mask = None
    # 16-bit inputs are computed in float32: hidden's gradient is the sum of
    # the D positions' gradients, and a 16-bit one rounded per position
    # before the sum (and the class-weighted / probability form's terms,
    # each rounded before they are added) missed PyTorch's float16
    # tolerance (2e-3) by up to 10x in its cases. The cost: a float32 copy
    # of a 16-bit head, and float32 GEMMs; the gradients are rounded once,
    # to the inputs' dtypes.
    hidden, weight, bias = (None if a is None else a.astype(mx.float32)
                            for a in (hidden, weight, bias))
    # Each array's positions flattened into one axis, then split.
    heads = _positions(weight.reshape(num_classes, count, dim), 1, count)
    at = nb + 1 if soft else nb  # targets' first position axis
    per_target = _positions(mx.flatten(targets, start_axis=at), at, count)
    per_bias = [None] * count if bias is None else _positions(bias.reshape(num_classes, count), 1,
                                                              count)
    per_weights = [None] * count if weights is None else _positions(
        mx.flatten(_as_array(weights, "weights"), start_axis=nb), nb, count)
    per_mask = [None] * count if mask is None else _positions(
        mx.flatten(_as_array(mask, "mask"), start_axis=nb), nb, count)
    # Probability targets: each position's mean is over the same rows, so
    # their mean over positions is the mean over all (n, d).
    part_reduction = "none" if reduction == "none" else ("mean" if soft and reduction == "mean"
                                                         else "sum")
    losses, stats = [], []
    for p in range(count):
        out_p = linear_cross_entropy(
            hidden, heads[p], per_target[p], per_bias[p], reduction=part_reduction,
            mask=per_mask[p], weights=per_weights[p], class_weights=class_weights, z_loss=z_loss,
            ignore_index=ignore_index, return_stats=return_stats, dtype=mx.float32, **options)
        losses.append(out_p[0] if return_stats else out_p)
        if return_stats:
            stats.append(out_p[1])
    if reduction == "none":
        loss = mx.unflatten(mx.stack(losses, axis=-1), -1, out) if out else losses[0]
    else:
        loss = _sum(mx.stack(losses))
        if reduction == "mean" and soft:
            loss = loss * (1.0 / count)
        elif reduction == "mean":
            row_weight = None
            if class_weights is not None:
                w = _as_array(class_weights, "class_weights").astype(mx.float32)
                index = targets.astype(mx.int64)
                in_range = (index >= 0) & (index < num_classes)
                row_weight = mx.where(in_range, w[mx.clip(index, 0, num_classes - 1)], 0.0)
            count = _kept_rows(targets, ignore_index, row_weight)
            mass = None if row_weight is None else _kept_rows(targets, ignore_index,
                                                              mx.abs(row_weight))
            loss = _reduce(loss, "mean", count, mass)
    loss = loss.astype(result_dtype)
    if not return_stats:
        return loss
    joined = {k: mx.unflatten(mx.stack([s[k] for s in stats], axis=-1), -1, out)
              for k in stats[0]}
    return loss, joined

