"""Train a small MLP on scikit-learn's digits with three losses and compare them.

Runs, all from the same seed, initial weights and batch order:
  (a) mlx.nn.losses.cross_entropy(label_smoothing=0.1)   - MLX's composed loss
  (b) mlx_fused_losses.cross_entropy(label_smoothing=0.1) - the fused primitive
  (c) mlx_fused_losses.cross_entropy()                    - no label smoothing

(a) and (b) compute the same function. The script exits with status 1 if, at the
same parameters (the initial ones and each run's trained ones, on every training
batch), their losses or parameter gradients differ by more than STEP_RTOL. Their
loss curves are printed too, but not checked: two float32 implementations that
differ in the last bit of a gradient take slightly different Adam steps, and over
20 epochs the trajectories drift apart by more than any one step's rounding.
(c) shows what label smoothing does to confidence and calibration.

Usage (from the repository root):  python examples/train_classifier.py [--epochs N] [--seed S]
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import mlx_fused_losses as fl

# Defaults of the command-line options.
SEED = 0
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
HIDDEN = 128
LABEL_SMOOTHING = 0.1
ECE_BINS = 15
STEP_RTOL = 1e-5  # losses and gradients of (a) vs (b) at the same parameters


@dataclass
class Run:
    name: str
    loss_fn: Callable[[mx.array, mx.array], mx.array]


RUNS = [
    Run("(a) mlx.nn.losses CE, smoothing 0.1",
        lambda logits, y: nn.losses.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING, reduction="mean")),
    Run("(b) fl.cross_entropy, smoothing 0.1",
        lambda logits, y: fl.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING, reduction="mean")),
    Run("(c) fl.cross_entropy, no smoothing",
        lambda logits, y: fl.cross_entropy(logits, y, reduction="mean")),
]


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, classes: int):
        super().__init__()
        self.layers = [nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def load_data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int32), test_size=0.25, random_state=seed, stratify=digits.target
    )
    return x_train, x_test, y_train, y_test


def compile_works(loss_fn) -> bool:
    """Whether mx.compile can trace loss_fn's forward and backward."""
    try:
        probe = mx.compile(mx.value_and_grad(loss_fn))
        mx.eval(probe(mx.zeros((4, 10)), mx.zeros((4,), dtype=mx.int32)))
        return True
    except Exception as error:  # report, then train eagerly
        print(f"  mx.compile failed ({type(error).__name__}: {error}); running eagerly")
        return False


def make_train_step(model, optimizer, loss_fn, use_compile: bool):
    def model_loss(model, x, y):
        return loss_fn(model(x), y)

    loss_and_grad = nn.value_and_grad(model, model_loss)

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    if not use_compile:
        return step
    state = [model.state, optimizer.state]  # compiled step mutates these
    return partial(mx.compile, inputs=state, outputs=state)(step)


def train(run: Run, initial_params, data, opts):
    x_train, _, y_train, _ = data
    model = MLP(x_train.shape[1], opts.hidden, 10)
    model.update(tree_map(lambda p: mx.array(p), initial_params))  # identical init across runs
    optimizer = optim.Adam(learning_rate=opts.lr)
    use_compile = compile_works(run.loss_fn)
    step = make_train_step(model, optimizer, run.loss_fn, use_compile)

    batch_order = np.random.default_rng(opts.seed)  # identical batch order across runs
    epoch_losses, step_seconds = [], []
    for epoch in range(opts.epochs):
        permutation = batch_order.permutation(len(x_train))
        batch_losses = []
        for start in range(0, len(permutation), opts.batch_size):
            index = permutation[start:start + opts.batch_size]
            x, y = mx.array(x_train[index]), mx.array(y_train[index])
            began = time.perf_counter()
            loss = step(x, y)
            mx.eval(loss, model.state, optimizer.state)
            if epoch > 0:  # epoch 0 includes tracing/compilation
                step_seconds.append(time.perf_counter() - began)
            batch_losses.append(loss.item())
        epoch_losses.append(float(np.mean(batch_losses)))
    return model, np.array(epoch_losses), statistics.median(step_seconds), use_compile


