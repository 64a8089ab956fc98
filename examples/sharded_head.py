"""Fine-tune a tiny language model whose output head is sharded over the vocabulary.

Every process (rank) holds the whole body of the model and 1/P of the head's rows, the layout
of MLX's own `shard_linear(head, "all-to-sharded")`. The loss of the full head comes from
`mlx_fused_losses.distributed.vocab_parallel_linear_cross_entropy`: no rank ever holds the
N x V logits, nor its own N x V/P part of them, and the head's gradient is 1/P per rank too.
For contrast, each rank also runs the usual way, its shard's logits from the sharded layer into
`vocab_parallel_cross_entropy` (the loss on sharded logits), and prints both peaks.

Two processes on one machine (the ring backend over 127.0.0.1):

    mlx.launch --backend ring -n 2 --python "$(which python)" examples/sharded_head.py

Several Macs: mlx.launch with a host file (MLX's distributed guide). Run alone, it is a group
of one: the unsharded loss.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.layers.distributed import shard_linear

from mlx_fused_losses.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

MIB = 2**20


def parse_args():
    parser = argparse.ArgumentParser(prog="sharded_head.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="fine-tuning steps (default: %(default)s)")
    parser.add_argument("--chunk-mib", type=int, default=8,
                        help="the loss's working memory per chunk of rows, MiB (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data, the same on every rank "
                        "(default: %(default)s)")
    return parser.parse_args()


class TinyLM(nn.Module):
    """A frozen embedding, two trainable residual MLP blocks and a head sharded over the vocabulary."""

    def __init__(self, vocab, hidden, group):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = [nn.Sequential(nn.RMSNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                                     nn.Linear(2 * hidden, hidden)) for _ in range(2)]
        self.norm = nn.RMSNorm(hidden)
        # The full head exists once, while it is built (every rank draws the same weights from the
        # same seed); shard_linear keeps this rank's rows and sums the input's gradient over ranks.
        self.head = shard_linear(nn.Linear(hidden, vocab, bias=False), "all-to-sharded", group=group)
        self.embed.freeze()

    def body(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)


def main():
    args = parse_args()
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    if args.vocab % size:
        raise SystemExit(f"--vocab {args.vocab} must be a multiple of the {size} ranks (shard_linear's even split)")
    mx.random.seed(args.seed)
    model = TinyLM(args.vocab, args.hidden, group)
    shard = model.head.weight.shape[0]
    vocab_start = rank * shard  # shard_linear gives rank r the r-th of P equal blocks of rows
    tokens = mx.random.randint(0, args.vocab, (args.batch, args.length + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    targets = mx.where(mx.arange(args.length) >= args.length - args.length // 8, -100, targets)  # padding
    optimizer = optim.SGD(learning_rate=0.5)
    chunk_bytes = args.chunk_mib * MIB

    def fused_loss(model, inputs, targets):
        hidden = model.body(inputs)
        return vocab_parallel_linear_cross_entropy(hidden, model.head.weight, targets, vocab_start=vocab_start,
                                                   group=group, ignore_index=-100, chunk_bytes=chunk_bytes)

    def logits_loss(model, inputs, targets):
        logits = model.head(model.body(inputs))  # [B, L, V/P]: this rank's part of the logits
        return vocab_parallel_cross_entropy(logits, targets, vocab_start=vocab_start, group=group,
                                            ignore_index=-100, reduction="mean")

    def step_memory(loss_fn):
        """(loss, seconds, peak bytes above what the step started with) of one step's loss and gradients."""
        mx.eval(model.parameters(), optimizer.state)
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        resident = mx.get_active_memory()
        start = time.perf_counter()
        loss, grads = nn.value_and_grad(model, loss_fn)(model, inputs, targets)
        mx.eval(loss, grads)
        return loss, grads, time.perf_counter() - start, mx.get_peak_memory() - resident

    n = args.batch * args.length
    head_bytes = shard * args.hidden * 4
    logits_shard_bytes = n * shard * 4
    usual_loss, _, _, usual_peak = step_memory(logits_loss)
    losses = []
    for _ in range(args.steps):
        loss, grads, seconds, peak = step_memory(fused_loss)
        optimizer.update(model, grads)
        losses.append(loss.item())
        if len(losses) == 1:
            first_peak, first_seconds = peak, seconds
            head_grad_bytes = grads["head"]["weight"].nbytes
    agree = abs(losses[0] - usual_loss.item()) <= 1e-5 * abs(usual_loss.item())
    print(f"rank {rank}/{size}: head rows [{vocab_start}, {vocab_start + shard}) of {args.vocab}: "
          f"{head_bytes / MIB:.1f} MiB, its gradient {head_grad_bytes / MIB:.1f} MiB "
          f"(the whole head: {args.vocab * args.hidden * 4 / MIB:.1f} MiB)\n"
          f"rank {rank}/{size}: step peak above the model and batch: {first_peak / MIB:.1f} MiB "
          f"({first_seconds:.2f} s); the usual way (this rank's logits): {usual_peak / MIB:.1f} MiB; "
          f"N x V/P logits = {logits_shard_bytes / MIB:.1f} MiB, N x V = {n * args.vocab * 4 / MIB:.1f} MiB\n"
          f"rank {rank}/{size}: loss {' -> '.join(f'{v:.4f}' for v in losses)} "
          f"(the usual way: {usual_loss.item():.4f}, {'agrees' if agree else 'DISAGREES'})", flush=True)
    # What the example shows, checked: the same loss as the usual way, the head's gradient at
    # 1/P, and a step that never held this rank's N x V/P logits.
    ok = agree and head_grad_bytes == head_bytes and first_peak < logits_shard_bytes
    print(f"rank {rank}/{size}: {'OK' if ok else 'FAILED'}", flush=True)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
