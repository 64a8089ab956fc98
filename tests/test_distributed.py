"""The losses over several processes: 2 and 3 local ranks of MLX's ring
backend (``mlx.launch --backend ring`` on 127.0.0.1, tests/distributed_launch.py),
each launch bounded in time; every rank's loss, gradients and stats compared
with the single-process loss on the full head, computed here.

Vocabulary-parallel: rank r holds rows [start, stop) of the head (uneven
sizes; with 3 ranks in an order other than the ranks'). Data-parallel: rank r
holds rows of the batch with different numbers of kept tokens. Bad input:
every rank raises (or gives NaN, unvalidated), none hangs, and a good call
afterwards still agrees (the ranks are in step).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, to_np
from distributed_launch import launch

import mlx_fused_losses as fl
import mlx_fused_losses.distributed as fld

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
N, H, V = 13, 32, 31
TIMEOUT = 90.0  # seconds for one launch (all its cases); a few seconds is usual
STATS = ("lse", "entropy", "correct", "argmax")

# Every rank's [start, stop) of the V classes.
SHARDS = {2: [(0, 16), (16, 31)], 3: [(20, 31), (0, 11), (11, 20)]}
# Every rank's rows of the batch (data-parallel).
BATCH_ROWS = {2: [(0, 4), (4, 13)], 3: [(0, 2), (2, 9), (9, 13)]}

VOCAB_CASES = [
    {"name": "plain", "options": {}, "targets": "unpadded"},
    {"name": "options", "bias": True,
     "options": {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}},
    {"name": "via_linear_cross_entropy", "via_linear_cross_entropy": True, "bias": True,
     "options": {"ignore_index": -100, "z_loss": 1e-3}},
    {"name": "others_none", "options": {"ignore_index": -100, "label_smoothing": 0.2,
                                        "label_smoothing_mode": "others", "reduction": "none", "weights": True}},
    {"name": "masked_sum", "options": {"reduction": "sum", "mask": True}, "targets": "unpadded"},
    {"name": "bf16", "dtype": "bfloat16", "bias": True,
     "options": {"ignore_index": -100, "reduction": "sum", "dtype": mx.float32}},
    {"name": "compiled", "compile": True,
     "options": {"ignore_index": -100, "label_smoothing": 0.1, "validate": False}},
    {"name": "quantized", "quantized": {"bits": 4, "group_size": 32},
     "options": {"ignore_index": -100, "label_smoothing": 0.1}},
]
DATA_CASES = [
    {"name": "dp_linear", "kind": "linear"},
    {"name": "dp_plain", "kind": "plain"},
    {"name": "dp_linear_sum", "kind": "linear", "gradients": "sum"},
]
BAD_CASES = ["gap", "overlap", "hidden_size", "targets_differ", "options_differ", "unowned",
             "unowned_unvalidated", "reduction", "empty"]


def make_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(22)
    targets = rng.integers(0, V, N)
    targets[[2, 7]] = -100
    hidden = rng.normal(size=(N, H)).astype(np.float32)
    weight = (rng.normal(size=(V, H)) * 0.7).astype(np.float32)
    bias = rng.normal(size=V).astype(np.float32)
    logits = hidden @ weight.T + bias
    # Ties for the maximum across shards (classes 3 and 20: different ranks
    # in both layouts, the later class on the earlier rank with 3 ranks):
    # argmax is the first class, as mx.argmax; rows 0-1 have their target there.
    logits[:4, [3, 20]] = logits[:4].max(axis=1, keepdims=True) + 1.0
    targets[:2] = [3, 20]
    return {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "logits": logits,
        "targets": targets.astype(np.int32),
        "unpadded": np.where(targets == -100, 3, targets).astype(np.int32),  # (no ignore_index needed)
        "mask": rng.random(N) > 0.3,
        "weights": rng.uniform(0.5, 2.0, N).astype(np.float32),
        "cotangent": rng.normal(size=N).astype(np.float32),
    }


def jsonable(case):
    """A case as JSON (an mx.Dtype option as its name)."""
    options = {k: (str(v).split(".")[-1] if isinstance(v, mx.Dtype) else v)
               for k, v in case.get("options", {}).items()}
    return {**case, "options": options}


def run_ranks(tmp_path, processes, cases, *, shards=None):
    """Launch the worker on ``processes`` ranks; every rank's results and errors."""
    arrays = make_inputs()
    np.savez(tmp_path / "inputs.npz", **arrays)
    spec = {"inputs": str(tmp_path / "inputs.npz"), "cases": [jsonable(c) for c in cases], "processes": processes}
    if shards is not None:
        spec["shards"] = shards
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = launch(WORKER, [str(tmp_path / "spec.json"), str(tmp_path)], processes, timeout=TIMEOUT, cwd=tmp_path)
    ranks = []
    for r in range(processes):
        report = tmp_path / f"rank{r}.json"
        assert report.exists(), f"rank {r} wrote nothing:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        info = json.loads(report.read_text())
        assert info["size"] == processes
        unexpected = {k: v for k, v in info["errors"].items() if v.startswith("UNEXPECTED")}
        assert not unexpected, f"rank {r}: {unexpected}"
        results = mx.load(str(tmp_path / f"rank{r}.npz"))
        ranks.append(({k: v for k, v in results.items()}, info["errors"]))
    return ranks


