"""The plan: which layer objects compute a spec, fused or plain, decided once before anything is built.

plan(spec, xp, input_shape) walks the spec left to right; at each position the first pattern of FUSIONS
that matches (by exact layer type, so a new layer type is never fused by accident) gives one fused layer
(pipeline/nn/fused.py) for its spec entries, else the entry's plain layer is taken. Then each layer gets
its memory options as constructor arguments: which ReLUs may overwrite their input or incoming gradient,
which eval outputs may reuse a buffer kept between calls. Nothing is set on a layer afterwards. What it
may assume of a layer's memory is that class's attributes (layers.Layer), whose defaults are safe for a
new layer.

Two choices depend on the backend, both NumPy only: the conv..._maxpool2x2 fusions (a GPU runs the plain
layers faster) and reused eval buffers (memory only: CuPy's memory pool already makes fresh device arrays
cheap). The values computed are the same either way.

inference_layers(layers) makes the eval-only layers of Model.for_inference: each BatchNorm right after a
convolution folded into a new convolution, every array copied as it is then.
"""
import numpy as np

from pipeline.nn import convpool
from pipeline.nn.fused import BatchNormReLU, ConvMaxPool2x2, ConvReLUMaxPool2x2, ReLUMaxPool
from pipeline.nn.errors import with_context
from pipeline.nn.layers import BatchNorm, Conv2D
from pipeline.nn.parameterless import Dropout, MaxPool2D, MaxPool2x2, ReLU
from pipeline.nn.spec import layer_from_spec


def _type_at(probes, i):
    return type(probes[i]) if i < len(probes) else None


def _fusable_conv(probes, out_shapes, i):
    """A Conv2D convpool can fuse with the pool after it: stride 1, an even output."""
    return type(probes[i]) is Conv2D and convpool.fusable(probes[i].stride, out_shapes[i][:2])


def _conv_relu_maxpool2x2(probes, out_shapes, i):
    """Conv2D -> ReLU -> MaxPool2x2."""
    if _fusable_conv(probes, out_shapes, i) and _type_at(probes, i + 1) is ReLU and \
            _type_at(probes, i + 2) is MaxPool2x2:
        return (i, i + 1, i + 2)
    return None


def _conv_maxpool2x2(probes, out_shapes, i):
    """Conv2D -> MaxPool2x2: a convolution straight into the pool."""
    return (i, i + 1) if _fusable_conv(probes, out_shapes, i) and _type_at(probes, i + 1) is MaxPool2x2 else None


def _batchnorm_relu(probes, out_shapes, i):
    return (i, i + 1) if type(probes[i]) is BatchNorm and _type_at(probes, i + 1) is ReLU else None


def _relu_maxpool(probes, out_shapes, i):
    return (i, i + 1) if type(probes[i]) is ReLU and _type_at(probes, i + 1) in (MaxPool2D, MaxPool2x2) else None


# name: (fused class, matcher(probes, output shapes, i) -> the spec indices it takes, or None). Tried in this
# order at each position.
FUSIONS = {
    "conv_relu_maxpool2x2": (ConvReLUMaxPool2x2, _conv_relu_maxpool2x2),
    "conv_maxpool2x2": (ConvMaxPool2x2, _conv_maxpool2x2),
    "batchnorm_relu": (BatchNormReLU, _batchnorm_relu),
    "relu_maxpool": (ReLUMaxPool, _relu_maxpool),
}


def gradient_is_fresh(later):
    """Whether the gradient a layer receives, from the layers `later` than it (in order), is fresh memory that
    nothing else refers to: the first of them that does not pass its incoming gradient through says. After the
    last layer it is the caller's (the loss gradient): never."""
    for cls in later:
        if cls.grad_may_be_overwritten:
            return True
        if not cls.grad_may_be_incoming_view:  # held memory, or a layer that says nothing: not to overwrite
            return False
    return False


