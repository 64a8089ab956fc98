"""Smoke test for the benchmark suite: tiny sizes, checks the JSON and PNG.

The benchmark is part of the installed package (``python -m
mlx_fused_losses.bench``): every run here starts in a temporary directory
outside the source tree, so it uses what pip installed, not the checkout."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_fused_losses  # noqa: F401  (a missing package is a failure, not a skip)

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = "mlx_fused_losses.bench"
TIMING_KEYS = {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "repeats", "peak_mb", "gbps"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "results.json", out / "results.png"
    completed = subprocess.run(
        [sys.executable, "-m", BENCH, "--smoke", "--losses",
         "cross_entropy,cross_entropy_hard,smooth_l1,huber,sigmoid_focal,softmax_focal",
         "--dtypes", "float32,bfloat16", "--json", str(json_path), "--plot", str(png_path)],
        cwd=out, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout + completed.stderr, json.loads(json_path.read_text()), png_path


def test_outputs_exist(smoke_run):
    stdout, _, png_path = smoke_run
    assert "speedup vs mlx" in stdout
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_case_has_both_passes_and_sane_timings(smoke_run):
    _, data, _ = smoke_run
    results = data["results"]
    assert {r["loss"] for r in results} == {"cross_entropy", "cross_entropy_hard", "smooth_l1", "huber",
                                            "sigmoid_focal", "softmax_focal"}
    assert {r["dtype"] for r in results} == {"float32", "bfloat16"}
    assert {r["pass"] for r in results} == {"fwd", "fwd+bwd"}
    for r in results:
        assert "skipped" not in r
        rooflines = ["roofline", "roofline_warm"] if r["pass"] == "fwd+bwd" else ["roofline"]
        for impl in ["ours", "mlx", *rooflines] + (["torch"] if "torch" in r else []):
            timing = r[impl]
            # Only MLX's allocator reports a peak (the rooflines are NumPy).
            keys = TIMING_KEYS if impl in ("ours", "mlx") else TIMING_KEYS - {"peak_mb"}
            assert keys <= timing.keys()
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["repeats"] >= 3
            if impl in ("ours", "mlx"):
                assert timing["peak_mb"] > 0
        assert r["bytes"] > 0
        assert r["speedup_vs_mlx"] > 0 and r["ratio_to_roofline"] > 0


def test_forward_values_match_reference(smoke_run):
    _, data, _ = smoke_run
    mismatched = [(r["loss"], r["dtype"], r["size"], r["forward_rel_diff"])
                  for r in data["results"] if not r["values_match"]]
    assert not mismatched


def _bench(*args, module=BENCH, timeout=120, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_the_options_and_their_defaults(tmp_path):
    done = _bench("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "mlx.nn.losses" in text  # what the benchmark compares
    assert "(default: bench_results.json)" in text
    assert "(default: bench_results.png)" in text
    assert "(default: float32,bfloat16,float16)" in text
    # The default table has the 16-bit rows and every loss, softmax focal and Huber included.
    # (argparse breaks long comma lists anywhere: compare without whitespace.)
    compact = "".join(done.stdout.split())
    assert "(default:cross_entropy,cross_entropy_hard,softmax_focal,smooth_l1,huber,sigmoid_focal," in compact


def test_float16_sweep_runs(tmp_path):
    done = _bench("--smoke", "--losses", "smooth_l1", "--dtypes", "float16",
                  "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["dtype"] for r in results} == {"float16"}
    assert all(r["values_match"] for r in results if r["pass"] == "fwd")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_fails_before_the_sweep(tmp_path, flag):
    missing_dir = tmp_path / "no" / "such" / "dir"
    other = "--plot" if flag == "--json" else "--json"
    done = _bench(flag, str(missing_dir / "out"), other, str(tmp_path / "ok"),
                  "--losses", "cross_entropy", timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert flag in done.stderr and "cannot be written" in done.stderr
    assert "case/s" not in done.stderr  # no progress bar: the sweep never started
    assert not (tmp_path / "ok").exists()  # the check leaves no file behind


def test_linear_cross_entropy_rows(tmp_path):
    """Linear cross-entropy rows: ours, MLX composed, the GEMM yardstick in
    the roofline column, our CE on materialised logits as a further baseline,
    forward values checked, GFLOP/s for the plot."""
    import mlx_fused_losses as fl

    if not hasattr(fl, "linear_cross_entropy"):
        pytest.skip("linear_cross_entropy is not built into this package yet")
    json_path = tmp_path / "linear.json"
    completed = _bench("--smoke", "--losses", "linear_cross_entropy",
                       "--json", str(json_path), "--plot", str(tmp_path / "linear.png"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "fl CE on logits" in completed.stdout
    results = json.loads(json_path.read_text())["results"]
    assert {(r["loss"], r["dtype"], r["pass"]) for r in results} == {
        ("linear_cross_entropy", "float32", "fwd"), ("linear_cross_entropy", "float32", "fwd+bwd")}
    for r in results:
        assert r["values_match"], r["forward_rel_diff"]
        assert r["flops"] == (6 if r["pass"] == "fwd+bwd" else 2) * 32 * 16 * 100
        for timing in [r["ours"], r["mlx"], r["roofline"], *r["extras"].values()]:
            assert 0 < timing["min_ms"] <= timing["median_ms"] and timing["gflops"] > 0
        assert r["extras"]["fl CE on logits"]["peak_mb"] > 0


def test_alignment_rows(tmp_path):
    """DPO and GRPO steps on a head (linear_dpo / linear_grpo, not in the
    default run): ours and the composed step with materialised logits, both
    passes, values checked against the composed per-pair / per-token losses,
    the GEMM yardstick with the reference model's forward GEMM counted."""
    json_path = tmp_path / "alignment.json"
    completed = _bench("--smoke", "--losses", "linear_dpo,linear_grpo",
                       "--json", str(json_path), "--plot", str(tmp_path / "alignment.png"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(json_path.read_text())["results"]
    assert {(r["loss"], r["pass"]) for r in results} == {
        (loss, p) for loss in ("linear_dpo", "linear_grpo") for p in ("fwd", "fwd+bwd")}
    for r in results:
        assert r["values_match"], (r["loss"], r["forward_rel_diff"])
        assert r["flops"] == (8 if r["pass"] == "fwd+bwd" else 4) * 32 * 16 * 100
        for timing in (r["ours"], r["mlx"], r["roofline"]):
            assert 0 < timing["min_ms"] <= timing["median_ms"]


def test_extra_sections(smoke_run):
    stdout, data, _ = smoke_run
    small = data["small_shapes"]
    assert {(r["loss"], r["compiled"], r["pass"]) for r in small} == {
        (loss, compiled, p) for loss in {r["loss"] for r in data["results"]}
        for compiled in (False, True) for p in ("fwd", "fwd+bwd")}
    assert all(r["ours_us"] > 0 and r["mlx_us"] > 0 for r in small)
    in_graph = data["in_graph_memory"]
    assert {r["loss"] for r in in_graph} == {"cross_entropy", "smooth_l1"}
    for r in in_graph:
        assert r["ours"]["peak_over_logits"] > 0 and r["mlx"]["peak_over_logits"] > 0
    if sys.platform.startswith("linux"):  # the CPU rooflines' page-fault rows
        rows = data["page_faults"]
        assert rows and all(r["warm_ms"] > 0 and r["fresh_ms"] > 0 and r["fresh_4k_ms"] > 0 for r in rows)
    assert "Small shapes" in stdout and "peak above the inputs" in stdout


def test_cases_filter_runs_only_the_matching_cases(tmp_path):
    json_path = tmp_path / "r.json"
    done = _bench("--smoke", "--losses", "cross_entropy,smooth_l1", "--dtypes", "float32,bfloat16",
                  "--cases", "*:float32:*,cross_entropy:bfloat16:64x512",
                  "--json", str(json_path), "--plot", str(tmp_path / "r.png"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(json_path.read_text())
    assert {(r["loss"], r["dtype"], r["size"]) for r in data["results"]} == {
        ("cross_entropy", "float32", "64x128"), ("cross_entropy", "float32", "64x512"),
        ("cross_entropy", "bfloat16", "64x512"),
        ("smooth_l1", "float32", "4096"), ("smooth_l1", "float32", "16384")}
    # The run records how it was made and how loaded the machine was.
    assert data["run"]["command"].startswith(f"python -m {BENCH} --smoke")
    load = data["run"]["load_average_1min"]
    assert 0 <= load["min"] <= load["median"] <= load["max"] and load["samples"] >= 2
    # The goals' verdicts: computed for every goal, "not measured" where the
    # run has no such row (smoke sizes are not the headline sizes).
    verdicts = {v["key"]: v for v in data["targets"]}
    assert verdicts["ce_fwd_bwd"]["met"] is None and verdicts["ce_fwd_bwd"]["measured"] is None
    assert verdicts["in_graph_peak"]["measured"] > 0 and verdicts["small_shapes"]["measured"] > 0


def _row(loss, dtype, size, pass_name, **fields):
    return {"loss": loss, "dtype": dtype, "size": size, "pass": pass_name, **fields}


def test_target_verdicts_follow_the_numbers():
    from mlx_fused_losses.bench.targets import evaluate

    data = {
        "results": [
            _row("cross_entropy", "float32", "4096x32768", "fwd+bwd", ratio_to_roofline=1.49, speedup_vs_torch=4.9),
            _row("cross_entropy", "bfloat16", "4096x32768", "fwd+bwd", ratio_to_roofline=1.61),
            _row("cross_entropy", "float16", "4096x32768", "fwd+bwd", skipped="needs ~9 GiB"),
            _row("smooth_l1", "float32", "64M", "fwd", ratio_to_roofline=1.5),
        ],
        "in_graph_memory": [{"ours": {"peak_over_logits": 1.0}}, {"ours": {"peak_over_logits": 1.2}}],
        "small_shapes": [{"reference": "mlx.nn.losses.cross_entropy", "speedup_vs_mlx": 1.3, "others": {}},
                         {"reference": "mx.fast.cross_entropy (hard targets)", "speedup_vs_mlx": 0.9,
                          "others": {"mlx.nn.losses": {"speedup": 0.97}}}],
    }
    verdicts = {v["key"]: v for v in evaluate(data)}
    assert verdicts["ce_fwd_bwd"]["met"] is True and verdicts["ce_fwd_bwd"]["measured"] == 1.49
    assert verdicts["ce_vs_torch"]["met"] is False  # an "at least" target: 4.9 < 5
    assert verdicts["ce_bfloat16_fwd_bwd"]["met"] is False and verdicts["ce_bfloat16_fwd_bwd"]["why_missed"]
    assert verdicts["ce_float16_fwd_bwd"]["met"] is None  # skipped row: not measured
    assert verdicts["smooth_l1_fwd"]["met"] is True  # the limit itself is met
    assert verdicts["in_graph_peak"]["measured"] == 1.2 and verdicts["in_graph_peak"]["met"] is False
    # mx.fast.cross_entropy is judged on its own, mlx.nn.losses with the other references.
    assert verdicts["small_shapes"]["measured"] == 0.97 and verdicts["small_shapes"]["met"] is False
    assert verdicts["small_shapes_fast"]["measured"] == 0.9 and verdicts["small_shapes_fast"]["met"] is False
    assert verdicts["ce_fwd_bwd"]["why_missed"] == ""


def test_generated_blocks_are_rendered_from_docs_json():
    """docs/performance.md's tables and the README's one-line summary are exactly
    what mlx_fused_losses.bench.readme renders from docs/bench_cpu.json: no number
    in either block is edited by hand."""
    from mlx_fused_losses.bench.readme import HEADLINE_BEGIN, HEADLINE_END, headline, readme_block, render

    json_path = REPO_ROOT / "docs" / "bench_cpu.json"
    performance, readme = REPO_ROOT / "docs" / "performance.md", REPO_ROOT / "README.md"
    if not all(p.exists() for p in (json_path, performance, readme)):
        pytest.skip("docs/bench_cpu.json, docs/performance.md or README.md is not in this tree "
                    "(a wheel's test sources)")
    data = json.loads(json_path.read_text())
    assert readme_block(performance.read_text()) == render(data)
    assert readme_block(readme.read_text(), HEADLINE_BEGIN, HEADLINE_END) == headline(data)
    # The plot the tables show is the run's, beside the page that shows them.
    assert "](bench_cpu.png)" in render(data) and (performance.parent / "bench_cpu.png").exists()


def test_linear_heads_block_is_rendered_from_its_json():
    """docs/performance.md's linear-heads table and goals are what
    bench.linear_heads renders from docs/linear_heads_cpu.json, and name the CPU."""
    from mlx_fused_losses.bench.linear_heads import BEGIN, END, render

    json_path = REPO_ROOT / "docs" / "linear_heads_cpu.json"
    performance = REPO_ROOT / "docs" / "performance.md"
    if not (json_path.exists() and performance.exists()):
        pytest.skip("docs/linear_heads_cpu.json or docs/performance.md is not in this tree")
    data = json.loads(json_path.read_text())
    text = performance.read_text()
    block = text[text.index(BEGIN):text.index(END) + len(END)] + "\n"
    assert block == render(data)
    assert data["environment"]["cpu_model"] in block and data["environment"]["cpu_flags"]


def test_missed_roofline_goal_gets_a_measured_compute_bound():
    """compute_bound.attach measures the loss of a missed row on cache-resident
    data and divides by the row's roofline per element; met rows get nothing."""
    from mlx_fused_losses.bench import compute_bound
    from mlx_fused_losses.bench.cases import build_cases
    from mlx_fused_losses.bench.targets import describe_bound

    case = next(c for c in build_cases(["sigmoid_focal"], ["float32"], "smoke"))
    row = [case.spec.name, case.dtype_name, case.size_label, "fwd"]
    record = {"loss": row[0], "dtype": row[1], "size": row[2], "pass": "fwd",
              "roofline": {"median_ms": 1e-6 * case.elements}}  # 1 ns per element
    missed = {"key": "x", "met": False, "limit": 1.5, "row": row, "roofline_key": "roofline"}
    met = {**missed, "key": "y", "met": True}
    compute_bound.attach([missed, met], [record], [case])
    bound = missed["bound"]
    assert "bound" not in met
    assert bound["resident_elements"] == compute_bound.RESIDENT_ELEMENTS
    assert bound["roofline_ns_per_element"] == pytest.approx(1.0)
    assert bound["compute_over_roofline"] == pytest.approx(bound["compute_ns_per_element"]) and bound["compute_ns_per_element"] > 0
    assert bound["compute_bound"] == (bound["compute_over_roofline"] > 1.5)
    if bound["instructions_per_element"] is None:  # a VM without a virtual PMU
        assert bound["counters"].startswith("no hardware counters")
    else:
        assert bound["instructions_per_element"] > 1 and bound["cycles_per_element"] > 0
    assert "ns/element" in describe_bound(bound)


def test_update_replaces_every_block_a_file_holds(tmp_path):
    """--update rewrites each file's blocks, whatever command line an older
    block was generated under, and refuses a file without one."""
    from mlx_fused_losses.bench.readme import END, HEADLINE_END, headline, main, render

    data = json.loads((REPO_ROOT / "docs" / "bench_cpu.json").read_text()) \
        if (REPO_ROOT / "docs" / "bench_cpu.json").exists() else None
    if data is None:
        pytest.skip("docs/bench_cpu.json is not in this tree")
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(data))
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- bench:begin: generated by `an older command` -->\nstale 1.0x\n" + END + "\nafter\n")
    summary = tmp_path / "summary.md"
    summary.write_text("# t\n<!-- bench:headline: generated by `old` -->\nstale\n" + HEADLINE_END + "\nrest\n")
    assert main([str(json_path), "--update", str(page), str(summary)]) == 0
    assert page.read_text() == "intro\n" + render(data) + "after\n"
    assert summary.read_text() == "# t\n" + headline(data) + "rest\n"
    (tmp_path / "none.md").write_text("no block\n")
    with pytest.raises(ValueError, match="no generated block"):
        main([str(json_path), "--update", str(tmp_path / "none.md")])


def test_headline_follows_the_numbers():
    from mlx_fused_losses.bench.readme import headline

    data = {"environment": {"cpu_model": "A CPU", "processor": "x", "mlx_version": "9.9"},
            "run": {"load_average_1min": {"cpus": 4}},
            "results": [_row("smooth_l1", "float32", "64M", "fwd+bwd", speedup_vs_mlx=20.4, ratio_to_roofline=0.9),
                        _row("huber", "float32", "64M", "fwd+bwd", speedup_vs_mlx=31.0, speedup_vs_torch=2.0,
                             ratio_to_roofline=1.234),
                        _row("huber", "float32", "64M", "fwd", speedup_vs_mlx=99.0, ratio_to_roofline=9.0),
                        {**_row("sigmoid_focal", "float32", "128M", "fwd+bwd"), "skipped": "memory"}],
            "in_graph_memory": [{"ours": {"peak_over_logits": 1.0}, "mlx": {"peak_over_logits": 4.0}}]}
    text = headline(data)
    assert "4 CPU cores (A CPU, mlx 9.9)" in text and "at 64M (2 cases of 2 losses)" in text
    assert "20x to 31x faster than MLX" in text and "2.0x faster than PyTorch" in text
    assert "0.90x to 1.23x the time of the memory roofline" in text
    assert "1.00x the logits' size (`mlx.nn.losses`: 4.00x)" in text


def test_plot_again_from_the_json(smoke_run, tmp_path):
    """python -m mlx_fused_losses.bench.plot redraws a run's plot from its JSON
    (the README's plot comes from the same run as its tables)."""
    _, data, _ = smoke_run
    json_path, png_path = tmp_path / "r.json", tmp_path / "again.png"
    json_path.write_text(json.dumps(data))
    done = _bench(str(json_path), str(png_path), module=f"{BENCH}.plot", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- what a user sees -------------------------------------------------------------------

# Words of the project's own bookkeeping, which mean nothing to a user: the issue
# tracker, the goals' JSON keys, paths of the machines the project is built on.
def _bookkeeping(text: str) -> list:
    from mlx_fused_losses.bench.targets import TARGETS

    found = re.findall(r"\bissues?\b[^\n]{0,40}", text, flags=re.IGNORECASE)
    found += [t.key for t in TARGETS if re.search(rf"\b{re.escape(t.key)}\b", text)]
    found += re.findall(r"/work/\S*", text)
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The installed package's quick benchmark (one loss), run from a directory
    outside the source tree."""
    out = tmp_path_factory.mktemp("quick")
    done = _bench("--quick", "--losses", "smooth_l1", "--dtypes", "float32",
                  "--json", str(out / "r.json"), "--plot", str(out / "r.png"), cwd=out, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr, json.loads((out / "r.json").read_text())


def test_quick_run_from_any_directory(quick_run):
    output, data = quick_run
    assert {(r["size"], r["pass"]) for r in data["results"]} == {
        (s, p) for s in ("262144", "1M") for p in ("fwd", "fwd+bwd")}
    assert "speedup vs mlx" in output and "Performance goals" in output
    assert data["run"]["command"].startswith(f"python -m {BENCH} --quick")


def test_goals_say_what_they_measure_and_unmeasured_ones_take_one_line(quick_run):
    output, data = quick_run
    block = output[output.index("Performance goals"):output.index("wrote ")]
    assert max(map(len, block.split("\n"))) <= 100  # wrapped for a terminal
    goals = " ".join(block.split())
    verdicts = data["targets"]
    measured = [v for v in verdicts if v["met"] is not None]
    assert measured and len(measured) < len(verdicts)  # a quick run measures some, not all
    for v in measured:
        assert f"{v['what']}: {v['measured']:.2f}x (goal {v['goal']})" in goals
    # One summary line for the rest, not one "[not measured]" line each.
    assert "[not measured]" not in output
    assert f"{len(verdicts) - len(measured)} of {len(verdicts)} goals not measured" in goals
    assert "--sizes 4096x32768,1024x32768,64M" in goals


def test_format_targets_lists_measured_goals_only():
    from mlx_fused_losses.bench.targets import evaluate, format_targets

    everything_missing = format_targets(evaluate({"results": []}), width=1000)
    assert everything_missing.count("\n") == 0 and "19 of 19 goals not measured" in everything_missing
    one = format_targets(evaluate({"results": [
        _row("smooth_l1", "float32", "64M", "fwd", ratio_to_roofline=1.7)]}), width=1000)
    first, rest = one.split("\n")
    assert first.startswith("[missed] smooth-L1 fp32 64M forward vs memory bandwidth limit")
    assert "1.70x (goal <= 1.5x)" in first and "18 of 19" in rest
    wrapped = format_targets(evaluate({"results": []}), width=60).split("\n")
    assert len(wrapped) > 1 and all(len(line) <= 60 for line in wrapped)
    assert all(line.startswith("    ") for line in wrapped[1:])


def test_output_and_readme_block_have_no_bookkeeping_words(smoke_run, quick_run, tmp_path):
    from mlx_fused_losses.bench.readme import headline, render

    texts = {"smoke run": smoke_run[0], "quick run": quick_run[0]}
    for module in (BENCH, f"{BENCH}.plot", f"{BENCH}.readme", f"{BENCH}.linear_ce_targets"):
        done = _bench("--help", module=module, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        texts[f"{module} --help"] = done.stdout
    json_path = REPO_ROOT / "docs" / "bench_cpu.json"
    if json_path.exists():  # not among a wheel's test sources
        texts["README block"] = render(json.loads(json_path.read_text()))
        texts["README summary"] = headline(json.loads(json_path.read_text()))
    found = {name: _bookkeeping(text) for name, text in texts.items()}
    assert not any(found.values()), found


def test_bookkeeping_scan_finds_what_it_looks_for():
    assert _bookkeeping("Issue 9 targets:\n[met] x") == ["Issue 9 targets:"]
    assert _bookkeeping("see the issue's sizes") and _bookkeeping("key ce_fwd_bwd here")
    assert _bookkeeping("pip install /work/main") == ["/work/main"]
    assert not _bookkeeping("cross-entropy fwd+bwd vs memory bandwidth limit: 1.15x (goal <= 1.5x)")


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_missing_bench_extra_is_named(missing, tmp_path):
    """Without the [bench] extra's packages the benchmark says which one is
    missing and how to install it, not a traceback."""
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['bench', '--help']; "
            f"runpy.run_module({BENCH!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"needs {missing}" in done.stderr and "[bench] extra" in done.stderr and "Traceback" not in done.stderr
