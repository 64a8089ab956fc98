"""The table printers, and the JSON writer."""

import json
import platform

import mlx.core as mx

from . import torch_column


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ms_with_spread(timing) -> str:
    if "skipped" in timing:
        return "skipped"
    return f"{_ms(timing['median_ms'])} ({_ms(timing['min_ms'])}-{_ms(timing['max_ms'])})"


def _ratio(record, key, fmt="{:.2f}"):
    return fmt.format(record[key]) if record.get(key) is not None else "-"


def _match(record):
    if record["values_match"] is None:
        return "-"
    return "yes" if record["values_match"] else f"NO ({record['forward_rel_diff']:.1e})"


def _peaks(record):
    ours = record["ours"]["peak_mb"]
    mlx = record["mlx"].get("peak_mb")
    return f"{ours:.3g}/{mlx:.3g}" if mlx is not None else f"{ours:.3g}/-"


def _grid(header, rows):
    # Rows that end in one long note (skipped cases) must not widen the columns.
    full_rows = [row for row in [header] + rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full_rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(records) -> str:
    with_torch = any("torch" in r for r in records)
    header = ["loss", "dtype", "size", "pass", "ours ms (min-max)", "mlx ms (min-max)"]
    header += ["torch ms"] if with_torch else []
    header += ["roofline ms warm/fresh", "speedup vs mlx"]
    header += ["speedup vs torch"] if with_torch else []
    header += ["x roofline", "x warm", "peak MB ours/mlx", "match"]
    rows = []
    for r in records:
        head = [r["loss"], r["dtype"], r["size"], r["pass"]]
        if "skipped" in r:
            rows.append(head + [f"skipped: {r['skipped']}"])
            continue
        warm = r.get("roofline_warm", r["roofline"] if r["pass"] == "fwd" else None)
        fresh = r["roofline"] if r["pass"] != "fwd" else None
        roof = f"{_ms(warm['median_ms']) if warm else '-'}/{_ms(fresh['median_ms']) if fresh else '-'}"
        cells = head + [_ms_with_spread(r["ours"]), _ms_with_spread(r["mlx"])]
        cells += [_ms(r["torch"]["median_ms"]) if "torch" in r else "-"] if with_torch else []
        cells += [roof, _ratio(r, "speedup_vs_mlx", "{:.2f}x")]
        cells += [_ratio(r, "speedup_vs_torch", "{:.2f}x")] if with_torch else []
        cells += [_ratio(r, "ratio_to_roofline"), _ratio(r, "ratio_to_warm_roofline"), _peaks(r), _match(r)]
        rows.append(cells)
    return _grid(header, rows)


def format_small_shapes(records) -> str:
    header = ["loss", "shape", "compiled", "pass", "ours us/call (min)", "mlx us/call (min)", "speedup vs mlx",
              "other references"]
    rows = [[r["loss"], "x".join(map(str, r["shape"])), "yes" if r["compiled"] else "no", r["pass"],
             f"{r['ours_us']:.1f}", f"{r['mlx_us']:.1f}", f"{r['speedup_vs_mlx']:.2f}x",
             ", ".join(f"{k} {o['us']:.1f} us ({o['speedup']:.2f}x)" for k, o in r.get("others", {}).items()) or "-"]
            for r in records]
    return _grid(header, rows)


def format_in_graph_memory(records) -> str:
    header = ["loss", "dtype", "shape", "logits MB", "ours peak/logits", "mlx peak/logits", "ours ms", "mlx ms"]
    rows = [[r["loss"], r["dtype"], "x".join(map(str, r["shape"])), f"{r['logits_mb']:.3g}",
             f"{r['ours']['peak_over_logits']:.2f}", f"{r['mlx']['peak_over_logits']:.2f}",
             _ms(r["ours"]["median_ms"]), _ms(r["mlx"]["median_ms"])] for r in records]
    return _grid(header, rows)


def format_page_faults(records) -> str:
    header = ["output MB", "warm copy ms", "fresh copy ms (huge pages)", "fresh copy ms (4 KB pages)",
              "page-fault tax ms", "faults huge/4 KB"]
    rows = [[f"{r['bytes'] / 1e6:.3g}", _ms(r["warm_ms"]), _ms(r["fresh_ms"]), _ms(r["fresh_4k_ms"]),
             _ms(r["page_fault_tax_ms"]), f"{r['fresh_faults']}/{r['fresh_4k_faults']}"] for r in records]
    return _grid(header, rows)


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


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    """The CPU's ISA extensions as /proc/cpuinfo lists them ([] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    return []


def _gemm_status():
    """What the 16-bit linear heads' GEMM found here (oneDNN: units, library, kernel)."""
    try:
        from mlx_fused_losses import _ext
        return dict(_ext.bf16_gemm_status())
    except (ImportError, AttributeError):
        return None


def environment():
    return {
        "half_gemm": _gemm_status(),
        "device": str(mx.default_device()),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "mlx_version": mx.__version__,
        "torch_version": torch_column.version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def write_json(path, records, settings, sections=None):
    data = {"environment": environment(), "settings": settings, "results": records, **(sections or {})}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
