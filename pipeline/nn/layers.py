"""Layer objects: thin stateful wrappers around the forward/backward function pairs, one per spec type.

Each layer owns `params` and `grads` dicts (name -> array, same shapes), BN keeps its running statistics in
`buffers`. `output_shape(input_shape)` gives the output shape (per example, no N) and checks that the layer
fits; `build(input_shape, ...)` creates the arrays and returns that shape.
Defaults: conv and dense kernels are He-normal (fan_in), biases zero and on (Keras's default for bias).

A layer behaves the same on every call: what it does is fixed by its constructor. The keyword-only
arguments after `*` (in-place ReLUs, reused eval buffers, the dropout generator) are chosen by the plan
(pipeline/nn/plan.py), never by a spec. Fused layers (pipeline/nn/fused.py) are other classes.
"""
import copy

import numpy as np

from pipeline.nn import activation, conv, dropout, linear, norm, pool
from pipeline.nn.backend import get_array_module
from pipeline.nn.memory import Workspace
from pipeline.nn.init import initialize


class Layer:
    """Base: no parameters, identity shape."""

    kind = "layer"
    # True when forward returns fresh memory that no cache refers to (a following ReLU may overwrite it)
    fresh_output = False
    # True when backward returns fresh memory (a preceding ReLU may overwrite the gradient it receives)
    fresh_grad = False
    # True for layers whose eval pass may write into a buffer kept between calls (see eval_output)
    reuse_eval_output = False

    def __init__(self):
        self.params, self.grads, self.buffers = {}, {}, {}
        self._new_scratch()

    def _new_scratch(self):
        """Per-call state, never shared between two layers: the cache a backward reads, and scratch memory.

        Eval passes of a layer built with reuse_eval_output=True (the plan's choice, for layers whose eval
        output only the next layer reads) write into one buffer kept between calls instead of fresh memory.
        Above glibc's mmap threshold (32 MiB at most) every fresh array is mapped anew and page-faulted:
        writing 86 MB into fresh memory took 29 ms here, into reused memory 14 ms (deotte's first layers at
        batch 1000)."""
        self.cache = None
        self._eval_output = Workspace()

    @property
    def parts(self):
        """The plain layers this one computes, in spec order (each holds the arrays of one spec entry)."""
        return (self,)

    def eval_output(self, train, shape, like):
        """The array of `shape` (dtype and backend of `like`) an eval pass writes into when the layer was built
        with reuse_eval_output (valid until the next eval pass of this layer), else None (allocate)."""
        if train or not self.reuse_eval_output:
            return None
        return self._eval_output.array(shape, like.dtype, get_array_module(like))

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def build(self, input_shape, rng, xp, dtype):
        return self.output_shape(input_shape)

    def forward(self, x, train):
        raise NotImplementedError

    def backward(self, dout, need_dx=True):
        """The gradient with respect to the input; fills self.grads. need_dx=False: layers with parameters
        may skip dx and return None (the model's first such layer, in training)."""
        raise NotImplementedError

    def forget(self):
        """Drop what the last pass kept for a backward."""
        self.cache = None

    def inference_copy(self):
        """A new layer with this one's configuration and arrays (shared, not copied) and its own cache and
        scratch memory: an inference model's passes leave this layer's state alone."""
        new = copy.copy(self)
        new._new_scratch()
        return new

    def _new_param(self, name, value, xp, dtype):
        self.params[name] = xp.asarray(np.asarray(value, dtype=dtype))
        self.grads[name] = xp.zeros_like(self.params[name])

    def __repr__(self):
        return f"{type(self).__name__}()"


