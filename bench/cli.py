"""Benchmarks of mlx_fused_losses against mlx.nn.losses and a memory roofline.

For every loss x dtype x size, the forward and forward+backward times of ours,
of MLX's loss and of the roofline (the bytes the loss must move, moved by MLX
kernels), with peak memory. Prints a table, writes the results as JSON and
plots GB/s against size. See bench/README.md for what each column means.
"""

import argparse
import dataclasses
import os
import sys

import mlx.core as mx
from tqdm import tqdm

from bench.cases import DEFAULT_DTYPES, DEFAULT_LOSSES, DTYPES, LOSSES, build_cases
from bench.plot import plot_results
from bench.report import format_extras_table, format_table, write_json
from bench.runner import MemoryGuard, run_case
from bench.timing import RepeatPolicy

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
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m bench --quick\n"
               "  python -m bench --losses cross_entropy --dtypes float16 --repeats 5\n"
               "  python -m bench --json out/results.json --plot out/results.png")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_const", dest="sweep", const="quick",
                       help="small sizes, finishes in under a minute on 2 CPU cores")
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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    policy = _policy(args)
    cases = build_cases(args.losses, args.dtypes, args.sweep)
    guard = MemoryGuard()

    records = []
    progress = tqdm(cases, desc="bench", unit="case")
    for case in progress:
        progress.set_postfix_str(f"{case.spec.name} {case.dtype_name} {case.size_label}")
        records.extend(run_case(case, policy, args.compile, guard))
    progress.close()  # finish the bar before the table goes to stdout

    print(f"device: {mx.default_device()}, sweep: {args.sweep}, compile: {args.compile}")
    print(format_table(records))
    extras_table = format_extras_table(records)
    if extras_table:
        print("\nfurther baselines (time relative to ours; torch's memory is not MLX's):")
        print(extras_table)
    settings = {"sweep": args.sweep, "losses": args.losses, "dtypes": args.dtypes,
                "compile": args.compile, "repeat_policy": vars(policy)}
    write_json(args.json, records, settings)
    plot_results(records, args.plot, f"mlx_fused_losses on {mx.default_device()} ({args.sweep} sweep)")
    print(f"wrote {args.json} and {args.plot}")

    # fwd and fwd+bwd rows share one value check, so report it once per case.
    mismatches = [r for r in records if r["pass"] == "fwd" and r.get("values_match") is False]
    for r in mismatches:
        print(f"WARNING: {r['loss']} {r['dtype']} {r['size']}: forward differs from reference "
              f"by {r['forward_rel_diff']:.2e} (relative)", file=sys.stderr)
    return 0
