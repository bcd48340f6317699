"""A sequential model built from plain data, and its state (parameters, BN statistics, dropout RNG).

Names: layer i of type t is "i.t" (e.g. "0.conv2d"); its arrays are "i.w", "i.b", "i.gamma", "i.beta",
"i.running_mean", "i.running_var". Layout NHWC: x (N, H, W, C) -> logits (N, num_classes).
"""
import copy
import json

import numpy as np

from pipeline.nn.errors import EngineError
from pipeline.nn.architectures import ARCHITECTURES
from pipeline.nn.backend import to_device, to_numpy
from pipeline.nn import convpool
from pipeline.nn.layers import BatchNorm, Conv2D, Dropout, Flatten, MaxPool2D, ReLU, layer_from_spec
from pipeline.nn.loss import softmax

RNG_STATE_KEY = "dropout_rng"


class Model:
    """Layers in sequence; one numpy Generator (PCG64) draws every dropout mask."""

    def __init__(self, layers, input_shape, num_classes, xp, dtype, seed, spec=None, output_shapes=None):
        self.layers = layers
        self.output_shapes = output_shapes or []
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.seed = seed
        self.spec = spec
        self.rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
        for layer in layers:
            if isinstance(layer, Dropout):
                layer.rng = self.rng
        self._plan_inplace()

    def _plan_inplace(self):
        """Fuse a 2x2 max pool (and a ReLU between) into the stride-1 convolution before it (NumPy only);
        fuse each other ReLU into the BatchNorm before it, else into the max pool after it; let the
        remaining ReLUs overwrite their input / incoming gradient where nothing else holds that memory;
        let convolutions and BatchNorms whose output does not reach the caller reuse their eval output;
        pair each convolution with the BatchNorm right after it for folded eval passes."""
        for i, layer in enumerate(self.layers):
            if type(layer) is not Conv2D or self.xp is not np or not convpool.fusable(layer.stride, layer.out_hw):
                continue
            relu = i + 1 < len(self.layers) and type(self.layers[i + 1]) is ReLU
            j = i + 1 + int(relu)
            if j < len(self.layers) and type(self.layers[j]) is MaxPool2D and self.layers[j].size == 2 \
                    and self.layers[j].stride == 2:
                layer.fuse_pool, layer.fuse_relu = True, relu
                self.layers[j].fused_into_conv = True
                if relu:
                    self.layers[i + 1].fused = True
        # the output the caller gets, and every layer whose memory reaches it through views (flatten,
        # dropout and ReLU may return their input), must be fresh; the rest may reuse eval buffers
        last = len(self.layers) - 1
        while last > 0 and (isinstance(self.layers[last], (Flatten, Dropout, ReLU))
                            or getattr(self.layers[last], "fused_into_conv", False)):
            last -= 1
        for layer in self.layers[:last]:
            layer.reuse_eval_output = self.xp is np and isinstance(layer, (Conv2D, BatchNorm))
        # (conv, BatchNorm) pairs that eval passes fold into one (NumPy only, like the fusions above)
        self._bn_folds = [(conv, bn) for conv, bn in zip(self.layers, self.layers[1:])
                          if self.xp is np and type(conv) is Conv2D and not conv.fuse_pool and type(bn) is BatchNorm]
        self._folded_input = None
        for i, layer in enumerate(self.layers):
            if getattr(layer, "fused", False) or getattr(layer, "fused_into_conv", False):
                continue
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if isinstance(layer, ReLU) and i > 0 and isinstance(self.layers[i - 1], BatchNorm):
                self.layers[i - 1].fuse_relu = layer.fused = True
            elif isinstance(layer, ReLU) and type(following) is MaxPool2D:
                following.relu_after = layer.fused = True
            elif isinstance(layer, ReLU):
                layer.inplace_forward = i > 0 and self.layers[i - 1].fresh_output
                layer.inplace_backward = any(later.fresh_grad for later in self.layers[i + 1:])

    # -- computation -------------------------------------------------------------------------------
    def forward(self, x, train=True):
        """logits (N, num_classes) for x (N, H, W, C) on the model's backend; train: batch statistics, dropout.

        In eval, each BatchNorm right after a convolution is folded into that convolution's kernel and bias
        (running statistics are constants there): the BatchNorm passes reduce to its ReLU. A backward after
        such a pass first repeats it unfolded (the folded caches hold no BatchNorm input)."""
        x = to_device(x, self.xp).astype(self.dtype, copy=False)
        fold = not train and bool(self._bn_folds)
        for conv, bn in self._bn_folds:
            conv.folded_bn = bn if fold else None
            bn.folded = fold
        self._folded_input = x if fold else None
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits, input_grad=True):
        """Fill every layer's grads from dlogits (N, num_classes); returns dx (N, H, W, C).

        input_grad=False skips the gradient with respect to the input (training never needs it) and
        returns None.
        """
        if self._folded_input is not None:  # the last pass was a folded eval pass: repeat it unfolded
            x, self._folded_input = self._folded_input, None
            for conv, bn in self._bn_folds:
                conv.folded_bn, bn.folded = None, False
            for layer in self.layers:
                x = layer.forward(x, False)
        first = 0
        if not input_grad:
            first = next((i for i, layer in enumerate(self.layers) if layer.params), len(self.layers))
        for i, layer in enumerate(self.layers):
            layer.need_dx = input_grad or i > first
        d = dlogits.astype(self.dtype, copy=False)
        for layer in reversed(self.layers[first:]):
            d = layer.backward(d)
        return d if input_grad else None

    def recompute_batchnorm_statistics(self, x, batch_size=500):
        """Set every BatchNorm's running mean and variance to those of its input over the images x
        (N, H, W, C), passed batch by batch through the current weights as in training, but without
        dropout: after the weights were averaged, the statistics gathered during training describe
        other weights. Draws no random numbers."""
        for conv, bn in self._bn_folds:
            conv.folded_bn, bn.folded = None, False
        self._folded_input = None
        norms = [layer for layer in self.layers if isinstance(layer, BatchNorm)]
        sums = {id(bn): [0.0, 0.0, 0] for bn in norms}
        for start in range(0, len(x), batch_size):
            h = to_device(x[start:start + batch_size], self.xp).astype(self.dtype, copy=False)
            for layer in self.layers:
                if isinstance(layer, Dropout):
                    continue
                if isinstance(layer, BatchNorm):
                    flat = h.reshape(-1, h.shape[-1]).astype(np.float64)
                    acc = sums[id(layer)]
                    acc[0] = acc[0] + flat.sum(axis=0)
                    acc[1] = acc[1] + (flat * flat).sum(axis=0)
                    acc[2] += len(flat)
                h = layer.forward(h, True)
        for bn in norms:
            s1, s2, m = sums[id(bn)]
            if m < 2:
                continue
            mean = s1 / m
            var = (s2 / m - mean * mean) * m / (m - 1)  # unbiased, as the running statistics are
            bn.buffers["running_mean"][...] = mean.astype(self.dtype)
            bn.buffers["running_var"][...] = self.xp.maximum(var, 0).astype(self.dtype)

    def predict_proba(self, x, batch_size=1000):
        """Class probabilities, numpy float32 (N, num_classes), in eval mode, batch by batch."""
        out = np.empty((len(x), self.num_classes), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            logits = self.forward(x[start:start + batch_size], train=False)
            out[start:start + batch_size] = to_numpy(softmax(logits))
        self.forget_activations()
        return out

    def forget_activations(self):
        """Drop what the last pass kept for a backward (each layer's cache): after inference nothing needs it,
        and on a GPU it is device memory (deotte at batch 1000: about 450 MB)."""
        for layer in self.layers:
            layer.cache = None
        self._folded_input = None

    # -- parameters and regularization ------------------------------------------------------------
    def params(self):
        """[(name, param, grad)] in layer order: "0.w", "0.b", "1.gamma", ..."""
        return [(f"{i}.{k}", p, layer.grads[k])
                for i, layer in enumerate(self.layers) for k, p in layer.params.items()]

    def penalty(self, l1=0.0, l2=0.0):
        """l1 * sum|w| + l2/2 * sum w^2 over the kernels ("*.w"), as a float (the loss term; the
        optimizer adds its gradient)."""
        total = 0.0
        for name, p, _ in self.params():
            if name.endswith(".w"):
                if l1:
                    total += l1 * float(abs(p).sum())
                if l2:
                    total += 0.5 * l2 * float((p * p).sum())
        return total

    def num_params(self):
        return int(sum(p.size for _, p, _ in self.params()))

    # -- state ------------------------------------------------------------------------------------
    def _arrays(self):
        for i, layer in enumerate(self.layers):
            for k, a in layer.params.items():
                yield f"{i}.{k}", a
            for k, a in layer.buffers.items():
                yield f"{i}.{k}", a

    def state_dict(self):
        """{name: numpy array copy} of parameters and BN running statistics."""
        return {name: np.array(to_numpy(a), copy=True) for name, a in self._arrays()}

    def load_state_dict(self, state):
        """Copy arrays into the model; missing or unexpected names, or a shape mismatch -> ValueError."""
        own = dict(self._arrays())
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state dict does not match the model: missing {missing}, unexpected {extra}"
                             + self._dropped_bias_hint(extra))
        for name, target in own.items():
            value = np.asarray(to_numpy(state[name]))
            if value.shape != target.shape:
                raise ValueError(f"state dict '{name}': shape {value.shape}, model expects {target.shape}")
        for name, target in own.items():
            target[...] = to_device(np.asarray(to_numpy(state[name]), dtype=self.dtype), self.xp)

    def _dropped_bias_hint(self, unexpected):
        """A hint when the unexpected names are biases of convolutions that feed a BatchNorm and are built
        without one: state saved before those biases were dropped from the named architectures."""
        layers = dict(enumerate(self.layers))
        dropped = [name for name in unexpected if name.endswith(".b") and name[:-2].isdigit()
                   and type(layers.get(int(name[:-2]))) is Conv2D and not layers[int(name[:-2])].bias
                   and type(layers.get(int(name[:-2]) + 1)) is BatchNorm]
        if not dropped or len(dropped) != len(unexpected):
            return ""
        return (" (saved by an older version, whose convolutions before a BatchNorm had a bias; the BatchNorm "
                "cancels it, so it was dropped: train the run again)")

    def get_rng_state(self):
        """{'dropout_rng': 0-d unicode array holding the PCG64 state as JSON}."""
        return {RNG_STATE_KEY: np.array(json.dumps(self.rng.bit_generator.state))}

    def set_rng_state(self, state):
        if RNG_STATE_KEY not in state:
            raise ValueError(f"rng state lacks '{RNG_STATE_KEY}'")
        self.rng.bit_generator.state = json.loads(str(np.asarray(state[RNG_STATE_KEY])[()]))

    def summary(self):
        """One line per layer: name, output shape, parameter count."""
        lines = [f"{'input':<18} {str(self.input_shape):<16}"]
        for layer, out_shape in zip(self.layers, self.output_shapes):
            n = sum(int(np.prod(p.shape)) for p in layer.params.values())
            lines.append(f"{layer.name:<18} {str(out_shape):<16} {n}")
        return "\n".join(lines + [f"total parameters: {self.num_params()}"])