class Conv2D(Layer):
    """x (N, H, W, Cin) -> (N, Ho, Wo, filters); w (k, k, Cin, filters), b (filters,)."""

    kind = "conv2d"
    fresh_output = fresh_grad = True

    def __init__(self, filters, kernel=3, stride=1, padding="valid", bias=True, init="he_normal", *,
                 reuse_eval_output=False):
        super().__init__()
        self.filters, self.stride, self.padding = int(filters), int(stride), padding
        self.kernel = (int(kernel), int(kernel)) if np.isscalar(kernel) else tuple(int(k) for k in kernel)
        self.bias, self.init = bool(bias), init
        self.reuse_eval_output = bool(reuse_eval_output)
        self.pad = self.out_hw = None  # set by build
        if self.filters < 1 or self.stride < 1 or min(self.kernel) < 1:
            raise ValueError(f"conv2d: filters, kernel and stride must be >= 1 (got {filters}, {kernel}, {stride})")

    def _new_scratch(self):
        super()._new_scratch()
        # scratch for the columns, reused every call; eval has its own, so that an eval pass between a
        # training forward and its backward (a validation check) leaves the kept training columns alone
        self.workspace, self.eval_workspace = Workspace(), Workspace()

    def _geometry(self, input_shape):
        h, w, _ = input_shape
        kh, kw = self.kernel
        pad = conv.conv_padding(self.padding, (h, w), self.kernel, self.stride)
        ho = conv.get_conv_outsize(h, kh, self.stride, pad[0], pad[1])
        wo = conv.get_conv_outsize(w, kw, self.stride, pad[2], pad[3])
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: kernel {self.kernel} does not fit input {tuple(input_shape)}")
        return pad, (ho, wo)

    def output_shape(self, input_shape):
        _, (ho, wo) = self._geometry(input_shape)
        return (ho, wo, self.filters)

    def build(self, input_shape, rng, xp, dtype):
        self.pad, self.out_hw = self._geometry(input_shape)
        kh, kw = self.kernel
        self._new_param("w", initialize(self.init, rng, (kh, kw, input_shape[2], self.filters)), xp, dtype)
        if self.bias:
            self._new_param("b", np.zeros(self.filters), xp, dtype)
        return (*self.out_hw, self.filters)

    def forward(self, x, train):
        n, (ho, wo), f = x.shape[0], self.out_hw, self.filters
        # eval keeps no columns: a backward after it (rare) rebuilds them
        if train:
            workspace = self.workspace
        elif get_array_module(x) is np:
            workspace = self.eval_workspace
        else:  # the GPU keeps no eval columns between calls (deotte's: ~1.5 GB at batch 1000); CuPy's pool
            workspace = None  # makes allocating them per call cheap
        out, self.cache = conv.conv2d_forward(x, self.params["w"], self.params.get("b"), self.stride, self.pad,
                                              workspace=workspace, out=self.eval_output(train, (n, ho, wo, f), x),
                                              keep_columns=train)
        return out

    def backward(self, dout, need_dx=True):
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first")
        dx, dw, db = conv.conv2d_backward(dout, self.cache, need_dx=need_dx)
        self.grads["w"][...] = dw
        if db is not None:
            self.grads["b"][...] = db
        return dx

    def fold_batchnorm(self, bn, reuse_eval_output=False):
        """A new convolution that computes this one followed by `bn` in eval mode (PyTorch's
        fuse_conv_bn_eval): kernel and bias from bn.fold, computed now; this layer and bn are left as they
        are. For inference only: it has no gradients."""
        folded = Conv2D(self.filters, self.kernel, self.stride, self.padding, bias=True, init=self.init,
                        reuse_eval_output=reuse_eval_output)
        folded.pad, folded.out_hw = self.pad, self.out_hw
        folded.params["w"], folded.params["b"] = bn.fold(self.params["w"], self.params.get("b"))
        return folded

    def __repr__(self):
        kh, kw = self.kernel
        return f"Conv2D({self.filters}, {kh}x{kw}, stride {self.stride}, pad {self.pad}, bias {self.bias})"


class Dense(Layer):
    """x (N, D) -> (N, units); w (D, units), b (units,)."""

    kind = "dense"
    fresh_output = fresh_grad = True

    def __init__(self, units, bias=True, init="he_normal"):
        super().__init__()
        self.units, self.bias, self.init = int(units), bool(bias), init

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"dense expects a flat input, got shape {tuple(input_shape)}: add a flatten layer")
        return (self.units,)

    def build(self, input_shape, rng, xp, dtype):
        shape = self.output_shape(input_shape)
        self._new_param("w", initialize(self.init, rng, (input_shape[0], self.units)), xp, dtype)
        if self.bias:
            self._new_param("b", np.zeros(self.units), xp, dtype)
        return shape

    def forward(self, x, train):
        out, self.cache = linear.dense_forward(x, self.params["w"], self.params.get("b"))
        return out

    def backward(self, dout, need_dx=True):
        dx, dw, db = linear.dense_backward(dout, self.cache, need_dx=need_dx)
        self.grads["w"][...] = dw
        if db is not None:
            self.grads["b"][...] = db
        return dx

    def __repr__(self):
        return f"Dense({self.units}, bias {self.bias})"


class BatchNorm(Layer):
    """Normalizes the last axis: NHWC maps over (N, H, W), dense activations over N."""

    kind = "batchnorm"
    fresh_output = fresh_grad = True

    def __init__(self, momentum=0.1, eps=1e-5, *, reuse_eval_output=False):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)
        self.reuse_eval_output = bool(reuse_eval_output)

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
        out, self.cache = norm.batchnorm_forward(x, self.params["gamma"], self.params["beta"],
                                                 self.buffers["running_mean"], self.buffers["running_var"], train,
                                                 self.momentum, self.eps, out=self.eval_output(train, x.shape, x))
        return out

    def backward(self, dout, need_dx=True):
        dx, dgamma, dbeta = norm.batchnorm_backward(dout, self.cache)
        self.grads["gamma"][...] = dgamma
        self.grads["beta"][...] = dbeta
        return dx


