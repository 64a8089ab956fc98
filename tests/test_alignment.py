"""mlx_fused_losses.alignment: every loss against a direct float64 NumPy
implementation of its published formula (values, metrics, and gradients with
respect to the policy's log-probabilities by central differences of the NumPy
formula), on non-uniform masks with garbage (NaN, -inf) in the padding; the
known values the definitions imply; bad input."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl
from mlx_fused_losses import alignment

# The losses run in float64 here, but MLX 0.32.4's CPU exp, sigmoid and
# logaddexp of float64 are float32-accurate approximations (measured: up to
# 2.6e-6 relative on [-30, 30], ~3e-7 on the [-5, 5] these tests use; log,
# log1p and expm1 are exact). A formula error (a wrong coefficient, mask or
# normaliser) moves a loss by far more than 1e-5.
RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-8  # and central differences (h = 1e-6) of the float64 formula: ~1e-10
H = 1e-6


# --- the data a trainer has -------------------------------------------------------


def masks(rng, batch, length):
    """Completion masks: a prompt of 0..2 tokens masked on the left, padding
    on the right; row 0 uses the whole width, the last row has one token."""
    m = np.zeros((batch, length), bool)
    for i in range(batch):
        start = 0 if i == 0 else int(rng.integers(0, 3))
        stop = length if i == 0 else (start + 1 if i == batch - 1 else int(rng.integers(start + 1, length + 1)))
        m[i, start:stop] = True
    return m


def log_probs(rng, shape, scale=1.0):
    return -np.abs(rng.normal(size=shape)) * scale - 0.01


def garbage(x, m):
    """What padded positions of a real batch may hold: NaN and -inf."""
    out = x.copy()
    pad = np.argwhere(~m)
    for k, (i, t) in enumerate(pad):
        out[i, t] = np.nan if k % 2 else -np.inf
    return out


def to_mx(x):
    """float64 stays float64 (mx.array alone would round it to float32): the
    losses then compute in float64."""
    return mx.array(x, mx.float64) if x.dtype == np.float64 else mx.array(x)


def numeric_grad(f, x, m):
    """d f / d x at the masked positions by central differences (0 elsewhere)."""
    g = np.zeros_like(x)
    for i, t in np.argwhere(m):
        up, down = x.copy(), x.copy()
        up[i, t] += H
        down[i, t] -= H
        g[i, t] = (f(up) - f(down)) / (2 * H)
    return g


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def seq(lp, m, average):
    total = np.where(m, lp, 0.0).sum(-1)
    return total / np.maximum(m.sum(-1), 1) if average else total


def check_metrics(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():
        np.testing.assert_allclose(np.array(got[key]), value, rtol=RTOL, atol=1e-9, err_msg=key)


# --- pairwise preference ----------------------------------------------------------------


@pytest.fixture
def pairs():
    rng = np.random.default_rng(20)
    B, Tc, Tr = 5, 7, 6
    cm, rm = masks(rng, B, Tc), masks(rng, B, Tr)
    return dict(c=log_probs(rng, (B, Tc)), r=log_probs(rng, (B, Tr)), cm=cm, rm=rm,
                c0=log_probs(rng, (B, Tc)), r0=log_probs(rng, (B, Tr)))


def pair_metrics(cr, rr, c, r):
    return {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).mean(), "rewards/margins": (cr - rr).mean(),
            "logps/chosen": c.mean(), "logps/rejected": r.mean()}


def dpo_reference(c, r, cm, rm, c0, r0, beta, loss_type, ls, average, reference_free):
    cs, rs = seq(c, cm, average), seq(r, rm, average)
    cr = cs - (0.0 if reference_free else seq(c0, cm, average))
    rr = rs - (0.0 if reference_free else seq(r0, rm, average))
    h = cr - rr
    if loss_type == "sigmoid":
        losses = -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - ls) * log_sigmoid(beta * h) + ls * log_sigmoid(-beta * h)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), pair_metrics(beta * cr, beta * rr, cs, rs)


DPO_CASES = [
    ("sigmoid", 0.0, None, False), ("sigmoid", 0.2, None, False), ("sigmoid", 0.0, True, False),
    ("robust", 0.3, None, False), ("hinge", 0.0, None, False), ("ipo", 0.0, None, False),
    ("ipo", 0.0, False, False), ("sigmoid", 0.0, None, True), ("hinge", 0.0, True, True),
]


@pytest.mark.parametrize("loss_type,ls,average,reference_free", DPO_CASES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("per_sequence_reference", [False, True])
def test_dpo_against_float64_formula(pairs, loss_type, ls, average, reference_free, beta, per_sequence_reference):
    p = pairs
    avg = (loss_type == "ipo") if average is None else average
    want, want_metrics = dpo_reference(p["c"], p["r"], p["cm"], p["rm"], p["c0"], p["r0"], beta, loss_type, ls,
                                       avg, reference_free)
    if reference_free:
        refs = (None, None)
    elif per_sequence_reference:  # the trainer's precomputed per-sequence reference
        refs = (to_mx(seq(p["c0"], p["cm"], avg)), to_mx(seq(p["r0"], p["rm"], avg)))
    else:
        refs = (to_mx(garbage(p["c0"], p["cm"])), to_mx(garbage(p["r0"], p["rm"])))

    def ours(c, r):
        return fl.dpo_loss(c, r, to_mx(p["cm"]), to_mx(p["rm"]), *refs, beta=beta, loss_type=loss_type,
                           label_smoothing=ls, average_log_probs=average, reference_free=reference_free)

    c, r = to_mx(garbage(p["c"], p["cm"])), to_mx(garbage(p["r"], p["rm"]))
    loss, metrics = ours(c, r)
    assert loss.dtype == mx.float64
    np.testing.assert_allclose(loss.item(), want, rtol=RTOL)
    check_metrics(metrics, want_metrics)

    gc, gr = mx.grad(lambda c, r: ours(c, r)[0], argnums=(0, 1))(c, r)

    def f_c(x):
        return dpo_reference(x, p["r"], p["cm"], p["rm"], p["c0"], p["r0"], beta, loss_type, ls, avg,
                             reference_free)[0]

    def f_r(x):
        return dpo_reference(p["c"], x, p["cm"], p["rm"], p["c0"], p["r0"], beta, loss_type, ls, avg,
                             reference_free)[0]

    np.testing.assert_allclose(np.array(gc), numeric_grad(f_c, p["c"], p["cm"]), atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(np.array(gr), numeric_grad(f_r, p["r"], p["rm"]), atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_dpo_known_values(pairs):
    """The policy equal to the reference: every sigmoid loss is log 2, every
    reward 0; IPO is (1 / (2 beta))^2."""
    p = pairs
    c, r, cm, rm = (to_mx(p[k]) for k in ("c", "r", "cm", "rm"))
    loss, metrics = fl.dpo_loss(c, r, cm, rm, c, r, beta=0.5)
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert metrics["rewards/margins"].item() == 0 and metrics["rewards/accuracies"].item() == 0
    loss, _ = fl.dpo_loss(c, r, cm, rm, c, r, beta=0.5, loss_type="ipo")
    assert abs(loss.item() - 1.0) < 1e-12
    # label smoothing 0.5 (labels as good as random) puts the minimum at h = 0:
    # the gradient vanishes there (and does not at label smoothing 0)
    def grad(ls):
        return np.array(mx.grad(lambda c: fl.dpo_loss(c, r, cm, rm, c, r, beta=0.5, label_smoothing=ls)[0])(c))
    assert np.abs(grad(0.5)).max() < 1e-7 < np.abs(grad(0.0)).max()


def orpo_reference(c, r, cm, rm, beta):
    cs, rs = seq(c, cm, True), seq(r, rm, True)
    log_odds = (cs - rs) - (np.log(1 - np.exp(cs)) - np.log(1 - np.exp(rs)))
    ratio = log_sigmoid(log_odds)
    nll = -np.where(cm, c, 0).sum() / cm.sum()
    metrics = pair_metrics(beta * cs, beta * rs, cs, rs)
    metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()})
    return nll - beta * ratio.mean(), metrics


def simpo_reference(c, r, cm, rm, beta, gamma, loss_type, ls):
    cs, rs = seq(c, cm, True), seq(r, rm, True)
    z = beta * (cs - rs) - gamma
    if loss_type == "sigmoid":
        losses = -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)
    else:
        losses = np.maximum(0, 1 - z)
    return losses.mean(), pair_metrics(beta * cs, beta * rs, cs, rs)


def cpo_reference(c, r, cm, rm, beta, alpha, loss_type, ls, average):
    cs, rs = seq(c, cm, average), seq(r, rm, average)
    z = beta * (cs - rs)
    if loss_type == "sigmoid":
        losses = -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)
    else:
        losses = np.maximum(0, 1 - z)
    nll = -np.where(cm, c, 0).sum() / cm.sum()
    metrics = pair_metrics(beta * cs, beta * rs, cs, rs)
    metrics["nll_loss"] = nll
    return losses.mean() + alpha * nll, metrics


PAIR_LOSSES = [
    ("orpo", dict(beta=0.1), lambda p, **k: orpo_reference(p["c"], p["r"], p["cm"], p["rm"], **k)),
    ("orpo", dict(beta=1.5), lambda p, **k: orpo_reference(p["c"], p["r"], p["cm"], p["rm"], **k)),
    ("simpo", dict(beta=2.0, gamma=0.5, loss_type="sigmoid", label_smoothing=0.0),
     lambda p, label_smoothing, **k: simpo_reference(p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, **k)),
    ("simpo", dict(beta=2.5, gamma=1.2, loss_type="sigmoid", label_smoothing=0.1),
     lambda p, label_smoothing, **k: simpo_reference(p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, **k)),
    ("simpo", dict(beta=2.0, gamma=-0.3, loss_type="hinge", label_smoothing=0.0),
     lambda p, label_smoothing, **k: simpo_reference(p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, **k)),
    ("cpo", dict(beta=0.1, alpha=1.0, loss_type="sigmoid", label_smoothing=0.0, average_log_probs=False),
     lambda p, label_smoothing, average_log_probs, **k: cpo_reference(
         p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, average=average_log_probs, **k)),
    ("cpo", dict(beta=0.3, alpha=0.5, loss_type="hinge", label_smoothing=0.0, average_log_probs=True),
     lambda p, label_smoothing, average_log_probs, **k: cpo_reference(
         p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, average=average_log_probs, **k)),
    ("cpo", dict(beta=0.2, alpha=0.0, loss_type="sigmoid", label_smoothing=0.25, average_log_probs=False),
     lambda p, label_smoothing, average_log_probs, **k: cpo_reference(
         p["c"], p["r"], p["cm"], p["rm"], ls=label_smoothing, average=average_log_probs, **k)),
]


@pytest.mark.parametrize("name,options,reference", PAIR_LOSSES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PAIR_LOSSES)])
def test_reference_free_pair_losses_against_float64_formula(pairs, name, options, reference):
    p = pairs
    fn = getattr(fl, f"{name}_loss")
    want, want_metrics = reference(p, **options)

    def ours(c, r):
        return fn(c, r, to_mx(p["cm"]), to_mx(p["rm"]), **options)

    c, r = to_mx(garbage(p["c"], p["cm"])), to_mx(garbage(p["r"], p["rm"]))
    loss, metrics = ours(c, r)
    np.testing.assert_allclose(loss.item(), want, rtol=RTOL)
    check_metrics(metrics, want_metrics)
    gc, gr = mx.grad(lambda c, r: ours(c, r)[0], argnums=(0, 1))(c, r)
    want_gc = numeric_grad(lambda x: reference(dict(p, c=x), **options)[0], p["c"], p["cm"])
    want_gr = numeric_grad(lambda x: reference(dict(p, r=x), **options)[0], p["r"], p["rm"])
    np.testing.assert_allclose(np.array(gc), want_gc, atol=GRAD_ATOL, rtol=GRAD_RTOL)
    np.testing.assert_allclose(np.array(gr), want_gr, atol=GRAD_ATOL, rtol=GRAD_RTOL)


def test_orpo_log_odds_near_probability_one():
    """A chosen completion the model is nearly sure of (average log-prob
    -1e-12): log(1 - p) keeps its digits (log(-expm1), not log1p(-exp));
    the naive form gives -27.6 +- 1e-4 instead of log(1e-12) = -27.631..."""
    c = mx.array([[-1e-12]], mx.float64)
    r = mx.array([[-2.0]], mx.float64)
    m = mx.array([[True]])
    _, metrics = fl.orpo_loss(c, r, m, m, beta=1.0)
    want = (-1e-12 + 2.0) - (math.log(-math.expm1(-1e-12)) - math.log1p(-math.exp(-2.0)))
    assert abs(metrics["log_odds_chosen"].item() - want) < 1e-9 * abs(want)


# --- KTO -------------------------------------------------------------------------------------


def kto_reference(lp, m, good, ref, beta, kl, wd, wu):
    h = seq(lp, m, False) - seq(ref, m, False)
    losses = np.where(good, wd * (1 - 1 / (1 + np.exp(-beta * (h - kl)))),
                      wu * (1 - 1 / (1 + np.exp(-beta * (kl - h)))))
    rewards = beta * h
    metrics = {"rewards/chosen": rewards[good].mean() if good.any() else 0.0,
               "rewards/rejected": rewards[~good].mean() if (~good).any() else 0.0, "kl": kl}
    return losses.mean(), metrics


@pytest.mark.parametrize("beta,kl,wd,wu", [(0.1, 0.0, 1.0, 1.0), (0.5, 0.3, 1.33, 0.7)])
@pytest.mark.parametrize("flags", [[True, False, True, False, False, True], [True] * 6])
def test_kto_against_float64_formula(beta, kl, wd, wu, flags):
    rng = np.random.default_rng(7)
    lp, ref, m = log_probs(rng, (6, 5), 3.0), log_probs(rng, (6, 5), 3.0), masks(rng, 6, 5)
    good = np.array(flags)
    want, want_metrics = kto_reference(lp, m, good, ref, beta, kl, wd, wu)

    def ours(x):
        return fl.kto_loss(x, to_mx(m), mx.array(good), to_mx(garbage(ref, m)), beta=beta, kl=kl,
                           desirable_weight=wd, undesirable_weight=wu)

    x = to_mx(garbage(lp, m))
    loss, metrics = ours(x)
    np.testing.assert_allclose(loss.item(), want, rtol=RTOL)
    check_metrics(metrics, want_metrics)
    want_g = numeric_grad(lambda v: kto_reference(v, m, good, ref, beta, kl, wd, wu)[0], lp, m)
    np.testing.assert_allclose(np.array(mx.grad(lambda v: ours(v)[0])(x)), want_g, atol=GRAD_ATOL, rtol=GRAD_RTOL)


# --- GRPO family ---------------------------------------------------------------------------------


def grpo_reference(lp, m, adv, old, ref, beta, el, eh, loss_type, level, max_len=None, n_items=None):
    adv = adv[:, None] if adv.ndim == 1 else adv
    old = lp if old is None else old
    lr = np.where(m, lp - old, 0.0)
    if level == "sequence":
        lr = (lr.sum(-1) / np.maximum(m.sum(-1), 1))[:, None]
    w = np.exp(lr)
    per_token = -np.minimum(w * adv, np.clip(w, 1 - el, 1 + eh) * adv)
    k3 = None
    if ref is not None:
        d = ref - lp
        k3 = np.exp(d) - d - 1
        per_token = per_token + beta * k3
    per_token = np.where(m, per_token, 0.0)
    tokens = max(m.sum(), 1)
    if loss_type == "grpo":
        loss = (per_token.sum(-1) / np.maximum(m.sum(-1), 1)).mean()
    elif loss_type == "bnpo":
        loss = per_token.sum() / tokens
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (lp.shape[0] * (lp.shape[1] if max_len is None else max_len))
    else:
        loss = per_token.sum() / (tokens if n_items is None else n_items)
    low = np.broadcast_to((w < 1 - el) & (adv < 0), m.shape) & m
    high = np.broadcast_to((w > 1 + eh) & (adv > 0), m.shape) & m
    metrics = {"clip_ratio/low_mean": low.sum() / tokens, "clip_ratio/high_mean": high.sum() / tokens,
               "clip_ratio/region_mean": (low | high).sum() / tokens}
    if k3 is not None:
        metrics["kl"] = np.where(m, k3, 0).sum() / tokens
    return loss, metrics


@pytest.fixture
def rollouts():
    rng = np.random.default_rng(22)
    B, T = 6, 8
    m = masks(rng, B, T)
    lp = log_probs(rng, (B, T), 2.0)
    # old and reference policies nearby: ratios on both sides of the clip range
    return dict(lp=lp, m=m, old=lp + rng.normal(scale=0.3, size=(B, T)),
                ref=lp + rng.normal(scale=0.5, size=(B, T)), adv=rng.normal(size=B), adv_t=rng.normal(size=(B, T)))


GRPO_CASES = [
    dict(loss_type="grpo"), dict(loss_type="bnpo"), dict(loss_type="dr_grpo"),
    dict(loss_type="dr_grpo", max_completion_length=16), dict(loss_type="dapo"),
    dict(loss_type="dapo", num_items_in_batch=100), dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", beta=0.1, epsilon_low=0.1, epsilon_high=0.28),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-2, epsilon_high=4e-2),
    dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.2),
    dict(loss_type="grpo", on_policy=True, beta=0.04),
    dict(loss_type="dapo", per_token_advantages=True),
    dict(loss_type="grpo", importance_sampling_level="sequence", per_token_advantages=True),
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=[str(i) for i in range(len(GRPO_CASES))])
def test_grpo_against_float64_formula(rollouts, case):
    p = rollouts
    case = dict(case)
    on_policy = case.pop("on_policy", False)
    adv = p["adv_t"] if case.pop("per_token_advantages", False) else p["adv"]
    beta = case.get("beta", 0.0)
    el = case.get("epsilon_low", 0.2)
    eh = case.get("epsilon_high", el)
    ref = p["ref"] if beta else None
    old = None if on_policy else p["old"]

    def reference(x):
        return grpo_reference(x, p["m"], adv, old, ref, beta, el, eh, case["loss_type"],
                              case.get("importance_sampling_level", "token"), case.get("max_completion_length"),
                              case.get("num_items_in_batch"))

    def ours(x):
        return fl.grpo_loss(x, to_mx(p["m"]), to_mx(adv), None if old is None else to_mx(garbage(old, p["m"])),
                            None if ref is None else to_mx(garbage(ref, p["m"])), **case)

    want, want_metrics = reference(p["lp"])
    x = to_mx(garbage(p["lp"], p["m"]))
    loss, metrics = ours(x)
    np.testing.assert_allclose(loss.item(), want, rtol=RTOL)
    check_metrics(metrics, want_metrics)
    if not on_policy:  # the clip range was reached from both sides: the cases test the clipping
        assert 0 < want_metrics["clip_ratio/region_mean"] < 1 or case.get("importance_sampling_level") == "sequence"
    if on_policy:  # old = stop_gradient(lp): the NumPy formula holds old at the unperturbed lp
        def reference_at(x):
            return grpo_reference(x, p["m"], adv, p["lp"], ref, beta, el, eh, case["loss_type"], "token")[0]
    else:
        def reference_at(x):
            return reference(x)[0]
    g = mx.grad(lambda v: ours(v)[0])(x)
    np.testing.assert_allclose(np.array(g), numeric_grad(reference_at, p["lp"], p["m"]), atol=GRAD_ATOL,
                               rtol=GRAD_RTOL)


def test_grpo_on_policy_is_the_policy_gradient(rollouts):
    """On-policy without KL the ratio is 1: the loss is -mean(A) and each
    token's gradient -A_i / |o_i| ("grpo") or -A_i / (total tokens) ("bnpo")."""
    p = rollouts
    lp, m, adv = to_mx(p["lp"]), to_mx(p["m"]), to_mx(p["adv"])
    counts = p["m"].sum(-1)
    loss, metrics = fl.grpo_loss(lp, m, adv, loss_type="grpo")
    assert abs(loss.item() + p["adv"].mean()) < 1e-12  # exp(0) = 1 exactly
    assert metrics["clip_ratio/region_mean"].item() == 0
    g = np.array(mx.grad(lambda x: fl.grpo_loss(x, m, adv, loss_type="grpo")[0])(lp))
    np.testing.assert_allclose(g, np.where(p["m"], -p["adv"][:, None] / counts[:, None] / len(counts), 0), atol=1e-15)
    g = np.array(mx.grad(lambda x: fl.grpo_loss(x, m, adv, loss_type="bnpo")[0])(lp))
    np.testing.assert_allclose(g, np.where(p["m"], -p["adv"][:, None] / counts.sum(), 0), atol=1e-15)