def expected_calibration_error(confidence, correct, bins=ECE_BINS):
    """Sum over equal-width confidence bins of |accuracy - confidence|, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_of = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = bin_of == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return ece


def evaluate(model, x_test, y_test):
    probabilities = np.array(mx.softmax(model(mx.array(x_test)), axis=-1))
    confidence = probabilities.max(axis=-1)
    correct = (probabilities.argmax(axis=-1) == y_test).astype(np.float64)
    return correct.mean(), confidence.mean(), expected_calibration_error(confidence, correct)


def print_loss_curves(curves):
    names = list(curves)
    print("\nper-epoch mean training loss")
    print("epoch  " + "  ".join(f"{n[:3]:>10}" for n in names))
    for epoch in range(len(curves[names[0]])):
        print(f"{epoch + 1:5d}  " + "  ".join(f"{curves[n][epoch]:10.6f}" for n in names))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=_at_least(2), default=EPOCHS,
                        help="training epochs per run; the first one's steps are not timed, as they include "
                             "compilation (default: %(default)s, at least 2)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="seed of the train/test split, the initial weights and the batch order "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=_at_least(1), default=BATCH_SIZE,
                        help="examples per training step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--hidden", type=_at_least(1), default=HIDDEN,
                        help="width of the MLP's two hidden layers (default: %(default)s)")
    return parser.parse_args(argv)


def _at_least(low):
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def main(argv=None) -> int:
    opts = parse_args(argv)
    data = load_data(opts.seed)
    mx.random.seed(opts.seed)
    initial_params = MLP(data[0].shape[1], opts.hidden, 10).parameters()
    mx.eval(initial_params)

    curves, summary, trained = {}, [], []
    for run in RUNS:
        print(f"training {run.name}")
        model, curve, step_s, compiled = train(run, initial_params, data, opts)
        curves[run.name] = curve
        trained.append(model)
        summary.append((run.name, step_s, compiled, *evaluate(model, data[1], data[3])))

    print_loss_curves(curves)
    print(f"\n{'run':38} {'ms/step':>8} {'compiled':>8} {'test acc':>8} {'mean conf':>9} {'ECE':>7}")
    for name, step_s, compiled, accuracy, confidence, ece in summary:
        print(f"{name:38} {step_s * 1e3:8.3f} {str(compiled):>8} {accuracy:8.4f} {confidence:9.4f} {ece:7.4f}")

    reference, fused = curves[RUNS[0].name], curves[RUNS[1].name]
    drift = float(np.max(np.abs(reference - fused))) / float(np.max(np.abs(reference)))
    print(f"\nloss curves (a) vs (b): relative drift {drift:.3e} (trajectories; not checked)")

    worst = 0.0
    for params in [initial_params] + [model.parameters() for model in trained[:2]]:
        worst = max(worst, same_parameter_difference(RUNS[0], RUNS[1], params, data, opts))
    print(f"(a) vs (b) at the same parameters, every training batch: "
          f"max relative difference of loss and gradients {worst:.3e} (tolerance {STEP_RTOL:g})")
    if worst > STEP_RTOL:
        print("FAIL: fused cross-entropy does not match mlx.nn.losses.cross_entropy", file=sys.stderr)
        return 1
    return 0


def same_parameter_difference(run_a: Run, run_b: Run, params, data, opts) -> float:
    """Largest relative difference between run_a's and run_b's loss and parameter
    gradients, at the given parameters, over every training batch."""
    x_train, _, y_train, _ = data
    model = MLP(x_train.shape[1], opts.hidden, 10)
    model.update(tree_map(lambda p: mx.array(p), params))
    worst = 0.0
    for start in range(0, len(x_train), opts.batch_size):
        x, y = mx.array(x_train[start:start + opts.batch_size]), mx.array(y_train[start:start + opts.batch_size])
        results = []
        for run in (run_a, run_b):
            loss, grads = nn.value_and_grad(model, lambda m, x, y, f=run.loss_fn: f(m(x), y))(model, x, y)
            results.append((loss, tree_flatten(grads)))
        (loss_a, grads_a), (loss_b, grads_b) = results
        worst = max(worst, abs(loss_a.item() - loss_b.item()) / abs(loss_a.item()))
        for (_, g_a), (_, g_b) in zip(grads_a, grads_b):
            scale = float(mx.max(mx.abs(g_a)).item()) or 1.0
            worst = max(worst, float(mx.max(mx.abs(g_a - g_b)).item()) / scale)
    return worst


if __name__ == "__main__":
    sys.exit(main())
