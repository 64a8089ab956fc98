#!/bin/sh
# The whole CPU bench record and every table rendered from it, in one command:
#
#     sh tools/bench_cpu.sh [PYTHON]        (from the repository root; PYTHON defaults to python)
#
# 1. the loss sweep at the goals' sizes (row losses 4096x32768, kl_div/jsd 1024x32768,
#    element-wise 64M; float32, and cross-entropy in bfloat16/float16): docs/bench_cpu.json,
#    docs/bench_cpu.png; each missed roofline goal gets its measured compute bound;
# 2. the linear heads (fp32/bf16/fp16/4-bit and torch, 2048x1024x32000): docs/linear_heads_cpu.json;
# 3. the tables of docs/performance.md and the README's summary, rendered from both JSONs.
# Both records name the CPU (model, ISA flags) and the load average of the run.
set -eu
PY=${1:-python}
uptime
$PY -m mlx_fused_losses.bench --sizes 4096x32768,1024x32768,64M --memory-budget 8 \
    --cases '*:float32:*,cross_entropy:*16:*' --repeats 5 --json docs/bench_cpu.json --plot docs/bench_cpu.png
$PY -m mlx_fused_losses.bench.linear_heads --shape 2048x1024x32000 --repeats 3 --json docs/linear_heads_cpu.json
$PY -m mlx_fused_losses.bench.readme docs/bench_cpu.json --update README.md docs/performance.md
$PY -m mlx_fused_losses.bench.linear_heads --render docs/linear_heads_cpu.json --update docs/performance.md
uptime
