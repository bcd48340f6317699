"""Fused layers: two or three consecutive spec layers computed as one, chosen by the plan (pipeline/nn/plan.py).

A fused layer holds the plain layers it replaces (`parts`, built as usual, in spec order): they keep the
parameters, gradients and statistics under their spec indices, so checkpoints and optimizer state do not
see the fusion. Only the fused layer's forward and backward run; each is the same function as its parts
run one after the other (tested against them).
"""
from pipeline.nn import activation, convpool, norm
from pipeline.nn.memory import Workspace
from pipeline.nn.layers import Layer


class _Fused(Layer):
    """Base: the parts' shapes and arrays; no arrays of its own."""

    def __init__(self, *parts):
        super().__init__()
        self._parts = tuple(parts)

    @property
    def parts(self):
        return self._parts

    @property
    def kind(self):
        return "+".join(p.kind for p in self._parts)

    def inference_copy(self):
        """As Layer's, with inference copies of the parts (they hold the arrays)."""
        new = super().inference_copy()
        new._parts = tuple(p.inference_copy() for p in self._parts)
        return new

    def output_shape(self, input_shape):
        for p in self._parts:
            input_shape = p.output_shape(input_shape)
        return input_shape

    def build(self, input_shape, rng, xp, dtype):
        for p in self._parts:  # in spec order: the same initial weights as the unfused layers
            input_shape = p.build(input_shape, rng, xp, dtype)
        return input_shape

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(map(repr, self._parts))})"


class _ConvMaxPool2x2(_Fused):
    """Conv2D (stride 1, even output) -> [ReLU] -> MaxPool2x2 in one pass: convpool.conv2d_maxpool_*. Each
    subclass says by its name, and RELU, whether the ReLU is among its parts."""

    RELU = None  # set by each subclass
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False
    can_reuse_eval_output = True

    def __init__(self, *parts, reuse_eval_output=False):
        super().__init__(*parts)
        self.reuse_eval_output = bool(reuse_eval_output)

    @property
    def conv(self):
        return self._parts[0]

    def _new_scratch(self):
        super()._new_scratch()
        self.workspace, self.eval_workspace = Workspace(), Workspace()  # as Conv2D's

    def forward(self, x, train):
        n, (ho, wo), f = x.shape[0], self.conv.out_hw, self.conv.filters
        out, self.cache = convpool.conv2d_maxpool_forward(
            x, self.conv.params["w"], self.conv.params.get("b"), self.conv.pad, self.RELU, train,
            workspace=self.workspace if train else self.eval_workspace,
            out=self.eval_output(train, (n, ho // 2, wo // 2, f), x))
        return out

    def backward(self, dout, need_dx=True):
        if self.cache is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first")
        dx, dw, db = convpool.conv2d_maxpool_backward(dout, self.cache, need_dx=need_dx)
        self.conv.grads["w"][...] = dw
        if db is not None:
            self.conv.grads["b"][...] = db
        return dx


class ConvReLUMaxPool2x2(_ConvMaxPool2x2):
    """Conv2D (stride 1, even output) -> ReLU -> MaxPool2x2 in one pass."""

    RELU = True

    def __init__(self, conv, relu, pool2x2, *, reuse_eval_output=False):
        super().__init__(conv, relu, pool2x2, reuse_eval_output=reuse_eval_output)


class ConvMaxPool2x2(_ConvMaxPool2x2):
    """Conv2D (stride 1, even output) -> MaxPool2x2 in one pass: a convolution straight into the pool."""

    RELU = False

    def __init__(self, conv, pool2x2, *, reuse_eval_output=False):
        super().__init__(conv, pool2x2, reuse_eval_output=reuse_eval_output)


class BatchNormReLU(_Fused):
    """BatchNorm -> ReLU: norm.batchnorm_relu_*, three reads of x and one write."""

    grad_may_be_overwritten = True  # (its output may not be: the cache keeps it for the ReLU mask)
    returns_input_view = False
    can_reuse_eval_output = True

    def __init__(self, bn, relu, *, reuse_eval_output=False):
        super().__init__(bn, relu)
        self.reuse_eval_output = bool(reuse_eval_output)

    @property
    def bn(self):
        return self._parts[0]

    def forward(self, x, train):
        bn = self.bn
        out, self.cache = norm.batchnorm_relu_forward(x, bn.params["gamma"], bn.params["beta"],
                                                      bn.buffers["running_mean"], bn.buffers["running_var"], train,
                                                      bn.momentum, bn.eps, out=self.eval_output(train, x.shape, x))
        return out

    def backward(self, dout, need_dx=True):
        dx, dgamma, dbeta = norm.batchnorm_relu_backward(dout, self.cache)
        self.bn.grads["gamma"][...] = dgamma
        self.bn.grads["beta"][...] = dbeta
        return dx


class ReLUMaxPool(_Fused):
    """ReLU -> MaxPool2D or MaxPool2x2, computed as max pool (the pool part's own op) then ReLU on its output,
    a quarter of the size: max and ReLU commute (values and gradients, the first maximum included)."""

    grad_may_be_overwritten = True  # (its output may not be: the ReLU's cache is that output)
    returns_input_view = False

    @property
    def max_pool(self):
        return self.parts[1]

    def forward(self, x, train):
        out, pool_cache = self.max_pool.pool(x)
        out, relu_cache = activation.relu_forward(out, out=out)
        self.cache = (pool_cache, relu_cache)
        return out

    def backward(self, dout, need_dx=True):
        pool_cache, relu_cache = self.cache
        return self.max_pool.unpool(activation.relu_backward(dout, relu_cache), pool_cache)
