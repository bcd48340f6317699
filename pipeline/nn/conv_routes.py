"""The fast routes of the convolution's backward pass; conv.conv2d_backward picks one (thresholds: tuning.py).

Shapes as in conv.py: x (N, H, W, C), w (kh, kw, C, F), dout (N, Ho, Wo, F), pad (top, bottom, left, right).

Whole backward passes, per thread and chunk of images:
- `backward_columns`: [dw; db] += [col, 1].T @ dout from the (kept or rebuilt) columns, then dx by one of
  the input-gradient routes below;
- `backward_correlation` (stride 1, wide layers, columns not kept): dx and dw from one column matrix of the
  padded output gradient.
Input gradients dx, none of them col2im's C-long scatter-adds:
- `conv2d_input_grad_shifted` (stride 1): one batched GEMM per tap, then kh*kw shifted adds;
- `conv2d_input_grad_rows` (stride 1, few channels, NumPy): one banded GEMM over whole rows;
- `conv2d_input_grad_phases` (any stride): phase-split stride-1 correlations, one im2col + GEMM per phase.
All three take (dout, w, stride, pad, x_shape, workspace=None, out=None).
"""
import numpy as np

from pipeline.nn.backend import get_array_module
from pipeline.nn.im2col import (chunks, images_per_chunk, column_matrix, fill_columns, get_conv_outsize, kept_columns,
                                pad4)
from pipeline.nn.norm import channel_sum
from pipeline.nn.threads import gemm, parallel_batches, parallel_gemm_rows, parallel_rows, sum_in_order


def backward_columns(dout, cache, input_grad=None, dw_one_thread=False, transposed=False):
    """(dx or None, dw, db or None) from the columns, chunk by chunk; dx by `input_grad` (None: no dx).

    dw_one_thread: the forward kept every chunk's columns and only the weight-gradient GEMMs are left, too
    small to gain from a second thread (tuning.SMALL_GEMM_SIDE): one thread walks the kept chunks.
    transposed: each chunk's [dw; db] as (dout.T @ col).T instead of col.T @ dout (conv.dw_transposed).
    """
    x, w, has_bias, stride, pad, workspace, kept = cache
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    k = kh * kw * c
    n, ho, wo, _ = dout.shape
    kb = k + int(has_bias)
    dx = xp.empty(x.shape, dtype=dout.dtype) if input_grad is not None else None
    chunk = images_per_chunk(xp, n, ho, wo, kb, dout.itemsize)

    def run(rows, t, walk=None):
        ws = workspace.for_thread(t) if workspace is not None else None
        total = None
        for r in walk if walk is not None else chunks(rows, chunk):
            col = kept_columns(kept, r, ho * wo)
            if col is None:
                col = column_matrix(x[r], kh, kw, stride, pad, ones=has_bias, workspace=ws)
            dout2 = dout[r].reshape(-1, f)
            part = (dout2.T @ col).T if transposed else col.T @ dout2
            total = part if total is None else total + part
            if dx is not None:  # the columns are dead once their part of dw exists: dx may reuse the workspace
                input_grad(dout[r], w, stride, pad, x[r].shape, ws, out=dx[r])
        return total

    if dw_one_thread:
        walk = [slice(s, s + kept[s].shape[0] // (ho * wo)) for s in sorted(kept)]
        parts = [run(slice(0, n), 0, walk)]
    else:
        parts = [p for p in parallel_batches(run, n, dout, flops=n * ho * wo * kb * f) if p is not None]
    dwb = sum_in_order(parts)
    dw = dwb[:k].reshape(w.shape)
    db = dwb[k] if has_bias else None
    return dx, xp.ascontiguousarray(dw), db


def backward_correlation(dout, x, w, has_bias, pad, workspace=None):
    """(dx, dw, db) of a stride-1 convolution from one column matrix of the padded output gradient.

    D = im2col(dout padded by k-1-pad) (N*H*W, kh*kw*F) serves both gradients: dx = D @ flipped w (the full
    correlation, one GEMM with K = kh*kw*F instead of kh*kw GEMMs with K = F and shifted adds), and
    dw = flip(x.T @ D), x itself being the other operand, so the input's columns are never rebuilt.
    Per thread and chunk as backward_columns; the threads' partial dw are summed in thread order.
    """
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x.shape
    pad = pad4(pad)
    full = (kh - 1 - pad[0], kh - 1 - pad[1], kw - 1 - pad[2], kw - 1 - pad[3])
    flipped = xp.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2)).reshape(kh * kw * f, c)
    dx = xp.empty(x.shape, dtype=dout.dtype)
    chunk = images_per_chunk(xp, n, h, wd, kh * kw * f, dout.itemsize)

    def run(rows, t):
        ws = workspace.for_thread(t) if workspace is not None else None
        total = None
        for r in chunks(rows, chunk):
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
    pad = pad4(pad)
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


def conv2d_input_grad_rows(dout, w, stride, pad, x_shape, workspace=None, out=None):
    """dx (N, H, W, C) for stride 1 as one GEMM over whole rows, then kh row-shifted adds (no workspace).

    Output row y reaches padded input row y + i through a banded (Toeplitz) matrix T_i (Wo*F, Wp*C) that
    holds w[i] at every horizontal offset: z = dout rows (N*Ho, Wo*F) @ [T_0 ... T_kh-1], and each z_i
    is added to dx rows shifted by i, in runs of Wp*C values. Wp/kw times the multiplies of the tap
    GEMMs (zeros of the band), but one GEMM with wide K and N instead of kh*kw with F and C, and adds
    that are not C values long: the win for few channels (conv.rows_input_grad_pays).
    """
    if stride != 1:
        raise ValueError("conv2d_input_grad_rows handles stride 1 only")
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, ho, wo, _ = dout.shape
    _, h, wd, _ = x_shape
    pad = pad4(pad)
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


def conv2d_input_grad_phases(dout, w, stride, pad, x_shape, workspace=None, out=None):
    """dx (N, H, W, C) of a convolution, as stride-1 correlations of dout with the flipped kernel.

    Input row h = a + stride*u (phase a) receives dout[y] through the taps i = h + pad_top - stride*y,
    which all share i mod stride: per phase pair (a, b) that is a valid correlation of a zero-extended
    dout window with the flipped sub-kernel w[i0::stride, j0::stride], one im2col and one GEMM.
    Stride 1 is the single phase, the classic full convolution; nothing is scattered with +=.
    """
    xp = get_array_module(dout)
    kh, kw, c, f = w.shape
    n, h, wd, _ = x_shape
    pad = pad4(pad)
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
            fill_columns(win, col[r], mh, mw, 1, rows, cols)

        parallel_rows(fill, n, col)
        single = dx is None  # stride 1: the single phase is the whole gradient
        # straight into `out` where a 2-D view of it exists (C order); else copied into it below
        direct = single and out is not None and out.flags.c_contiguous
        grad = gemm(col.reshape(n * rows * cols, mh * mw * f), xp.ascontiguousarray(sub).reshape(mh * mw * f, c),
                    out=out.reshape(n * rows * cols, c) if direct else None)
        grad = grad.reshape(n, rows, cols, c)
        if single:
            if out is None or direct:
                return grad if out is None else out
            out[...] = grad
            return out

        def scatter(r):
            dx[r, a::stride, b::stride, :] = grad[r]

        parallel_rows(scatter, n, grad)
    return dx
