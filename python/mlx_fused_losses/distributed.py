"""The losses over several processes (``mx.distributed``, run by ``mlx.launch``).

Two parallel modes, both on MLX's own collectives (no transport of ours):

* data-parallel: every rank runs the whole model on its own batch and the
  gradients are averaged (``mlx.nn.utils.average_gradients``).
  :func:`global_mean` makes the loss the mean over the kept tokens of ALL
  ranks, not the mean of per-rank means.
* vocabulary-parallel: rank ``r`` holds the rows ``[vocab_start,
  vocab_start + V_r)`` of the output head (the layout of
  ``mlx.nn.layers.distributed.shard_linear(..., "all-to-sharded")``), or the
  matching slice of the logits. :func:`vocab_parallel_linear_cross_entropy`
  and :func:`vocab_parallel_cross_entropy` give every rank the loss of the
  full head, from per-row statistics of each shard merged across ranks.

How MLX's collectives behave under autodiff (mlx 0.32.4,
``mlx/distributed/primitives.cpp``), the rules this module relies on:

* ``all_sum`` and ``all_max``: the vjp passes the cotangent through
  unchanged, with no communication. That is the gradient of a loss every
  rank computes identically from the collective's result ("replicated"
  loss): d loss / d x_r = d loss / d all_sum(x). For ``all_max`` it is not
  the gradient of a max (which would go to the arg-max rank only), which is
  one reason the merge below gathers the shards' log-sum-exps and reduces
  them locally instead of Megatron's all-reduce of the max, then of the
  sum of exponentials (the other: one collective instead of two).
* ``all_gather`` (concatenation along axis 0, in rank order): the vjp is this
  rank's slice of the cotangent, again no communication.
* a group of size 1 makes every collective the identity.

So a replicated loss built from gathered per-shard statistics backpropagates
to each rank's own statistics, and from there (through the per-shard
primitive's backward) to its own shard of the head: dW needs no collective.
The hidden states feed every shard, so their gradient is the sum of every
rank's contribution: they go through ``mlx.nn.layers.distributed.
sum_gradients(group)`` (identity forward, ``all_sum`` of the cotangent
backward), the helper MLX's own ``shard_linear`` layers apply to their input.

Every collective of a call is entered by every rank of the group or by none:
argument checks that could fail on one rank only are not raised before the
validating collective (``validate=True``); their outcome travels with it and
every rank raises the same error after it, so a bad call never hangs.
"""

import zlib
from typing import Dict, Literal, Optional, Sequence, Tuple, Union

import mlx.core as mx
from mlx.nn.layers.distributed import sum_gradients

from . import _ext
from .linear_cross_entropy import _linear_cross_entropy_options, _quantization_params
from .losses import (
    _as_array,
    _cross_entropy_options,
    _finish,
    _ignore_index_for,
    _int_option,
    _kept_rows,
    _masked_targets,
    _result_dtype,
)

__all__ = [
    "global_mean",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]


def _group(group) -> "mx.distributed.Group":
    """``group`` or, for None, the world group (``mx.distributed.init()``,
    a group of size 1 when the program was not launched distributed)."""
    if group is None:
        return mx.distributed.init()
    if not isinstance(group, mx.distributed.Group):
        raise TypeError(f"group must be an mlx.core.distributed.Group or None, got {type(group).__name__}")
    return group


# ---- data-parallel --------------------------------------------------------------------------


_GRADIENT_REDUCTIONS = ("average", "sum")


