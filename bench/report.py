"""The one table printer, and the JSON writer."""

import json
import platform

import mlx.core as mx

COLUMNS = [
    "loss", "dtype", "size", "pass",
    "ours ms (min-max)", "mlx ms (min-max)", "roofline ms",
    "speedup vs mlx", "x roofline", "peak MB ours/mlx", "match",
]


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ms_with_spread(timing) -> str:
    return f"{_ms(timing['median_ms'])} ({_ms(timing['min_ms'])}-{_ms(timing['max_ms'])})"


def _cells(record):
    head = [record["loss"], record["dtype"], record["size"], record["pass"]]
    if "skipped" in record:
        return head + [f"skipped: {record['skipped']}"]
    return head + [
        _ms_with_spread(record["ours"]),
        _ms_with_spread(record["mlx"]),
        _ms(record["roofline"]["median_ms"]),
        f"{record['speedup_vs_mlx']:.2f}x",
        f"{record['ratio_to_roofline']:.2f}",
        f"{record['ours']['peak_mb']:.3g}/{record['mlx']['peak_mb']:.3g}",
        "yes" if record["values_match"] else f"NO ({record['forward_rel_diff']:.1e})",
    ]


def format_table(records) -> str:
    rows = [COLUMNS] + [_cells(r) for r in records]
    # Skipped rows end in one long note; it must not widen the columns.
    full_rows = [row for row in rows if len(row) == len(COLUMNS)]
    widths = [max(len(row[i]) for row in full_rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_extras_table(records) -> str:
    """The further baselines some losses have (linear cross-entropy: our CE on
    materialised logits, torch), beside ours; empty when none ran."""
    rows = [["loss", "dtype", "size", "pass", "impl", "ms (min-max)", "vs ours", "peak MB"]]
    for r in records:
        if "extras" not in r:
            continue
        head = [r["loss"], r["dtype"], r["size"], r["pass"]]
        ours_ms = r["ours"]["median_ms"]
        rows.append(head + ["ours", _ms_with_spread(r["ours"]), "1.00x", f"{r['ours']['peak_mb']:.3g}"])
        for name, timing in r["extras"].items():
            peak = "n/a" if timing["peak_mb"] is None else f"{timing['peak_mb']:.3g}"
            rows.append(head + [name, _ms_with_spread(timing), f"{timing['median_ms'] / ours_ms:.2f}x", peak])
    if len(rows) == 1:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
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
