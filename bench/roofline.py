"""Memory roofline: kernels that move the same bytes as a loss, and nothing more.

A fused loss cannot beat the time it takes to stream its operands through
memory once. We time that lower bound on the same arrays, rather than quoting
a datasheet bandwidth, so cache effects and the machine's real bandwidth are
both accounted for.

* forward roofline = read every input once (and write O(rows) values).
* forward+backward roofline = the forward reads, plus reading the inputs again
  and writing the gradient (shaped like the first input) once.

On the CPU the bytes are moved by the package's own benchmark primitive
``_ext.memory_roofline``: a sum of 64-bit words over each input and a plain
store loop for the gradient, on the same thread pool and vector width as the
loss kernels, so "x roofline" compares like with like. (MLX's own CPU kernels
stream on one thread, which would flatter a multithreaded loss.)

On a GPU the roofline is MLX's own streaming kernels, which are
bandwidth-bound there: an integer sum over each input's raw bits for a read,
and a bitwise OR of the gradient-shaped inputs for the read-again-and-write.
"""

import mlx.core as mx

from mlx_fused_losses import _ext


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


_UNSIGNED_OF_WIDTH = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _bits(a: mx.array) -> mx.array:
    return a.view(_UNSIGNED_OF_WIDTH[a.dtype.size])


def _read_once(a: mx.array) -> mx.array:
    return mx.sum(_bits(a), axis=-1)


def forward_roofline(inputs):
    if _on_cpu():
        return _ext.memory_roofline(list(inputs))
    return [_read_once(a) for a in inputs]


def _read_again_write_gradient(inputs):
    grad = inputs[0]
    if _on_cpu():
        return _ext.memory_roofline(list(inputs), grad)

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
