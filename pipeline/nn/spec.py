"""The spec table: which layer class each spec type names (or the function choosing it), and the layer a spec
dict makes.

A new layer type is a class (layers.py or parameterless.py, with its op functions in their own file) and
a line here; plan.py fuses only the exact types its patterns name, so a new type runs as it is.
"""
from pipeline.nn.layers import BatchNorm, Conv2D, Dense
from pipeline.nn.parameterless import AvgPool2D, Dropout, Flatten, GlobalAvgPool, LeakyReLU, ReLU, max_pool

LAYER_TYPES = {
    "conv2d": Conv2D, "conv": Conv2D,
    "dense": Dense, "linear": Dense,
    "batchnorm": BatchNorm, "bn": BatchNorm,
    "relu": ReLU,
    "leaky_relu": LeakyReLU, "leakyrelu": LeakyReLU,
    "maxpool": max_pool, "maxpool2d": max_pool,  # MaxPool2x2 or MaxPool2D, by window and stride
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