def global_mean(
    total: mx.array,
    count,
    *,
    group: Optional["mx.distributed.Group"] = None,
    gradients: Literal["average", "sum"] = "average",
) -> mx.array:
    """The mean over every rank's kept tokens, for data-parallel training.

    Each rank passes the sum of its own per-token losses (``total``: a loss
    computed with ``reduction="sum"``, or per-token losses, which are summed)
    and ``count``, how many tokens it kept (e.g. ``(targets != -100).sum()``).
    The result, the same on every rank, is ``all_sum(total) / all_sum(count)``
    (0 when no rank kept a token): the mean over ALL kept tokens, where
    averaging per-rank means would weigh a rank's tokens by how few it had.

    One ``all_sum`` of the pair (total, count) per call. The gradient flows
    only through this rank's ``total``, scaled for the reduction of the
    gradients that follows: with ``gradients="average"`` (default) it is
    ``P / all_sum(count)`` times d total, so that
    ``mlx.nn.utils.average_gradients`` (all_sum / P) yields the gradient of
    the global mean; with ``gradients="sum"`` it is ``1 / all_sum(count)``,
    for gradients all-summed instead.

    The sums are float32: a count is exact up to 2^24 tokens per step. An
    infinite element of ``total`` makes the mean inf and gets no gradient.
    """
    group = _group(group)
    if gradients not in _GRADIENT_REDUCTIONS:
        raise ValueError(f"gradients must be one of {_GRADIENT_REDUCTIONS}, got {gradients!r}")
    total = _as_array(total, "total")
    if not mx.issubdtype(total.dtype, mx.floating):
        raise TypeError(f"total (the summed loss) must be floating, got {total.dtype}")
    count = count if isinstance(count, mx.array) else mx.array(count)
    if count.ndim != 0 and count.size != 1:
        raise ValueError(f"count must be a scalar (this rank's kept tokens), got shape {count.shape}")
    elements = total.astype(mx.float32)
    local = elements.sum()
    count = count.reshape(()).astype(mx.float32)
    both = mx.distributed.all_sum(mx.stop_gradient(mx.stack([local, count])), group=group)
    global_total, global_count = both[0], both[1]
    empty = global_count == 0
    safe = mx.where(empty, mx.array(1.0, mx.float32), global_count)
    scale = (group.size() if gradients == "average" else 1.0) / safe
    # The value is global_total / count; the gradient reaches this rank's
    # total through a term whose value is exactly 0 and whose derivative is
    # scale: t - stop_gradient(t) per element, where an infinite element
    # (inf - inf = NaN) is replaced by 0, so an overflowing rank shows inf
    # rather than NaN, at the price of no gradient through that element.
    # (mx.custom_function would keep it, but cannot run in a shapeless
    # mx.compile.) A mean over nothing is 0, as every loss of this package:
    # the total times 0, so a NaN still shows.
    own = elements - mx.stop_gradient(elements)
    own = mx.where(own == 0, own, 0.0).sum() * scale
    mean = mx.where(empty, global_total * 0.0, global_total / safe) + own
    return mean.astype(total.dtype)


# ---- vocabulary-parallel: per-shard statistics ------------------------------------------------
#
# The per-row statistics of one shard of the head, from the row-statistics
# primitive (csrc/ops/row_stats.h: only the requested ones are computed, one
# chunk of logits alive at a time; lse, target, logit_sum and expected are
# differentiable with their own per-row cotangents; max and argmax are not).
# With z the (soft-capped) logits of the shard's columns, global index
# vocab_start + j for column j:
#     lse       logsumexp_j z_j
#     target    z_{t - vocab_start} where vocab_start <= t < vocab_start + V_r, else 0
#     logit_sum sum_j z_j
#     expected  sum_j softmax(z)_j z_j
#     max       max_j z_j,    argmax   vocab_start + (first j of the max)
# These two functions are the only place the primitive is called.


def _linear_shard_stats(hidden, weight, targets, bias, *, vocab_start: int, outputs: Sequence[str],
                        logit_softcap, ignore_index, chunk_bytes, quantization: dict, stream) -> Dict[str, mx.array]:
    values = _ext.linear_row_stats(hidden, weight, targets, bias, stats=list(outputs), logit_softcap=logit_softcap,
                                   ignore_index=ignore_index, vocab_start=vocab_start, chunk_bytes=chunk_bytes,
                                   stream=stream, **quantization)
    return dict(zip(outputs, values))


