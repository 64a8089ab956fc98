"""The optional PyTorch column: torch's CPU loss on the same arrays.

Only when ``import torch`` works: torch is the user's choice, not a
dependency. The tensors are zero-copy views of the MLX inputs (bfloat16 via
its bits), torch runs on as many threads as our kernels, and its gradient is a
fresh tensor each call, as ours is.
"""

import mlx.core as mx
import numpy as np

from mlx_fused_losses import _ext

try:
    import torch
except ImportError:  # the column is left out
    torch = None


def version():
    return torch.__version__ if torch is not None else None


def _tensor(a: mx.array):
    if a.dtype == mx.bfloat16:
        bits = a.view(mx.uint16)
        mx.eval(bits)
        return torch.from_numpy(np.asarray(bits)).view(torch.bfloat16)
    t = torch.from_numpy(np.asarray(a))
    # torch's class indices are int64.
    return t.long() if not t.is_floating_point() else t


def thunks(spec, inputs):
    """{"fwd": thunk, "fwd+bwd": thunk} for torch, or None without torch or a torch loss."""
    if torch is None or spec.torch is None:
        return None
    torch.set_num_threads(max(1, _ext.num_threads()))
    first, *rest = [_tensor(a) for a in inputs]
    leaf = first.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            spec.torch(first, *rest)
        return []

    def forward_backward():
        leaf.grad = None
        spec.torch(leaf, *rest).backward()
        return []

    return {"fwd": forward, "fwd+bwd": forward_backward}
