"""The CNN engine: NumPy (or CuPy through the same code) forward/backward, optimizers, schedules.

Layout NHWC: images (N, H, W, C); conv kernels (kh, kw, Cin, Cout); dense kernels (in, out).
On the CPU the engine splits big element-wise passes and GEMMs over num_threads() threads
($PIPELINE_NN_THREADS, else the CPUs it may use) and holds NumPy's BLAS to one thread per call.
"""
from pipeline.nn.architectures import ARCHITECTURES
from pipeline.nn.backend import get_array_module, num_threads, select_device, set_num_threads, to_device, to_numpy
from pipeline.nn.loss import log_softmax, softmax, softmax_cross_entropy
from pipeline.nn.model import Model, build_model
from pipeline.nn.optim import make_optimizer
from pipeline.nn.profile import profile_layers
from pipeline.nn.schedules import make_schedule

__all__ = [
    "ARCHITECTURES", "Model", "build_model", "get_array_module", "log_softmax", "make_optimizer",
    "make_schedule", "num_threads", "profile_layers", "select_device", "set_num_threads", "softmax",
    "softmax_cross_entropy", "to_device", "to_numpy",
]
