"""Element-wise activations: ReLU and leaky ReLU. Shapes: any; out has x's shape."""
from pipeline.nn.backend import get_array_module, parallel_rows


def relu_forward(x, out=None):
    """max(x, 0); `out=x` computes in place (safe when nothing else keeps x). cache: the output."""
    xp = get_array_module(x)
    y = xp.empty_like(x) if out is None else out
    zero = x.dtype.type(0)
    parallel_rows(lambda rows: xp.maximum(x[rows], zero, out=y[rows]), x.shape[0], x)
    return y, y


def relu_backward(dout, cache, out=None):
    """dout where the output was positive, else 0 (the subgradient at 0 is 0, as in PyTorch)."""
    xp = get_array_module(dout)
    y = cache
    dx = xp.empty_like(dout) if out is None else out
    parallel_rows(lambda rows: xp.multiply(dout[rows], y[rows] > 0, out=dx[rows]), dout.shape[0], dout)
    return dx


def leaky_relu_forward(x, alpha=0.01):
    """x where x > 0, else alpha * x. cache: (positive mask, alpha)."""
    xp = get_array_module(x)
    positive = x > 0
    y = xp.where(positive, x, x * x.dtype.type(alpha))
    return y, (positive, alpha)


def leaky_relu_backward(dout, cache):
    xp = get_array_module(dout)
    positive, alpha = cache
    return xp.where(positive, dout, dout * dout.dtype.type(alpha))


def relu_forward_naive(x):
    return x * (x > 0), x


def relu_backward_naive(dout, cache):
    return dout * (cache > 0)
