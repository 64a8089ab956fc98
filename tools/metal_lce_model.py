"""Performance model of the Metal linear cross-entropy (docs/metal_linear_cross_entropy.md).

Every number of the doc's tables is computed here from the kernels' tile
constants (parsed from csrc/metal/kernel_args.h, csrc/metal/launch_plan.h and
metal/linear_cross_entropy.metal, so a change of tiles changes the tables) and
from sourced hardware numbers (HARDWARE, SOURCES below).

    python -m tools.metal_lce_model           # print the tables
    python -m tools.metal_lce_model --write   # rewrite them in the doc
    python -m tools.metal_lce_model --check   # exit 1 if the doc's tables are stale

Pure Python, no MLX, no GPU: a model, not a measurement (the doc says what a Mac
must measure).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "metal_linear_cross_entropy.md"
KIB = 1024

# ---- sources ---------------------------------------------------------------------------

SOURCES = {
    "mb": "philipturner/metal-benchmarks README (commit dc2adc6, 2024): per-core register file "
          "~208 KB, threadgroup memory ~60 KB, 384-3072 threads; clocks, cores and FP32 GFLOPS of "
          "M1/M1 Max/M2/M2 Max; SLC (L3) sizes; matrix FFMA32 101.7 per core-cycle of 128 on "
          "M1 and later; I32 bit shifts 32 per core-cycle (a quarter of the 128 FMA lanes)",
    "apple": "Apple Newsroom: M1 Pro/M1 Max (2021-10-18: 200 / 400 GB/s), M2 (2022-06-06: "
             "100 GB/s), M2 Pro/M2 Max (2023-01-17: 200 / 400 GB/s), M3 family (2023-10-30: "
             "M3 100 GB/s, M3 Max up to 400 GB/s), M4 (2024-05-07: 120 GB/s), M4 Pro/M4 Max "
             "(2024-10-30: 273 / 546 GB/s). M1: LPDDR4X-4266 on a 128-bit bus, "
             "4266e6 x 16 B = 68.3 GB/s",
    "tables": "Apple, Metal Feature Set Tables: 32 KiB threadgroup memory and 1024 threads per "
              "threadgroup at most",
    "mlx": "ml-explore/mlx mlx/backend/metal/matmul.cpp (commit 846d176): steel GEMM tiles "
           "bm x bn x bk, wm x wn SIMD-groups (GEMM_TPARAM_MACRO); quantized.cpp qmm: 32 x 32 x 32",
    "mfa": "philipturner/metal-flash-attention README: a tuned simdgroup_matrix GEMM reaches "
           "87.2 % (FP32) / 93.3 % (FP16) of the ALU peak (M1 Max)",
    "mlxdev": "ml-explore/mlx mlx/backend/metal/device.cpp (commit 846d176): the device class is "
              "the architecture name's last letter, 'p' phone, 'g' base and Pro, 's' Max, "
              "'d' Ultra",
}

# Per-core limits (source "mb"; threads per group: "tables").
TG_MEMORY_PER_CORE = 60 * KIB  # "~60 KB"
REGISTERS_PER_CORE = 208 * KIB  # "~208 KB"
MAX_THREADS_PER_CORE = 3072
MATRIX_FFMA_EFFICIENCY = 101.7 / 128  # measured matmul FFMA32 / peak FFMA per core-cycle


@dataclass(frozen=True)
class Chip:
    name: str
    cores: int
    gflops: float  # FP32 peak
    gbps: float  # DRAM bandwidth
    slc_mb: float | None  # system level cache (None: not published)
    flops_source: str  # "mb", or "assumed" (Apple publishes no GPU clock)
    device_class: str = "g"  # MLX's device class (source "mlxdev")


# M3/M4: Apple publishes neither GPU clock nor FLOPS; assumed at M2's 1.398 GHz x
# 256 FP32 FLOP per core-cycle (the per-core rate of Apple 7/8, source "mb").
def _assumed(cores: int) -> float:
    return cores * 256 * 1.398


HARDWARE = [
    Chip("M1 (8-core GPU)", 8, 2617, 68.25, 8, "mb", "g"),
    Chip("M1 Max (32)", 32, 10617, 400, 48, "mb", "s"),
    Chip("M2 (10)", 10, 3579, 100, 8, "mb", "g"),
    Chip("M2 Max (38)", 38, 13600, 400, 48, "mb", "s"),
    # Two M2 Max dies (Apple Newsroom 2023-06-05: 800 GB/s).
    Chip("M2 Ultra (76)", 76, 2 * 13600, 800, 96, "2 x M2 Max", "d"),
    Chip("M3 (10)", 10, _assumed(10), 100, None, "assumed", "g"),
    Chip("M4 (10)", 10, _assumed(10), 120, None, "assumed", "g"),
    Chip("M4 Max (40)", 40, _assumed(40), 546, None, "assumed", "s"),
]

# ---- the kernels' tiles, read from the sources --------------------------------------------


@dataclass(frozen=True)
class Tiles:
    bm: int
    bn: int
    bk: int
    threads: int
    pad_a: int  # threadgroup leading-dimension padding (elements)
    pad_b: int
    pad_c: int  # 0: no Cs tile
    stage_bytes: int  # bytes of a staged element (float staging: 4)
    target_groups: int = 512
    max_splits: int = 64
    max_buffer_flops: int = 1 << 40  # launch_plan.h kLceMaxBufferFlops

    @property
    def simd_groups(self) -> int:
        return self.threads // 32

    def frags_per_simd(self) -> tuple[int, int]:
        """8x8 fragments of a SIMD-group's block: (rows, cols), 2 x 2 SIMD-groups."""
        return self.bm // 2 // 8, self.bn // 2 // 8


