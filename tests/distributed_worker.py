"""One rank of the distributed tests, run by ``mlx.launch`` (tests/distributed_launch.py):
``python distributed_worker.py SPEC.json OUT_DIR``.

SPEC holds the inputs file (an .npz the test wrote: the full head, the
hidden states, targets, ...), every rank's shard ``[start, stop)`` and the
cases. Each rank writes ``OUT_DIR/rank{r}.npz`` (its results) and
``OUT_DIR/rank{r}.json`` (the errors it caught, and "done" last), which the
test compares with the single-process loss on the full head.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients

import mlx_fused_losses as fl
import mlx_fused_losses.distributed as fld

STATS = ("lse", "entropy", "correct", "argmax")


def vocab_case(case, inputs, group, start, stop):
    """Loss, gradients and stats of one vocabulary-parallel case."""
    dtype = getattr(mx, case.get("dtype", "float32"))
    options = dict(case.get("options", {}))
    if "dtype" in options:
        options["dtype"] = getattr(mx, options["dtype"])
    for name in ("mask", "weights"):
        if options.pop(name, False):
            options[name] = inputs[name]
    targets = inputs[case.get("targets", "targets")]
    cot = inputs["cotangent"]
    # (the defaults of the unsharded losses: "mean" for the linear one, "none" on logits)
    reduction = options.get("reduction", "mean" if case["kind"] == "linear" else "none")
    use_bias = case.get("bias", False)

    def scalar(loss):
        return (loss.astype(mx.float32) * cot).sum() if reduction == "none" else loss.astype(mx.float32)

    if case["kind"] == "linear" and "quantized" in case:
        # Rows are quantized independently (groups run along H): the shard of
        # the quantized head is the quantized shard.
        q = case["quantized"]
        packed, scales, biases = mx.quantize(inputs["weight"], group_size=q["group_size"], bits=q["bits"])

        def f(hidden):
            loss, stats = fld.vocab_parallel_linear_cross_entropy(
                hidden, packed[start:stop], targets, vocab_start=start, group=group, scales=scales[start:stop],
                biases=biases[start:stop], group_size=q["group_size"], bits=q["bits"], return_stats=True,
                **options)
            return scalar(loss), (loss, stats)

        (_, (loss, stats)), d_hidden = mx.value_and_grad(f)(inputs["hidden"].astype(dtype))
        out = {"loss": loss, "d_hidden": d_hidden}
    elif case["kind"] == "linear":
        hidden = inputs["hidden"].astype(dtype)
        weight = inputs["weight"][start:stop].astype(dtype)
        bias = inputs["bias"][start:stop].astype(dtype) if use_bias else None

        # (fl.linear_cross_entropy with vocab_start= and group= is the same function)
        loss_fn = fl.linear_cross_entropy if case.get("via_linear_cross_entropy") else \
            fld.vocab_parallel_linear_cross_entropy

        def f(hidden, weight, bias):
            loss, stats = loss_fn(hidden, weight, targets, bias, vocab_start=start, group=group, return_stats=True,
                                  **options)
            return scalar(loss), (loss, stats)

        step = mx.value_and_grad(f, argnums=(0, 1, 2) if use_bias else (0, 1))
        if case.get("compile"):  # (twice: the second call runs the compiled graph)
            step = mx.compile(step)
            mx.eval(step(hidden, weight, bias))
        (_, (loss, stats)), grads = step(hidden, weight, bias)
        out = {"loss": loss, "d_hidden": grads[0], "d_weight": grads[1]}
        if use_bias:
            out["d_bias"] = grads[2]
    else:
        logits = inputs["logits"][..., start:stop].astype(dtype)

        def f(logits):
            loss, stats = fld.vocab_parallel_cross_entropy(
                logits, targets, vocab_start=start, group=group, return_stats=True, **options)
            return scalar(loss), (loss, stats)

        (_, (loss, stats)), d_logits = mx.value_and_grad(f)(logits)
        out = {"loss": loss, "d_logits": d_logits}
    out.update({f"stats_{k}": stats[k] for k in STATS})
    return out


def data_parallel_case(case, inputs, group):
    """One data-parallel training step: this rank's slice of the batch,
    global_mean, then average_gradients."""
    rank = group.rank()
    lo, hi = case["rows"][rank]
    targets = inputs["targets"][lo:hi]
    hidden = inputs["hidden"][lo:hi]
    model = nn.Linear(inputs["weight"].shape[1], inputs["weight"].shape[0], bias=True)
    model.update({"weight": inputs["weight"], "bias": inputs["bias"]})

    def loss_fn(model, hidden, targets):
        kept = (targets != -100).sum()
        if case["kind"] == "linear":
            total = fl.linear_cross_entropy(hidden, model.weight, targets, model.bias, ignore_index=-100,
                                            reduction="sum")
        else:
            total = fl.cross_entropy(model(hidden), targets, ignore_index=-100, reduction="sum")
        return fld.global_mean(total, kept, group=group, gradients=case.get("gradients", "average"))

    loss, grads = nn.value_and_grad(model, loss_fn)(model, hidden, targets)
    if case.get("gradients", "average") == "average":
        grads = average_gradients(grads, group=group)
    else:
        grads = {k: mx.distributed.all_sum(v, group=group) for k, v in grads.items()}
    return {"loss": loss, "d_weight": grads["weight"], "d_bias": grads["bias"]}


def bad_case(case, inputs, group, start, stop):
    """A call that must raise on every rank (or, unvalidated, give NaN);
    then a good call, which shows that the ranks are still in step."""
    rank = group.rank()
    targets = inputs["targets"]
    hidden = inputs["hidden"]
    weight = inputs["weight"][start:stop]
    options = {"ignore_index": -100}
    vocab_start = start
    how = case["how"]
    if how == "gap" and rank == 1:
        vocab_start = start + 1
    elif how == "overlap" and rank == 1:
        vocab_start = start - 1
    elif how == "hidden_size" and rank == 1:
        weight = weight[:, :-1]
    elif how == "targets_differ" and rank == 0:
        targets = mx.where(targets == -100, targets, (targets + 1) % inputs["weight"].shape[0])
    elif how == "options_differ" and rank == 1:
        options["label_smoothing"] = 0.1
    elif how == "unowned":
        targets = mx.concatenate([targets[:-1], mx.array([inputs["weight"].shape[0]], targets.dtype)])
    elif how == "unowned_unvalidated":
        targets = mx.concatenate([targets[:-1], mx.array([inputs["weight"].shape[0]], targets.dtype)])
        options["validate"] = False
        options["reduction"] = "none"
    elif how == "empty":  # no rows on any rank: loss 0 (a mean over nothing), no collective of 0 rows
        hidden, targets = hidden[:0], targets[:0]
    elif how == "reduction" and rank == 0:
        options["reduction"] = "avg"
    out, error = {}, None
    try:
        loss = fld.vocab_parallel_linear_cross_entropy(hidden, weight, targets, vocab_start=vocab_start,
                                                       group=group, **options)
        out["loss"] = loss
        mx.eval(loss)
    except (ValueError, TypeError) as err:
        error = f"{type(err).__name__}: {err}"
    good = fld.vocab_parallel_linear_cross_entropy(inputs["hidden"], inputs["weight"][start:stop], inputs["targets"],
                                                   vocab_start=start, group=group, ignore_index=-100)
    out["good"] = good
    return out, error


def wait_for_peers(out_dir: Path, processes: int, timeout: float = 60.0):
    """Enter mx.distributed.init() together: the ring backend's connect
    retries back off exponentially (1 s, 2 s, 4 s, ...), so a rank that
    starts a few seconds after the others (a loaded machine) would cost tens
    of seconds; here each rank waits, after its imports, until every rank
    has got this far."""
    (out_dir / f"ready{os.environ['MLX_RANK']}").touch()
    deadline = time.monotonic() + timeout
    while sum(1 for _ in out_dir.glob("ready*")) < processes and time.monotonic() < deadline:
        time.sleep(0.01)


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    wait_for_peers(out_dir, spec["processes"])
    group = mx.distributed.init()
    rank = group.rank()
    inputs = mx.load(spec["inputs"])
    start, stop = spec["shards"][rank] if "shards" in spec else (0, 0)
    results, errors = {}, {}
    for case in spec["cases"]:
        name = case["name"]
        try:
            if case["mode"] == "vocab":
                out = vocab_case(case, inputs, group, start, stop)
            elif case["mode"] == "data":
                out = data_parallel_case(case, inputs, group)
            else:
                out, error = bad_case(case, inputs, group, start, stop)
                if error is not None:
                    errors[name] = error
        except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
            errors[name] = "UNEXPECTED " + traceback.format_exc()
            break
        mx.eval(out)
        results.update({f"{name}__{k}": v for k, v in out.items()})
    mx.savez(str(out_dir / f"rank{rank}.npz"), **results)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"errors": errors, "size": group.size(), "done": True}))


if __name__ == "__main__":
    main()
