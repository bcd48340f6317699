"""The fused convolution + ReLU + 2x2 max pool (pipeline.nn.convpool) against the unfused naive ops, numerical
gradients (the plan that picks it: tests/test_nn_model.py)."""
import numpy as np
import pytest

from pipeline.nn import build_model, conv, convpool, pool, softmax_cross_entropy, threads, tuning
from tests.test_nn_gradcheck import check_layer

CASES = [
    # (N, H, W, C), (kh, kw, F), padding, bias
    ((2, 6, 6, 1), (3, 3, 3), (1, 1, 1, 1), True),
    ((3, 9, 7, 2), (4, 2, 5), (0, 0, 0, 0), True),       # rectangular kernel, odd input, even output
    ((1, 28, 28, 1), (5, 5, 6), (2, 2, 2, 2), True),     # lenet's first layer, a batch of one
    ((2, 14, 14, 6), (5, 5, 16), (0, 0, 0, 0), False),   # lenet's second layer, no bias
    ((2, 6, 7, 3), (2, 3, 4), (1, 0, 0, 1), True),       # asymmetric padding
]


def reference(x, w, b, pad, relu):
    """conv -> [relu] -> maxpool 2x2 by the naive loops; returns (out, backward(dout) -> (dx, dw, db))."""
    c, c_cache = conv.conv2d_forward_naive(x, w, b, 1, pad)
    r = np.maximum(c, 0) if relu else c
    out, p_cache = pool.maxpool_forward_naive(r, 2, 2)

    def backward(dout):
        d = pool.maxpool_backward_naive(dout, p_cache)
        if relu:
            d = d * (c > 0)
        return conv.conv2d_backward_naive(d, c_cache)

    return out, backward


def tied_data(rng, shape, scale=1.0):
    """Small integers: the convolutions sum them exactly, so equal window values are exact ties."""
    return rng.integers(-2, 3, size=shape).astype(np.float64) * scale


@pytest.mark.parametrize("x_shape,k,pad,bias", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_fused_equals_naive_conv_relu_pool(x_shape, k, pad, bias, relu):
    rng = np.random.default_rng(0)
    kh, kw, f = k
    x = tied_data(rng, x_shape)
    x[0, :4, :4] = 1.0  # a plateau: whole windows of equal values
    w = tied_data(rng, (kh, kw, x_shape[3], f))
    b = tied_data(rng, (f,)) if bias else None
    out, cache = convpool.conv2d_maxpool_forward(x, w, b, pad, relu, train=True)
    ref, ref_backward = reference(x, w, b, pad, relu)
    np.testing.assert_array_equal(out, ref)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = convpool.conv2d_maxpool_backward(dout, cache)
    rdx, rdw, rdb = ref_backward(dout)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, rdw, rtol=1e-12, atol=1e-12)
    if bias:
        np.testing.assert_allclose(db, rdb, rtol=1e-12, atol=1e-12)
    else:
        assert db is None
    assert convpool.conv2d_maxpool_backward(dout, cache, need_dx=False)[0] is None
    # a backward after an eval pass (no masks kept) recomputes them
    out_eval, eval_cache = convpool.conv2d_maxpool_forward(x, w, b, pad, relu, train=False)
    np.testing.assert_array_equal(out_eval, ref)
    for got, want in zip(convpool.conv2d_maxpool_backward(dout, eval_cache), (dx, dw, db)):
        if want is not None:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("relu", [True, False])
def test_fused_gradients_are_numerical(relu):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 6, 2))
    w = rng.standard_normal((2, 3, 2, 3))
    b = rng.standard_normal(3) + 0.5
    check_layer(lambda x, w, b: convpool.conv2d_maxpool_forward(x, w, b, (1, 0, 0, 0), relu),
                convpool.conv2d_maxpool_backward, [x, w, b], rng)


def test_blocked_kernel_round_trip():
    """The blocked kernel's gradient folds back to the sum over the four block positions it was built from."""
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((3, 2, 2, 4)), rng.standard_normal(4)
    mat = convpool.blocked_kernel(w, b)
    assert mat.shape == (16, 4 * 3 * 2 + 1)
    dw, db = convpool.fold_kernel_grad(mat, w.shape, True)
    np.testing.assert_allclose(dw, 4 * w)
    np.testing.assert_allclose(db, 4 * b)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])
def test_fused_chunks_and_threads_change_nothing(monkeypatch, keep_bytes):
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((7, 12, 12, 2)), rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)
    dout = rng.standard_normal((7, 6, 6, 4))

    def run():
        out, cache = convpool.conv2d_maxpool_forward(x, w, b, (1, 1, 1, 1), True, train=True)
        return (out,) + convpool.conv2d_maxpool_backward(dout, cache)

    whole = run()
    monkeypatch.setattr(tuning, "KEEP_COLUMNS_BYTES", keep_bytes)
    monkeypatch.setattr(convpool, "images_per_chunk", lambda *args: 2)
    monkeypatch.setattr(tuning, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tuning, "GEMM_MIN_FLOPS", 0)
    threads.configure(3)  # BLAS held to one thread: the batch is split among the threads
    try:
        parts = run()
    finally:
        threads.set_num_threads(None)
    for got, want in zip(parts, whole):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
