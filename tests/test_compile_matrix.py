"""Every primitive of the package under mx.compile, against the same calls
run eagerly:

* the same call twice in one compiled graph (compile merges identical nodes:
  each gradient path must still get its own buffer);
* identical calls that ask for different outputs or gradients in one graph
  (a primitive's equivalence must include what it was asked for);
* shapeless=True traced once and called at other sizes, an empty one
  included (no size or shape may be frozen into the graph);
* mx.vmap over a batch whose examples have no rows.

Each case drives the forward and backward primitives of one loss
configuration: cross_entropy (hard, class weights, ignore_index, soft-cap, soft
targets, per-row, return_stats, token_scaling), smooth_l1, huber, sigmoid focal,
softmax focal, kl_div/jsd and linear_distillation_loss (the teacher's zero gradient
included), and the
linear cross-entropy (forward-formed gradients and their scaling in float32
and bfloat16, the recomputing backward, a quantized head, return_stats,
token_scaling), and
the row statistics (linear_log_probs with entropy, quantized, every statistic
of _ext.linear_row_stats, log_probs in bfloat16).
Shapes are small: the graphs, not the kernels, are under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl

mx.set_default_device(mx.cpu)

# The CPU kernels here; on a Mac the Metal ones too (their eval_gpu takes
# over buffers under the same rule).
DEVICES = {"cpu": mx.cpu}
if hasattr(mx, "metal") and mx.metal.is_available():
    DEVICES["gpu"] = mx.gpu


@pytest.fixture(params=list(DEVICES), autouse=True)
def device(request):
    """Every test of this file runs with each device's default stream."""
    with mx.stream(DEVICES[request.param]):
        yield request.param

K = 7  # classes (element-wise losses: trailing axis)
H = 32  # linear CE hidden size (a multiple of the quantization group)
V = 11  # linear CE vocabulary
CW = mx.array(np.linspace(0.5, 2.0, K).astype(np.float32))
ALPHA = mx.array(np.linspace(0.2, 1.0, K).astype(np.float32))
mx.eval(CW, ALPHA)


def _labels(rng, n, classes=K, ignored=False):
    t = rng.integers(0, classes, n)
    if ignored and n > 1:
        t[1] = -100
    return mx.array(t.astype(np.int32))


def _normal(rng, shape, scale=2.0, dtype=mx.float32):
    return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def _squares(loss):
    """A per-row loss reduced so that every row gets its own cotangent
    (2 * loss), with no shape baked in (shapeless traces stay valid)."""
    return (loss * loss).sum()


class Case:
    """``make(rng, n)`` -> arguments (n rows); ``f(*args)`` -> a tuple whose
    first item is the scalar to differentiate w.r.t. ``argnums`` and the rest
    further outputs to compare (statistics)."""

    def __init__(self, name, make, f, argnums, dtype=mx.float32, shapeless_empty=True):
        self.name, self.make, self.f, self.argnums, self.dtype = name, make, f, argnums, dtype
        self.shapeless_empty = shapeless_empty

    def __repr__(self):
        return self.name

    def loss(self, *args):
        return self.f(*args)[0]


def _lce_args(rng, n, dtype=mx.float32):
    h = _normal(rng, (n, H), 1.0, dtype)
    w = _normal(rng, (V, H), 1.0 / np.sqrt(H), dtype)
    b = _normal(rng, (V,), 0.5, dtype)
    return h, w, _labels(rng, n, V, ignored=True), b


def _lce_quantized(rng, n):
    h, w, t, b = _lce_args(rng, n)
    w_q, scales, biases = mx.quantize(w, group_size=32, bits=4)
    return h, w_q, scales, biases, t, b


def _ce_with_stats(loss_and_stats):
    loss, stats = loss_and_stats
    return (loss,) + tuple(stats[k] for k in sorted(stats))


def _lce(h, w, t, b, **kw):
    return fl.linear_cross_entropy(h, w, t, b, ignore_index=-100, **kw)


