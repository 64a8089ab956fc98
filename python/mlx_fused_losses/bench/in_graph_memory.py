"""Peak memory when the logits are an intermediate of the differentiated
function, as in a training step: f(x) = loss(2 * x, targets) under
mx.value_and_grad. Nothing but the backward needs 2 * x after the forward, so
our gradient can be written over it (csrc/cpu/output_buffer.cpp): the peak
above the inputs is ~1x the logits' size (target: <= 1.1x)."""

import mlx.core as mx

from .cases import DTYPES, LOSSES
from .timing import measure

SHAPES = {
    "full": {"cross_entropy": (4096, 32768), "smooth_l1": (64 * 2**20,)},
    "quick": {"cross_entropy": (1024, 8192), "smooth_l1": (2**20,)},
    "smoke": {"cross_entropy": (64, 512), "smooth_l1": (16384,)},
}


def run_in_graph_memory(sweep, policy, loss_names, dtype_name="float32"):
    records = []
    for name, shape in SHAPES[sweep].items():
        if name not in loss_names:
            continue
        spec = LOSSES[name]
        mx.random.seed(0)
        x, second = spec.make_inputs(shape, DTYPES[dtype_name])
        mx.eval(x, second)
        record = {"loss": name, "dtype": dtype_name, "shape": list(shape),
                  "logits_mb": x.nbytes / 1e6, "function": "loss(2 * x, targets)"}
        for impl, loss in (("ours", spec.ours), ("mlx", spec.reference)):
            step = mx.value_and_grad(lambda x, s, loss=loss: loss(2 * x, s))
            mx.synchronize()
            base = mx.get_active_memory()  # the inputs
            timing, peak = measure(lambda: step(x, second), policy)
            record[impl] = {"median_ms": timing.median_ms, "peak_above_inputs_mb": (peak - base) / 1e6,
                            "peak_over_logits": (peak - base) / x.nbytes}
        records.append(record)
        del x, second
        mx.clear_cache()
    return records
