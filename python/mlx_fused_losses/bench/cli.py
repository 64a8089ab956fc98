"""Benchmarks of mlx_fused_losses against mlx.nn.losses and a memory roofline.

For every loss x dtype x size, the forward and forward+backward times of ours,
of MLX's loss and of the roofline (the bytes the loss must move, moved by MLX
kernels), with peak memory. Prints a table, writes the results as JSON and
plots GB/s against size. docs/performance.md (in the source distribution) says
what each column means.
"""

import argparse
import dataclasses
import fnmatch
import os
import shlex
import sys
import threading
import time

import mlx.core as mx
from tqdm import tqdm

from . import compute_bound, roofline
from .cases import DEFAULT_DTYPES, DEFAULT_LOSSES, DTYPES, LOSSES, build_cases
from .in_graph_memory import run_in_graph_memory
from .plot import plot_results
from .report import (format_extras_table, format_in_graph_memory, format_page_faults, format_small_shapes,
                          format_table, write_json)
from .runner import MemoryGuard, run_case
from .small_shapes import run_small_shapes
from .targets import evaluate, format_targets
from .timing import RepeatPolicy

# How this benchmark is run (what --help and the recorded command line say).
PROG = f"python -m {__package__}"

# Per-sweep repeat policy; --repeats overrides max_repeats.
POLICIES = {
    "full": RepeatPolicy(max_repeats=20, budget_s=1.0, slow_budget_s=10.0),
    "quick": RepeatPolicy(max_repeats=10, budget_s=0.2, slow_budget_s=1.0),
    "smoke": RepeatPolicy(max_repeats=3, budget_s=0.0),
}