CASES = [
    Case("ce_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n)),
         lambda x, t: (fl.cross_entropy(x, t, label_smoothing=0.1, reduction="mean"),), (0,)),
    Case("ce_class_weights_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n)),
         lambda x, t: (fl.cross_entropy(x, t, class_weights=CW, reduction="mean"),), (0,)),
    Case("ce_class_weights_z_ignore_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda x, t: (fl.cross_entropy(x, t, class_weights=CW, z_loss=0.05, ignore_index=-100,
                                        reduction="mean"),), (0,)),
    Case("ce_softcap_smooth_mean", lambda r, n: (_normal(r, (n, K), 4.0), _labels(r, n, ignored=True)),
         lambda x, t: (fl.cross_entropy(x, t, logit_softcap=3.0, label_smoothing=0.1,
                                        ignore_index=-100, reduction="mean"),), (0,)),
    Case("ce_return_stats", lambda r, n: (_normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda x, t: _ce_with_stats(fl.cross_entropy(x, t, ignore_index=-100, logit_softcap=3.0,
                                                      reduction="mean", return_stats=True)), (0,)),
    Case("ce_token_scaling_cw_z_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda x, t: (fl.cross_entropy(x, t, class_weights=CW, z_loss=0.05, ignore_index=-100,
                                        logit_softcap=3.0, token_scaling=True, reduction="mean"),), (0,)),
    Case("ce_ignore_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda x, t: (fl.cross_entropy(x, t, ignore_index=-100, z_loss=1e-3, reduction="mean"),), (0,)),
    Case("ce_probs_sum", lambda r, n: (_normal(r, (n, K)), mx.softmax(_normal(r, (n, K)), axis=-1)),
         lambda x, p: (fl.cross_entropy(x, p, label_smoothing=0.2, reduction="sum"),), (0, 1),
         # The gradient w.r.t. the probabilities is MLX element-wise ops, which
         # compile fuses; MLX 0.32.4's fused kernel takes max(0, 1) = 1 as the
         # broadcast of an empty axis with a unit one under shapeless=True:
         # (x + x.sum().reshape(1, 1)) * 2 at x of shape (0, 7) gives (1, 7).
         shapeless_empty=False),
    Case("ce_rows_bf16", lambda r, n: (_normal(r, (n, K), dtype=mx.bfloat16), _labels(r, n)),
         lambda x, t: (_squares(fl.cross_entropy(x, t, dtype=mx.float32)),), (0,), mx.bfloat16),
    Case("smooth_l1_mean", lambda r, n: (_normal(r, (n, K)), _normal(r, (n, K))),
         lambda x, y: (fl.smooth_l1_loss(x, y, beta=0.5, reduction="mean"),), (0, 1)),
    Case("smooth_l1_elements", lambda r, n: (_normal(r, (n, K)), _normal(r, (n, K))),
         lambda x, y: (_squares(fl.smooth_l1_loss(x, y, reduction="none")),), (0, 1)),
    Case("huber_sum", lambda r, n: (_normal(r, (n, K)), _normal(r, (n, K))),
         lambda x, y: (fl.huber_loss(x, y, delta=1.5, reduction="sum"),), (0, 1)),
    Case("sigmoid_focal_mean",
         lambda r, n: (_normal(r, (n, K)), mx.array((r.uniform(size=(n, K)) < 0.4).astype(np.float32))),
         lambda x, y: (fl.sigmoid_focal_loss(x, y, reduction="mean"),), (0,)),
    Case("softmax_focal_ignore_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda x, t: (fl.softmax_focal_loss(x, t, gamma=1.5, ignore_index=-100, reduction="mean"),), (0,)),
    Case("softmax_focal_alpha_mean", lambda r, n: (_normal(r, (n, K)), _labels(r, n)),
         lambda x, t: (fl.softmax_focal_loss(x, t, alpha=ALPHA, reduction="mean"),), (0,)),
    # distillation on logits: the teacher's gradient is zeros (argnum 1)
    Case("kl_div_ignore_mean",
         lambda r, n: (_normal(r, (n, K)), _normal(r, (n, K)), _labels(r, n, ignored=True)),
         lambda s, t, y: (fl.kl_div(s, t, targets=y, ignore_index=-100, temperature=2.0),), (0, 1)),
    Case("kl_div_reverse_rows_alpha",
         lambda r, n: (_normal(r, (n, K)), _normal(r, (n, K)), _labels(r, n)),
         lambda s, t, y: (_squares(fl.kl_div(s, t, direction="reverse", targets=y, alpha=0.3,
                                             temperature=1.5, reduction="none")),), (0,)),
    Case("jsd_sum_bf16",
         lambda r, n: (_normal(r, (n, K), dtype=mx.bfloat16), _normal(r, (n, K), dtype=mx.bfloat16)),
         lambda s, t: (fl.jsd(s, t, beta=0.3, reduction="sum"),), (0,), mx.bfloat16),
    # fused linear distillation: student hidden/weight gradients, the teacher's zeros
    Case("linear_distill_jsd_mean",
         lambda r, n: (_normal(r, (n, H), 1.0), _normal(r, (V, H), 1.0 / np.sqrt(H)),
                       _normal(r, (n, 16), 1.0), _normal(r, (V, 16), 0.25), _labels(r, n, V, ignored=True)),
         lambda hs, ws, ht, wt, y: (fl.linear_distillation_loss(hs, ws, ht, wt, y, kind="jsd", beta=0.3,
                                                                ignore_index=-100, alpha=0.2,
                                                                temperature=1.5, chunk_bytes=200),),
         (0, 1, 2, 3)),
    Case("linear_distill_kl_sum",
         lambda r, n: (_normal(r, (n, H), 1.0), _normal(r, (V, H), 1.0 / np.sqrt(H)),
                       _normal(r, (n, 16), 1.0), _normal(r, (V, 16), 0.25)),
         lambda hs, ws, ht, wt: (fl.linear_distillation_loss(hs, ws, ht, wt, temperature=2.0,
                                                             reduction="sum", chunk_bytes=300),),
         (0, 1)),
    Case("linear_distill_rkl_mean",
         lambda r, n: (_normal(r, (n, H), 1.0), _normal(r, (V, H), 1.0 / np.sqrt(H)),
                       _normal(r, (n, 16), 1.0), _normal(r, (V, 16), 0.25)),
         lambda hs, ws, ht, wt: (fl.linear_distillation_loss(hs, ws, ht, wt, kind="reverse_kl"),),
         (0, 1)),
    Case("linear_distill_rkl_rows",
         lambda r, n: (_normal(r, (n, H), 1.0), _normal(r, (V, H), 1.0 / np.sqrt(H)),
                       _normal(r, (n, 16), 1.0), _normal(r, (V, 16), 0.25)),
         lambda hs, ws, ht, wt: (_squares(fl.linear_distillation_loss(hs, ws, ht, wt, kind="reverse_kl",
                                                                      reduction="none")),), (0, 1)),
    Case("linear_topk_distill_mean",
         lambda r, n: (_normal(r, (n, H), 1.0), _normal(r, (V, H), 1.0 / np.sqrt(H)),
                       mx.array(r.integers(0, V, (n, 3)).astype(np.int32)), _normal(r, (n, 3), 1.0) - 2.0,
                       _labels(r, n, V, ignored=True)),
         lambda h, w, ids, lp, y: (fl.linear_topk_distillation_loss(h, w, ids, lp, y, ignore_index=-100,
                                                                    alpha=0.3, temperature=1.5,
                                                                    renormalize=True, chunk_bytes=100),),
         (0, 1)),
    # forward-formed gradients, scaled by the cotangent (LceScaleGrad)
    Case("lce_mean", _lce_args, lambda h, w, t, b: (_lce(h, w, t, b, label_smoothing=0.1),), (0, 1, 3)),
    Case("lce_token_weights_mean",
         lambda r, n: _lce_args(r, n) + (_normal(r, (n,), 0.5) + 1.0,),
         lambda h, w, t, b, tw: (_lce(h, w, t, b, weights=tw, label_smoothing=0.1),), (0, 1, 4)),
    Case("lce_mean_default", lambda r, n: _lce_args(r, n)[:3],
         lambda h, w, t: (fl.linear_cross_entropy(h, w, t),), (0, 1)),
    Case("lce_sum_bf16", lambda r, n: _lce_args(r, n, mx.bfloat16),
         lambda h, w, t, b: (_lce(h, w, t, b, z_loss=1e-3, logit_softcap=5.0, reduction="sum"),),
         (0, 1, 3), mx.bfloat16),
    # per-row cotangents: the recomputing backward primitive
    Case("lce_rows", _lce_args, lambda h, w, t, b: (_squares(_lce(h, w, t, b, reduction="none")),), (0, 1, 3)),
    Case("lce_stats", _lce_args,
         lambda h, w, t, b: (lambda loss, s: (loss, s["lse"], s["correct"], s["entropy"], s["argmax"]))(
             *_lce(h, w, t, b, return_stats=True)), (0, 1)),
    Case("lce_token_scaling_mean", _lce_args,
         lambda h, w, t, b: (_lce(h, w, t, b, token_scaling=True, z_loss=1e-3, logit_softcap=5.0),),
         (0, 1, 3)),
    Case("lce_quantized_mean", _lce_quantized,
         lambda h, q, s, qb, t, b: (fl.linear_cross_entropy(h, q, t, b, scales=s, biases=qb, group_size=32,
                                                             bits=4, ignore_index=-100),), (0, 5)),
    Case("lce_quantized_rows_stats", _lce_quantized,
         lambda h, q, s, qb, t, b: (lambda loss, st: (_squares(loss), st["lse"], st["entropy"]))(
             *fl.linear_cross_entropy(h, q, t, b, scales=s, biases=qb, group_size=32, bits=4,
                                      reduction="none", return_stats=True)), (0, 5)),
    # the row statistics (scorer): per-token log p and entropy, each row its own cotangent
    Case("linear_log_probs_entropy", _lce_args,
         lambda h, w, t, b: (lambda lp, ent: (_squares(lp) + (ent * lp).sum(), lp, ent))(
             *fl.linear_log_probs(h, w, t, b, ignore_index=-100, return_entropy=True, temperature=0.7,
                                  logit_softcap=5.0)), (0, 1, 3)),
    Case("linear_log_probs_quantized", _lce_quantized,
         lambda h, q, s, qb, t, b: (lambda lp: (_squares(lp), lp))(
             fl.linear_log_probs(h, q, t, b, scales=s, biases=qb, group_size=32, bits=4, ignore_index=-100)),
         (0, 5)),
    Case("linear_row_stats_all", _lce_args,
         lambda h, w, t, b: (lambda lse, tg, sm, ex, mx_, am: (
             _squares(lse) + (tg * ex).sum() + (sm * sm).sum(), lse, tg, sm, ex, mx_, am))(
             *fl._ext.linear_row_stats(h, w, t, b, stats=["lse", "target", "logit_sum", "expected", "max",
                                                          "argmax"], vocab_start=3)), (0, 1, 3)),
    Case("log_probs_bf16", lambda r, n: (_normal(r, (n, K), dtype=mx.bfloat16), _labels(r, n, ignored=True)),
         lambda x, t: (lambda lp, ent: (_squares(lp) + (ent * lp).sum(), lp, ent))(
             *fl.log_probs(x, t, ignore_index=-100, return_entropy=True, temperature=2.0)), (0,), mx.bfloat16),
]
CASE_BY_NAME = {c.name: c for c in CASES}

TOL = {mx.float32: (1e-5, 1e-6), mx.bfloat16: (1e-2, 1e-3)}


def _np(a):
    return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)