def _logits_shard_stats(logits, targets, *, vocab_start: int, outputs: Sequence[str], logit_softcap, ignore_index,
                        stream) -> Dict[str, mx.array]:
    values = _ext.row_stats(logits, targets, stats=list(outputs), logit_softcap=logit_softcap,
                            ignore_index=ignore_index, vocab_start=vocab_start, stream=stream)
    return dict(zip(outputs, values))


# ---- vocabulary-parallel: one validating collective ----------------------------------------

# Bytes of text each rank contributes to the validating collective: its
# error message, or the description of its call that every rank must share.
_TEXT_BYTES = 1024
_FIELDS = ("failed", "vocab_start", "shard_rows", "call_crc", "targets_crc", "kept", "owned",
           "kept_min", "kept_max")


class _Traced(ValueError):
    """Validation under mx.compile/mx.vmap, which cannot read the targets."""


def _read_targets(targets: mx.array, ignore_index, vocab_start: int, shard_rows: int) -> Dict[str, int]:
    """What the validation needs of the targets, read on the host: a CRC of
    them, the kept ones' count, range and how many this shard owns. A clear
    error under mx.compile/mx.vmap, where they cannot be read (raised before
    any collective: every rank is traced alike)."""
    flat = targets.astype(mx.int64).reshape(-1)
    kept = flat != ignore_index if ignore_index is not None else mx.ones(flat.shape, mx.bool_)
    big, small = mx.array(2**63 - 1, mx.int64), mx.array(-(2**63), mx.int64)
    owned = kept & (flat >= vocab_start) & (flat < vocab_start + shard_rows)
    summary = mx.stack([kept.sum().astype(mx.int64), owned.sum().astype(mx.int64),
                        mx.where(kept, flat, big).min() if flat.size else big,
                        mx.where(kept, flat, small).max() if flat.size else small])
    try:
        mx.eval(flat, summary)
    except ValueError as err:
        if "function transformations" in str(err):
            raise _Traced("validate=True reads the targets on the host, which mx.compile and mx.vmap do "
                              "not allow: pass validate=False inside them (every rank alike), after a first "
                              "call outside with validate=True") from None
        raise
    kept_count, owned_count, kept_min, kept_max = summary.tolist()
    return {"targets_crc": zlib.crc32(memoryview(flat)), "kept": kept_count, "owned": owned_count,
            "kept_min": kept_min if kept_count else 0, "kept_max": kept_max if kept_count else 0}