def _comma_list(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {sorted(choices)}")
        return items
    return parse


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               f"  {PROG} --quick\n"
               f"  {PROG} --losses cross_entropy --dtypes float16 --repeats 5\n"
               f"  {PROG} --json out/results.json --plot out/results.png")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_const", dest="sweep", const="quick",
                       help="small sizes, about 1.5 min on 2 CPU cores")
    sweep.add_argument("--smoke", action="store_const", dest="sweep", const="smoke",
                       help="tiny sizes for tests (seconds)")
    parser.set_defaults(sweep="full")
    parser.add_argument("--losses", type=_comma_list(LOSSES), default=DEFAULT_LOSSES,
                        help=f"comma list from {','.join(LOSSES)} "
                             f"(default: {','.join(DEFAULT_LOSSES)})")
    parser.add_argument("--dtypes", type=_comma_list(DTYPES), default=DEFAULT_DTYPES,
                        help=f"comma list from {','.join(DTYPES)} "
                             f"(default: {','.join(DEFAULT_DTYPES)})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="maximum timed repeats per measurement (default: adaptive, "
                             "up to 20 for the full sweep, 10 for --quick, 3 for --smoke)")
    parser.add_argument("--compile", action="store_true",
                        help="wrap ours and the MLX reference in mx.compile (default: off)")
    parser.add_argument("--sizes", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                        default=None, help="only these sizes of the sweep, e.g. 4096x32768,64M (default: all)")
    parser.add_argument("--cases", type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
                        default=None, metavar="LOSS:DTYPE:SIZE,...",
                        help="only the cases that match one of these patterns (shell wildcards), e.g. "
                             "'*:float32:*,cross_entropy:*16:*' runs every loss in float32 and "
                             "cross-entropy in bfloat16 and float16 too (default: all)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                        help="skip measurements whose predicted peak exceeds this "
                             "(default: 80%% of the memory limit or RAM)")
    parser.add_argument("--json", default="bench_results.json",
                        help="results file (default: %(default)s)")
    parser.add_argument("--plot", default="bench_results.png",
                        help="plot file, PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag in ("json", "plot"):
        problem = _unwritable(getattr(args, flag))
        if problem:
            # Fail now, not after a sweep of several minutes.
            parser.error(f"--{flag} {getattr(args, flag)!r} cannot be written: {problem}")
    return args


def _unwritable(path: str):
    """Why ``path`` cannot be written (None if it can). Opens it for
    appending, which creates nothing that outlives the check and truncates
    nothing."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    if not existed:
        os.remove(path)
    return None


def _policy(args) -> RepeatPolicy:
    policy = POLICIES[args.sweep]
    if args.repeats is not None:
        policy = dataclasses.replace(policy, max_repeats=args.repeats,
                                     min_repeats=min(policy.min_repeats, args.repeats))
    return policy


def _extra_sections(args, policy, records):
    sections = {
        "small_shapes": (run_small_shapes(args.losses, samples=3, calls=5) if args.sweep == "smoke"
                         else run_small_shapes(args.losses)),
        "in_graph_memory": run_in_graph_memory(args.sweep, policy, args.losses),
    }
    if roofline.on_cpu():
        # The gradient sizes of this run (up to 1 GB: each row copies it ~30 times).
        sizes = sorted({r["elements"] * DTYPES[r["dtype"]].size
                        for r in records if r["pass"] == "fwd+bwd" and "skipped" not in r
                        and LOSSES[r["loss"]].roofline is None})
        sections["page_faults"] = [roofline.page_fault_row(n, repeats=2 if args.sweep == "smoke" else 3)
                                   for n in sizes if n <= 1 << 30]
    return sections


class LoadSampler:
    """The machine's 1-minute load average, sampled every few seconds during
    the run (on a shared machine the ratios of one run are what can be
    compared; the load says how much the absolute times are inflated)."""

    def __init__(self, every_s=5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s):
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])
        ordered = sorted(self.samples)
        return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1],
                "samples": len(ordered), "cpus": os.cpu_count()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load = LoadSampler()
    started = time.time()
    policy = _policy(args)
    cases = build_cases(args.losses, args.dtypes, args.sweep)
    if args.sizes:
        cases = [c for c in cases if c.size_label in args.sizes]
    if args.cases:
        cases = [c for c in cases
                 if any(fnmatch.fnmatchcase(f"{c.spec.name}:{c.dtype_name}:{c.size_label}", p) for p in args.cases)]
    guard = MemoryGuard(args.memory_budget)

    records = []
    progress = tqdm(cases, desc="bench", unit="case")
    for case in progress:
        progress.set_postfix_str(f"{case.spec.name} {case.dtype_name} {case.size_label}")
        records.extend(run_case(case, policy, args.compile, guard))
    progress.close()  # finish the bar before the table goes to stdout
    sections = _extra_sections(args, policy, records)

    print(f"device: {mx.default_device()}, sweep: {args.sweep}, compile: {args.compile}")
    print(format_table(records))
    extras_table = format_extras_table(records)
    if extras_table:
        print("\nfurther baselines (time relative to ours; torch's memory is not MLX's):")
        print(extras_table)
    print("\nSmall shapes (per call, eager and mx.compile):")
    print(format_small_shapes(sections["small_shapes"]))
    print("\nLogits inside the differentiated function (f(x) = loss(2 * x, targets)), peak above the inputs:")
    print(format_in_graph_memory(sections["in_graph_memory"]))
    if sections.get("page_faults"):
        print("\nFresh outputs: the cost of writing a new array, by page size:")
        print(format_page_faults(sections["page_faults"]))
    run = {"command": f"{PROG} " + shlex.join(argv),
           "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
           "wall_s": time.time() - started, "load_average_1min": load.stop()}
    sections["targets"] = evaluate({"results": records, **sections})
    if roofline.on_cpu():
        # Each missed roofline goal: its arithmetic alone, measured now.
        compute_bound.attach(sections["targets"], records, cases)
    print("\nPerformance goals, judged on this run:")
    print(format_targets(sections["targets"]))
    settings = {"sweep": args.sweep, "losses": args.losses, "dtypes": args.dtypes,
                "compile": args.compile, "repeat_policy": vars(policy), "memory_budget_gib": args.memory_budget}
    write_json(args.json, records, settings, {"run": run, **sections})
    plot_results(records, args.plot, f"mlx_fused_losses on {mx.default_device()} ({args.sweep} sweep)")
    print(f"wrote {args.json} and {args.plot}")

    # fwd and fwd+bwd rows share one value check, so report it once per case.
    mismatches = [r for r in records if r["pass"] == "fwd" and r.get("values_match") is False]
    for r in sections["small_shapes"]:
        for name, (us, speedup) in {"MLX": (r["mlx_us"], r["speedup_vs_mlx"]),
                                    **{k: (o["us"], o["speedup"]) for k, o in r["others"].items()}}.items():
            if speedup < 1.0:
                print(f"NOTE: {r['loss']} {'compiled' if r['compiled'] else 'eager'} {r['pass']} at "
                      f"{r['shape']}: {r['ours_us']:.1f} us vs {name} {us:.1f} us", file=sys.stderr)
    for r in mismatches:
        print(f"WARNING: {r['loss']} {r['dtype']} {r['size']}: forward differs from reference "
              f"by {r['forward_rel_diff']:.2e} (relative)", file=sys.stderr)
    return 0
