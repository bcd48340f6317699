"""The engine's threads: one splitter, per-thread scratch memory in named slots, and the BLAS setting.

NumPy's element-wise loops run on one core but release the GIL, so the engine splits big passes over the
batch axis between a few Python threads. It splits its GEMMs by rows the same way, with BLAS held to one
thread per call: on a shared machine OpenBLAS's own threads spin-wait and stall (measured here with 2 cores
and load ~3: median 1113 ms for a set of the engine's GEMMs with OpenBLAS threading, 176 ms split by rows over
2 Python threads with single-threaded OpenBLAS; equal, 12 ms, when idle).

Holding BLAS to one thread changes the whole process, so importing the engine does not do it: a stage calls
configure() when it starts (train, predict, ensemble, the bench). Until then BLAS keeps its own threads and
the engine splits only element-wise passes; GEMMs and whole-layer batch splits wait for configure().
Only NumPy work is split: CuPy runs on the GPU already.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.nn import tuning
from pipeline.nn.backend import get_array_module
from pipeline.nn.errors import EngineError
from pipeline.nn.memory import Workspace

_threads = None
_pool = None
_pool_lock = threading.Lock()  # two threads splitting at once must not make two pools
_local = threading.local()  # .part: the part this thread runs (see split), .scratch: its scratch slots
_blas_held = False          # True once configure() held NumPy's BLAS to one thread


def num_threads():
    """Threads for the engine's work: $PIPELINE_NN_THREADS, else the CPUs this process may use (at most
    tuning.MAX_THREADS)."""
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
            _threads = max(1, min(_threads, tuning.MAX_THREADS))
    return _threads


def set_num_threads(n=None):
    """Use n threads from now on (1 turns the splitting off; None goes back to num_threads()'s default)."""
    global _threads, _pool
    _threads = None if n is None else max(1, int(n))
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True)


def configure(n=None):
    """Set up the engine's threads for this process; a stage calls it once, when it starts.

    n threads for the engine (None: num_threads()'s default), and NumPy's BLAS held to one thread per call
    from now on, so that the engine's threads are the parallelism (other libraries' BLAS, e.g. torch's, keep
    theirs). Call it before the first GEMM: a product must not change in its last bits with the process's
    history (a resumed run repeats the uninterrupted one bit for bit). Returns True when BLAS is held;
    False without threadpoolctl, and then the engine does not split GEMMs.
    """
    global _blas_held
    set_num_threads(n)
    num_threads()  # a bad $PIPELINE_NN_THREADS fails here, when the stage starts, not at its first big op
    _blas_held = _hold_blas_to_one_thread()
    return _blas_held


def _hold_blas_to_one_thread():
    try:
        from threadpoolctl import ThreadpoolController  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return False
    # torch bundles its own BLAS/OpenMP: a comparison run in the same process must keep its threads
    blas = [lib for lib in ThreadpoolController().lib_controllers
            if lib.user_api == "blas" and "torch" not in lib.filepath]
    for lib in blas:
        lib.set_num_threads(1)
    return bool(blas)


# -- the splitter --------------------------------------------------------------------------------------

