"""Pooling in NHWC: max, average and global average, each with a naive loop reference.

Shapes: x (N, H, W, C) -> out (N, Ho, Wo, C) with Ho = (H - size) // stride + 1 (no padding, floor like
PyTorch and Keras 'valid'); global pooling gives (N, C).
Max pooling routes the gradient to the first maximum of each window in row-major order (PyTorch's rule).
"""
import numpy as np

from pipeline.nn import tuning
from pipeline.nn.backend import get_array_module
from pipeline.nn.threads import parallel_rows, scratch


def pool_outsize(size, k, stride):
    if size < k:
        raise ValueError(f"pool window {k} is larger than the input ({size})")
    return (size - k) // stride + 1


def _window_views(x, size, stride, ho, wo):
    """The size*size strided views x[:, i::stride, j::stride] of shape (N, Ho, Wo, C), row-major order."""
    for i in range(size):
        for j in range(size):
            yield i, j, x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]


def maxpool_forward(x, size=2, stride=None):
    """out (N, Ho, Wo, C); cache for maxpool_backward.

    Any window and stride: a running maximum over the size*size strided views, `>` keeping the first maximum
    on ties. 2x2 windows at stride 2 (every model here) have their own faster pair, maxpool2x2_forward and
    maxpool2x2_backward, which the MaxPool2x2 layer runs.
    """
    xp = get_array_module(x)
    stride = stride or size
    if size * size > 255:
        raise ValueError(f"max pool window {size} too large for the uint8 argmax")
    n, h, w, c = x.shape
    ho, wo = pool_outsize(h, size, stride), pool_outsize(w, size, stride)
    views = _window_views(x, size, stride, ho, wo)
    _, _, first = next(views)
    out = first.copy()
    argmax = xp.zeros(out.shape, dtype=xp.uint8)
    for i, j, view in views:
        greater = view > out
        xp.copyto(out, view, where=greater)
        xp.copyto(argmax, np.uint8(i * size + j), where=greater)  # a NumPy scalar: CuPy < 13.3 refuses an int
    return out, (argmax, x.shape, size, stride)


def maxpool_backward(dout, cache):
    """dx (N, H, W, C): each output gradient goes to the input at its (first) argmax."""
    argmax, x_shape, size, stride = cache
    xp = get_array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    ho, wo = dout.shape[1], dout.shape[2]
    for i, j, view in _window_views(dx, size, stride, ho, wo):
        contrib = dout * (argmax == i * size + j)
        if stride >= size:  # windows do not overlap: plain assignment
            view[...] = contrib
        else:
            view += contrib
    return dx


def maxpool2x2_forward(x):
    """2x2 max pooling, stride 2, in two pairwise stages with masks instead of an argmax.

    Rows first: top vs bottom on views whose contiguous runs are W*C long (the cheap direction in NHWC),
    then columns on the half-size result. The first maximum in row-major order (PyTorch's choice) wins:
    the right column is taken if it is larger, or equal with its maximum in the top row and the left's in
    the bottom row. cache: (bottom-row mask (N, Ho, 2*Wo, C), right-column mask (N, Ho, Wo, C), x.shape).
    Odd H or W: the last row or column is in no window, as in maxpool_forward.
    """
    xp = get_array_module(x)
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    pairs = x[:, :2 * ho, :2 * wo, :].reshape(n, ho, 2, 2 * wo, c)
    out = xp.empty((n, ho, wo, c), dtype=x.dtype)
    from_bottom = xp.empty((n, ho, 2 * wo, c), dtype=bool)
    from_right = xp.empty((n, ho, wo, c), dtype=bool)

    def pool_rows(r):
        top, bottom = pairs[r, :, 0], pairs[r, :, 1]
        colmax = xp.maximum(top, bottom, out=scratch("pool.colmax", top.shape, x.dtype, xp))
        xp.greater(bottom, top, out=from_bottom[r])
        if xp is np and c < tuning.NARROW_CHANNELS:  # NumPy's short inner loops; a GPU has none to avoid
            _pool_columns_shifted(colmax, from_bottom[r], out[r], from_right[r])
            return
        colmax = colmax.reshape(-1, ho, wo, 2, c)
        left, right = colmax[:, :, :, 0], colmax[:, :, :, 1]
        xp.maximum(left, right, out=out[r])
        rows = from_bottom[r].reshape(-1, ho, wo, 2, c)
        xp.greater(right, left, out=from_right[r])
        tie_up = xp.equal(right, left)
        tie_up &= xp.greater(rows[:, :, :, 0], rows[:, :, :, 1])  # left max in the bottom row, right's on top
        from_right[r] |= tie_up

    parallel_rows(pool_rows, n, x)
    return out, (from_bottom, from_right, x.shape)


