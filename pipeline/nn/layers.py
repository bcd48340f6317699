"""Layer objects: thin stateful wrappers around the forward/backward function pairs.

Each layer owns `params` and `grads` dicts (name -> array, same shapes), BN keeps its running statistics in
`buffers`. `build(input_shape, ...)` creates the arrays and returns the output shape (per example, no N).
Defaults: conv and dense kernels are He-normal (fan_in), biases zero and on (Keras's default for bias).
"""
import numpy as np

from pipeline.nn import activation, conv, convpool, dropout, linear, norm, pool
from pipeline.nn.backend import Workspace, get_array_module
from pipeline.nn.init import initialize


class Layer:
    """Base: no parameters, identity shape. `name` is '<index>.<type>' once the model places it."""

    kind = "layer"
    # True when forward returns fresh memory that no cache refers to (a following ReLU may overwrite it)
    fresh_output = False
    # True when backward returns fresh memory (a preceding ReLU may overwrite the gradient it receives)
    fresh_grad = False

    def __init__(self):
        self.name = self.kind
        self.params, self.grads, self.buffers = {}, {}, {}
        self.need_dx = True
        self.cache = None
        # set by the model for layers whose eval output only the next layer reads: eval passes write into
        # one buffer kept between calls (eval_output) instead of fresh memory. Above glibc's mmap threshold
        # (32 MiB at most) every fresh array is mapped anew and page-faulted: writing 86 MB into fresh
        # memory took 29 ms here, into reused memory 14 ms (deotte's first layers at batch 1000).
        self.reuse_eval_output = False
        self._eval_output = Workspace()

    def eval_output(self, train, shape, like):
        """The array of `shape` (dtype and backend of `like`) an eval pass writes into when
        reuse_eval_output is set (valid until the next eval pass of this layer), else None (allocate)."""
        if train or not self.reuse_eval_output:
            return None
        return self._eval_output.array(shape, like.dtype, get_array_module(like))

    def build(self, input_shape, rng, xp, dtype):
        return tuple(input_shape)

    def forward(self, x, train):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def _new_param(self, name, value, xp, dtype):
        self.params[name] = xp.asarray(np.asarray(value, dtype=dtype))
        self.grads[name] = xp.zeros_like(self.params[name])

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"