def _compare(got, want, dtype, what):
    """Lists of arrays, compiled vs eager: same shapes, values within the
    rounding of ``dtype`` (compile may fuse the element-wise ops around the
    primitives; the bugs under test are off by factors, or crash)."""
    got, want = list(got), list(want)
    assert len(got) == len(want), what
    rtol, atol = TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what} [{i}]: shape {g.shape} vs eager {w.shape}"
        assert g.dtype == w.dtype, f"{what} [{i}]: dtype {g.dtype} vs eager {w.dtype}"
        np.testing.assert_allclose(_np(g), _np(w), rtol=rtol, atol=atol, err_msg=f"{what} [{i}]")


def _flat(*parts):
    out = []
    for p in parts:
        if isinstance(p, (tuple, list)):
            out.extend(_flat(*p))
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------
# the same call twice in one graph
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_duplicated_calls(case):
    """2 L(x) + 3 L(x): compile merges the two forward primitives; the two
    gradient paths read one buffer and must not rescale it in place (the
    forward-formed linear CE gradients came out 12x, or 2x, not 5x)."""
    args = case.make(np.random.default_rng(1), 6)
    mx.eval(args)

    def twice(*a):
        return 2.0 * case.loss(*a) + 3.0 * case.loss(*a)

    vg = mx.value_and_grad(twice, argnums=case.argnums)
    _compare(_flat(mx.compile(vg)(*args)), _flat(vg(*args)), case.dtype, f"{case} 2L+3L")
    # and it is 5 times the single call's gradient (eager)
    single = mx.grad(case.loss, argnums=case.argnums)(*args)
    _compare([5.0 * g for g in _flat(single)], _flat(vg(*args)[1]), case.dtype, f"{case} 5 x grad")
    # forward only, twice: every output of one call, the loss of the other.
    # (Not every output of both: MLX 0.32.4's compile fails, IndexError
    # "_Map_base::at", on any merged multi-output primitive whose outputs
    # are returned while one of them also feeds another op, its own
    # mx.divmod included; see docs/api.md, "Under mx.compile and mx.vmap".)
    both = lambda *a: (case.f(*a), case.f(*a)[0])  # noqa: E731
    _compare(_flat(mx.compile(both)(*args)), _flat(both(*args)), case.dtype, f"{case} forward twice")