def _validate(name: str, group, problem: Optional[Exception], vocab_start: int, shard_rows: int,
              call: str, targets: Optional[mx.array], ignore_index) -> int:
    """One all_gather of what every rank must agree on; every rank raises the
    same error if they do not (or if any rank's own checks failed), after the
    collective. Returns V, the global vocabulary size."""
    fields = dict.fromkeys(_FIELDS, 0)
    if problem is None:
        try:
            fields.update(_read_targets(targets, ignore_index, vocab_start, shard_rows))
        except _Traced:
            raise  # (before any collective: every rank is traced alike)
        except Exception as err:  # noqa: BLE001  (reported on every rank, after the collective)
            problem = err
    if problem is None:
        fields.update(vocab_start=vocab_start, shard_rows=shard_rows, call_crc=zlib.crc32(call.encode()))
        text = call
    else:
        fields["failed"] = 1
        text = f"{type(problem).__name__}: {problem}"
    raw = list(text.encode()[:_TEXT_BYTES])
    row = [fields[k] for k in _FIELDS] + raw + [0] * (_TEXT_BYTES - len(raw))
    table = mx.distributed.all_gather(mx.array([row], mx.int64), group=group).tolist()
    ranks = [dict(zip(_FIELDS, r[: len(_FIELDS)])) for r in table]
    texts = [bytes(r[len(_FIELDS):]).rstrip(b"\0").decode(errors="replace") for r in table]

    failed = [r for r, f in enumerate(ranks) if f["failed"]]
    if failed:
        if problem is not None:
            raise problem
        raise ValueError(f"{name}: rank(s) {failed} rejected their arguments: "
                         + "; ".join(f"rank {r}: {texts[r]}" for r in failed))
    if len({f["call_crc"] for f in ranks}) > 1:
        raise ValueError(f"{name}: the ranks were called with different shapes, dtypes or options: "
                         + "; ".join(f"rank {r}: {t}" for r, t in enumerate(texts)))
    if len({f["targets_crc"] for f in ranks}) > 1:
        raise ValueError(f"{name}: the ranks hold different targets (every rank of a vocabulary-parallel "
                         "loss needs the same batch)")
    order = sorted(range(len(ranks)), key=lambda r: ranks[r]["vocab_start"])
    shards = "; ".join(f"rank {r}: [{ranks[r]['vocab_start']}, {ranks[r]['vocab_start'] + ranks[r]['shard_rows']})"
                       for r in range(len(ranks)))
    end = 0
    for r in order:
        if ranks[r]["vocab_start"] != end:
            raise ValueError(f"{name}: the shards must tile [0, V) without gaps or overlaps, "
                             f"in any order of ranks; got {shards}")
        end += ranks[r]["shard_rows"]
    first = ranks[0]
    if sum(f["owned"] for f in ranks) != first["kept"]:
        missing = first["kept"] - sum(f["owned"] for f in ranks)
        raise ValueError(f"{name}: {missing} target(s) lie outside [0, {end}), the classes the ranks' "
                         f"shards hold ({shards}); kept targets range over [{first['kept_min']}, "
                         f"{first['kept_max']}] (give padding rows ignore_index or mask them)")
    return end


def _check_vocab_start(vocab_start) -> int:
    vocab_start = _int_option(vocab_start, "vocab_start")
    if vocab_start < 0:
        raise ValueError(f"vocab_start (the global index of this rank's first class) must be >= 0, got {vocab_start}")
    return vocab_start


# ---- vocabulary-parallel: the merge -----------------------------------------------------------


# The argmax travels in the float32 gather as two exact float32 digits
# (argmax = hi * _DIGIT + lo, exact below 2^36 classes): one collective per
# call, not a second round trip, and no two independent collectives, which
# every rank would have to run in the same order.
_DIGIT = 4096


def _merge(stats: Dict[str, mx.array], owned: mx.array, shard_rows: int, group, *, smoothing: bool,
           with_stats: bool):
    """The full head's per-row statistics from every rank's shard statistics,
    by one all_gather of [N, k] float32 columns: lse, target, owned, and
    logit_sum and the shard's size with smoothing, max, expected and the
    argmax's two digits for the stats. Returns a dict of [N] arrays: lse,
    target, owners, (logit_sum, classes), (max, expected, argmax)."""
    rows = stats["lse"].size
    names = ["lse", "target", "owners"]
    cols = [stats["lse"], stats["target"], owned.astype(mx.float32)]
    if smoothing:
        names += ["logit_sum", "classes"]
        cols += [stats["logit_sum"], mx.full(stats["lse"].shape, float(shard_rows), mx.float32)]
    if with_stats:
        argmax = mx.stop_gradient(stats["argmax"]).astype(mx.int64)
        names += ["max", "expected", "argmax_hi", "argmax_lo"]
        cols += [mx.stop_gradient(stats["max"]), mx.stop_gradient(stats["expected"]), argmax // _DIGIT,
                 argmax % _DIGIT]
    local = mx.stack([c.reshape(-1).astype(mx.float32) for c in cols], axis=-1)  # [N, k]
    size = group.size()
    # Every rank enters this collective (and only this one) in every call.
    gathered = mx.distributed.all_gather(local, group=group).reshape(size, rows, len(names))  # [P, N, k]
    col = {n: gathered[..., i] for i, n in enumerate(names)}
    out = {"lse": mx.logsumexp(col["lse"], axis=0)}
    for n in ("target", "owners", "logit_sum", "classes"):
        if n in col:
            out[n] = col[n].sum(axis=0)
    if with_stats:
        lse = mx.stop_gradient(out["lse"])
        out["max"] = col["max"].max(axis=0)
        out["expected"] = (mx.exp(mx.stop_gradient(col["lse"]) - lse) * col["expected"]).sum(axis=0)
        # The first global index of the maximum: the smallest argmax among
        # the ranks whose shard holds the maximum (shards in any order).
        arg = col["argmax_hi"].astype(mx.int64) * _DIGIT + col["argmax_lo"].astype(mx.int64)
        big = mx.array(2**63 - 1, mx.int64)
        out["argmax"] = mx.where(col["max"] == out["max"], arg, big).min(axis=0)
    return out


