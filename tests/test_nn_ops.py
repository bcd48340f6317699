"""Fast ops against their naive loop references, optimizers and schedules against hand-computed values,
state round trips, model building."""
import math

import numpy as np
import pytest

from pipeline.nn.errors import EngineError
from pipeline.fileio import load_npz, save_npz
from pipeline.nn import (ARCHITECTURES, activation, build_model, conv, conv_routes, convpool, im2col, make_optimizer,
                         make_schedule, norm, pool, select_device, softmax, softmax_cross_entropy, to_numpy, tuning)
from pipeline.nn.backend import get_array_module, to_device

DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)


CONV_CASES = [
    ((2, 7, 7, 3), (3, 3, 4), 1, "valid"),
    ((2, 8, 9, 2), (3, 3, 5), 2, "same"),
    ((3, 24, 24, 2), (5, 5, 3), 2, "same"),     # deotte's asymmetric case
    ((1, 6, 5, 1), (5, 5, 2), 1, 2),
    ((2, 9, 9, 4), (4, 4, 3), 3, "valid"),
    ((2, 8, 7, 3), (2, 2, 2), 3, 1),            # stride > kernel
    ((2, 28, 28, 1), (5, 5, 6), 1, 2),          # lenet's single-channel first layer
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,k,stride,padding", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_fast_equals_naive(dtype, x_shape, k, stride, padding, bias):
    rng = np.random.default_rng(0)
    kh, kw, f = k
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((kh, kw, x_shape[3], f)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if bias else None
    pad = conv.conv_padding(padding, x_shape[1:3], (kh, kw), stride)
    out, cache = conv.conv2d_forward(x, w, b, stride, pad)
    ref, ref_cache = conv.conv2d_forward_naive(x, w, b, stride, pad)
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, **tol(dtype))
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, want in zip(conv.conv2d_backward(dout, cache), conv.conv2d_backward_naive(dout, ref_cache)):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tol(dtype))


@pytest.mark.parametrize("x_shape,k,stride,padding", [c for c in CONV_CASES if c[2] == 1]
                         + [((2, 6, 7, 3), (2, 3, 4), 1, (1, 0, 2, 1)), ((1, 14, 14, 6), (5, 5, 16), 1, 0)])
def test_conv2d_input_grad_three_paths_agree(x_shape, k, stride, padding):
    """Stride 1: phase-split correlation, shifted taps and banded rows give the same dx."""
    rng = np.random.default_rng(5)
    kh, kw, f = k
    w = rng.standard_normal((kh, kw, x_shape[3], f))
    pad = conv.conv_padding(padding, x_shape[1:3], (kh, kw), stride)
    ho = conv.get_conv_outsize(x_shape[1], kh, 1, pad[0], pad[1])
    wo = conv.get_conv_outsize(x_shape[2], kw, 1, pad[2], pad[3])
    dout = rng.standard_normal((x_shape[0], ho, wo, f))
    shifted = conv_routes.conv2d_input_grad_shifted(dout, w, 1, pad, x_shape)
    for route in (conv_routes.conv2d_input_grad_phases, conv_routes.conv2d_input_grad_rows):
        np.testing.assert_allclose(route(dout, w, 1, pad, x_shape), shifted, rtol=1e-10, atol=1e-12)
    for route in (conv_routes.conv2d_input_grad_rows, conv_routes.conv2d_input_grad_phases):
        out = np.full(x_shape, np.nan)  # every entry written, whatever was there
        assert route(dout, w, 1, pad, x_shape, out=out) is out
        np.testing.assert_allclose(out, shifted, rtol=1e-10, atol=1e-12)
        wide = np.full((*x_shape[:3], x_shape[3] + 2), np.nan)  # an out that is a view, not C-contiguous
        route(dout, w, 1, pad, x_shape, out=wide[..., :x_shape[3]])
        np.testing.assert_allclose(wide[..., :x_shape[3]], shifted, rtol=1e-10, atol=1e-12)


def test_rows_input_grad_is_chosen_for_narrow_layers_only():
    assert conv.rows_input_grad_pays((5, 5, 6, 16), (128, 14, 14, 6), (0, 0, 0, 0))        # lenet5's second
    assert not conv.rows_input_grad_pays((3, 3, 8, 16), (128, 14, 14, 8), (1, 1, 1, 1))    # width 16 > 3 * 3
    assert not conv.rows_input_grad_pays((3, 3, 32, 64), (128, 12, 12, 32), (0, 0, 0, 0))  # 32 channels
    assert conv.input_grad_function((3, 3, 2, 2), (1, 5, 5, 2), 2, (0, 0, 0, 0), np) is \
        conv_routes.conv2d_input_grad_phases


