"""Microbenchmarks for mlx_fused_losses (installed with the ``[bench]`` extra).

Run from any directory with ``python -m mlx_fused_losses.bench`` (``--help``
for options). Each case is timed on the current default device:

* ``ours``     - the fused primitive from ``mlx_fused_losses``;
* ``mlx``      - ``mlx.nn.losses`` (or the composed MLX formula where MLX has
                 no such loss);
* ``torch``    - PyTorch's loss, where ``import torch`` works (optional);
* ``roofline`` - NumPy (on a GPU: MLX ops) moving exactly the bytes the loss
                 must move, into warm and into fresh memory, see
                 :mod:`mlx_fused_losses.bench.roofline`.

Importing ``mlx_fused_losses`` does not import this package.
"""