def _rows_and_stats(merged, kept, targets_shape, *, label_smoothing, label_smoothing_mode, z_loss,
                    with_stats):
    """Per-row losses (0 on ignored rows, NaN on kept rows no shard owns, as
    the unsharded loss's out-of-range rows) and the stats."""
    lse, target = merged["lse"], merged["target"]
    if label_smoothing:
        k = merged["classes"]
        if label_smoothing_mode == "others":
            # (one class has no others: the target keeps its mass, as csrc/math/cross_entropy.h)
            c_other = mx.where(k > 1, label_smoothing / mx.maximum(k - 1, 1), 0.0)
            c_target = mx.where(k > 1, 1.0 - label_smoothing - c_other, 1.0)
        else:
            c_other = label_smoothing / k
            c_target = mx.array(1.0 - label_smoothing, mx.float32)
        # sum_j q_j (lse - z_j) with sum_j q_j = 1
        row = lse - c_target * target - c_other * merged["logit_sum"]
    else:
        row = lse - target
    if z_loss:
        row = row + z_loss * lse * lse
    kept = kept.reshape(-1)
    owned = merged["owners"] > 0
    row = mx.where(kept, mx.where(owned, row, mx.array(float("nan"), mx.float32)), 0.0)
    row = row.reshape(targets_shape)
    if not with_stats:
        return row, None
    flat_lse = mx.stop_gradient(lse)
    correct = kept & owned & (mx.stop_gradient(target) == merged["max"])
    stats = {
        "lse": flat_lse.reshape(targets_shape),
        "entropy": (flat_lse - merged["expected"]).reshape(targets_shape),
        "correct": correct.reshape(targets_shape),
        "argmax": merged["argmax"].reshape(targets_shape),
    }
    return row, stats


def _prepare_targets(targets, mask, ignore_index):
    """(targets, ignore_index, kept) with masked rows turned into ignored
    rows, as linear_cross_entropy does."""
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise TypeError(f"targets holds class indices and must have an integer dtype, got {targets.dtype}")
    ignore_index = _ignore_index_for(targets, ignore_index)
    if mask is not None:
        if mask.dtype != mx.bool_:
            raise TypeError(f"mask must be a bool array (rows to count), got {mask.dtype}")
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have targets' shape {targets.shape}, got {mask.shape}")
        targets, ignore_index = _masked_targets(targets, mask, ignore_index)
    kept = targets != ignore_index if ignore_index is not None else mx.ones(targets.shape, mx.bool_)
    return targets, ignore_index, kept


def _check_weights(weights, targets):
    if weights is None:
        return None
    weights = _as_array(weights, "weights")
    if not mx.issubdtype(weights.dtype, mx.floating):
        raise TypeError(f"weights (per-token) must be floating, got {weights.dtype}")
    if weights.shape != targets.shape:
        raise ValueError(f"weights (per-token) must have targets' shape {targets.shape}, got {weights.shape}")
    return weights


def _finish_loss(rows, weights, reduction, result_dtype, targets, ignore_index):
    if weights is not None:
        rows = rows * weights.astype(mx.float32)
    count = _kept_rows(targets, ignore_index) if reduction == "mean" else None
    return _finish(rows, reduction, result_dtype, count)