def test_gspo_is_token_level_when_every_token_shares_the_ratio(rollouts):
    """Sequence-level importance sampling uses the completion's mean log-ratio;
    when every token of a completion has that log-ratio, the value is the
    token-level loss."""
    p = rollouts
    shift = np.random.default_rng(3).normal(scale=0.2, size=(p["lp"].shape[0], 1))
    lp, m, adv, old = to_mx(p["lp"]), to_mx(p["m"]), to_mx(p["adv"]), to_mx(p["lp"] - shift)
    token, _ = fl.grpo_loss(lp, m, adv, old, loss_type="grpo", epsilon_low=0.1)
    sequence, _ = fl.grpo_loss(lp, m, adv, old, loss_type="grpo", epsilon_low=0.1,
                               importance_sampling_level="sequence")
    assert abs(token.item() - sequence.item()) < 1e-12


# --- dtypes, transforms ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_half_inputs_compute_in_float32(pairs, dtype):
    p = pairs
    args = [mx.array(p[k]).astype(dtype) for k in ("c", "r")] + [to_mx(p["cm"]), to_mx(p["rm"])]
    refs = [mx.array(p[k]).astype(dtype) for k in ("c0", "r0")]
    loss, metrics = fl.dpo_loss(*args, *refs)
    assert loss.dtype == mx.float32 and metrics["rewards/chosen"].dtype == mx.float32
    as_float64 = [mx.array(np.array(a.astype(mx.float32)).astype(np.float64)) for a in args[:2]]
    refs64 = [mx.array(np.array(a.astype(mx.float32)).astype(np.float64)) for a in refs]
    want, _ = fl.dpo_loss(*as_float64, *args[2:], *refs64)
    assert abs(loss.item() - want.item()) < 1e-6


