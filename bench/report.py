"""The one table printer, and the JSON writer."""

import json
import platform

import mlx.core as mx

COLUMNS = [
    "loss", "dtype", "size", "pass",
    "ours ms (min-max)", "mlx ms (min-max)", "roofline ms",
    "speedup vs mlx", "x roofline", "peak MB ours/mlx", "match",
]


def _ms_with_spread(timing) -> str:
    return f"{timing['median_ms']:.3g} ({timing['min_ms']:.3g}-{timing['max_ms']:.3g})"


def _row(record):
    head = [record["loss"], record["dtype"], record["size"], record["pass"]]
    if "skipped" in record:
        return head + [f"skipped: {record['skipped']}"] + [""] * (len(COLUMNS) - len(head) - 1)
    return head + [
        _ms_with_spread(record["ours"]),
        _ms_with_spread(record["mlx"]),
        f"{record['roofline']['median_ms']:.3g}",
        f"{record['speedup_vs_mlx']:.2f}x",
        f"{record['ratio_to_roofline']:.2f}",
        f"{record['ours']['peak_mb']:.4g}/{record['mlx']['peak_mb']:.4g}",
        "yes" if record["values_match"] else f"NO ({record['forward_rel_diff']:.1e})",
    ]


def format_table(records) -> str:
    rows = [COLUMNS] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows if "skipped" not in row[4]) for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        if row[4].startswith("skipped"):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        else:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def environment():
    return {
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def write_json(path, records, settings):
    with open(path, "w") as f:
        json.dump({"environment": environment(), "settings": settings, "results": records}, f, indent=2)