def split(fn, n, parts, blocks=None):
    """[fn(rows, t) for every block of range(n)], the blocks shared among `parts` threads, in block order.

    range(n) is cut into `blocks` (default: parts) contiguous slices, as even as can be; thread t (0: the
    caller, the others from the pool) runs blocks [blocks*t // parts, blocks*(t+1) // parts) one after the
    other and passes t, its part index, to fn (Workspace.for_thread(t) is that part's memory). Inside a
    part, nested splits run inline (a pool thread must never wait on the pool). parts == 1 runs every block
    on the caller, with the caller's part index. fn must write only its own rows of shared outputs.
    """
    blocks = max(1, parts if blocks is None else blocks)
    bounds = [n * k // blocks for k in range(blocks + 1)]
    slices = [slice(bounds[k], bounds[k + 1]) for k in range(blocks)]
    if parts <= 1:
        t = part_index()
        return [fn(rows, t) for rows in slices]
    groups = [slices[blocks * t // parts:blocks * (t + 1) // parts] for t in range(parts)]
    pool = _thread_pool()
    futures = [pool.submit(_run_part, fn, groups[t], t) for t in range(1, parts)]
    results = _run_part(fn, groups[0], 0)
    for f in futures:
        results.extend(f.result())
    return results


def _thread_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            # at least one worker: split() may be asked for parts with one engine thread (PIPELINE_NN_THREADS=1)
            _pool = ThreadPoolExecutor(max_workers=max(1, num_threads() - 1), thread_name_prefix="pipeline-nn")
        return _pool


def _run_part(fn, group, t):
    outer = getattr(_local, "part", None)
    _local.part = t
    try:
        return [fn(rows, t) for rows in group]
    finally:
        _local.part = outer


def part_index():
    """The part the calling thread runs inside a split, 0 outside any."""
    part = getattr(_local, "part", None)
    return 0 if part is None else part


def _in_part():
    return getattr(_local, "part", None) is not None


def _threads_for(n):
    """Threads a split of n items may use here: 1 inside a part (nested), else up to num_threads()."""
    return 1 if _in_part() else min(num_threads(), n)


def parallel_rows(fn, n, like):
    """[fn(rows) for contiguous row blocks covering range(n)], for an element-wise pass.

    `like` is the biggest array the pass touches. Big passes are cut into blocks of about
    tuning.BLOCK_BYTES of it, so that a block's temporaries stay in cache between fn's passes over it, as
    many blocks per thread. A small `like` (under tuning.PARALLEL_MIN_BYTES), one that is not a numpy
    array, or n == 1 gives [fn(slice(0, n))].
    """
    if n <= 1 or not isinstance(like, np.ndarray) or like.nbytes < tuning.PARALLEL_MIN_BYTES:
        return [fn(slice(0, n))]
    threads = _threads_for(n)
    blocks = max(threads, min(n, like.nbytes // tuning.BLOCK_BYTES))
    blocks = min(n, -(-blocks // threads) * threads)  # as many blocks per thread, so all finish together
    return split(lambda rows, t: fn(rows), n, threads, blocks)


def parallel_batches(fn, n, like, flops=0):
    """[fn(rows, t) for one contiguous part of range(n) per thread], for a whole layer.

    Each thread t works through its own images (a convolution's column fills, GEMMs and scatters), in
    cache-sized chunks if fn wants, with its own memory (Workspace.for_thread(t)); the splits fn makes run
    inline. The parts depend on n and num_threads() only, so sums over them are the same run to run. Splits
    only numpy work that is big enough (`like` at least tuning.PARALLEL_MIN_BYTES, or `flops` at least
    tuning.GEMM_MIN_FLOPS multiply-adds), and only once configure() held BLAS to one thread.
    """
    big = isinstance(like, np.ndarray) and (like.nbytes >= tuning.PARALLEL_MIN_BYTES
                                            or flops >= tuning.GEMM_MIN_FLOPS)
    return split(fn, n, _threads_for(n) if big and _blas_held else 1)


def parallel_gemm_rows(fn, m, flops, like=None):
    """[fn(rows) for one row range of range(m) per thread], for a GEMM of `flops` multiply-adds.

    Splits only numpy work (`like`, if given, must be a numpy array) of at least tuning.GEMM_MIN_FLOPS,
    and only once configure() held BLAS to one thread (else BLAS threads the single call itself).
    """
    numpy_work = like is None or isinstance(like, np.ndarray)
    big = numpy_work and flops >= tuning.GEMM_MIN_FLOPS and _blas_held
    return split(lambda rows, t: fn(rows), m, _threads_for(m) if big else 1)


def sum_in_order(parts):
    """parts[0] + parts[1] + ... in list order: the threads' partial sums, added the same way every run."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def gemm(a, b, out=None):
    """a (M, K) @ b (K, N), rows split among the engine's threads (see parallel_gemm_rows)."""
    if get_array_module(a, b) is not np:  # one call on the GPU
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
    return sum_in_order(parallel_gemm_rows(lambda r: a[r].T @ b[r], m, m * k * n, like=a))


# -- scratch memory ------------------------------------------------------------------------------------

def scratch(slot, shape, dtype, xp=np):
    """A scratch array private to the calling thread, from the slot named `slot` ("pool.colmax"), reused
    between calls.

    For the temporaries of an element-wise block: a fresh array of a megabyte or so can be mapped and
    page-faulted anew on every call (lenet5's first max pool: 3.0 ms forward with fresh temporaries, 1.2 ms
    with these). Valid until the same thread asks for the same slot again; every op names its own slots
    "<op>.<what>", so no two ops share one. On the GPU a fresh array from CuPy's memory pool, which already
    recycles blocks without page faults: a slot kept there would hold device memory after predict.
    """
    if not isinstance(slot, str):
        raise TypeError(f"scratch slots are named '<op>.<what>', got {slot!r}")
    if xp is not np:
        return xp.empty(shape, dtype=dtype)
    spaces = _local.__dict__.setdefault("scratch", {})
    if slot not in spaces:
        spaces[slot] = Workspace()
    return spaces[slot].array(shape, dtype, xp)