def plan(spec, xp=np, input_shape=(28, 28, 1), dropout_rng=None, fuse=tuple(FUSIONS)):
    """The layers (not built) that compute the list of layer-spec dicts `spec` on backend xp for inputs of
    shape input_shape (H, W, C). dropout_rng: the numpy Generator every dropout layer draws from.
    fuse: the names of FUSIONS to apply (True: all; () or False: every layer plain)."""
    fuse = set(FUSIONS) if fuse is True else set(fuse or ())
    if fuse - set(FUSIONS):
        raise ValueError(f"unknown fusions {sorted(fuse - set(FUSIONS))} (known: {', '.join(FUSIONS)})")
    # convpool works around OpenBLAS and NumPy costs of few-filter layers that a GPU does not have (see its
    # docstring): there the plain layers are faster
    if xp is not np:
        fuse -= {"conv_relu_maxpool2x2", "conv_maxpool2x2"}
    probes, out_shapes, shape = [], [], tuple(int(s) for s in input_shape)
    for i, s in enumerate(spec):
        probe = layer_from_spec(s)
        try:
            shape = tuple(probe.output_shape(shape))
        except ValueError as exc:
            raise with_context(exc, f"layer {i}.{probe.kind}") from None
        probes.append(probe)
        out_shapes.append(shape)

    groups, i = [], 0  # (class, spec indices)
    while i < len(probes):
        for name, (cls, matcher) in FUSIONS.items():
            taken = matcher(probes, out_shapes, i) if name in fuse else None
            if taken:
                break
        else:
            cls, taken = type(probes[i]), (i,)
        groups.append((cls, taken))
        i = taken[-1] + 1

    classes = [cls for cls, _ in groups]
    # the caller's output, and every layer whose memory reaches it through views, must be fresh: the last
    # layer that returns memory of its own and everything after it; the layers before it may reuse eval
    # buffers (NumPy only)
    last = max((k for k, cls in enumerate(classes) if not cls.returns_input_view), default=0)
    layers = []
    for k, (cls, taken) in enumerate(groups):
        options = {}
        if cls.can_reuse_eval_output:
            options["reuse_eval_output"] = xp is np and k < last
        if cls is ReLU:  # in place where nothing else holds that memory
            options["inplace_forward"] = k > 0 and classes[k - 1].output_may_be_overwritten
            options["inplace_backward"] = gradient_is_fresh(classes[k + 1:])
        if cls is Dropout:
            options["rng"] = dropout_rng
        if len(taken) == 1:
            layers.append(layer_from_spec(spec[taken[0]], **options))
        else:
            layers.append(cls(*(layer_from_spec(spec[t]) for t in taken), **options))
    return layers


def inference_layers(layers):
    """(new layers, spec entries each stands for): `layers` (built) for eval passes only, with each BatchNorm
    right after a convolution folded into a new convolution (Conv2D.fold_batchnorm), its ReLU (if fused
    with it) an in-place ReLU. Every other layer is an inference_copy. Every array is computed or copied
    now, so the layers stay as of this call whatever training does to `layers` later.
    """
    out, sizes, k = [], [], 0
    while k < len(layers):
        layer, after = layers[k], layers[k + 1] if k + 1 < len(layers) else None
        if type(layer) is Conv2D and type(after) in (BatchNorm, BatchNormReLU):
            bn = after if type(after) is BatchNorm else after.bn
            # the pair's output is the BatchNorm's: it may reuse a buffer where the BatchNorm's did
            out.append(layer.fold_batchnorm(bn, reuse_eval_output=after.reuse_eval_output))
            sizes.append(2)
            if type(after) is BatchNormReLU:  # the folded convolution's output is fresh and no one else holds it
                out.append(ReLU(inplace_forward=True))
                sizes.append(1)
            k += 2
        else:
            out.append(layer.inference_copy())
            sizes.append(len(layer.parts))
            k += 1
    return out, sizes
