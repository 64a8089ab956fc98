"""The linear cross-entropy's step by head type, against the dense float32 step
and PyTorch, in one run with interleaved repeats:

    python -m mlx_fused_losses.bench.linear_heads [--shape 2048x1024x32000] [--repeats 3] [--json out.json]

Rows (forward + backward w.r.t. hidden and weight, or hidden only for the
quantized head, whose weight gets no gradient; reduction="mean"):

  fp32                     dense float32 head (three OpenBLAS sgemm GEMMs per step)
  bf16                     bfloat16 hidden and head: oneDNN's bf16 GEMM where the CPU has
                           bf16 units and the library is installed (csrc/cpu/bf16_gemm.cpp)
  bf16, sgemm path         the same, with the bf16 GEMM switched off (widened to float32)
  fp16                     float16 hidden and head (widened to float32 for sgemm)
  q4 g64 (dH only)         4-bit affine head, group 64, float32 hidden: forward + dH
  fp32 (dH only)           the dense float32 step with the same gradient (the q4 yardstick)
  torch fp32 / bf16        F.linear_cross_entropy (or F.cross_entropy(h @ W.T)) when torch
                           is importable, same arrays

Goals: bf16 never slower than fp32, and where the CPU has bf16
units at least as fast as torch's bf16 step; q4 (dH only) within 1.3x of the
dense fp32 step with the same gradient. The record names the CPU, its ISA
extensions and what the bf16 GEMM found (_ext.bf16_gemm_status()).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

import mlx_fused_losses as fl
from mlx_fused_losses import _ext

from .report import environment

QUANT_BITS, QUANT_GROUP = 4, 64


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _mlx_step(h, w, t, argnums, bf16_gemm=True, **kwargs):
    grad = mx.value_and_grad(lambda a, b: fl.linear_cross_entropy(a, b, t, **kwargs), argnums=argnums)

    def run():
        _ext._set_bf16_gemm_enabled(bf16_gemm)
        try:
            mx.eval(grad(h, w))
        finally:
            _ext._set_bf16_gemm_enabled(True)

    return run


def _quantized_step(h, w, t):
    wq, scales, biases = mx.quantize(w, group_size=QUANT_GROUP, bits=QUANT_BITS)
    mx.eval(wq, scales, biases)
    grad = mx.value_and_grad(lambda a: fl.linear_cross_entropy(
        a, wq, t, scales=scales, biases=biases, group_size=QUANT_GROUP, bits=QUANT_BITS))
    return lambda: mx.eval(grad(h))


def _torch_step(h, w, t, dtype_name):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    hh, ww = (torch.from_numpy(a).to(dtype) for a in (h, w))
    tt = torch.from_numpy(t.astype(np.int64))
    fused = getattr(F, "linear_cross_entropy", None)
    name = "F.linear_cross_entropy" if fused is not None else "F.cross_entropy(h @ W.T)"

    def run():
        a, b = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        loss = fused(a, b, tt) if fused is not None else F.cross_entropy(a @ b.T, tt)
        loss.backward()

    return run, f"torch {torch.__version__} {name}"


def run(shape, repeats: int) -> dict:
    n, hsize, v = shape
    rng = np.random.default_rng(0)
    # Unit-variance logits, like a trained head's.
    h = (rng.standard_normal((n, hsize), dtype=np.float32) / np.float32(hsize**0.25))
    w = (rng.standard_normal((v, hsize), dtype=np.float32) / np.float32(hsize**0.25))
    t = rng.integers(0, v, n).astype(np.int32)
    h32, w32, tm = mx.array(h), mx.array(w), mx.array(t)
    hb, wb = h32.astype(mx.bfloat16), w32.astype(mx.bfloat16)
    hf, wf = h32.astype(mx.float16), w32.astype(mx.float16)
    mx.eval(h32, w32, tm, hb, wb, hf, wf)
    rows = {
        "fp32": _mlx_step(h32, w32, tm, (0, 1)),
        "bf16": _mlx_step(hb, wb, tm, (0, 1)),
        "bf16, sgemm path": _mlx_step(hb, wb, tm, (0, 1), bf16_gemm=False),
        "fp16": _mlx_step(hf, wf, tm, (0, 1)),
        "fp32 (dH only)": _mlx_step(h32, w32, tm, 0),
        f"q{QUANT_BITS} g{QUANT_GROUP} (dH only)": _quantized_step(h32, w32, tm),
    }
    torch_names = {}
    for dt in ("float32", "bfloat16"):
        fn, name = _torch_step(h, w, t, dt)
        if fn is not None:
            key = "torch " + ("fp32" if dt == "float32" else "bf16")
            rows[key] = fn
            torch_names[key] = name
    for fn in rows.values():  # warm-up: pools, allocator, oneDNN's kernels
        fn()
    times = {k: [] for k in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            times[name].append(_timed(fn))
    best = {k: min(v) for k, v in times.items()}
    ratios = {
        "bf16 / fp32": best["bf16"] / best["fp32"],
        "fp16 / fp32": best["fp16"] / best["fp32"],
        f"q{QUANT_BITS} / fp32 (dH only)": best[f"q{QUANT_BITS} g{QUANT_GROUP} (dH only)"] / best["fp32 (dH only)"],
    }
    if "torch bf16" in best:
        ratios["bf16 / torch bf16"] = best["bf16"] / best["torch bf16"]
    if "torch fp32" in best:
        ratios["fp32 / torch fp32"] = best["fp32"] / best["torch fp32"]
    return dict(shape=list(shape), repeats=repeats, times_s=times, best_s=best, ratios=ratios,
                torch=torch_names, bf16_gemm=_ext.bf16_gemm_status(), threads=_ext.num_threads(),
                environment=environment())


# Goals on the ratios (measured <= limit); the torch one only where the CPU
# has bf16 units and oneDNN's bf16 GEMM ran.
GOALS = (
    ("bf16 / fp32", 1.0, "bf16 never slower than fp32"),
    ("fp16 / fp32", 1.0, "fp16 never slower than fp32"),
    (f"q{QUANT_BITS} / fp32 (dH only)", 1.3, f"{QUANT_BITS}-bit g{QUANT_GROUP} head (hidden gradient) within 1.3x "
     "of the dense fp32 step with the same gradient"),
    ("bf16 / torch bf16", 1.0, "bf16 at least as fast as torch's bf16 step (CPUs with bf16 units)"),
)
BEGIN = "<!-- bench:linear-heads: generated by `python -m mlx_fused_losses.bench.linear_heads --render " \
        "docs/linear_heads_cpu.json --update docs/performance.md` -->"
END = "<!-- bench:linear-heads:end -->"


def verdicts(r) -> list:
    out = []
    for key, limit, what in GOALS:
        value = r["ratios"].get(key)
        if key == "bf16 / torch bf16" and not r["bf16_gemm"]["active"]:
            value = None
        out.append({"ratio": key, "what": what, "limit": limit, "measured": value,
                    "met": None if value is None else value <= limit})
    return out


def render(r) -> str:
    """The markdown block of docs/performance.md, from a record of this module."""
    from .readme import machine

    env, g = r["environment"], r["bf16_gemm"]
    n, h, v = r["shape"]
    load = r.get("load_average_1min")
    lines = [BEGIN, f"One run of `{r.get('command', 'python -m ' + __spec__.name)}`"
             + (f", started {r['started_utc']} UTC" if r.get("started_utc") else "")
             + f"; {machine(env, r['threads'])}; oneDNN "
             + (f"{g.get('version', '')} ({os.path.basename(g['library'])})" if g["active"]
                else f"not used ({g['reason']})")
             + f"; {r['threads']} threads"
             + (f"; load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the end"
                if load else "")
             + f". (N, H, V) = ({n}, {h}, {v}), fwd+bwd, reduction mean; minimum and median of "
             f"{r['repeats']} interleaved repeats; ratios of the minima.", "",
             "| step | min ms | median ms | reference |", "| --- | ---: | ---: | --- |"]
    for name, times in r["times_s"].items():
        ordered = sorted(times)
        lines.append(f"| {name} | {ordered[0] * 1e3:.0f} | {ordered[len(ordered) // 2] * 1e3:.0f} | "
                     f"{r['torch'].get(name, '') or '-'} |")
    lines += ["", "| goal | limit | measured | verdict |", "| --- | ---: | ---: | --- |"]
    for x in verdicts(r):
        word = {True: "met", False: "missed", None: "not measured"}[x["met"]]
        value = "-" if x["measured"] is None else f"{x['measured']:.2f}"
        lines.append(f"| {x['what']} ({x['ratio']}) | <= {x['limit']:g} | {value} | **{word}** |")
    return "\n".join(lines + [END]) + "\n"


def update(text: str, r) -> str:
    start = text.find(BEGIN.split(":")[0] + ":linear-heads")
    stop = text.find(END)
    if start < 0 or stop < 0:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[:start] + render(r).rstrip("\n") + text[stop + len(END):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048x1024x32000", metavar="NxHxV")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; ratios of the minima")
    parser.add_argument("--json", help="write the record here")
    parser.add_argument("--render", metavar="JSON", help="no run: render this record instead")
    parser.add_argument("--update", metavar="FILE", nargs="+", help="replace the generated block in these files")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            r = json.load(f)
        if not args.update:
            print(render(r), end="")
        for path in args.update or []:
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(update(text, r))
        return 0
    mx.set_default_device(mx.cpu)
    shape = tuple(int(x) for x in args.shape.split("x"))
    load_start, started = os.getloadavg()[0], time.time()
    r = run(shape, args.repeats)
    r["command"] = f"python -m {__spec__.name} " + shlex.join(argv if argv is not None else sys.argv[1:])
    r["started_utc"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started))
    r["wall_s"] = time.time() - started
    r["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()}
    r["goals"] = verdicts(r)
    env = r["environment"]
    print(f"{env['cpu_model']}; bf16 units: {r['bf16_gemm']['cpu_units'] or 'none'}; bf16 GEMM: "
          f"{r['bf16_gemm']['library'] if r['bf16_gemm']['active'] else 'not used (' + r['bf16_gemm']['reason'] + ')'}; "
          f"{r['threads']} threads")
    print(f"(N, H, V) = {tuple(shape)}, fwd+bwd, min / median of {args.repeats} interleaved repeats")
    for name, ts in r["times_s"].items():
        print(f"  {name:22s} {min(ts) * 1e3:9.1f} ms  {statistics.median(ts) * 1e3:9.1f} ms  "
              f"{r['torch'].get(name, '')}")
    for name, value in r["ratios"].items():
        print(f"  {name:28s} {value:.2f}")
    for x in r["goals"]:
        word = {True: "met", False: "MISSED", None: "not measured"}[x["met"]]
        print(f"  [{word}] {x['what']}: {'-' if x['measured'] is None else format(x['measured'], '.2f')} "
              f"(<= {x['limit']:g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    for path in args.update or []:
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(update(text, r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
