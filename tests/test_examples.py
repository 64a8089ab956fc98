"""The examples explain themselves: ``python examples/NAME.py --help`` prints
the help and exits 0 at once (it used to start training), from any directory,
and every option says what it does and what its default is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
# What an example may need beyond the package and the test extra: the
# [examples] and [lm] extras.
EXTRA_MODULES = {"sklearn": "examples", "mlx_lm": "lm"}


def option_entries(help_text: str) -> dict[str, str]:
    """argparse's "options:" section as {invocation: help text}."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries: list[list[str]] = []
    for line in section.split("\n"):
        if re.match(r"  -", line):
            invocation, _, text = line.strip().partition("  ")
            entries.append([invocation, text.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] = (entries[-1][1] + " " + line.strip()).strip()
        elif not line.strip() or not line.startswith(" "):
            break  # the end of the section (an epilog or another group follows)
    return {invocation: text for invocation, text in entries}


def test_option_entries_reads_argparse_help():
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--short", type=int, default=1, help="a short one (default: %(default)s)")
    parser.add_argument("--a-rather-long-option-name", metavar="VALUE", help="help on the next line")
    parser.add_argument("--bare")
    entries = option_entries(parser.format_help())
    assert entries == {"-h, --help": "show this help message and exit", "--short SHORT": "a short one (default: 1)",
                       "--a-rather-long-option-name VALUE": "help on the next line", "--bare BARE": ""}


@pytest.mark.skipif(not EXAMPLES, reason="examples/ is not in this tree")
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_help(example, tmp_path):
    done = subprocess.run([sys.executable, str(example), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    missing = re.search(r"No module named '(\w+)", done.stderr)
    if done.returncode and missing and missing.group(1) in EXTRA_MODULES:
        pytest.skip(f"{example.name} needs {missing.group(1)} (the [{EXTRA_MODULES[missing.group(1)]}] extra)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {example.name}"), done.stdout[:500]
    entries = option_entries(done.stdout)
    assert len(entries) > 1, "no options besides --help"
    for invocation, text in entries.items():
        if invocation == "-h, --help":
            continue
        assert text, f"{example.name} {invocation}: no help text"
        assert re.search(r"\(default: [^)]+\)", text), f"{example.name} {invocation}: no default in {text!r}"


def test_preference_example_quick():
    """examples/preference_lm.py --quick as the README's main job runs it
    (V = 151936): the DPO and GRPO steps with linear_dpo_loss / linear_grpo_loss
    give the usual way's losses (to 1e-5, and to the float64 value) with a peak
    above the model at most 1/10 of the usual way's (the script's own checks,
    exit status 0). A subprocess: the peak is the step's, not the suite's."""
    pytest.importorskip("mlx_lm")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "preference_lm.py"), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    ours = [row for row in rows if row[:1] == ["fl"]]
    assert len(ours) == 2, done.stdout
    for row in ours:  # fl  loss  vs-usual  vs-f64  grad-diff  s/step  peak ...
        assert float(row[2]) <= 1e-5 and float(row[3]) <= 1e-5 and float(row[4]) <= 1e-4, row


def test_distill_example_quick():
    """examples/distill_lm.py --quick as the README's main job runs it (V =
    151936): every step's fl loss within 1e-5 of the float64 value and of the
    usual way's (mlx-lm's kl_div_loss on both models' logits), fl's peak above
    the models at most 1/10 of the usual way's (the script's own checks, exit
    status 0). A subprocess: the peak is the step's, not the suite's."""
    pytest.importorskip("mlx_lm")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "distill_lm.py"), "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    steps = [row for row in rows if len(row) == 6 and row[0].isdigit()]
    assert len(steps) == 2, done.stdout
    for row in steps:  # step  usual  fl  fl-usual  usual-f64  fl-f64
        assert float(row[5]) <= 1e-5 and float(row[3]) <= 1e-5 + float(row[4]), row
    peak = [row for row in rows if row[:1] == ["fl:"]]
    assert peak and float(peak[0][2]) <= 0.1, done.stdout


def test_sharded_head_on_two_processes(tmp_path):
    """examples/sharded_head.py on 2 local ranks (small sizes): every rank
    prints OK, i.e. the loss equals the usual way's, the head's gradient is
    1/P of the whole and the step's peak memory stayed below the rank's
    N x V/P logits (the example checks these itself)."""
    from distributed_launch import launch

    done = launch(REPO / "examples" / "sharded_head.py",
                  ["--vocab", "8000", "--hidden", "64", "--batch", "2", "--length", "256", "--steps", "2",
                   "--chunk-mib", "1"], 2, timeout=120.0, cwd=tmp_path)
    for rank in range(2):
        assert f"rank {rank}/2: OK" in done.stdout, done.stdout + done.stderr
        assert f"rank {rank}/2: head rows [{rank * 4000}, {rank * 4000 + 4000}) of 8000" in done.stdout