def test_compiled_equals_eager(rollouts, pairs):
    p = rollouts
    args = (to_mx(p["lp"]), to_mx(p["m"]), to_mx(p["adv"]), to_mx(p["old"]), to_mx(p["ref"]))

    def grpo(x, *rest):
        return fl.grpo_loss(x, *rest, beta=0.04, loss_type="grpo")[0]

    eager = mx.value_and_grad(grpo)(*args)
    compiled = mx.compile(mx.value_and_grad(grpo))
    for _ in range(2):
        got = compiled(*args)
        assert abs(got[0].item() - eager[0].item()) < 1e-12
        np.testing.assert_allclose(np.array(got[1]), np.array(eager[1]), atol=1e-14)
    q = pairs
    dargs = [to_mx(q[k]) for k in ("c", "r", "cm", "rm", "c0", "r0")]
    dpo = mx.compile(lambda *a: fl.dpo_loss(*a, loss_type="robust", label_smoothing=0.1)[0])
    assert abs(dpo(*dargs).item() - fl.dpo_loss(*dargs, loss_type="robust", label_smoothing=0.1)[0].item()) < 1e-12


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument(pairs, rollouts):
    p = pairs
    c, r, cm, rm, c0, r0 = (to_mx(p[k]) for k in ("c", "r", "cm", "rm", "c0", "r0"))
    with pytest.raises(ValueError, match="same number of sequences"):
        fl.dpo_loss(c, r[:3], cm, rm[:3], c0, r0[:3])
    with pytest.raises(ValueError, match="chosen_mask must have the shape of chosen_log_probs"):
        fl.dpo_loss(c, r, rm, rm, c0, r0)
    with pytest.raises(ValueError, match=r"loss_type must be one of .*'ipo'.*got 'kto_pair'"):
        fl.dpo_loss(c, r, cm, rm, c0, r0, loss_type="kto_pair")
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0"):
        fl.dpo_loss(c, r, cm, rm, c0, r0, beta=0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\) for loss_type='robust'"):
        fl.dpo_loss(c, r, cm, rm, c0, r0, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing applies to"):
        fl.dpo_loss(c, r, cm, rm, c0, r0, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs ref_chosen_log_probs"):
        fl.dpo_loss(c, r, cm, rm)
    with pytest.raises(ValueError, match="takes no reference"):
        fl.dpo_loss(c, r, cm, rm, c0, r0, reference_free=True)
    with pytest.raises(ValueError, match=r"ref_rejected_log_probs must have the shape of rejected_log_probs"):
        fl.dpo_loss(c, r, cm, rm, c0, c0)
    with pytest.raises(ValueError, match=r"chosen_log_probs must be \[B, T\]"):
        fl.dpo_loss(c[0], r, cm, rm, c0, r0)
    with pytest.raises(TypeError, match="chosen_mask must be bool or numeric"):
        fl.simpo_loss(c, r, mx.zeros(c.shape, mx.complex64), rm)
    with pytest.raises(TypeError, match="chosen_log_probs must be a floating-point array"):
        fl.orpo_loss(cm, r, cm, rm)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fl.cpo_loss(c, r, cm, rm, loss_type="ipo")
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        fl.cpo_loss(c, r, cm, rm, alpha=-1)
    with pytest.raises(TypeError, match="desirable must be a bool array"):
        fl.kto_loss(c, cm, mx.ones(5), c0)
    with pytest.raises(ValueError, match=r"desirable must be \[B\]"):
        fl.kto_loss(c, cm, mx.ones(4, mx.bool_), c0)

    q = rollouts
    lp, m, adv, old, ref = (to_mx(q[k]) for k in ("lp", "m", "adv", "old", "ref"))
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        fl.grpo_loss(lp, m, adv, old, beta=0.04)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        fl.grpo_loss(lp, m, adv[:2], old)
    with pytest.raises(ValueError, match="mask must have the shape of log_probs"):
        fl.grpo_loss(lp, m[:, :3], adv, old)
    with pytest.raises(ValueError, match="old_log_probs must have the shape of log_probs"):
        fl.grpo_loss(lp, m, adv, old[:, :3])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fl.grpo_loss(lp, m, adv, old, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        fl.grpo_loss(lp, m, adv, old, importance_sampling_level="sequence_token")
    with pytest.raises(ValueError, match=r"epsilon_low must be in \[0, 1\)"):
        fl.grpo_loss(lp, m, adv, old, epsilon_low=1.0)
    with pytest.raises(ValueError, match="max_completion_length applies to loss_type='dr_grpo' only"):
        fl.grpo_loss(lp, m, adv, old, loss_type="grpo", max_completion_length=8)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        fl.grpo_loss(lp, m, adv, old, num_items_in_batch=0)


def test_module_exports_its_losses():
    for name in ("dpo_loss", "orpo_loss", "simpo_loss", "cpo_loss", "kto_loss", "grpo_loss"):
        assert getattr(fl, name) is getattr(alignment, name)


def test_empty_batch_is_zero_with_zero_gradient():
    """The package's rule: a mean over nothing is 0, never NaN."""
    x, m = mx.zeros((0, 4)), mx.zeros((0, 4), mx.bool_)
    calls = {
        "dpo": lambda x: fl.dpo_loss(x, x, m, m, x, x),
        "orpo": lambda x: fl.orpo_loss(x, x, m, m),
        "simpo": lambda x: fl.simpo_loss(x, x, m, m),
        "cpo": lambda x: fl.cpo_loss(x, x, m, m),
        "kto": lambda x: fl.kto_loss(x, m, mx.zeros((0,), mx.bool_), x),
        **{f"grpo-{t}": (lambda x, t=t: fl.grpo_loss(x, m, mx.zeros((0,)), x, x, beta=0.1, loss_type=t))
           for t in ("grpo", "bnpo", "dr_grpo", "dapo")},
    }
    for name, call in calls.items():
        loss, metrics = call(x)
        assert loss.item() == 0.0, name
        assert all(v.item() == 0.0 for v in metrics.values()), (name, metrics)
        assert mx.grad(lambda x: call(x)[0])(x).shape == (0, 4), name


def test_stream_runs_the_formula_there(rollouts):
    p = rollouts
    args = (to_mx(p["lp"]).astype(mx.float32), to_mx(p["m"]), to_mx(p["adv"]).astype(mx.float32))
    want, _ = fl.grpo_loss(*args)
    for stream in (mx.cpu, mx.new_stream(mx.cpu)):
        got, _ = fl.grpo_loss(*args, stream=stream)
        assert got.item() == want.item()


# --- linear forms: hidden states + head through linear_log_probs ------------------------
#
# Each equals its log-prob form on log-probs from the materialised logits
# (softcap(h W^T + b) / temperature, log-softmax, in float64), value and
# gradients with respect to the hidden states, the head and its bias.

V, HID = 67, 24  # rows straddle chunks: chunk_bytes below holds 3 rows of float32 logits


def materialised_log_probs(hidden, weight, targets, bias=None, temperature=1.0, logit_softcap=None):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if logit_softcap is not None:
        z = logit_softcap * mx.tanh(z / logit_softcap)
    z = z / temperature
    return mx.take_along_axis(z - mx.logsumexp(z, axis=-1, keepdims=True), targets[..., None], axis=-1)[..., 0]


def head_case(seed, batch, lengths, with_bias):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, HID)) / math.sqrt(HID)
    b = rng.normal(size=V) * 0.3 if with_bias else None
    hid = [rng.normal(size=(batch, t, HID)) for t in lengths]
    tgt = [rng.integers(0, V, size=(batch, t)).astype(np.int32) for t in lengths]
    return rng, W, b, hid, tgt


def f32(x):
    return None if x is None else mx.array(np.asarray(x, np.float32))


def f64(x):
    return None if x is None else mx.array(np.asarray(x), mx.float64)


def assert_close_to(got, want, rtol, what):
    got, want = np.array(got.astype(mx.float32)).astype(np.float64), np.array(want)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= rtol * scale, (what, np.abs(got - want).max(), scale)


HEAD_OPTIONS = [dict(), dict(temperature=0.7), dict(logit_softcap=5.0, temperature=1.3)]
LINEAR_RTOL = 2e-5  # float32 scorer vs float64 materialised logits (MLX's float64 exp: see RTOL)


@pytest.mark.parametrize("head", HEAD_OPTIONS, ids=["plain", "temperature", "softcap+temperature"])
@pytest.mark.parametrize("reference", ["hidden", "given", "free"])
def test_linear_dpo_equals_dpo_on_materialised_logits(head, reference):
    rng, W, b, (hc, hr, hc0, hr0), (tc, tr, _, _) = head_case(1, 3, [7, 5, 7, 5], with_bias=True)
    cm, rm = masks(rng, 3, 7), masks(rng, 3, 5)
    tc_ignored = mx.array(np.where(cm, tc, -100).astype(np.int32))  # prompt and padding: ignore_index targets
    tc, tr = mx.array(tc), mx.array(tr)
    options = dict(beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    free = reference == "free"

    def reference_log_probs(W_, b_):
        return (mx.stop_gradient(materialised_log_probs(f64(hc0), W_, tc, b_, **head)),
                mx.stop_gradient(materialised_log_probs(f64(hr0), W_, tr, b_, **head)))

    def want_fn(hc_, hr_, W_, b_):
        c = materialised_log_probs(hc_, W_, tc, b_, **head)
        r = materialised_log_probs(hr_, W_, tr, b_, **head)
        refs = (None, None) if free else reference_log_probs(W_, b_)
        return fl.dpo_loss(c, r, mx.array(cm), mx.array(rm), *refs, reference_free=free, **options)

    def ours_fn(hc_, hr_, W_, b_):
        refs = {}
        if reference == "hidden":
            refs = dict(ref_chosen_hidden=f32(hc0), ref_rejected_hidden=f32(hr0))
        elif reference == "given":
            c0, r0 = reference_log_probs(f64(W), f64(b))
            refs = dict(ref_chosen_log_probs=c0.astype(mx.float32), ref_rejected_log_probs=r0.astype(mx.float32))
        # chosen: a mask of ones and the ignored targets (both rules apply); rejected: its mask
        return fl.linear_dpo_loss(hc_, hr_, W_, tc_ignored, tr, b_, chosen_mask=mx.ones(tc.shape, mx.bool_),
                                  rejected_mask=mx.array(rm), ignore_index=-100,
                                  reference_free=free, chunk_bytes=3 * 4 * V, **refs, **options, **head)

    args64 = (f64(hc), f64(hr), f64(W), f64(b))
    args32 = tuple(f32(a) for a in (hc, hr, W, b))
    want, want_metrics = want_fn(*args64)
    got, metrics = ours_fn(*args32)
    assert got.dtype == mx.float32
    assert abs(got.item() - want.item()) <= LINEAR_RTOL * abs(want.item())
    for key, value in want_metrics.items():
        assert abs(metrics[key].item() - value.item()) <= LINEAR_RTOL * max(1, abs(value.item())), key
    grads = mx.grad(lambda *a: ours_fn(*a)[0], argnums=(0, 1, 2, 3))(*args32)
    want_grads = mx.grad(lambda *a: want_fn(*a)[0], argnums=(0, 1, 2, 3))(*args64)
    for name, g, w in zip(("chosen_hidden", "rejected_hidden", "weight", "bias"), grads, want_grads):
        assert_close_to(g, w, 1e-4, name)


PAIR_LINEAR = [("orpo", dict(beta=0.3)), ("simpo", dict(beta=2.0, gamma=0.4)),
               ("cpo", dict(beta=0.2, alpha=0.7, average_log_probs=True))]


@pytest.mark.parametrize("name,options", PAIR_LINEAR, ids=[n for n, _ in PAIR_LINEAR])
def test_linear_reference_free_pair_losses_equal_their_logits_forms(name, options):
    rng, W, _, (hc, hr), (tc, tr) = head_case(2, 4, [6, 9], with_bias=False)
    cm, rm = masks(rng, 4, 6), masks(rng, 4, 9)
    head = dict(temperature=0.9)
    loss_fn, linear_fn = getattr(fl, f"{name}_loss"), getattr(fl, f"linear_{name}_loss")

    def want_fn(hc_, hr_, W_):
        c = materialised_log_probs(hc_, W_, mx.array(tc), **head)
        r = materialised_log_probs(hr_, W_, mx.array(tr), **head)
        return loss_fn(c, r, mx.array(cm), mx.array(rm), **options)[0]

    def ours_fn(hc_, hr_, W_):
        return linear_fn(hc_, hr_, W_, mx.array(tc), mx.array(tr), chosen_mask=mx.array(cm),
                         rejected_mask=mx.array(rm), chunk_bytes=3 * 4 * V, **options, **head)[0]

    args64, args32 = (f64(hc), f64(hr), f64(W)), (f32(hc), f32(hr), f32(W))
    want, got = want_fn(*args64).item(), ours_fn(*args32).item()
    assert abs(got - want) <= LINEAR_RTOL * abs(want), (got, want)
    for label, g, w in zip(("chosen_hidden", "rejected_hidden", "weight"),
                           mx.grad(ours_fn, argnums=(0, 1, 2))(*args32), mx.grad(want_fn, argnums=(0, 1, 2))(*args64)):
        assert_close_to(g, w, 1e-4, label)


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_grpo_and_kto_equal_their_logits_forms(quantized):
    rng, W, b, (h, h0), (t, _) = head_case(3, 5, [8, 8], with_bias=True)
    m = masks(rng, 5, 8)
    adv = rng.normal(size=5)
    head, W_used = {}, f32(W)
    if quantized:  # a 4-bit head (the scorer dequantizes on the fly; the reference uses the same values)
        # (H padded to 64 with zeros: a whole number of quantization groups)
        Wq, scales, biases = mx.quantize(f32(np.pad(W, ((0, 0), (0, 64 - HID)))), group_size=32, bits=4)
        W_used = mx.dequantize(Wq, scales, biases, group_size=32, bits=4)
        h, h0 = (np.pad(x, ((0, 0), (0, 0), (0, 64 - HID))) for x in (h, h0))
        head = dict(scales=scales, biases=biases, group_size=32, bits=4)
    W64 = W_used.astype(mx.float64)
    old = np.array(materialised_log_probs(f64(h), W64, mx.array(t), f64(b))) + rng.normal(scale=0.2, size=(5, 8))
    grpo_options = dict(beta=0.05, loss_type="grpo", epsilon_low=0.1, epsilon_high=0.15)

    def want_grpo(h_, b_):
        lp = materialised_log_probs(h_, W64, mx.array(t), b_)
        ref = mx.stop_gradient(materialised_log_probs(f64(h0), W64, mx.array(t), b_))
        return fl.grpo_loss(lp, mx.array(m), f64(adv), f64(old), ref, **grpo_options)[0]

    def ours_grpo(h_, b_):
        return fl.linear_grpo_loss(h_, Wq if quantized else W_used, mx.array(t), f32(adv), b_, mask=mx.array(m),
                                   old_log_probs=f32(old), ref_hidden=f32(h0), chunk_bytes=3 * 4 * V,
                                   **grpo_options, **head)[0]

    good = np.array([True, False, True, True, False])

    def want_kto(h_, b_):
        lp = materialised_log_probs(h_, W64, mx.array(t), b_)
        ref = mx.stop_gradient(materialised_log_probs(f64(h0), W64, mx.array(t), b_))
        return fl.kto_loss(lp, mx.array(m), mx.array(good), ref, beta=0.3, kl=0.1)[0]

    def ours_kto(h_, b_):
        return fl.linear_kto_loss(h_, Wq if quantized else W_used, mx.array(t), mx.array(good), b_,
                                  mask=mx.array(m), ref_hidden=f32(h0), beta=0.3, kl=0.1, **head)[0]

    for want_fn, ours_fn in ((want_grpo, ours_grpo), (want_kto, ours_kto)):
        args64, args32 = (f64(h), f64(b)), (f32(h), f32(b))
        want, got = want_fn(*args64).item(), ours_fn(*args32).item()
        assert abs(got - want) <= LINEAR_RTOL * max(abs(want), 1e-3), (ours_fn.__name__, got, want)
        for label, g, w in zip(("hidden", "bias"), mx.grad(ours_fn, argnums=(0, 1))(*args32),
                               mx.grad(want_fn, argnums=(0, 1))(*args64)):
            assert_close_to(g, w, 1e-4, (ours_fn.__name__, label))


def test_linear_forms_bad_input_raises_before_scoring():
    rng, W, _, (hc, hr), (tc, tr) = head_case(4, 2, [5, 5], with_bias=False)
    args = (f32(hc), f32(hr), f32(W), mx.array(tc), mx.array(tr))
    with pytest.raises(ValueError, match="temperature"):
        fl.linear_simpo_loss(*args, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fl.linear_dpo_loss(*args, reference_free=True, temperature=-1.0)
    with pytest.raises(TypeError, match=r"linear_dpo_loss\(\) got unexpected keyword argument\(s\) betta"):
        fl.linear_dpo_loss(*args, reference_free=True, betta=0.1)
    with pytest.raises(ValueError, match="same number of sequences"):
        fl.linear_orpo_loss(args[0], args[1][:1], args[2], args[3], args[4][:1])
    with pytest.raises(ValueError, match=r"chosen_hidden must be \[B, T, H\]"):
        fl.linear_cpo_loss(args[0][:, :4], *args[1:])
    with pytest.raises(ValueError, match="chosen_mask must have the shape of chosen_targets"):
        fl.linear_dpo_loss(*args, reference_free=True, chosen_mask=mx.ones((2, 4), mx.bool_))
    with pytest.raises(ValueError, match="not both"):
        fl.linear_dpo_loss(*args, ref_chosen_hidden=args[0], ref_chosen_log_probs=mx.zeros((2, 5)),
                           ref_rejected_hidden=args[1])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fl.linear_dpo_loss(*args, reference_free=True, loss_type="sppo")
    with pytest.raises(ValueError, match="needs ref_log_probs or ref_hidden"):
        fl.linear_kto_loss(args[0], args[2], args[3], mx.array([True, False]))
    with pytest.raises(ValueError, match="needs ref_log_probs"):
        fl.linear_grpo_loss(args[0], args[2], args[3], mx.zeros((2,)), beta=0.1)


def test_linear_forms_under_compile():
    """The scorer inside a compiled training step: the same value and
    gradients as eager, called twice."""
    rng, W, b, (h, h0), (t, _) = head_case(5, 4, [6, 6], with_bias=True)
    m, adv = masks(rng, 4, 6), rng.normal(size=4)
    args = (f32(h), f32(W), f32(b))

    def step(h_, W_, b_):
        grpo, _ = fl.linear_grpo_loss(h_, W_, mx.array(t), f32(adv), b_, mask=mx.array(m), ref_hidden=f32(h0),
                                      beta=0.1, loss_type="dr_grpo", chunk_bytes=3 * 4 * V)
        dpo, _ = fl.linear_dpo_loss(h_[:2], h_[2:], W_, mx.array(t[:2]), mx.array(t[2:]), b_, reference_free=True,
                                    temperature=0.8)
        return grpo + dpo

    eager = mx.value_and_grad(step, argnums=(0, 1, 2))(*args)
    compiled = mx.compile(mx.value_and_grad(step, argnums=(0, 1, 2)))
    for _ in range(2):
        value, grads = compiled(*args)
        assert abs(value.item() - eager[0].item()) <= 1e-6 * abs(eager[0].item())
        for g, e in zip(grads, eager[1]):
            assert_close_to(g, np.array(e).astype(np.float64), 1e-5, "compiled gradient")


def test_log_ratio_summed_per_token_keeps_float32_digits():
    """Long completions (T = 2048, log-probs ~ -12 per token) whose policy and
    reference differ by ~1e-3 per token: the sequence log-ratio is a sum of
    small per-token differences. Summing each side first (~ -24000, float32
    spacing 2e-3) and subtracting loses the ratio's digits (a DPO loss off by
    ~1e-4 in float32); per-token differences keep them."""
    rng = np.random.default_rng(11)
    B, T = 4, 2048
    c, r = -12 + rng.normal(scale=0.5, size=(B, T)), -12 + rng.normal(scale=0.5, size=(B, T))
    c0, r0 = c + rng.normal(scale=1e-3, size=(B, T)), r + rng.normal(scale=1e-3, size=(B, T))
    m = np.ones((B, T), bool)
    exact64 = [a.astype(np.float32).astype(np.float64) for a in (c, r, c0, r0)]  # the float32 inputs, exactly
    want = dpo_reference(*exact64[:2], m, m, *exact64[2:], 1.0, "sigmoid", 0.0, False, False)[0]
    got, _ = fl.dpo_loss(*(mx.array(a.astype(np.float32)) for a in (c, r)), mx.array(m), mx.array(m),
                         *(mx.array(a.astype(np.float32)) for a in (c0, r0)), beta=1.0)
    assert abs(got.item() - want) < 2e-6, (got.item(), want)
    good = np.array([True, False, True, False])
    want = kto_reference(exact64[0], m, good, exact64[2], 1.0, 0.0, 1.0, 1.0)[0]
    got, _ = fl.kto_loss(mx.array(c.astype(np.float32)), mx.array(m), mx.array(good), mx.array(c0.astype(np.float32)),
                         beta=1.0)
    assert abs(got.item() - want) < 2e-6, (got.item(), want)


def test_long_sequence_sums_keep_float32_digits():
    """A float32 sum of 2048 log-probs ~ -12 taken in order drifts by up to
    ~3e-2 (MLX's sum over an axis; the result's own spacing is 2e-3): SimPO's
    length-averaged log-probs (beta 2.5) then move its loss by ~1e-5. The
    sums are taken in blocks: within 2e-6 of the float64 value of the same
    float32 inputs."""
    B, T = 8, 2000  # not a whole number of blocks
    m = np.ones((B, T), bool)
    errors = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        c, r = ((-12 + rng.normal(scale=0.5, size=(B, T))).astype(np.float32) for _ in range(2))
        want = simpo_reference(c.astype(np.float64), r.astype(np.float64), m, m, 2.5, 0.0, "sigmoid", 0.0)[0]
        got, _ = fl.simpo_loss(mx.array(c), mx.array(r), mx.array(m), mx.array(m), beta=2.5, gamma=0.0)
        errors.append(abs(got.item() - want))
    assert max(errors) < 2e-6, errors
