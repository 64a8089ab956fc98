"""Float64 NumPy reference implementations of every loss and its gradient.

Everything here is written directly from the mathematical definitions in the
API description (not from the package), computed in float64.  The functions
take NumPy arrays (any float dtype; they are upcast to float64) and return
float64 NumPy arrays.

Conventions
-----------
* ``*_loss`` functions return the reduced loss (shape of the batch for
  ``reduction="none"``, a 0-d array otherwise).
* ``*_grad`` functions return the gradient of ``sum(cotangent * loss)`` with
  respect to the first argument (logits / predictions / inputs); the
  cotangent has the shape of the reduced loss and defaults to ones.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "logsumexp",
    "ce_target_dist",
    "cross_entropy",
    "cross_entropy_grad",
    "smooth_l1",
    "smooth_l1_grad",
    "huber",
    "huber_grad",
    "sigmoid_focal",
    "sigmoid_focal_grad",
    "softmax_focal",
    "softmax_focal_grad",
    "reduce",
    "reduce_cotangent",
    "distill_rows",
    "distill_grad",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _f64(a):
    return np.asarray(a, dtype=np.float64)


def logsumexp(x, axis=-1, keepdims=False):
    """Stable logsumexp in float64. A row of all -inf gives -inf; a row
    containing +inf gives +inf; NaN propagates."""
    x = _f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = np.sum(np.exp(x - m_safe), axis=axis, keepdims=True)
        out = np.log(s) + m_safe
    # +inf anywhere in a row -> +inf
    out = np.where(np.isposinf(m), np.inf, out)
    if not keepdims:
        out = np.squeeze(out, axis=axis)
    return out


def reduce(loss, reduction, denominator=None):
    loss = _f64(loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.asarray(loss.sum())
    if reduction == "mean":
        if denominator is None:
            denominator = loss.size
        if denominator == 0:
            # a mean over nothing is 0; a NaN (out-of-range) row still shows
            return np.asarray(loss.sum() * 0.0)
        return np.asarray(loss.sum() / denominator)
    raise ValueError(reduction)


def reduce_cotangent(shape, reduction, cotangent=None, denominator=None):
    """Cotangent w.r.t. the *unreduced* per-element loss."""
    n = int(np.prod(shape)) if len(shape) else 1
    if cotangent is None:
        cotangent = np.ones(shape if reduction == "none" else ())
    cotangent = _f64(cotangent)
    if reduction == "none":
        return np.broadcast_to(cotangent, shape).copy()
    if reduction == "sum":
        return np.full(shape, float(cotangent))
    if reduction == "mean":
        if denominator is None:
            denominator = n
        if denominator == 0:
            return np.zeros(shape)
        return np.full(shape, float(cotangent) / denominator)
    raise ValueError(reduction)


# --------------------------------------------------------------------------
# cross entropy
# --------------------------------------------------------------------------
def _ce_prepare(logits, targets, axis):
    x = _f64(logits)
    axis = axis % x.ndim
    x = np.moveaxis(x, axis, -1)
    t = np.asarray(targets)
    is_prob = t.ndim == np.ndim(logits)
    if is_prob:
        t = np.moveaxis(_f64(t), axis, -1)
    else:
        t = t.astype(np.int64)
    return x, t, is_prob, axis


def ce_target_dist(t, K, is_prob, label_smoothing=0.0, mode="uniform",
                   valid=None):
    """The (smoothed) target distribution q, shape [..., K], float64.

    For class indices, rows whose index is invalid (out of range/ignored)
    get a zero row (the caller handles them)."""
    eps = float(label_smoothing)
    if is_prob:
        t = _f64(t)
        if mode == "uniform":
            return (1.0 - eps) * t + eps / K
        if mode == "others":
            if K == 1:
                return t.copy()
            return (1.0 - eps) * t + eps / (K - 1) * (1.0 - t)
        raise ValueError(mode)
    t = np.asarray(t, dtype=np.int64)
    if valid is None:
        valid = (t >= 0) & (t < K)
    onehot = np.zeros(t.shape + (K,))
    tt = np.where(valid, t, 0)
    np.put_along_axis(onehot, tt[..., None], 1.0, axis=-1)
    onehot *= valid[..., None]
    if mode == "uniform":
        q = (1.0 - eps) * onehot + eps / K
    elif mode == "others":
        if K == 1:
            q = onehot
        else:
            q = (1.0 - eps) * onehot + eps / (K - 1) * (1.0 - onehot)
    else:
        raise ValueError(mode)
    return q * valid[..., None]


def _ce_rows(logits, targets, axis, label_smoothing, mode, ignore_index,
             class_weights, z_loss):
    """Per-row pieces. Returns dict with x (moved, [...,K]), q, w, lse, p,
    masks and the per-row (unweighted, unreduced) loss."""
    x, t, is_prob, axis = _ce_prepare(logits, targets, axis)
    K = x.shape[-1]
    w = np.ones(K) if class_weights is None else _f64(class_weights)
    if is_prob:
        ignored = np.zeros(x.shape[:-1], bool)
        oob = np.zeros(x.shape[:-1], bool)
        valid = ~ignored
    else:
        ignored = (t == ignore_index) if ignore_index is not None else \
            np.zeros(t.shape, bool)
        oob = (~ignored) & ((t < 0) | (t >= K))
        valid = ~ignored & ~oob
    q = ce_target_dist(t, K, is_prob, label_smoothing, mode,
                       None if is_prob else valid)
    wq = w * q
    lse = logsumexp(x, axis=-1)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # 0 * (lse - (-inf)) := 0 (a class with zero target mass contributes 0)
        terms = np.where(wq == 0, 0.0, wq * (lse[..., None] - x))
        ce_row = terms.sum(-1)
        z_row = z_loss * lse * lse
        row = ce_row + z_row
        p = np.exp(x - lse[..., None])
    row = np.where(ignored, 0.0, row)
    row = np.where(oob, np.nan, row)
    ce_row = np.where(oob, np.nan, np.where(ignored, 0.0, ce_row))
    z_row = np.where(ignored | oob, 0.0, z_row)
    if is_prob:
        cw_t = None
    else:
        cw_t = np.where(valid, w[np.where(valid, t, 0)], 0.0)
    return dict(x=x, t=t, q=q, w=w, wq=wq, lse=lse, p=p, row=row, ce_row=ce_row, z_row=z_row,
                ignored=ignored, oob=oob, valid=valid, is_prob=is_prob,
                axis=axis, cw_t=cw_t, K=K)


def _ce_denominator(r, weights, reduction, ignore_index, class_weights):
    if reduction != "mean":
        return None
    if r["is_prob"]:
        return r["row"].size
    if class_weights is not None:
        # out-of-range rows make the loss NaN anyway
        return float(r["cw_t"][r["valid"]].sum())
    if ignore_index is not None:
        return int((~r["ignored"]).sum())
    return r["row"].size


def _ce_z_denominator(r, reduction, class_weights, z_loss):
    """The mean's denominator of the z term when it differs from the
    cross-entropy's: class-weighted mean over class indices, where the
    cross-entropy is divided by the summed class weights and the z term
    (not class-weighted) by the number of kept rows (Liger's rule)."""
    if reduction != "mean" or r["is_prob"] or class_weights is None or z_loss == 0.0:
        return None
    return int((~r["ignored"]).sum())


def softcap(x, cap):
    """Gemma 2's logit soft-cap ``cap * tanh(x / cap)`` in float64 (None: x)."""
    return _f64(x) if cap is None else cap * np.tanh(_f64(x) / cap)


def cross_entropy(logits, targets, weights=None, axis=-1, label_smoothing=0.0,
                  reduction="none", label_smoothing_mode="uniform",
                  ignore_index=None, class_weights=None, z_loss=0.0, logit_softcap=None):
    logits = softcap(logits, logit_softcap)
    r = _ce_rows(logits, targets, axis, label_smoothing, label_smoothing_mode,
                 ignore_index, class_weights, z_loss)
    wts = 1.0 if weights is None else _f64(weights)
    den = _ce_denominator(r, weights, reduction, ignore_index, class_weights)
    zden = _ce_z_denominator(r, reduction, class_weights, z_loss)
    if zden is not None:
        return reduce(r["ce_row"] * wts, reduction, den) + reduce(r["z_row"] * wts, reduction, zden)
    return reduce(r["row"] * wts, reduction, den)


def cross_entropy_grad(logits, targets, weights=None, axis=-1,
                       label_smoothing=0.0, reduction="none",
                       label_smoothing_mode="uniform", ignore_index=None,
                       class_weights=None, z_loss=0.0, cotangent=None, logit_softcap=None):
    """d/d logits of sum(cotangent * loss); same shape/axis layout as logits.

    d row / d x_k = (sum_j w_j q_j) p_k - w_k q_k + 2 z lse p_k (of the capped
    logits z = c tanh(x / c), times dz/dx = 1 - tanh(x / c)^2 under a cap c)
    """
    if logit_softcap is not None:
        th = np.tanh(_f64(logits) / logit_softcap)
        g = cross_entropy_grad(logit_softcap * th, targets, weights, axis, label_smoothing,
                               reduction, label_smoothing_mode, ignore_index, class_weights,
                               z_loss, cotangent)
        return g * (1.0 - th * th)
    r = _ce_rows(logits, targets, axis, label_smoothing, label_smoothing_mode,
                 ignore_index, class_weights, z_loss)
    den = _ce_denominator(r, weights, reduction, ignore_index, class_weights)
    zden = _ce_z_denominator(r, reduction, class_weights, z_loss)
    g_row = reduce_cotangent(r["row"].shape, reduction, cotangent, den)
    g_zrow = g_row if zden is None else reduce_cotangent(r["row"].shape, reduction, cotangent, zden)
    if weights is not None:
        g_row = g_row * _f64(weights)
        g_zrow = g_zrow * _f64(weights)
    sw = r["wq"].sum(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        d = (sw * r["p"] - r["wq"]) * g_row[..., None] \
            + 2.0 * z_loss * r["lse"][..., None] * r["p"] * g_zrow[..., None]
    d = np.where(r["ignored"][..., None], 0.0, d)
    d = np.where(r["oob"][..., None], np.nan, d)
    g = d
    g = np.where(r["ignored"][..., None], 0.0, g)
    return np.moveaxis(g, -1, r["axis"])


# --------------------------------------------------------------------------
# smooth L1 / Huber
# --------------------------------------------------------------------------
def smooth_l1(predictions, targets, beta=1.0, reduction="mean"):
    d = np.abs(_f64(predictions) - _f64(targets))
    if beta == 0:
        loss = d
    else:
        loss = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return reduce(loss, reduction)


def smooth_l1_grad(predictions, targets, beta=1.0, reduction="mean",
                   cotangent=None, wrt="predictions"):
    diff = _f64(predictions) - _f64(targets)
    d = np.abs(diff)
    if beta == 0:
        g = np.sign(diff)
    else:
        g = np.where(d < beta, diff / beta, np.sign(diff))
    g = g * reduce_cotangent(diff.shape, reduction, cotangent)
    return g if wrt == "predictions" else -g


def huber(inputs, targets, delta=1.0, reduction="none"):
    a = np.abs(_f64(inputs) - _f64(targets))
    loss = np.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))
    return reduce(loss, reduction)


