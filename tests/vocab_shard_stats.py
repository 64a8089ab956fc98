"""Per-shard row statistics from materialised logits: the tests' stand-in for
the row-statistics primitive (``_ext.linear_row_stats`` / ``_ext.row_stats``)
while a build lacks it, with the contract ``mlx_fused_losses.distributed``
documents for ``_linear_shard_stats`` / ``_logits_shard_stats``. It holds the
shard's N x V_r logits, so it is for tests only; the package never ships it.

``install()`` puts it in place only where the build has no primitive, so the
same tests run the primitive once it is built.
"""

import mlx.core as mx

import mlx_fused_losses.distributed as fld
from mlx_fused_losses import _ext


def logits_shard_stats(logits, targets, *, vocab_start, outputs, logit_softcap, stream=None):
    z = logits.astype(mx.float32)
    if logit_softcap is not None:
        z = logit_softcap * mx.tanh(z / logit_softcap)
    shard_rows = z.shape[-1]
    lse = mx.logsumexp(z, axis=-1)
    local = targets.astype(mx.int64) - vocab_start
    inside = (local >= 0) & (local < shard_rows)
    picked = mx.take_along_axis(z, mx.clip(local, 0, shard_rows - 1)[..., None], axis=-1).squeeze(-1)
    out = {"lse": lse, "target": mx.where(inside, picked, 0.0)}
    if "logit_sum" in outputs:
        out["logit_sum"] = z.sum(axis=-1)
    if "expected" in outputs:
        out["expected"] = (mx.softmax(z, axis=-1) * z).sum(axis=-1)
    if "max" in outputs:
        out["max"] = mx.stop_gradient(z.max(axis=-1))
    if "argmax" in outputs:
        out["argmax"] = mx.stop_gradient(mx.argmax(z, axis=-1).astype(mx.int64) + vocab_start)
    return out


def linear_shard_stats(hidden, weight, targets, bias, *, vocab_start, outputs, logit_softcap, chunk_bytes,
                       quantization, stream=None):
    if quantization["scales"] is not None:
        weight = mx.dequantize(weight, quantization["scales"], quantization["biases"],
                               group_size=quantization["group_size"], bits=quantization["bits"],
                               mode=quantization["mode"])
    z = hidden.astype(mx.float32) @ weight.astype(mx.float32).T
    if bias is not None:
        z = z + bias.astype(mx.float32)
    return logits_shard_stats(z, targets, vocab_start=vocab_start, outputs=outputs, logit_softcap=logit_softcap)


def install() -> bool:
    """Use the materialised statistics where the build has no primitive;
    True if they were installed."""
    if hasattr(_ext, "linear_row_stats") and hasattr(_ext, "row_stats"):
        return False
    fld._linear_shard_stats = linear_shard_stats
    fld._logits_shard_stats = logits_shard_stats
    return True
