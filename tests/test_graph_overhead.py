"""The graphs our ops build carry no copy node an input does not need.

At small shapes (32 x 10 logits) each node of the graph costs about a
microsecond to build and evaluate, as much as the kernel itself, and issue 9
asks that no loss be slower than mlx.nn.losses there. An input that is already
dense (evaluated and row-contiguous, or a Copy/AsType of one, as mx.vjp and
the index cast make them) needs no Contiguous node in front of the kernel;
one that is not dense still gets it, and every layout gives the same bits.
"""

import io

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_losses as fl

LOSSES = {
    "cross_entropy": (lambda x, t: fl.cross_entropy(x, t, label_smoothing=0.1, reduction="mean"), True),
    "cross_entropy_hard": (lambda x, t: fl.cross_entropy(x, t, reduction="mean"), True),
    "softmax_focal": (lambda x, t: fl.softmax_focal_loss(x, t, reduction="mean"), True),
    "smooth_l1": (lambda p, t: fl.smooth_l1_loss(p, t, reduction="mean"), False),
    "huber": (lambda p, t: fl.huber_loss(p, t, reduction="mean"), False),
    "sigmoid_focal": (lambda p, t: fl.sigmoid_focal_loss(p, t, reduction="mean"), False),
}


def _primitives(*outputs):
    """Names of the primitives in the graph of ``outputs`` (nothing evaluated)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return [line.split('label ="')[1].split('"')[0] for line in dot.getvalue().splitlines() if 'label ="' in line]


def _inputs(rowwise, rows=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    if rowwise:
        x = mx.array(rng.standard_normal((rows, classes)).astype(np.float32))
        t = mx.array(rng.integers(0, classes, rows).astype(np.int32))
    else:
        x = mx.array(rng.standard_normal(rows * classes).astype(np.float32))
        t = mx.array(rng.random(rows * classes).astype(np.float32))
    mx.eval(x, t)
    return x, t


@pytest.mark.parametrize("name", LOSSES)
def test_dense_inputs_get_no_contiguous_node(name):
    loss, rowwise = LOSSES[name]
    x, t = _inputs(rowwise)
    assert "Contiguous" not in _primitives(loss(x, t))
    # Under mx.value_and_grad the primals arrive as Copy nodes of the dense
    # inputs: no Contiguous for them either. Cross-entropy's backward keeps
    # one, for the per-row cotangent that the mean's vjp broadcasts.
    value, grad = mx.value_and_grad(loss)(x, t)
    expected = 1 if rowwise else 0
    assert _primitives(value, grad).count("Contiguous") == expected


@pytest.mark.parametrize("name", LOSSES)
def test_every_layout_gives_the_same_bits(name):
    """Views that are dense at an offset, strided views, and a small view of a
    large buffer (which MLX's Contiguous copies rather than keep the large
    buffer alive): loss and gradient equal those of a fresh dense copy."""
    loss, rowwise = LOSSES[name]
    big_x, big_t = _inputs(rowwise, rows=4096, classes=10, seed=1)
    if rowwise:
        views = {"offset rows": (big_x[5:37], big_t[5:37]),
                 "strided rows": (big_x[1:65:2], big_t[1:65:2]),
                 "small view of a big buffer": (big_x[4000:4032], big_t[4000:4032])}
    else:
        views = {"offset": (big_x[7:327], big_t[7:327]),
                 "strided": (big_x[1:641:2], big_t[1:641:2]),
                 "small view of a big buffer": (big_x[40000:40320], big_t[40000:40320])}
    grad_fn = mx.value_and_grad(loss)
    # Compiled, the layouts are unknown while tracing: what the op decides
    # there must hold for every layout the compiled function then meets.
    compiled_loss, compiled_grad_fn = mx.compile(loss), mx.compile(grad_fn)
    for what, (x, t) in views.items():
        fresh_x, fresh_t = mx.array(np.array(x)), mx.array(np.array(t))
        value, grad = grad_fn(x, t)
        fresh_value, fresh_grad = grad_fn(fresh_x, fresh_t)
        fresh_loss = np.array(loss(fresh_x, fresh_t))
        assert np.array_equal(np.array(loss(x, t)), fresh_loss), what
        assert np.array_equal(np.array(compiled_loss(x, t)), fresh_loss), what
        assert np.array_equal(np.array(value), np.array(fresh_value)), what
        assert np.array_equal(np.array(grad), np.array(fresh_grad)), what
        compiled_value, compiled_grad = compiled_grad_fn(x, t)
        assert np.array_equal(np.array(compiled_value), np.array(fresh_value)), what
        assert np.array_equal(np.array(compiled_grad), np.array(fresh_grad)), what
        # The caller's arrays are untouched (no gradient written over them).
        assert np.array_equal(np.array(x), np.array(fresh_x)), what


def test_compiled_and_vmapped_calls_still_copy_what_they_must():
    """Under mx.compile and mx.vmap the inputs' layouts are not known while
    tracing: the Contiguous node stays, and results match the eager ones."""
    loss, _ = LOSSES["cross_entropy"]
    x, t = _inputs(True)
    xt = mx.array(np.array(x).T.copy()).T  # a transposed (column-major) view
    eager = loss(xt, t)
    assert np.array_equal(np.array(mx.compile(loss)(xt, t)), np.array(eager))
    batched = mx.vmap(lambda x, t: fl.cross_entropy(x, t), in_axes=(1, None))(
        mx.stack([x, x], axis=1), t)
    assert np.array_equal(np.array(batched[0]), np.array(fl.cross_entropy(x, t)))