def _run(name, group, checks, validate, build):
    """Run ``checks`` (the local argument checks; returns the values the
    validation and the graph need), the validating collective when asked,
    then ``build``. With ``validate`` and several ranks, a check that fails
    is raised after the collective, on every rank, so that no rank is left
    waiting in it."""
    try:
        checked = checks()
    except (TypeError, ValueError) as err:
        if not validate or group.size() == 1:
            raise
        _validate(name, group, err, 0, 0, "", None, None)  # raises, on every rank
        raise AssertionError("unreachable: _validate raises for a failed rank") from err
    if validate:
        vocab_start, shard_rows, call, targets, ignore_index = checked["validation"]
        _validate(name, group, None, vocab_start, shard_rows, call, targets, ignore_index)
    return build(checked)


# ---- vocabulary-parallel: the public losses ---------------------------------------------------


def vocab_parallel_linear_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    targets: mx.array,
    bias: Optional[mx.array] = None,
    *,
    vocab_start: int,
    group: Optional["mx.distributed.Group"] = None,
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
    validate: bool = True,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, Dict[str, mx.array]]]:
    """:func:`mlx_fused_losses.linear_cross_entropy` with the head sharded
    over the vocabulary across the ranks of ``group``.

    Rank ``r`` passes the same ``hidden`` and ``targets`` as every other rank
    (global class indices), and its own rows ``weight[vocab_start :
    vocab_start + V_r]`` of the ``[V, H]`` head (and of ``bias``): the layout
    ``mlx.nn.layers.distributed.shard_linear(head, "all-to-sharded")`` makes.
    The shards must tile ``[0, V)``, in any order of ranks. Every rank gets
    the loss of the full head (and ``stats``), equal to the single-process
    loss to float32 rounding; backward, the weight's (and bias') gradient is
    this rank's shard, the hidden states' gradient is all-summed (the full
    gradient, on every rank).

    Each rank computes per-row statistics of its shard (log-sum-exp, the
    target's logit where it owns the target, the logits' sum for label
    smoothing) chunk by chunk, as the unsharded loss: no rank holds its
    ``N x V_r`` logits. One ``all_gather`` of those ``[N]`` statistics merges
    them, plus one ``all_sum`` of the hidden states' gradient backward.

    Options as :func:`mlx_fused_losses.linear_cross_entropy` (smoothing over
    all ``V`` classes, ``z_loss`` on the full log-sum-exp, the soft-cap, a
    quantized shard). ``return_stats`` adds ``"argmax"`` (int64, global
    index) to lse, entropy and correct.

    ``validate=True`` (default) first runs one small collective that checks
    what the ranks must agree on: shapes, dtypes and options, the same
    targets, shards that tile ``[0, V)``, and kept targets inside
    ``[0, V)``; on a mismatch every rank raises the same ``ValueError``
    (a local argument error is raised on every rank too) instead of
    hanging in a collective. It reads the targets on the host (a
    synchronisation per call) and cannot run under ``mx.compile``: pass
    ``validate=False`` there, on every rank alike. Unvalidated, a kept
    target no shard holds gives a NaN row (as an out-of-range class in the
    unsharded loss).

    A group of size 1 (``mlx.launch`` not used) is the unsharded loss:
    ``vocab_start`` must then be 0 and ``weight`` the whole head.
    """
    name = "vocab_parallel_linear_cross_entropy"
    group = _group(group)

    def checks():
        nonlocal hidden, weight, targets, bias, mask, weights, scales, biases, global_scale
        hidden = _as_array(hidden, "hidden")
        weight = _as_array(weight, "weight")
        targets = _as_array(targets, "targets")
        start = _check_vocab_start(vocab_start)
        options = _linear_cross_entropy_options(label_smoothing, reduction, label_smoothing_mode, ignore_index,
                                                z_loss, logit_softcap, chunk_bytes, dtype)
        quant = _quantization_params(mode, group_size, bits)
        bias, scales, biases, mask, global_scale = (
            None if value is None else _as_array(value, arg)
            for value, arg in ((bias, "bias"), (scales, "scales"), (biases, "biases"), (mask, "mask"),
                               (global_scale, "global_scale")))
        if weight.ndim != 2:
            raise ValueError(f"weight (this rank's shard of the head) must be [V_r, H], got shape {weight.shape}")
        if hidden.ndim < 1 or targets.shape != hidden.shape[:-1]:
            raise ValueError(f"targets must have hidden's shape without H, {hidden.shape[:-1]}, "
                             f"got {targets.shape}")
        if scales is None and weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"weight's shard [V_r, H] = {weight.shape} does not match hidden's H = "
                             f"{hidden.shape[-1]}")
        shard_rows = weight.shape[0]
        if shard_rows == 0:
            raise ValueError("weight (this rank's shard of the head) has no rows: every rank needs >= 1 class")
        if bias is not None and bias.shape != (shard_rows,):
            raise ValueError(f"bias must be this rank's [V_r] = [{shard_rows}] slice, got shape {bias.shape}")
        t, ignore, kept = _prepare_targets(targets, mask, options[1])
        w = _check_weights(weights, targets)
        call = (f"{name}(hidden {hidden.shape} {hidden.dtype}, weight [V_r, {weight.shape[1]}] {weight.dtype}, "
                f"bias {bias is not None}, options {options}, quantization {quant} {mode} "
                f"{None if scales is None else scales.dtype}, reduction {reduction}, mask {mask is not None}, "
                f"weights {None if w is None else (w.shape, w.dtype)}, return_stats {bool(return_stats)})")
        return {"validation": (start, shard_rows, call, t, ignore), "options": options, "quant": quant,
                "t": t, "ignore": ignore, "kept": kept, "weights": w, "shard_rows": shard_rows}

    def build(c):
        smoothing, ignore, z, softcap, chunk = c["options"]
        outputs = ["lse", "target"] + (["logit_sum"] if smoothing else []) + (
            ["max", "argmax", "expected"] if return_stats else [])
        quantization = dict(scales=scales, biases=biases, group_size=c["quant"][0], bits=c["quant"][1],
                            mode=mode, global_scale=global_scale)
        start = c["validation"][0]
        stats = _linear_shard_stats(sum_gradients(group)(hidden), weight, c["t"], bias,
                                    vocab_start=start, outputs=outputs, logit_softcap=softcap, ignore_index=c["ignore"],
                                    chunk_bytes=chunk, quantization=quantization, stream=stream)
        return _loss(c, stats, group, smoothing, label_smoothing_mode, z, return_stats, reduction,
                     _result_dtype(dtype, hidden.dtype), start)

    return _run(name, group, checks, validate, build)


