"""Smoke test of an installation from the sdist (run outside the source tree).

Imports the package, checks that the version guard recorded the mlx it was
built against, and compares one loss and its gradient with mlx.nn.losses.
"""

import importlib.metadata as metadata

import mlx.core as mx
import mlx.nn as nn

import mlx_fused_losses as fl

assert fl.__version__ == metadata.version("mlx-fused-losses"), fl.__version__
assert fl._build_info.MLX_VERSION == metadata.version("mlx") == mx.__version__

logits = mx.random.normal((7, 33), key=mx.random.key(0))
targets = mx.array([0, 5, 32, 7, 1, 9, 20])


def ours(x):
    return fl.cross_entropy(x, targets, label_smoothing=0.1, reduction="mean")


def reference(x):
    return nn.losses.cross_entropy(x, targets, label_smoothing=0.1, reduction="mean")


loss, grad = mx.value_and_grad(ours)(logits)
ref_loss, ref_grad = mx.value_and_grad(reference)(logits)
assert mx.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6).item(), (loss, ref_loss)
assert mx.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6).item()
print(f"sdist install OK: mlx-fused-losses {fl.__version__} on mlx {mx.__version__}, "
      f"cross_entropy {loss.item():.6f} (mlx.nn.losses {ref_loss.item():.6f})")
