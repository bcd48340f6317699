"""A stride-1 convolution, an optional ReLU and 2x2 max pooling (stride 2) in one pass, for few filters.

Shapes: x (N, H, W, C), w (kh, kw, C, F), b (F,) or None, pad (top, bottom, left, right); the convolution's
output (N, Ho, Wo, F) must have even Ho and Wo; out (N, Ho/2, Wo/2, F) = [relu](maxpool2x2(conv(x))).

Why: lenet5's convolutions have 6 and 16 filters, GEMM shapes that OpenBLAS runs at a third of its speed,
and their pooling works on 6-channel rows, where NumPy's inner loops are 6 values long. Here each 2x2 block
of convolution outputs comes from one (kh+1) x (kw+1) input patch at stride 2, through a blocked kernel
that holds w at the block's four offsets (zeros elsewhere): a GEMM with 4F output columns and a quarter of
the rows, run transposed, (4F, K') @ (K', M), so that the four positions of a block are four contiguous
(F, M) slabs. The max over them, the masks that route the gradient and the ReLU are then passes over
contiguous rows while the chunk is in cache, and only the pooled quarter is transposed back to NHWC. The
price: (kh+1)(kw+1)/(kh*kw) times the multiplies (1.44x for 5x5), the extra ones by zeros.

Same function as Conv2D -> [ReLU] -> MaxPool2x2: the first maximum of a window in row-major order gets
the gradient (PyTorch's rule), the ReLU's subgradient at 0 is 0. The sums run in another order, so values
agree to rounding, not bit for bit (tested against the unfused layers).
"""

from pipeline.nn.backend import get_array_module
from pipeline.nn.conv import input_grad_function
from pipeline.nn.im2col import chunks, images_per_chunk, column_matrix, get_conv_outsize, keep_store, kept_columns
from pipeline.nn.threads import parallel_batches, scratch, sum_in_order


def fusable(stride, out_hw):
    """True when a convolution with this stride and output size (Ho, Wo) can take conv2d_maxpool_forward."""
    return stride == 1 and out_hw[0] % 2 == 0 and out_hw[1] % 2 == 0


def blocked_kernel(w, b):
    """The blocked kernel matrix (4F, (kh+1)*(kw+1)*C [+ 1]): rows (a, c, f) for the block position (a, c)
    and filter f, columns (i, j, channel) of the (kh+1) x (kw+1) patch, the bias last."""
    xp = get_array_module(w)
    kh, kw, c, f = w.shape
    wk = xp.zeros((kh + 1, kw + 1, c, 2, 2, f), dtype=w.dtype)
    for a in range(2):
        for cc in range(2):
            wk[a:a + kh, cc:cc + kw, :, a, cc, :] = w
    mat = wk.reshape(-1, 4 * f)
    if b is not None:
        mat = xp.concatenate([mat, xp.tile(b, 4)[None]], axis=0)
    return xp.ascontiguousarray(mat.T)


def fold_kernel_grad(grad, w_shape, has_bias):
    """(dw (kh, kw, C, F), db (F,) or None) from the gradient (4F, K' [+ 1]) of the blocked kernel matrix."""
    xp = get_array_module(grad)
    kh, kw, c, f = w_shape
    k = (kh + 1) * (kw + 1) * c
    g = grad[:, :k].T.reshape(kh + 1, kw + 1, c, 2, 2, f)
    dw = xp.zeros(w_shape, dtype=grad.dtype)
    for a in range(2):
        for cc in range(2):
            dw += g[a:a + kh, cc:cc + kw, :, a, cc, :]
    db = grad[:, k].reshape(4, f).sum(axis=0) if has_bias else None
    return dw, db


def _pool_block(o, masks, relu):
    """Max over the four (F, m) slabs of o (4, F, m), in place in o[0], which it returns.

    masks (4 or 3, F, m) bool or None: right beats left in the top pair, in the bottom pair, bottom pair
    beats top, and (relu) the maximum is positive. Strict comparisons keep the first maximum.
    """
    xp = get_array_module(o)
    o0, o1, o2, o3 = o
    if masks is not None:
        xp.greater(o1, o0, out=masks[0])
        xp.greater(o3, o2, out=masks[1])
    top = xp.maximum(o0, o1, out=o0)
    bottom = xp.maximum(o2, o3, out=o2)
    if masks is not None:
        xp.greater(bottom, top, out=masks[2])
    best = xp.maximum(top, bottom, out=top)
    if relu:
        # against a zero row, not the scalar 0: NumPy's maximum with a scalar is 2.5x slower
        xp.maximum(best, xp.zeros(best.shape[1], dtype=best.dtype), out=best)
        if masks is not None:
            xp.greater(best, 0, out=masks[3])
    return best


