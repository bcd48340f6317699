"""2-D convolution in NHWC: im2col the Chainer way, one GEMM, and a naive loop reference.

Shapes: x (N, H, W, C), w (kh, kw, C, F), b (F,) or None, out (N, Ho, Wo, F).
Padding is (top, bottom, left, right); `conv_padding` turns 'valid' | 'same' | int into that tuple.

Forward: x padded once, columns filled by strided-slice copies (no fancy indexing), a GEMM with the
bias as an extra row of the kernel matrix, a few images at a time on each thread so that columns and
products stay in cache. Backward, chunk by chunk again: [dw; db] += columns.T @ dout (columns kept from
the forward when small, else rebuilt); dx without col2im's C-long scatter-adds: shifted adds of per-tap
GEMMs at stride 1, phase-split stride-1 correlations otherwise. col2im stays as im2col's exact mirror
(its adjoint, tested).
"""
import math

import numpy as np

from pipeline.nn.backend import gemm, get_array_module, parallel_batches, parallel_gemm_rows, parallel_rows
from pipeline.nn.norm import channel_sum


def get_conv_outsize(size, k, stride, pad_before, pad_after):
    """Output length of a valid sliding window of length k over a padded axis."""
    return (size + pad_before + pad_after - k) // stride + 1


def same_padding(size, k, stride):
    """Keras/TensorFlow 'same': out = ceil(size/stride); the smaller half before, the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_padding(padding, in_hw, kernel_hw, stride):
    """(top, bottom, left, right) for padding 'valid', 'same', an int, or an explicit 4-tuple."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            return same_padding(in_hw[0], kernel_hw[0], stride) + same_padding(in_hw[1], kernel_hw[1], stride)
        raise ValueError(f"padding must be 'valid', 'same' or an int, got {padding!r}")
    if isinstance(padding, (tuple, list)):
        if len(padding) != 4 or any(int(p) < 0 for p in padding):
            raise ValueError(f"explicit padding must be 4 non-negative ints, got {padding!r}")
        return tuple(int(p) for p in padding)
    p = int(padding)
    if p < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return (p, p, p, p)


def _pad4(pad):
    if isinstance(pad, int):
        return (pad, pad, pad, pad)
    return tuple(pad)


def pad_nhwc(x, pad):
    """Zero-pad the H and W axes of x (N, H, W, C) once; returns x itself when there is nothing to pad."""
    t, btm, lft, r = pad
    if t == btm == lft == r == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.zeros((n, h + t + btm, w + lft + r, c), dtype=x.dtype)
    out[:, t:t + h, lft:lft + w, :] = x
    return out


def im2col(x, kh, kw, stride, pad, out=None):
    """Columns (N, Ho, Wo, kh, kw, C) of x (N, H, W, C), no fancy indexing, in row blocks on the
    engine's threads (each block padded on its own, while in cache). `out` may be a preallocated buffer
    of that shape (or a strided view with it)."""
    xp = get_array_module(x)
    pad = _pad4(pad)
    n, h, w, c = x.shape
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(w, kw, stride, pad[2], pad[3])
    col = out if out is not None else xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    parallel_rows(lambda r: _fill_columns(pad_nhwc(x[r], pad), col[r], kh, kw, stride, ho, wo), n, col)
    return col


def _fill_columns(xpad, col, kh, kw, stride, ho, wo):
    """col[:, y, x, i, j, :] = xpad[:, y*stride + i, x*stride + j, :] for a padded block.

    With several channels, one copy per kernel row i: the source is a strided view whose (kw, C) block
    is contiguous in NHWC, so each copy moves runs of kw*C values instead of C (3-5x fewer inner loops
    than the kh*kw loop). A single channel keeps the kh*kw loop of strided slices, whose runs are longer.
    """
    xp = get_array_module(xpad)
    n, c = xpad.shape[0], xpad.shape[3]
    if c > 1:
        sn, sh, sw, sc = xpad.strides
        for i in range(kh):
            rows = xp.lib.stride_tricks.as_strided(
                xpad[:, i:], shape=(n, ho, wo, kw, c), strides=(sn, sh * stride, sw * stride, sw, sc))
            col[:, :, :, i, :, :] = rows
        return
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]


