"""Where the CPU kernels' outputs live (csrc/cpu/output_buffer.cpp).

* A fresh large output is huge-page advised: one forward+backward at
  2048 x 32768 float32 takes a small fraction of the 65,537 minor page faults
  that a 4 KB-paged 268 MB gradient costs under MLX's default cache limit.
* The gradient in place: when nothing but the backward needs the logits (or
  the first input of an element-wise loss), the gradient is written over
  them, so forward+backward needs ~1x the logits' memory above the inputs.
* Where the caller (or another part of the graph) still needs them, the
  gradient is a separate, correct array and the logits are untouched.
"""

import resource
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from conftest import assert_close, to_np

fl = pytest.importorskip("mlx_fused_losses")

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode():
    if not sys.platform.startswith("linux"):
        return None, "huge-page advice is Linux only"
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None, f"{THP_ENABLED} is unreadable (kernel without transparent huge pages)"
    mode = text[text.index("[") + 1: text.index("]")]
    if mode not in ("always", "madvise"):
        return None, f"transparent huge pages are '{mode}' here: 4 KB pages are all there is"
    return mode, ""


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---- page faults ------------------------------------------------------------

def _ce_mean(x, t):
    return fl.cross_entropy(x, t, label_smoothing=0.1, reduction="mean")


def _smooth_l1_mean(x, y):
    return fl.smooth_l1_loss(x, y, reduction="mean")


@pytest.mark.parametrize("loss, shape", [(_ce_mean, (2048, 32768)), (_smooth_l1_mean, (2048 * 32768,))],
                         ids=["cross_entropy", "smooth_l1"])
def test_fresh_gradient_takes_few_page_faults(loss, shape):
    mode, reason = _thp_mode()
    if mode is None:
        pytest.skip(reason)
    mx.random.seed(0)
    x = mx.random.normal(shape)
    second = mx.random.randint(0, shape[-1], shape[:-1]) if len(shape) == 2 else mx.random.normal(shape)
    mx.eval(x, second)
    step = mx.value_and_grad(loss)
    mx.eval(step(x, second))  # first call: thread pool, code pages
    pages_4k = x.nbytes // 4096 + 1  # what a 4 KB-paged gradient costs: 65,537
    before = _minor_faults()
    value, grad = step(x, second)  # the caller keeps x: the gradient is a fresh buffer
    mx.eval(value, grad)
    faults = _minor_faults() - before
    assert faults < 0.05 * pages_4k, f"{faults} minor faults for one fwd+bwd (4 KB pages: {pages_4k})"


# ---- the gradient in place ---------------------------------------------------

ROWS, CLASSES = 512, 4096  # 8 MB of float32 logits: above the size where reuse waits for the stream


def _peak_above_inputs(fn, *inputs):
    mx.eval(*inputs)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn(*inputs)
    mx.eval(out)
    return out, mx.get_peak_memory() - base


def _class_inputs(rng, dtype=mx.float32):
    x = mx.array(rng.standard_normal((ROWS, CLASSES)).astype(np.float32)).astype(dtype)
    t = mx.array(rng.integers(0, CLASSES, ROWS).astype(np.int32))
    return x, t


# (name, loss(z, second) with reduction="mean", float64 gradient of it at z, second input)
def _ce_case(rng, dtype):
    x, t = _class_inputs(rng, dtype)
    kw = dict(label_smoothing=0.1, reduction="mean")
    return (x, t, lambda z, t: fl.cross_entropy(z, t, **kw),
            lambda z, t: ref.cross_entropy_grad(to_np(z), to_np(t), **kw))


def _softmax_focal_case(rng, dtype):
    x, t = _class_inputs(rng, dtype)
    kw = dict(gamma=2.0, reduction="mean")
    return (x, t, lambda z, t: fl.softmax_focal_loss(z, t, **kw),
            lambda z, t: ref.softmax_focal_grad(to_np(z), to_np(t), **kw))