def mx_options(case):
    options = {k: v for k, v in case.get("options", {}).items() if k != "validate"}
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}
    for name in ("mask", "weights"):
        if options.pop(name, False):
            options[name] = inputs[name]
    if isinstance(options.get("dtype"), str):
        options["dtype"] = getattr(mx, options["dtype"])
    return options, inputs


def reference(case, kind):
    """The single-process loss of the full head (this package's unsharded
    losses), its gradients and stats, as NumPy arrays."""
    options, inputs = mx_options(case)
    dtype = getattr(mx, case.get("dtype", "float32"))
    reduction = options.get("reduction", "mean" if kind == "linear" else "none")
    options["reduction"] = reduction
    cot = inputs["cotangent"]
    targets = inputs[case.get("targets", "targets")]

    def scalar(loss):
        return (loss.astype(mx.float32) * cot).sum() if reduction == "none" else loss.astype(mx.float32)

    softcap = options.get("logit_softcap")
    if kind == "linear" and "quantized" in case:
        q = case["quantized"]
        packed, scales, biases = mx.quantize(inputs["weight"], group_size=q["group_size"], bits=q["bits"])
        hidden = inputs["hidden"].astype(dtype)

        def f(hidden):
            loss, stats = fl.linear_cross_entropy(hidden, packed, targets, scales=scales, biases=biases,
                                                  group_size=q["group_size"], bits=q["bits"], return_stats=True,
                                                  **options)
            return scalar(loss), (loss, stats)

        (_, (loss, stats)), d_hidden = mx.value_and_grad(f)(hidden)
        out = {"loss": loss, "d_hidden": d_hidden}
        z = hidden.astype(mx.float32) @ mx.dequantize(packed, scales, biases, group_size=q["group_size"],
                                                      bits=q["bits"]).T
    elif kind == "linear":
        hidden, weight = inputs["hidden"].astype(dtype), inputs["weight"].astype(dtype)
        bias = inputs["bias"].astype(dtype) if case.get("bias") else None

        def f(hidden, weight, bias):
            loss, stats = fl.linear_cross_entropy(hidden, weight, targets, bias, return_stats=True, **options)
            return scalar(loss), (loss, stats)

        (_, (loss, stats)), grads = mx.value_and_grad(f, argnums=(0, 1, 2) if bias is not None else (0, 1))(
            hidden, weight, bias)
        out = {"loss": loss, "d_hidden": grads[0], "d_weight": grads[1]}
        if bias is not None:
            out["d_bias"] = grads[2]
        z = hidden.astype(mx.float32) @ weight.astype(mx.float32).T
        if bias is not None:
            z = z + bias.astype(mx.float32)
    else:
        options.pop("mask", None)
        logits = inputs["logits"].astype(dtype)

        def f(logits):
            loss, stats = fl.cross_entropy(logits, targets, return_stats=True, **options)
            return scalar(loss), (loss, stats)

        (_, (loss, stats)), d_logits = mx.value_and_grad(f)(logits)
        out = {"loss": loss, "d_logits": d_logits}
        z = logits.astype(mx.float32)
    if softcap is not None:
        z = softcap * mx.tanh(z / softcap)
    stats = dict(stats)
    stats["argmax"] = mx.argmax(z, axis=-1)
    out.update({f"stats_{k}": stats[k] for k in STATS})
    lse_scale = float(mx.abs(z).max().item()) + float(np.log(V))
    return {k: to_np(v) for k, v in out.items()}, lse_scale


