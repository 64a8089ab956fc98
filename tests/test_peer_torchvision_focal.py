"""torchvision's own sigmoid_focal_loss cases, ported as our tests.

Provenance: pytorch/vision, test/test_ops.py, class TestFocalLoss (read at
commit 00673be3960268a837860cd6a05373d9861221d3). Its four tests, with their
parametrisations on the CPU (cuda left out): test_correct_ratio (alpha x gamma
x dtype x seed: 32), test_equal_ce_loss (reduction x dtype x seed: 8),
test_jit (alpha x gamma x reduction x dtype x seed: 96) and
test_reduction_mode (dtype: 2): 138 cases. torchvision skips its float16
cases on the CPU; here they all run (MLX computes float16 on the CPU).

What is ported is the data and the checks, not the code: the inputs follow
the peer's recipe (9 blocks of a (5, 2) tensor: logit(p) with p uniform in a
"small" [0, 0.2), "big" [0.8, 1) or "random" [0, 1) range, each paired with
all-zero, all-one or random 0/1 targets; the logit taken in the dtype), drawn
from our own NumPy seeds (the peer's seed numbers seed our generator). The
references are float64 NumPy (tests/reference.py) of the rounded inputs; the
tolerances are the peer's: 1e-5 (float32) / 1e-3 (float16) for the ratio
and the scripted-vs-eager comparison, torch.testing.assert_close's defaults
(float32 rtol 1.3e-6 / atol 1e-5, float16 rtol 1e-3 / atol 1e-5) for the
equality with binary cross-entropy. torchvision's TorchScript check becomes
mx.compile against the eager call (our transformation of the function).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl
import reference as R
from conftest import to_np

DTYPES = {"fp32": (mx.float32, np.float32), "fp16": (mx.float16, np.float16)}
# the peer's tolerance for the ratio and scripted-vs-eager checks
PEER_TOL = {"fp32": 1e-5, "fp16": 1e-3}
# torch.testing.assert_close's default (rtol, atol) per dtype
ASSERT_CLOSE_DEFAULT = {"fp32": (1.3e-6, 1e-5), "fp16": (1e-3, 1e-5)}
ALPHAS = [-1.0, 0.0, 0.58, 1.0]
GAMMAS = [0, 2]
BLOCKS = [(p, t) for p in ("small", "big", "random") for t in ("zeros", "ones", "random_binary")]
P_RANGE = {"small": (0.0, 0.2), "big": (0.8, 1.0), "random": (0.0, 1.0)}


def diverse_pair(seed: int, dtype: str, shape=(5, 2)):
    """(inputs, targets) as mx arrays of the dtype, shape (9 * shape[0], shape[1])."""
    rng = np.random.default_rng(seed)
    npdt = DTYPES[dtype][1]
    xs, ts = [], []
    for p_kind, t_kind in BLOCKS:
        p = rng.uniform(*P_RANGE[p_kind], size=shape).astype(npdt)
        with np.errstate(divide="ignore"):
            xs.append(np.log(p / (npdt(1) - p)).astype(npdt))  # logit in the dtype
        if t_kind == "random_binary":
            ts.append(rng.integers(0, 2, size=shape).astype(npdt))
        else:
            ts.append(np.full(shape, 0.0 if t_kind == "zeros" else 1.0, npdt))
    mdt = DTYPES[dtype][0]
    x, t = np.concatenate(xs), np.concatenate(ts)
    assert np.all(np.isfinite(x)), "a p of exactly 0 or 1 was drawn: pick another seed"
    return mx.array(x.astype(np.float32)).astype(mdt), mx.array(t.astype(np.float32)).astype(mdt)


def assert_within(got, want, rtol, atol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bad = ~(err <= atol + rtol * np.abs(want))
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.size} out of tolerance, max err "
                           f"{err.max():.3g}; got {got[bad][:4]} expected {want[bad][:4]}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_correct_ratio(alpha, gamma, dtype, seed):
    """Focal loss <= binary cross-entropy element by element, and their
    ratio is (1 - p_t)**gamma * alpha_t (alpha_t only for alpha >= 0)."""
    x, t = diverse_pair(seed, dtype)
    focal = fl.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
    ce = fl.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0, reduction="none")  # exactly BCE
    assert focal.dtype == x.dtype
    f, c = to_np(focal), to_np(ce)
    assert np.all(f <= c), "focal loss must not exceed the cross-entropy of the same input"
    x64, t64 = to_np(x), to_np(t)
    p = R._sigmoid(x64)
    p_t = p * t64 + (1 - p) * (1 - t64)
    ratio64 = (1.0 - p_t) ** gamma
    if alpha >= 0:
        ratio64 = ratio64 * (alpha * t64 + (1 - alpha) * (1 - t64))
    tol = PEER_TOL[dtype]
    assert_within(f / c, ratio64, tol, tol, "loss ratio")
    assert_within(f, R.sigmoid_focal(x64, t64, alpha, gamma), tol, tol, "loss vs float64")


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equal_ce_loss(reduction, dtype, seed):
    """alpha=-1, gamma=0: binary cross-entropy with logits, loss and gradient."""
    x, t = diverse_pair(seed, dtype)
    loss, grad = mx.value_and_grad(
        lambda a: fl.sigmoid_focal_loss(a, t, alpha=-1, gamma=0, reduction=reduction))(x)
    x64, t64 = to_np(x), to_np(t)
    rtol, atol = ASSERT_CLOSE_DEFAULT[dtype]
    want = R.reduce(R._bce_with_logits(x64, t64), reduction)
    assert_within(to_np(loss), want, rtol, atol, "loss")
    gwant = (R._sigmoid(x64) - t64) * R.reduce_cotangent(x64.shape, reduction)
    assert grad.dtype == x.dtype
    assert_within(to_np(grad), gwant, rtol, atol, "gradient")


@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_compiled_equals_eager(alpha, gamma, reduction, dtype, seed):
    """torchvision's test_jit: the transformed function (mx.compile here,
    TorchScript there) gives the eager result; both match float64."""
    x, t = diverse_pair(seed, dtype)

    def f(a, b):
        return fl.sigmoid_focal_loss(a, b, gamma=gamma, alpha=alpha, reduction=reduction)

    eager, compiled = f(x, t), mx.compile(f)(x, t)
    tol = PEER_TOL[dtype]
    assert_within(to_np(compiled), to_np(eager), tol, tol, "compiled vs eager")
    want = R.sigmoid_focal(to_np(x), to_np(t), alpha, gamma, reduction)
    assert_within(to_np(eager), want, tol, tol, "loss vs float64")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reduction_mode(dtype):
    """An unknown reduction is a ValueError (the peer's message says
    "Invalid"; ours names the argument and the choices)."""
    x, t = diverse_pair(0, dtype)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fl.sigmoid_focal_loss(x, t, 0.25, 2, "xyz")
