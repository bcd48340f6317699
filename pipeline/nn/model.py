"""A sequential model built from plain data, and its state (parameters, BN statistics, dropout RNG).

Names: spec entry i of type t is "i.t" (e.g. "0.conv2d"); its arrays are "i.w", "i.b", "i.gamma", "i.beta",
"i.running_mean", "i.running_var", whether the plan (pipeline/nn/plan.py) runs it alone or fused with its
neighbours ("0-2.conv2d+relu+maxpool"). Layout NHWC: x (N, H, W, C) -> logits (N, num_classes).
"""
import copy
import json

import numpy as np

from pipeline.nn.errors import EngineError, with_context
from pipeline.nn.architectures import ARCHITECTURES
from pipeline.nn.backend import to_device, to_numpy
from pipeline.nn.layers import BatchNorm, Conv2D
from pipeline.nn.parameterless import Dropout
from pipeline.nn.plan import FUSIONS, inference_layers, plan
from pipeline.nn.loss import softmax

RNG_STATE_KEY = "dropout_rng"


class Model:
    """Layers in sequence (`layers`: what runs, as the plan chose them, some fused); `parts`: one plain
    layer per spec entry, holding that entry's arrays (in an inference copy, one per layer: a folded
    convolution stands for its convolution and BatchNorm, `sizes` says how many entries each layer is).
    One numpy Generator (PCG64), `rng`, draws every dropout mask.

    inference=True: a copy made by for_inference, for eval passes only."""

    def __init__(self, layers, input_shape, num_classes, xp, dtype, seed, rng, spec=None, sizes=None,
                 inference=False):
        self.layers = list(layers)
        self.parts = [part for layer in self.layers for part in layer.parts]
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.seed = seed
        self.spec = spec
        self.rng = rng
        self.inference = inference
        sizes = sizes or [len(layer.parts) for layer in self.layers]
        starts = np.cumsum([0] + list(sizes))
        self.names = [f"{a}.{layer.kind}" if b - a == 1 else f"{a}-{b - 1}.{layer.kind}"
                      for layer, a, b in zip(self.layers, starts, starts[1:])]
        self.output_shapes, shape = [], self.input_shape  # after each part (spec entry)
        for part in self.parts:
            shape = tuple(part.output_shape(shape))
            self.output_shapes.append(shape)

    def for_inference(self):
        """A model for eval passes that computes what forward(x, train=False) does, faster: each BatchNorm
        right after a convolution is folded into a new convolution (its running statistics are constants
        in eval). New layer objects with the arrays as they are now, folded or copied: a snapshot that later
        training steps do not change, and this model is left as it is. Make a new copy after the weights or
        statistics change (it is cheap), e.g. once per evaluation, as predict_proba does."""
        if self.inference:
            return self
        layers, sizes = inference_layers(self.layers)
        return Model(layers, self.input_shape, self.num_classes, self.xp, self.dtype, self.seed, self.rng,
                     spec=self.spec, sizes=sizes, inference=True)

    def _trainable(self, what):
        if self.inference:
            raise RuntimeError(f"{what}: this is an inference copy (for_inference), for eval passes only; "
                               f"use the model it came from")

    # -- computation -------------------------------------------------------------------------------
    def forward(self, x, *, train):
        """logits (N, num_classes) for x (N, H, W, C) on the model's backend. train=True: batch statistics and
        dropout, as a training step; train=False: running statistics, no dropout, as a prediction (said at every
        call: a prediction that defaulted to training moved the BatchNorm statistics)."""
        if train:
            self._trainable("forward(train=True)")
        # C order, as every layer writes its output through reshaped views (a transposed batch came out as garbage)
        x = self.xp.ascontiguousarray(to_device(x, self.xp), dtype=self.dtype)
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits, input_grad=True):
        """Fill every layer's grads from dlogits (N, num_classes) after a forward; returns dx (N, H, W, C).

        input_grad=False skips the gradient with respect to the input (training never needs it) and
        returns None.
        """
        self._trainable("backward")
        first = 0 if input_grad else self.first_layer_with_params()
        d = dlogits.astype(self.dtype, copy=False)
        for i in range(len(self.layers) - 1, first - 1, -1):
            d = self.layers[i].backward(d, need_dx=input_grad or i > first)
        return d if input_grad else None

    def first_layer_with_params(self):
        """Index in `layers` of the first layer with parameters (len(layers) if none): a training backward
        stops there, without its input gradient."""
        return next((i for i, layer in enumerate(self.layers) if any(part.params for part in layer.parts)),
                    len(self.layers))

    def recompute_batchnorm_statistics(self, x, batch_size=500):
        """Set every BatchNorm's running mean and variance to those of its input over the images x
        (N, H, W, C), passed batch by batch through the current weights as in training, but without
        dropout: after the weights were averaged, the statistics gathered during training describe
        other weights. Draws no random numbers."""
        self._trainable("recompute_batchnorm_statistics")
        # a BatchNorm is the first part of its layer (plain, or BatchNormReLU): its input is the layer's
        first_bn = [layer.parts[0] if isinstance(layer.parts[0], BatchNorm) else None for layer in self.layers]
        norms = [bn for bn in first_bn if bn is not None]
        if len(norms) != sum(isinstance(p, BatchNorm) for p in self.parts):
            raise RuntimeError("a fused layer holds a BatchNorm after another part: its input is not seen here")
        sums = {id(bn): [0.0, 0.0, 0] for bn in norms}
        for start in range(0, len(x), batch_size):
            h = self.xp.ascontiguousarray(to_device(x[start:start + batch_size], self.xp), dtype=self.dtype)
            for layer, bn in zip(self.layers, first_bn):
                if isinstance(layer, Dropout):
                    continue
                if bn is not None:
                    flat = h.reshape(-1, h.shape[-1]).astype(np.float64)
                    acc = sums[id(bn)]
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

    def predict_proba(self, x, batch_size=1000, on_batch=None):
        """Class probabilities, numpy float32 (N, num_classes), in eval mode, batch by batch (through an
        inference copy: BatchNorms folded). on_batch(rows): called after each batch, e.g. a progress bar's
        update."""
        model = self.for_inference()
        out = np.empty((len(x), self.num_classes), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            logits = model.forward(x[start:start + batch_size], train=False)
            out[start:start + batch_size] = to_numpy(softmax(logits))
            if on_batch is not None:
                on_batch(len(logits))
        model.forget_activations()
        return out

    def forget_activations(self):
        """Drop what the last pass kept for a backward (each layer's cache): after inference nothing needs it,
        and on a GPU it is device memory (deotte at batch 1000: about 450 MB)."""
        for layer in self.layers:
            layer.forget()

    # -- parameters and regularization ------------------------------------------------------------
    def params(self):
        """[(name, param, grad)] in layer order: "0.w", "0.b", "1.gamma", ..."""
        self._trainable("params")
        return [(f"{i}.{k}", p, part.grads[k]) for i, part in enumerate(self.parts) for k, p in part.params.items()]

    def penalty(self, l1=0.0, l2=0.0):
        """l1 * sum|w| + l2/2 * sum w^2 over the kernels ("*.w"), as a float: the term whose gradient the
        optimizer adds (tested against it). Training adds the gradient only; the loss it reports is the data's."""
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
        self._trainable("state")
        for i, part in enumerate(self.parts):
            for k, a in part.params.items():
                yield f"{i}.{k}", a
            for k, a in part.buffers.items():
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
        layers = dict(enumerate(self.parts))
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
        """One line per layer that runs: spec indices and type, output shape, parameter count, the object."""
        lines, out_shape = [f"{'input':<28} {str(self.input_shape):<14}"], self.input_shape
        for name, layer in zip(self.names, self.layers):
            out_shape = tuple(layer.output_shape(out_shape))
            n = sum(int(np.prod(p.shape)) for part in layer.parts for p in part.params.values())
            lines.append(f"{name:<28} {str(out_shape):<14} {n:>8}  {layer!r}")
        total = sum(int(np.prod(p.shape)) for layer in self.layers for part in layer.parts
                    for p in part.params.values())
        return "\n".join(lines + [f"total parameters: {total}"])

    def __repr__(self):
        return f"Model({'inference copy, ' if self.inference else ''}{len(self.layers)} layers:\n{self.summary()})"


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


def build_model(arch, seed=0, dtype=np.float32, xp=np, input_shape=(28, 28, 1), num_classes=10,
                fuse=tuple(FUSIONS)):
    """A Model from an architecture name (ARCHITECTURES) or a list of layer-spec dicts.

    plan() picks the layer objects (fuse: which FUSIONS it may apply); then each is built in turn, shapes
    inferred from input_shape (H, W, C). `seed` drives the initial weights (drawn in float64 on the CPU, in
    spec order, so every backend, dtype and plan starts from the same values) and, through an independent
    stream, the dropout masks.
    """
    spec, _ = resolve_arch(arch, num_classes)
    init_seed, dropout_seed = np.random.SeedSequence(seed).spawn(2)
    init_rng, dropout_rng = np.random.default_rng(init_seed), np.random.default_rng(dropout_seed)
    layers = plan(spec, xp, input_shape, dropout_rng, fuse)
    shape, first = tuple(int(s) for s in input_shape), 0
    for layer in layers:
        try:
            shape = tuple(layer.build(shape, init_rng, xp, np.dtype(dtype)))
        except ValueError as exc:
            raise with_context(exc, f"layer {first}.{layer.kind}") from None
        first += len(layer.parts)
    if shape != (num_classes,):
        raise ValueError(f"the model's output shape is {shape}, expected ({num_classes},)")
    return Model(layers, input_shape, num_classes, xp, dtype, seed, dropout_rng, spec=spec)
