"""A DPO step and a GRPO step on a small mlx-lm llama, done the usual way and
with mlx_fused_losses, comparing the loss, the gradients, the time per step
and the peak memory.

The model is built from a config (no download) with random weights and Qwen's
151936-token vocabulary (tied embeddings); the reference model is a copy with
perturbed weights. The batches are random token ids: DPO pairs (a shared
prompt, chosen and rejected completions of different lengths, padding) and
GRPO groups (completions of one prompt, random rewards normalised within the
group into advantages).

  usual  what MLX trainers (mlx-lm-lora) do: the model's [B, T, V] logits,
         cast to float32 (mlx-lm-lora's DPO does; its GRPO casts to float16,
         too coarse to compare at 1e-5), per-token log-probs by cross-entropy,
         then the loss formula on them (written out here, as they do)
  fl     no logits: the model's body, then mlx_fused_losses.linear_dpo_loss /
         linear_grpo_loss on its hidden states and output head, which score
         the tokens with linear_log_probs (one chunk of logits alive at a
         time, forward and backward)

The reference model's log-probabilities are computed the same way under
mx.stop_gradient (fl: from its hidden states and head, ref_*_hidden and
ref_weight). The step is the loss's value and gradient with respect to
the trainable parameters (the transformer layers; the tied embedding/head is
frozen, as in LoRA fine-tuning: with --train-head its [V, H] gradient, the
same array both ways, is trained too). Peak memory is mx.get_peak_memory()
after mx.reset_peak_memory(), minus the memory in use before the step (the
models and the batch).

Each loss is also computed from float64 log-probabilities of the same hidden
states and head ("vs f64": how far each way is from it; both ways compute in
float32, and MLX's float32 cross-entropy over 151936 logits is off by up to
~1e-5 per token). "grad diff" is the largest difference between the two ways'
gradients relative to the largest gradient entry.

The script exits with status 1 if fl's loss differs from the usual way's or
from the float64 value by more than LOSS_ATOL, or (head frozen) if fl's peak
above the model is more than PEAK_RATIO of the usual way's. With --train-head
both peaks also hold the tied head's [V, H] gradients (~3 V H floats: the
head's, the embedding lookup's and their sum), the same arrays both ways.

Usage (from the repository root, with `pip install ".[lm]"`):
  python examples/preference_lm.py            # ~1 minute on 2 cores
  python examples/preference_lm.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

try:
    from mlx_lm.models import llama
except ImportError:  # pragma: no cover
    sys.exit("this example needs mlx-lm: pip install 'mlx-fused-losses[lm]'")

import mlx_fused_losses as fl

SEED = 0
# Both ways compute the same float32 function of the same weights: the
# per-token log-probs agree to float32 rounding (~1e-6 relative), and the
# losses, means of a few such sums, to well under this.
LOSS_ATOL = 1e-5
PEAK_RATIO = 0.1  # fl's peak above the model at most this fraction of the usual way's
BETA_DPO = 0.1
BETA_GRPO = 0.04


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


def usual_log_probs(model: nn.Module, tokens: mx.array) -> mx.array:
    """[B, T] log p(tokens[:, 1:]) from the materialised float32 logits, as
    mlx-lm-lora's trainers compute them."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, tokens[:, 1:])


def float64_log_probs(model: nn.Module, tokens: mx.array, rows_per_chunk: int = 32) -> mx.array:
    """The exact value both ways approximate: the same hidden states and
    head, the logits and their log-sum-exp in float64 (NumPy, by row chunks)."""
    hidden = np.array(model.model(tokens[:, :-1]).astype(mx.float32), np.float64)
    weight = np.array(model.model.embed_tokens.weight.astype(mx.float32), np.float64)
    targets = np.array(tokens[:, 1:])
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = np.empty(flat_targets.shape, np.float64)
    for start in range(0, len(out), rows_per_chunk):
        z = flat_hidden[start:start + rows_per_chunk] @ weight.T
        top = z.max(-1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(-1))
        out[start:start + rows_per_chunk] = z[np.arange(len(z)), flat_targets[start:start + rows_per_chunk]] - lse
    return mx.array(out.reshape(targets.shape), mx.float64)


