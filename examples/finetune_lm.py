"""Train small mlx-lm models with mlx-lm's loss, our cross-entropy and our fused
linear cross-entropy, and compare loss curves, time per step and peak memory.

Models are built from a config (no download) with random initial weights: a
llama with a 32000-token vocabulary (untied head) and one with 151936 tokens
(Qwen's vocabulary, tied embeddings), plus the larger one quantized to 4 bits
with LoRA adapters on its layers and everything else frozen (QLoRA; the
quantized head stays frozen). The text is the source code of a few Python
standard-library modules, split into words and punctuation, each word mapped to
a token id by frequency rank (words past the vocabulary map to id 0).

For each model, from the same initial weights and batches:
  mlx-lm     mlx_lm.tuner.trainer.default_loss (logits, mlx.nn.losses)
  fl CE      mlx_fused_losses.lm.lm_loss (logits, fused cross-entropy)
  fl linear  mlx_fused_losses.lm.linear_lm_loss (no logits: body + fused
             linear cross-entropy on the output head)
The step is compiled like mlx-lm's trainer (nn.value_and_grad + mx.compile).
The three compute the same loss: the script exits with status 1 if the
first step's loss differs from mlx-lm's by more than FIRST_STEP_RTOL or a curve
by more than CURVE_ATOL (see there why the two differ).

Usage (from the repository root, with `pip install ".[lm]"`):
  python examples/finetune_lm.py            # 20 steps per run, ~10 minutes on 2 cores
  python examples/finetune_lm.py --quick    # under 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import inspect
import importlib
import re
import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

try:
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
except ImportError:  # pragma: no cover
    sys.exit("this example needs mlx-lm: pip install 'mlx-fused-losses[lm]'")

from mlx_fused_losses.lm import linear_lm_loss, lm_loss

SEED = 0
# The first step's loss is the same function of the same weights and batch:
# the three agree to float32 rounding. Later steps start from weights that
# differ by the previous updates' rounding, which Adam amplifies (it divides
# by the root of tiny second moments, and LoRA's zero-initialised b leaves a's
# first gradients at rounding level): curves of the same loss moved apart by
# 1.7e-2 after 20 steps (V=32000) and 3.7e-2 after 6 QLoRA steps here.
FIRST_STEP_RTOL = 1e-5
CURVE_ATOL = 0.2
TEXT_MODULES = ["argparse", "textwrap", "difflib", "json.decoder", "collections",
                "functools", "dataclasses", "pathlib", "statistics", "typing"]

LOSSES = {"mlx-lm": default_loss, "fl CE": lm_loss, "fl linear": linear_lm_loss}


def corpus_tokens(vocab_size: int) -> np.ndarray:
    """Word-level tokens of some standard-library source text: ids by
    frequency rank (1 = most frequent), 0 for words beyond the vocabulary."""
    text = "\n".join(inspect.getsource(importlib.import_module(m)) for m in TEXT_MODULES)
    words = re.findall(r"\w+|[^\w\s]", text)
    ranks = {w: i + 1 for i, (w, _) in enumerate(collections.Counter(words).most_common())}
    ids = np.array([ranks[w] for w in words], dtype=np.int64)
    return np.where(ids < vocab_size, ids, 0).astype(np.int32)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, steps: int):
    """`steps` batches of `batch_size` random windows of seq_len + 1 tokens
    (inputs and shifted targets), with mlx-lm's (offset, length) per row:
    every target counts."""
    rng = np.random.default_rng(SEED)
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=(steps, batch_size))
    lengths = mx.array(np.tile([[0, seq_len + 1]], (batch_size, 1)).astype(np.int32))
    for row_starts in starts:
        batch = np.stack([tokens[s : s + seq_len + 1] for s in row_starts])
        yield mx.array(batch), lengths


def build_model(vocab_size: int, hidden: int, layers: int, tied: bool) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
        intermediate_size=2 * hidden, num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64), rms_norm_eps=1e-5,
        vocab_size=vocab_size, tie_word_embeddings=tied,
    )
    mx.random.seed(SEED)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def quantize_for_qlora(model: nn.Module, layers: int) -> None:
    """4-bit affine quantization of every linear and embedding layer (the
    head too, as mlx-lm quantizes it), then LoRA adapters on the
    transformer layers; only the adapters train."""
    nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    linear_to_lora_layers(model, layers, dict(rank=8, scale=20.0, dropout=0.0))
    mx.eval(model.parameters())


def train(model: nn.Module, loss_fn, data, learning_rate: float):
    """mlx-lm's compiled training step with `loss_fn`; returns the loss per
    step, seconds per step and the peak memory of the run."""
    optimizer = optim.Adam(learning_rate=learning_rate)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, ntoks

    model.train()
    mx.clear_cache()
    mx.reset_peak_memory()
    losses, times = [], []
    for batch, lengths in data:
        tic = time.perf_counter()
        loss, _ = step(batch, lengths)
        mx.eval(state, loss)
        times.append(time.perf_counter() - tic)
        losses.append(loss.item())
    return losses, times, mx.get_peak_memory()


def run_model(title, make_model, tokens, opts, failures):
    data = list(batches(tokens, opts.batch, opts.seq, opts.steps))
    first = make_model()
    initial = list(tree_flatten(first.parameters()))
    trainable = sum(p.size for _, p in tree_flatten(first.trainable_parameters()))
    del first
    shown = sorted(set(range(0, opts.steps, max(1, opts.steps // 6))) | {opts.steps - 1})
    print(f"\n== {title}: {opts.steps} steps of {opts.batch} x {opts.seq} tokens, "
          f"{trainable / 1e6:.2f} M trainable parameters")
    print(f"   {'loss':<10} {'s/step':>8} {'peak MB':>9} {'vs mlx-lm':>9}"
          f"   loss at steps {', '.join(str(i + 1) for i in shown)}", flush=True)
    reference = None
    for name, loss_fn in LOSSES.items():  # mlx-lm's first: the reference curve
        model = make_model()
        model.load_weights(initial)
        losses, times, peak = train(model, loss_fn, data, opts.lr)
        del model
        reference = reference or losses
        # the first step compiles: leave it out of the time per step
        per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
        curve = " ".join(f"{losses[i]:.3f}" for i in shown)
        diff = max(abs(a - b) for a, b in zip(losses, reference))
        print(f"   {name:<10} {per_step:8.3f} {peak / 1e6:9.1f} {diff:9.1e}   {curve}", flush=True)
        first = abs(losses[0] - reference[0]) / abs(reference[0])
        if not all(np.isfinite(losses)) or first > FIRST_STEP_RTOL or diff > CURVE_ATOL:
            failures.append(f"{title}, {name}: first-step relative difference {first:.3g}, "
                            f"max |loss - mlx-lm loss| = {diff:.3g}")
    if not losses[-1] < losses[0]:
        failures.append(f"{title}: the loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")


# Defaults of the size options, without and with --quick.
SIZES = {"full": dict(hidden=128, steps=20, batch=4, seq=64), "quick": dict(hidden=64, steps=5, batch=2, seq=16)}
VOCAB_SIZES = (32000, 151936)  # Llama 2's and Qwen's vocabularies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small model and few steps, under 2 minutes on 2 cores (default: off)")
    parser.add_argument("--vocab-sizes", type=int, nargs=2, metavar=("SMALL", "LARGE"), default=list(VOCAB_SIZES),
                        help="vocabulary of the untied and the tied model (default: %s)"
                             % " ".join(map(str, VOCAB_SIZES)))
    for name, what in [("hidden", "hidden size (multiple of 64)"), ("steps", "training steps per run"),
                       ("batch", "sequences per step"), ("seq", "tokens per sequence")]:
        parser.add_argument(f"--{name}", type=int,
                            help=f"{what} (default: {SIZES['full'][name]}, {SIZES['quick'][name]} with --quick)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (default: %(default)s)")
    opts = parser.parse_args(argv)
    for key, value in SIZES["quick" if opts.quick else "full"].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    small, large = opts.vocab_sizes

    print(f"mlx {mx.__version__}, device {mx.default_device()}; text: source of "
          f"{', '.join(TEXT_MODULES)}", flush=True)
    failures = []
    tokens_small, tokens_large = corpus_tokens(small), corpus_tokens(large)
    args = (opts.hidden, opts.layers)
    run_model(f"llama V={small}, H={opts.hidden}, untied head",
              lambda: build_model(small, *args, tied=False), tokens_small, opts, failures)
    run_model(f"llama V={large}, H={opts.hidden}, tied embeddings",
              lambda: build_model(large, *args, tied=True), tokens_large, opts, failures)

    def qlora_model():
        model = build_model(large, *args, tied=True)
        quantize_for_qlora(model, opts.layers)
        return model

    run_model(f"llama V={large} 4-bit (QLoRA, frozen quantized head)",
              qlora_model, tokens_large, opts, failures)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nEvery first-step loss agrees with mlx-lm's to {FIRST_STEP_RTOL} (relative), "
          f"every curve to {CURVE_ATOL}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