def _smooth_l1_case(rng, dtype):
    x = mx.array(rng.standard_normal(ROWS * CLASSES).astype(np.float32)).astype(dtype)
    y = mx.array(rng.standard_normal(ROWS * CLASSES).astype(np.float32)).astype(dtype)
    return (x, y, lambda z, y: fl.smooth_l1_loss(z, y, reduction="mean"),
            lambda z, y: ref.smooth_l1_grad(to_np(z), to_np(y), reduction="mean"))


def _sigmoid_focal_case(rng, dtype):
    x = mx.array(rng.standard_normal(ROWS * CLASSES).astype(np.float32)).astype(dtype)
    y = mx.array((rng.random(ROWS * CLASSES) < 0.1).astype(np.float32)).astype(dtype)
    return (x, y, lambda z, y: fl.sigmoid_focal_loss(z, y, reduction="mean"),
            lambda z, y: ref.sigmoid_focal_grad(to_np(z), to_np(y), reduction="mean"))


CASES = {
    "cross_entropy": (_ce_case, mx.float32),
    "cross_entropy_bf16": (_ce_case, mx.bfloat16),
    "softmax_focal": (_softmax_focal_case, mx.float32),
    "smooth_l1": (_smooth_l1_case, mx.float32),
    "sigmoid_focal": (_sigmoid_focal_case, mx.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_intermediate_logits_are_overwritten_by_their_gradient(rng, name):
    make, dtype = CASES[name]
    x, second, loss, grad_ref = make(rng, dtype)
    step = mx.value_and_grad(lambda x, s: loss(2 * x, s))  # the logits exist only inside
    step(x, second)  # warm the allocator's small buffers
    (value, grad), peak = _peak_above_inputs(step, x, second)
    assert peak <= 1.1 * x.nbytes, f"peak {peak / x.nbytes:.2f}x the logits above the inputs"
    # d/dx loss(2x) = 2 loss'(2x); 2x is exact in every dtype.
    assert_close(grad, 2.0 * grad_ref(2 * x, second), dtype, what=f"{name} in-place gradient")


@pytest.mark.parametrize("name", ["cross_entropy", "smooth_l1"])
def test_logits_the_caller_keeps_are_untouched(rng, name):
    make, dtype = CASES[name]
    x, second, loss, grad_ref = make(rng, dtype)
    before = np.array(x)
    value, grad = mx.value_and_grad(loss)(x, second)
    mx.eval(value, grad)
    assert np.array_equal(np.array(x), before)
    assert_close(grad, grad_ref(x, second), dtype, what=f"{name} gradient of kept logits")


def test_logits_returned_from_the_differentiated_function_are_untouched(rng):
    make, dtype = CASES["cross_entropy"]
    x, t, loss, grad_ref = make(rng, dtype)
    (value, z), grad = mx.value_and_grad(lambda x: (loss(2 * x, t), 2 * x))(x)
    mx.eval(value, z, grad)
    assert np.array_equal(np.array(z), 2.0 * np.array(x))
    assert_close(grad, 2.0 * grad_ref(2 * x, t), dtype, what="gradient with the logits returned")


def test_logits_used_again_in_the_graph_keep_their_values(rng):
    # z feeds a second term whose gradient reads z after ours is computed:
    # the gradient must not have been written over z.
    make, dtype = CASES["cross_entropy"]
    x, t, loss, grad_ref = make(rng, dtype)

    def total(x):
        z = 2 * x
        return loss(z, t) + 0.5 * mx.mean(z * z)

    grad = mx.grad(total)(x)
    z64 = 2.0 * to_np(x)
    expected = 2.0 * (grad_ref(2 * x, t) + z64 / z64.size)
    assert_close(grad, expected, dtype, what="gradient with the logits used twice")


def test_in_place_gradient_on_another_stream_and_compiled(rng):
    make, dtype = CASES["cross_entropy"]
    x, t, _, grad_ref = make(rng, dtype)
    stream = mx.new_stream(mx.cpu)

    def step(x):
        return fl.cross_entropy(2 * x, t, label_smoothing=0.1, reduction="mean", stream=stream)

    expected = 2.0 * grad_ref(2 * x, t)
    assert_close(mx.grad(step)(x), expected, dtype, what="on a second CPU stream")
    assert_close(mx.compile(mx.grad(step))(x), expected, dtype, what="compiled")
