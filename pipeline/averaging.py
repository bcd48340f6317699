"""Polyak averaging of the weights: an exponential moving average (EMA) kept beside training.

An et al. 2020 (arXiv 2008.10400) evaluate every MNIST model through an EMA of its weights (decay 0.999).
The average lives on the model's backend, is updated after every optimizer step and is saved in the
checkpoint, so a resumed run averages exactly as one that never stopped. BatchNorm running statistics
are not averaged: they belong to the live weights, so `applied` recomputes them for the average.
"""
import contextlib

import numpy as np

from pipeline.nn import get_array_module, to_device, to_numpy


class WeightAverage:
    """ema <- d * ema + (1 - d) * w after each step, with d = min(decay, (1 + t) / (10 + t)) at update t.

    The warm-up of d (TensorFlow's ExponentialMovingAverage with num_updates) keeps the first epochs from
    dragging the initial weights along in short runs.
    """

    def __init__(self, model, decay):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: p.copy() for name, p, _ in model.params()}

    def update(self, model):
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for name, p, _ in model.params():
            e = self.shadow[name]
            e += (p - e) * e.dtype.type(1.0 - d)
        self.updates += 1

    def state_dict(self):
        out = {name: np.array(to_numpy(a), copy=True) for name, a in self.shadow.items()}
        out["updates"] = np.array(self.updates, np.int64)
        return out

    def load_state_dict(self, state):
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"weight average lacks {missing}")
        for name, e in self.shadow.items():
            e[...] = to_device(np.asarray(state[name], dtype=e.dtype), get_array_module(e))
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def applied(self, model, calibration_images):
        """Within the block the model holds the averaged weights, with BatchNorm statistics recomputed for
        them on `calibration_images`; it yields that state dict. Afterwards the model holds exactly its own
        arrays again."""
        live = model.state_dict()
        model.load_state_dict({**live, **{k: to_numpy(v) for k, v in self.shadow.items()}})
        try:
            model.recompute_batchnorm_statistics(calibration_images)
            yield model.state_dict()
        finally:
            model.load_state_dict(live)

    def averaged_state(self, model, calibration_images):
        """The state dict of applied(), the model left as it was."""
        with self.applied(model, calibration_images) as state:
            return state