# --------------------------------------------------------------------------
# identical calls asking for different outputs and gradients (one process
# for the whole matrix: before the fix this crashed the interpreter)
# --------------------------------------------------------------------------
def _different_requests(case):
    args = case.make(np.random.default_rng(2), 6)
    mx.eval(args)

    def step(*a):
        outs = [case.f(*a)]  # forward only: no gradient requested
        outs += [mx.grad(case.loss, argnums=i)(*a) for i in case.argnums]  # one gradient each
        outs.append(mx.value_and_grad(case.loss, argnums=case.argnums)(*a))  # all of them
        outs.append(mx.grad(case.loss, argnums=tuple(reversed(case.argnums)))(*a))
        return outs

    _compare(_flat(mx.compile(step)(*args)), _flat(step(*args)), case.dtype, f"{case} requests")


def _run_in_subprocess(what, device, names):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), what, device, *names],
        capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert proc.returncode == 0, (
        f"{what}: exit status {proc.returncode} (negative: killed by that signal)\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())


def test_different_requests(device):
    """In one compiled step: the forward alone, each gradient alone, all of
    them with the value, and all in another order, of the same call. (A
    segfault before: equivalence ignored which gradients the linear CE was
    asked for, and compile kept one forward for all.)"""
    _run_in_subprocess("requests", device, [c.name for c in CASES])


# --------------------------------------------------------------------------
# shapeless: traced once, called at other sizes
# --------------------------------------------------------------------------
SIZES = (6, 3, 9, 0)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_shapeless_other_sizes(case):
    """Traced at 6 rows, then called at 3, 9 and 0 without retracing: values
    and gradients equal eager's at every size (a mean divided by the first
    trace's row count before, and an empty batch gave NaN for 0)."""
    traces = []

    def counted(fn):
        def traced(*a):
            traces.append(fn)
            return fn(*a)
        return traced

    # (forward and gradients compiled apart: together they are the
    # different-requests case above)
    steps = [case.f, mx.value_and_grad(case.loss, argnums=case.argnums)]
    compiled = [mx.compile(counted(fn), shapeless=True) for fn in steps]
    rng = np.random.default_rng(3)
    for n in SIZES if case.shapeless_empty else [n for n in SIZES if n]:
        args = case.make(rng, n)
        mx.eval(args)
        for fn, cfn in zip(steps, compiled):
            _compare(_flat(cfn(*args)), _flat(fn(*args)), case.dtype, f"{case} shapeless n={n}")
    assert len(traces) == len(steps), f"{case}: {len(traces)} traces of {len(steps)} functions"


def test_shapeless_class_weights_other_class_counts():
    """Class weights of another length (another K) under one shapeless trace:
    the mean's weighted row count must not keep the first K."""
    compiled = mx.compile(
        lambda x, t, w: fl.cross_entropy(x, t, class_weights=w, ignore_index=-100, reduction="mean"),
        shapeless=True)
    rng = np.random.default_rng(4)
    for k in (5, 9, 3):
        x = _normal(rng, (8, k))
        t = mx.array(np.array([0, k - 1, -100, 1, k - 1, 2, 0, k - 1], np.int32))
        w = mx.array(np.linspace(0.5, 2.0, k).astype(np.float32))
        want = fl.cross_entropy(x, t, class_weights=w, ignore_index=-100, reduction="mean")
        _compare([compiled(x, t, w)], [want], mx.float32, f"K={k}")


# --------------------------------------------------------------------------
# vmap over examples with no rows
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_vmap_examples_without_rows(case):
    """vmap over 3 examples of 0 rows each gives what 3 unbatched calls give
    (the linear CE raised MLX's "[take] Cannot do a non-empty take")."""
    rng = np.random.default_rng(5)
    examples = [case.make(rng, 0) for _ in range(3)]
    batched = [mx.stack(parts) for parts in zip(*examples)]
    out = mx.vmap(case.f)(*batched)
    grads = mx.vmap(mx.grad(case.loss, argnums=case.argnums))(*batched)
    for b, ex in enumerate(examples):
        want = _flat(case.f(*ex), mx.grad(case.loss, argnums=case.argnums)(*ex))
        got = _flat(out, grads)
        _compare([g[b] for g in got], want, case.dtype, f"{case} vmap example {b}")


def test_vmap_empty_batch():
    """vmap over a batch of no examples: empty results of the batched
    shapes, as for a batch of one with its axis cut to 0."""
    rng = np.random.default_rng(6)
    for case in (CASE_BY_NAME["lce_mean"], CASE_BY_NAME["lce_rows"], CASE_BY_NAME["lce_quantized_mean"]):
        one = [mx.stack([a]) for a in case.make(rng, 4)]
        none = [a[:0] for a in one]
        for fn in (case.f, mx.grad(case.loss, argnums=case.argnums)):
            want = _flat(mx.vmap(fn)(*one))
            got = _flat(mx.vmap(fn)(*none))
            assert [g.shape for g in got] == [(0,) + w.shape[1:] for w in want], case
            assert [g.dtype for g in got] == [w.dtype for w in want], case


def test_vmap_of_linear_ce_refuses_a_shapeless_trace():
    """The linear CE's vmap runs the examples one by one (a slice each), which
    a shapeless trace cannot size: an error, not a graph frozen at one batch."""
    w = _normal(np.random.default_rng(7), (V, H))
    mx.eval(w)
    f = mx.compile(mx.vmap(lambda h, t: fl.linear_cross_entropy(h, w, t)), shapeless=True)
    h, _, t, _ = _lce_args(np.random.default_rng(8), 6)
    with pytest.raises(ValueError, match="Slice cannot infer output shapes"):
        f(mx.stack([h, h]), mx.stack([t, t]))


def test_mlx_limits_the_readme_names():
    """The two MLX 0.32.4 compile limits docs/api.md names (and this matrix
    works around), shown with MLX's own ops. When MLX fixes them this fails:
    update docs/api.md and drop the workarounds (shapeless_empty, both())."""
    x, y = mx.array([5.0, 7.0]), mx.array([2.0, 3.0])

    def g(a, b):
        q, r = mx.divmod(a, b)
        return q * q, r

    with pytest.raises(IndexError):
        mx.compile(lambda a, b: (g(a, b), g(a, b)))(x, y)
    f = mx.compile(lambda a: (a + a.sum().reshape(1, 1)) * 2, shapeless=True)
    f(mx.ones((6, 7)))
    assert f(mx.ones((0, 7))).shape == (1, 7)


if __name__ == "__main__":
    # python test_compile_matrix.py requests DEVICE NAME...: run those cases'
    # different-requests checks on DEVICE's default stream; print
    # {name: error} as JSON on the last line.
    what, device_name, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    check = {"requests": _different_requests}[what]
    failures = {}
    for name in names:
        try:
            with mx.stream(DEVICES[device_name]):
                check(CASE_BY_NAME[name])
        except Exception as err:  # noqa: BLE001 - reported to the parent test
            failures[name] = f"{type(err).__name__}: {err}"
        print(f"{name}: {'FAILED' if name in failures else 'ok'}", file=sys.stderr, flush=True)
    print(json.dumps(failures))
