"""Effective bandwidth vs problem size, one row of panels per loss."""

import matplotlib

matplotlib.use("Agg")  # headless: the bench runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from .runner import PASSES  # noqa: E402

# "roofline": warm read-only forward, fresh-gradient forward+backward.
# The roofline has a marker too: a run of one size per loss (docs/performance.md's) draws
# single points, and a line style alone would leave it invisible.
IMPL_STYLES = {"ours": ("-", "o"), "mlx": ("--", "s"), "torch": ("-.", "^"), "roofline": (":", "x")}
DTYPE_COLORS = {"float32": "tab:blue", "bfloat16": "tab:orange", "float16": "tab:green"}


def _series(records, loss, pass_name, dtype):
    points = sorted(
        (r["elements"], r) for r in records
        if r["loss"] == loss and r["pass"] == pass_name and r["dtype"] == dtype and "skipped" not in r
    )
    return [e for e, _ in points], [r for _, r in points]


def plot_results(records, path, title):
    losses = list(dict.fromkeys(r["loss"] for r in records))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    fig, axes = plt.subplots(len(losses), len(PASSES), figsize=(11, 3.6 * len(losses)), squeeze=False)
    for row, loss in enumerate(losses):
        for col, pass_name in enumerate(PASSES):
            ax = axes[row][col]
            # Losses with a flop count (linear cross-entropy: GEMM-bound) are
            # plotted in GFLOP/s, with their further baselines.
            metric = "gflops" if any("flops" in r for r in records if r["loss"] == loss) else "gbps"
            for dtype in dtypes:
                elements, recs = _series(records, loss, pass_name, dtype)
                if not recs:  # a loss that does not run in this dtype
                    continue
                for impl, (line, marker) in IMPL_STYLES.items():
                    points = [(e, r[impl][metric]) for e, r in zip(elements, recs) if metric in r.get(impl, {})]
                    if points:
                        ax.plot(*zip(*points), line, marker=marker, markersize=3,
                                color=DTYPE_COLORS.get(dtype), label=f"{impl} {dtype}")
                extra_names = dict.fromkeys(n for r in recs for n in r.get("extras", {}))
                for i, name in enumerate(extra_names):
                    points = [(e, r["extras"][name][metric]) for e, r in zip(elements, recs)
                              if name in r.get("extras", {})]
                    ax.plot([e for e, _ in points], [v for _, v in points], "-.", marker="^x+"[i % 3],
                            markersize=4, color=DTYPE_COLORS.get(dtype), alpha=0.6, label=f"{name} {dtype}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{loss} - {pass_name}")
            if metric == "gflops":
                ax.set_xlabel("N x H x V")
                ax.set_ylabel("GFLOP/s (GEMM flops of the pass / time)")
            else:
                ax.set_xlabel("input elements")
                ax.set_ylabel("effective GB/s (minimum bytes / time)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """The plot again from a run's JSON (RESULTS.json -> OUT.png)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=main.__doc__)
    parser.add_argument("json", help=f"results of python -m {__package__} --json")
    parser.add_argument("png", help="the plot to write (PNG)")
    args = parser.parse_args(argv)
    data = json.load(open(args.json))
    plot_results(data["results"], args.png,
                 f"mlx_fused_losses on {data['environment']['device']} ({data['settings']['sweep']} sweep)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
