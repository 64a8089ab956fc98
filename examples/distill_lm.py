"""Distil a small mlx-lm llama (the teacher) into a smaller one (the student),
a few steps the usual way and with mlx_fused_losses, comparing the losses, the
time per step and the peak memory.

Both models are built from configs (no download) with random weights and
Qwen's 151936-token vocabulary (tied embeddings); the teacher has twice the
student's hidden size and is frozen. The batches are random token ids.

  usual  what mlx-lm's distillation recipes do (mlx_lm.quant.dwq): the
         student's and the teacher's [B, T, V] logits, then
         mlx_lm.tuner.losses.kl_div_loss(student, teacher).mean() (or
         js_div_loss for --kind jsd), the teacher under mx.stop_gradient
  fl     no logits: both models' bodies, then
         mlx_fused_losses.linear_distillation_loss on the hidden states and
         the two output heads (one chunk of rows of both heads' logits alive at
         a time, forward and backward)

Each way trains its own copy of the student from the same weights with SGD on
the same batches (the student's tied embedding/head frozen, as in LoRA-style
distillation; --train-head trains it too). Every step's loss is also computed
in float64 from the same hidden states and heads ("vs f64"). Peak memory is
mx.get_peak_memory() after mx.reset_peak_memory(), minus the memory in use
before the step (the models and the batch).

The script exits with status 1 if a step's fl loss differs from the float64
value by more than LOSS_ATOL, or from the usual way's by more than LOSS_ATOL
plus the usual way's own distance from float64 (its float32 log-sum-exps over
151936 logits round differently), or if fl's peak above the models is more
than PEAK_RATIO of the usual way's.

Usage (from the repository root, with `pip install ".[lm]"`):
  python examples/distill_lm.py            # ~1 minute on 2 cores
  python examples/distill_lm.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

try:
    from mlx_lm.models import llama
    from mlx_lm.tuner.losses import js_div_loss, kl_div_loss
except ImportError:  # pragma: no cover
    sys.exit("this example needs mlx-lm: pip install 'mlx-fused-losses[lm]'")

import mlx_fused_losses as fl

SEED = 0
# Both ways compute the same float32 function of the same weights; each step's
# loss is a mean over the tokens of per-token divergences accurate to ~1e-6.
LOSS_ATOL = 1e-5
PEAK_RATIO = 0.1  # fl's peak above the models at most this fraction of the usual way's
USUAL = {"kl": kl_div_loss, "jsd": js_div_loss}


def build_model(vocab_size: int, hidden: int, layers: int, seed: int) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=2 * hidden, num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64), rms_norm_eps=1e-5,
        vocab_size=vocab_size, tie_word_embeddings=True,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def usual_loss(kind):
    def loss(student, teacher, tokens, chunk_bytes):
        s = student(tokens)
        t = mx.stop_gradient(teacher(tokens))
        return USUAL[kind](s, t).mean()
    return loss


def fused_loss(kind):
    def loss(student, teacher, tokens, chunk_bytes):
        t_hidden = mx.stop_gradient(teacher.model(tokens))
        return fl.linear_distillation_loss(student.model(tokens), student.model.embed_tokens.weight,
                                           t_hidden, teacher.model.embed_tokens.weight, kind=kind,
                                           chunk_bytes=chunk_bytes)
    return loss


def float64_loss(kind, student, teacher, tokens, rows_per_chunk=32):
    """The exact value both ways approximate: the same hidden states and heads,
    the divergence of their logits in float64 (NumPy, by row chunks)."""
    def rows(model):
        h = np.array(model.model(tokens).astype(mx.float32), np.float64)
        return h.reshape(-1, h.shape[-1]), np.array(model.model.embed_tokens.weight.astype(mx.float32), np.float64)

    (hs, ws), (ht, wt) = rows(student), rows(teacher)
    total = 0.0
    for start in range(0, len(hs), rows_per_chunk):
        zs, zt = hs[start:start + rows_per_chunk] @ ws.T, ht[start:start + rows_per_chunk] @ wt.T
        lq = zs - zs.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        lp = zt - zt.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        p, q = np.exp(lp), np.exp(lq)
        if kind == "kl":
            total += (p * (lp - lq)).sum()
        else:
            lm = np.log(0.5 * (p + q))
            total += 0.5 * ((p * (lp - lm)).sum() + (q * (lq - lm)).sum())
    return total / len(hs)


def train(student, teacher, loss_fn, batches, lr, chunk_bytes):
    """SGD steps; per step (loss, seconds, peak bytes above what was in use
    before the step). The first step's time (first calls allocate) is left
    out of the median."""
    optimizer = optim.SGD(learning_rate=lr)
    step = nn.value_and_grad(student, loss_fn)
    out = []
    for tokens in batches:
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grads = step(student, teacher, tokens, chunk_bytes)
        mx.eval(loss, grads)
        seconds = time.perf_counter() - tic
        peak = mx.get_peak_memory() - before
        optimizer.update(student, grads)
        mx.eval(student.parameters())
        out.append((loss.item(), seconds, peak))
    return out


SIZES = {"full": dict(hidden=64, batch=4, length=128, steps=4),
         "quick": dict(hidden=32, batch=2, length=64, steps=2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and batches (default: off)")
    parser.add_argument("--vocab-size", type=int, default=151936,
                        help="vocabulary, tied embeddings (default: %(default)s, Qwen's)")
    for name, what in [("hidden", "the student's hidden size (the teacher's: twice it)"),
                       ("batch", "sequences per step"), ("length", "tokens per sequence"),
                       ("steps", "SGD steps per way")]:
        parser.add_argument(f"--{name}", type=int,
                            help=f"{what} (default: {SIZES['full'][name]}, {SIZES['quick'][name]} with --quick)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    parser.add_argument("--kind", choices=["kl", "jsd"], default="kl",
                        help="KL(teacher || student) or the symmetric JSD (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD's learning rate (default: %(default)s)")
    parser.add_argument("--chunk-mib", type=int, default=8,
                        help="fl's working memory for one chunk of both heads' logits, MiB (default: %(default)s)")
    parser.add_argument("--train-head", action="store_true",
                        help="train the student's tied embedding/head too (default: off)")
    opts = parser.parse_args(argv)
    for key, value in SIZES["quick" if opts.quick else "full"].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    chunk_bytes = opts.chunk_mib << 20

    teacher = build_model(opts.vocab_size, 2 * opts.hidden, opts.layers, SEED + 1)
    teacher.freeze()
    rng = np.random.default_rng(SEED)
    batches = [mx.array(rng.integers(0, opts.vocab_size, (opts.batch, opts.length)).astype(np.int32))
               for _ in range(opts.steps)]
    print(f"mlx {mx.__version__}, device {mx.default_device()}; llama V={opts.vocab_size}: teacher "
          f"H={2 * opts.hidden}, student H={opts.hidden}, {opts.layers} layers; {opts.kind}; "
          f"{opts.batch} x {opts.length} tokens per step; fl chunk {opts.chunk_mib} MiB")

    results = {}
    students = {}
    for way, make in (("usual", usual_loss), ("fl", fused_loss)):
        student = build_model(opts.vocab_size, opts.hidden, opts.layers, SEED)
        if not opts.train_head:
            student.model.embed_tokens.freeze()
        results[way] = train(student, teacher, make(opts.kind), batches, opts.lr, chunk_bytes)
        students[way] = student

    # float64 values of each step's loss: replay the steps on a third copy
    # (the usual way's weights, step by step)
    exact = []
    replay = build_model(opts.vocab_size, opts.hidden, opts.layers, SEED)
    if not opts.train_head:
        replay.model.embed_tokens.freeze()
    optimizer = optim.SGD(learning_rate=opts.lr)
    step = nn.value_and_grad(replay, usual_loss(opts.kind))
    for tokens in batches:
        exact.append(float64_loss(opts.kind, replay, teacher, tokens))
        _, grads = step(replay, teacher, tokens, chunk_bytes)
        optimizer.update(replay, grads)
        mx.eval(replay.parameters())

    failures = []
    print(f"{'step':>4} {'usual loss':>12} {'fl loss':>12} {'fl-usual':>9} {'usual-f64':>9} {'fl-f64':>9}")
    for i, ((u, _, _), (f, _, _), e) in enumerate(zip(results["usual"], results["fl"], exact)):
        print(f"{i + 1:>4} {u:12.8f} {f:12.8f} {abs(f - u):9.1e} {abs(u - e):9.1e} {abs(f - e):9.1e}")
        if not (abs(f - e) <= LOSS_ATOL and abs(f - u) <= LOSS_ATOL + abs(u - e)):
            failures.append(f"step {i + 1}: |fl - float64| = {abs(f - e):.3g}, |fl - usual| = {abs(f - u):.3g}")
    trained = max(float(mx.abs(a - b).max()) for (_, a), (_, b)
                  in zip(tree_flatten(students["fl"].trainable_parameters()),
                         tree_flatten(students["usual"].trainable_parameters())))
    print(f"after {opts.steps} steps the two students' trainable weights differ by at most {trained:.1e}")
    times = {w: statistics.median([r[1] for r in results[w][1:]] or [results[w][0][1]]) for w in results}
    peaks = {w: max(r[2] for r in results[w]) for w in results}
    print(f"{'way':<6} {'s/step':>8} {'peak MB above the models':>25}")
    for w in ("usual", "fl"):
        print(f"{w:<6} {times[w]:8.3f} {peaks[w] / 1e6:25.1f}")
    print(f"fl: peak {peaks['fl'] / peaks['usual']:.3f} of usual, {times['usual'] / times['fl']:.1f}x faster")
    if not peaks["fl"] <= PEAK_RATIO * peaks["usual"]:
        failures.append(f"fl's peak {peaks['fl'] / 1e6:.1f} MB is more than {PEAK_RATIO} of the usual way's "
                        f"{peaks['usual'] / 1e6:.1f} MB")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
