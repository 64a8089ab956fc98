"""fl.linear_distillation_loss (kind "kl") forward and forward+backward times against the
GEMMs an unfused step cannot avoid, in NumPy float32: the student head forward, dH and dW, and
the teacher head forward (the goal: fwd+bwd within 1.25x of them).

    python tools/linear_distill_gemm_ratio.py N HS HT V     # e.g. 1024 512 1024 32000
"""
import sys, time, statistics
import numpy as np, mlx.core as mx
import mlx_fused_losses as fl
N, Hs, Ht, V = (int(a) for a in sys.argv[1:5]) if len(sys.argv) == 5 else (1024, 512, 1024, 32000)
rng = np.random.default_rng(0)
hs = rng.standard_normal((N, Hs), dtype=np.float32); ws = (rng.standard_normal((V, Hs), dtype=np.float32) * 0.05)
ht = rng.standard_normal((N, Ht), dtype=np.float32); wt = (rng.standard_normal((V, Ht), dtype=np.float32) * 0.05)
H_s, W_s, H_t, W_t = map(mx.array, (hs, ws, ht, wt))
step = mx.value_and_grad(lambda a, b: fl.linear_distillation_loss(a, b, H_t, W_t, kind="kl"), (0, 1))
fwd = lambda: mx.eval(fl.linear_distillation_loss(H_s, W_s, H_t, W_t, kind="kl"))
def both():
    l, g = step(H_s, W_s); mx.eval(l, g)
def gemms(backward):
    z = hs @ ws.T; _ = ht @ wt.T
    if backward:
        _ = z @ ws; _ = z.T @ hs
def timeit(f, n=3):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
tf, tb = timeit(fwd), timeit(both)
gf, gb = timeit(lambda: gemms(False)), timeit(lambda: gemms(True))
print(f"N={N} Hs={Hs} Ht={Ht} V={V}: fwd {tf*1e3:.0f} ms vs GEMMs {gf*1e3:.0f} ms ({tf/gf:.2f}x); "
      f"fwd+bwd {tb*1e3:.0f} ms vs GEMMs {gb*1e3:.0f} ms ({tb/gb:.2f}x)")
