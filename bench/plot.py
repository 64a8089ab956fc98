"""Effective bandwidth vs problem size, one row of panels per loss."""

import matplotlib

matplotlib.use("Agg")  # headless: the bench runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from bench.runner import PASSES  # noqa: E402

IMPL_STYLES = {"ours": ("-", "o"), "mlx": ("--", "s"), "roofline": (":", "")}
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
            for dtype in dtypes:
                elements, recs = _series(records, loss, pass_name, dtype)
                for impl, (line, marker) in IMPL_STYLES.items():
                    ax.plot(elements, [r[impl]["gbps"] for r in recs], line, marker=marker, markersize=3,
                            color=DTYPE_COLORS.get(dtype), label=f"{impl} {dtype}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{loss} - {pass_name}")
            ax.set_xlabel("input elements")
            ax.set_ylabel("effective GB/s (minimum bytes / time)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