class ReLU(Layer):
    """max(x, 0). inplace_forward: overwrite the input (the plan knows when nothing else holds it);
    inplace_backward: overwrite the incoming gradient (likewise)."""

    kind = "relu"

    def __init__(self, *, inplace_forward=False, inplace_backward=False):
        super().__init__()
        self.inplace_forward, self.inplace_backward = bool(inplace_forward), bool(inplace_backward)

    def forward(self, x, train):
        out, self.cache = activation.relu_forward(x, out=x if self.inplace_forward else None)
        return out

    def backward(self, dout, need_dx=True):
        return activation.relu_backward(dout, self.cache, out=dout if self.inplace_backward else None)

    def __repr__(self):
        inplace = [name for name, on in (("forward", self.inplace_forward), ("backward", self.inplace_backward)) if on]
        return f"ReLU(in place: {', '.join(inplace)})" if inplace else "ReLU()"


class LeakyReLU(Layer):
    kind = "leaky_relu"
    fresh_output = fresh_grad = True

    def __init__(self, alpha=0.01):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x, train):
        out, self.cache = activation.leaky_relu_forward(x, self.alpha)
        return out

    def backward(self, dout, need_dx=True):
        return activation.leaky_relu_backward(dout, self.cache)


class _Pool2D(Layer):
    """Base of the window poolings: size x size windows at `stride` (default: size), no padding."""

    fresh_output = fresh_grad = True

    def __init__(self, size=2, stride=None):
        super().__init__()
        self.size = int(size)
        self.stride = int(stride) if stride else self.size

    def output_shape(self, input_shape):
        h, w, c = input_shape
        return (pool.pool_outsize(h, self.size, self.stride), pool.pool_outsize(w, self.size, self.stride), c)

    def __repr__(self):
        return f"{type(self).__name__}({self.size}, stride {self.stride})"


class MaxPool2D(_Pool2D):
    kind = "maxpool"

    def forward(self, x, train):
        out, self.cache = pool.maxpool_forward(x, self.size, self.stride)
        return out

    def backward(self, dout, need_dx=True):
        return pool.maxpool_backward(dout, self.cache)


class AvgPool2D(_Pool2D):
    kind = "avgpool"

    def forward(self, x, train):
        out, self.cache = pool.avgpool_forward(x, self.size, self.stride)
        return out

    def backward(self, dout, need_dx=True):
        return pool.avgpool_backward(dout, self.cache)


class GlobalAvgPool(Layer):
    """(N, H, W, C) -> (N, C)."""

    kind = "global_avgpool"
    fresh_output = fresh_grad = True

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"global_avgpool expects (H, W, C) maps, got shape {tuple(input_shape)}")
        return (input_shape[-1],)

    def forward(self, x, train):
        out, self.cache = pool.global_avgpool_forward(x)
        return out

    def backward(self, dout, need_dx=True):
        return pool.global_avgpool_backward(dout, self.cache)


class Dropout(Layer):
    """Inverted dropout; masks come from `rng`, the model's numpy Generator (the plan passes it)."""

    kind = "dropout"

    def __init__(self, rate=0.5, *, rng=None):
        super().__init__()
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rng = rng
        self.fixed_mask = None  # tests pin the mask to check gradients

    def forward(self, x, train):
        out, self.cache = dropout.dropout_forward(x, self.rate, train, self.rng, self.fixed_mask)
        return out

    def backward(self, dout, need_dx=True):
        return dropout.dropout_backward(dout, self.cache)

    def __repr__(self):
        return f"Dropout({self.rate})"


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C) in C order."""

    kind = "flatten"

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train):
        out, self.cache = linear.flatten_forward(x)
        return out

    def backward(self, dout, need_dx=True):
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

# constructor arguments the plan chooses; a spec that sets one is refused
PLAN_OPTIONS = ("reuse_eval_output", "inplace_forward", "inplace_backward", "rng")


def layer_from_spec(spec, **plan_options):
    """A layer object from a spec dict like {"type": "conv2d", "filters": 32, "kernel": 3}, with the plan's
    choices (PLAN_OPTIONS) as keyword arguments."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a layer spec must be a dict with a 'type', got {spec!r}")
    kind = str(spec["type"]).lower()
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type '{spec['type']}' (known: {', '.join(sorted(LAYER_TYPES))})")
    options = {k: v for k, v in spec.items() if k != "type"}
    planned = sorted(set(options) & set(PLAN_OPTIONS))
    if planned:
        raise ValueError(f"layer {spec!r}: {', '.join(planned)} is chosen by the plan, not by a spec")
    try:
        return LAYER_TYPES[kind](**options, **plan_options)
    except TypeError as exc:
        raise ValueError(f"layer {spec!r}: {exc}") from None
