"""Element-wise activations: ReLU and leaky ReLU. Shapes: any; out has x's shape."""
import numpy as np

from pipeline.nn.backend import get_array_module
from pipeline.nn.threads import parallel_rows


def relu_forward(x, out=None):
    """max(x, 0); `out=x` computes in place (safe when nothing else keeps x). cache: the output."""
    xp = get_array_module(x)
    y = xp.empty(x.shape, x.dtype) if out is None else out  # C order whatever x's: written through a 2-D view
    if not y.flags.c_contiguous:
        raise ValueError("relu_forward: out must be C-contiguous")
    if xp is not np:  # one kernel; `out` the very object x is, else CuPy copies x first (overlapping views)
        return xp.maximum(x, x.dtype.type(0), out=y), y
    n = x.shape[0]
    # against a zero row rather than the scalar 0: NumPy's maximum with a scalar is 2.5x slower
    xf, yf = x.reshape(n, -1), y.reshape(n, -1)
    zeros = xp.zeros(xf.shape[1], dtype=x.dtype)
    parallel_rows(lambda rows: xp.maximum(xf[rows], zeros, out=yf[rows]), n, x)
    return y, y


def relu_backward(dout, cache, out=None):
    """dout where the output was positive, else 0 (the subgradient at 0 is 0, as in PyTorch)."""
    xp = get_array_module(dout)
    y = cache
    dx = xp.empty_like(dout) if out is None else out
    if xp is not np:  # one kernel, the very objects passed (see relu_forward)
        return xp.multiply(dout, y > 0, out=dx)
    parallel_rows(lambda rows: xp.multiply(dout[rows], y[rows] > 0, out=dx[rows]), dout.shape[0], dout)
    return dx


def leaky_relu_forward(x, alpha=0.01):
    """x where x > 0, else alpha * x. cache: (positive mask, alpha)."""
    xp = get_array_module(x)
    positive = x > 0
    y = xp.where(positive, x, x * x.dtype.type(alpha))
    return y, (positive, alpha)


def leaky_relu_backward(dout, cache):
    """dout where the input was positive, else alpha * dout."""
    xp = get_array_module(dout)
    positive, alpha = cache
    return xp.where(positive, dout, dout * dout.dtype.type(alpha))


def relu_forward_naive(x):
    return x * (x > 0), x


def relu_backward_naive(dout, cache):
    return dout * (cache > 0)


def leaky_relu_forward_naive(x, alpha=0.01):
    """Reference: the definition, element by element over the flattened array."""
    xp = get_array_module(x)
    flat = x.reshape(-1)
    out = xp.empty_like(flat)
    for i in range(flat.size):
        out[i] = flat[i] if flat[i] > 0 else alpha * flat[i]
    return out.reshape(x.shape), (x, alpha)


def leaky_relu_backward_naive(dout, cache):
    x, alpha = cache
    return dout * ((x > 0) + alpha * (x <= 0))