def huber_grad(inputs, targets, delta=1.0, reduction="none", cotangent=None,
               wrt="inputs"):
    diff = _f64(inputs) - _f64(targets)
    g = np.where(np.abs(diff) <= delta, diff, delta * np.sign(diff))
    g = g * reduce_cotangent(diff.shape, reduction, cotangent)
    return g if wrt == "inputs" else -g


# --------------------------------------------------------------------------
# sigmoid focal loss (torchvision semantics)
# --------------------------------------------------------------------------
def _sigmoid(x):
    x = _f64(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _bce_with_logits(x, t):
    x = _f64(x)
    t = _f64(t)
    return np.maximum(x, 0.0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _sigmoid_focal_parts(inputs, targets, alpha, gamma):
    x = _f64(inputs)
    t = _f64(targets)
    p = _sigmoid(x)
    q = _sigmoid(-x)  # 1 - p, computed without cancellation
    ce = _bce_with_logits(x, t)
    m = p * (1.0 - t) + q * t  # 1 - p_t
    a = np.ones_like(x) if alpha < 0 else alpha * t + (1.0 - alpha) * (1.0 - t)
    return x, t, p, q, ce, m, a


def sigmoid_focal(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    x, t, p, q, ce, m, a = _sigmoid_focal_parts(inputs, targets, alpha, gamma)
    mod = np.ones_like(m) if gamma == 0 else m ** gamma
    return reduce(a * ce * mod, reduction)


def sigmoid_focal_grad(inputs, targets, alpha=0.25, gamma=2.0,
                       reduction="none", cotangent=None):
    """dL/dx = a [ (p - t) m^g + ce g m^(g-1) p (1-p) (1 - 2t) ]"""
    x, t, p, q, ce, m, a = _sigmoid_focal_parts(inputs, targets, alpha, gamma)
    if gamma == 0:
        g = a * (p - t)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            second = ce * gamma * m ** (gamma - 1.0) * p * q * (1.0 - 2.0 * t)
        # limit m -> 0: ce ~ m, p q ~ m  => term ~ m^(g+1) -> 0
        second = np.where(m > 0, second, 0.0)
        g = a * ((p - t) * m ** gamma + second)
    return g * reduce_cotangent(x.shape, reduction, cotangent)


# --------------------------------------------------------------------------
# softmax focal loss
# --------------------------------------------------------------------------
def _softmax_focal_parts(logits, targets, alpha, gamma, axis, ignore_index):
    x = np.moveaxis(_f64(logits), axis % np.ndim(logits), -1)
    t = np.asarray(targets).astype(np.int64)
    K = x.shape[-1]
    ignored = (t == ignore_index) if ignore_index is not None else \
        np.zeros(t.shape, bool)
    tt = np.where(ignored, 0, t)
    lse = logsumexp(x, axis=-1)
    xt = np.take_along_axis(x, tt[..., None], -1)[..., 0]
    logp_t = xt - lse
    p_t = np.exp(logp_t)
    u = -np.expm1(logp_t)  # 1 - p_t
    if alpha is None:
        a = np.ones(t.shape)
    elif np.ndim(alpha) == 0:
        a = np.full(t.shape, float(alpha))
    else:
        a = _f64(alpha)[tt]
    return x, tt, K, ignored, lse, logp_t, p_t, u, a


def softmax_focal(logits, targets, alpha=None, gamma=2.0, axis=-1,
                  reduction="none", ignore_index=None):
    x, tt, K, ignored, lse, logp_t, p_t, u, a = _softmax_focal_parts(
        logits, targets, alpha, gamma, axis, ignore_index)
    mod = np.ones_like(u) if gamma == 0 else u ** gamma
    loss = np.where(ignored, 0.0, -a * mod * logp_t)
    den = int((~ignored).sum()) if reduction == "mean" else None
    return reduce(loss, reduction, den)


def softmax_focal_grad(logits, targets, alpha=None, gamma=2.0, axis=-1,
                       reduction="none", ignore_index=None, cotangent=None):
    """dL/dx_k = -a (delta_tk - p_k) [u^g - g u^(g-1) p_t log p_t]."""
    x, tt, K, ignored, lse, logp_t, p_t, u, a = _softmax_focal_parts(
        logits, targets, alpha, gamma, axis, ignore_index)
    if gamma == 0:
        c = np.ones_like(u)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            c = u ** gamma - gamma * u ** (gamma - 1.0) * p_t * logp_t
        c = np.where(u > 0, c, 0.0)
    p = np.exp(x - lse[..., None])
    onehot = np.zeros_like(x)
    np.put_along_axis(onehot, tt[..., None], 1.0, axis=-1)
    d = -(a * c)[..., None] * (onehot - p)
    den = int((~ignored).sum()) if reduction == "mean" else None
    g_row = reduce_cotangent(tt.shape, reduction, cotangent, den)
    g = np.where(ignored[..., None], 0.0, d * g_row[..., None])
    return np.moveaxis(g, -1, axis % np.ndim(logits))


# --------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------
def numerical_grad(f, x, h=1e-6):
    """Central finite differences of the scalar float64 function ``f`` at
    ``x`` (float64 array), elementwise."""
    x = _f64(x).copy()
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = float(f(x))
        x[i] = old - h
        fm = float(f(x))
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def cross_entropy_error_scales(logits, targets, weights=None, axis=-1,
                               label_smoothing=0.0, reduction="none",
                               label_smoothing_mode="uniform",
                               ignore_index=None, class_weights=None,
                               z_loss=0.0, cotangent=None, logit_softcap=None):
    """Magnitudes used for the fp32-arithmetic part of the error bound
    (see conftest.assert_close): for the loss, |row weight| * (sum_j w_j q_j
    + 2 z |lse|) * max(1, max|x_row|) (reduced like the loss), and for the
    gradient the same per-row quantity times |cotangent| broadcast over the
    class axis."""
    logits = softcap(logits, logit_softcap)
    r = _ce_rows(logits, targets, axis, label_smoothing, label_smoothing_mode,
                 ignore_index, class_weights, z_loss)
    x = r["x"]
    mag = np.maximum(1.0, np.where(np.isfinite(x), np.abs(x), 0).max(-1))
    lse = np.where(np.isfinite(r["lse"]), np.abs(r["lse"]), 0.0)
    sw = np.abs(r["wq"]).sum(-1) + np.abs(r["wq"]).max(-1)
    per_row = mag * (sw + 2.0 * z_loss * lse + z_loss * lse * lse / mag)
    if weights is not None:
        per_row = per_row * np.abs(_f64(weights))
    den = _ce_denominator(r, weights, reduction, ignore_index, class_weights)
    loss_scale = reduce(per_row, reduction, den)
    g_row = np.abs(reduce_cotangent(r["row"].shape, reduction, cotangent, den))
    zden = _ce_z_denominator(r, reduction, class_weights, z_loss)
    if zden is not None:  # the z term's own denominator: both bounds
        loss_scale = loss_scale + reduce(per_row, reduction, zden)
        g_row = g_row + np.abs(reduce_cotangent(r["row"].shape, reduction, cotangent, zden))
    grad_scale = (per_row * g_row)[..., None] * np.ones_like(x)
    return loss_scale, np.moveaxis(grad_scale, -1, r["axis"])


def cross_entropy_grad_targets(logits, targets, weights=None, axis=-1,
                               label_smoothing=0.0, reduction="none",
                               label_smoothing_mode="uniform",
                               class_weights=None, z_loss=0.0, cotangent=None):
    """d/d targets (probability targets only) of sum(cotangent * loss):
    w_j (lse - x_j) dq_j/dt_j, dq/dt = 1-eps (uniform) or
    1 - eps - eps/(K-1) (others; 1 for K = 1)."""
    r = _ce_rows(logits, targets, axis, label_smoothing, label_smoothing_mode,
                 None, class_weights, z_loss)
    assert r["is_prob"]
    K, eps = r["K"], float(label_smoothing)
    if label_smoothing_mode == "uniform":
        dq = 1.0 - eps
    else:
        dq = 1.0 if K == 1 else 1.0 - eps - eps / (K - 1)
    den = _ce_denominator(r, weights, reduction, None, class_weights)
    g_row = reduce_cotangent(r["row"].shape, reduction, cotangent, den)
    if weights is not None:
        g_row = g_row * _f64(weights)
    g = r["w"] * dq * (r["lse"][..., None] - r["x"]) * g_row[..., None]
    return np.moveaxis(g, -1, r["axis"])


# --------------------------------------------------------------------------
# linear cross-entropy: the composed formula
# --------------------------------------------------------------------------
def linear_cross_entropy(hidden, weight, targets, bias=None, logit_softcap=None,
                         reduction="mean", cotangent=None, **ce_options):
    """Loss and gradients (hidden, weight, bias) of
    ``cross_entropy(softcap(hidden @ weight.T + bias), targets, **ce_options)``,
    all float64. ``cotangent``: of the reduced loss (shape of the loss)."""
    h = _f64(hidden)
    H = h.shape[-1]
    h2 = h.reshape(-1, H)
    w = _f64(weight)
    t = np.asarray(targets, np.int64).reshape(-1)
    y = h2 @ w.T
    if bias is not None:
        y = y + _f64(bias)
    if logit_softcap is not None:
        th = np.tanh(y / logit_softcap)
        z, dz_dy = logit_softcap * th, 1.0 - th * th
    else:
        z, dz_dy = y, 1.0
    loss = cross_entropy(z, t, reduction=reduction, **ce_options)
    if reduction == "none":
        loss = loss.reshape(np.shape(targets))
        if cotangent is not None:
            cotangent = _f64(cotangent).reshape(-1)
    dz = cross_entropy_grad(z, t, reduction=reduction, cotangent=cotangent,
                            **ce_options) * dz_dy
    d_hidden = (dz @ w).reshape(h.shape)
    d_weight = dz.T @ h2
    d_bias = dz.sum(0)
    return dict(loss=loss, logits=z, hidden=d_hidden, weight=d_weight,
                bias=d_bias, dz=dz)


# --------------------------------------------------------------------------
# distillation (kl_div, jsd): student logits s, teacher logits t, per row
# --------------------------------------------------------------------------
def _distill_parts(student, teacher, temperature):
    s, t = _f64(student), _f64(teacher)
    with np.errstate(invalid="ignore"):
        lq = s / temperature - logsumexp(s / temperature, keepdims=True)
        lp = t / temperature - logsumexp(t / temperature, keepdims=True)
    return s, t, lq, lp, np.exp(lq), np.exp(lp)


def _plogr(p, lp, lr):
    """sum_j p_j (lp_j - lr_j), a term with p_j = 0 counting 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (lp - lr), 0.0).sum(-1)


def _distill_kind(kind, beta):
    if kind == "jsd" and beta == 0.0:
        return "kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _row_mask(targets, V, ignore_index, shape):
    """(ignored, out_of_range) boolean row masks."""
    if targets is None:
        z = np.zeros(shape, bool)
        return z, z
    y = np.asarray(targets).astype(np.int64)
    ignored = (y == ignore_index) if ignore_index is not None else np.zeros(shape, bool)
    bad = ~ignored & ((y < 0) | (y >= V))
    return ignored, bad


def distill_rows(student, teacher, kind="kl", beta=0.5, temperature=1.0, targets=None,
                 alpha=0.0, t2=False, ignore_index=None):
    """Per-row loss: d_scale * D + alpha * CE (see csrc/math/distillation.h);
    D = KL(p || q) ("kl"), KL(q || p) ("reverse_kl") or the generalised JSD
    beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
    ("jsd"; beta 0 and 1 are the two KLs). p, q: softmax of the teacher's and
    the student's logits / temperature."""
    s, t, lq, lp, q, p = _distill_parts(student, teacher, temperature)
    kind = _distill_kind(kind, beta)
    if kind == "kl":
        d = _plogr(p, lp, lq)
    elif kind == "reverse_kl":
        d = _plogr(q, lq, lp)
    else:
        with np.errstate(divide="ignore"):
            lm = np.log(beta * p + (1 - beta) * q)
        d = beta * _plogr(p, lp, lm) + (1 - beta) * _plogr(q, lq, lm)
    loss = (1 - alpha) * (temperature ** 2 if t2 else 1.0) * d
    V = s.shape[-1]
    ignored, bad = _row_mask(targets, V, ignore_index, loss.shape)
    if alpha:
        y = np.clip(np.asarray(targets).astype(np.int64), 0, V - 1)
        s_y = np.take_along_axis(s, y[..., None], -1)[..., 0]
        loss = loss + alpha * (logsumexp(s) - s_y)
    loss = np.where(ignored, 0.0, loss)
    return np.where(bad, np.nan, loss)


def distill_grad(student, teacher, kind="kl", beta=0.5, temperature=1.0, targets=None,
                 alpha=0.0, t2=False, ignore_index=None, cotangent=None):
    """d sum(cotangent * distill_rows) / d student (analytic; checked against
    numerical differentiation in tests/test_distillation.py)."""
    s, t, lq, lp, q, p = _distill_parts(student, teacher, temperature)
    kind = _distill_kind(kind, beta)
    c = 1.0 / temperature
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "kl":
            dz = q - p
        elif kind == "reverse_kl":
            r = np.where(q > 0, lq - lp, 0.0)
            dz = q * (r - (q * r).sum(-1, keepdims=True))
        else:
            lm = np.log(beta * p + (1 - beta) * q)
            r = np.where(q > 0, lq - lm, 0.0)
            dz = (1 - beta) * q * (r - (q * r).sum(-1, keepdims=True))
    g = (1 - alpha) * (temperature ** 2 if t2 else 1.0) * c * dz
    V = s.shape[-1]
    if alpha:
        y = np.clip(np.asarray(targets).astype(np.int64), 0, V - 1)
        g = g + alpha * (np.exp(s - logsumexp(s, keepdims=True)) - np.eye(V)[y])
    cot = np.ones(s.shape[:-1]) if cotangent is None else _f64(cotangent)
    g = g * cot[..., None]
    ignored, bad = _row_mask(targets, V, ignore_index, s.shape[:-1])
    g = np.where(ignored[..., None], 0.0, g)
    return np.where(bad[..., None], np.nan, g)