def vocab_parallel_cross_entropy(
    logits: mx.array,
    targets: mx.array,
    weights: Optional[mx.array] = None,
    *,
    vocab_start: int,
    group: Optional["mx.distributed.Group"] = None,
    label_smoothing: float = 0.0,
    reduction: Literal["none", "mean", "sum"] = "none",
    label_smoothing_mode: Literal["uniform", "others"] = "uniform",
    ignore_index: Optional[int] = None,
    z_loss: float = 0.0,
    logit_softcap: Optional[float] = None,
    return_stats: bool = False,
    validate: bool = True,
    dtype: Optional[mx.Dtype] = None,
    stream: Union[None, mx.Stream, mx.Device] = None,
) -> Union[mx.array, Tuple[mx.array, Dict[str, mx.array]]]:
    """:func:`mlx_fused_losses.cross_entropy` on logits sharded over the
    vocabulary: rank ``r`` holds the columns ``[vocab_start, vocab_start +
    V_r)`` of the ``[..., V]`` logits (what a head sharded with
    ``shard_linear(head, "all-to-sharded")`` outputs) and the same class
    index targets as every rank. The loss, the same on every rank, is the
    full logits' loss to float32 rounding; the gradient w.r.t. this rank's
    logits is its slice of the full gradient (MLX's sharded layer all-sums
    the gradient of its input itself).

    Class axis last; class-index targets only (probability targets and
    ``class_weights`` are not supported sharded). ``weights``, smoothing,
    ``ignore_index``, ``z_loss``, ``logit_softcap``, ``return_stats``
    (lse, entropy, correct, argmax), ``validate`` and a group of size 1 as
    :func:`vocab_parallel_linear_cross_entropy`.
    """
    name = "vocab_parallel_cross_entropy"
    group = _group(group)

    def checks():
        nonlocal logits, targets
        logits = _as_array(logits, "logits")
        targets = _as_array(targets, "targets")
        start = _check_vocab_start(vocab_start)
        smoothing, ignore, _, z, softcap = _cross_entropy_options(
            label_smoothing, reduction, label_smoothing_mode, ignore_index, None, z_loss, dtype,
            logit_softcap=logit_softcap)
        if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
            raise ValueError(f"targets must be class indices of logits' shape without its last (class) axis, "
                             f"{logits.shape[:-1]}, got {targets.shape} (probability targets are not supported "
                             "sharded)")
        if not mx.issubdtype(logits.dtype, mx.floating):
            raise TypeError(f"logits must be floating, got {logits.dtype}")
        shard_rows = logits.shape[-1]
        if shard_rows == 0:
            raise ValueError("logits (this rank's shard) have no classes: every rank needs >= 1 class")
        t, ignore, kept = _prepare_targets(targets, None, ignore)
        w = _check_weights(weights, targets)
        call = (f"{name}(logits {logits.shape[:-1]} x V_r {logits.dtype}, options "
                f"{(smoothing, label_smoothing_mode, ignore, z, softcap)}, reduction {reduction}, "
                f"weights {None if w is None else (w.shape, w.dtype)}, return_stats {bool(return_stats)})")
        return {"validation": (start, shard_rows, call, t, ignore), "options": (smoothing, ignore, z, softcap),
                "t": t, "ignore": ignore, "kept": kept, "weights": w, "shard_rows": shard_rows}

    def build(c):
        smoothing, ignore, z, softcap = c["options"]
        outputs = ["lse", "target"] + (["logit_sum"] if smoothing else []) + (
            ["max", "argmax", "expected"] if return_stats else [])
        start = c["validation"][0]
        stats = _logits_shard_stats(logits, c["t"], vocab_start=start, outputs=outputs,
                                    logit_softcap=softcap, ignore_index=c["ignore"], stream=stream)
        return _loss(c, stats, group, smoothing, label_smoothing_mode, z, return_stats, reduction,
                     _result_dtype(dtype, logits.dtype), start)

    return _run(name, group, checks, validate, build)


def _loss(c, stats, group, smoothing, label_smoothing_mode, z, return_stats, reduction, result_dtype,
          vocab_start):
    t, kept = c["t"], c["kept"]
    owned = kept & (t >= vocab_start) & (t < vocab_start + c["shard_rows"])
    if t.size == 0:  # nothing to gather (every rank alike: the row count is validated)
        merged = {k: mx.zeros((0,), mx.float32) for k in ("lse", "target", "owners", "logit_sum", "classes",
                                                           "max", "expected")}
        merged["argmax"] = mx.zeros((0,), mx.int64)
    else:
        merged = _merge(stats, owned, c["shard_rows"], group, smoothing=bool(smoothing), with_stats=return_stats)
    rows, row_stats = _rows_and_stats(merged, kept, t.shape, label_smoothing=smoothing,
                                      label_smoothing_mode=label_smoothing_mode, z_loss=z,
                                      with_stats=return_stats)
    loss = _finish_loss(rows, c["weights"], reduction, result_dtype, t, c["ignore"])
    return (loss, row_stats) if return_stats else loss
