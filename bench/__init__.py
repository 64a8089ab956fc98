"""Microbenchmarks for mlx_fused_losses.

Run from the repository root with ``python -m bench`` (``--help`` for options).
Each case is timed three ways on the current default device:

* ``ours``     - the fused primitive from ``mlx_fused_losses``;
* ``mlx``      - ``mlx.nn.losses`` (or the composed MLX formula where MLX has
                 no such loss);
* ``roofline`` - MLX ops that move exactly the bytes the loss must move, see
                 :mod:`bench.roofline`.
"""