def resolve_arch(arch, num_classes=10):
    """(spec list, name or None) for an architecture name or a list of layer-spec dicts."""
    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise EngineError(f"unknown architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
        spec = copy.deepcopy(ARCHITECTURES[arch])
        head = max(i for i, s in enumerate(spec) if s["type"] == "dense")
        spec[head]["units"] = num_classes  # the named heads follow the class count
        return spec, arch
    if not isinstance(arch, (list, tuple)) or not arch:
        raise ValueError(f"arch must be an architecture name or a non-empty list of layer specs, got {arch!r}")
    spec = copy.deepcopy(list(arch))
    for s in spec:
        if isinstance(s, dict) and str(s.get("type", "")).lower() in ("dense", "linear") and "units" not in s:
            s["units"] = num_classes
    return spec, None


def build_model(arch, seed=0, dtype=np.float32, xp=np, input_shape=(28, 28, 1), num_classes=10):
    """A Model from an architecture name (ARCHITECTURES) or a list of layer-spec dicts.

    Shapes are inferred layer by layer from input_shape (H, W, C). `seed` drives the initial weights
    (drawn in float64 on the CPU, so every backend and dtype starts from the same values) and, through an
    independent stream, the dropout masks.
    """
    spec, _ = resolve_arch(arch, num_classes)
    init_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    layers, shapes, shape = [], [], tuple(int(s) for s in input_shape)
    for i, s in enumerate(spec):
        layer = layer_from_spec(s)
        layer.name = f"{i}.{layer.kind}"
        try:
            shape = tuple(layer.build(shape, init_rng, xp, np.dtype(dtype)))
        except ValueError as exc:
            raise ValueError(f"layer {layer.name}: {exc}") from None
        layers.append(layer)
        shapes.append(shape)
    if shape != (num_classes,):
        raise ValueError(f"the model's output shape is {shape}, expected ({num_classes},)")
    return Model(layers, input_shape, num_classes, xp, dtype, seed, spec=spec, output_shapes=shapes)