def col2im(col, stride, pad, h, w):
    """Exact mirror of im2col: scatter-add columns (N, Ho, Wo, kh, kw, C) back into (N, h, w, C)."""
    xp = get_array_module(col)
    pad = _pad4(pad)
    n, ho, wo, kh, kw, c = col.shape
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]
    img = xp.zeros((n, hp, wp, c), dtype=col.dtype)
    for i in range(kh):
        i_end = i + stride * ho
        for j in range(kw):
            j_end = j + stride * wo
            img[:, i:i_end:stride, j:j_end:stride, :] += col[:, :, :, i, j, :]
    return img[:, pad[0]:pad[0] + h, pad[2]:pad[2] + w, :]


def column_matrix(x, kh, kw, stride, pad, ones=False, workspace=None, buffer=None):
    """Patches of x (N, H, W, C) as a matrix (N*Ho*Wo, kh*kw*C [+ 1]): rows (n, y, x), columns (i, j, c).

    ones=True appends a column of ones, so the bias rides along in the GEMM (forward) and its gradient
    falls out of the weight-gradient GEMM (backward) instead of costing a pass over the output each.
    A single channel is stored column-major, (K, M), filled with kh*kw copies whose runs are whole
    image rows; the matrix returned is then its transposed view, which BLAS takes as is.
    The memory comes from `buffer` (a flat array at least that long) if given, else from `workspace`.
    """
    xp = get_array_module(x)
    pad = _pad4(pad)
    n, h, wd, c = x.shape
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, stride, pad[2], pad[3])
    k = kh * kw * c
    kb, m = k + int(bool(ones)), n * ho * wo

    def alloc(shape):
        if buffer is not None:
            return buffer[:kb * m].reshape(shape)
        if workspace is not None:
            return workspace.array(shape, x.dtype, xp)
        return xp.empty(shape, dtype=x.dtype)

    if c == 1:
        buf = alloc((kb, n, ho, wo))

        def fill_channel_major(r):
            xpad = pad_nhwc(x[r], pad)[..., 0]
            for i in range(kh):
                for j in range(kw):
                    buf[i * kw + j, r] = xpad[:, i:i + stride * ho:stride, j:j + stride * wo:stride]
            if ones:
                buf[k, r] = 1

        parallel_rows(fill_channel_major, n, buf)
        return buf.reshape(kb, m).T
    buf = alloc((n, ho, wo, kb))
    if ones:
        item = buf.itemsize
        col6 = xp.lib.stride_tricks.as_strided(
            buf, shape=(n, ho, wo, kh, kw, c),
            strides=buf.strides[:3] + (kw * c * item, c * item, item))
    else:
        col6 = buf.reshape(n, ho, wo, kh, kw, c)

    def fill(r):
        _fill_columns(pad_nhwc(x[r], pad), col6[r], kh, kw, stride, ho, wo)
        if ones:
            buf[r, :, :, k] = 1

    parallel_rows(fill, n, buf)
    return buf.reshape(m, kb)


# Each thread walks its images in chunks whose column matrix is about this size: columns, GEMM output
# and the dx scratch then stay in cache (32 MiB of L3 here) instead of streaming 60-85 MB through memory.
COLUMN_CHUNK_BYTES = 4 << 20
# Column matrices up to this size are kept from forward to backward, bigger ones are rebuilt chunk by
# chunk in backward. Measured at batch 128, 2 threads: deotte's 5x5 stride-2 layer (59 MB of columns)
# gains from keeping them (fwd + bwd 31.8 -> 30.6 ms), its 3x3 layer at 26x26 (85 MB) loses (41.0 -> 43.1).
KEEP_COLUMNS_BYTES = 64 << 20
# OpenBLAS (0.3.31, Haswell kernels, 1 thread per call) runs two GEMMs with a long inner dimension and an
# output side this small at once no faster than one after the other: (6 x 40k) @ (40k x 26) 2.3 ms for
# five alone, 4.7 ms for five on each of two threads; (16 x 40k) @ (40k x 32): 3.2 and 3.5 ms.
SMALL_GEMM_SIDE = 16


