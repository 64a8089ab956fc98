"""Losses for mlx-lm's trainer (the optional extra ``mlx-fused-losses[lm]``).

Both functions have the signature ``mlx_lm.tuner.trainer.train`` and
``evaluate`` take as ``loss=``: ``fn(model, batch, lengths) -> (loss, ntoks)``,
with mlx-lm's ``default_loss`` semantics: ``batch[:, :-1]`` predicts
``batch[:, 1:]``, a token counts when its position ``p`` (1-based) satisfies
``lengths[:, 0] <= p <= lengths[:, 1]``, and the loss is the float32 sum over
counted tokens divided by their number ``ntoks``.

- :func:`lm_loss` runs the whole model and puts our fused ``cross_entropy`` on
  its logits (a drop-in for ``default_loss``).
- :func:`linear_lm_loss` runs only the model's body and fuses the output head
  into ``linear_cross_entropy``: the ``[batch, length, vocabulary]`` logits are
  never formed, forward or backward.

Options of the loss (``label_smoothing``, ``z_loss``, ...) are keywords; bind
them with ``functools.partial(linear_lm_loss, z_loss=1e-4)``.

This module does not import mlx_lm: it works on any model with the structure
described in :func:`find_lm_head`, and mlx-lm's LoRA layers are recognised
by their attributes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from .losses import _masked_targets, cross_entropy


def _shift_and_mask(batch: mx.array, lengths: mx.array):
    """Inputs, next-token targets and the mask of counted tokens, exactly as
    mlx_lm.tuner.trainer.default_loss forms them."""
    if not isinstance(batch, mx.array) or batch.ndim != 2:
        raise ValueError(
            f"batch must be a [batch, length] array of token ids, got "
            f"{getattr(batch, 'shape', type(batch).__name__)}"
        )
    if not isinstance(lengths, mx.array) or lengths.shape != (batch.shape[0], 2):
        raise ValueError(
            f"lengths must be a [batch, 2] array of (offset, length) as mlx-lm's "
            f"iterate_batches yields, got {getattr(lengths, 'shape', type(lengths).__name__)}"
        )
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    return inputs, targets, mask


def lm_loss(
    model: nn.Module,
    batch: mx.array,
    lengths: mx.array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
    """Drop-in for ``mlx_lm.tuner.trainer.default_loss`` with our fused
    cross-entropy on the model's logits. Masked tokens are ignored rows (loss
    and gradient 0); the per-token losses are summed in float32 (not rounded
    to a 16-bit model's dtype first, as default_loss does) and divided by
    ``ntoks``. Returns ``(loss, ntoks)``."""
    inputs, targets, mask = _shift_and_mask(batch, lengths)
    logits = model(inputs)
    # masked tokens are ignored rows, by the rule linear_cross_entropy's mask follows
    targets, ignored = _masked_targets(targets, mask, None)
    total = cross_entropy(
        logits,
        targets,
        ignore_index=ignored,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction="sum",
        dtype=mx.float32,
    )
    ntoks = mask.sum()
    return total / ntoks, ntoks


# --------------------------------------------------------------------------
# The output head of an mlx-lm model
# --------------------------------------------------------------------------
class LMHead(NamedTuple):
    """Where a model's logits come from: ``logits = head(body(inputs) * scale)``,
    then ``softcap * tanh(logits / softcap)`` when ``softcap`` is set.

    ``layer`` is the module that holds the projection (an ``nn.Linear``,
    ``nn.Embedding`` used as a tied head, their quantized forms, or an
    mlx-lm LoRA wrapper of the unquantized ones); ``path`` its name in the
    model. The arrays are read from ``layer`` at every call, so the
    parameters being traced by ``nn.value_and_grad`` are the ones used."""

    layer: nn.Module
    path: str
    scale: Optional[float]
    softcap: Optional[float]


def _granite_scale(model):
    return 1.0 / float(model.logits_scaling)


def _cohere_scale(model):
    return float(model.model.args.logit_scale)


# model_type -> (function giving the hidden-state scale, or None; name of the
# model attribute holding the final logit softcap, or None). Each entry is a
# model whose __call__ is `body -> (lm_head | tied embed_tokens) -> that
# scale/softcap` and nothing else, and is checked against the model's own
# logits in tests/test_lm.py. Other model types may transform their logits
# in ways this adapter cannot see, so they are refused rather than guessed.
_SUPPORTED = {
    "llama": (None, None),
    "mistral": (None, None),
    "qwen2": (None, None),
    "qwen3": (None, None),
    "gemma2": (None, "final_logit_softcapping"),
    "granite": (_granite_scale, None),
    "cohere": (_cohere_scale, None),
}


def _model_type(model) -> Optional[str]:
    model_type = getattr(model, "model_type", None)
    if model_type is None:
        model_type = getattr(getattr(model, "args", None), "model_type", None)
    return model_type


def _is_tied(model) -> bool:
    tied = getattr(model, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", None)
    if tied is None:
        tied = "lm_head" not in model
    return bool(tied)


def find_lm_head(model: nn.Module) -> LMHead:
    """The output projection of an mlx-lm model (``model.lm_head``, or the tied
    ``model.model.embed_tokens``), with the scale and softcap its
    ``__call__`` applies. Raises ValueError naming what is missing for a
    model of another structure."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
    model_type = _model_type(model)
    if model_type not in _SUPPORTED:
        raise ValueError(
            f"linear_lm_loss does not know how model_type {model_type!r} "
            f"({type(model).__module__}.{type(model).__name__}) forms its logits; "
            f"supported: {sorted(_SUPPORTED)}. Use mlx_fused_losses.lm.lm_loss "
            "(fused cross-entropy on the model's logits) for this model."
        )
    body = getattr(model, "model", None)
    if not isinstance(body, nn.Module):
        raise ValueError(
            f"model ({model_type}) has no body module `model.model` returning "
            "the final hidden states"
        )
    if _is_tied(model):
        layer, path = getattr(body, "embed_tokens", None), "model.embed_tokens"
    else:
        layer, path = getattr(model, "lm_head", None), "lm_head"
    if not isinstance(layer, nn.Module):
        raise ValueError(f"model ({model_type}) has no output head `{path}`")
    scale_of, softcap_attr = _SUPPORTED[model_type]
    scale = scale_of(model) if scale_of is not None else None
    softcap = getattr(model, softcap_attr, None) if softcap_attr else None
    return LMHead(layer, path, scale, None if softcap is None else float(softcap))


def _is_lora(layer) -> bool:
    # mlx_lm.tuner.lora.LoRALinear / LoRAEmbedding (not imported: mlx_lm is
    # optional); DoRA layers have a `m` magnitude vector and are refused.
    return hasattr(layer, "lora_a") and hasattr(layer, "lora_b")


def _head_operands(layer: nn.Module, path: str, hidden: mx.array):
    """(hidden, weight [V, H'], keyword arguments of linear_cross_entropy) with
    ``hidden @ weight.T (+ bias)`` equal to the layer's logits."""
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        # Every mode of mx.quantize (affine at any bits, mxfp4/mxfp8/nvfp4:
        # no biases) is read by the kernels as the layer holds it.
        kwargs = dict(
            scales=layer["scales"],
            biases=layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        if "bias" in layer:
            kwargs["bias"] = layer["bias"]
        return hidden, layer["weight"], kwargs
    if isinstance(layer, nn.Linear):
        return hidden, layer.weight, ({"bias": layer.bias} if "bias" in layer else {})
    if isinstance(layer, nn.Embedding):
        return hidden, layer.weight, {}
    if _is_lora(layer) and not hasattr(layer, "m"):
        # LoRA: logits = base(x) + scale * (dropout(x) @ a) @ b. Appending the
        # rank-r factor to the hidden state and b^T to the weight gives the
        # same logits from one [V, H + r] projection (no [V, H] sum formed).
        base = layer.linear if hasattr(layer, "linear") else layer.embedding
        if isinstance(base, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            raise ValueError(
                f"{path}: a LoRA adapter on a quantized head is not supported by "
                "linear_lm_loss (the adapter and the quantized matrix cannot share "
                "one projection); use lm_loss"
            )
        h, weight, kwargs = _head_operands(base, f"{path}.base", hidden)
        x = layer.dropout(hidden)
        if hasattr(layer, "linear"):  # a: [H, r], b: [r, V]
            low_rank, factor = x @ layer.lora_a, layer.lora_b.T
        else:  # LoRAEmbedding.as_linear: a: [V, r], b: [r, H]
            low_rank, factor = x @ layer.lora_b.T, layer.lora_a
        low_rank = (layer.scale * low_rank).astype(h.dtype)
        h = mx.concatenate([h, low_rank], axis=-1)
        weight = mx.concatenate([weight, factor.astype(weight.dtype)], axis=-1)
        return h, weight, kwargs
    raise ValueError(
        f"{path}: unsupported head layer {type(layer).__name__} (expected "
        "nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding or "
        "an mlx-lm LoRA wrapper of an unquantized one)"
    )


def linear_lm_loss(
    model: nn.Module,
    batch: mx.array,
    lengths: mx.array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_bytes: Optional[int] = None,
):
    """mlx-lm's loss without the logits: runs ``model.model`` (the body) and
    computes the cross-entropy of its output head with the fused
    ``linear_cross_entropy``, with default_loss's mask and normalisation.
    Works with a quantized head (QLoRA: the head is frozen, the gradient
    flows to the hidden states) and a tied embedding. Returns
    ``(loss, ntoks)``."""
    from . import linear_cross_entropy

    head = find_lm_head(model)
    inputs, targets, mask = _shift_and_mask(batch, lengths)
    hidden = model.model(inputs)
    if head.scale is not None:
        hidden = hidden * head.scale
    hidden, weight, head_kwargs = _head_operands(head.layer, head.path, hidden)
    if head.scale is not None and "bias" in head_kwargs:
        # scaling the hidden state scales h @ W.T but not the bias
        raise ValueError(f"{head.path}: a logit scale with a head bias is not supported")
    total = linear_cross_entropy(
        hidden,
        weight,
        targets,
        mask=mask,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=head.softcap,
        chunk_bytes=chunk_bytes,
        reduction="sum",
        dtype=mx.float32,
        **head_kwargs,
    )
    ntoks = mask.sum()
    return total / ntoks, ntoks