def check_vocab(ranks, case, kind, shards):
    """Every rank: the full loss and stats, the full d_hidden, its own rows
    of d_weight / d_bias (its columns of d_logits)."""
    ref, lse_scale = reference(case, kind)
    dtype = getattr(mx, case.get("dtype", "float32"))
    out_dtype = mx.float32 if case.get("options", {}).get("dtype") is not None else dtype
    name = f"{kind}_{case['name']}"
    for r, (results, errors) in enumerate(ranks):
        assert name not in errors, errors
        got = {k.split("__", 1)[1]: v for k, v in results.items() if k.startswith(name + "__")}
        start, stop = shards[r]
        # The loss is lse - (smoothed) target logit, formed from float32 row
        # statistics: a few float32 ulps of |lse| per row (and the sum of N rows).
        rows = N if case.get("options", {}).get("reduction") == "sum" else 1
        assert_close(got["loss"], ref["loss"], out_dtype, scale=rows * lse_scale, what=f"{name} rank {r} loss")
        assert_close(got["stats_lse"], ref["stats_lse"], mx.float32, scale=lse_scale, what=f"{name} lse")
        assert_close(got["stats_entropy"], ref["stats_entropy"], mx.float32, scale=lse_scale,
                     what=f"{name} entropy")
        assert np.array_equal(to_np(got["stats_correct"]), ref["stats_correct"]), f"{name} rank {r} correct"
        assert np.array_equal(to_np(got["stats_argmax"]), ref["stats_argmax"]), f"{name} rank {r} argmax"
        if kind == "linear":
            # d_hidden is the all_sum of every rank's part, each rounded to
            # the dtype: its rounding is relative to the parts' magnitudes
            # (bounded by |d logits| @ |weight|), as in any sharded layer.
            parts = None
            if dtype != mx.float32:
                d_logits = reference({**case, "options": {k: v for k, v in case["options"].items() if k != "mask"}},
                                     "logits")[0]["d_logits"]
                parts = np.abs(d_logits) @ np.abs(make_inputs()["weight"].astype(np.float64))
            assert_close(got["d_hidden"], ref["d_hidden"], dtype, scale=1.0, mag=parts,
                         what=f"{name} rank {r} d_hidden")
            if "quantized" in case:  # (a quantized head has no gradient)
                continue
            assert_close(got["d_weight"], ref["d_weight"][start:stop], dtype, scale=1.0,
                         what=f"{name} rank {r} d_weight")
            if "d_bias" in ref:
                assert_close(got["d_bias"], ref["d_bias"][start:stop], dtype, scale=1.0,
                             what=f"{name} rank {r} d_bias")
        else:
            assert_close(got["d_logits"], ref["d_logits"][..., start:stop], dtype, scale=1.0,
                         what=f"{name} rank {r} d_logits")


def logits_case(case):
    """Whether a case has a form on logits (no mask there, no quantized head)."""
    return (not case.get("options", {}).get("mask") and "quantized" not in case and not case.get("compile")
            and not case.get("via_linear_cross_entropy"))


def vocab_cases():
    return [{**c, "name": f"{kind}_{c['name']}", "kind": kind, "mode": "vocab"}
            for kind in ("linear", "logits") for c in VOCAB_CASES if kind == "linear" or logits_case(c)]


@pytest.mark.parametrize("processes", [2, 3])
def test_vocab_parallel_matches_the_full_head(tmp_path, processes):
    shards = SHARDS[processes]
    ranks = run_ranks(tmp_path, processes, vocab_cases(), shards=shards)
    for case in VOCAB_CASES:
        for kind in ("linear", "logits"):
            if kind == "linear" or logits_case(case):
                check_vocab(ranks, case, kind, shards)


