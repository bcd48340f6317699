"""2-D convolution in NHWC, CS231n style: conv2d_forward / conv2d_backward, and the naive loop reference.

Shapes: x (N, H, W, C), w (kh, kw, C, F), b (F,) or None, out (N, Ho, Wo, F).
Padding is (top, bottom, left, right); `conv_padding` turns 'valid' | 'same' | int into that tuple.

Forward: im2col the Chainer way (im2col.py), one GEMM with the bias as an extra row of the kernel matrix,
a few images at a time on each thread so that columns and products stay in cache.
Backward: one dispatch, `conv2d_backward`, picks a route of conv_routes.py (`backward_route`); every
threshold it reads is in tuning.py. The naive references at the end define what every route computes.
"""
import math

import numpy as np

from pipeline.nn import tuning
from pipeline.nn.backend import get_array_module
from pipeline.nn.conv_routes import (backward_columns, backward_correlation, conv2d_input_grad_phases,
                                     conv2d_input_grad_rows, conv2d_input_grad_shifted)
from pipeline.nn.im2col import chunks, images_per_chunk, column_matrix, get_conv_outsize, keep_store, pad4, pad_nhwc
from pipeline.nn.threads import parallel_batches


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


def same_padding(size, k, stride):
    """Keras/TensorFlow 'same': out = ceil(size/stride); the smaller half before, the extra pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def kernel_matrix(w, b):
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
    multiplies the columns of a few images at a time (tuning.COLUMN_CHUNK_BYTES), so nothing big is stored:
    backward rebuilds the columns the same way, unless the whole matrix is at most tuning.KEEP_COLUMNS_BYTES
    and keep_columns is true (False suits a pass with no backward): then the chunks' columns are kept.
    workspace: optional memory.Workspace for the columns (one per thread through for_thread).
    out: optional (N, Ho, Wo, F) C-contiguous array to write the result into.
    cache: (x, w, has_bias, stride, pad, workspace, kept columns by first image or None) for
    conv2d_backward; x must stay unchanged until then.
    """
    xp = get_array_module(x)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    pad = pad4(pad)
    if out is not None and not out.flags.c_contiguous:
        raise ValueError("conv2d_forward: out must be C-contiguous")
    ho = get_conv_outsize(h, kh, stride, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, stride, pad[2], pad[3])
    kb = kh * kw * c + int(b is not None)
    wb = kernel_matrix(w, b)
    if out is None:
        out = xp.empty((n, ho, wo, f), dtype=x.dtype)
    chunk = images_per_chunk(xp, n, ho, wo, kb, x.itemsize)
    kept, keep_flat = keep_store(keep_columns, n * ho * wo * kb, x.dtype, workspace, xp)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        for r in chunks(rows, chunk):
            region = None if kept is None else keep_flat[r.start * ho * wo * kb:]
            col = column_matrix(x[r], kh, kw, stride, pad, ones=b is not None, workspace=ws, buffer=region)
            xp.matmul(col, wb, out=out[r].reshape(-1, f))
            if kept is not None:
                kept[r.start] = col

    parallel_batches(run, n, out, flops=n * ho * wo * kb * f)
    return out, (x, w, b is not None, stride, pad, workspace, kept)


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of conv2d_forward: dx (N, H, W, C) or None, dw (kh, kw, C, F), db (F,) or None.

    dout (N, Ho, Wo, F); cache from conv2d_forward. `need_dx=False` skips dx (a first layer).
    The one dispatch of the backward routes (conv_routes.py), chosen by backward_route:
    - "correlation": dx and dw from one column matrix of the padded output gradient;
    - "columns": per thread and chunk of images, [dw; db] += [col, 1].T @ dout from the kept or rebuilt
      columns, and dx by input_grad_route ("rows", "shifted" or "phases"); the threads' partial [dw; db]
      are summed in thread order;
    - "columns, one thread": the same with every chunk's columns kept and no dx, on one thread.
    The columns routes compute dw's GEMM transposed or not as dw_transposed says.
    """
    x, w, has_bias, stride, pad, workspace, kept = cache
    xp = get_array_module(dout)
    route = backward_route(w.shape, x.shape, stride, pad, has_bias, bool(kept), need_dx, xp)
    if route == "correlation":
        return backward_correlation(dout, x, w, has_bias, pad, workspace)
    grad = input_grad_function(w.shape, x.shape, stride, pad, xp) if need_dx else None
    return backward_columns(dout, cache, grad, dw_one_thread=route == "columns, one thread",
                            transposed=dw_transposed(w.shape))


def backward_route(w_shape, x_shape, stride, pad, has_bias, kept, need_dx, xp):
    """Which route conv2d_backward takes: "correlation", "columns" or "columns, one thread".

    kept: the forward kept its columns; the thresholds are tuning.py's.
    """
    kh, kw, c, f = w_shape
    if need_dx and not kept and xp is np and correlation_backward_pays(w_shape, x_shape, stride, pad):
        return "correlation"
    if kept and not need_dx and min(kh * kw * c + int(has_bias), f) < tuning.SMALL_GEMM_SIDE:
        return "columns, one thread"  # only the dw GEMMs are left, too small to gain from a second thread
    return "columns"


def dw_transposed(w_shape):
    """True where the columns routes take dw's GEMM as (dout.T @ col).T: at most
    tuning.DW_TRANSPOSED_MAX_FILTERS filters."""
    return w_shape[3] <= tuning.DW_TRANSPOSED_MAX_FILTERS


def correlation_backward_pays(w_shape, x_shape, stride, pad):
    """True where the "correlation" route beats rebuilding the columns + shifted taps: stride 1, at least
    tuning.CORRELATION_MIN_CHANNELS input channels (fewer take the banded rows), padding within the kernel,
    and an input of at most tuning.CORRELATION_MAX_INPUT_RATIO times the output's pixels (the full
    correlation runs over the input)."""
    kh, kw, c, f = w_shape
    _, h, wd, _ = x_shape
    pad = pad4(pad)
    if (stride != 1 or c < tuning.CORRELATION_MIN_CHANNELS or max(pad[0], pad[1]) > kh - 1
            or max(pad[2], pad[3]) > kw - 1):
        return False
    ho = get_conv_outsize(h, kh, 1, pad[0], pad[1])
    wo = get_conv_outsize(wd, kw, 1, pad[2], pad[3])
    return h * wd <= tuning.CORRELATION_MAX_INPUT_RATIO * ho * wo


INPUT_GRADS = {"rows": conv2d_input_grad_rows, "shifted": conv2d_input_grad_shifted,
               "phases": conv2d_input_grad_phases}


def input_grad_route(w_shape, x_shape, stride, pad, xp):
    """Which input-gradient routine dx takes: "rows" (banded GEMM, NumPy only: it works around NumPy's
    short inner loops) or "shifted" (taps) at stride 1, "phases" (phase-split correlations) otherwise."""
    if stride != 1:
        return "phases"
    if xp is np and rows_input_grad_pays(w_shape, x_shape, pad4(pad)):
        return "rows"
    return "shifted"


def input_grad_function(w_shape, x_shape, stride, pad, xp):
    """The input-gradient routine of input_grad_route, called as grad(dout, w, stride, pad, x_shape,
    workspace, out=dx) (convpool.py takes it too)."""
    return INPUT_GRADS[input_grad_route(w_shape, x_shape, stride, pad, xp)]


def rows_input_grad_pays(w_shape, x_shape, pad):
    """True where the banded rows beat the shifted taps (stride 1): fewer than tuning.ROWS_MAX_CHANNELS
    input channels, so the shifted adds run C-long loops, and a padded width of at most
    tuning.ROWS_MAX_WIDTH_KERNELS kernel widths, the banded GEMM's multiplies over the tap GEMMs'."""
    kh, kw, c, f = w_shape
    return c < tuning.ROWS_MAX_CHANNELS and x_shape[2] + pad[2] + pad[3] <= tuning.ROWS_MAX_WIDTH_KERNELS * kw


def conv2d_forward_naive(x, w, b, stride=1, pad=0):
    """Reference: explicit loops over output pixels; same contract as conv2d_forward (cache = inputs)."""
    xp = get_array_module(x)
    pad = pad4(pad)
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