def _define(text: str, name: str) -> int:
    m = re.search(rf"#define {name} (\d+)", text)
    if not m:
        raise ValueError(f"{name} not found")
    return int(m.group(1))


def our_tiles(repo: Path = REPO, stage_bytes: int = 2) -> Tiles:
    """The linear CE's GEMM tile (kernel_args.h) as metal/lce_gemm.h stages it: MLX's steel
    loader and fragment multiply, rows padded by 16 bytes, operands staged in their own
    dtype (stage_bytes 2 for 16-bit operands, 4 for float32), no threadgroup copy of the
    output tile (the epilogues read the accumulators in registers)."""
    args = (repo / "csrc/metal/kernel_args.h").read_text()
    plan = (repo / "csrc/metal/launch_plan.h").read_text()
    gemm = (repo / "metal/lce_gemm.h").read_text()
    m = re.search(r"kPad = (\d+) / int\(sizeof\(S\)\)", gemm)
    if not m:
        raise ValueError("the threadgroup padding (kPad) not found in metal/lce_gemm.h")
    if re.search(r"threadgroup float Cs\[", (repo / "metal/linear_cross_entropy.metal").read_text()):
        raise ValueError("the model assumes no threadgroup copy of the output tile (Cs)")
    pad = int(m.group(1)) // stage_bytes
    return Tiles(
        bm=_define(args, "FL_LCE_BM"), bn=_define(args, "FL_LCE_BN"), bk=_define(args, "FL_LCE_BK"),
        threads=_define(args, "FL_LCE_THREADS"), pad_a=pad, pad_b=pad, pad_c=0,
        stage_bytes=stage_bytes,
        target_groups=int(re.search(r"kLceTargetGroups = (\d+)", plan).group(1)),
        max_splits=int(re.search(r"kLceMaxSplits = (\d+)", plan).group(1)),
        max_buffer_flops=1 << int(re.search(r"kLceMaxBufferFlops = int64_t\(1\) << (\d+)",
                                            plan).group(1)))


# MLX's steel GEMM (source "mlx"): 2 x 2 SIMD-groups, padding 16 bytes / sizeof(T), no Cs.
MLX_F32 = Tiles(64, 64, 16, 128, 4, 4, 0, 4)
MLX_F16 = Tiles(64, 64, 16, 128, 8, 8, 0, 2)
MLX_QMM = Tiles(32, 32, 32, 128, 8, 8, 0, 2)  # qmm_t: half tiles, 2 x 2 SIMD-groups

# ---- per-tile quantities ---------------------------------------------------------------------


def tg_bytes(t: Tiles) -> int:
    """As [BM][BK+pa], Bs [BK][BN+pb], Cs [BM][BN+pc] (ours). MLX's rows: the nn layout
    (an nt GEMM stores B as [BN][BK+pb]: 10240 instead of 9472 bytes at 64 x 64 x 16 fp32,
    the same 6 groups per core)."""
    a = t.bm * (t.bk + t.pad_a)
    b = t.bk * (t.bn + t.pad_b)
    c = t.bm * (t.bn + t.pad_c) if t.pad_c else 0
    return (a + b + c) * t.stage_bytes


