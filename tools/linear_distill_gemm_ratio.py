"""fl.linear_distillation_loss (kind "kl", reduction "mean") forward and forward+backward times
against the GEMMs an unfused step cannot avoid, in NumPy float32: the student head forward, dH and
dW, and the teacher head forward (the goal: fwd+bwd within 1.25x of them).

    python tools/linear_distill_gemm_ratio.py N HS HT V [ROUNDS]   # e.g. 1024 512 1024 32000

Both sides run in one process, interleaved round by round (ours fwd, ours fwd+bwd, the GEMMs of
each), and each figure is the best of ROUNDS (default 5): on a shared machine the best round is
the one least disturbed by other processes. The load average is printed beside the figures.
"""
import os
import sys
import time

import mlx.core as mx
import numpy as np

import mlx_fused_losses as fl

args = [int(a) for a in sys.argv[1:]]
N, Hs, Ht, V = args[:4] if len(args) >= 4 else (1024, 512, 1024, 32000)
rounds = args[4] if len(args) >= 5 else 5
rng = np.random.default_rng(0)
hs = rng.standard_normal((N, Hs), dtype=np.float32)
ws = rng.standard_normal((V, Hs), dtype=np.float32) * 0.05
ht = rng.standard_normal((N, Ht), dtype=np.float32)
wt = rng.standard_normal((V, Ht), dtype=np.float32) * 0.05
H_s, W_s, H_t, W_t = map(mx.array, (hs, ws, ht, wt))
step = mx.value_and_grad(lambda a, b: fl.linear_distillation_loss(a, b, H_t, W_t, kind="kl"), (0, 1))


def fwd():
    mx.eval(fl.linear_distillation_loss(H_s, W_s, H_t, W_t, kind="kl"))


def both():
    loss, grads = step(H_s, W_s)
    mx.eval(loss, grads)


def gemms(backward):
    z = hs @ ws.T
    _ = ht @ wt.T
    if backward:
        _ = z @ ws
        _ = z.T @ hs


work = {"fwd": fwd, "fwd+bwd": both, "gemms fwd": lambda: gemms(False), "gemms fwd+bwd": lambda: gemms(True)}
best = dict.fromkeys(work, float("inf"))
for f in work.values():
    f()  # warm-up
for _ in range(rounds):
    for name, f in work.items():
        t0 = time.perf_counter()
        f()
        best[name] = min(best[name], time.perf_counter() - t0)
ms = {k: v * 1e3 for k, v in best.items()}
print(f"N={N} Hs={Hs} Ht={Ht} V={V}, best of {rounds} interleaved rounds, load {os.getloadavg()[0]:.1f}: "
      f"fwd {ms['fwd']:.0f} ms vs GEMMs {ms['gemms fwd']:.0f} ms ({ms['fwd'] / ms['gemms fwd']:.2f}x); "
      f"fwd+bwd {ms['fwd+bwd']:.0f} ms vs GEMMs {ms['gemms fwd+bwd']:.0f} ms "
      f"({ms['fwd+bwd'] / ms['gemms fwd+bwd']:.2f}x)")
