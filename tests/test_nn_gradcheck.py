"""Every backward against centred numerical gradients in float64 (CS231n's gradient_check).

Error measure: max |analytic - numeric| / max(max |analytic|, max |numeric|), i.e. relative to the
gradient's scale, which stays meaningful where single entries are near zero. A gradient that is zero
in exact arithmetic (a conv bias before batch norm) has no scale: there the absolute error must be below
1e-9 (finite-difference noise is about 1e-11).
"""
import numpy as np
import pytest

from pipeline.nn import activation, build_model, conv, dropout, linear, norm, pool, softmax_cross_entropy
from pipeline.nn.optim import SGD
from pipeline.nn.parameterless import Dropout

TOL = 1e-6


def numeric_grad(f, x, h=1e-5):
    """Centred differences of the scalar f() with respect to every entry of x (perturbed in place)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def rel_error(a, b):
    err = float(np.abs(a - b).max())
    if err < 1e-9:
        return 0.0
    return err / max(np.abs(a).max(), np.abs(b).max())


def check_layer(forward, backward, inputs, rng):
    """forward(*inputs) -> (out, cache); backward(dout, cache) -> grads in the order of `inputs`."""
    out, cache = forward(*inputs)
    dout = rng.standard_normal(out.shape)
    grads = backward(dout, cache)
    for x, g in zip(inputs, grads):
        if g is None:
            continue
        num = numeric_grad(lambda: float((forward(*inputs)[0] * dout).sum()), x)
        assert g.shape == x.shape
        assert rel_error(g, num) < TOL, rel_error(g, num)


def away_from_zero(rng, shape, margin=1e-2):
    """Normal values pushed away from 0, so kinks (ReLU) are never crossed by the finite difference."""
    x = rng.standard_normal(shape)
    return x + np.sign(x) * margin


def distinct(rng, shape):
    """Values with no near-ties, so the max of every window is unambiguous."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 + rng.uniform(0, 0.01, shape)


CONV_CASES = [
    # (N, H, W, C), (kh, kw, F), stride, padding, bias
    ((2, 5, 5, 3), (3, 3, 4), 1, "valid", True),
    ((2, 6, 7, 2), (3, 3, 3), 2, "valid", True),
    ((1, 6, 6, 2), (5, 5, 3), 2, "same", True),        # asymmetric: total pad 3 -> 1 top, 2 bottom
    ((2, 5, 7, 2), (3, 3, 2), 1, "same", True),
    ((2, 7, 5, 1), (2, 3, 2), 1, 1, True),             # odd sizes, rectangular kernel, int padding
    ((1, 5, 5, 2), (3, 3, 2), 2, 2, False),            # batch of 1, no bias
    ((2, 4, 4, 3), (4, 4, 2), 1, "valid", True),       # kernel as large as the input -> 1x1
    ((2, 8, 7, 2), (2, 2, 3), 3, "valid", True),       # stride > kernel: some input pixels get no gradient
    ((1, 7, 7, 3), (3, 3, 2), 2, (1, 2, 0, 1), True),  # explicit asymmetric padding
]


@pytest.mark.parametrize("x_shape,k,stride,padding,bias", CONV_CASES)
def test_conv2d_backward(x_shape, k, stride, padding, bias):
    rng = np.random.default_rng(0)
    kh, kw, f = k
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((kh, kw, x_shape[3], f))
    b = rng.standard_normal(f) if bias else None
    pad = conv.conv_padding(padding, x_shape[1:3], (kh, kw), stride)
    inputs = [x, w] + ([b] if bias else [])
    forward = (lambda x, w, b=None: conv.conv2d_forward(x, w, b, stride, pad))
    check_layer(forward, conv.conv2d_backward, inputs, rng)


def test_same_padding_is_keras():
    assert conv.same_padding(24, 5, 2) == (1, 2)  # out 12: (12-1)*2 + 5 - 24 = 3
    assert conv.same_padding(28, 3, 1) == (1, 1)
    assert conv.same_padding(8, 5, 2) == (1, 2)
    assert conv.same_padding(5, 1, 2) == (0, 0)


def test_dense_backward():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    check_layer(linear.dense_forward, linear.dense_backward, [x, w, b], rng)
    check_layer(lambda x, w: linear.dense_forward(x, w, None), linear.dense_backward, [x, w], rng)


@pytest.mark.parametrize("shape,size,stride", [((2, 4, 4, 3), 2, 2), ((1, 5, 7, 2), 2, 2),
                                               ((2, 5, 5, 2), 3, 2), ((2, 6, 6, 1), 3, 3)])
def test_maxpool_backward(shape, size, stride):
    rng = np.random.default_rng(2)
    x = distinct(rng, shape)
    check_layer(lambda x: pool.maxpool_forward(x, size, stride), lambda d, c: (pool.maxpool_backward(d, c),),
                [x], rng)
    if size == stride == 2:  # MaxPool2x2's own pair
        check_layer(pool.maxpool2x2_forward, lambda d, c: (pool.maxpool2x2_backward(d, c),), [x], rng)


@pytest.mark.parametrize("shape,size,stride", [((2, 4, 4, 3), 2, 2), ((1, 5, 5, 2), 3, 2)])
def test_avgpool_backward(shape, size, stride):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    check_layer(lambda x: pool.avgpool_forward(x, size, stride), lambda d, c: (pool.avgpool_backward(d, c),),
                [x], rng)


