"""Dense (fully connected) layer and flatten. Shapes: x (N, D), w (D, F), b (F,) or None, out (N, F)."""
from pipeline.nn.backend import get_array_module
from pipeline.nn.threads import gemm, gemm_tn


def dense_forward(x, w, b):
    """out = x @ w + b; cache (x, w, has_bias)."""
    out = gemm(x, w)
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def dense_backward(dout, cache, need_dx=True):
    """(dx (N, D) or None, dw (D, F), db (F,) or None)."""
    x, w, has_bias = cache
    dw = gemm_tn(x, dout)
    db = dout.sum(axis=0) if has_bias else None
    dx = gemm(dout, w.T) if need_dx else None
    return dx, dw, db


def dense_forward_naive(x, w, b):
    """Reference: one dot product per output unit."""
    xp = get_array_module(x)
    n, f = x.shape[0], w.shape[1]
    out = xp.zeros((n, f), dtype=x.dtype)
    for i in range(n):
        for j in range(f):
            out[i, j] = (x[i] * w[:, j]).sum() + (b[j] if b is not None else 0)
    return out, (x, w, b is not None)


def dense_backward_naive(dout, cache):
    """Reference gradients by the same loops: (dx (N, D), dw (D, F), db (F,) or None)."""
    x, w, has_bias = cache
    xp = get_array_module(x)
    dx, dw = xp.zeros_like(x), xp.zeros_like(w)
    for i in range(x.shape[0]):
        for j in range(w.shape[1]):
            dx[i] += dout[i, j] * w[:, j]
            dw[:, j] += dout[i, j] * x[i]
    return dx, dw, (dout.sum(axis=0) if has_bias else None)


def flatten_forward(x):
    """(N, H, W, C) -> (N, H*W*C) in C order (H, W, C); cache the input shape."""
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(dout, cache):
    return dout.reshape(cache)