def conv2d_maxpool_forward(x, w, b, pad, relu=True, train=True, workspace=None, out=None):
    """out (N, Ho/2, Wo/2, F) = [relu](maxpool2x2(conv2d(x, w, b, stride 1, pad))); cache for backward.

    The batch is split among the engine's threads and walked a few images at a time, as in
    conv.conv2d_forward; in training the chunks' columns are kept for backward when they fit in
    tuning.KEEP_COLUMNS_BYTES, and the routing masks (4 or 3, F, N*Ho/2*Wo/2) are stored. Eval stores neither.
    out: optional C-contiguous (N, Ho/2, Wo/2, F) array to write the result into.
    """
    xp = get_array_module(x)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    ho = get_conv_outsize(h, kh, 1, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, 1, pad[2], pad[3])
    if ho % 2 or wo % 2:
        raise ValueError(f"conv2d_maxpool_forward needs an even convolution output, got {ho}x{wo}")
    hp, wp = ho // 2, wo // 2
    per = hp * wp
    wbt = blocked_kernel(w, b)
    kb = wbt.shape[1]
    if out is None:
        out = xp.empty((n, hp, wp, f), dtype=x.dtype)
    masks = xp.empty((4 if relu else 3, f, n * per), dtype=bool) if train else None
    chunk = images_per_chunk(xp, n, hp, wp, kb, x.itemsize)
    kept, keep_flat = keep_store(train, n * per * kb, x.dtype, workspace, xp)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        for r in chunks(rows, chunk):
            region = None if kept is None else keep_flat[r.start * per * kb:]
            col = column_matrix(x[r], kh + 1, kw + 1, 2, pad, ones=b is not None, workspace=ws, buffer=region)
            m = col.shape[0]
            o = scratch("convpool.blocks", (4, f, m), x.dtype, xp)
            xp.matmul(wbt, col.T, out=o.reshape(4 * f, m))
            block = None if masks is None else masks[:, :, r.start * per:r.stop * per]
            best = _pool_block(o, block, relu)
            out[r].reshape(m, f)[...] = best.T
            if kept is not None:
                kept[r.start] = col

    parallel_batches(run, n, x, flops=n * per * kb * 4 * f)
    return out, (x, w, b, pad, relu, masks, workspace, kept)


def conv2d_maxpool_backward(dout, cache, need_dx=True):
    """(dx (N, H, W, C) or None, dw (kh, kw, C, F), db (F,) or None) for conv2d_maxpool_forward.

    Per thread and chunk: the pooled gradient is routed to each window's first maximum in the blocked
    (4, F, m) layout, the blocked kernel's gradient is one GEMM against the (kept or rebuilt) columns, and
    dx unblocks the routed gradient to (m, Ho, Wo, F) and takes the convolution's input-gradient routine
    (conv.input_grad_function).
    A cache from an eval pass has no masks: they are recomputed first.
    """
    x, w, b, pad, relu, masks, workspace, kept = cache
    if masks is None:  # backward after an eval forward (rare): recompute the routing masks
        _, cache = conv2d_maxpool_forward(x, w, b, pad, relu, True, workspace)
        x, w, b, pad, relu, masks, workspace, kept = cache
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, hp, wp, _ = dout.shape
    per = hp * wp
    has_bias = b is not None
    kb = (kh + 1) * (kw + 1) * c + int(has_bias)
    dx = xp.empty(x.shape, dtype=dout.dtype) if need_dx else None
    chunk = images_per_chunk(xp, n, hp, wp, kb, dout.itemsize)
    input_grad = input_grad_function(w.shape, x.shape, 1, pad, xp)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        total = None
        for r in chunks(rows, chunk):
            nc = r.stop - r.start
            m = nc * per
            col = kept_columns(kept, r, per)
            if col is None:
                col = column_matrix(x[r], kh + 1, kw + 1, 2, pad, ones=has_bias, workspace=ws)
            block = masks[:, :, r.start * per:r.stop * per]
            d = scratch("convpool.dblocks", (4, f, m), dout.dtype, xp)
            g = dout[r].reshape(m, f).T
            if relu:
                xp.multiply(g, block[3], out=d[0])
            else:
                d[0][...] = g
            # d[0]: gradient of the window maximum; split it pair by pair (x - x*mask is exact)
            xp.multiply(d[0], block[2], out=d[2])
            xp.subtract(d[0], d[2], out=d[0])
            xp.multiply(d[0], block[0], out=d[1])
            xp.subtract(d[0], d[1], out=d[0])
            xp.multiply(d[2], block[1], out=d[3])
            xp.subtract(d[2], d[3], out=d[2])
            part = d.reshape(4 * f, m) @ col
            total = part if total is None else total + part
            if need_dx:  # columns are dead now: the input gradient may reuse the workspace
                dconv = scratch("convpool.dconv", (nc, 2 * hp, 2 * wp, f), dout.dtype, xp)
                dconv.reshape(nc, hp, 2, wp, 2, f)[...] = d.reshape(2, 2, f, nc, hp, wp).transpose(3, 4, 0, 5, 1, 2)
                input_grad(dconv, w, 1, pad, x[r].shape, ws, out=dx[r])
        return total

    grad = sum_in_order([p for p in parallel_batches(run, n, dout, flops=n * per * kb * 4 * f) if p is not None])
    dw, db = fold_kernel_grad(grad, w.shape, has_bias)
    return dx, dw, db
