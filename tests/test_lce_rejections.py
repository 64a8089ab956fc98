"""linear_cross_entropy's refusals that had no test: each raise site of
python/mlx_fused_losses/linear_cross_entropy.py, reached with the
combination it refuses, must raise the documented exception, naming the
argument, when the call is made (before any kernel runs: nothing is
evaluated)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_raises_naming

fl = pytest.importorskip("mlx_fused_losses")

N, H, V = 4, 64, 6


@pytest.fixture
def head():
    rng = np.random.default_rng(0)
    hidden = mx.array(rng.standard_normal((N, H)).astype(np.float32))
    weight = mx.array(rng.standard_normal((V, H)).astype(np.float32))
    targets = mx.array(np.array([0, 1, 2, 5], np.int32))
    w_q, scales, biases = mx.quantize(weight, group_size=64, bits=4)
    probs = mx.softmax(mx.array(rng.standard_normal((N, V)).astype(np.float32)), axis=-1)
    return dict(hidden=hidden, weight=weight, targets=targets, quantized=dict(weight=w_q, scales=scales,
                biases=biases), probs=probs, cw=mx.array(np.linspace(0.5, 2.0, V).astype(np.float32)))


def lce(h, **kw):
    return fl.linear_cross_entropy(h["hidden"], kw.pop("weight", h["weight"]), kw.pop("targets", h["targets"]),
                                   **kw)


@pytest.mark.parametrize("terms", [dict(label_smoothing=0.1), dict(z_loss=1e-3),
                                   dict(label_smoothing=0.1, z_loss=1e-3)], ids=["smoothing", "z", "both"])
def test_quantized_head_with_class_weights_and_smoothing_or_z(head, terms):
    # Their terms are linear sums over the dense head: a quantized one is refused.
    err = assert_raises_naming(ValueError, ["quantized", "dense head"], lce, head, **head["quantized"],
                               class_weights=head["cw"], **terms)
    assert "class_weights" in str(err)
    # ... while class weights alone run in the fused kernel on any head.
    lce(head, **head["quantized"], class_weights=head["cw"])


def test_quantized_head_with_probability_targets(head):
    assert_raises_naming(ValueError, ["quantized", "dense head"], lce, head, **head["quantized"],
                         targets=head["probs"])


@pytest.mark.parametrize("option,value", [("mask", "mask"), ("shift", 1), ("token_scaling", True)])
@pytest.mark.parametrize("kind", ["class_weights", "probability targets"])
def test_row_options_with_class_weights_or_probabilities(head, option, value, kind):
    if value == "mask":
        value = mx.array([True, True, False, True])
    kw = dict(class_weights=head["cw"]) if kind == "class_weights" else dict(targets=head["probs"])
    err = assert_raises_naming(ValueError, option, lce, head, **kw, **{option: value})
    assert kind in str(err)


def test_mask_shift_token_scaling_together_with_class_weights(head):
    # The three at once: the first refusal names its option and the class weights.
    err = assert_raises_naming(ValueError, ["token_scaling", "shift", "mask"], lce, head, class_weights=head["cw"],
                               mask=mx.array([True] * N), shift=1, token_scaling=True)
    assert "class_weights" in str(err)


def test_class_weights_dtype(head):
    assert_raises_naming(TypeError, "class_weights", lce, head, class_weights=mx.ones((V,), mx.int32))


def test_return_stats_with_probability_targets(head):
    assert_raises_naming(ValueError, "return_stats", lce, head, targets=head["probs"], return_stats=True)


@pytest.mark.parametrize("weights", [mx.ones((N,), mx.int32), mx.ones((N + 1,))], ids=["int", "shape"])
def test_per_token_weights_with_class_weights(head, weights):
    assert_raises_naming(ValueError, "weights", lce, head, class_weights=head["cw"], weights=weights,
                         label_smoothing=0.1)


@pytest.mark.parametrize("mode,exc", [(1, TypeError), ("int4", ValueError)])
def test_quantization_mode(head, mode, exc):
    assert_raises_naming(exc, "mode", lce, head, **head["quantized"], mode=mode)


@pytest.mark.parametrize("option,value", [("shift", 1), ("token_scaling", True), ("class_weights", "cw"),
                                          ("filter_eps", 1e-6)])
def test_sharded_head_refuses_unsharded_options(head, option, value):
    value = head["cw"] if value == "cw" else value
    err = assert_raises_naming(ValueError, option, lce, head, vocab_start=0, **{option: value})
    assert "vocab_start" in str(err)


def test_group_without_vocab_start(head):
    assert_raises_naming(TypeError, "vocab_start", lce, head, group=object())


def test_probability_targets_with_a_nonnegative_ignore_index(head):
    assert_raises_naming(ValueError, "ignore_index", lce, head, targets=head["probs"], ignore_index=0)


def test_float_targets_of_the_rows_shape_are_not_class_indices(head):
    assert_raises_naming(TypeError, "targets", lce, head, targets=mx.zeros((N,)))