# --- the batches ----------------------------------------------------------------


def completion_batch(rng, vocab_size, rows, length, prompt):
    """Token ids [rows, length + 1] (a shared prompt of `prompt` tokens, then a
    completion of random length, then padding 0) and the mask [rows, length]
    of the scored targets (the completion's tokens)."""
    tokens = rng.integers(1, vocab_size, size=(rows, length + 1))
    tokens[:, :prompt] = tokens[0, :prompt]
    ends = rng.integers(prompt + 2, length + 2, size=rows)
    ends[0] = length + 1  # one row fills the width
    position = np.arange(1, length + 1)  # the position of each target in the sequence
    mask = (position[None] >= prompt) & (position[None] < ends[:, None])
    tokens[np.arange(length + 1)[None] >= ends[:, None]] = 0
    return mx.array(tokens.astype(np.int32)), mx.array(mask)


def dpo_batch(rng, vocab_size, pairs, length):
    chosen, chosen_mask = completion_batch(rng, vocab_size, pairs, length, length // 4)
    rejected, rejected_mask = completion_batch(rng, vocab_size, pairs, length, length // 4)
    return chosen, rejected, chosen_mask, rejected_mask


def grpo_batch(rng, vocab_size, groups, group_size, length):
    tokens, masks, advantages = [], [], []
    for _ in range(groups):
        t, m = completion_batch(rng, vocab_size, group_size, length, length // 4)
        rewards = rng.normal(size=group_size)
        tokens.append(t)
        masks.append(m)
        advantages.append((rewards - rewards.mean()) / (rewards.std() + 1e-4))
    return mx.concatenate(tokens), mx.concatenate(masks), mx.array(np.concatenate(advantages).astype(np.float32))


# --- the losses, both ways ----------------------------------------------------------


def usual_dpo(model, ref_model, chosen, rejected, chosen_mask, rejected_mask, chunk_bytes):
    """mlx-lm-lora's sigmoid DPO: summed masked log-probs, one forward on the
    concatenated pairs."""
    both = mx.concatenate([chosen, rejected])
    mask = mx.concatenate([chosen_mask, rejected_mask]).astype(mx.float32)
    scores = (usual_log_probs(model, both) * mask).sum(-1)
    ref_scores = mx.stop_gradient((usual_log_probs(ref_model, both) * mask).sum(-1))
    pairs = chosen.shape[0]
    logits = (scores[:pairs] - scores[pairs:]) - (ref_scores[:pairs] - ref_scores[pairs:])
    return -nn.log_sigmoid(BETA_DPO * logits).mean()


def fused_dpo(model, ref_model, chosen, rejected, chosen_mask, rejected_mask, chunk_bytes):
    """The same with fl.linear_dpo_loss: the policy's and the reference's
    hidden states and the (shared, tied) head go in; no logits come out."""
    both = mx.concatenate([chosen, rejected])
    hidden, ref_hidden = model.model(both[:, :-1]), ref_model.model(both[:, :-1])
    pairs = chosen.shape[0]
    loss, _ = fl.linear_dpo_loss(hidden[:pairs], hidden[pairs:], model.model.embed_tokens.weight,
                                 chosen[:, 1:], rejected[:, 1:], chosen_mask=chosen_mask, rejected_mask=rejected_mask,
                                 ref_chosen_hidden=ref_hidden[:pairs], ref_rejected_hidden=ref_hidden[pairs:],
                                 ref_weight=ref_model.model.embed_tokens.weight, beta=BETA_DPO,
                                 chunk_bytes=chunk_bytes)
    return loss


def float64_dpo(model, ref_model, chosen, rejected, chosen_mask, rejected_mask):
    both = mx.concatenate([chosen, rejected])
    log_probs, ref_log_probs = float64_log_probs(model, both), float64_log_probs(ref_model, both)
    pairs = chosen.shape[0]
    loss, _ = fl.dpo_loss(log_probs[:pairs], log_probs[pairs:], chosen_mask, rejected_mask,
                          ref_log_probs[:pairs], ref_log_probs[pairs:], beta=BETA_DPO)
    return loss.item()


def usual_grpo(model, ref_model, tokens, mask, advantages, chunk_bytes):
    """GRPO (on-policy: the old log-probs are the current ones, detached),
    epsilon 0.2, k3 KL to the reference, each completion's token mean."""
    log_probs = usual_log_probs(model, tokens)
    ref_log_probs = mx.stop_gradient(usual_log_probs(ref_model, tokens))
    ratio = mx.exp(log_probs - mx.stop_gradient(log_probs))
    a = advantages[:, None]
    per_token = -mx.minimum(ratio * a, mx.clip(ratio, 0.8, 1.2) * a)
    delta = ref_log_probs - log_probs
    per_token = per_token + BETA_GRPO * (mx.exp(delta) - delta - 1)
    m = mask.astype(mx.float32)
    return ((per_token * m).sum(-1) / m.sum(-1)).mean()


def fused_grpo(model, ref_model, tokens, mask, advantages, chunk_bytes):
    loss, _ = fl.linear_grpo_loss(model.model(tokens[:, :-1]), model.model.embed_tokens.weight, tokens[:, 1:],
                                  advantages, mask=mask, ref_hidden=ref_model.model(tokens[:, :-1]),
                                  ref_weight=ref_model.model.embed_tokens.weight, beta=BETA_GRPO, loss_type="grpo",
                                  chunk_bytes=chunk_bytes)
    return loss


def float64_grpo(model, ref_model, tokens, mask, advantages):
    loss, _ = fl.grpo_loss(float64_log_probs(model, tokens), mask, advantages.astype(mx.float64), None,
                           float64_log_probs(ref_model, tokens), beta=BETA_GRPO, loss_type="grpo")
    return loss.item()


# --- one step, measured -------------------------------------------------------------


def measure(model, loss_fn, args, repeats):
    """(loss, gradients, median seconds per step, peak bytes above what was in
    use before the step)."""
    step = nn.value_and_grad(model, loss_fn)
    loss, grads = step(model, *args)  # warm-up: the first call allocates and caches
    mx.eval(loss, grads)
    del loss, grads
    times, peak = [], None
    for _ in range(repeats):
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, grads = step(model, *args)
        mx.eval(loss, grads)
        times.append(time.perf_counter() - tic)
        peak = mx.get_peak_memory() - before if peak is None else peak
    return loss.item(), grads, statistics.median(times), peak


def max_relative_difference(grads, reference):
    scale = max(float(mx.abs(g).max()) for _, g in tree_flatten(reference))
    return max(float(mx.abs(a - b).max()) for (_, a), (_, b) in zip(tree_flatten(grads), tree_flatten(reference))) / scale


SIZES = {"full": dict(hidden=128, pairs=4, groups=2, group_size=4, length=96, repeats=3),
         "quick": dict(hidden=64, pairs=2, groups=2, group_size=2, length=32, repeats=1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and batches (default: off)")
    parser.add_argument("--vocab-size", type=int, default=151936,
                        help="vocabulary, tied embeddings (default: %(default)s, Qwen's)")
    for name, what in [("hidden", "hidden size (multiple of 64)"), ("pairs", "DPO pairs per step"),
                       ("groups", "GRPO prompts per step"), ("group-size", "GRPO completions per prompt"),
                       ("length", "tokens per sequence"), ("repeats", "timed steps per way")]:
        key = name.replace("-", "_")
        parser.add_argument(f"--{name}", type=int,
                            help=f"{what} (default: {SIZES['full'][key]}, {SIZES['quick'][key]} with --quick)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    parser.add_argument("--chunk-mib", type=int, default=8,
                        help="fl's working memory for one chunk of logits, MiB (default: %(default)s)")
    parser.add_argument("--train-head", action="store_true",
                        help="train the tied embedding/head too (default: off, frozen as in LoRA)")
    opts = parser.parse_args(argv)
    for key, value in SIZES["quick" if opts.quick else "full"].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    chunk_bytes = opts.chunk_mib << 20

    model = build_model(opts.vocab_size, opts.hidden, opts.layers, SEED)
    ref_model = build_model(opts.vocab_size, opts.hidden, opts.layers, SEED)
    mx.random.seed(SEED + 1)  # the reference: the same architecture, weights moved a little
    ref_model.update(tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape, p.dtype), ref_model.parameters()))
    ref_model.freeze()
    if not opts.train_head:
        model.model.embed_tokens.freeze()
    mx.eval(model.parameters(), ref_model.parameters())
    rng = np.random.default_rng(SEED)
    dpo_args = dpo_batch(rng, opts.vocab_size, opts.pairs, opts.length)
    grpo_args = grpo_batch(rng, opts.vocab_size, opts.groups, opts.group_size, opts.length)
    trainable = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    print(f"mlx {mx.__version__}, device {mx.default_device()}; llama V={opts.vocab_size}, H={opts.hidden}, "
          f"{opts.layers} layers, {trainable / 1e6:.2f} M trainable parameters"
          f"{' (head included)' if opts.train_head else ' (tied head frozen)'}; fl chunk {opts.chunk_mib} MiB")

    failures = []
    cases = [("DPO", usual_dpo, fused_dpo, float64_dpo, dpo_args, f"{opts.pairs} pairs"),
             ("GRPO", usual_grpo, fused_grpo, float64_grpo, grpo_args,
              f"{opts.groups}x{opts.group_size} completions")]
    print(f"{'step':<5} {'way':<6} {'loss':>11} {'vs usual':>9} {'vs f64':>8} {'grad diff':>9} "
          f"{'s/step':>7} {'peak MB':>8}   (T={opts.length})")
    for name, usual, fused, exact, batch, what in cases:
        results = {}
        for way, fn in (("usual", usual), ("fl", fused)):
            loss_fn = (lambda m, *a, fn=fn: fn(m, ref_model, *a, chunk_bytes))
            results[way] = measure(model, loss_fn, batch, opts.repeats)
        (u_loss, u_grads, u_time, u_peak), (f_loss, f_grads, f_time, f_peak) = results["usual"], results["fl"]
        exact_loss = exact(model, ref_model, *batch)
        diff = abs(f_loss - u_loss)
        grad_diff = max_relative_difference(f_grads, u_grads)
        print(f"{name:<5} {'usual':<6} {u_loss:11.8f} {'':>9} {abs(u_loss - exact_loss):8.1e} {'':>9} "
              f"{u_time:7.3f} {u_peak / 1e6:8.1f}   {what}")
        print(f"{'':<5} {'fl':<6} {f_loss:11.8f} {diff:9.1e} {abs(f_loss - exact_loss):8.1e} {grad_diff:9.1e} "
              f"{f_time:7.3f} {f_peak / 1e6:8.1f}   peak {f_peak / u_peak:.3f} of usual, "
              f"{u_time / f_time:.1f}x faster", flush=True)
        if not (diff <= LOSS_ATOL and abs(f_loss - exact_loss) <= LOSS_ATOL):
            failures.append(f"{name}: |loss - usual loss| = {diff:.3g}, |loss - float64 loss| = "
                            f"{abs(f_loss - exact_loss):.3g}: more than {LOSS_ATOL}")
        # A trained head's [V, H] gradients (the head's and the embedding lookup's, and their sum:
        # ~3 V H floats) are in both peaks alike; the 1/10 target is for the frozen head.
        if not opts.train_head and not f_peak <= PEAK_RATIO * u_peak:
            failures.append(f"{name}: fl's peak {f_peak / 1e6:.1f} MB is more than {PEAK_RATIO} of the usual "
                            f"way's {u_peak / 1e6:.1f} MB")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