def groups_per_core_tg(t: Tiles) -> int:
    return min(TG_MEMORY_PER_CORE // tg_bytes(t), MAX_THREADS_PER_CORE // t.threads)


def max_registers_for(t: Tiles, groups: int) -> int:
    """32-bit registers per thread below which `groups` groups fit the register file."""
    return REGISTERS_PER_CORE // (groups * t.threads * 4)


def loads_per_mma(t: Tiles) -> float:
    fm, fn = t.frags_per_simd()
    return (fm + fn) / (fm * fn)


def flops_per_step(t: Tiles) -> int:
    return 2 * t.bm * t.bn * t.bk


def tile_intensity(t: Tiles, bytes_a: float, bytes_b: float) -> float:
    """FLOP per byte read from device memory by one output tile: 2 BM BN / (BM s_a + BN s_b)."""
    return 2 * t.bm * t.bn / (t.bm * bytes_a + t.bn * bytes_b)


def quantized_bytes(bits: int, group: int, scale_bytes: int = 2) -> float:
    """Bytes per weight element: bits / 8 + (scale + bias) / group_size."""
    return bits / 8 + 2 * scale_bytes / group


# Instruction-slot estimate of one BK step of a group (32-wide SIMD instructions).
# Assumptions, stated in the doc: an 8x8x8 MMA issues 512 FMA = 16 slots; a float
# 8x8 fragment load 2 slots; staging an element C_STAGE slots per 32 elements
# (address, load, convert, store), MLX's vector loads C_STAGE_VEC; a quantized
# element C_QUANT (quarter-rate shift = 4, and, convert, fma, store) plus its
# word's loads and scale conversions (C_QWORD per word).
C_STAGE, C_STAGE_VEC, C_QUANT, C_QWORD = 5, 2, 8, 8


def slot_shares(t: Tiles, stage_cost: float, quant_bits: int | None = None) -> float:
    """Fraction of a group's issue slots that are MMAs, per BK step."""
    mmas = (t.bm // 8) * (t.bn // 8) * (t.bk // 8)
    fm, fn = t.frags_per_simd()
    loads = t.simd_groups * (t.bk // 8) * (fm + fn) * 2
    a_elems, b_elems = t.bm * t.bk, t.bn * t.bk
    if quant_bits is None:
        stage = (a_elems + b_elems) * stage_cost / 32
    else:
        per_word = 32 // quant_bits
        stage = (a_elems * stage_cost + b_elems * (C_QUANT + C_QWORD / per_word)) / 32
    return mmas * 16 / (mmas * 16 + loads + stage)


# ---- the launch plan's rules (launch_plan.cpp lce_plan), for the shapes ---------------------


def plan(t: Tiles, n: int, v: int, chunk_bytes: int = 64 << 20, h: int = 64) -> dict:
    blocks = -(-n // t.bm)
    tiles = max(-(-v // t.bn), 1)
    # work per launch (command buffers): F rows of 2 V H + V FLOPs
    row_flops = v * (2 * h + 1)
    fit = t.max_buffer_flops // row_flops if row_flops else n
    forward_rows = min(max(t.bm, fit // t.bm * t.bm), n) if n else 1
    launch_blocks = -(-forward_rows // t.bm)
    want = -(-(t.target_groups * 128 // t.threads) // launch_blocks) if blocks else 1
    splits = min(max(want, 1), min(tiles, t.max_splits))
    per = -(-tiles // splits) * t.bn
    splits = -(-v // per)
    r = min(max(min(chunk_bytes // (4 * v), fit), 1), n)
    chunk_rows = r // t.bm * t.bm if r > t.bm else r
    return dict(row_blocks=blocks, vocab_tiles=tiles, splits=splits, vocab_per_split=per,
                chunk_rows=chunk_rows, chunks=-(-n // chunk_rows), forward_rows=forward_rows,
                forward_launches=-(-n // forward_rows))


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    h: int
    v: int
    s_h: float  # bytes per hidden element
    s_w: float  # bytes per weight element (quantized: with scales and biases)
    quantized: bool


SHAPES = [
    Shape("7B head, bf16: N 8192, H 4096, V 151936", 8192, 4096, 151936, 2, 2, False),
    Shape("same, 4-bit head (g64, bf16 scales)", 8192, 4096, 151936, 2, quantized_bytes(4, 64), True),
    Shape("small: N 2048, H 2048, V 32000, fp32", 2048, 2048, 32000, 4, 4, False),
]


def traffic(t: Tiles, s: Shape, chip: Chip, chunk_bytes: int | None = None) -> dict:
    """FLOPs and DRAM bytes of one training step as it ships (the stored-Z path:
    launch_plan.h lce_schedule, a forward with gradients for hidden and, dense heads
    only, the weight), at the GPU's default chunk_bytes unless given."""
    chunk_bytes = gpu_default_chunk_bytes() if chunk_bytes is None else chunk_bytes
    p = plan(t, s.n, s.v, chunk_bytes, s.h)
    g = groups_per_core_tg(t) * chip.cores  # groups in flight
    nvh = s.n * s.v * s.h
    # per chunk: the logits GEMM, dH, and dW for a dense weight (no Z recomputed)
    flops = 2 * nvh * (2 + (0 if s.quantized else 1))
    w_bytes = s.v * s.h * s.s_w
    # per chunk: W read by the logits GEMM and by dH (the logits GEMM's groups in flight
    # are the chunk's row blocks against a few vocabulary tiles: each weight tile read
    # once); Z written (float32), read twice by the row kernel that writes dZ in place,
    # dZ read by dH and (dense) dW: 24 N V bytes (quantized: 20); hidden read by the
    # logits GEMM and dW; dW (float32) read and written by every chunk after the first
    z_bytes = 4 * s.n * s.v * (5 if s.quantized else 6)
    dram = 2 * w_bytes * p["chunks"] + z_bytes + s.n * s.h * s.s_h * (1 if s.quantized else 2)
    if not s.quantized:
        dram += 4 * s.v * s.h * (2 * p["chunks"] - 1)
    # The chunk's hidden rows, re-read for every vocabulary tile by the logits GEMM:
    # served by the SLC while they fit it, else DRAM.
    rereads = s.n * s.h * s.s_h * p["vocab_tiles"]
    working_set = p["chunk_rows"] * s.h * s.s_h
    # (an unpublished SLC size counts as fitting: flagged "?" in the table)
    fits = chip.slc_mb is None or working_set <= chip.slc_mb * 1e6
    dram += 0 if fits else rereads
    return dict(flops=flops, dram=dram, rereads=rereads, working_set=working_set, fits=fits,
                plan=p, in_flight=g)


# ---- tables -----------------------------------------------------------------------------------


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}"


def table_tiles(t: Tiles) -> str:
    t32 = our_tiles(stage_bytes=4)
    rows = [("ours, 16-bit operands (fwd, dZ)", t, C_STAGE_VEC),
            ("ours, float32 operands (dH, dW: float32 dZ)", t32, C_STAGE_VEC),
            ("MLX steel GEMM fp32", MLX_F32, C_STAGE_VEC),
            ("MLX steel GEMM fp16/bf16", MLX_F16, C_STAGE_VEC), ("MLX qmm (quantized)", MLX_QMM, C_STAGE_VEC)]
    out = ["| tiles | BM x BN x BK, threads | FLOP per BK step | threadgroup bytes | groups / core "
           "(threadgroup memory) | registers / thread at that occupancy | fragment loads per MMA | "
           "FLOP / device byte fp32, bf16, 4-bit W | MMA share of issue slots |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, x, c in rows:
        gpc = groups_per_core_tg(x)
        inten = [tile_intensity(x, 4, 4), tile_intensity(x, 2, 2),
                 tile_intensity(x, 2, quantized_bytes(4, 64))]
        out.append(f"| {name} | {x.bm} x {x.bn} x {x.bk}, {x.threads} | {flops_per_step(x)} | "
                   f"{tg_bytes(x)} | {gpc} | {max_registers_for(x, gpc)} | {_fmt(loads_per_mma(x))} | "
                   f"{' / '.join(_fmt(i) for i in inten)} | {slot_shares(x, c):.0%} |")
    q = slot_shares(t32, C_STAGE_VEC, quant_bits=4)
    out.append(f"| ours, 4-bit head (dequantised to float32) | {t32.bm} x {t32.bn} x {t32.bk}, "
               f"{t32.threads} | {flops_per_step(t32)} | {tg_bytes(t32)} | {groups_per_core_tg(t32)} | "
               f"{max_registers_for(t32, groups_per_core_tg(t32))} | {_fmt(loads_per_mma(t32))} | - | "
               f"{q:.0%} |")
    return "\n".join(out)


def table_chips() -> str:
    out = ["| chip | MLX device class | GPU cores | FP32 TFLOP/s | DRAM GB/s | SLC MB | machine balance FLOP/B | FLOPs from |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in HARDWARE:
        slc = "-" if c.slc_mb is None else _fmt(c.slc_mb)
        src = {"mb": "metal-benchmarks", "assumed": "assumed: cores x 256 x 1.398 GHz"}.get(
            c.flops_source, c.flops_source)
        out.append(f"| {c.name} | {c.device_class} | {c.cores} | {c.gflops / 1000:.2f} | "
                   f"{_fmt(c.gbps)} | {slc} | {c.gflops / c.gbps:.0f} | {src} |")
    return "\n".join(out)


def slc_verdict(chip: Chip, fits: bool) -> str:
    if chip.slc_mb is None:
        return "SLC size unpublished: ?"
    return "yes" if fits else "no: DRAM"


def table_shapes(t: Tiles) -> str:
    out = ["| shape | chip | plan: splits, forward launches x rows, chunk rows x chunks | GFLOP / step | DRAM GB / step | "
           "hidden re-reads GB (chunk's hidden rows MB, in SLC?) | compute s (at peak) | DRAM s | bound | "
           "expected fraction of FP32 peak |",
           "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
    share_dense = slot_shares(t, C_STAGE_VEC)
    for s in SHAPES:
        share = slot_shares(t, C_STAGE_VEC, quant_bits=4) if s.quantized else share_dense
        # staged as float32: a quantized head, or float32 operands
        ts = our_tiles(stage_bytes=4) if s.quantized or s.s_h == 4 else t
        for chip in (HARDWARE[0], HARDWARE[3], HARDWARE[6]):
            r = traffic(ts, s, chip)
            p = r["plan"]
            tc = r["flops"] / (chip.gflops * 1e9)
            tm = r["dram"] / (chip.gbps * 1e9)
            bound = "compute" if tc >= tm else "DRAM"
            # on-chip: the matmul FFMA efficiency times our MMA share of issue slots;
            # off-chip: the DRAM time caps it
            frac = min(MATRIX_FFMA_EFFICIENCY * share, tc / tm)
            out.append(f"| {s.name} | {chip.name} | {p['splits']}, {p['forward_launches']} x "
                       f"{p['forward_rows']}, {p['chunk_rows']} x {p['chunks']} | "
                       f"{r['flops'] / 1e9:.0f} | {r['dram'] / 1e9:.0f} | {r['rereads'] / 1e9:.0f} "
                       f"({r['working_set'] / 1e6:.1f}, {slc_verdict(chip, r['fits'])}) | "
                       f"{tc:.2f} | {tm:.2f} | {bound} | "
                       f"{frac:.0%} |")
    return "\n".join(out)


def table_backward(t: Tiles) -> str:
    """One pass with partials vs two recomputing passes vs the chosen dZ chunks."""
    out = ["| backward (dense head), shape | FLOPs (x N V H) | extra bytes, formula | GB |",
           "| --- | --- | --- | ---: |"]
    s = SHAPES[0]
    gpu = gpu_default_chunk_bytes()
    one = 4 * (s.n * s.h * -(-s.v // t.bn) + s.v * s.h * -(-s.n // t.bm)) * 2
    two = 8 * (s.n * s.h * -(-s.v // t.bn) + s.v * s.h * -(-s.n // t.bm))

    def chosen(chunk):
        p = plan(t, s.n, s.v, chunk, s.h)
        return p, 12 * s.n * s.v + 4 * s.v * s.h * (2 * p["chunks"] - 1)

    small, small_b = chosen(64 << 20)
    big, big_b = chosen(gpu)
    out += [
        f"| one pass, per-tile partials of dH and dW, reduced after | 6 | partials written and read: "
        f"8 (N H ceil(V/BN) + V H ceil(N/BM)) | {one / 1e9:.0f} |",
        f"| two passes recomputing Z (row blocks: dH; vocabulary blocks: dW) | 8 | accumulators read "
        f"and written per tile: 8 (N H ceil(V/BN) + V H ceil(N/BM)) | {two / 1e9:.0f} |",
        f"| chosen: dZ per row chunk, 64 MiB (the CPU's default: R = {small['chunk_rows']}, "
        f"{small['chunks']} chunks) | 6 | dZ: 12 N V (16 with a bias); dW read+write per chunk: "
        f"4 V H (2 chunks - 1) | {small_b / 1e9:.0f} |",
        f"| chosen, the GPU's default {_mib(gpu)} (R = {big['chunk_rows']}, {big['chunks']} chunks) "
        f"| 6 | same | {big_b / 1e9:.0f} |",
    ]
    return "\n".join(out)


# ---- against MLX's own GEMMs: the targets -----------------------------------------------
#
# Every GEMM of the linear CE is MLX's steel tile (same loader, same fragment multiply,
# same shape for the device class), so per FLOP it runs at MLX's rate, times:
#   - its staging dtype's GEMM efficiency: E16 for 16-bit operands, E32 for float32 ones
#     (source "mfa": 93.3 % and 87.2 % of the ALU peak); the backward's dH and dW stage
#     float32 (dZ is float32), a quantized head stages float32 (dequantised values);
#   - a quantized head's extra staging work: the MMA share of issue slots of the
#     dequantising tile against the dense one (the tiles table); MLX's qmm likewise;
#   - the epilogue: c instructions per output element beside K / 32 MMA issue slots per
#     element (an 8x8x8 MMA, 16 slots, makes 64 outputs 8 deep): K / (K + c) of the rate,
#     c = EPI_FWD (forward state update) or EPI_DZ (the gradient of a logit);
#   - occupancy: groups / (cores x groups per core), when a launch has fewer groups than
#     the GPU holds (the dH GEMM of a chunk has ceil(H/64) ceil(R/64) groups);
# and a kernel takes max(its FLOPs at that rate, its DRAM bytes at the DRAM bandwidth).
# mlx-lm's unfused step: the logits GEMM, cross-entropy on the bfloat16 logits (written,
# read by the forward, read and the gradient written by the backward: 8 N V bytes), the dH
# GEMM and (dense) the dW GEMM, each at MLX's rate. Assumptions, not measurements: the
# doc's checklist says what a Mac must measure.
E16, E32 = 0.933, 0.872
EPI_FWD, EPI_DZ, EPI_Z = 24, 30, 8

TARGET_SHAPES = [(8192, 4096, 151936), (4096, 2048, 32000)]
TARGET_CHIPS = ("M1 (8-core GPU)", "M2 Max (38)", "M2 Ultra (76)")


def forward_tiles_for(device_class: str, sixteen: bool, rows: int, vocab: int, hidden: int,
                      stage_bytes: int) -> Tiles:
    """launch_plan.cpp lce_forward_tile (MLX's nt choices), as Tiles."""
    base = our_tiles(stage_bytes=stage_bytes)
    if device_class in "gp" or (device_class == "d" and sixteen and 2 * max(rows, vocab) <= hidden):
        bm, bn, bk, threads = 64, 32, 32, 128
    elif device_class == "d" and sixteen:
        bm, bn, bk, threads = 64, 64, 16, 64
    else:
        bm, bn, bk, threads = 64, 64, 16, 128
    return Tiles(bm, bn, bk, threads, base.pad_a, base.pad_b, 0, stage_bytes, base.target_groups,
                 base.max_splits, base.max_buffer_flops)


def _kernel_s(chip: Chip, flops: float, bytes_: float, eff: float, groups: float, t: Tiles) -> float:
    cap = chip.cores * groups_per_core_tg(t)
    u = min(1.0, groups / cap)
    return max(flops / (chip.gflops * 1e9 * eff * u), bytes_ / (chip.gbps * 1e9))


def gpu_default_chunk_bytes(repo: Path = REPO) -> int:
    """The GPU's default chunk_bytes (ops/linear_cross_entropy.h kLceGpuDefaultChunkBytes)."""
    text = (repo / "csrc/ops/linear_cross_entropy.h").read_text()
    m = re.search(r"kLceGpuDefaultChunkBytes = int64_t\((\d+)\) << (\d+)", text)
    if not m:
        raise ValueError("kLceGpuDefaultChunkBytes not found in csrc/ops/linear_cross_entropy.h")
    return int(m.group(1)) << int(m.group(2))


def step_model(chip: Chip, n: int, h: int, v: int, quantized: bool, chunk_bytes: int,
               path: str = "stored_z", dz_bytes: int = 4) -> dict:
    """Seconds of: ours forward (the forward tiles: a loss without gradients), ours
    forward + backward, MLX's logits GEMM, mlx-lm's unfused step (a dense bfloat16 or a
    4-bit head, group 64, bfloat16 scales; hidden bfloat16).
    path "stored_z": the training step as it ships (launch_plan.h lce_schedule, the
    forward that forms its gradients): per chunk, the logits GEMM that writes the
    chunk's Z (float32), the row kernel (Z read twice, dZ written in place: 12 R V
    bytes), dH and dW on dZ (dz_bytes per element: 4 ships; 2 is the bfloat16 dZ that
    was measured and rejected, see the doc). 6 N V H FLOPs.
    path "recompute": the forward tiles, then the backward that recomputes Z from the
    saved lse (reduction "none", or a backward called after the forward was
    evaluated): 8 N V H FLOPs."""
    s_h, s_w = 2, (quantized_bytes(4, 64) if quantized else 2)
    t16 = our_tiles(stage_bytes=2)
    t32 = our_tiles(stage_bytes=4)
    dense_share = slot_shares(t16, C_STAGE_VEC)
    q_ours = slot_shares(t32, C_STAGE_VEC, quant_bits=4) / dense_share if quantized else 1.0
    q_mlx = slot_shares(MLX_QMM, C_STAGE_VEC, quant_bits=4) / dense_share if quantized else 1.0
    tf = forward_tiles_for(chip.device_class, not quantized, n, v, h, 4 if quantized else 2)
    e_fwd = (E32 if quantized else E16) * q_ours
    p = plan(tf, n, v, chunk_bytes, h)
    # forward tiles: hidden once, the weight once per launch (the row blocks of a launch
    # walk the vocabulary together); a launch has S x its row blocks groups
    fwd = 0.0
    for r0 in range(0, n, p["forward_rows"]):
        rows = min(p["forward_rows"], n - r0)
        groups = p["splits"] * -(-rows // tf.bm)
        fwd += _kernel_s(chip, 2 * rows * v * h, rows * h * s_h + v * h * s_w,
                         e_fwd * h / (h + EPI_FWD), groups, tf)
    stored = path == "stored_z"
    step = 0.0 if stored else fwd
    r = p["chunk_rows"]
    e_bwd = (E16 if dz_bytes == 2 else E32) * q_ours
    tb = t16 if dz_bytes == 2 else t32
    for c0 in range(0, n, r):
        rows = min(r, n - c0)
        z_groups = -(-v // tf.bn) * -(-rows // tf.bm)
        # the chunk's hidden rows, re-read for each vocabulary tile: from the SLC while
        # they fit it, else from DRAM (an unpublished SLC size counts as fitting)
        fits = chip.slc_mb is None or rows * h * s_h <= chip.slc_mb * 1e6
        rereads = 0 if fits else rows * h * s_h * -(-v // tf.bn)
        if stored:  # the logits GEMM writes Z (float32); the row kernel reads it twice
            # and writes dZ in place
            step += _kernel_s(chip, 2 * rows * v * h, v * h * s_w + 4 * rows * v + rows * h * s_h
                              + rereads, e_fwd * h / (h + EPI_Z), z_groups, tf)
            step += _kernel_s(chip, 0, 12 * rows * v, 1.0, 1, tb)
        else:  # dZ: Z computed again, dZ written (float32)
            step += _kernel_s(chip, 2 * rows * v * h, v * h * s_w + 4 * rows * v + rows * h * s_h
                              + rereads, e_fwd * h / (h + EPI_DZ), z_groups, tf)
        step += _kernel_s(chip, 2 * rows * v * h, dz_bytes * rows * v + v * h * s_w + 4 * rows * h,
                          e_bwd, -(-h // 64) * -(-rows // 64), tb)  # dH
        if not quantized:  # dW (+)= dZ^T H: float32 read-modify-write after the first chunk
            step += _kernel_s(chip, 2 * rows * v * h, dz_bytes * rows * v + rows * h * s_h
                              + (4 if c0 == 0 else 8) * v * h, e_bwd, -(-h // 64) * -(-v // 64), tb)
    mlx_t = MLX_QMM if quantized else MLX_F16
    e_mlx = E16 * q_mlx
    gemm = _kernel_s(chip, 2 * n * v * h, n * h * s_h + v * h * s_w + 2 * n * v, e_mlx, 1e9, mlx_t)
    unfused = 2 * gemm + _kernel_s(chip, 0, 8 * n * v, 1.0, 1, mlx_t)
    if not quantized:
        unfused += gemm
    return dict(fwd=fwd, step=step, gemm=gemm, unfused=unfused, plan=p, tile=tf)


def _mib(b: int) -> str:
    return f"{b >> 30} GiB" if b >= 1 << 30 else f"{b >> 20} MiB"


def _target_chips() -> list:
    return [c for c in HARDWARE if c.name in TARGET_CHIPS]


def table_targets(t: Tiles) -> str:
    gpu = gpu_default_chunk_bytes()
    out = ["| shape N, H, V | head | chip (class) | chunk_bytes: rows x chunks | forward: fraction "
           "of MLX's GEMM rate (target >= 0.9) | training step (forward with gradients): time / "
           "mlx-lm's unfused step (target <= 1.15) |",
           "| --- | --- | --- | --- | ---: | ---: |"]
    for n, h, v in TARGET_SHAPES:
        for quantized in (False, True):
            for chip in _target_chips():
                for chunk in (gpu, 64 << 20):
                    m = step_model(chip, n, h, v, quantized, chunk)
                    p = m["plan"]
                    frac = m["gemm"] / m["fwd"]
                    ratio = m["step"] / m["unfused"]
                    name = f"{_mib(chunk)}{' (GPU default)' if chunk == gpu else ''}"
                    out.append(
                        f"| {n}, {h}, {v} | {'4-bit' if quantized else 'bfloat16'} | {chip.name} "
                        f"({chip.device_class}) | {name}: {p['chunk_rows']} x {p['chunks']} | "
                        f"{frac:.2f} {'met' if frac >= 0.9 else 'MISSED'} | "
                        f"{ratio:.2f} {'met' if ratio <= 1.15 else 'MISSED'} |")
    return "\n".join(out)


def table_stored_z(t: Tiles) -> str:
    """The shipped training step against the alternatives (doc: Backward)."""
    gpu = gpu_default_chunk_bytes()
    out = ["| shape N, H, V | head | chip (class) | shipped: Z stored per chunk, float32 dZ | "
           "rejected: bfloat16 dZ (fails the cancellation bound) | backward called later "
           "(reduction=\"none\"): Z recomputed |",
           "| --- | --- | --- | ---: | ---: | ---: |"]
    for n, h, v in TARGET_SHAPES:
        for quantized in (False, True):
            for chip in _target_chips():
                a = step_model(chip, n, h, v, quantized, gpu)
                b = step_model(chip, n, h, v, quantized, gpu, dz_bytes=2)
                c = step_model(chip, n, h, v, quantized, gpu, path="recompute")
                out.append(f"| {n}, {h}, {v} | {'4-bit' if quantized else 'bfloat16'} | {chip.name} "
                           f"({chip.device_class}) | {a['step'] / a['unfused']:.2f} | "
                           f"{b['step'] / b['unfused']:.2f} | {c['step'] / c['unfused']:.2f} |")
    return "\n".join(out)


TABLES = {"tiles": table_tiles, "chips": lambda t: table_chips(), "shapes": table_shapes,
          "backward": table_backward, "targets": table_targets, "stored_z": table_stored_z}


def render(t: Tiles) -> dict[str, str]:
    return {k: f(t) for k, f in TABLES.items()}


def fill(doc: str, tables: dict[str, str]) -> str:
    for name, body in tables.items():
        pattern = re.compile(rf"(<!-- model:{name} -->\n).*?(\n<!-- /model:{name} -->)", re.S)
        if not pattern.search(doc):
            raise ValueError(f"the doc has no <!-- model:{name} --> block")
        doc = pattern.sub(lambda m: m.group(1) + body + m.group(2), doc)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the tables in the doc")
    ap.add_argument("--check", action="store_true", help="fail if the doc's tables are stale")
    a = ap.parse_args(argv)
    tables = render(our_tiles())
    if a.write or a.check:
        doc = DOC.read_text()
        new = fill(doc, tables)
        if a.check:
            if new != doc:
                print(f"{DOC} is stale: run python -m tools.metal_lce_model --write", file=sys.stderr)
                return 1
            return 0
        DOC.write_text(new)
        return 0
    for name, body in tables.items():
        print(f"## {name}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
