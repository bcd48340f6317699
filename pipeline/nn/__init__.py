"""The CNN engine: NumPy (or CuPy through the same code) forward/backward, optimizers, schedules.

Layout NHWC: images (N, H, W, C); conv kernels (kh, kw, Cin, Cout); dense kernels (in, out).
On the CPU the engine splits big element-wise passes over num_threads() threads ($PIPELINE_NN_THREADS,
else the CPUs it may use); configure_threads(), which a stage calls when it starts, also holds NumPy's BLAS
to one thread per call and lets the engine split its GEMMs and whole layers (pipeline/nn/threads.py).
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