def test_im2col_and_col2im_are_adjoint():
    """<im2col(x), c> == <x, col2im(c)>: col2im is the exact mirror of im2col."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 7, 6, 3))
    pad = (1, 2, 0, 1)
    col = im2col.im2col(x, 3, 2, 2, pad)
    c = rng.standard_normal(col.shape)
    assert np.sum(col * c) == pytest.approx(np.sum(x * im2col.col2im(c, 2, pad, 7, 6)), rel=1e-12)


@pytest.mark.parametrize("x_shape,kh,kw,stride,pad", [((2, 7, 6, 3), 3, 2, 2, (1, 2, 0, 1)),
                                                      ((3, 9, 9, 1), 5, 5, 1, (2, 2, 2, 2)),  # channel-major
                                                      ((2, 8, 8, 4), 2, 2, 2, 0)])
@pytest.mark.parametrize("ones", [False, True])
def test_fast_column_matrix_equals_the_reference_im2col(monkeypatch, x_shape, kh, kw, stride, pad, ones):
    """The columns the convolutions use (threaded, row copies, lent memory, a column of ones) are im2col's."""
    from pipeline.nn import im2col, threads

    monkeypatch.setattr(tuning, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tuning, "BLOCK_BYTES", 256)
    x = np.random.default_rng(12).standard_normal(x_shape)
    ref = im2col.im2col(x, kh, kw, stride, pad)
    ref = ref.reshape(-1, kh * kw * x_shape[3])
    if ones:
        ref = np.concatenate([ref, np.ones((len(ref), 1))], axis=1)
    threads.set_num_threads(3)
    try:
        for min_channels in (2, 99):  # by kernel rows, and the kh*kw loop
            monkeypatch.setattr(tuning, "FILL_ROWS_MIN_CHANNELS", min_channels)
            np.testing.assert_array_equal(im2col.column_matrix(x, kh, kw, stride, pad, ones=ones), ref)
    finally:
        threads.set_num_threads(None)


def test_thresholds_live_in_tuning_only():
    from pipeline.nn import backend

    with pytest.raises(AttributeError):
        backend.PARALLEL_MIN_BYTES  # thresholds moved to tuning.py: patching the old place must fail loudly
    with pytest.raises(AttributeError):
        backend.scratch  # threads.py's, with no shim left here


