"""Array backend: NumPy by default, CuPy when asked for and present (Chainer's rule).

The data picks the backend: `get_array_module(*arrays)` returns cupy only when CuPy imported and one of
the arrays lives on the GPU, so every op has one generic body (`xp = get_array_module(x)`).
CuPy is never required: its import sits in a try/except and is attempted lazily, not at import time.
"""
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

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


class Workspace:
    """One flat scratch buffer lent out as arrays of any shape, kept between training steps.

    A fresh 10-100 MB array each step costs page faults comparable to the copy that fills it. Each
    `array()` call reuses the same memory, so an array stays valid only until the next call.
    """

    def __init__(self):
        self._flat = None
        self._children = {}

    def array(self, shape, dtype, xp=np):
        size = 1
        for s in shape:
            size *= int(s)
        dtype = np.dtype(dtype)
        flat = self._flat
        if (flat is None or flat.dtype != dtype or flat.size < size
                or get_array_module(flat) is not xp):
            flat = self._flat = xp.empty(max(size, 1), dtype=dtype)
        return flat[:size].reshape(shape)

    def for_thread(self, t):
        """The workspace of the engine's thread t (0: the calling thread): threads never share memory."""
        if t == 0:
            return self
        if t not in self._children:
            self._children[t] = Workspace()
        return self._children[t]


def scratch(shape, dtype, slot=0, xp=np):
    """A scratch array private to the calling thread (slot: which of its buffers), reused between calls.

    For the temporaries of an element-wise block: a fresh array of a megabyte or so can be mapped and
    page-faulted anew on every call (lenet5's first max pool: 3.0 ms forward with fresh temporaries, 1.2 ms
    with these). Valid until the same thread asks for the same slot again.
    """
    spaces = _local.__dict__.setdefault("scratch", {})
    if slot not in spaces:
        spaces[slot] = Workspace()
    return spaces[slot].array(shape, dtype, xp)


# -- threads -----------------------------------------------------------------------------------------
# NumPy's element-wise loops run on one core but release the GIL, so the engine splits big passes over
# the batch axis between a few Python threads. It splits its GEMMs by rows the same way, with BLAS held
# to one thread per call: on a shared machine OpenBLAS's own threads spin-wait and stall (measured here
# with 2 cores and load ~3: median 1113 ms for a set of the engine's GEMMs with OpenBLAS threading,
# 176 ms split by rows over 2 Python threads with single-threaded OpenBLAS; equal, 12 ms, when idle).
_threads = None
_pool = None
_local = threading.local()  # .serial: True inside a parallel_batches part, whose nested passes run inline
_blas_single = None  # None: not tried yet; True: BLAS held to 1 thread; False: could not (no threadpoolctl)
PARALLEL_MIN_BYTES = 1 << 20  # below this a pass is cheaper than handing it to another thread
BLOCK_BYTES = 1 << 21         # row blocks of about this size keep a pass's temporaries in cache


def num_threads():
    """Threads for element-wise work: $PIPELINE_NN_THREADS, else the CPUs this process may use (max 8)."""
    global _threads
    if _threads is None:
        env = os.environ.get("PIPELINE_NN_THREADS", "").strip()
        if env:
            if not env.isdigit() or int(env) < 1:
                raise EngineError(f"PIPELINE_NN_THREADS must be a positive integer, got {env!r}")
            _threads = int(env)
        else:
            try:
                _threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                _threads = os.cpu_count() or 1
            _threads = max(1, min(_threads, 8))
    return _threads


def set_num_threads(n=None):
    """Use n threads for element-wise work and GEMMs from now on (1 turns the splitting off; None goes
    back to the default of num_threads())."""
    global _threads, _pool
    _threads = None if n is None else max(1, int(n))
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None


