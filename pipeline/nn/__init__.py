"""The CNN engine: NumPy (or CuPy through the same code) forward/backward, optimizers, schedules.

Layout NHWC: images (N, H, W, C); conv kernels (kh, kw, Cin, Cout); dense kernels (in, out).
On the CPU the engine splits big element-wise passes over num_threads() threads ($PIPELINE_NN_THREADS,
else the CPUs it may use); configure_threads(), which a stage calls when it starts, also holds NumPy's BLAS
to one thread per call and lets the engine split its GEMMs and whole layers (pipeline/nn/threads.py).

How to read it, top down:
- architectures.py: each net as a list of layer specs (plain dicts); spec.py: the table from a spec's
  "type" to its layer class (a "maxpool" of 2x2 windows at stride 2 is MaxPool2x2, with its own op pair).
- plan.py: spec -> the layers that run, some of them fused classes (fused.py: ConvReLUMaxPool2x2,
  ConvMaxPool2x2, BatchNormReLU, ReLUMaxPool), by an explicit table of patterns; model.py: the Model over those layers
  (forward, backward, state by spec index) and for_inference(), a copy with BatchNorms folded.
- layers.py (layers with parameters) and parameterless.py: thin classes over the ops.
- One file per op, CS231n style: a `*_forward` / `*_backward` pair with shapes in the docstring, the
  naive reference beside it, fast routes behind one dispatch (conv.py, with im2col.py and
  conv_routes.py; convpool.py, pool.py, norm.py, activation.py, dropout.py, linear.py, loss.py).
- tuning.py: every threshold that picks a route or a size, with the measurement behind it.
- backend.py: the array module (NumPy or CuPy); threads.py: the one splitter and named scratch slots;
  memory.py: reusable per-layer buffers; errors.py: EngineError, the engine's one-line refusals.
A new layer: its op pair in an op file, its class in layers.py or parameterless.py, one entry in spec.py.
"""
from pipeline.nn.architectures import ARCHITECTURES
from pipeline.nn.backend import get_array_module, select_device, to_device, to_numpy
from pipeline.nn.loss import softmax, softmax_cross_entropy
from pipeline.nn.model import build_model
from pipeline.nn.optim import make_optimizer
from pipeline.nn.profile import profile_layers
from pipeline.nn.schedules import make_schedule
from pipeline.nn.threads import configure as configure_threads

__all__ = [
    "ARCHITECTURES", "build_model", "configure_threads", "get_array_module", "make_optimizer", "make_schedule",
    "profile_layers", "select_device", "softmax", "softmax_cross_entropy", "to_device", "to_numpy",
]
