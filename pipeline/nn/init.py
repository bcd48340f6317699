"""Weight initializers: He (Kaiming) and Glorot (Xavier), normal and uniform.

fan_in = kh*kw*Cin (conv) or D (dense), fan_out = kh*kw*Cout or F. The normal variants draw from a plain
(untruncated) normal, as PyTorch does; Keras truncates at 2 std. Draws use float64 on the CPU from a
numpy Generator, so a seed gives the same weights on every backend and dtype.
"""
import numpy as np

from pipeline.nn.errors import EngineError


def fans(shape):
    """(fan_in, fan_out) of a kernel (kh, kw, Cin, Cout) or (D, F)."""
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = int(np.prod(shape[:-2]))
    return receptive * shape[-2], receptive * shape[-1]


def he_normal(rng, shape):
    fan_in, _ = fans(shape)
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)


def he_uniform(rng, shape):
    fan_in, _ = fans(shape)
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape)


def glorot_normal(rng, shape):
    fan_in, fan_out = fans(shape)
    return rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=shape)


def glorot_uniform(rng, shape):
    fan_in, fan_out = fans(shape)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


INITIALIZERS = {
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
}


def initialize(name, rng, shape):
    """float64 numpy array of `shape` drawn by the initializer `name`."""
    try:
        fn = INITIALIZERS[name]
    except KeyError:
        raise EngineError(f"unknown initializer '{name}' (known: {', '.join(INITIALIZERS)})") from None
    return fn(rng, tuple(shape))