def test_threaded_passes_match_one_thread(monkeypatch):
    """Every row-split pass and GEMM (forced on tiny arrays, 3 threads) gives what one thread gives."""
    from pipeline.nn import threads as engine_threads

    x = np.random.default_rng(7).random((5, 28, 28, 1)).astype(np.float64)
    y = np.array([0, 1, 2, 3, 4])

    def step(name):
        model = build_model(name, seed=2, dtype=np.float64)
        loss, d = softmax_cross_entropy(model.forward(x, train=True), y)
        dx = model.backward(d)
        return loss, dx, {n: g.copy() for n, _, g in model.params()}

    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(tuning, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(tuning, "GEMM_MIN_FLOPS", 0)
        engine_threads.configure(threads)  # BLAS held to one thread: GEMMs and whole layers split too
        try:
            results[threads] = {name: step(name) for name in ("deotte", "lenet5")}
        finally:
            engine_threads.set_num_threads(None)  # back to the default
    for name in ("deotte", "lenet5"):
        (l1, dx1, g1), (l3, dx3, g3) = results[1][name], results[3][name]
        assert l1 == pytest.approx(l3, rel=1e-12)
        np.testing.assert_allclose(dx1, dx3, rtol=1e-9, atol=1e-12)
        for k in g1:
            np.testing.assert_allclose(g1[k], g3[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_conv2d_same_output_sizes():
    for size, k, s in [(24, 5, 2), (28, 3, 1), (8, 5, 2), (7, 3, 2)]:
        pad = conv.conv_padding("same", (size, size), (k, k), s)
        assert conv.get_conv_outsize(size, k, s, pad[0], pad[1]) == math.ceil(size / s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,size,stride", [((2, 6, 6, 3), 2, 2), ((2, 7, 5, 2), 2, 2),
                                               ((2, 6, 8, 20), 2, 2),  # wide: the other column stage
                                               ((1, 7, 7, 2), 3, 2), ((2, 6, 6, 2), 3, 3)])
def test_pooling_fast_equals_naive(dtype, shape, size, stride):
    rng = np.random.default_rng(1)
    # ReLU-like data: many exact ties at 0 check the first-maximum rule against np.argmax
    x = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    x[0, :2, :2, 0] = 1.0
    ref, ref_cache = pool.maxpool_forward_naive(x, size, stride)
    dout = rng.standard_normal(ref.shape).astype(dtype)
    pairs = [(lambda x: pool.maxpool_forward(x, size, stride), pool.maxpool_backward)]
    if size == stride == 2:  # MaxPool2x2's own pair
        pairs.append((pool.maxpool2x2_forward, pool.maxpool2x2_backward))
    for forward, backward in pairs:
        out, cache = forward(x)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_allclose(backward(dout, cache), pool.maxpool_backward_naive(dout, ref_cache), **tol(dtype))
    out, cache = pool.avgpool_forward(x, size, stride)
    ref, ref_cache = pool.avgpool_forward_naive(x, size, stride)
    np.testing.assert_allclose(out, ref, **tol(dtype))
    np.testing.assert_allclose(pool.avgpool_backward(dout, cache), pool.avgpool_backward_naive(dout, ref_cache),
                               **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (8, 6)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_fast_equals_naive(dtype, shape, train):
    rng = np.random.default_rng(2)
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    out, cache = norm.batchnorm_forward(x, gamma, beta, rm, rv, train, momentum=0.2, eps=1e-3)
    ref, ref_cache = norm.batchnorm_forward_naive(x, gamma, beta, rm2, rv2, train, momentum=0.2, eps=1e-3)
    assert out.dtype == dtype and rm.dtype == dtype
    np.testing.assert_allclose(out, ref, **tol(dtype))
    np.testing.assert_allclose(rm, rm2, **tol(dtype))
    np.testing.assert_allclose(rv, rv2, **tol(dtype))
    dout = rng.standard_normal(shape).astype(dtype)
    for got, want in zip(norm.batchnorm_backward(dout, cache), norm.batchnorm_backward_naive(dout, ref_cache)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (8, 6)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("order", ["C", "F"])  # F: inputs not C-contiguous, which a 2-D view cannot write through
def test_batchnorm_relu_fast_equals_naive(dtype, shape, train, order):
    rng = np.random.default_rng(12)
    c = shape[-1]
    x = np.asarray((rng.standard_normal(shape) * 3 + 1).astype(dtype), order=order)
    gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    out, cache = norm.batchnorm_relu_forward(x, gamma, beta, rm, rv, train, momentum=0.2, eps=1e-3)
    ref, ref_cache = norm.batchnorm_relu_forward_naive(x, gamma, beta, rm2, rv2, train, momentum=0.2, eps=1e-3)
    assert out.dtype == dtype and 0 < (out > 0).mean() < 1
    np.testing.assert_allclose(out, ref, **tol(dtype))
    np.testing.assert_allclose(rm, rm2, **tol(dtype))
    np.testing.assert_allclose(rv, rv2, **tol(dtype))
    dout = np.asarray(rng.standard_normal(shape).astype(dtype), order=order)
    for got, want in zip(norm.batchnorm_relu_backward(dout, cache),
                         norm.batchnorm_relu_backward_naive(dout, ref_cache)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_relu_fast_equals_naive(dtype, order):
    rng = np.random.default_rng(13)
    x = np.asarray(rng.standard_normal((4, 5, 6, 3)).astype(dtype), order=order)
    x[0, 0, 0, 0] = 0.0  # the subgradient at 0 is 0
    out, cache = activation.relu_forward(x)
    ref, ref_cache = activation.relu_forward_naive(x)
    np.testing.assert_array_equal(out, ref)
    dout = np.asarray(rng.standard_normal(x.shape).astype(dtype), order=order)
    np.testing.assert_array_equal(activation.relu_backward(dout, cache),
                                  activation.relu_backward_naive(dout, ref_cache))
    with pytest.raises(ValueError, match="C-contiguous"):
        activation.relu_forward(x, out=np.empty(x.shape[::-1], dtype).T)


def test_batchnorm_running_statistics_pytorch_convention():
    x = np.arange(12, dtype=np.float64).reshape(2, 2, 1, 3)
    rm, rv = np.zeros(3), np.ones(3)
    norm.batchnorm_forward(x, np.ones(3), np.zeros(3), rm, rv, train=True, momentum=0.1)
    cols = x.reshape(-1, 3)
    np.testing.assert_allclose(rm, 0.1 * cols.mean(axis=0))
    np.testing.assert_allclose(rv, 0.9 + 0.1 * cols.var(axis=0, ddof=1))  # unbiased into the running var


def test_batchnorm_eval_uses_running_statistics():
    model = build_model([{"type": "flatten"}, {"type": "batchnorm"}], input_shape=(1, 1, 4), num_classes=4,
                        dtype=np.float64)
    bn = model.layers[1]
    bn.buffers["running_mean"][...] = [1.0, 2.0, 3.0, 4.0]
    bn.buffers["running_var"][...] = [4.0, 1.0, 0.25, 9.0]
    bn.params["gamma"][...] = 2.0
    bn.params["beta"][...] = 0.5
    x = np.array([[[[3.0, 3.0, 3.0, 3.0]]], [[[1.0, 2.0, 3.0, 4.0]]]])
    out = model.forward(x, train=False)
    expected = 2.0 * (x.reshape(2, 4) - [1, 2, 3, 4]) / np.sqrt(np.array([4.0, 1.0, 0.25, 9.0]) + 1e-5) + 0.5
    np.testing.assert_allclose(out, expected)
    assert model.forward(x[:1], train=False).shape == (1, 4)  # a batch of one is fine in eval


def test_softmax_and_loss_values():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    loss, _ = softmax_cross_entropy(logits, np.array([0, 2]))
    assert loss == pytest.approx(math.log(3) / 2)
    # PyTorch's label smoothing: target (1-s) one_hot + s/K
    loss_s, _ = softmax_cross_entropy(np.zeros((1, 4)), np.array([1]), label_smoothing=0.2)
    assert loss_s == pytest.approx(math.log(4))
    logits = np.array([[2.0, 0.5, -1.0]])
    logp = logits - np.log(np.exp(logits).sum())
    want = -(0.8 + 0.2 / 3) * logp[0, 0] - 0.2 / 3 * (logp[0, 1] + logp[0, 2])
    assert softmax_cross_entropy(logits, np.array([0]), 0.2)[0] == pytest.approx(want)


# -- optimizers ------------------------------------------------------------------------------------
def _params(w, b):
    return [("0.w", w, w_grad(w)), ("0.b", b, w_grad(b))]


def w_grad(p):
    return np.linspace(-1.0, 1.0, p.size).reshape(p.shape)


def test_sgd_momentum_and_nesterov_formulas():
    g = np.array([0.5, -1.0])
    for nesterov in (False, True):
        w = np.array([1.0, 2.0])
        opt = make_optimizer("sgd", momentum=0.9, nesterov=nesterov)
        w_ref, buf = w.copy(), None
        for lr in (0.1, 0.05, 0.02):
            opt.step([("0.b", w, g)], lr)
            buf = g.copy() if buf is None else 0.9 * buf + g
            w_ref -= lr * (g + 0.9 * buf if nesterov else buf)
            np.testing.assert_allclose(w, w_ref, rtol=1e-15)
    w = np.array([1.0, 2.0])
    make_optimizer("sgd", momentum=0.0).step([("0.w", w, g)], 0.5)
    np.testing.assert_allclose(w, [0.75, 2.5])


def test_adam_and_adamw_formulas():
    for name, wd in (("adam", 0.0), ("adamw", 0.1)):
        w, b = np.array([[1.0, -2.0]]), np.array([0.5])
        opt = make_optimizer(name, betas=(0.8, 0.9), eps=1e-8, weight_decay=wd)
        state = {}
        refs = {"0.w": w.copy(), "0.b": b.copy()}
        for t, lr in enumerate((0.1, 0.01, 0.001), start=1):
            params = _params(w, b)
            opt.step(params, lr)
            for pname, _, g in params:
                m, v = state.get(pname, (0.0, 0.0))
                m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g
                state[pname] = (m, v)
                ref = refs[pname]
                if pname.endswith(".w"):
                    ref *= 1 - lr * wd  # decoupled decay, kernels only
                ref -= lr / (1 - 0.8 ** t) * m / (np.sqrt(v) / math.sqrt(1 - 0.9 ** t) + 1e-8)
            np.testing.assert_allclose(w, refs["0.w"], rtol=1e-13)
            np.testing.assert_allclose(b, refs["0.b"], rtol=1e-13)
        assert int(opt.state_dict()["step"]) == 3


def test_regularization_applies_to_kernels_only():
    w, b = np.array([[1.0, -2.0]]), np.array([3.0])
    zero_w, zero_b = np.zeros_like(w), np.zeros_like(b)
    make_optimizer("sgd", momentum=0.0, l1=0.1, l2=0.5).step([("3.w", w, zero_w), ("3.b", b, zero_b)], 1.0)
    np.testing.assert_allclose(w, [[1.0 - 0.1 - 0.5, -2.0 + 0.1 + 1.0]])
    assert b[0] == 3.0
    w, b = np.array([[1.0, -2.0]]), np.array([3.0])
    make_optimizer("sgd", momentum=0.0, weight_decay=0.1).step([("3.w", w, zero_w), ("3.b", b, zero_b)], 0.5)
    np.testing.assert_allclose(w, [[0.95, -1.9]])
    assert b[0] == 3.0
    assert not zero_w.any()  # the model's gradient arrays are left as they were


def test_optimizer_errors():
    with pytest.raises(EngineError):
        make_optimizer("rmsprop")
    with pytest.raises(EngineError):
        make_optimizer("adam", weight_decay=0.01)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_state_round_trip_is_bit_exact(tmp_path, name):
    rng = np.random.default_rng(3)

    def run(opt, w, steps):
        for _ in range(steps):
            opt.step([("0.w", w, rng_grads.standard_normal(w.shape).astype(np.float32))], 0.01)

    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    rng_grads = np.random.default_rng(4)
    a, wa = make_optimizer(name, nesterov=True, weight_decay=0.01 if name != "adam" else 0.0), w0.copy()
    run(a, wa, 5)
    save_npz(tmp_path / "opt.npz", a.state_dict())
    saved_w, grads_state = wa.copy(), rng_grads.bit_generator.state
    run(a, wa, 3)
    b = make_optimizer(name, nesterov=True, weight_decay=0.01 if name != "adam" else 0.0)
    b.load_state_dict(load_npz(tmp_path / "opt.npz"))
    rng_grads.bit_generator.state = grads_state
    wb = saved_w.copy()
    run(b, wb, 3)
    np.testing.assert_array_equal(wa, wb)
    assert int(b.state_dict()["step"]) == 8
    with pytest.raises(ValueError):
        b.load_state_dict({"step": np.array(1), "0.w.bogus": np.zeros(2)})
    # against the parameters: every slot of each, in its shape, and no other name
    saved = load_npz(tmp_path / "opt.npz")
    params = [("0.w", w0, w0), ("0.b", np.zeros(4, np.float32), np.zeros(4, np.float32))]
    if name == "sgd":  # a missing buffer starts from the gradient, as on the first step
        b.load_state_dict(saved, params)
    else:  # Adam's moments cannot: the step count, and with it the bias correction, went on
        with pytest.raises(ValueError, match=r"missing \['0\.b\.exp_avg"):
            b.load_state_dict(saved, params)
    b.load_state_dict(saved, params[:1])
    with pytest.raises(ValueError, match=r"unexpected \['9\.w'\]"):
        b.load_state_dict({**saved, **{k.replace("0.w", "9.w"): v for k, v in saved.items() if k != "step"}},
                          params[:1])
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({k: v if k == "step" else v[:2] for k, v in saved.items()}, params[:1])
    b.load_state_dict({"step": np.array(0)}, params)  # before a first step: no slots yet


# -- schedules -------------------------------------------------------------------------------------
def test_schedules():
    const = make_schedule("constant", 0.1, epochs=3, steps_per_epoch=10)
    assert const(0) == const(29) == 0.1
    exp = make_schedule("exponential", 0.1, epochs=5, steps_per_epoch=10, lr_decay=0.5)
    assert [exp(s) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    step = make_schedule("step", 1.0, epochs=30, steps_per_epoch=2, lr_decay=0.1, step_epochs=10)
    assert [step(s) for s in (0, 19, 20, 41)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cos = make_schedule("cosine", 1.0, epochs=10, steps_per_epoch=10, warmup_epochs=1)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5)
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    nowarm = make_schedule("cosine", 1.0, epochs=2, steps_per_epoch=2)
    assert [nowarm(s) for s in range(4)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                                           0.5 * (1 + math.cos(3 * math.pi / 4))])
    with pytest.raises(EngineError):
        make_schedule("linear", 0.1, 1, 1)


def test_onecycle_matches_pytorch_definition():
    one = make_schedule("onecycle", 1.0, epochs=10, steps_per_epoch=10)
    # total 100 steps, peak at step 29 = 0.3*100 - 1, from 1/25 up, then down to 1/25/1e4 at step 99
    assert one(0) == pytest.approx(0.04)
    assert one(29) == pytest.approx(1.0)
    assert one(99) == pytest.approx(0.04 / 1e4)
    assert one(14) == pytest.approx(0.04 + (1 - 0.04) / 2 * (1 - math.cos(math.pi * 14 / 29)))
    assert one(200) == pytest.approx(one(99))
    assert max(one(s) for s in range(100)) == pytest.approx(1.0)


# -- model, state, devices -------------------------------------------------------------------------
def test_architectures_build_with_expected_shapes():
    shapes = {name: build_model(name).output_shapes for name in ARCHITECTURES}
    assert shapes["seed_small"][6] == (784,)
    assert shapes["lenet5"][6] == (400,)
    deotte = [s[0] for s in shapes["deotte"] if len(s) == 3]
    assert sorted(set(deotte), reverse=True) == [26, 24, 12, 10, 8, 4, 1]
    assert build_model("deotte", num_classes=7).forward(np.zeros((2, 28, 28, 1)), train=False).shape == (2, 7)


def test_build_model_rejects_bad_specs():
    with pytest.raises(EngineError):
        build_model("no_such_net")
    with pytest.raises(ValueError):
        build_model([{"type": "conv9d"}])
    with pytest.raises(ValueError):
        build_model([{"type": "dense", "units": 10}])  # needs a flatten first
    with pytest.raises(ValueError):
        build_model([{"type": "flatten"}, {"type": "dense", "units": 5}])  # output is not num_classes
    with pytest.raises(ValueError):
        build_model([{"type": "conv2d", "filters": 4, "kernel": 3, "colour": "red"}])


def test_same_seed_same_weights_and_float32_throughout():
    a, b = build_model("deotte", seed=5), build_model("deotte", seed=5)
    c = build_model("deotte", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["0.w"], sc["0.w"])
    x = np.random.default_rng(0).random((4, 28, 28, 1))  # float64 input is cast to the model's dtype
    h = x.astype(np.float32)
    for layer in a.layers:
        h = layer.forward(h, True)
        assert h.dtype == np.float32, layer
    _, d = softmax_cross_entropy(h, np.arange(4))
    assert a.backward(d).dtype == np.float32
    assert all(g.dtype == np.float32 for _, _, g in a.params())


def test_backward_without_input_gradient_gives_the_same_parameter_grads():
    x = np.random.default_rng(1).random((3, 28, 28, 1)).astype(np.float32)
    grads = []
    for input_grad in (True, False):
        m = build_model("lenet5", seed=1)
        _, d = softmax_cross_entropy(m.forward(x, train=True), np.array([1, 2, 3]))
        dx = m.backward(d, input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append({n: g.copy() for n, _, g in m.params()})
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name])


def test_state_dict_round_trip_and_strict_load(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.random((8, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, 8)
    model = build_model("deotte", seed=0)
    opt = make_optimizer("adam")
    _, d = softmax_cross_entropy(model.forward(x, train=True), y)
    model.backward(d)
    opt.step(model.params(), 1e-3)
    state = model.state_dict()
    assert "1.running_mean" in state and "1.running_var" in state and "0.w" in state
    save_npz(tmp_path / "model.npz", state)
    other = build_model("deotte", seed=9)
    other.load_state_dict(load_npz(tmp_path / "model.npz"))
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    np.testing.assert_array_equal(other.predict_proba(x), model.predict_proba(x))
    bad = dict(state)
    bad.pop("0.w")
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected"):
        other.load_state_dict({**state, "99.w": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**state, "0.w": np.zeros((3, 3, 1, 8))})
    # a failed load leaves the model as it was
    np.testing.assert_array_equal(other.state_dict()["0.w"], state["0.w"])


def test_dropout_rng_round_trip_gives_the_same_masks(tmp_path):
    x = np.ones((4, 28, 28, 1), dtype=np.float32)
    model = build_model("deotte", seed=3)
    model.forward(x, train=True)  # advance the stream
    save_npz(tmp_path / "rng.npz", model.get_rng_state())
    first = model.forward(x, train=True)
    other = build_model("deotte", seed=3)
    other.load_state_dict(model.state_dict())
    model2_state = load_npz(tmp_path / "rng.npz")
    assert model2_state["dropout_rng"].dtype.kind == "U" and model2_state["dropout_rng"].ndim == 0
    # BN running stats moved on in `model`; compare the dropout masks themselves
    drop = next(layer for layer in model.layers if layer.kind == "dropout")
    mask_a = drop.cache
    other.set_rng_state(model2_state)
    other.forward(x, train=True)
    mask_b = next(layer for layer in other.layers if layer.kind == "dropout").cache
    np.testing.assert_array_equal(mask_a[0], mask_b[0])  # cache: (keep mask, scale)
    assert mask_a[0].mean() == pytest.approx(0.6, abs=0.05)
    assert first.shape == (4, 10)
    # eval mode draws nothing
    state = model.get_rng_state()
    model.forward(x, train=False)
    assert model.get_rng_state()["dropout_rng"] == state["dropout_rng"]


def test_dropout_forward_draws_the_documented_mask():
    from pipeline.nn import dropout

    x = np.random.default_rng(0).standard_normal((64, 5, 5, 3)).astype(np.float32)
    out, cache = dropout.dropout_forward(x, 0.25, True, rng=np.random.default_rng(7))
    keep = np.random.default_rng(7).random(x.shape, dtype=np.float32) >= np.float32(0.25)  # float32 uniforms
    mask = keep * np.float32(1 / 0.75)
    np.testing.assert_allclose(out, x * mask, rtol=1e-6)
    d = np.ones_like(x)
    np.testing.assert_allclose(dropout.dropout_backward(d, cache), mask, rtol=1e-6)
    assert dropout.dropout_forward(x, 0.25, False, rng=None)[0] is x


def test_predict_proba():
    model = build_model("seed_small", seed=0)
    x = np.random.default_rng(4).random((7, 28, 28, 1)).astype(np.float32)
    p = model.predict_proba(x, batch_size=3)
    assert p.dtype == np.float32 and p.shape == (7, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, model.predict_proba(x, batch_size=100), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])
def test_conv_chunks_match_one_pass(monkeypatch, keep_bytes):
    """Columns built a few images at a time (forward and backward, train and eval), rebuilt in backward
    or kept from forward, change nothing."""
    x = np.random.default_rng(8).random((7, 28, 28, 1))
    y = np.arange(7) % 10

    def run():
        model = build_model("deotte", seed=1, dtype=np.float64)
        logits = model.forward(x, train=False)
        model.backward(softmax_cross_entropy(logits, y)[1])  # eval keeps no columns: rebuilt here
        grads = {"eval " + n: g.copy() for n, _, g in model.params()}
        _, d = softmax_cross_entropy(model.forward(x, train=True), y)
        model.backward(d)
        return logits, {**grads, **{n: g.copy() for n, _, g in model.params()}}

    whole_logits, whole_grads = run()
    monkeypatch.setattr(tuning, "COLUMN_CHUNK_BYTES", 30_000)  # one or two images per chunk
    monkeypatch.setattr(tuning, "KEEP_COLUMNS_BYTES", keep_bytes)
    assert conv.images_per_chunk(np, 64, 24, 24, 289, 8) == 1 and conv.images_per_chunk(np, 64, 1, 1, 1025, 8) == 3
    logits, grads = run()
    np.testing.assert_allclose(logits, whole_logits, rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], whole_grads[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_profile_layers_rows():
    from pipeline.nn import profile_layers
    from pipeline.nn.profile import format_profile

    model = build_model("small_bn", seed=0)  # with BatchNorm: profiling moved its running statistics
    x = np.random.default_rng(9).random((4, 28, 28, 1)).astype(np.float32)
    before, weights = model.get_rng_state(), model.state_dict()
    rows = profile_layers(model, x, np.arange(4), repeats=2)
    assert all(np.array_equal(a, model.state_dict()[k]) for k, a in weights.items())
    assert [r["layer"] for r in rows] == model.names + ["loss"]
    assert any("+" in r["layer"] for r in rows) and len(rows) == len(model.layers) + 1  # a fused layer is one row
    assert all(r["forward_ms"] >= 0 and r["backward_ms"] >= 0 for r in rows)
    assert model.get_rng_state()["dropout_rng"] == before["dropout_rng"]
    assert "total" in format_profile(rows)


def test_batch_of_one_in_training():
    x = np.random.default_rng(10).random((1, 28, 28, 1)).astype(np.float32)
    spec = [{"type": "conv2d", "filters": 4, "kernel": 3, "stride": 2}, {"type": "batchnorm"}, {"type": "relu"},
            {"type": "maxpool", "size": 2}, {"type": "flatten"}, {"type": "dense"}]
    model = build_model(spec, seed=0)  # conv BN: statistics over H*W, fine with one image
    _, d = softmax_cross_entropy(model.forward(x, train=True), np.array([3]))
    assert model.backward(d).shape == x.shape
    with pytest.raises(ValueError, match="more than one value"):
        build_model("deotte").forward(x, train=True)  # its last BN sees 1x1 maps: as in PyTorch, an error
    dense_bn = build_model([{"type": "flatten"}, {"type": "dense", "units": 4}, {"type": "batchnorm"},
                            {"type": "dense"}], seed=0)
    with pytest.raises(ValueError, match="more than one value"):
        dense_bn.forward(x, train=True)  # as PyTorch: no batch statistics from one value per channel


def test_training_reduces_the_loss():
    rng = np.random.default_rng(5)
    x = rng.random((32, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    model = build_model("lenet5", seed=0)
    opt = make_optimizer("adam")
    losses = []
    for _ in range(15):
        loss, d = softmax_cross_entropy(model.forward(x, train=True), y)
        model.backward(d, input_grad=False)
        opt.step(model.params(), 2e-3)
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0]


def test_backend_on_cpu():
    x = np.zeros(3)
    assert get_array_module(x) is np and get_array_module(x, None, 1.0) is np
    assert select_device("cpu") is np
    assert to_numpy(x) is x and to_device(x, np) is x
    with pytest.raises(EngineError):
        select_device("tpu")
    from pipeline.nn.backend import cupy_available
    if not cupy_available():
        assert select_device("auto") is np
        with pytest.raises(EngineError):
            select_device("gpu")


def assert_conv_backward_equals_naive(rng, x, w, b, pad):
    """Stride-1 conv backward (by whichever route the table picks) against the naive loops, float64."""
    out, cache = conv.conv2d_forward(x, w, b, 1, pad)
    dout = rng.standard_normal(out.shape)
    _, ref_cache = conv.conv2d_forward_naive(x, w, b, 1, pad)
    for got, want in zip(conv.conv2d_backward(dout, cache), conv.conv2d_backward_naive(dout, ref_cache)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("x_shape,k,padding", [((3, 22, 22, 16), (3, 3, 4), 0),       # like deotte's layer 3 (1.21x)
                                               ((2, 6, 7, 16), (3, 3, 5), 1),        # 'same'
                                               ((2, 8, 7, 17), (2, 3, 3), (1, 0, 2, 0))])
def test_conv2d_backward_by_correlation_equals_naive(monkeypatch, x_shape, k, padding):
    """The path that takes dx and dw from one column matrix of the output gradient (columns not kept)."""
    monkeypatch.setattr(tuning, "KEEP_COLUMNS_BYTES", 0)
    monkeypatch.setattr(tuning, "COLUMN_CHUNK_BYTES", 20_000)  # a few images per chunk
    rng = np.random.default_rng(9)
    kh, kw, f = k
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((kh, kw, x_shape[3], f))
    b = rng.standard_normal(f)
    pad = conv.conv_padding(padding, x_shape[1:3], (kh, kw), 1)
    assert conv.correlation_backward_pays(w.shape, x.shape, 1, pad)
    assert_conv_backward_equals_naive(rng, x, w, b, pad)


def test_correlation_backward_is_chosen_where_it_pays():
    assert conv.correlation_backward_pays((3, 3, 32, 32), (128, 26, 26, 32), 1, (0, 0, 0, 0))      # 1.17x
    assert not conv.correlation_backward_pays((3, 3, 32, 64), (128, 12, 12, 32), 1, (0, 0, 0, 0))  # 1.44x
    assert not conv.correlation_backward_pays((3, 3, 8, 8), (128, 26, 26, 8), 1, (0, 0, 0, 0))     # narrow
    assert not conv.correlation_backward_pays((3, 3, 32, 32), (128, 26, 26, 32), 2, (1, 1, 1, 1))  # stride
    assert not conv.correlation_backward_pays((3, 3, 32, 32), (128, 26, 26, 32), 1, (3, 3, 3, 3))  # pad > k-1


def test_the_engine_imports_nothing_from_the_rest_of_the_pipeline():
    import ast
    from pathlib import Path
    outside = []
    for path in sorted((Path(__file__).resolve().parents[1] / "pipeline" / "nn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            outside += [f"{path.name}: {n}" for n in names if n.startswith("pipeline") and
                        not (n == "pipeline.nn" or n.startswith("pipeline.nn."))]
    assert outside == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_ops_equal_their_naive_references(dtype):
    """Dense, leaky ReLU, dropout and the loss against the loop references beside them."""
    from pipeline.nn import activation, dropout, linear, loss

    rng = np.random.default_rng(13)
    x, w = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
    for bias in (None, rng.standard_normal(3).astype(dtype)):
        out, cache = linear.dense_forward(x, w, bias)
        ref, ref_cache = linear.dense_forward_naive(x, w, bias)
        np.testing.assert_allclose(out, ref, **tol(dtype))
        dout = rng.standard_normal(out.shape).astype(dtype)
        for got, want in zip(linear.dense_backward(dout, cache), linear.dense_backward_naive(dout, ref_cache)):
            assert (got is None) == (want is None)
            if got is not None:
                np.testing.assert_allclose(got, want, **tol(dtype))
    a = rng.standard_normal((3, 4, 5)).astype(dtype)
    out, cache = activation.leaky_relu_forward(a, 0.2)
    ref, ref_cache = activation.leaky_relu_forward_naive(a, 0.2)
    np.testing.assert_allclose(out, ref, **tol(dtype))
    np.testing.assert_allclose(activation.leaky_relu_backward(a, cache),
                               activation.leaky_relu_backward_naive(a, ref_cache), **tol(dtype))
    out, cache = dropout.dropout_forward(a, 0.3, True, rng=np.random.default_rng(1))
    ref, ref_cache = dropout.dropout_forward_naive(a, 0.3, True, rng=np.random.default_rng(1))
    np.testing.assert_allclose(out, ref, **tol(dtype))
    np.testing.assert_allclose(dropout.dropout_backward(a, cache), dropout.dropout_backward_naive(a, ref_cache),
                               **tol(dtype))
    logits, y = rng.standard_normal((6, 10)).astype(dtype), rng.integers(0, 10, 6)
    for smoothing in (0.0, 0.1):
        got_loss, got_d = loss.softmax_cross_entropy(logits, y, smoothing)
        want_loss, want_d = loss.softmax_cross_entropy_naive(logits, y, smoothing)
        assert got_loss == pytest.approx(want_loss, rel=1e-5 if dtype == np.float32 else 1e-12)
        np.testing.assert_allclose(got_d, want_d, **tol(dtype))