def _pool_columns_shifted(colmax, from_bottom, out, from_right):
    """The column stage of maxpool2x2_forward on (rows, Ho, 2*Wo, C) maxima of row pairs.

    Row-flat arrays compared with themselves shifted by C values hold, at every even pixel block, the
    window's left column against its right one; those blocks are then picked into out and from_right.
    """
    xp = get_array_module(colmax)
    nr, ho, w2, c = colmax.shape
    flat = colmax.reshape(nr * ho, w2 * c)
    bottom = from_bottom.reshape(nr * ho, w2 * c)
    left, right = flat[:, :-c], flat[:, c:]
    best = scratch("pool.best", flat.shape, flat.dtype, xp)
    take_right = scratch("pool.take_right", flat.shape, bool, xp)
    xp.maximum(left, right, out=best[:, :-c])
    xp.greater(right, left, out=take_right[:, :-c])
    tie_up = xp.equal(right, left, out=scratch("pool.tie", left.shape, bool, xp))
    tie_up &= bottom[:, :-c]
    tie_up &= ~bottom[:, c:]  # left max in the bottom row, right's on top: the right one comes first
    take_right[:, :-c] |= tie_up
    out[...] = best.reshape(nr, ho, w2 // 2, 2 * c)[..., :c]
    from_right[...] = take_right.reshape(nr, ho, w2 // 2, 2 * c)[..., :c]


def maxpool2x2_backward(dout, cache):
    """dx (N, H, W, C) for maxpool2x2_forward: the masks route each gradient to its window's first maximum."""
    from_bottom, from_right, x_shape = cache
    xp = get_array_module(dout)
    n, ho, wo, c = dout.shape
    dx = xp.empty((n, 2 * ho, 2 * wo, c), dtype=dout.dtype)
    pairs = dx.reshape(n, ho, 2, 2 * wo, c)

    def route(r):  # each half by its own mask: a subtraction would read a view interleaved with its output,
        # which CuPy copies first (NumPy proves the two apart)
        dcol = scratch("pool.dcol", (dout[r].shape[0], ho, wo, 2, c), dout.dtype, xp)
        left = xp.logical_not(from_right[r], out=scratch("pool.left", from_right[r].shape, bool, xp))
        xp.multiply(dout[r], from_right[r], out=dcol[:, :, :, 1])
        xp.multiply(dout[r], left, out=dcol[:, :, :, 0])
        dcol = dcol.reshape(-1, ho, 2 * wo, c)
        top = xp.logical_not(from_bottom[r], out=scratch("pool.top", from_bottom[r].shape, bool, xp))
        xp.multiply(dcol, from_bottom[r], out=pairs[r, :, 1])
        xp.multiply(dcol, top, out=pairs[r, :, 0])

    parallel_rows(route, n, dx)
    if dx.shape != tuple(x_shape):  # odd H or W: the last row/column was never in a window
        full = xp.zeros(x_shape, dtype=dout.dtype)
        full[:, :2 * ho, :2 * wo, :] = dx
        dx = full
    return dx


def avgpool_forward(x, size=2, stride=None):
    """out (N, Ho, Wo, C): the mean of each window; cache (x.shape, size, stride)."""
    xp = get_array_module(x)
    stride = stride or size
    n, h, w, c = x.shape
    ho, wo = pool_outsize(h, size, stride), pool_outsize(w, size, stride)
    out = xp.zeros((n, ho, wo, c), dtype=x.dtype)
    for _, _, view in _window_views(x, size, stride, ho, wo):
        out += view
    out *= x.dtype.type(1.0 / (size * size))
    return out, (x.shape, size, stride)


def avgpool_backward(dout, cache):
    """dx (N, H, W, C): each output gradient spread evenly over its window."""
    x_shape, size, stride = cache
    xp = get_array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    share = dout * dout.dtype.type(1.0 / (size * size))
    for _, _, view in _window_views(dx, size, stride, dout.shape[1], dout.shape[2]):
        view += share
    return dx


def global_avgpool_forward(x):
    """out (N, C): the mean over H and W; cache x.shape."""
    return x.mean(axis=(1, 2), dtype=x.dtype), x.shape


def global_avgpool_backward(dout, cache):
    """dx (N, H, W, C) = dout / (H*W) broadcast over every pixel."""
    xp = get_array_module(dout)
    n, h, w, c = cache
    dx = xp.empty(cache, dtype=dout.dtype)
    dx[...] = (dout * dout.dtype.type(1.0 / (h * w)))[:, None, None, :]
    return dx


def maxpool_forward_naive(x, size=2, stride=None):
    """Reference: loops over windows, np.argmax of each flattened window (first maximum)."""
    xp = get_array_module(x)
    stride = stride or size
    n, h, w, c = x.shape
    ho, wo = pool_outsize(h, size, stride), pool_outsize(w, size, stride)
    out = xp.zeros((n, ho, wo, c), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            window = x[:, i * stride:i * stride + size, j * stride:j * stride + size, :]
            out[:, i, j, :] = window.max(axis=(1, 2))
    return out, (x, size, stride)


def maxpool_backward_naive(dout, cache):
    x, size, stride = cache
    xp = get_array_module(x)
    dx = xp.zeros_like(x)
    n, ho, wo, c = dout.shape
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    window = x[b, i * stride:i * stride + size, j * stride:j * stride + size, ch]
                    k = int(xp.argmax(window))
                    dx[b, i * stride + k // size, j * stride + k % size, ch] += dout[b, i, j, ch]
    return dx


def avgpool_forward_naive(x, size=2, stride=None):
    xp = get_array_module(x)
    stride = stride or size
    n, h, w, c = x.shape
    ho, wo = pool_outsize(h, size, stride), pool_outsize(w, size, stride)
    out = xp.zeros((n, ho, wo, c), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j, :] = x[:, i * stride:i * stride + size, j * stride:j * stride + size, :].mean(axis=(1, 2))
    return out, (x.shape, size, stride)


def avgpool_backward_naive(dout, cache):
    x_shape, size, stride = cache
    xp = get_array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    n, ho, wo, c = dout.shape
    for i in range(ho):
        for j in range(wo):
            dx[:, i * stride:i * stride + size, j * stride:j * stride + size, :] += \
                dout[:, i, j, :][:, None, None, :] / (size * size)
    return dx
