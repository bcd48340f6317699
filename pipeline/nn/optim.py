"""Optimizers with explicit per-parameter state (Chainer's UpdateRule.state): SGD, Adam, AdamW.

Update formulas are PyTorch's. Regularization, applied to kernels ("*.w") only, never to biases or BN:
  l1, l2         coupled: the gradient gets l1 * sign(w) + l2 * w, the gradient of Model.penalty. The loss
                 train reports is the data loss alone: the penalty acts through this gradient only
  weight_decay   decoupled: w -= lr * weight_decay * w before the update (sgd and adamw)
State dict: {"step": int64 0-d, "<param>.<slot>": array} with slots momentum_buffer (sgd), exp_avg and
exp_avg_sq (adam, adamw); "<param>" is the model's name ("0.w").
"""
import numpy as np

from pipeline.nn.errors import EngineError
from pipeline.nn.backend import get_array_module, to_device, to_numpy


def is_kernel(name):
    return name.endswith(".w")


class Optimizer:
    kind = "optimizer"
    slots = ()

    def __init__(self, weight_decay=0.0, l1=0.0, l2=0.0):
        self.weight_decay, self.l1, self.l2 = float(weight_decay), float(l1), float(l2)
        self.state = {}  # param name -> {slot: array on the param's device}
        self.step_count = 0

    def _regularized_grad(self, name, p, g):
        if not is_kernel(name) or not (self.l1 or self.l2):
            return g
        xp = get_array_module(p)
        g = g.copy()
        if self.l1:
            g += self.l1 * xp.sign(p)
        if self.l2:
            g += self.l2 * p
        return g

    def step(self, params, lr):
        """One update of every (name, param, grad) in place with learning rate lr."""
        lr = float(lr)
        self.step_count += 1
        for name, p, g in params:
            g = self._regularized_grad(name, p, g)
            if self.weight_decay and is_kernel(name):
                p *= 1.0 - lr * self.weight_decay
            self._update(self.state.setdefault(name, {}), p, g, lr)

    def _update(self, state, p, g, lr):
        raise NotImplementedError

    def _slot(self, state, slot, p):
        """The slot array on p's device (created as zeros, or moved there after a load)."""
        a = state.get(slot)
        xp = get_array_module(p)
        if a is None:
            a = state[slot] = xp.zeros_like(p)
        elif get_array_module(a) is not xp or a.dtype != p.dtype:
            a = state[slot] = to_device(a, xp).astype(p.dtype)
        return a

    def state_dict(self):
        d = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, slots in self.state.items():
            for slot, a in slots.items():
                d[f"{name}.{slot}"] = np.array(to_numpy(a), copy=True)
        return d

    def required_slots(self):
        """The slots every parameter must have after a step for the next one to be right."""
        return self.slots

    def load_state_dict(self, d, params=None):
        """Restore step and slots; arrays move to the parameters' device at the next step. With `params`
        (Model.params()), the state must be theirs, as Model.load_state_dict asks of its own: slots of those
        parameters only, in their shapes, and after a step every required slot of every parameter (a
        parameter whose Adam moments were missing restarted from zero while the step count, and with it the
        bias correction, went on)."""
        if "step" not in d:
            raise ValueError("optimizer state lacks 'step'")
        state = {}
        for key, value in d.items():
            if key == "step":
                continue
            name, _, slot = key.rpartition(".")
            if slot not in self.slots or not name:
                raise ValueError(f"optimizer state '{key}' is not a {self.kind} slot ({', '.join(self.slots)})")
            state.setdefault(name, {})[slot] = np.array(value, copy=True)
        step = int(np.asarray(d["step"]))
        if params is not None:
            shapes = {name: tuple(p.shape) for name, p, _ in params}
            extra = sorted(set(state) - set(shapes))
            missing = sorted(f"{name}.{slot}" for name in shapes for slot in self.required_slots()
                             if step and slot not in state.get(name, {}))
            if extra or missing:
                raise ValueError(f"optimizer state does not match the model: missing {missing}, unexpected {extra}")
            for name, slots in state.items():
                for slot, a in slots.items():
                    if a.shape != shapes[name]:
                        raise ValueError(f"optimizer state '{name}.{slot}': shape {a.shape}, the model's "
                                         f"{shapes[name]}")
        self.state = state
        self.step_count = step


class SGD(Optimizer):
    """buf = g (first step), then buf = momentum * buf + g; nesterov: g + momentum * buf; w -= lr * that."""

    kind = "sgd"
    slots = ("momentum_buffer",)

    def __init__(self, momentum=0.9, nesterov=False, **kw):
        super().__init__(**kw)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")

    def required_slots(self):
        return ()  # a missing buffer starts from the gradient, as on the first step (SGD without momentum keeps none)

    def _update(self, state, p, g, lr):
        if self.momentum:
            if "momentum_buffer" not in state:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf = self._slot(state, "momentum_buffer", p)
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= lr * g


class Adam(Optimizer):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""

    kind = "adam"
    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, **kw):
        super().__init__(**kw)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)

    def _update(self, state, p, g, lr):
        xp = get_array_module(p)
        m = self._slot(state, "exp_avg", p)
        v = self._slot(state, "exp_avg_sq", p)
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * (g * g)
        t = self.step_count
        step_size = lr / (1.0 - self.beta1 ** t)
        denom = xp.sqrt(v)
        denom /= (1.0 - self.beta2 ** t) ** 0.5
        denom += self.eps
        p -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter; PyTorch's default weight_decay 0.01 is not
    assumed: 0 unless given)."""

    kind = "adamw"


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name, momentum=0.9, nesterov=False, betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=0.0, l1=0.0, l2=0.0):
    """An optimizer by name: sgd | adam | adamw. It holds no learning rate: each step() is given the schedule's."""
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise EngineError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")
    if name == "adam" and weight_decay:
        raise EngineError("weight_decay is decoupled and applies to sgd and adamw; "
                        "use optimizer=adamw, or l2 for a coupled penalty with adam")
    reg = dict(weight_decay=weight_decay, l1=l1, l2=l2)
    if name == "sgd":
        return SGD(momentum=momentum, nesterov=nesterov, **reg)
    return OPTIMIZERS[name](betas=betas, eps=eps, **reg)
