"""Array backend: NumPy by default, CuPy when asked for and present (Chainer's rule).

The data picks the backend: `get_array_module(*arrays)` returns cupy only when CuPy imported and one of
the arrays lives on the GPU, so every op has one generic body (`xp = get_array_module(x)`).
CuPy is never required: its import sits in a try/except and is attempted lazily, not at import time.
This module only picks and moves arrays; scratch memory is memory.py's, the engine's threads are in
threads.py, its thresholds in tuning.py.
"""
import sys

import numpy as np

from pipeline.nn.errors import EngineError

_cupy = None
_cupy_tried = False
_cupy_usable = None  # None: not probed yet (cupy_available)
_cupy_failure = ""   # why an installed CuPy with a device could not run its probe


def _import_cupy():
    """The cupy module, or None when it is not installed or fails to import."""
    global _cupy, _cupy_tried
    if not _cupy_tried:
        _cupy_tried = True
        try:
            import cupy  # noqa: PLC0415  (optional dependency)
            _cupy = cupy
        except Exception:  # ImportError, or a broken CUDA install raising something else
            _cupy = None
    return _cupy


def cupy_available():
    """True when cupy imports, a CUDA device is visible and a tiny element-wise kernel and matrix product run
    on it (a CuPy built for another CUDA, or without NVRTC or cuBLAS, imports but fails at its first op:
    then one line on stderr, and NumPy). Probed once per process."""
    global _cupy_usable, _cupy_failure
    if _cupy_usable is None:
        _cupy_usable, _cupy_failure = _probe_cupy(_import_cupy())
        if _cupy_failure:
            print(f"CuPy cannot run on this GPU ({_cupy_failure}); using NumPy", file=sys.stderr)
    return _cupy_usable


def cupy_unavailable_reason():
    """Why cupy_available() is False, in a few words ('' when it is True)."""
    if cupy_available():
        return ""
    if _import_cupy() is None:
        return "CuPy is not installed"
    return f"CuPy cannot run on the GPU ({_cupy_failure})" if _cupy_failure else "no CUDA device is visible"


def _probe_cupy(cp):
    """(usable, why not: '' when CuPy or a device is simply absent)."""
    if cp is None:
        return False, ""
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return False, ""
    except Exception:  # no driver: no GPU to use
        return False, ""
    try:
        a = cp.arange(4, dtype=cp.float32).reshape(2, 2)
        product = ((a + 1) @ a).get()  # an element-wise kernel (compiled by NVRTC), a cuBLAS GEMM, a copy back
        if not np.array_equal(product, [[4, 7], [8, 15]]):  # [[1, 2], [3, 4]] @ [[0, 1], [2, 3]]
            return False, f"a test product came out {product.tolist()}"
    except Exception as exc:
        return False, " ".join(f"{type(exc).__name__}: {exc}".split())
    return True, ""


def get_array_module(*arrays):
    """numpy, or cupy when CuPy imported and any of `arrays` is a cupy array."""
    if not _cupy_tried:
        # plain numpy data never pays for the cupy import
        if all(a is None or isinstance(a, (np.ndarray, np.generic, int, float)) for a in arrays):
            return np
        _import_cupy()
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def select_device(name="auto"):
    """The xp module for a device name: 'auto' (cupy when a GPU is usable, else numpy), 'cpu', 'gpu'."""
    name = str(name).lower()
    if name == "cpu":
        return np
    if name == "gpu":
        if not cupy_available():
            raise EngineError(f"device 'gpu' requested but {cupy_unavailable_reason()}; use DEVICE=cpu or DEVICE=auto")
        return _import_cupy()
    if name == "auto":
        return _import_cupy() if cupy_available() else np
    raise EngineError(f"unknown device '{name}' (known: auto, cpu, gpu)")


def to_numpy(a):
    """A numpy array with the same values (a copy from the GPU, the same object when already numpy)."""
    if isinstance(a, np.ndarray):
        return a
    cp = _import_cupy() if not isinstance(a, (np.generic, int, float, list, tuple)) else None
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def to_device(a, xp):
    """`a` as an array of module `xp` (numpy or cupy), copied only when it must move."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)