def parallel_rows(fn, n, like):
    """[fn(slice) for contiguous row blocks covering range(n)]: blocks run on the engine's threads.

    `like` is the biggest array a pass touches. Big passes are cut into blocks of about BLOCK_BYTES of
    it, so that a block's temporaries stay in cache between the passes fn makes over it, and the blocks
    are shared among the threads. A small `like` (under PARALLEL_MIN_BYTES), one that is not a numpy
    array (CuPy runs element-wise work on the GPU already), or n == 1 gives [fn(slice(0, n))].
    fn must only write its own rows of shared outputs.
    """
    global _pool
    if n <= 1 or not isinstance(like, np.ndarray) or like.nbytes < PARALLEL_MIN_BYTES:
        return [fn(slice(0, n))]
    threads = 1 if _in_part() else min(num_threads(), n)
    blocks = max(threads, min(n, like.nbytes // BLOCK_BYTES))
    blocks = min(n, -(-blocks // threads) * threads)  # as many blocks per thread, so both finish together
    bounds = [n * k // blocks for k in range(blocks + 1)]
    slices = [slice(bounds[k], bounds[k + 1]) for k in range(blocks)]
    if threads <= 1:
        return [fn(sl) for sl in slices]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, thread_name_prefix="pipeline-nn")
    groups = [slices[blocks * t // threads:blocks * (t + 1) // threads] for t in range(threads)]
    futures = [_pool.submit(lambda g=g: [fn(sl) for sl in g]) for g in groups[1:]]
    results = [fn(sl) for sl in groups[0]]
    for f in futures:
        results.extend(f.result())
    return results


def _in_part():
    """True on a thread running a parallel_batches part: its nested passes must not wait on the pool."""
    return getattr(_local, "serial", False)


def _run_part(fn, rows, t):
    _local.serial, _local.part = True, t
    try:
        return fn(rows, t)
    finally:
        _local.serial, _local.part = False, 0


def parallel_batches(fn, n, like, flops=0):
    """[fn(rows, t) for t, rows in enumerate(parts)]: range(n) in one contiguous part per thread.

    The batch split that suits a whole layer (a convolution's column fills, GEMMs and scatters): each
    thread t works through its own images, in cache-sized chunks if fn wants, with its own scratch
    memory (Workspace.for_thread(t)); the parallel_rows / gemm calls fn makes run inline on that thread.
    The parts depend on n and num_threads() only, so sums over them are the same run to run. Splits only
    numpy work that is big enough (`like` at least PARALLEL_MIN_BYTES, or `flops` at least GEMM_MIN_FLOPS
    multiply-adds) and, like parallel_gemm_rows, only once BLAS is held to one thread.
    """
    global _pool
    numpy_work = isinstance(like, np.ndarray)
    single = _hold_blas_to_one_thread() if numpy_work else False
    parts = 1 if _in_part() else min(num_threads(), n)
    big = numpy_work and (like.nbytes >= PARALLEL_MIN_BYTES or flops >= GEMM_MIN_FLOPS)
    if parts <= 1 or not big or not single:
        return [fn(slice(0, n), getattr(_local, "part", 0))]  # nested: keep the caller's thread index
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, thread_name_prefix="pipeline-nn")
    bounds = [n * k // parts for k in range(parts + 1)]
    futures = [_pool.submit(_run_part, fn, slice(bounds[k], bounds[k + 1]), k) for k in range(1, parts)]
    first = _run_part(fn, slice(bounds[0], bounds[1]), 0)
    return [first] + [f.result() for f in futures]


def _hold_blas_to_one_thread():
    """Limit NumPy's BLAS (not other libraries', e.g. torch's) to one thread, once; False if impossible.

    A process-wide side effect, taken at the engine's first GEMM: from then on the engine's threads are
    the parallelism. Needs threadpoolctl; without it BLAS keeps its own threads and the engine does not
    split GEMMs.
    """
    global _blas_single
    if _blas_single is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_single = False
            return False
        controller = ThreadpoolController()
        # torch bundles its own BLAS/OpenMP: a comparison run in the same process must keep its threads
        blas = [lib for lib in controller.lib_controllers
                if lib.user_api == "blas" and "torch" not in lib.filepath]
        if not blas:
            _blas_single = False
            return False
        for lib in blas:
            lib.set_num_threads(1)
        _blas_single = True
    return _blas_single


GEMM_MIN_FLOPS = 4e6  # smaller products are not worth a thread hand-off


def parallel_gemm_rows(fn, m, flops, like=None):
    """[fn(slice) for num_threads() row slices of range(m)] for a GEMM of `flops` multiply-adds.

    Splits only numpy work (`like`, if given, must be a numpy array) big enough to pay for the hand-off,
    and only once BLAS is held to one thread (else BLAS threads the single call itself).
    """
    global _pool
    if like is not None and not isinstance(like, np.ndarray):
        return [fn(slice(0, m))]
    # hold BLAS to one thread before the first engine GEMM, split or not: a product must not change in
    # its last bits with the process's history (a resumed run repeats the uninterrupted one bit for bit)
    single = _hold_blas_to_one_thread()
    parts = 1 if _in_part() else min(num_threads(), m)
    if parts <= 1 or flops < GEMM_MIN_FLOPS or not single:
        return [fn(slice(0, m))]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, thread_name_prefix="pipeline-nn")
    bounds = [m * k // parts for k in range(parts + 1)]
    futures = [_pool.submit(fn, slice(bounds[k], bounds[k + 1])) for k in range(1, parts)]
    first = fn(slice(bounds[0], bounds[1]))
    return [first] + [f.result() for f in futures]


def gemm(a, b, out=None):
    """a (M, K) @ b (K, N), rows split among the engine's threads (see parallel_gemm_rows)."""
    xp = get_array_module(a, b)
    if xp is not np:  # one call on the GPU
        if out is None:
            return a @ b
        out[...] = a @ b
        return out
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = np.empty((m, n), dtype=np.result_type(a, b))
    parallel_gemm_rows(lambda r: np.matmul(a[r], b, out=out[r]), m, m * k * n, like=a)
    return out


def gemm_tn(a, b):
    """a.T @ b for a (M, K), b (M, N) -> (K, N): a sum over M, so each thread takes a row range."""
    m, k = a.shape
    n = b.shape[1]
    parts = parallel_gemm_rows(lambda r: a[r].T @ b[r], m, m * k * n, like=a)
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total
