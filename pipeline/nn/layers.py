"""Layer objects: thin stateful wrappers around the forward/backward function pairs, one per spec type.
This file: the base class and the layers with parameters; parameterless.py: the others; spec.py: the table
from spec types to classes.

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

from pipeline.nn import conv, linear, norm
from pipeline.nn.backend import get_array_module
from pipeline.nn.memory import Workspace
from pipeline.nn.init import initialize


class Layer:
    """Base: no parameters, identity shape."""

    kind = "layer"
    # What the plan may assume of a layer's memory. The defaults assume nothing, so a new layer is safe as
    # it is; a layer overrides only what it guarantees (the plan then saves memory where it may).
    # forward's output is fresh memory that no cache or caller refers to: a following ReLU may overwrite it
    output_may_be_overwritten = False
    # backward's result is fresh memory that nothing refers to: a preceding ReLU may overwrite it
    grad_may_be_overwritten = False
    # backward may return its incoming gradient or a view of it (a reshape, an in-place ReLU, an eval dropout):
    # the plan looks through it for the layer whose memory a preceding ReLU would overwrite. The default
    # assumes held memory, where the plan stops: safe for a new layer.
    grad_may_be_incoming_view = False
    # forward may return its input or a view of it (a reshape, an eval dropout): the plan looks through
    # it for the layer whose memory the caller gets. Only a layer that always returns memory of its own
    # sets False.
    returns_input_view = True
    # the constructor takes reuse_eval_output (eval passes may write into a buffer kept between calls)
    can_reuse_eval_output = False
    reuse_eval_output = False  # the plan's choice, for this layer

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
        """A new layer with this one's configuration, a copy of its parameters and statistics as they are now
        (no gradients), its own cache and scratch memory: later training steps do not reach it, and its
        passes leave this layer alone."""
        new = copy.copy(self)
        new._new_scratch()
        new.params = {k: a.copy() for k, a in self.params.items()}
        new.buffers = {k: a.copy() for k, a in self.buffers.items()}
        new.grads = {}
        return new

    def _new_param(self, name, value, xp, dtype):
        self.params[name] = xp.asarray(np.asarray(value, dtype=dtype))
        self.grads[name] = xp.zeros_like(self.params[name])

    def __repr__(self):
        return f"{type(self).__name__}()"


class Conv2D(Layer):
    """x (N, H, W, Cin) -> (N, Ho, Wo, filters); w (k, k, Cin, filters), b (filters,)."""

    kind = "conv2d"
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False
    can_reuse_eval_output = True

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
        # scratch for the columns, reused every call: one for training passes, one for eval passes
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
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False

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
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False
    can_reuse_eval_output = True

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
