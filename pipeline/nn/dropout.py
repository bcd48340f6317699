"""Inverted dropout: kept units are scaled by 1/(1-rate) in training, identity in eval.

The mask is drawn from a numpy Generator (PCG64) whatever the backend, then moved to the device, so the
same seed gives the same masks on CPU and GPU and the generator state serializes.
"""
import numpy as np

from pipeline.nn.backend import get_array_module, to_device
from pipeline.nn.threads import parallel_rows


def dropout_forward(x, rate, train, rng=None):
    """out = x * keep / (1 - rate) in training, x itself in eval. cache: (keep mask, scale), None in eval.

    The uniforms are drawn from `rng` in float32 (same stream on every backend) and compared on the CPU:
    a unit is kept when its uniform is at least `rate`. A generator seeded alike draws the same mask.
    """
    if not train or rate == 0.0:
        return x, None
    xp = get_array_module(x)
    keep = to_device(rng.random(x.shape, dtype=np.float32) >= np.float32(rate), xp)
    scale = x.dtype.type(1.0 / (1.0 - rate))
    out = xp.empty_like(x)

    def apply(rows):
        xp.multiply(x[rows], keep[rows], out=out[rows])
        out[rows] *= scale

    parallel_rows(apply, x.shape[0], x)
    return out, (keep, scale)


def dropout_backward(dout, cache):
    """dx with dout's shape: dout where the forward kept a unit, times its scale (dout itself after an eval
    pass)."""
    if cache is None:
        return dout
    keep, scale = cache
    xp = get_array_module(dout)
    dx = xp.empty_like(dout)

    def apply(rows):
        xp.multiply(dout[rows], keep[rows], out=dx[rows])
        dx[rows] *= scale

    parallel_rows(apply, dout.shape[0], dout)
    return dx


def dropout_forward_naive(x, rate, train, rng=None):
    """Reference: the same float32 uniforms, each unit kept when its uniform is at least `rate` and then
    scaled by 1/(1-rate). cache: the multiplier."""
    if not train or rate == 0.0:
        return x, None
    xp = get_array_module(x)
    u = to_device(rng.random(x.shape, dtype=np.float32), xp)
    mult = xp.where(u >= np.float32(rate), x.dtype.type(1.0 / (1.0 - rate)), x.dtype.type(0.0))
    return x * mult, mult


def dropout_backward_naive(dout, cache):
    return dout if cache is None else dout * cache