def column_chunk(ho, wo, k, itemsize):
    """Images per chunk so that a chunk's (images*Ho*Wo, K) column matrix is about COLUMN_CHUNK_BYTES."""
    return max(1, COLUMN_CHUNK_BYTES // (ho * wo * k * itemsize))


def _chunks(rows, size):
    """Consecutive slices of at most `size` covering the slice `rows`."""
    return [slice(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, size)]


def _keep_store(keep, size, dtype, workspace, xp):
    """(kept, flat) for the column matrices a forward keeps for its backward: an empty dict to fill by
    first image and `size` values of memory (the workspace's "kept" buffer, else fresh), when `keep` and
    they fit in KEEP_COLUMNS_BYTES; else (None, None)."""
    if not keep or size * np.dtype(dtype).itemsize > KEEP_COLUMNS_BYTES:
        return None, None
    flat = (workspace.for_thread("kept").array((size,), dtype, xp) if workspace is not None
            else xp.empty(size, dtype=dtype))
    return {}, flat


def _kept_columns(kept, rows, per_image):
    """The columns a forward kept for the images `rows`, or None (not kept, or kept in other chunks)."""
    col = kept.get(rows.start) if kept is not None else None
    return col if col is not None and col.shape[0] == (rows.stop - rows.start) * per_image else None


def sum_in_order(parts):
    """parts[0] + parts[1] + ... in list order: the threads' partial gradients, summed the same way every
    run."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _kernel_matrix(w, b):
    """[w.reshape(kh*kw*C, F); b]: the GEMM's right-hand side, the bias as its last row."""
    xp = get_array_module(w)
    kh, kw, c, f = w.shape
    wb = w.reshape(kh * kw * c, f)
    if b is not None:
        wb = xp.concatenate([wb, b.reshape(1, f)], axis=0)
    return wb


def conv2d_forward(x, w, b, stride=1, pad=0, workspace=None, out=None, keep_columns=True):
    """out (N, Ho, Wo, F) = [im2col(x), 1] @ [w.reshape(kh*kw*C, F); b]: the bias rides in the GEMM.

    x (N, H, W, C), w (kh, kw, C, F), b (F,) or None, pad int or (top, bottom, left, right).
    The batch is split among the engine's threads (parallel_batches) and each thread fills and
    multiplies the columns of a few images at a time (COLUMN_CHUNK_BYTES), so nothing big is stored:
    backward rebuilds the columns the same way, unless the whole matrix is at most KEEP_COLUMNS_BYTES
    and keep_columns is true (False suits a pass with no backward): then the chunks' columns are kept.
    workspace: optional backend.Workspace for the columns (one per thread through for_thread).
    out: optional (N, Ho, Wo, F) C-contiguous array to write the result into.
    cache: (x, w, has_bias, stride, pad, workspace, kept columns by first image or None) for
    conv2d_backward; x must stay unchanged until then.
    """
    xp = get_array_module(x)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    pad = _pad4(pad)
    if out is not None and not out.flags.c_contiguous:
        raise ValueError("conv2d_forward: out must be C-contiguous")
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, stride, pad[2], pad[3])
    kb = kh * kw * c + int(b is not None)
    wb = _kernel_matrix(w, b)
    if out is None:
        out = xp.empty((n, ho, wo, f), dtype=x.dtype)
    chunk = column_chunk(ho, wo, kb, x.itemsize) if xp is np else n  # the GPU takes the batch at once
    kept, keep_flat = _keep_store(keep_columns, n * ho * wo * kb, x.dtype, workspace, xp)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        for r in _chunks(rows, chunk):
            region = None if kept is None else keep_flat[r.start * ho * wo * kb:]
            col = column_matrix(x[r], kh, kw, stride, pad, ones=b is not None, workspace=ws, buffer=region)
            xp.matmul(col, wb, out=out[r].reshape(-1, f))
            if kept is not None:
                kept[r.start] = col

    parallel_batches(run, n, out, flops=n * ho * wo * kb * f)
    return out, (x, w, b is not None, stride, pad, workspace, kept)


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of conv2d_forward: dx (N, H, W, C) or None, dw (kh, kw, C, F), db (F,) or None.

    Per thread and chunk of images, as in the forward: the columns are rebuilt, [dw; db] += [col, 1].T @
    dout, and dx comes without col2im: conv2d_input_grad_shifted at stride 1, conv2d_input_grad
    (phase-split correlations) otherwise. The threads' partial [dw; db] are summed in thread order.
    `need_dx=False` skips dx (a first layer).
    """
    x, w, has_bias, stride, pad, workspace, kept = cache
    xp = get_array_module(dout)
    if need_dx and not kept and xp is np and correlation_backward_pays(w.shape, x.shape, stride, pad):
        return conv2d_backward_correlation(dout, x, w, has_bias, pad, workspace)
    kh, kw, c, f = w.shape
    k = kh * kw * c
    n, ho, wo, _ = dout.shape
    kb = k + int(has_bias)
    dx = xp.empty(x.shape, dtype=dout.dtype) if need_dx else None
    grad = input_grad_function(w.shape, x.shape, stride, pad, xp)
    chunk = column_chunk(ho, wo, kb, dout.itemsize) if xp is np else n

    def run(rows, t, chunks=None):
        ws = workspace.for_thread(t) if workspace is not None else None
        total = None
        for r in chunks if chunks is not None else _chunks(rows, chunk):
            col = _kept_columns(kept, r, ho * wo)
            if col is None:
                col = column_matrix(x[r], kh, kw, stride, pad, ones=has_bias, workspace=ws)
            dout2 = dout[r].reshape(-1, f)
            # OpenBLAS runs the narrow case ~10 % faster as (dout.T @ col).T (measured, 1 thread)
            part = (dout2.T @ col).T if f <= 32 else col.T @ dout2
            total = part if total is None else total + part
            if need_dx:  # the columns are dead once their part of dw exists: dx may reuse the workspace
                grad(dout[r], w, stride, pad, x[r].shape, ws, out=dx[r])
        return total

    if kept and not need_dx and min(kb, f) < SMALL_GEMM_SIDE:
        # only the dw GEMMs are left, and their output is too small to gain from a second thread
        chunks = [slice(s, s + kept[s].shape[0] // (ho * wo)) for s in sorted(kept)]
        parts = [run(slice(0, n), 0, chunks)]
    else:
        parts = [p for p in parallel_batches(run, n, dout, flops=n * ho * wo * kb * f) if p is not None]
    dwb = sum_in_order(parts)
    dw = dwb[:k].reshape(w.shape)
    db = dwb[k] if has_bias else None
    return dx, xp.ascontiguousarray(dw), db


def correlation_backward_pays(w_shape, x_shape, stride, pad):
    """True where conv2d_backward_correlation beats rebuilding the columns + shifted taps: stride 1, at least
    16 input channels (fewer take the banded rows), padding within the kernel, and an input at most 1.25x
    the output's pixels (the full correlation runs over the input). Measured, deotte's 3x3 layer at 26x26
    (1.17x), 6 images, 1 thread: 3.4 -> 3.1 ms per chunk."""
    kh, kw, c, f = w_shape
    _, h, wd, _ = x_shape
    pad = _pad4(pad)
    if stride != 1 or c < 16 or max(pad[0], pad[1]) > kh - 1 or max(pad[2], pad[3]) > kw - 1:
        return False
    ho = get_conv_outsize(h, kh, 1, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, 1, pad[2], pad[3])
    return h * wd <= 1.25 * ho * wo


def conv2d_backward_correlation(dout, x, w, has_bias, pad, workspace=None):
    """(dx, dw, db) of a stride-1 convolution from one column matrix of the padded output gradient.

    D = im2col(dout padded by k-1-pad) (N*H*W, kh*kw*F) serves both gradients: dx = D @ flipped w (the full
    correlation, one GEMM with K = kh*kw*F instead of kh*kw GEMMs with K = F and shifted adds), and
    dw = flip(x.T @ D), x itself being the other operand, so the input's columns are never rebuilt.
    Per thread and chunk as conv2d_backward; the threads' partial dw are summed in thread order.
    """
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    pad = _pad4(pad)
    full = (kh - 1 - pad[0], kh - 1 - pad[1], kw - 1 - pad[2], kw - 1 - pad[3])
    flipped = xp.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(kh * kw * f, c)
    dx = xp.empty(x.shape, dtype=dout.dtype)
    chunk = column_chunk(h, wd, kh * kw * f, dout.itemsize)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        total = None
        for r in _chunks(rows, chunk):
            col = column_matrix(dout[r], kh, kw, 1, full, workspace=ws)
            xp.matmul(col, flipped, out=dx[r].reshape(-1, c))
            part = x[r].reshape(-1, c).T @ col  # (C, kh*kw*F), taps flipped
            total = part if total is None else total + part
        return total

    grad = sum_in_order(parallel_batches(run, n, dout, flops=2 * n * h * wd * kh * kw * f * c))
    dw = xp.ascontiguousarray(grad.reshape(c, kh, kw, f)[:, ::-1, ::-1].transpose(1, 2, 0, 3))
    db = channel_sum(dout) if has_bias else None
    return dx, dw, db


def conv2d_input_grad_shifted(dout, w, stride, pad, x_shape, workspace=None, out=None):
    """dx (N, H, W, C) for stride 1: one batched GEMM z[i, j] = dout @ w[i, j].T, then kh*kw shifted adds.

    Each z[i, j] is contiguous (N, Ho, Wo, C) and, at stride 1, its target window in dx is contiguous
    over (W, C), so the adds move long runs, unlike col2im's C-long ones. Padding is clipped away.
    """
    if stride != 1:
        raise ValueError("conv2d_input_grad_shifted handles stride 1 only")
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, ho, wo, _ = dout.shape
    _, h, wd, _ = x_shape
    pad = _pad4(pad)
    taps = xp.ascontiguousarray(w.reshape(kh * kw, c, f).transpose(0, 2, 1))  # (kh*kw, F, C)
    dout2 = dout.reshape(n * ho * wo, f)
    if xp is np:
        z = (workspace.array((kh * kw, n * ho * wo, c), dout.dtype, xp) if workspace is not None
             else xp.empty((kh * kw, n * ho * wo, c), dtype=dout.dtype))
        parallel_gemm_rows(lambda r: xp.matmul(dout2[None, r], taps, out=z[:, r]), n * ho * wo,
                           n * ho * wo * f * c * kh * kw, like=dout)
    else:
        z = xp.matmul(dout2[None], taps)
    z = z.reshape(kh, kw, n, ho, wo, c)
    dx = xp.empty(x_shape, dtype=dout.dtype) if out is None else out

    def accumulate(r):
        dx[r] = 0
        for i in range(kh):
            # output row y feeds input row y + i - pad_top; keep the rows that land inside x
            y0, y1 = max(0, pad[0] - i), min(ho, h + pad[0] - i)
            for j in range(kw):
                x0, x1 = max(0, pad[2] - j), min(wo, wd + pad[2] - j)
                if y1 > y0 and x1 > x0:
                    dx[r, y0 + i - pad[0]:y1 + i - pad[0], x0 + j - pad[2]:x1 + j - pad[2], :] += \
                        z[i, j, r, y0:y1, x0:x1, :]

    parallel_rows(accumulate, n, dx)
    return dx


def input_grad_function(w_shape, x_shape, stride, pad, xp=np):
    """The input-gradient routine for this layer, called as grad(dout, w, stride, pad, x_shape, workspace,
    out=dx): rows (banded GEMM, NumPy only: it works around NumPy's short inner loops) or shifted taps at
    stride 1, phase-split correlations otherwise."""
    if stride != 1:
        return conv2d_input_grad
    if xp is np and rows_input_grad_pays(w_shape, x_shape, _pad4(pad)):
        return lambda dout, w, stride, pad, x_shape, workspace=None, out=None: \
            conv2d_input_grad_rows(dout, w, pad, x_shape, out=out)
    return conv2d_input_grad_shifted


def rows_input_grad_pays(w_shape, x_shape, pad):
    """True where conv2d_input_grad_rows beats the shifted taps (stride 1): few input channels, so the
    shifted adds run C-long loops, and a padded width of at most 3 kernel widths, the banded GEMM's
    multiplies over the tap GEMMs'. Measured, 64 images, 1 thread: lenet5's 5x5 6->16 layer at 14x14
    4.45 -> 2.34 ms; a 3x3 8->16 layer at 14x14 with padding 1 (width 16 = 5.3 kernels) 2.59 -> 3.84 ms."""
    kh, kw, c, f = w_shape
    return c < 16 and x_shape[2] + pad[2] + pad[3] <= 3 * kw


def conv2d_input_grad_rows(dout, w, pad, x_shape, out=None):
    """dx (N, H, W, C) for stride 1 as one GEMM over whole rows, then kh row-shifted adds.

    Output row y reaches padded input row y + i through a banded (Toeplitz) matrix T_i (Wo*F, Wp*C) that
    holds w[i] at every horizontal offset: z = dout rows (N*Ho, Wo*F) @ [T_0 ... T_kh-1], and each z_i
    is added to dx rows shifted by i, in runs of Wp*C values. Wp/kw times the multiplies of the tap
    GEMMs (zeros of the band), but one GEMM with wide K and N instead of kh*kw with F and C, and adds
    that are not C values long: the win for few channels (rows_input_grad_pays).
    """
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, ho, wo, _ = dout.shape
    _, h, wd, _ = x_shape
    pad = _pad4(pad)
    hp, wp = h + pad[0] + pad[1], wd + pad[2] + pad[3]
    band = xp.zeros((wo, f, kh, wp, c), dtype=dout.dtype)
    taps = w.transpose(3, 0, 1, 2)  # (F, kh, kw, C)
    for x in range(wo):
        band[x, :, :, x:x + kw, :] = taps
    z = gemm(dout.reshape(n * ho, wo * f), band.reshape(wo * f, kh * wp * c)).reshape(n, ho, kh, wp * c)
    direct = pad == (0, 0, 0, 0) and (out is None or out.flags.c_contiguous)
    if direct:
        dxp = xp.empty(x_shape, dtype=dout.dtype) if out is None else out
    else:
        dxp = xp.empty((n, hp, wp, c), dtype=dout.dtype)
    rows = dxp.reshape(n, hp, wp * c)
    rows[:, :ho] = z[:, :, 0]
    rows[:, ho:] = 0
    for i in range(1, kh):
        rows[:, i:i + ho] += z[:, :, i]
    if direct:
        return dxp
    dx = xp.empty(x_shape, dtype=dout.dtype) if out is None else out
    dx[...] = dxp[:, pad[0]:pad[0] + h, pad[2]:pad[2] + wd]
    return dx


def _phase_window(dout, start_h, len_h, start_w, len_w):
    """dout[:, start_h:start_h+len_h, start_w:start_w+len_w, :], zero outside dout (a view when inside)."""
    n, ho, wo, f = dout.shape
    if start_h >= 0 and start_w >= 0 and start_h + len_h <= ho and start_w + len_w <= wo:
        return dout[:, start_h:start_h + len_h, start_w:start_w + len_w, :]
    xp = get_array_module(dout)
    win = xp.zeros((n, len_h, len_w, f), dtype=dout.dtype)
    h0, h1 = max(start_h, 0), min(start_h + len_h, ho)
    w0, w1 = max(start_w, 0), min(start_w + len_w, wo)
    if h1 > h0 and w1 > w0:
        win[:, h0 - start_h:h1 - start_h, w0 - start_w:w1 - start_w, :] = dout[:, h0:h1, w0:w1, :]
    return win


def _phase_taps(size, k, stride, pad_before, phase):
    """For input rows h = phase + stride*u: (count U, first tap, tap count M, first dout row of the window)."""
    count = -(-(size - phase) // stride)
    first_tap = (phase + pad_before) % stride
    taps = -(-(k - first_tap) // stride) if first_tap < k else 0
    base = (phase + pad_before - first_tap) // stride
    return count, first_tap, taps, base - (taps - 1)


def conv2d_input_grad(dout, w, stride, pad, x_shape, workspace=None, out=None):
    """dx (N, H, W, C) of a convolution, as stride-1 correlations of dout with the flipped kernel.

    Input row h = a + stride*u (phase a) receives dout[y] through the taps i = h + pad_top - stride*y,
    which all share i mod stride: per phase pair (a, b) that is a valid correlation of a zero-extended
    dout window with the flipped sub-kernel w[i0::stride, j0::stride], one im2col and one GEMM.
    Stride 1 is the single phase, the classic full convolution; nothing is scattered with +=.
    """
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x_shape
    pad = _pad4(pad)
    phases = [(a, b) + _phase_taps(h, kh, stride, pad[0], a) + _phase_taps(wd, kw, stride, pad[2], b)
              for a in range(min(stride, h)) for b in range(min(stride, wd))]
    # every input pixel belongs to one phase; zeros are needed only where a phase has no taps
    empty_phase = any(p[4] == 0 or p[8] == 0 for p in phases)
    if stride > 1 or empty_phase:
        dx = xp.empty(x_shape, dtype=dout.dtype) if out is None else out
        if empty_phase:
            dx[...] = 0
    else:
        dx = None
    for a, b, rows, i0, mh, r0, cols, j0, mw, c0 in phases:
        if mh == 0 or mw == 0:
            continue  # taps skip this phase: its gradient is zero
        # flipped taps, in/out channels swapped: (mh, mw, F, C)
        sub = w[i0::stride, j0::stride][:mh, :mw][::-1, ::-1].transpose(0, 1, 3, 2)
        if workspace is not None:
            col = workspace.array((n, rows, cols, mh, mw, f), dout.dtype, xp)
        else:
            col = xp.empty((n, rows, cols, mh, mw, f), dtype=dout.dtype)

        def fill(r):
            win = _phase_window(dout[r], r0, rows + mh - 1, c0, cols + mw - 1)
            _fill_columns(win, col[r], mh, mw, 1, rows, cols)

        parallel_rows(fill, n, col)
        single = dx is None  # stride 1: the single phase is the whole gradient
        target = out.reshape(n * rows * cols, c) if single and out is not None else None
        grad = gemm(col.reshape(n * rows * cols, mh * mw * f), xp.ascontiguousarray(sub).reshape(mh * mw * f, c),
                    out=target)
        grad = grad.reshape(n, rows, cols, c)
        if single:
            return grad

        def scatter(r):
            dx[r, a::stride, b::stride, :] = grad[r]

        parallel_rows(scatter, n, grad)
    return dx


def conv2d_forward_naive(x, w, b, stride=1, pad=0):
    """Reference: explicit loops over output pixels; same contract as conv2d_forward (cache = inputs)."""
    xp = get_array_module(x)
    pad = _pad4(pad)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, stride, pad[2], pad[3])
    xpad = pad_nhwc(x, pad)
    out = xp.zeros((n, ho, wo, f), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            patch = xpad[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]  # (N, kh, kw, C)
            out[:, i, j, :] = xp.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    if b is not None:
        out += b
    return out, (x, w, b, stride, pad)


def conv2d_backward_naive(dout, cache):
    """Reference gradients by the same loops: (dx, dw, db)."""
    x, w, b, stride, pad = cache
    xp = get_array_module(x)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    _, ho, wo, _ = dout.shape
    xpad = pad_nhwc(x, pad)
    dxpad = xp.zeros_like(xpad)
    dw = xp.zeros_like(w)
    for i in range(ho):
        for j in range(wo):
            rows = slice(i * stride, i * stride + kh)
            cols = slice(j * stride, j * stride + kw)
            patch = xpad[:, rows, cols, :]
            g = dout[:, i, j, :]  # (N, F)
            dw += xp.tensordot(patch, g, axes=([0], [0]))
            dxpad[:, rows, cols, :] += xp.tensordot(g, w, axes=([1], [3]))
    dx = dxpad[:, pad[0]:pad[0] + h, pad[2]:pad[2] + wd, :]
    db = dout.sum(axis=(0, 1, 2)) if b is not None else None
    return dx, dw, db
