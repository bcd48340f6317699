"""Convolution columns in NHWC: the Chainer-way im2col / col2im reference, and the fast column matrix.

Shapes: x (N, H, W, C); kernel kh x kw; pad (top, bottom, left, right) or an int; columns
(N, Ho, Wo, kh, kw, C), or as a matrix (N*Ho*Wo, kh*kw*C [+ 1]) with rows (n, y, x) and columns (i, j, c).

`im2col` / `col2im` are the readable reference (Chainer's `chainer/utils/conv.py`): pad once, a kh*kw loop
of strided slices, and col2im its exact mirror with +=. `column_matrix` is what the convolutions use: the
same values (tested), filled in row blocks on the engine's threads, a kernel row at a time, with an optional
column of ones for the bias, into lent memory; and the helpers that walk a batch in cache-sized chunks.
"""
import numpy as np

from pipeline.nn import tuning
from pipeline.nn.backend import get_array_module
from pipeline.nn.threads import parallel_rows


def get_conv_outsize(size, k, stride, pad_before, pad_after):
    """Output length of a valid sliding window of length k over a padded axis."""
    return (size + pad_before + pad_after - k) // stride + 1


def pad4(pad):
    """(top, bottom, left, right) from an int or a 4-sequence."""
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


def im2col(x, kh, kw, stride, pad):
    """Reference columns (N, Ho, Wo, kh, kw, C) of x (N, H, W, C): pad once, kh*kw strided-slice copies."""
    xp = get_array_module(x)
    pad = pad4(pad)
    n, h, w, c = x.shape
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(w, kw, stride, pad[2], pad[3])
    xpad = pad_nhwc(x, pad)
    col = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
    return col


def col2im(col, stride, pad, h, w):
    """Exact mirror of im2col: scatter-add columns (N, Ho, Wo, kh, kw, C) back into (N, h, w, C)."""
    xp = get_array_module(col)
    pad = pad4(pad)
    n, ho, wo, kh, kw, c = col.shape
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]
    img = xp.zeros((n, hp, wp, c), dtype=col.dtype)
    for i in range(kh):
        i_end = i + stride * ho
        for j in range(kw):
            j_end = j + stride * wo
            img[:, i:i_end:stride, j:j_end:stride, :] += col[:, :, :, i, j, :]
    return img[:, pad[0]:pad[0] + h, pad[2]:pad[2] + w, :]


def fill_columns(xpad, col, kh, kw, stride, ho, wo):
    """col[:, y, x, i, j, :] = xpad[:, y*stride + i, x*stride + j, :] for a padded block (im2col's copies).

    From tuning.FILL_ROWS_MIN_CHANNELS channels on, one copy per kernel row i: the source is a strided view
    whose (kw, C) block is contiguous in NHWC, so each copy moves runs of kw*C values instead of C. Fewer
    channels keep the kh*kw loop of strided slices, whose runs are longer.
    """
    xp = get_array_module(xpad)
    n, c = xpad.shape[0], xpad.shape[3]
    if c >= tuning.FILL_ROWS_MIN_CHANNELS:
        sn, sh, sw, sc = xpad.strides
        for i in range(kh):
            rows = xp.lib.stride_tricks.as_strided(
                xpad[:, i:], shape=(n, ho, wo, kw, c), strides=(sn, sh * stride, sw * stride, sw, sc))
            col[:, :, :, i, :, :] = rows
        return
    for i in range(kh):
        for j in range(kw):
            col[:, :, :, i, j, :] = xpad[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]


def column_matrix(x, kh, kw, stride, pad, ones=False, workspace=None, buffer=None):
    """Patches of x (N, H, W, C) as a matrix (N*Ho*Wo, kh*kw*C [+ 1]): im2col(x) reshaped, filled fast.

    ones=True appends a column of ones, so the bias rides along in the GEMM (forward) and its gradient
    falls out of the weight-gradient GEMM (backward) instead of costing a pass over the output each.
    A single channel is stored column-major, (K, M), filled with kh*kw copies whose runs are whole
    image rows; the matrix returned is then its transposed view, which BLAS takes as is.
    Row blocks are padded and filled on the engine's threads, each while it is in cache.
    The memory comes from `buffer` (a flat array at least that long) if given, else from `workspace`.
    """
    xp = get_array_module(x)
    pad = pad4(pad)
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
        fill_columns(pad_nhwc(x[r], pad), col6[r], kh, kw, stride, ho, wo)
        if ones:
            buf[r, :, :, k] = 1

    parallel_rows(fill, n, buf)
    return buf.reshape(m, kb)


# -- walking a batch in chunks -------------------------------------------------------------------------

def images_per_chunk(xp, n, ho, wo, k, itemsize):
    """Images per column chunk of a batch of n: on the CPU, so that a chunk's (images*Ho*Wo, K) column matrix
    is about tuning.COLUMN_CHUNK_BYTES; a GPU takes the whole batch at once."""
    return max(1, tuning.COLUMN_CHUNK_BYTES // (ho * wo * k * itemsize)) if xp is np else n


def chunks(rows, size):
    """Consecutive slices of at most `size` covering the slice `rows`."""
    return [slice(s, min(s + size, rows.stop)) for s in range(rows.start, rows.stop, size)]


def keep_store(keep, size, dtype, workspace, xp):
    """(kept, flat) for the column matrices a forward keeps for its backward: an empty dict to fill by
    first image and `size` values of memory (the workspace's "kept" slot, else fresh), when `keep` and
    they fit in tuning.KEEP_COLUMNS_BYTES; else (None, None)."""
    if not keep or size * np.dtype(dtype).itemsize > tuning.KEEP_COLUMNS_BYTES:
        return None, None
    flat = (workspace.slot("kept").array((size,), dtype, xp) if workspace is not None
            else xp.empty(size, dtype=dtype))
    return {}, flat


def kept_columns(kept, rows, per_image):
    """The columns a forward kept for the images `rows`, or None (not kept, or kept in other chunks)."""
    col = kept.get(rows.start) if kept is not None else None
    return col if col is not None and col.shape[0] == (rows.stop - rows.start) * per_image else None
