"""Layers without parameters: activations, poolings, dropout, flatten (the base class: layers.py).

Each declares what the plan may assume of its memory (Layer's class attributes): ReLU, Dropout and Flatten
may return their input or a view of it; the others return fresh memory.
"""
import numpy as np

from pipeline.nn import activation, dropout, linear, pool
from pipeline.nn.layers import Layer


class ReLU(Layer):
    """max(x, 0). inplace_forward: overwrite the input (the plan knows when nothing else holds it);
    inplace_backward: overwrite the incoming gradient (likewise)."""

    kind = "relu"
    grad_may_be_incoming_view = True  # in place: the incoming gradient itself

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
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False

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

    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False

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
    """Max pooling, any window and stride (pool.maxpool_forward). 2x2 windows at stride 2 are MaxPool2x2's."""

    kind = "maxpool"

    def pool(self, x):
        """(out, cache): the op this layer runs, also run by ReLUMaxPool for its pool part."""
        return pool.maxpool_forward(x, self.size, self.stride)

    def unpool(self, dout, cache):
        """dx for pool's cache."""
        return pool.maxpool_backward(dout, cache)

    def forward(self, x, train):
        out, self.cache = self.pool(x)
        return out

    def backward(self, dout, need_dx=True):
        return self.unpool(dout, self.cache)


class MaxPool2x2(MaxPool2D):
    """Max pooling over 2x2 windows at stride 2 (every model here), in two pairwise stages with masks
    (pool.maxpool2x2_forward): the same values and gradients as MaxPool2D(2), faster."""

    def __init__(self):
        super().__init__(2, 2)

    def pool(self, x):
        return pool.maxpool2x2_forward(x)

    def unpool(self, dout, cache):
        return pool.maxpool2x2_backward(dout, cache)


def max_pool(size=2, stride=None):
    """The layer of a "maxpool" spec: MaxPool2x2 for 2x2 windows at stride 2, else MaxPool2D. The one place
    the 2x2 op is chosen."""
    return MaxPool2x2() if (int(size), int(stride or size)) == (2, 2) else MaxPool2D(size, stride)


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
    output_may_be_overwritten = grad_may_be_overwritten = True
    returns_input_view = False

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
    grad_may_be_incoming_view = True  # after an eval pass: the incoming gradient itself

    def __init__(self, rate=0.5, *, rng=None):
        super().__init__()
        self.rate = float(rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rng = rng

    def forward(self, x, train):
        out, self.cache = dropout.dropout_forward(x, self.rate, train, self.rng)
        return out

    def backward(self, dout, need_dx=True):
        return dropout.dropout_backward(dout, self.cache)

    def __repr__(self):
        return f"Dropout({self.rate})"


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C) in C order: a view of the input."""

    kind = "flatten"
    grad_may_be_incoming_view = True  # a reshape of it

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train):
        out, self.cache = linear.flatten_forward(x)
        return out

    def backward(self, dout, need_dx=True):
        return linear.flatten_backward(dout, self.cache)