@pytest.mark.parametrize("processes", [2, 3])
def test_data_parallel_global_mean(tmp_path, processes):
    """global_mean + average_gradients (or all-summed gradients with
    gradients="sum") equals the single-process mean over the whole batch,
    where the ranks keep different numbers of tokens."""
    cases = [{**c, "mode": "data", "rows": BATCH_ROWS[processes]} for c in DATA_CASES]
    ranks = run_ranks(tmp_path, processes, cases)
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}
    kept = [int((inputs["targets"][lo:hi] != -100).sum().item()) for lo, hi in BATCH_ROWS[processes]]
    assert len(set(kept)) == processes  # the mean of per-rank means would differ

    def full(weight, bias):
        return fl.linear_cross_entropy(inputs["hidden"], weight, inputs["targets"], bias, ignore_index=-100)

    loss, (d_weight, d_bias) = mx.value_and_grad(full, argnums=(0, 1))(inputs["weight"], inputs["bias"])
    for case in cases:
        for r, (results, errors) in enumerate(ranks):
            got = {k.split("__", 1)[1]: v for k, v in results.items() if k.startswith(case["name"] + "__")}
            assert_close(got["loss"], to_np(loss), mx.float32, what=f"{case['name']} rank {r} loss")
            assert_close(got["d_weight"], to_np(d_weight), mx.float32, scale=1.0, what=f"{case['name']} d_weight")
            assert_close(got["d_bias"], to_np(d_bias), mx.float32, scale=1.0, what=f"{case['name']} d_bias")


EXPECTED_ERRORS = {
    # case: (rank 0's error, rank 1's error); None: no error
    "gap": ("must tile [0, V)", "must tile [0, V)"),
    "overlap": ("must tile [0, V)", "must tile [0, V)"),
    "hidden_size": ("rank(s) [1] rejected their arguments: rank 1: ValueError: weight's shard",
                    "ValueError: weight's shard [V_r, H] = (15, 31) does not match hidden's H = 32"),
    "targets_differ": ("hold different targets", "hold different targets"),
    "options_differ": ("different shapes, dtypes or options", "different shapes, dtypes or options"),
    "unowned": ("1 target(s) lie outside [0, 31)", "1 target(s) lie outside [0, 31)"),
    "unowned_unvalidated": (None, None),
    "reduction": ("ValueError: reduction must be one of", "rank(s) [0] rejected their arguments"),
    "empty": (None, None),
}


def test_bad_input_raises_on_every_rank_and_never_hangs(tmp_path):
    cases = [{"name": how, "how": how, "mode": "bad"} for how in BAD_CASES]
    ranks = run_ranks(tmp_path, 2, cases, shards=SHARDS[2])
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}
    good = to_np(fl.linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], ignore_index=-100))
    for how in BAD_CASES:
        for r, (results, errors) in enumerate(ranks):
            expected = EXPECTED_ERRORS[how][r]
            if expected is None:
                assert how not in errors, errors[how]
            else:
                assert expected in errors.get(how, "(no error)"), f"{how} rank {r}: {errors.get(how)}"
            assert_close(results[f"{how}__good"], good, mx.float32, what=f"the good call after {how}, rank {r}")
    # Unvalidated, the row whose target no shard holds is NaN, as an
    # out-of-range class in the unsharded loss; the other rows are finite.
    for results, _ in ranks:
        rows = to_np(results["unowned_unvalidated__loss"])
        assert np.isnan(rows[-1]) and np.isfinite(rows[:-1]).all(), rows
        assert to_np(results["empty__loss"]) == 0.0


# ---- in this process: a group of size 1 --------------------------------------------------------


def test_a_group_of_size_one_is_the_unsharded_loss():
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}
    group = mx.distributed.init()
    assert group.size() == 1
    args = (inputs["hidden"], inputs["weight"], inputs["targets"], inputs["bias"])
    options = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}
    loss, grads = mx.value_and_grad(
        lambda h, w, b: fld.vocab_parallel_linear_cross_entropy(h, w, args[2], b, vocab_start=0, **options),
        argnums=(0, 1, 2))(args[0], args[1], args[3])
    ref, ref_grads = mx.value_and_grad(
        lambda h, w, b: fl.linear_cross_entropy(h, w, args[2], b, **options), argnums=(0, 1, 2))(
        args[0], args[1], args[3])
    scale = float(mx.abs(args[0] @ args[1].T).max().item()) + np.log(V)
    assert_close(loss, to_np(ref), mx.float32, scale=scale, what="loss")
    for got, want, what in zip(grads, ref_grads, ("d_hidden", "d_weight", "d_bias")):
        assert_close(got, to_np(want), mx.float32, scale=1.0, what=what)
    logits = args[0] @ args[1].T
    assert_close(fld.vocab_parallel_cross_entropy(logits, args[2], vocab_start=0, ignore_index=-100),
                 to_np(fl.cross_entropy(logits, args[2], ignore_index=-100)), mx.float32, scale=scale,
                 what="logits rows")
    # Alone, a rank must hold the whole head.
    with pytest.raises(ValueError, match=r"must tile \[0, V\).*rank 0: \[1, 32\)"):
        fld.vocab_parallel_linear_cross_entropy(*args[:3], vocab_start=1)
    with pytest.raises(ValueError, match=r"1 target\(s\) lie outside \[0, 30\)"):
        fld.vocab_parallel_linear_cross_entropy(args[0], args[1][:30], args[2], vocab_start=0, ignore_index=-100)
    # and the data-parallel mean is the plain mean
    total = fl.linear_cross_entropy(*args[:3], ignore_index=-100, reduction="sum")
    assert_close(fld.global_mean(total, (args[2] != -100).sum()), to_np(ref * 0 + fl.linear_cross_entropy(
        *args[:3], ignore_index=-100)), mx.float32, what="global_mean")