class Conv2D(Layer):
    """x (N, H, W, Cin) -> (N, Ho, Wo, filters); w (k, k, Cin, filters), b (filters,)."""

    kind = "conv2d"
    fresh_output = fresh_grad = True

    def __init__(self, filters, kernel=3, stride=1, padding="valid", bias=True, init="he_normal"):
        super().__init__()
        self.filters, self.stride, self.padding = int(filters), int(stride), padding
        self.kernel = (int(kernel), int(kernel)) if np.isscalar(kernel) else tuple(int(k) for k in kernel)
        self.bias, self.init = bool(bias), init
        # scratch for the columns, reused every call; eval has its own, so that an eval pass between a
        # training forward and its backward (a validation check) leaves the kept training columns alone
        self.workspace, self.eval_workspace = Workspace(), Workspace()
        # set by the model when a 2x2 max pool (and a ReLU before it) follows: this layer applies them
        # (convpool), those layers pass their input through
        self.fuse_pool = self.fuse_relu = False
        self.out_hw = None
        self.folded_bn = None  # set by the model for an eval pass: the BatchNorm after it, folded in here
        if self.filters < 1 or self.stride < 1 or min(self.kernel) < 1:
            raise ValueError(f"conv2d: filters, kernel and stride must be >= 1 (got {filters}, {kernel}, {stride})")

    def build(self, input_shape, rng, xp, dtype):
        h, w, c = input_shape
        kh, kw = self.kernel
        self.pad = conv.conv_padding(self.padding, (h, w), self.kernel, self.stride)
        ho = conv.get_conv_outsize(h, kh, self.stride, self.pad[0], self.pad[1])
        wo = conv.get_conv_outsize(w, kw, self.stride, self.pad[2], self.pad[3])
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: kernel {self.kernel} does not fit input {input_shape}")
        self._new_param("w", initialize(self.init, rng, (kh, kw, c, self.filters)), xp, dtype)
        if self.bias:
            self._new_param("b", np.zeros(self.filters), xp, dtype)
        self.out_hw = (ho, wo)
        return (ho, wo, self.filters)

    def forward(self, x, train):
        n, (ho, wo), f = x.shape[0], self.out_hw, self.filters
        if self.fuse_pool:
            out, self.cache = convpool.conv2d_maxpool_forward(
                x, self.params["w"], self.params.get("b"), self.pad, self.fuse_relu, train,
                workspace=self.workspace if train else self.eval_workspace,
                out=self.eval_output(train, (n, ho // 2, wo // 2, f), x))
            return out
        out_buffer = self.eval_output(train, (n, ho, wo, f), x)
        if not train and self.folded_bn is not None:
            w, b = self.folded_bn.fold(self.params["w"], self.params.get("b"))
            out, _ = conv.conv2d_forward(x, w, b, self.stride, self.pad, workspace=self.eval_workspace,
                                         out=out_buffer, keep_columns=False)
            self.cache = None  # not this layer's function: the model repeats the pass unfolded for a backward
            return out
        # eval keeps no columns: a backward after it (rare) rebuilds them
        if train:
            workspace = self.workspace
        elif get_array_module(x) is np:
            workspace = self.eval_workspace
        else:  # the GPU keeps no eval columns between calls (deotte's: ~1.5 GB at batch 1000); CuPy's pool
            workspace = None  # makes allocating them per call cheap
        out, self.cache = conv.conv2d_forward(x, self.params["w"], self.params.get("b"), self.stride, self.pad,
                                              workspace=workspace, out=out_buffer, keep_columns=train)
        return out

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError(f"{self.name}: backward needs a forward first")
        backward = convpool.conv2d_maxpool_backward if self.fuse_pool else conv.conv2d_backward
        dx, dw, db = backward(dout, self.cache, need_dx=self.need_dx)
        self.grads["w"][...] = dw
        if db is not None:
            self.grads["b"][...] = db
        return dx


class Dense(Layer):
    """x (N, D) -> (N, units); w (D, units), b (units,)."""

    kind = "dense"
    fresh_output = fresh_grad = True

    def __init__(self, units, bias=True, init="he_normal"):
        super().__init__()
        self.units, self.bias, self.init = int(units), bool(bias), init

    def build(self, input_shape, rng, xp, dtype):
        if len(input_shape) != 1:
            raise ValueError(f"dense expects a flat input, got shape {input_shape}: add a flatten layer")
        self._new_param("w", initialize(self.init, rng, (input_shape[0], self.units)), xp, dtype)
        if self.bias:
            self._new_param("b", np.zeros(self.units), xp, dtype)
        return (self.units,)

    def forward(self, x, train):
        out, self.cache = linear.dense_forward(x, self.params["w"], self.params.get("b"))
        return out

    def backward(self, dout):
        dx, dw, db = linear.dense_backward(dout, self.cache, need_dx=self.need_dx)
        self.grads["w"][...] = dw
        if db is not None:
            self.grads["b"][...] = db
        return dx


class BatchNorm(Layer):
    """Normalizes the last axis: NHWC maps over (N, H, W), dense activations over N."""

    kind = "batchnorm"
    fresh_output = fresh_grad = True

    def __init__(self, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.fuse_relu = False  # set by the model when a ReLU follows: this layer applies it too
        self.folded = False     # set by the model for an eval pass in which the convolution before applied it

    def build(self, input_shape, rng, xp, dtype):
        c = input_shape[-1]
        self._new_param("gamma", np.ones(c), xp, dtype)
        self._new_param("beta", np.zeros(c), xp, dtype)
        self.buffers["running_mean"] = xp.zeros(c, dtype=dtype)
        self.buffers["running_var"] = xp.ones(c, dtype=dtype)
        return tuple(input_shape)

    def fold(self, w, b):
        """(w', b') of a convolution (w (kh, kw, C, F), b (F,) or None) followed by this layer in eval:
        w' = w * s, b' = (b - running_mean) * s + beta with s = gamma / sqrt(running_var + eps)."""
        xp = get_array_module(w)
        dt = w.dtype.type
        s = self.params["gamma"] / xp.sqrt(self.buffers["running_var"] + dt(self.eps))
        shift = self.params["beta"] - self.buffers["running_mean"] * s
        return w * s, shift if b is None else b * s + shift

    def forward(self, x, train):
        if self.folded and not train:
            self.cache = None  # the model repeats the pass unfolded before a backward
            return activation.relu_forward(x, out=x)[0] if self.fuse_relu else x
        fn = norm.batchnorm_relu_forward if self.fuse_relu else norm.batchnorm_forward
        out, self.cache = fn(x, self.params["gamma"], self.params["beta"], self.buffers["running_mean"],
                             self.buffers["running_var"], train, self.momentum, self.eps,
                             out=self.eval_output(train, x.shape, x))
        return out

    def backward(self, dout):
        fn = norm.batchnorm_relu_backward if self.fuse_relu else norm.batchnorm_backward
        dx, dgamma, dbeta = fn(dout, self.cache)
        self.grads["gamma"][...] = dgamma
        self.grads["beta"][...] = dbeta
        return dx


class ReLU(Layer):
    kind = "relu"

    def __init__(self):
        super().__init__()
        self.inplace_forward = False   # set by the model when the input is disposable
        self.inplace_backward = False  # set by the model when the incoming gradient is disposable
        self.fused = False             # set by the model when the BatchNorm before or max pool after does it

    def forward(self, x, train):
        if self.fused:
            return x
        out, self.cache = activation.relu_forward(x, out=x if self.inplace_forward else None)
        return out

    def backward(self, dout):
        if self.fused:
            return dout
        return activation.relu_backward(dout, self.cache, out=dout if self.inplace_backward else None)


class LeakyReLU(Layer):
    kind = "leaky_relu"
    fresh_output = fresh_grad = True

    def __init__(self, alpha=0.01):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x, train):
        out, self.cache = activation.leaky_relu_forward(x, self.alpha)
        return out

    def backward(self, dout):
        return activation.leaky_relu_backward(dout, self.cache)


class MaxPool2D(Layer):
    kind = "maxpool"
    fresh_output = fresh_grad = True

    def __init__(self, size=2, stride=None):
        super().__init__()
        self.size = int(size)
        self.stride = int(stride) if stride else self.size
        # set by the model when a ReLU comes just before: max and ReLU commute (values and gradients, the
        # first maximum included), so this layer applies it to its output, a quarter of the size
        self.relu_after = False
        self.fused_into_conv = False  # set by the model when the convolution before computes this pooling

    def build(self, input_shape, rng, xp, dtype):
        h, w, c = input_shape
        return (pool.pool_outsize(h, self.size, self.stride), pool.pool_outsize(w, self.size, self.stride), c)

    def forward(self, x, train):
        if self.fused_into_conv:
            return x
        out, self.cache = pool.maxpool_forward(x, self.size, self.stride)
        if self.relu_after:
            out, relu_cache = activation.relu_forward(out, out=out)
            self.cache = (self.cache, relu_cache)
        return out

    def backward(self, dout):
        if self.fused_into_conv:
            return dout
        if self.relu_after:
            cache, relu_cache = self.cache
            return pool.maxpool_backward(activation.relu_backward(dout, relu_cache), cache)
        return pool.maxpool_backward(dout, self.cache)


class AvgPool2D(MaxPool2D):
    kind = "avgpool"
    relu_after = False  # the average does not commute with ReLU: never fused

    def forward(self, x, train):
        out, self.cache = pool.avgpool_forward(x, self.size, self.stride)
        return out

    def backward(self, dout):
        return pool.avgpool_backward(dout, self.cache)


class GlobalAvgPool(Layer):
    """(N, H, W, C) -> (N, C)."""

    kind = "global_avgpool"
    fresh_output = fresh_grad = True

    def build(self, input_shape, rng, xp, dtype):
        return (input_shape[-1],)

    def forward(self, x, train):
        out, self.cache = pool.global_avgpool_forward(x)
        return out

    def backward(self, dout):
        return pool.global_avgpool_backward(dout, self.cache)


class Dropout(Layer):
    """Inverted dropout; masks come from the model's numpy Generator (`rng`, set by the model)."""

    kind = "dropout"

    def __init__(self, rate=0.5):
        super().__init__()
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rng = None
        self.fixed_mask = None  # tests pin the mask to check gradients

    def forward(self, x, train):
        out, self.cache = dropout.dropout_forward(x, self.rate, train, self.rng, self.fixed_mask)
        return out

    def backward(self, dout):
        return dropout.dropout_backward(dout, self.cache)


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C) in C order."""

    kind = "flatten"

    def build(self, input_shape, rng, xp, dtype):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train):
        out, self.cache = linear.flatten_forward(x)
        return out

    def backward(self, dout):
        return linear.flatten_backward(dout, self.cache)


LAYER_TYPES = {
    "conv2d": Conv2D, "conv": Conv2D,
    "dense": Dense, "linear": Dense,
    "batchnorm": BatchNorm, "bn": BatchNorm,
    "relu": ReLU,
    "leaky_relu": LeakyReLU, "leakyrelu": LeakyReLU,
    "maxpool": MaxPool2D, "maxpool2d": MaxPool2D,
    "avgpool": AvgPool2D, "avgpool2d": AvgPool2D,
    "global_avgpool": GlobalAvgPool, "globalavgpool": GlobalAvgPool,
    "dropout": Dropout,
    "flatten": Flatten,
}


def layer_from_spec(spec):
    """A layer object from a spec dict like {"type": "conv2d", "filters": 32, "kernel": 3}."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a layer spec must be a dict with a 'type', got {spec!r}")
    kind = str(spec["type"]).lower()
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type '{spec['type']}' (known: {', '.join(sorted(LAYER_TYPES))})")
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        return LAYER_TYPES[kind](**options)
    except TypeError as exc:
        raise ValueError(f"layer {spec!r}: {exc}") from None