def test_global_avgpool_backward():
    rng = np.random.default_rng(4)
    check_layer(pool.global_avgpool_forward, lambda d, c: (pool.global_avgpool_backward(d, c),),
                [rng.standard_normal((2, 3, 4, 5))], rng)


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (1, 3, 3, 2), (6, 4)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_backward(shape, train):
    rng = np.random.default_rng(5)
    c = shape[-1]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    def forward(x, gamma, beta):
        # copies: the update of the running statistics must not leak between evaluations
        return norm.batchnorm_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), train)

    check_layer(forward, norm.batchnorm_backward, [x, gamma, beta], rng)


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (6, 4)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_relu_backward(shape, train):
    rng = np.random.default_rng(15)
    c = shape[-1]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    running_mean, running_var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)

    def forward(x, gamma, beta):
        return norm.batchnorm_relu_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), train)

    out, _ = forward(x, gamma, beta)
    assert 0.2 < (out > 0).mean() < 0.8  # both sides of the ReLU are exercised
    assert np.abs(norm.batchnorm_forward(x, gamma, beta, running_mean.copy(), running_var.copy(), train)[0]
                  ).min() > 1e-4  # no pre-activation close enough to 0 for the finite difference to cross it
    check_layer(forward, norm.batchnorm_relu_backward, [x, gamma, beta], rng)


def test_relu_and_leaky_relu_backward():
    rng = np.random.default_rng(6)
    x = away_from_zero(rng, (3, 4, 5))
    check_layer(lambda x: activation.relu_forward(x), lambda d, c: (activation.relu_backward(d, c),), [x], rng)
    check_layer(lambda x: activation.leaky_relu_forward(x, 0.1),
                lambda d, c: (activation.leaky_relu_backward(d, c),), [x], rng)


def test_dropout_backward_with_a_fixed_mask():
    """A generator seeded alike on every pass draws the same mask: the objective is then a function."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 3, 2))
    check_layer(lambda x: dropout.dropout_forward(x, 0.4, True, rng=np.random.default_rng(0)),
                lambda d, c: (dropout.dropout_backward(d, c),), [x], rng)


def test_flatten_backward():
    rng = np.random.default_rng(8)
    check_layer(linear.flatten_forward, lambda d, c: (linear.flatten_backward(d, c),),
                [rng.standard_normal((2, 3, 2, 4))], rng)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_softmax_cross_entropy_gradient(smoothing):
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((5, 4)) * 3
    y = np.array([0, 3, 1, 1, 2])
    _, d = softmax_cross_entropy(logits, y, smoothing)
    num = numeric_grad(lambda: softmax_cross_entropy(logits, y, smoothing)[0], logits)
    assert rel_error(d, num) < TOL


TINY_SPEC = [
    {"type": "conv2d", "filters": 3, "kernel": 3, "padding": "same"},
    {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv2d", "filters": 4, "kernel": 3, "stride": 2, "padding": "same", "bias": False},
    {"type": "batchnorm"}, {"type": "leaky_relu", "alpha": 0.2}, {"type": "avgpool", "size": 1},
    {"type": "flatten"}, {"type": "dropout", "rate": 0.3},
    {"type": "dense", "units": 6}, {"type": "batchnorm"}, {"type": "relu"},
    {"type": "dense", "units": 3},
]


class FixedMaskDropout(Dropout):
    """A dropout layer that applies the same mask on every training pass (its generator seeded alike each
    time): the objective is then a function."""

    def __init__(self, seed):
        super().__init__(0.3)
        self.seed = seed

    def forward(self, x, train):
        out, self.cache = dropout.dropout_forward(x, self.rate, train, rng=np.random.default_rng(self.seed))
        return out


def test_whole_model_with_penalty_and_smoothing():
    """Every parameter of a small model, the input gradient, L1/L2 penalties through the optimizer."""
    rng = np.random.default_rng(10)
    model = build_model(TINY_SPEC, seed=3, dtype=np.float64, input_shape=(6, 6, 2), num_classes=3)
    k = next(k for k, layer in enumerate(model.layers) if layer.kind == "dropout")
    model.layers[k] = FixedMaskDropout(seed=1)
    x = rng.standard_normal((4, 6, 6, 2))
    y = np.array([0, 2, 1, 2])
    l1, l2 = 1e-3, 1e-2

    def objective():
        loss, _ = softmax_cross_entropy(model.forward(x, train=True), y, 0.1)
        return loss + model.penalty(l1, l2)

    loss, dlogits = softmax_cross_entropy(model.forward(x, train=True), y, 0.1)
    dx = model.backward(dlogits)
    assert rel_error(dx, numeric_grad(objective, x)) < TOL
    # one SGD step with lr 1 and no momentum moves each parameter by exactly its regularized gradient
    before = {name: p.copy() for name, p, _ in model.params()}
    numeric = {name: numeric_grad(objective, p) for name, p, _ in model.params()}
    SGD(momentum=0.0, l1=l1, l2=l2).step(model.params(), lr=1.0)
    for name, p, _ in model.params():
        analytic = before[name] - p
        assert rel_error(analytic, numeric[name]) < TOL, name


def test_penalty_value():
    model = build_model(TINY_SPEC, seed=0, dtype=np.float64, input_shape=(6, 6, 2), num_classes=3)
    kernels = [p for name, p, _ in model.params() if name.endswith(".w")]
    expected = 0.5 * sum(np.abs(w).sum() for w in kernels) + 0.25 / 2 * sum((w * w).sum() for w in kernels)
    assert model.penalty(0.5, 0.25) == pytest.approx(expected, rel=1e-12)
    assert model.penalty(0.0, 0.0) == 0.0
