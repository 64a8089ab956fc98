"""Memory roofline: MLX ops that move the same bytes as a loss, and nothing more.

A fused loss cannot beat the time it takes to stream its operands through
memory once.  We time that lower bound with real MLX kernels on the same
arrays, rather than quoting a datasheet bandwidth, so cache effects at small
sizes and the device's real bandwidth are both accounted for.

* forward roofline  = read every input once and write O(rows) values.
  Implemented as an integer sum over the last axis of each input's raw bits
  (``x.view(uint32/uint16)``).  An integer sum is the cheapest full-read kernel
  MLX has: on the 2-core CPU it streams at ~10-15 GB/s, whereas a float32 sum
  is compute-bound at ~3 GB/s and would flatter every loss.
* forward+backward roofline = the forward reads, plus reading the inputs again
  and writing the gradient once.  The second pass is a bitwise OR of all
  inputs shaped like the gradient (reads each, writes one gradient-sized
  array); inputs of another shape (integer class targets) are re-read with the
  same integer sum.  OR is as cheap as an elementwise op gets, so the kernel is
  bound by its reads and its one write.

Only the differentiated input (the first one) gets a gradient, which is also
what the loss benchmarks compute.

This is "what MLX's own streaming kernels need for these bytes", not a hard
hardware bound: on the CPU those kernels run on one thread, so a fused kernel
that streams better can come in under 1.0x roofline.
"""

import mlx.core as mx

_UNSIGNED_OF_WIDTH = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _bits(a: mx.array) -> mx.array:
    return a.view(_UNSIGNED_OF_WIDTH[a.dtype.size])


def _read_once(a: mx.array) -> mx.array:
    return mx.sum(_bits(a), axis=-1)


def forward_roofline(inputs):
    return [_read_once(a) for a in inputs]


def _read_again_write_gradient(inputs):
    grad = inputs[0]

    def is_gradient_shaped(a):
        return a.shape == grad.shape and a.dtype.size == grad.dtype.size

    gradient_shaped = [_bits(a) for a in inputs if is_gradient_shaped(a)]
    # OR-ing with 0 when there is a single operand forces a real read+write.
    gradient_sized = gradient_shaped[0] | (gradient_shaped[1] if len(gradient_shaped) > 1 else 0)
    for extra in gradient_shaped[2:]:
        gradient_sized = gradient_sized | extra
    rest = [_read_once(a) for a in inputs if not is_gradient_shaped(a)]
    return [gradient_sized, *rest]


def forward_backward_roofline(inputs):
    return forward_roofline(inputs) + _read_again_write_gradient(inputs)


def bytes_moved(inputs, output_nbytes: int, backward: bool) -> int:
    """Bytes the loss must move at minimum; used for the GB/s figures."""
    input_bytes = sum(a.nbytes for a in inputs)
    forward = input_bytes + output_nbytes
    if not backward:
        return forward
    return forward + input_bytes + inputs[0].nbytes