def test_global_mean_of_an_infinite_total_is_infinite():
    """An overflowing rank's loss shows as inf, not NaN (inf - inf in the
    gradient-only term made it NaN); finite elements keep their gradient
    1 / count, also in a shapeless compile at a second size."""
    mx.distributed.init()
    step = mx.value_and_grad(lambda t: fld.global_mean(t, 2))
    shapeless = mx.compile(step, shapeless=True)
    for f in (step, shapeless):
        for total, want, grad in ((mx.array([1e30, mx.inf]), np.inf, [0.5, 0.0]),
                                  (mx.array([3.0, 5.0]), 4.0, [0.5, 0.5]),
                                  (mx.array([3.0, 5.0, 1.0]), 4.5, [0.5, 0.5, 0.5])):
            value, got = f(total)
            assert to_np(value) == want
            np.testing.assert_array_equal(to_np(got), grad)


def test_local_argument_errors_alone():
    """Alone (no collective to wait in), a bad argument raises at once, with
    the unsharded loss's message."""
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}
    with pytest.raises(ValueError, match="vocab_start .* must be >= 0"):
        fld.vocab_parallel_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], vocab_start=-1)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        fld.vocab_parallel_cross_entropy(inputs["hidden"], inputs["targets"], vocab_start=0.5)
    with pytest.raises(ValueError, match="bias must be this rank's"):
        fld.vocab_parallel_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"],
                                                inputs["bias"][:3], vocab_start=0)
    with pytest.raises(ValueError, match="probability targets are not supported"):
        fld.vocab_parallel_cross_entropy(inputs["hidden"], inputs["hidden"], vocab_start=0)
    with pytest.raises(TypeError, match="pass vocab_start= too"):
        fl.linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], group=mx.distributed.init())
    with pytest.raises(TypeError, match="group must be"):
        fld.vocab_parallel_cross_entropy(inputs["hidden"], inputs["targets"], vocab_start=0, group=2)
    with pytest.raises(ValueError, match="gradients must be one of"):
        fld.global_mean(mx.array(1.0), 1, gradients="mean")


def test_validation_under_compile_says_what_to_do():
    inputs = {k: mx.array(v) for k, v in make_inputs().items()}

    def f(h, w, t):
        return fld.vocab_parallel_linear_cross_entropy(h, w, t, vocab_start=0, ignore_index=-100)

    with pytest.raises(ValueError, match="pass validate=False inside them"):
        mx.compile(f)(inputs["hidden"], inputs["weight"], inputs["targets"])

    def g(h, w, t):
        return fld.vocab_parallel_linear_cross_entropy(h, w, t, vocab_start=0, ignore_index=-100, validate=False)

    assert_close(mx.compile(g)(inputs["hidden"], inputs["weight"], inputs["targets"]),
                 to_np(f(inputs["hidden"], inputs["weight"], inputs["targets"])), mx.float32, what="compiled")


def test_the_launcher_times_out_and_kills_every_rank(tmp_path):
    """A rank that never finishes cannot hang the suite."""
    script = tmp_path / "stall.py"
    script.write_text("import os, time, mlx.core as mx\ng = mx.distributed.init()\n"
                      "open(f'started{g.rank()}', 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        launch(script, [], 2, timeout=5.0, cwd=tmp_path)
    started = sorted(tmp_path.glob("started*"))
    assert [p.name for p in started] == ["started0", "started1"]
    for p in started:  # gone (reaped by init once their parent was killed)
        pid = int(p.read_text())
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"rank process {pid} outlived the timeout")
